//! The packet queue toward one peer (one gRPC stream). Control packets (dial responses,
//! window credits, close replies) overtake bulk DATA so a saturated link never delays a dial
//! or withholds the credit that would let another stream move; DATA and the CLOSE that ends
//! a connection share one ordered queue so a close never overtakes its connection's bytes.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::mpsc;

use crate::proto::{Frame, Packet};

/// DATA packets queued toward one peer before senders wait (the link's own backpressure).
pub(crate) const DATA_QUEUE: usize = 256;

/// The sending side of a link.
#[derive(Clone, Debug)]
pub(crate) struct Link {
    control: mpsc::UnboundedSender<Option<Packet>>,
    data: mpsc::Sender<Packet>,
}

/// The packets a link sends, control first; ends when [`Link::end`] is called or every
/// sender is gone.
#[derive(Debug)]
pub(crate) struct Outbound {
    control: mpsc::UnboundedReceiver<Option<Packet>>,
    data: mpsc::Receiver<Packet>,
    ended: bool,
}

impl Link {
    /// A new link and the stream of packets to write to the peer.
    pub(crate) fn new() -> (Link, Outbound) {
        let (control, control_rx) = mpsc::unbounded_channel();
        let (data, data_rx) = mpsc::channel(DATA_QUEUE);
        (
            Link { control, data },
            Outbound {
                control: control_rx,
                data: data_rx,
                ended: false,
            },
        )
    }

    /// Queues a control packet; false when the link is gone.
    pub(crate) fn control(&self, frame: Frame) -> bool {
        self.control.send(Some(frame.into())).is_ok()
    }

    /// Queues DATA (or the CLOSE ordered after it), waiting while the link is full; false
    /// when the link is gone.
    pub(crate) async fn data(&self, frame: Frame) -> bool {
        self.data.send(frame.into()).await.is_ok()
    }

    /// Resolves once the peer's side of the link is gone (its outbound stream dropped).
    pub(crate) async fn closed(&self) {
        self.control.closed().await;
    }

    /// Ends the outbound stream after the control packets already queued.
    pub(crate) fn end(&self) {
        let _ = self.control.send(None);
    }
}

impl tokio_stream::Stream for Outbound {
    type Item = Packet;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Packet>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let control_done = match self.control.poll_recv(cx) {
            Poll::Ready(Some(Some(p))) => return Poll::Ready(Some(p)),
            Poll::Ready(Some(None)) => {
                self.ended = true;
                return Poll::Ready(None);
            }
            Poll::Ready(None) => true,
            Poll::Pending => false,
        };
        match self.data.poll_recv(cx) {
            Poll::Ready(Some(p)) => Poll::Ready(Some(p)),
            Poll::Ready(None) if control_done => Poll::Ready(None),
            _ => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn control_overtakes_data_and_end_stops_the_stream() {
        let (link, mut out) = Link::new();
        assert!(
            link.data(Frame::Data {
                connect_id: 1,
                data: bytes::Bytes::from_static(b"x"),
                error: String::new(),
            })
            .await
        );
        assert!(link.control(Frame::Drain));
        let first = Frame::try_from(out.next().await.expect("packet")).expect("valid");
        assert_eq!(first, Frame::Drain);
        let second = Frame::try_from(out.next().await.expect("packet")).expect("valid");
        assert!(matches!(second, Frame::Data { connect_id: 1, .. }));
        link.end();
        assert!(out.next().await.is_none());
    }
}

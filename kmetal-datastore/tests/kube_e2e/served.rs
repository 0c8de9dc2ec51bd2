//! A gateway the apiserver reaches through a proxy, so that it can be restarted under it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kmetal_datastore::Datastore;
use kmetal_datastore::gateway::Gateway;
use kmetal_testkit::FaultProxy;

/// A gateway on a store, reached through a [`FaultProxy`]: for a restart the proxy resets every
/// connection (what the gateway process dying does), a new gateway comes up on a newly opened
/// store, and the proxy forwards to it.
pub struct Served {
    proxy: FaultProxy,
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

/// Serves `store` on `listener` until the returned sender fires (or is dropped).
fn gateway(
    store: Arc<dyn Datastore>,
    listener: tokio::net::TcpListener,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        Gateway::new(store)
            .serve_on(listener, None, shutdown)
            .await
            .unwrap();
    });
    (stop, task)
}

impl Served {
    /// Serves `store` on a free loopback port behind a proxy.
    pub async fn start(store: Arc<dyn Datastore>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, task) = gateway(store, listener);
        let proxy = FaultProxy::start(addr).await.unwrap();
        Self {
            proxy,
            addr,
            stop,
            task,
        }
    }

    /// The URL the apiserver is given (the proxy's).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.proxy.addr())
    }

    /// Cuts the apiserver off, stops the gateway, serves `store` on the same port, and lets
    /// the apiserver back in.
    pub async fn restart(self, store: Arc<dyn Datastore>) -> Self {
        let Self {
            proxy,
            addr,
            stop,
            task,
        } = self;
        proxy.reset();
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("the gateway stops once its connections are gone")
            .unwrap();
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let (stop, task) = gateway(store, listener);
        tokio::time::sleep(Duration::from_secs(2)).await;
        proxy.restore();
        Self {
            proxy,
            addr,
            stop,
            task,
        }
    }
}

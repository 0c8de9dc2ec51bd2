//! The registry of connected agents (sessions) and the dial: which agent a dial goes to,
//! the pending-dial table, and the counters behind [`ServerStats`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;

use super::config::{ServerConfig, Strategy};
use crate::conn::{Backlog, ConnEnd, ConnTable, Delivery, Flow};
use crate::link::Link;
use crate::proto::{self, Frame, Identifiers};

/// A dial through the tunnel failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// No connected, non-draining agent matches the strategies: fails at once.
    #[error(
        "no agent available for {address} (strategies {strategies:?}; {agents} connected, {draining} draining)"
    )]
    NoAgent {
        /// The dialed address.
        address: String,
        /// The strategies that were tried.
        strategies: Vec<Strategy>,
        /// Agents connected to this server.
        agents: usize,
        /// Of which draining.
        draining: usize,
    },
    /// The agent did not answer within the dial timeout.
    #[error("agent {agent} did not answer the dial to {address} within {after:?}")]
    Timeout {
        /// The dialed address.
        address: String,
        /// The agent.
        agent: String,
        /// The timeout.
        after: Duration,
    },
    /// The agent could not reach the address.
    #[error("agent {agent} could not dial {address}: {message}")]
    Refused {
        /// The dialed address.
        address: String,
        /// The agent.
        agent: String,
        /// The agent's error.
        message: String,
    },
    /// The agent's connection went away during the dial.
    #[error("agent {agent} went away while dialing {address}")]
    AgentGone {
        /// The dialed address.
        address: String,
        /// The agent.
        agent: String,
    },
}

impl DialError {
    /// The HTTP status a CONNECT frontend answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            DialError::NoAgent { .. } => 503,
            DialError::Timeout { .. } => 504,
            DialError::Refused { .. } | DialError::AgentGone { .. } => 502,
        }
    }
}

/// A connected agent, as [`Server::agents`] reports it.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    /// The agent's id.
    pub id: String,
    /// Its identifiers.
    pub identifiers: Identifiers,
    /// Whether it sent DRAIN.
    pub draining: bool,
    /// Connections open through it.
    pub connections: usize,
    /// Whether it negotiated flow control.
    pub flow_control: bool,
}

/// Counters for tests, metrics and leak checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Agent connections registered.
    pub agents: usize,
    /// Of which draining.
    pub draining: usize,
    /// Tunneled connections open.
    pub connections: usize,
    /// Dials waiting for an agent's answer.
    pub pending_dials: usize,
    /// Dials that succeeded since start.
    pub dials_ok: u64,
    /// Dials that failed since start.
    pub dials_failed: u64,
    /// Handshakes refused on the agent listener and the mTLS frontend (wrong CA, no cert,
    /// wrong agent CN, timeout).
    pub refused_handshakes: u64,
    /// Bytes received from agents and not yet written to their frontend connections (with
    /// flow control, at most each connection's current window).
    pub buffered: usize,
}

pub(super) type DialReply = Result<ConnEnd, String>;

pub(super) struct Session {
    pub(super) serial: u64,
    pub(super) id: String,
    pub(super) identifiers: Identifiers,
    pub(super) link: Link,
    pub(super) flow: Flow,
    pub(super) draining: AtomicBool,
    pub(super) conns: Arc<ConnTable>,
    pub(super) dials: Mutex<HashMap<i64, oneshot::Sender<DialReply>>>,
    /// Cancelled when the session is unregistered: its reader stops and drops the request
    /// body, so the agent's stream ends on both sides (and a graceful shutdown finishes)
    /// even if the agent keeps its side open.
    pub(super) ended: tokio_util::sync::CancellationToken,
}

impl Session {
    pub(super) fn dials(&self) -> MutexGuard<'_, HashMap<i64, oneshot::Sender<DialReply>>> {
        self.dials.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(super) struct Shared {
    pub(super) config: ServerConfig,
    pub(super) sessions: Mutex<Vec<Arc<Session>>>,
    pub(super) next: AtomicUsize,
    pub(super) serial: AtomicU64,
    pub(super) open: Arc<AtomicUsize>,
    pub(super) dials_ok: AtomicU64,
    pub(super) dials_failed: AtomicU64,
    pub(super) refused: AtomicU64,
}

impl Shared {
    pub(super) fn sessions(&self) -> MutexGuard<'_, Vec<Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn pick(&self, host: &str) -> Option<Arc<Session>> {
        let sessions = self.sessions();
        for s in &self.config.strategies {
            let ready: Vec<&Arc<Session>> = sessions
                .iter()
                .filter(|x| !x.draining.load(Ordering::Acquire) && s.admits(&x.identifiers, host))
                .collect();
            if !ready.is_empty() {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % ready.len();
                return Some(ready[i].clone());
            }
        }
        None
    }

    pub(super) async fn dial(&self, address: &str) -> Result<ConnEnd, DialError> {
        let result = self.dial_inner(address).await;
        match &result {
            Ok(_) => self.dials_ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.dials_failed.fetch_add(1, Ordering::Relaxed),
        };
        result
    }

    pub(super) async fn dial_inner(&self, address: &str) -> Result<ConnEnd, DialError> {
        let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
        let Some(session) = self.pick(host) else {
            let sessions = self.sessions();
            return Err(DialError::NoAgent {
                address: address.into(),
                strategies: self.config.strategies.clone(),
                agents: sessions.len(),
                draining: sessions
                    .iter()
                    .filter(|s| s.draining.load(Ordering::Acquire))
                    .count(),
            });
        };
        let random = proto::random_i64();
        let (tx, rx) = oneshot::channel();
        session.dials().insert(random, tx);
        let gone = || DialError::AgentGone {
            address: address.into(),
            agent: session.id.clone(),
        };
        if !session.link.control(Frame::DialRequest {
            protocol: "tcp".into(),
            address: address.into(),
            random,
        }) {
            session.dials().remove(&random);
            return Err(gone());
        }
        match tokio::time::timeout(self.config.dial_timeout, rx).await {
            Ok(Ok(Ok(end))) => Ok(end),
            Ok(Ok(Err(message))) => Err(DialError::Refused {
                address: address.into(),
                agent: session.id.clone(),
                message,
            }),
            Ok(Err(_)) => Err(gone()),
            Err(_) => {
                session.dials().remove(&random);
                session.link.control(Frame::CloseDial { random });
                Err(DialError::Timeout {
                    address: address.into(),
                    agent: session.id.clone(),
                    after: self.config.dial_timeout,
                })
            }
        }
    }

    pub(super) fn register(&self, session: Arc<Session>) {
        self.sessions().push(session);
    }

    pub(super) fn unregister(&self, session: &Session) {
        self.sessions().retain(|s| s.serial != session.serial);
        session.dials().clear();
        session.conns.close_all();
        session.link.end();
        session.ended.cancel();
    }

    /// Handles one packet from an agent; a backlog when the reader should wait for a
    /// connection to drain before reading on (an agent without flow control).
    pub(super) fn on_agent_frame(&self, session: &Session, frame: Frame) -> Option<Backlog> {
        match frame {
            Frame::DialResponse {
                random,
                connect_id,
                error,
            } => {
                let waiter = session.dials().remove(&random);
                match waiter {
                    Some(tx) if error.is_empty() => {
                        let end =
                            session
                                .conns
                                .open(connect_id, session.link.clone(), session.flow);
                        if let Err(Ok(end)) = tx.send(Ok(end)) {
                            // The dialer gave up in the meantime: close what the agent opened.
                            drop(end);
                            session.link.control(Frame::CloseRequest { connect_id });
                        }
                    }
                    Some(tx) => {
                        let _ = tx.send(Err(error));
                    }
                    None if error.is_empty() => {
                        session.link.control(Frame::CloseRequest { connect_id });
                    }
                    None => {}
                }
            }
            Frame::Data {
                connect_id, data, ..
            } => {
                let delivered = session.conns.with(connect_id, |s| s.deliver(data));
                match delivered {
                    Some(Delivery::Queued) => {}
                    Some(Delivery::Backlogged(backlog)) => return Some(backlog),
                    Some(Delivery::Overrun) => {
                        tracing::warn!(agent = %session.id, connect_id, "connection overran its receive window; closing it");
                        session.conns.remove(connect_id);
                        session.link.control(Frame::CloseRequest { connect_id });
                    }
                    None => {
                        session.link.control(Frame::CloseRequest { connect_id });
                    }
                }
            }
            Frame::CloseResponse { connect_id, .. } => {
                session.conns.with(connect_id, |s| s.close());
            }
            Frame::Window { connect_id, bytes } => {
                session.conns.with(connect_id, |s| s.grant(bytes));
            }
            Frame::Drain => {
                tracing::info!(agent = %session.id, "agent is draining; no new dials go to it");
                session.draining.store(true, Ordering::Release);
            }
            Frame::CloseDial { random } => {
                if let Some(tx) = session.dials().remove(&random) {
                    let _ = tx.send(Err("the agent abandoned the dial".into()));
                }
            }
            other => {
                tracing::debug!(agent = %session.id, ?other, "unexpected packet from an agent; ignored");
            }
        }
        None
    }
}

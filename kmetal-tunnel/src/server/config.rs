//! The server's settings and the proxy strategies that pick an agent for a dial.

use std::time::Duration;

use crate::proto::{self, Identifiers};

/// How a dial picks an agent (Konnectivity's `--proxy-strategies`, tried in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Strategy {
    /// Any ready agent.
    Default,
    /// An agent whose identifiers (host, ipv4, ipv6, cidr) claim the dialed host.
    DestHost,
    /// An agent that identifies as a default route.
    DefaultRoute,
}

/// A bad `--proxy-strategies` value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StrategyError {
    /// A name other than default, destHost, defaultRoute.
    #[error("unknown proxy strategy {0:?} (expected default, destHost or defaultRoute)")]
    Unknown(String),
    /// No strategy at all.
    #[error("no proxy strategy given")]
    Empty,
}

impl Strategy {
    /// Parses a comma-separated list (`destHost,default`).
    pub fn parse_list(s: &str) -> Result<Vec<Strategy>, StrategyError> {
        let list = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| match p {
                "default" => Ok(Strategy::Default),
                "destHost" => Ok(Strategy::DestHost),
                "defaultRoute" => Ok(Strategy::DefaultRoute),
                other => Err(StrategyError::Unknown(other.into())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if list.is_empty() {
            return Err(StrategyError::Empty);
        }
        Ok(list)
    }

    pub(super) fn admits(self, ids: &Identifiers, host: &str) -> bool {
        match self {
            Strategy::Default => true,
            Strategy::DestHost => ids.matches_host(host),
            Strategy::DefaultRoute => ids.default_route,
        }
    }
}

/// The server's settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// This replica's id, sent to agents.
    pub server_id: String,
    /// How many replicas serve the tenant; agents connect until they reach each.
    pub server_count: u32,
    /// Agent selection, tried in order.
    pub strategies: Vec<Strategy>,
    /// How long a dial waits for the agent's answer.
    pub dial_timeout: Duration,
    /// HTTP/2 ping interval on agent connections.
    pub keepalive_interval: Duration,
    /// How long an unanswered ping may take before the agent is dropped.
    pub keepalive_timeout: Duration,
    /// Deadline for a TLS handshake or a CONNECT request head.
    pub handshake_timeout: Duration,
    /// The largest receive window per connection with agents that do flow control: the
    /// bytes one stream keeps in flight at full speed (default
    /// [`crate::proto::DEFAULT_FLOW_WINDOW`]). Windows start at
    /// [`crate::proto::INITIAL_FLOW_WINDOW`] and grow only while the connection's consumer
    /// keeps up, so a stalled connection buffers the starting window, not this.
    pub flow_window: u32,
    /// The CN an agent's client certificate must carry (`None`: any cert from the CA).
    pub agent_common_name: Option<String>,
}

impl ServerConfig {
    /// Defaults for replica `server_id` of `server_count`.
    pub fn new(server_id: impl Into<String>, server_count: u32) -> Self {
        ServerConfig {
            server_id: server_id.into(),
            server_count: server_count.max(1),
            strategies: vec![Strategy::Default],
            dial_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            flow_window: proto::DEFAULT_FLOW_WINDOW,
            agent_common_name: Some("system:konnectivity-agent".into()),
        }
    }
}

//! Network syntax used by the resources: CIDRs, `host:port` endpoints and DNS names.
//!
//! Kubernetes takes these as strings; we parse them once here so validation can say exactly
//! what is wrong, and so defaults (the first service IP, the DNS service IP) are computed, not
//! guessed.

use std::fmt;
use std::net::{AddrParseError, IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why a CIDR string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CidrError {
    /// No `/prefix` part.
    #[error("missing '/prefix' (e.g. 10.96.0.0/16)")]
    MissingPrefix,
    /// The address part is not an IP address.
    #[error("address part is not an IP address")]
    InvalidAddress(#[source] AddrParseError),
    /// The prefix is not a number in range for the address family.
    #[error("prefix length must be 0..={max}")]
    InvalidPrefix {
        /// Largest prefix for the family (32 or 128).
        max: u8,
    },
    /// Bits below the prefix are set, so the string names a host, not a network.
    #[error("host bits are set; the network is {network}")]
    HostBitsSet {
        /// The network the string probably meant.
        network: String,
    },
}

/// An IPv4 or IPv6 network in CIDR notation, with no host bits set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

fn to_bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
        IpAddr::V6(v6) => (u128::from(v6), 128),
    }
}

fn from_bits(bits: u128, v4: bool) -> IpAddr {
    if v4 {
        // Callers only pass values that fit in 32 bits for IPv4 networks.
        IpAddr::V4(Ipv4Addr::from(u32::try_from(bits).unwrap_or(u32::MAX)))
    } else {
        IpAddr::V6(Ipv6Addr::from(bits))
    }
}

fn mask(prefix: u8, width: u8) -> u128 {
    let all: u128 = if width == 32 {
        u128::from(u32::MAX)
    } else {
        u128::MAX
    };
    // A full-width prefix shifts by the type's width, which would overflow.
    all & !all.checked_shr(u32::from(prefix)).unwrap_or(0)
}

impl Cidr {
    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether this is an IPv4 network.
    pub fn is_ipv4(&self) -> bool {
        self.network.is_ipv4()
    }

    fn width(&self) -> u8 {
        if self.is_ipv4() { 32 } else { 128 }
    }

    /// Number of addresses in the network, saturating at `u128::MAX`.
    pub fn size(&self) -> u128 {
        let host_bits = u32::from(self.width() - self.prefix);
        1u128.checked_shl(host_bits).unwrap_or(u128::MAX)
    }

    /// The `n`-th address of the network (0 is the network address), if it lies inside.
    ///
    /// ```
    /// use kmetal_core::net::Cidr;
    /// let cidr: Cidr = "10.96.0.0/16".parse().unwrap();
    /// assert_eq!(cidr.nth(10).unwrap().to_string(), "10.96.0.10");
    /// assert!(cidr.nth(70_000).is_none());
    /// ```
    pub fn nth(&self, n: u128) -> Option<IpAddr> {
        if n >= self.size() {
            return None;
        }
        let (base, _) = to_bits(self.network);
        Some(from_bits(base + n, self.is_ipv4()))
    }

    /// Whether `ip` lies inside the network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        if ip.is_ipv4() != self.is_ipv4() {
            return false;
        }
        let (bits, width) = to_bits(ip);
        bits & mask(self.prefix, width) == to_bits(self.network).0
    }

    /// Whether the two networks share any address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s.split_once('/').ok_or(CidrError::MissingPrefix)?;
        let ip: IpAddr = addr.parse().map_err(CidrError::InvalidAddress)?;
        let (bits, width) = to_bits(ip);
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= width)
            .ok_or(CidrError::InvalidPrefix { max: width })?;
        let masked = bits & mask(prefix, width);
        let network = from_bits(masked, ip.is_ipv4());
        if masked != bits {
            return Err(CidrError::HostBitsSet {
                network: format!("{network}/{prefix}"),
            });
        }
        Ok(Cidr { network, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Why a `host:port` endpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HostPortError {
    /// No `:port` part.
    #[error("missing ':port' (expected host:port)")]
    MissingPort,
    /// The port is not a number in 1..=65535.
    #[error("port must be 1..=65535")]
    InvalidPort,
    /// The host is neither an IP address nor a DNS name.
    #[error("host must be an IP address or a DNS name")]
    InvalidHost,
}

/// A network endpoint: an IP address or DNS name and a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// IP address or DNS name (IPv6 without brackets).
    pub host: String,
    /// TCP port, 1..=65535.
    pub port: u16,
}

impl FromStr for HostPort {
    type Err = HostPortError;

    /// Parses `host:port` or `[ipv6]:port`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest.split_once(']').ok_or(HostPortError::InvalidHost)?;
            h.parse::<Ipv6Addr>()
                .map_err(|_| HostPortError::InvalidHost)?;
            (h, p.strip_prefix(':').ok_or(HostPortError::MissingPort)?)
        } else {
            let (h, p) = s.rsplit_once(':').ok_or(HostPortError::MissingPort)?;
            // A bare IPv6 address has several colons and must be bracketed.
            if h.contains(':') {
                return Err(HostPortError::InvalidHost);
            }
            if h.parse::<Ipv4Addr>().is_err() && !is_dns_name(h) {
                return Err(HostPortError::InvalidHost);
            }
            (h, p)
        };
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or(HostPortError::InvalidPort)?;
        Ok(HostPort {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Whether `s` is an RFC 1123 label: 1–63 lowercase alphanumerics or '-', alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `s` is an RFC 1123 subdomain (dot-separated labels, at most 253 characters).
pub fn is_dns_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Whether `s` is a DNS name, optionally with a leading `*.` wildcard (as certificate SANs allow).
pub fn is_san_name(s: &str) -> bool {
    is_dns_name(s.strip_prefix("*.").unwrap_or(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parses_and_masks() {
        let c: Cidr = "10.96.0.0/16".parse().unwrap();
        assert_eq!(c.nth(1).unwrap().to_string(), "10.96.0.1");
        assert!(c.contains("10.96.255.255".parse().unwrap()));
        assert!(!c.contains("10.97.0.0".parse().unwrap()));
        assert_eq!(
            "10.96.0.1/16".parse::<Cidr>(),
            Err(CidrError::HostBitsSet {
                network: "10.96.0.0/16".into()
            })
        );
        assert!(matches!(
            "10.96.0.0".parse::<Cidr>(),
            Err(CidrError::MissingPrefix)
        ));
        assert!(matches!(
            "10.96.0.0/33".parse::<Cidr>(),
            Err(CidrError::InvalidPrefix { max: 32 })
        ));
        let v6: Cidr = "fd00:10:96::/112".parse().unwrap();
        assert_eq!(v6.nth(10).unwrap().to_string(), "fd00:10:96::a");
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert_eq!(all.size(), 1 << 32);
        let host6: Cidr = "fd00::1/128".parse().unwrap();
        assert!(host6.contains("fd00::1".parse().unwrap()));
        assert_eq!(host6.size(), 1);
        let host4: Cidr = "192.0.2.7/32".parse().unwrap();
        assert_eq!(host4.nth(0).unwrap().to_string(), "192.0.2.7");
        assert!(
            "::/0"
                .parse::<Cidr>()
                .unwrap()
                .contains("::1".parse().unwrap())
        );
        let p: Cidr = "10.244.0.0/16".parse().unwrap();
        assert!(!c.overlaps(&p));
        assert!(c.overlaps(&"10.0.0.0/8".parse().unwrap()));
    }

    #[test]
    fn host_port_forms() {
        assert_eq!("etcd-0.etcd:2379".parse::<HostPort>().unwrap().port, 2379);
        assert_eq!("[::1]:5432".parse::<HostPort>().unwrap().host, "::1");
        assert_eq!("etcd".parse::<HostPort>(), Err(HostPortError::MissingPort));
        assert_eq!(
            "etcd:0".parse::<HostPort>(),
            Err(HostPortError::InvalidPort)
        );
        assert_eq!(
            "::1:5432".parse::<HostPort>(),
            Err(HostPortError::InvalidHost)
        );
        assert_eq!(
            "Bad_Host:1".parse::<HostPort>(),
            Err(HostPortError::InvalidHost)
        );
    }

    #[test]
    fn dns_names() {
        assert!(is_dns_name("cluster.local"));
        assert!(!is_dns_name("Cluster.local"));
        assert!(!is_dns_name("a..b"));
        assert!(is_san_name("*.example.com"));
        assert!(!is_dns_label(&"a".repeat(64)));
    }
}

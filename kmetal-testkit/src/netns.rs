//! A worker host for multi-host tests: a network namespace joined to the host by a veth pair
//! on a /30 of 10.231.0.0/16, plus addresses only the namespace has (on its loopback, with an
//! `unreachable` route on the host so the host's packets to them fail at once instead of
//! leaving by the default route). Everything is removed on drop. Needs root and `ip`
//! (Debian `iproute2`).
//!
//! ```no_run
//! # fn demo() -> Result<(), kmetal_testkit::netns::NetnsError> {
//! use kmetal_testkit::netns::Netns;
//! let mut worker = Netns::create()?;
//! let private = worker.add_private_address()?;
//! let status = worker.command("ip").args(["addr", "show", "lo"]).status();
//! # let _ = (private, status); Ok(()) }
//! ```

use std::collections::HashSet;
use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// Setting up a namespace failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetnsError {
    /// `ip` could not be run.
    #[error("cannot run `ip` (install the Debian package iproute2)")]
    Spawn(#[source] std::io::Error),
    /// An `ip` command failed (not root, or the kernel refused).
    #[error("`ip {args}` failed: {stderr}")]
    Command {
        /// Its arguments.
        args: String,
        /// What it printed.
        stderr: String,
    },
    /// Every /30 of 10.231.0.0/16 is taken.
    #[error("no free /30 left in 10.231.0.0/16")]
    NoSubnet,
}

/// Third octets handed out in this process (other processes are seen through `ip addr`).
static TAKEN: Mutex<Option<HashSet<u8>>> = Mutex::new(None);

fn ip(args: &[&str]) -> Result<String, NetnsError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(NetnsError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetnsError::Command {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// A network namespace with a veth pair to the host, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    octet: u8,
    host_if: String,
    private: Vec<Ipv4Addr>,
}

impl Netns {
    /// Creates the namespace, the veth pair (host side `10.231.N.1/30`, namespace side
    /// `10.231.N.2/30`) and brings up the namespace's loopback.
    pub fn create() -> Result<Netns, NetnsError> {
        let octet = Self::take_octet()?;
        let name = format!("kmetal-{}-{octet}", std::process::id());
        let host_if = format!("kmh{octet}-{}", std::process::id() % 10_000);
        let ns_if = format!("kmn{octet}-{}", std::process::id() % 10_000);
        // A leftover from a killed run of this very process id is ours to replace.
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = Netns {
            name,
            octet,
            host_if,
            private: Vec::new(),
        };
        let host_cidr = format!("{}/30", ns.host_ip());
        let ns_cidr = format!("{}/30", ns.ns_ip());
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &ns.name])?;
        ip(&["addr", "add", &host_cidr, "dev", &ns.host_if])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ns.ip_in(&["addr", "add", &ns_cidr, "dev", &ns_if])?;
        ns.ip_in(&["link", "set", &ns_if, "up"])?;
        ns.ip_in(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn take_octet() -> Result<u8, NetnsError> {
        let used = ip(&["-4", "-o", "addr", "show"])?;
        let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
        let taken = taken.get_or_insert_with(HashSet::new);
        let start = (std::process::id() % 200) as u8;
        for i in 0..250u16 {
            let octet = ((u16::from(start) + i) % 250 + 2) as u8;
            let in_use = used.contains(&format!("10.231.{octet}."))
                || used.contains(&format!("10.232.{octet}."));
            if !in_use && taken.insert(octet) {
                return Ok(octet);
            }
        }
        Err(NetnsError::NoSubnet)
    }

    fn ip_in(&self, args: &[&str]) -> Result<String, NetnsError> {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's end of the veth pair: what processes in the namespace dial to reach the
    /// host.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.octet, 1)
    }

    /// The namespace's end of the veth pair (the host reaches it directly).
    pub fn ns_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.octet, 2)
    }

    /// Adds an address only the namespace has (`10.232.N.k/32` on its loopback) and makes
    /// the host's route to it `unreachable`; returns it.
    pub fn add_private_address(&mut self) -> Result<Ipv4Addr, NetnsError> {
        let k = u8::try_from(self.private.len() + 1).map_err(|_| NetnsError::NoSubnet)?;
        let addr = Ipv4Addr::new(10, 232, self.octet, k);
        self.ip_in(&["addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
        ip(&["route", "add", "unreachable", &format!("{addr}/32")])?;
        self.private.push(addr);
        Ok(addr)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for addr in &self.private {
            let _ = ip(&["route", "del", "unreachable", &format!("{addr}/32")]);
        }
        // Deleting the namespace destroys its veth end, and with it the host's.
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
        let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = taken.as_mut() {
            t.remove(&self.octet);
        }
    }
}

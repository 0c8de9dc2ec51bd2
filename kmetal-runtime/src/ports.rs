//! Free loopback ports for the processes a runtime starts.
//!
//! Ports come from below the kernel's ephemeral range (`ip_local_port_range`): a port the
//! OS picked for a throwaway listener is an ephemeral one, and between our check and the
//! server's own bind any outgoing connection on the machine may take it as its local port
//! (an etcd member failed with "address already in use" in CI; a replica's port is also
//! recorded and reused for its restarts, so a taken one would fail every restart). Below that range only
//! another listener can hold a port, which the bind check sees. A process-wide set makes
//! sure two servers of one process never get the same number.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
static NEXT: AtomicU32 = AtomicU32::new(0);

/// The lowest port we hand out (above the well-known and common service ports).
const LOWEST: u32 = 20_000;

/// A loopback port that was free a moment ago and that this process has not handed out before.
pub fn free_port() -> std::io::Result<u16> {
    let Some(end) = ephemeral_start().filter(|&e| e > LOWEST + 1_000) else {
        return os_port();
    };
    let span = end - LOWEST;
    // Processes start at different offsets, so concurrent test binaries rarely probe the
    // same ports.
    let seed = std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOWEST + seed.wrapping_add(n.wrapping_mul(7_919)) % span) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() && claim(port) {
            return Ok(port);
        }
    }
    os_port()
}

/// The first port of the kernel's ephemeral range, if this is Linux and it says.
fn ephemeral_start() -> Option<u32> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

/// A port the OS picks (an ephemeral one), when no range below the ephemeral one is known.
fn os_port() -> std::io::Result<u16> {
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = listener.local_addr()?.port();
        drop(listener);
        if claim(port) {
            return Ok(port);
        }
    }
}

/// Records `port` as handed out; false if this process handed it out before.
fn claim(port: u16) -> bool {
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    guard.get_or_insert_with(HashSet::new).insert(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..200).map(|_| free_port().expect("a port")).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
        if let Some(end) = ephemeral_start().filter(|&e| e > LOWEST + 1_000) {
            assert!(
                ports
                    .iter()
                    .all(|&p| u32::from(p) >= LOWEST && u32::from(p) < end)
            );
        }
        for p in ports.iter().take(20) {
            TcpListener::bind((Ipv4Addr::LOCALHOST, *p)).expect("still free");
        }
    }
}

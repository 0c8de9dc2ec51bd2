//! [`StartGate`]: how many tenants may boot at once. A kube-apiserver's first seconds are
//! the most CPU it ever takes (about 1.6 CPU-seconds for a tenant's three components); thirty
//! tenants applied together on a two-core machine all boot slower than one after the other
//! would, and the first answers only minutes later. The gate lets a few boot and queues the
//! rest in arrival order, each told when its turn comes.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use crate::runtime::TenantId;

/// A place in the queue: how many tenants wait ahead and how many boot now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    /// Tenants ahead in the queue.
    pub ahead: usize,
    /// Tenants booting now.
    pub booting: usize,
    /// How many may boot at once.
    pub limit: usize,
}

impl std::fmt::Display for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "queued to start: {} tenant(s) ahead, {} of {} booting",
            self.ahead, self.booting, self.limit
        )
    }
}

#[derive(Debug, Default)]
struct State {
    booting: HashSet<TenantId>,
    /// Waiting tenants and when each last asked: one that stopped asking (its reconcile
    /// halted earlier, or it went away) must not hold up the ones behind it.
    queue: VecDeque<(TenantId, Instant)>,
}

/// Lets at most `limit` tenants boot at once; the others wait in arrival order.
#[derive(Debug, Clone)]
pub struct StartGate {
    limit: usize,
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<TenantId>,
}

/// A queued tenant that has not asked again for this long loses its place.
const FORGET_AFTER: Duration = Duration::from_secs(60);

impl StartGate {
    /// A gate for `limit` booting tenants (at least one) that tells `changes` when a queued
    /// tenant's turn has come.
    pub fn new(limit: usize, changes: broadcast::Sender<TenantId>) -> Self {
        Self {
            limit: limit.max(1),
            state: Arc::default(),
            changes,
        }
    }

    /// How many tenants may boot at once.
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a set and a queue, consistent after every statement: a panic in
        // another holder leaves nothing half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Lets `tenant` boot (the [`Ticket`] holds its place until dropped) or queues it.
    pub fn enter(&self, tenant: &TenantId) -> Result<Ticket, Queued> {
        let mut s = self.lock();
        let now = Instant::now();
        s.queue
            .retain(|(t, asked)| t == tenant || now - *asked < FORGET_AFTER);
        let free = self.limit.saturating_sub(s.booting.len());
        let position = s.queue.iter().position(|(t, _)| t == tenant);
        let ahead = position.unwrap_or(s.queue.len());
        if !s.booting.contains(tenant) && ahead < free {
            if let Some(i) = position {
                s.queue.remove(i);
            }
            s.booting.insert(tenant.clone());
            return Ok(Ticket {
                gate: self.clone(),
                tenant: tenant.clone(),
                since: now,
            });
        }
        match position {
            Some(i) => s.queue[i].1 = now,
            // Already booting (a second caller): it holds no place in the queue.
            None if s.booting.contains(tenant) => {}
            None => s.queue.push_back((tenant.clone(), now)),
        }
        Err(Queued {
            ahead,
            booting: s.booting.len(),
            limit: self.limit,
        })
    }

    /// Takes `tenant` out of the queue (it was removed).
    pub fn forget(&self, tenant: &TenantId) {
        self.lock().queue.retain(|(t, _)| t != tenant);
    }

    /// Tenants booting now.
    pub fn booting(&self) -> usize {
        self.lock().booting.len()
    }

    /// Tenants waiting.
    pub fn waiting(&self) -> usize {
        self.lock().queue.len()
    }

    fn leave(&self, tenant: &TenantId) {
        let next: Vec<TenantId> = {
            let mut s = self.lock();
            s.booting.remove(tenant);
            let free = self.limit.saturating_sub(s.booting.len());
            s.queue.iter().take(free).map(|(t, _)| t.clone()).collect()
        };
        for t in next {
            // Nobody listening is fine: the next reconcile finds the place free.
            let _ = self.changes.send(t);
        }
    }
}

/// A booting tenant's place at the gate, given back when dropped.
#[derive(Debug)]
pub struct Ticket {
    gate: StartGate,
    tenant: TenantId,
    since: Instant,
}

impl Ticket {
    /// How long the tenant has been booting.
    pub fn elapsed(&self) -> Duration {
        self.since.elapsed()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate.leave(&self.tenant);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str) -> TenantId {
        TenantId::new("ns", name)
    }

    #[test]
    fn admits_up_to_the_limit_then_queues_in_arrival_order() {
        let (tx, mut rx) = broadcast::channel(16);
        let gate = StartGate::new(2, tx);
        let a = gate.enter(&t("a")).unwrap();
        let _b = gate.enter(&t("b")).unwrap();
        let q = gate.enter(&t("c")).unwrap_err();
        assert_eq!(
            q,
            Queued {
                ahead: 0,
                booting: 2,
                limit: 2
            }
        );
        assert_eq!(gate.enter(&t("d")).unwrap_err().ahead, 1);
        // c asks again: still first.
        assert_eq!(gate.enter(&t("c")).unwrap_err().ahead, 0);
        // d may not jump the queue when a place frees.
        drop(a);
        assert_eq!(rx.try_recv().unwrap(), t("c"));
        assert!(rx.try_recv().is_err());
        assert_eq!(gate.enter(&t("d")).unwrap_err().ahead, 1);
        let _c = gate.enter(&t("c")).unwrap();
        assert_eq!(gate.enter(&t("d")).unwrap_err().ahead, 0);
        assert_eq!((gate.booting(), gate.waiting()), (2, 1));
    }

    #[test]
    fn a_removed_tenant_gives_up_its_place() {
        let (tx, _rx) = broadcast::channel(16);
        let gate = StartGate::new(1, tx);
        let a = gate.enter(&t("a")).unwrap();
        gate.enter(&t("b")).unwrap_err();
        assert_eq!(gate.enter(&t("c")).unwrap_err().ahead, 1);
        gate.forget(&t("b"));
        drop(a);
        assert!(gate.enter(&t("c")).is_ok());
    }

    #[test]
    fn a_zero_limit_still_lets_one_boot() {
        let (tx, _rx) = broadcast::channel(16);
        let gate = StartGate::new(0, tx);
        assert_eq!(gate.limit(), 1);
        assert!(gate.enter(&t("a")).is_ok());
    }
}

//! Whether this supervisor runs the active work: health checks, drains, heartbeat expiry and the autoscaler. One
//! supervisor alone always does; several on etcd elect one ([`crate::etcd::election`]), and the others serve the API,
//! the tables and EDS from the shared registry.
//!
//! Leadership is held until a time: the lease's last renewal plus its TTL, less a margin. Past that time this node
//! stops acting at once, even if it has not heard that it lost (a paused process, a partition): by then etcd may have
//! let another node win. Every leader-only write also carries the [`Fence`], so a store refuses it from a node that
//! lost, whatever that node believes.

use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::watch;

/// The proof of leadership a shared store checks on each fenced write: the leader key, as this node created it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The etcd key of the leader.
    pub key: String,
    /// Its create revision when this node won: a later leader's key has another.
    pub create_revision: i64,
}

#[derive(Debug, Default)]
struct Held {
    fence: Option<Fence>,
    until: Option<Instant>,
}

pub struct Leadership {
    /// One supervisor: always the leader.
    alone: bool,
    held: Mutex<Held>,
    changes: watch::Sender<bool>,
    /// The API URL of the node that leads, as last seen in etcd (followers forward reports there).
    leader_url: Mutex<Option<String>>,
}

impl Leadership {
    /// The only supervisor: leads from the start, for ever.
    pub fn alone() -> Leadership {
        Leadership {
            alone: true,
            held: Mutex::default(),
            changes: watch::channel(true).0,
            leader_url: Mutex::default(),
        }
    }

    /// One of several: a follower until [`Leadership::won`].
    pub fn elected() -> Leadership {
        Leadership {
            alone: false,
            held: Mutex::default(),
            changes: watch::channel(false).0,
            leader_url: Mutex::default(),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_leader(&self) -> bool {
        self.is_leader_at(Instant::now())
    }

    /// Whether this node leads at `now`.
    pub fn is_leader_at(&self, now: Instant) -> bool {
        self.alone || self.held().until.is_some_and(|until| now < until)
    }

    /// The fence of fenced writes while this node leads (`None` alone: nothing to fence against).
    pub fn fence(&self) -> Option<Fence> {
        let held = self.held();
        if self.alone || held.until.is_none_or(|until| Instant::now() >= until) {
            return None;
        }
        held.fence.clone()
    }

    /// This node won the election; it leads until `until` unless renewed.
    pub fn won(&self, fence: Fence, until: Instant) {
        *self.held() = Held { fence: Some(fence), until: Some(until) };
        self.changes.send_replace(true);
    }

    /// The lease was renewed: leadership (if held) lasts until `until`.
    pub fn renewed(&self, until: Instant) {
        let mut held = self.held();
        if held.fence.is_some() {
            held.until = Some(until);
        }
    }

    /// Leadership is gone (the lease expired or could not be renewed, or the node resigned).
    pub fn lost(&self) {
        if self.alone {
            return;
        }
        *self.held() = Held::default();
        self.changes.send_replace(false);
    }

    /// Told when this node wins or loses (the value: leads). Expiry by time is not announced: check
    /// [`Leadership::is_leader`] before acting.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.changes.subscribe()
    }

    /// Where the leader's API is (`None` alone, or while no leader is known).
    pub fn leader_url(&self) -> Option<String> {
        self.leader_url.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_leader_url(&self, url: Option<String>) {
        *self.leader_url.lock().unwrap_or_else(|p| p.into_inner()) = url;
    }

    /// Whether this node is one of several.
    pub fn is_elected(&self) -> bool {
        !self.alone
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn alone_always_leads_without_a_fence() {
        let l = Leadership::alone();
        assert!(l.is_leader());
        l.lost();
        assert!(l.is_leader());
        assert_eq!(l.fence(), None);
    }

    #[test]
    fn an_elected_node_leads_until_its_time_unless_renewed() {
        let l = Leadership::elected();
        let t0 = Instant::now();
        assert!(!l.is_leader_at(t0));
        let fence = Fence { key: "/eq/leader".into(), create_revision: 7 };
        l.won(fence.clone(), t0 + Duration::from_secs(4));
        assert!(l.is_leader_at(t0 + Duration::from_secs(3)));
        assert!(!l.is_leader_at(t0 + Duration::from_secs(4)), "past its time it stops, without being told");
        l.renewed(t0 + Duration::from_secs(8));
        assert!(l.is_leader_at(t0 + Duration::from_secs(7)));
        assert_eq!(l.fence(), Some(fence));
        l.lost();
        assert!(!l.is_leader_at(t0));
        assert_eq!(l.fence(), None);
        l.renewed(t0 + Duration::from_secs(60));
        assert!(!l.is_leader_at(t0), "a renewal after the loss does not bring it back");
    }
}

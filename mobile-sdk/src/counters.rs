//! Live-resource counters: instances, sessions, tasks, sockets, connections.
//!
//! Each resource holds a [`Guard`] that counts it up on creation and down on drop, so the
//! numbers cannot drift from the truth through a forgotten decrement, and a leak shows up as a
//! count that never returns to zero. Tests and diagnostics read them; tests can also wait for a
//! condition on them instead of sleeping.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// Client objects alive (whatever their state).
    Instance,
    /// Session state machines alive (one per running driver).
    Session,
    /// Tasks spawned by the SDK and not finished.
    Task,
    /// TCP sockets open.
    Socket,
    /// Sessions the server has accepted (after `ServerHello`, until the connection ends).
    Connected,
}

/// A snapshot of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Client objects alive.
    pub instances: usize,
    /// Session state machines alive.
    pub sessions: usize,
    /// Tasks not finished.
    pub tasks: usize,
    /// TCP sockets open.
    pub sockets: usize,
    /// Server-accepted sessions.
    pub connected: usize,
}

impl Snapshot {
    /// Nothing but (possibly) idle client objects: no session, task, socket or connection.
    pub fn is_quiet(&self) -> bool {
        self.sessions == 0 && self.tasks == 0 && self.sockets == 0 && self.connected == 0
    }
}

/// Shared counters of one registry.
#[derive(Debug, Default)]
pub struct Counters {
    counts: [AtomicUsize; 5],
    changed: Notify,
}

impl Counters {
    /// Count one `what` until the guard drops.
    pub fn guard(self: &Arc<Self>, what: Resource) -> Guard {
        self.counts[what as usize].fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
        Guard {
            counters: self.clone(),
            what,
        }
    }

    /// Current values.
    pub fn snapshot(&self) -> Snapshot {
        let get = |r: Resource| self.counts[r as usize].load(Ordering::SeqCst);
        Snapshot {
            instances: get(Resource::Instance),
            sessions: get(Resource::Session),
            tasks: get(Resource::Task),
            sockets: get(Resource::Socket),
            connected: get(Resource::Connected),
        }
    }

    /// Wait until `pred` holds, at most `timeout`. Returns the last snapshot either way.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        pred: impl Fn(&Snapshot) -> bool,
    ) -> Result<Snapshot, Snapshot> {
        let wait = async {
            loop {
                // Registered before the check, so a change between check and wait is not lost.
                let changed = self.changed.notified();
                let snap = self.snapshot();
                if pred(&snap) {
                    return snap;
                }
                changed.await;
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| self.snapshot())
    }
}

/// Counts one resource while alive.
#[derive(Debug)]
pub struct Guard {
    counters: Arc<Counters>,
    what: Resource,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.counters.counts[self.what as usize].fetch_sub(1, Ordering::SeqCst);
        self.counters.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn guards_count_and_waiters_wake() {
        let c = Arc::new(Counters::default());
        let a = c.guard(Resource::Socket);
        let b = c.guard(Resource::Socket);
        let t = c.guard(Resource::Task);
        assert_eq!(c.snapshot().sockets, 2);
        assert!(!c.snapshot().is_quiet());
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move { c.wait_until(Duration::from_secs(5), Snapshot::is_quiet).await })
        };
        drop((a, b));
        drop(t);
        let snap = waiter.await.unwrap().expect("became quiet");
        assert!(snap.is_quiet());
        let timed_out = c.wait_until(Duration::from_millis(10), |s| s.sockets == 1).await;
        assert_eq!(timed_out, Err(Snapshot::default()));
    }
}

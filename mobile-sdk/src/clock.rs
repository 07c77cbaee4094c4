//! Where a registry's sessions read the time: tokio's clock.
//!
//! With the `test-clock` feature (the Linux lifecycle host's, never the app's), a [`Clock`] also
//! carries a forward *shift* the host moves, so hours of a phone's life pass in seconds while
//! sockets run at real speed. A move wakes every session; each one handles what fell due, then
//! *parks* (waits with no connection attempt or handshake in flight, no input queued, nothing
//! due) and says so, with its next deadline. [`Clock::settle`] waits for that, so the host can
//! step time from one deadline to the next: a reconnecting phone's backoff plays out attempt by
//! attempt, each against the real network.

use std::time::{Duration, Instant};

#[cfg(feature = "test-clock")]
pub use sim::Settled;

/// A registry's time source; clones share it (the host gives one to every process of a phone,
/// as the phone's clock outlives its extension).
#[derive(Clone, Default, Debug)]
pub struct Clock {
    #[cfg(feature = "test-clock")]
    sim: std::sync::Arc<sim::Sim>,
}

impl Clock {
    /// Now.
    pub fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std() + self.shift()
    }

    /// The phone's wall clock, Unix ms (running the same shift ahead as [`Clock::now`]).
    pub fn wall_ms(&self) -> i64 {
        let wall = std::time::SystemTime::now() + self.shift();
        wall.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }

    /// How far this clock runs ahead of tokio's (always zero without `test-clock`).
    pub fn shift(&self) -> Duration {
        #[cfg(feature = "test-clock")]
        return self.sim.shift();
        #[cfg(not(feature = "test-clock"))]
        Duration::ZERO
    }

    /// The tokio instant at which this clock shows `at` (now, if that has passed).
    pub(crate) fn tokio_instant(&self, at: Instant) -> tokio::time::Instant {
        let real = at.checked_sub(self.shift()).unwrap_or_else(Instant::now);
        tokio::time::Instant::from_std(real)
    }

    /// A session's view, registered until dropped.
    pub(crate) fn session(&self) -> SessionClock {
        SessionClock {
            clock: self.clone(),
            #[cfg(feature = "test-clock")]
            seen: self.sim.register(),
        }
    }
}

/// One session's handle on the clock: the time, jumps, and (with `test-clock`) its parking
/// reports.
pub(crate) struct SessionClock {
    clock: Clock,
    #[cfg(feature = "test-clock")]
    seen: sim::Registration,
}

impl SessionClock {
    pub(crate) fn now(&self) -> Instant {
        self.clock.now()
    }

    pub(crate) fn wall_ms(&self) -> i64 {
        self.clock.wall_ms()
    }

    pub(crate) fn tokio_instant(&self, at: Instant) -> tokio::time::Instant {
        self.clock.tokio_instant(at)
    }

    /// Resolves when the host moved the clock (or asked the sessions to settle) since the last
    /// call, with whether the time jumped; never without `test-clock`.
    pub(crate) async fn moved(&mut self) -> bool {
        #[cfg(feature = "test-clock")]
        return self.seen.moved().await;
        #[cfg(not(feature = "test-clock"))]
        std::future::pending().await
    }

    /// The session waits for its next input: `quiet` when nothing is in flight or due, with its
    /// next deadline and whether it is connected (a connected session is heard from across a
    /// jump, so the host need not stop at its silence deadline). A no-op without `test-clock`.
    #[cfg_attr(not(feature = "test-clock"), allow(unused_variables))]
    pub(crate) fn park(&self, quiet: bool, deadline: Option<Instant>, connected: bool) {
        #[cfg(feature = "test-clock")]
        self.seen.park(quiet, deadline, connected);
    }
}

#[cfg(feature = "test-clock")]
mod sim {
    use std::{
        collections::HashMap,
        sync::{
            Arc, Mutex,
            atomic::{AtomicU64, Ordering},
        },
        time::{Duration, Instant},
    };

    use tokio::sync::watch;

    use super::Clock;

    /// What the sessions reported after the host's last move.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Settled {
        /// The earliest deadline of a session that is not connected, if any.
        pub next_deadline: Option<Instant>,
        /// Sessions registered (running).
        pub sessions: usize,
        /// Of those, connected.
        pub connected: usize,
    }

    #[derive(Debug, Clone, Copy)]
    struct Park {
        /// The host's move it answers.
        round: u64,
        deadline: Option<Instant>,
        connected: bool,
    }

    #[derive(Debug, Default)]
    pub(super) struct Sim {
        /// (shift, round): every move or settle request starts a new round.
        moves: watch::Sender<(Duration, u64)>,
        /// Per registered session, its last park (None: busy).
        parks: Mutex<HashMap<u64, Option<Park>>>,
        parked: watch::Sender<u64>,
        next_id: AtomicU64,
    }

    impl Sim {
        pub(super) fn shift(&self) -> Duration {
            self.moves.borrow().0
        }

        pub(super) fn register(self: &Arc<Self>) -> Registration {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            self.parks.lock().expect("poisoned").insert(id, None);
            self.parked.send_modify(|v| *v += 1);
            let moves = self.moves.subscribe();
            let shift = moves.borrow().0;
            Registration {
                sim: self.clone(),
                id,
                moves,
                shift,
            }
        }
    }

    pub(super) struct Registration {
        sim: Arc<Sim>,
        id: u64,
        moves: watch::Receiver<(Duration, u64)>,
        /// The shift when last moved.
        shift: Duration,
    }

    impl Registration {
        pub(super) async fn moved(&mut self) -> bool {
            // The sender lives in `sim`, which this registration holds: `changed` cannot fail.
            let _ = self.moves.changed().await;
            let shift = self.moves.borrow_and_update().0;
            std::mem::replace(&mut self.shift, shift) != shift
        }

        pub(super) fn park(&self, quiet: bool, deadline: Option<Instant>, connected: bool) {
            let round = self.moves.borrow().1;
            let park = quiet.then_some(Park {
                round,
                deadline,
                connected,
            });
            self.sim.parks.lock().expect("poisoned").insert(self.id, park);
            self.sim.parked.send_modify(|v| *v += 1);
        }
    }

    impl Drop for Registration {
        fn drop(&mut self) {
            self.sim.parks.lock().expect("poisoned").remove(&self.id);
            self.sim.parked.send_modify(|v| *v += 1);
        }
    }

    impl Clock {
        /// Move the clock forward to `at` (nothing if it shows a later time already) and wait
        /// until every session handled what fell due and parked, at most `timeout`.
        pub async fn advance_to(&self, at: Instant, timeout: Duration) -> Result<Settled, String> {
            let ahead = at.saturating_duration_since(tokio::time::Instant::now().into_std());
            self.advance_shift_to(ahead, timeout).await
        }

        /// Like [`Clock::advance_to`], to a shift: the clock then runs `ahead` of tokio's.
        pub async fn advance_shift_to(&self, ahead: Duration, timeout: Duration) -> Result<Settled, String> {
            self.sim.moves.send_modify(|(shift, round)| {
                *shift = (*shift).max(ahead);
                *round += 1;
            });
            self.wait_parked(timeout).await
        }

        /// Wait until every session handled its queued inputs and parked, at most `timeout`,
        /// without moving the clock.
        pub async fn settle(&self, timeout: Duration) -> Result<Settled, String> {
            self.sim.moves.send_modify(|(_, round)| *round += 1);
            self.wait_parked(timeout).await
        }

        async fn wait_parked(&self, timeout: Duration) -> Result<Settled, String> {
            let round = self.sim.moves.borrow().1;
            let mut changes = self.sim.parked.subscribe();
            let settled = || -> Option<Settled> {
                let parks = self.sim.parks.lock().expect("poisoned");
                let mut s = Settled {
                    sessions: parks.len(),
                    ..Settled::default()
                };
                for park in parks.values() {
                    let p = park.filter(|p| p.round == round)?;
                    if p.connected {
                        s.connected += 1;
                    } else if let Some(d) = p.deadline {
                        s.next_deadline = Some(s.next_deadline.map_or(d, |n: Instant| n.min(d)));
                    }
                }
                Some(s)
            };
            let wait = async {
                loop {
                    if let Some(s) = settled() {
                        return s;
                    }
                    // The sender lives in `sim`: `changed` cannot fail.
                    let _ = changes.changed().await;
                }
            };
            tokio::time::timeout(timeout, wait).await.map_err(|_| {
                let parks = self.sim.parks.lock().expect("poisoned");
                format!("the SDK's sessions did not settle within {timeout:?}: {parks:?}")
            })
        }
    }
}

#[cfg(all(test, feature = "test-clock"))]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn the_shift_moves_forward_only_and_maps_back_to_tokio_time() {
        let clock = Clock::default();
        let start = clock.now();
        let settled = clock
            .advance_to(start + Duration::from_secs(600), T)
            .await
            .unwrap();
        assert_eq!(settled, Settled::default(), "no session: settled at once");
        assert!(clock.now() >= start + Duration::from_secs(600));
        let soon = clock.now() + Duration::from_secs(5);
        assert_eq!(
            clock.tokio_instant(soon),
            tokio::time::Instant::now() + Duration::from_secs(5)
        );
        clock.advance_to(start, T).await.unwrap();
        assert!(clock.now() >= start + Duration::from_secs(600), "never back");
    }

    #[tokio::test(start_paused = true)]
    async fn settle_waits_for_every_session_to_park_after_the_move() {
        let clock = Clock::default();
        let mut a = clock.session();
        let b = clock.session();
        let at = clock.now() + Duration::from_secs(30);
        b.park(true, None, true);
        // `a` parked before the move: stale, so the host waits for it.
        a.park(true, Some(at), false);
        let host = clock.clone();
        let waiting = tokio::spawn(async move { host.advance_to(at, T).await });
        tokio::task::yield_now().await;
        assert!(a.moved().await, "the time jumped");
        assert!(!waiting.is_finished(), "b has not answered the move");
        // Busy (a connection attempt in flight) does not count either.
        b.park(false, None, false);
        a.park(true, Some(at + Duration::from_secs(4)), false);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        b.park(true, Some(at + Duration::from_secs(9)), true);
        let settled = waiting.await.unwrap().unwrap();
        assert_eq!(
            settled,
            Settled {
                next_deadline: Some(at + Duration::from_secs(4)),
                sessions: 2,
                connected: 1,
            },
            "a connected session's deadline is no stop"
        );
        drop(b);
        let host = clock.clone();
        let waiting = tokio::spawn(async move { host.settle(T).await });
        assert!(!a.moved().await, "a settle request is no jump");
        a.park(true, None, false);
        assert_eq!(
            waiting.await.unwrap().unwrap().sessions,
            1,
            "dropped sessions leave"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_never_parks_fails_the_settle_with_its_state() {
        let clock = Clock::default();
        let _busy = clock.session();
        let err = clock.settle(T).await.unwrap_err();
        assert!(err.contains("did not settle"), "{err}");
    }
}

//! What the app has taken: acknowledgements and the persisted "last seen" sequence.
//!
//! A push is acknowledged only once the app took it (or the SDK decided it must never be shown:
//! a duplicate, a call past its ring deadline). `last_seen` is the highest sequence with
//! everything up to it settled; it goes into `Hello.last_seen_seq`, where the server treats all
//! of it as acknowledged (when the hello's epoch is the store's), so it must never run ahead of
//! a push the app has not taken yet.

use std::collections::VecDeque;

/// Pushes handed to the app and not yet settled, acks to send, and `last_seen`.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    last_seen: u64,
    /// Handed or dropped pushes above `last_seen`, in sequence order; `true` once settled.
    outstanding: VecDeque<(u64, bool)>,
    acks: Vec<u64>,
}

impl Ledger {
    /// Resume from the persisted `last_seen`.
    pub fn new(last_seen: u64) -> Self {
        Self {
            last_seen,
            ..Self::default()
        }
    }

    /// Highest sequence with everything at or below it settled.
    pub fn last_seen(&self) -> u64 {
        self.last_seen
    }

    /// A push went to the app; it waits for [`Ledger::taken`]. Sequences arrive in order.
    pub fn handed(&mut self, seq: u64) {
        self.outstanding.push_back((seq, false));
    }

    /// The app took `seq`. Returns false for a sequence that is not waiting for the app.
    pub fn taken(&mut self, seq: u64) -> bool {
        match self.outstanding.iter_mut().find(|(s, _)| *s == seq) {
            Some((_, settled @ false)) => {
                *settled = true;
                self.acks.push(seq);
                self.advance();
                true
            }
            _ => false,
        }
    }

    /// A push the app will never see (duplicate, stale call, unknown body): acknowledge it so
    /// the server stops replaying it. A replay of a push still waiting for the app is left
    /// alone: its ack comes when the app takes it.
    pub fn dropped(&mut self, seq: u64) {
        if let Some((_, settled)) = self.outstanding.iter().find(|(s, _)| *s == seq) {
            // Taken already, but its ack went down with a connection: send it again.
            if *settled {
                self.acks.push(seq);
            }
            return;
        }
        self.acks.push(seq);
        match self.outstanding.back() {
            None => self.last_seen = self.last_seen.max(seq),
            Some((back, _)) if seq > *back => self.outstanding.push_back((seq, true)),
            // Below a push the app has not taken: `last_seen` must wait for that one.
            Some(_) => {}
        }
    }

    /// Acks not yet sent (sent or lost with the connection; `last_seen` covers lost ones).
    pub fn take_acks(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.acks)
    }

    /// Pushes handed to the app and not taken yet.
    pub fn waiting_for_app(&self) -> usize {
        self.outstanding.iter().filter(|(_, settled)| !settled).count()
    }

    fn advance(&mut self) {
        while let Some(&(seq, true)) = self.outstanding.front() {
            self.last_seen = self.last_seen.max(seq);
            self.outstanding.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_seen_waits_for_the_app() {
        let mut l = Ledger::new(5);
        l.handed(6);
        l.handed(8);
        l.dropped(9);
        assert_eq!(l.last_seen(), 5);
        assert_eq!(l.take_acks(), [9], "a dropped push is acked at once");
        assert!(l.taken(8));
        assert_eq!(l.last_seen(), 5, "6 is still with the app");
        assert!(l.taken(6));
        assert_eq!(l.last_seen(), 9);
        assert_eq!(l.take_acks(), [8, 6]);
        assert_eq!(l.waiting_for_app(), 0);
    }

    #[test]
    fn unknown_or_repeated_take_is_refused() {
        let mut l = Ledger::new(0);
        l.handed(1);
        assert!(!l.taken(2));
        assert!(l.taken(1));
        assert!(!l.taken(1));
        assert_eq!(l.take_acks(), [1]);
    }

    #[test]
    fn a_replay_of_a_push_still_with_the_app_is_not_acked() {
        let mut l = Ledger::new(0);
        l.handed(3);
        l.dropped(3);
        assert!(l.take_acks().is_empty());
        assert_eq!(l.last_seen(), 0);
        l.dropped(2);
        assert_eq!(l.take_acks(), [2]);
        assert_eq!(l.last_seen(), 0, "never ahead of a push the app has not taken");
    }

    #[test]
    fn a_replay_of_a_taken_but_unsettled_push_is_acked_again() {
        let mut l = Ledger::new(0);
        l.handed(1);
        l.handed(2);
        assert!(l.taken(2));
        // The ack of 2 was lost with the connection; 1 is still with the app.
        assert_eq!(l.take_acks(), [2]);
        l.dropped(2);
        assert_eq!(l.take_acks(), [2]);
        assert_eq!(l.last_seen(), 0);
    }
}

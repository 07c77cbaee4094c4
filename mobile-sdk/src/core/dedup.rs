//! De-duplication: the app never sees a push twice.
//!
//! Two rules from the protocol: a push whose sequence is not above the highest one handed to the
//! app is a replay, and a push whose id was handed recently is a re-send under a new sequence
//! (the server stores pushes per device; an idempotent re-send or a restored store can give the
//! same id a new number). The id set is bounded: a device running for months must not grow.

use std::collections::{HashSet, VecDeque};

/// Why a push was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplicate {
    /// Its sequence is at or below the highest handed to the app.
    Seq,
    /// Its id was handed to the app recently.
    Id,
}

/// The highest sequence handed to the app, plus the ids of the most recent pushes.
#[derive(Debug, Clone)]
pub struct Dedup {
    floor: u64,
    capacity: usize,
    order: VecDeque<String>,
    ids: HashSet<String>,
}

impl Dedup {
    /// Start above `floor` (the persisted highest sequence), remembering up to `capacity` ids.
    pub fn new(floor: u64, capacity: usize) -> Self {
        Self {
            floor,
            capacity: capacity.max(1),
            order: VecDeque::new(),
            ids: HashSet::new(),
        }
    }

    /// Whether a push must be dropped.
    pub fn check(&self, seq: u64, id: &str) -> Option<Duplicate> {
        if seq <= self.floor {
            Some(Duplicate::Seq)
        } else if !id.is_empty() && self.ids.contains(id) {
            Some(Duplicate::Id)
        } else {
            None
        }
    }

    /// Remember a push that passed [`Dedup::check`] (handed to the app or deliberately dropped).
    pub fn record(&mut self, seq: u64, id: &str) {
        self.floor = self.floor.max(seq);
        if id.is_empty() || self.ids.contains(id) {
            return;
        }
        if self.order.len() == self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.ids.remove(&oldest);
        }
        self.order.push_back(id.to_owned());
        self.ids.insert(id.to_owned());
    }

    /// Sequences now come from another numbering, starting above `floor`; the ids still count.
    pub fn rebase(&mut self, floor: u64) {
        self.floor = floor;
    }

    /// Highest sequence recorded.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Ids remembered right now (never above the capacity).
    pub fn remembered(&self) -> usize {
        self.ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_old_sequences_and_recent_ids() {
        let mut d = Dedup::new(10, 4);
        assert_eq!(d.check(10, "a"), Some(Duplicate::Seq));
        assert_eq!(d.check(11, "a"), None);
        d.record(11, "a");
        assert_eq!(d.check(11, "b"), Some(Duplicate::Seq));
        assert_eq!(d.check(12, "a"), Some(Duplicate::Id));
        assert_eq!(d.check(12, "b"), None);
        assert_eq!(d.floor(), 11);
    }

    #[test]
    fn id_memory_is_bounded_and_forgets_the_oldest() {
        let mut d = Dedup::new(0, 3);
        for (seq, id) in ["a", "b", "c", "d"].iter().enumerate() {
            d.record(seq as u64 + 1, id);
        }
        assert_eq!(d.remembered(), 3);
        assert_eq!(d.check(100, "a"), None, "oldest id forgotten");
        assert_eq!(d.check(100, "d"), Some(Duplicate::Id));
        for i in 0..10_000u64 {
            d.record(200 + i, &format!("x{i}"));
        }
        assert_eq!(d.remembered(), 3);
    }

    #[test]
    fn empty_ids_are_never_duplicates_by_id() {
        let mut d = Dedup::new(0, 3);
        d.record(1, "");
        assert_eq!(d.check(2, ""), None);
        assert_eq!(d.remembered(), 0);
    }
}

//! What the user did with calls, kept until the server replied.
//!
//! A report goes out on the live session and again after every later `ServerHello` until a
//! `CallOutcomeReply` names it (same call id and outcome): the server treats reports as
//! idempotent, so sending one again is always safe, and a phone that acted on a call while
//! off-site reports it when it next reaches the server. The set is bounded: a phone cannot
//! hold unbounded memory for a server that never answers, so beyond [`DEFAULT_CAP`] the oldest
//! report is dropped (and counted). The host keeps its own durable copy (the app group) and
//! hands the reports again to a new instance.

use std::collections::VecDeque;

use push_proto::device::CallOutcome;

/// Reports kept by default: far more calls than a phone acts on between two sessions.
pub const DEFAULT_CAP: usize = 64;
/// Longest call id the server accepts in a report (`CallOutcomeReport.call_id`).
pub const MAX_CALL_ID_BYTES: usize = 128;

/// What the user did with one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeReport {
    /// The sender's call id.
    pub call_id: String,
    /// What the user did (never `Unspecified`: see [`OutcomeReport::check`]).
    pub outcome: CallOutcome,
    /// When, by the phone's clock, Unix ms (shown by the server, not used to decide).
    pub at_ms: i64,
}

/// Why a report was refused. The server ends a session that carries such a report, and the
/// SDK sends pending reports on every session, so one bad report would break every later one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidReport {
    /// Empty, longer than [`MAX_CALL_ID_BYTES`], or with control characters.
    #[error("call id {0}")]
    CallId(&'static str),
    /// `CallOutcome::Unspecified` is not something a user did.
    #[error("the outcome is unspecified")]
    Outcome,
}

impl OutcomeReport {
    /// Whether the server will take this report (its field rules, checked before sending).
    pub fn check(&self) -> Result<(), InvalidReport> {
        if self.call_id.is_empty() {
            return Err(InvalidReport::CallId("is empty"));
        }
        if self.call_id.len() > MAX_CALL_ID_BYTES {
            return Err(InvalidReport::CallId("is longer than 128 bytes"));
        }
        if self.call_id.chars().any(char::is_control) {
            return Err(InvalidReport::CallId("contains control characters"));
        }
        if self.outcome == CallOutcome::Unspecified {
            return Err(InvalidReport::Outcome);
        }
        Ok(())
    }

    fn is(&self, call_id: &str, outcome: CallOutcome) -> bool {
        self.outcome == outcome && self.call_id == call_id
    }
}

/// What [`PendingOutcomes::insert`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// New: send it.
    Added,
    /// The same call id and outcome is already pending (the first one's time is kept).
    Duplicate,
    /// New, and the set was full: the oldest report was dropped.
    AddedDropping(OutcomeReport),
}

/// Pending reports, oldest first, at most one per (call id, outcome).
#[derive(Debug, Clone)]
pub struct PendingOutcomes {
    reports: VecDeque<OutcomeReport>,
    cap: usize,
    dropped: u64,
}

impl PendingOutcomes {
    /// An empty set holding at most `cap` reports (at least one).
    pub fn new(cap: usize) -> Self {
        Self {
            reports: VecDeque::new(),
            cap: cap.max(1),
            dropped: 0,
        }
    }

    /// Add a report unless the same call id and outcome is pending. The caller checked it.
    pub fn insert(&mut self, report: OutcomeReport) -> Inserted {
        if self.reports.iter().any(|r| r.is(&report.call_id, report.outcome)) {
            return Inserted::Duplicate;
        }
        let dropped = (self.reports.len() >= self.cap).then(|| self.reports.pop_front());
        self.reports.push_back(report);
        match dropped.flatten() {
            Some(old) => {
                self.dropped += 1;
                Inserted::AddedDropping(old)
            }
            None => Inserted::Added,
        }
    }

    /// The server replied to this report: forget it. `None` if it was not pending.
    pub fn remove(&mut self, call_id: &str, outcome: CallOutcome) -> Option<OutcomeReport> {
        let at = self.reports.iter().position(|r| r.is(call_id, outcome))?;
        self.reports.remove(at)
    }

    /// The pending reports, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &OutcomeReport> {
        self.reports.iter()
    }

    /// Reports pending.
    pub fn len(&self) -> usize {
        self.reports.len()
    }

    /// Whether none is pending.
    pub fn is_empty(&self) -> bool {
        self.reports.is_empty()
    }

    /// Reports dropped because the set was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl Default for PendingOutcomes {
    fn default() -> Self {
        Self::new(DEFAULT_CAP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(call_id: &str, outcome: CallOutcome) -> OutcomeReport {
        OutcomeReport {
            call_id: call_id.into(),
            outcome,
            at_ms: 1,
        }
    }

    #[test]
    fn one_per_call_and_outcome_and_the_oldest_goes_first() {
        let mut p = PendingOutcomes::new(2);
        assert_eq!(p.insert(report("a", CallOutcome::Answered)), Inserted::Added);
        let mut again = report("a", CallOutcome::Answered);
        again.at_ms = 2;
        assert_eq!(p.insert(again), Inserted::Duplicate);
        assert_eq!(
            p.iter().next().unwrap().at_ms,
            1,
            "the first report's time is kept"
        );
        assert_eq!(p.insert(report("a", CallOutcome::Ended)), Inserted::Added);
        assert_eq!(
            p.insert(report("b", CallOutcome::Declined)),
            Inserted::AddedDropping(report("a", CallOutcome::Answered))
        );
        assert_eq!((p.len(), p.dropped()), (2, 1));
        assert_eq!(p.remove("a", CallOutcome::Answered), None);
        assert_eq!(
            p.remove("b", CallOutcome::Missed),
            None,
            "another outcome of the call"
        );
        assert!(p.remove("b", CallOutcome::Declined).is_some());
        assert_eq!(
            p.iter().map(|r| r.outcome).collect::<Vec<_>>(),
            [CallOutcome::Ended]
        );
    }

    #[test]
    fn reports_the_server_would_refuse_are_refused() {
        assert_eq!(report("c-1", CallOutcome::Missed).check(), Ok(()));
        assert_eq!(report(&"x".repeat(128), CallOutcome::Missed).check(), Ok(()));
        assert!(matches!(
            report("", CallOutcome::Answered).check(),
            Err(InvalidReport::CallId(_))
        ));
        assert!(matches!(
            report(&"x".repeat(129), CallOutcome::Answered).check(),
            Err(InvalidReport::CallId(_))
        ));
        assert!(matches!(
            report("a\nb", CallOutcome::Answered).check(),
            Err(InvalidReport::CallId(_))
        ));
        assert_eq!(
            report("c-1", CallOutcome::Unspecified).check(),
            Err(InvalidReport::Outcome)
        );
    }
}

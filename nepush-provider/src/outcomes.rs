//! The app group's pending call outcomes: what the user did with calls, written by the container
//! app (its `CXProviderDelegate`), read by the extension, and deleted one by one as the server
//! replies.
//!
//! `NEAppPushProvider` has no message channel from the app, so the app appends a report to this
//! file and posts a Darwin notification; the extension reads the file and hands every report
//! to its provider ([`crate::Provider::report_pending_call_outcomes`]), and again at every
//! start. The file is the durable copy: the SDK forgets what it was handed when the process
//! dies, and the server answers a repeat as it answered the first, so handing a report over
//! twice is always safe.
//!
//! The format is an XML property list (Swift reads and writes it natively; a person can read
//! it in a sysdiagnose):
//!
//! ```text
//! { "version": 1, "reports": [ { "callId": "c-17", "outcome": "answered", "atMs": 1700000000000 } ] }
//! ```
//!
//! `outcome` is `answered`, `declined`, `missed` or `ended`. At most one report per call id and
//! outcome, at most [`MAX_REPORTS`] (the oldest goes): the same bound as the SDK's.
//!
//! Both processes change the file: each change is a read-modify-write that must not interleave
//! with the other process's (Swift: `NSFileCoordinator` around the read and the atomic write).
//! This module only turns bytes into reports and back; it does no I/O.

use mobile_sdk::core::{CallOutcome, InvalidReport, OutcomeReport, PendingOutcomes, outcomes::DEFAULT_CAP};
use plist::{Dictionary, Value};

/// File name in the app group container.
pub const FILE_NAME: &str = "pendingCallOutcomes.plist";
/// Reports kept at most.
pub const MAX_REPORTS: usize = DEFAULT_CAP;
/// The format's version.
pub const VERSION: u64 = 1;

/// The name of an outcome in the file (`None` for `Unspecified`, never written).
pub fn outcome_name(outcome: CallOutcome) -> Option<&'static str> {
    match outcome {
        CallOutcome::Answered => Some("answered"),
        CallOutcome::Declined => Some("declined"),
        CallOutcome::Missed => Some("missed"),
        CallOutcome::Ended => Some("ended"),
        CallOutcome::Unspecified => None,
    }
}

/// The outcome a name in the file stands for.
pub fn outcome_from_name(name: &str) -> Option<CallOutcome> {
    [
        CallOutcome::Answered,
        CallOutcome::Declined,
        CallOutcome::Missed,
        CallOutcome::Ended,
    ]
    .into_iter()
    .find(|o| outcome_name(*o) == Some(name))
}

/// The file's content, as reports.
#[derive(Debug, Clone, Default)]
pub struct PendingCallOutcomes {
    reports: PendingOutcomes,
}

impl PendingCallOutcomes {
    /// Read the file's bytes; empty bytes (no file yet) are no reports. Never fails: a file that
    /// is not this format, or an entry that is not a valid report, is skipped and logged, so
    /// one bad write cannot stop every later report.
    pub fn parse(bytes: &[u8]) -> Self {
        let mut pending = Self::default();
        if bytes.is_empty() {
            return pending;
        }
        let root = match Value::from_reader(std::io::Cursor::new(bytes)) {
            Ok(Value::Dictionary(d)) => d,
            Ok(_) => {
                tracing::warn!("pending call outcomes: not a dictionary; starting afresh");
                return pending;
            }
            Err(e) => {
                tracing::warn!(error = %e, "pending call outcomes: not a property list; starting afresh");
                return pending;
            }
        };
        let entries = root
            .get("reports")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for entry in entries {
            match report_from(entry) {
                Some(report) => {
                    if let Err(e) = pending.add(report) {
                        tracing::warn!(error = %e, "pending call outcomes: invalid report skipped");
                    }
                }
                None => tracing::warn!(?entry, "pending call outcomes: unreadable entry skipped"),
            }
        }
        pending
    }

    /// The file's bytes (XML property list).
    pub fn to_bytes(&self) -> Vec<u8> {
        let reports = self
            .reports
            .iter()
            .filter_map(|r| {
                let mut d = Dictionary::new();
                d.insert("callId".into(), Value::String(r.call_id.clone()));
                d.insert("outcome".into(), Value::String(outcome_name(r.outcome)?.into()));
                d.insert("atMs".into(), Value::Integer(r.at_ms.into()));
                Some(Value::Dictionary(d))
            })
            .collect();
        let mut root = Dictionary::new();
        root.insert("version".into(), Value::Integer(VERSION.into()));
        root.insert("reports".into(), Value::Array(reports));
        let mut out = Vec::new();
        plist::to_writer_xml(&mut out, &Value::Dictionary(root))
            .expect("strings and integers always serialise to a Vec");
        out
    }

    /// Append a report (what the app does when the user acts). Returns false if the same call
    /// id and outcome is already pending. Refused if the server would refuse it.
    pub fn add(&mut self, report: OutcomeReport) -> Result<bool, InvalidReport> {
        report.check()?;
        Ok(!matches!(
            self.reports.insert(report),
            mobile_sdk::core::outcomes::Inserted::Duplicate
        ))
    }

    /// The server replied to this report: delete it. Returns whether it was there.
    pub fn remove(&mut self, call_id: &str, outcome: CallOutcome) -> bool {
        self.reports.remove(call_id, outcome).is_some()
    }

    /// The reports, oldest first.
    pub fn reports(&self) -> impl Iterator<Item = &OutcomeReport> {
        self.reports.iter()
    }

    /// Number of reports.
    pub fn len(&self) -> usize {
        self.reports.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.reports.is_empty()
    }
}

fn report_from(entry: &Value) -> Option<OutcomeReport> {
    let d = entry.as_dictionary()?;
    Some(OutcomeReport {
        call_id: d.get("callId")?.as_string()?.to_owned(),
        outcome: outcome_from_name(d.get("outcome")?.as_string()?)?,
        at_ms: d.get("atMs").and_then(Value::as_signed_integer).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(call_id: &str, outcome: CallOutcome, at_ms: i64) -> OutcomeReport {
        OutcomeReport {
            call_id: call_id.into(),
            outcome,
            at_ms,
        }
    }

    #[test]
    fn reports_survive_the_file_in_order() {
        let mut file = PendingCallOutcomes::parse(b"");
        assert!(file.is_empty(), "no file yet: nothing pending");
        assert!(
            file.add(report("c-1", CallOutcome::Answered, 1_700_000_000_000))
                .unwrap()
        );
        assert!(
            file.add(report("Station Ünfall 🚑", CallOutcome::Missed, -1))
                .unwrap()
        );
        assert!(
            !file.add(report("c-1", CallOutcome::Answered, 5)).unwrap(),
            "a repeat"
        );
        assert!(file.add(report("c-1", CallOutcome::Ended, 2)).unwrap());
        let bytes = file.to_bytes();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains("<string>answered</string>"), "{text}");
        let back = PendingCallOutcomes::parse(&bytes);
        let got: Vec<_> = back.reports().cloned().collect();
        assert_eq!(
            got,
            [
                report("c-1", CallOutcome::Answered, 1_700_000_000_000),
                report("Station Ünfall 🚑", CallOutcome::Missed, -1),
                report("c-1", CallOutcome::Ended, 2),
            ]
        );
        let mut back = back;
        assert!(back.remove("c-1", CallOutcome::Answered));
        assert!(!back.remove("c-1", CallOutcome::Answered));
        assert_eq!(PendingCallOutcomes::parse(&back.to_bytes()).len(), 2);
    }

    #[test]
    fn the_file_is_bounded_and_the_oldest_goes() {
        let mut file = PendingCallOutcomes::default();
        for i in 0..MAX_REPORTS + 3 {
            file.add(report(&format!("c-{i}"), CallOutcome::Missed, 0))
                .unwrap();
        }
        let back = PendingCallOutcomes::parse(&file.to_bytes());
        assert_eq!(back.len(), MAX_REPORTS);
        assert_eq!(back.reports().next().unwrap().call_id, "c-3");
    }

    #[test]
    fn what_is_not_a_report_is_skipped_not_fatal() {
        assert!(PendingCallOutcomes::parse(b"not a plist").is_empty());
        assert!(PendingCallOutcomes::parse(&plist_bytes(Value::Array(vec![]))).is_empty());
        let mut good = Dictionary::new();
        good.insert("callId".into(), Value::String("c-1".into()));
        good.insert("outcome".into(), Value::String("declined".into()));
        let mut unknown = good.clone();
        unknown.insert("outcome".into(), Value::String("shrugged".into()));
        let mut empty_id = good.clone();
        empty_id.insert("callId".into(), Value::String(String::new()));
        let mut root = Dictionary::new();
        root.insert(
            "reports".into(),
            Value::Array(vec![
                Value::Dictionary(unknown),
                Value::String("junk".into()),
                Value::Dictionary(empty_id),
                Value::Dictionary(good),
            ]),
        );
        let file = PendingCallOutcomes::parse(&plist_bytes(Value::Dictionary(root)));
        let got: Vec<_> = file.reports().cloned().collect();
        assert_eq!(got, [report("c-1", CallOutcome::Declined, 0)], "atMs missing: 0");
    }

    #[test]
    fn a_report_the_server_would_refuse_is_never_written() {
        let mut file = PendingCallOutcomes::default();
        assert_eq!(
            file.add(report("c-1", CallOutcome::Unspecified, 0)),
            Err(InvalidReport::Outcome)
        );
        assert!(file.add(report("", CallOutcome::Answered, 0)).is_err());
        assert!(file.is_empty());
    }

    #[test]
    fn outcome_names_round_trip() {
        for o in [
            CallOutcome::Answered,
            CallOutcome::Declined,
            CallOutcome::Missed,
            CallOutcome::Ended,
        ] {
            assert_eq!(outcome_from_name(outcome_name(o).unwrap()), Some(o));
        }
        assert_eq!(outcome_name(CallOutcome::Unspecified), None);
    }

    fn plist_bytes(v: Value) -> Vec<u8> {
        let mut out = Vec::new();
        plist::to_writer_xml(&mut out, &v).unwrap();
        out
    }
}

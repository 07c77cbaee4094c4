//! Call-outcome reports: sent when established, again on every session until replied.

use push_proto::device::{CallOutcome, CallOutcomeReply, CallOutcomeResult, client_frame, server_frame};

use super::*;
use crate::core::{InvalidReport, OutcomeReply, OutcomeReport};

fn report(call_id: &str, outcome: CallOutcome, at_ms: i64) -> OutcomeReport {
    OutcomeReport {
        call_id: call_id.into(),
        outcome,
        at_ms,
    }
}

impl Harness {
    fn report(&mut self, call_id: &str, outcome: CallOutcome) -> Result<(), InvalidReport> {
        let r = self
            .s
            .handle_call_outcome(self.now, report(call_id, outcome, 1_000));
        self.drain();
        r
    }

    fn reply(&mut self, call_id: &str, outcome: CallOutcome, result: CallOutcomeResult) {
        self.server(server_frame::Kind::CallOutcomeReply(CallOutcomeReply {
            call_id: call_id.into(),
            outcome: outcome as i32,
            result: result as i32,
            detail: "by Dr. Okafor".into(),
        }));
    }

    /// Every report written so far, in order: (call id, outcome).
    fn reports_sent(&self) -> Vec<(String, CallOutcome)> {
        self.sent
            .iter()
            .filter_map(|f| match &f.kind {
                Some(client_frame::Kind::CallOutcome(r)) => Some((r.call_id.clone(), r.outcome())),
                _ => None,
            })
            .collect()
    }

    /// Index in `sent` of the last frame that is a `Hello`.
    fn last_hello_at(&self) -> usize {
        self.sent
            .iter()
            .rposition(|f| matches!(f.kind, Some(client_frame::Kind::Hello(_))))
            .expect("a hello was sent")
    }

    fn replies(&self) -> Vec<&OutcomeReply> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::CallOutcomeReplied(r) => Some(r),
                _ => None,
            })
            .collect()
    }
}

fn sent(call_id: &str, outcome: CallOutcome) -> (String, CallOutcome) {
    (call_id.into(), outcome)
}

#[test]
fn a_report_made_while_disconnected_is_sent_after_the_server_hello() {
    let mut h = Harness::new(config(0));
    h.report("c1", CallOutcome::Answered).unwrap();
    h.start();
    h.connected();
    assert!(
        h.reports_sent().is_empty(),
        "the server takes nothing before its hello"
    );
    h.server_hello();
    assert_eq!(h.reports_sent(), [sent("c1", CallOutcome::Answered)]);
    let at = h
        .sent
        .iter()
        .position(|f| matches!(f.kind, Some(client_frame::Kind::CallOutcome(_))))
        .unwrap();
    assert!(at > h.last_hello_at());
    let Some(client_frame::Kind::CallOutcome(frame)) = &h.sent[at].kind else {
        unreachable!()
    };
    assert_eq!(frame.at_ms, 1_000, "the user's time goes out as given");
}

#[test]
fn a_report_is_sent_at_once_when_connected_and_on_every_session_until_replied() {
    let mut h = Harness::new(config(0));
    h.establish();
    h.report("c1", CallOutcome::Declined).unwrap();
    assert_eq!(h.reports_sent(), [sent("c1", CallOutcome::Declined)]);
    for session in 2..=3 {
        h.disconnected("reset by peer");
        h.sleep();
        h.reconnect();
        assert_eq!(
            h.reports_sent().len(),
            session,
            "sent again after hello {session}"
        );
        assert!(h.sent.len() - 1 > h.last_hello_at());
    }
    h.reply("c1", CallOutcome::Declined, CallOutcomeResult::Recorded);
    assert_eq!(h.s.pending_outcomes().count(), 0);
    h.disconnected("reset by peer");
    h.sleep();
    h.reconnect();
    assert_eq!(h.reports_sent().len(), 3, "replied: not sent again");
}

#[test]
fn the_reply_forgets_the_report_and_tells_the_host() {
    let mut h = Harness::new(config(0));
    h.establish();
    h.report("c1", CallOutcome::Answered).unwrap();
    h.report("c2", CallOutcome::Missed).unwrap();
    h.reply("c1", CallOutcome::Answered, CallOutcomeResult::AnsweredElsewhere);
    assert_eq!(
        h.replies(),
        [&OutcomeReply {
            call_id: "c1".into(),
            outcome: CallOutcome::Answered,
            result: CallOutcomeResult::AnsweredElsewhere,
            detail: "by Dr. Okafor".into(),
        }]
    );
    let pending: Vec<_> = h.s.pending_outcomes().map(|r| r.call_id.clone()).collect();
    assert_eq!(pending, ["c2"]);
    assert_eq!(
        h.events.last().and_then(Event::push_seq),
        None,
        "a reply is no push"
    );
}

#[test]
fn a_reply_to_no_pending_report_is_ignored() {
    let mut h = Harness::new(config(0));
    h.establish();
    h.report("c1", CallOutcome::Answered).unwrap();
    // Another outcome of the same call, a call never reported, and a result from a newer server.
    h.reply("c1", CallOutcome::Ended, CallOutcomeResult::Recorded);
    h.reply("c9", CallOutcome::Answered, CallOutcomeResult::UnknownCall);
    assert!(h.replies().is_empty());
    assert!(
        matches!(h.s.state(), State::Connected { .. }),
        "{:?}",
        h.s.state()
    );
    assert_eq!(h.s.pending_outcomes().count(), 1);
    h.server(server_frame::Kind::CallOutcomeReply(CallOutcomeReply {
        call_id: "c1".into(),
        outcome: CallOutcome::Answered as i32,
        result: 99,
        detail: String::new(),
    }));
    assert_eq!(h.replies()[0].result, CallOutcomeResult::Unspecified);
    // The same reply again (the server answered a repeat) changes nothing more.
    h.reply("c1", CallOutcome::Answered, CallOutcomeResult::Recorded);
    assert_eq!(h.replies().len(), 1);
}

#[test]
fn a_repeated_report_is_not_sent_twice() {
    let mut h = Harness::new(config(0));
    h.establish();
    h.report("c1", CallOutcome::Answered).unwrap();
    h.report("c1", CallOutcome::Answered).unwrap();
    // Another outcome of the same call is another report (answered, then hung up).
    h.report("c1", CallOutcome::Ended).unwrap();
    assert_eq!(
        h.reports_sent(),
        [sent("c1", CallOutcome::Answered), sent("c1", CallOutcome::Ended)]
    );
    h.disconnected("reset by peer");
    h.sleep();
    h.reconnect();
    assert_eq!(h.reports_sent().len(), 4, "each pending report once per session");
}

#[test]
fn at_most_the_cap_is_kept_and_the_oldest_goes() {
    let mut h = Harness::new(Config {
        max_outcome_reports: 3,
        ..config(0)
    });
    for i in 1..=5 {
        h.report(&format!("c{i}"), CallOutcome::Missed).unwrap();
    }
    assert_eq!(h.s.dropped_outcome_reports(), 2);
    h.establish();
    let ids: Vec<String> = h.reports_sent().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["c3", "c4", "c5"]);
}

#[test]
fn reports_the_server_would_refuse_are_refused_and_never_sent() {
    let mut h = Harness::new(config(0));
    h.establish();
    assert_eq!(
        h.report("c1", CallOutcome::Unspecified),
        Err(InvalidReport::Outcome)
    );
    assert!(matches!(
        h.report("", CallOutcome::Answered),
        Err(InvalidReport::CallId(_))
    ));
    assert!(matches!(
        h.report("bad\u{7}id", CallOutcome::Answered),
        Err(InvalidReport::CallId(_))
    ));
    assert!(h.reports_sent().is_empty());
    assert_eq!(h.s.pending_outcomes().count(), 0);
}

#[test]
fn reports_handed_over_at_creation_go_out_after_the_first_hello() {
    let mut h = Harness::new(Config {
        outcome_reports: vec![
            report("c1", CallOutcome::Answered, 5),
            report("", CallOutcome::Answered, 5),
            report("c1", CallOutcome::Answered, 6),
        ],
        ..config(0)
    });
    h.establish();
    assert_eq!(
        h.reports_sent(),
        [sent("c1", CallOutcome::Answered)],
        "the invalid one and the repeat are left out"
    );
}

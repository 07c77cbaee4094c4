//! The call state machine under virtual time: every race decided in one place.

use super::*;

const T0: i64 = 1_000_000;

fn invite(ring_ms: i64) -> CallInvite {
    CallInvite {
        call_id: "c".into(),
        call_uuid: "uuid".into(),
        caller_name: "Bed 12".into(),
        ring_deadline_ms: T0 + ring_ms,
        created_at_ms: T0,
        ..CallInvite::default()
    }
}

fn ids(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// A call to `first`, ringing 30 s, with `later` steps `(after ms since placement, stop, who)`.
fn call(first: &[&str], later: &[(i64, bool, &[&str])]) -> CallCore {
    let later = later
        .iter()
        .map(|(at, stop, who)| (T0 + at, *stop, ids(who)))
        .collect();
    let mut call = CallCore::new(invite(30_000), T0, ids(first), later);
    let placed: Vec<(String, Option<u64>)> = first
        .iter()
        .enumerate()
        .map(|(i, d)| (d.to_string(), Some(i as u64 + 1)))
        .collect();
    assert!(call.placed(T0, &placed).is_empty());
    call
}

fn stopped(fx: &[CallFx]) -> Vec<(String, CancelReason)> {
    fx.iter()
        .filter_map(|f| match f {
            CallFx::Stop { device_id, stop } => Some((device_id.clone(), stop.reason)),
            _ => None,
        })
        .collect()
}

fn rung(fx: &[CallFx]) -> Vec<(String, u32)> {
    fx.iter()
        .filter_map(|f| match f {
            CallFx::Ring { device_id, step } => Some((device_id.clone(), *step)),
            _ => None,
        })
        .collect()
}

fn outcome(call: &CallCore, device: &str) -> Option<ReceiptState> {
    let callee = call.record().callees.iter().find(|c| c.device_id == device);
    callee.and_then(|c| c.outcome).map(|(s, _)| s)
}

#[test]
fn the_first_answer_wins_and_the_others_are_stopped_and_a_second_answer_is_refused() {
    let mut c = call(&["a", "b", "c"], &[]);
    let (reply, fx) = c.report("b", CallOutcome::Answered, T0 + 5_000);
    assert_eq!(reply.result, CallOutcomeResult::Recorded);
    assert_eq!(
        fx[0],
        CallFx::Settle {
            device_id: "b".into(),
            state: ReceiptState::Answered,
            detail: "answered".into()
        }
    );
    assert_eq!(
        stopped(&fx),
        [
            ("a".into(), CancelReason::AnsweredElsewhere),
            ("c".into(), CancelReason::AnsweredElsewhere)
        ]
    );
    assert_eq!(
        c.record().end,
        Some(CallEnd::Answered {
            device_id: "b".into(),
            at_ms: T0 + 5_000
        })
    );
    assert_eq!(c.next_due(), None, "an answered call has no deadline left");

    let (late, fx) = c.report("a", CallOutcome::Answered, T0 + 5_001);
    assert_eq!(late.result, CallOutcomeResult::AnsweredElsewhere);
    assert!(late.detail.contains('b'), "{late:?}");
    assert!(fx.is_empty(), "a refused answer changes nothing");

    let (again, fx) = c.report("b", CallOutcome::Answered, T0 + 6_000);
    assert_eq!(
        (again.result, fx.len()),
        (CallOutcomeResult::Recorded, 0),
        "a repeated report is idempotent"
    );
    let (hung_up, _) = c.report("b", CallOutcome::Ended, T0 + 60_000);
    assert_eq!(hung_up.result, CallOutcomeResult::Recorded);
    assert_eq!(c.record().hung_up_at_ms, T0 + 60_000);
}

#[test]
fn everyone_declining_ends_the_call_declined() {
    let mut c = call(&["a", "b"], &[]);
    let (r, _) = c.report("a", CallOutcome::Declined, T0 + 1_000);
    assert_eq!(r.result, CallOutcomeResult::Recorded);
    assert!(!c.is_over(), "b still rings");
    let (_, fx) = c.report("b", CallOutcome::Declined, T0 + 2_000);
    assert_eq!(c.record().end, Some(CallEnd::Declined { at_ms: T0 + 2_000 }));
    assert!(stopped(&fx).is_empty(), "nobody is left ringing");
    assert_eq!(outcome(&c, "a"), Some(ReceiptState::Declined));
    let (late, _) = c.report("a", CallOutcome::Answered, T0 + 3_000);
    assert_eq!(late.result, CallOutcomeResult::CallEnded);
}

#[test]
fn nobody_answering_rings_the_next_step_at_its_time_then_ends_missed_at_the_deadline() {
    let mut c = call(&["a"], &[(10_000, false, &["b", "a"]), (20_000, true, &["sup"])]);
    assert_eq!(c.next_due(), Some(T0 + 10_000));
    assert!(c.due(T0 + 9_999).is_empty(), "not yet");
    let fx = c.due(T0 + 10_000);
    assert_eq!(rung(&fx), [("b".into(), 1)], "a rings on and is not rung twice");
    assert!(stopped(&fx).is_empty(), "step 1 keeps earlier steps ringing");
    assert_eq!(c.record().steps[1].started_ms, T0 + 10_000);
    assert!(c.placed(T0 + 10_000, &[("b".into(), Some(9))]).is_empty());
    let fx = c.due(T0 + 20_000);
    assert_eq!(rung(&fx), [("sup".into(), 2)]);
    assert!(c.placed(T0 + 20_000, &[("sup".into(), Some(3))]).is_empty());
    assert_eq!(
        stopped(&fx),
        [
            ("a".into(), CancelReason::Escalated),
            ("b".into(), CancelReason::Escalated)
        ],
        "step 2 stops the earlier steps"
    );
    assert_eq!(c.next_due(), Some(T0 + 30_000));
    let fx = c.due(T0 + 30_000);
    assert_eq!(stopped(&fx), [("sup".into(), CancelReason::Missed)]);
    assert_eq!(c.record().end, Some(CallEnd::Missed { at_ms: T0 + 30_000 }));
    let (late, _) = c.report("sup", CallOutcome::Answered, T0 + 30_001);
    assert_eq!(late.result, CallOutcomeResult::CallEnded);
}

#[test]
fn everyone_rung_declining_starts_the_next_step_at_once() {
    let mut c = call(&["a"], &[(10_000, false, &["b"])]);
    let (_, fx) = c.report("a", CallOutcome::Declined, T0 + 2_000);
    assert_eq!(rung(&fx), [("b".into(), 1)]);
    assert_eq!(c.record().steps[1].started_ms, T0 + 2_000);
    assert!(!c.is_over());
}

#[test]
fn an_answer_at_the_deadline_instant_loses_to_the_deadline_and_one_a_moment_before_wins() {
    let mut late = call(&["a", "b"], &[]);
    let (r, fx) = late.report("a", CallOutcome::Answered, T0 + 30_000);
    assert_eq!(r.result, CallOutcomeResult::CallEnded);
    assert_eq!(late.record().end, Some(CallEnd::Missed { at_ms: T0 + 30_000 }));
    assert_eq!(stopped(&fx).len(), 2, "both stopped as missed, once");
    let mut in_time = call(&["a", "b"], &[]);
    let (r, _) = in_time.report("a", CallOutcome::Answered, T0 + 29_999);
    assert_eq!(r.result, CallOutcomeResult::Recorded);
    assert!(
        in_time.due(T0 + 30_000).is_empty(),
        "the deadline finds the call answered"
    );
}

#[test]
fn a_step_due_at_the_instant_of_an_answer_starts_first_and_is_stopped_by_it() {
    let mut c = call(&["a"], &[(10_000, false, &["b"])]);
    let (r, fx) = c.report("a", CallOutcome::Answered, T0 + 10_000);
    assert_eq!(r.result, CallOutcomeResult::Recorded);
    assert_eq!(rung(&fx), [("b".into(), 1)]);
    assert!(
        stopped(&fx).is_empty(),
        "b's invite is not queued yet: a stop now could overtake it"
    );
    let fx = c.placed(T0 + 10_000, &[("b".into(), Some(4))]);
    assert_eq!(stopped(&fx), [("b".into(), CancelReason::AnsweredElsewhere)]);
}

#[test]
fn a_cancel_racing_the_placement_stops_the_invites_placed_after_it() {
    let mut c = CallCore::new(invite(30_000), T0, ids(&["a", "b"]), Vec::new());
    let (ringing, fx) = c.cancel(T0 + 1, CancelReason::CallerCancelled);
    assert!(ringing);
    assert!(
        fx.is_empty(),
        "no invite is queued yet: a stop now could overtake its invite"
    );
    // The placement returns afterwards: each invite is stopped then, once; a late ack of one
    // changes nothing.
    let fx = c.placed(T0 + 2, &[("a".into(), Some(5)), ("b".into(), Some(6))]);
    assert_eq!(
        stopped(&fx),
        [
            ("a".into(), CancelReason::CallerCancelled),
            ("b".into(), CancelReason::CallerCancelled)
        ]
    );
    let note = CalleeNote {
        call_id: "c".into(),
        seq: 5,
        acked: true,
        gone: None,
    };
    assert!(c.note("a", &note, T0 + 3).is_empty());
    let (again, _) = c.cancel(T0 + 4, CancelReason::CallerCancelled);
    assert!(!again, "a call cancels once");
    let (r, _) = c.report("a", CallOutcome::Answered, T0 + 5);
    assert_eq!(r.result, CallOutcomeResult::CallEnded);
}

#[test]
fn an_answer_racing_a_cancel_resolves_to_exactly_one_end() {
    for answer_first in [true, false] {
        let mut c = call(&["a", "b"], &[]);
        let (first, second) = if answer_first { (0, 1) } else { (1, 0) };
        let mut ends = Vec::new();
        for turn in [first, second] {
            if turn == 0 {
                let (r, _) = c.report("a", CallOutcome::Answered, T0 + 1_000);
                ends.push(r.result == CallOutcomeResult::Recorded);
            } else {
                ends.push(c.cancel(T0 + 1_000, CancelReason::CallerCancelled).0);
            }
        }
        assert_eq!(
            ends,
            [true, false],
            "the first decision wins (answer first: {answer_first})"
        );
    }
}

#[test]
fn a_callee_that_could_not_be_rung_counts_as_done() {
    let mut c = CallCore::new(
        invite(30_000),
        T0,
        ids(&["a"]),
        vec![(T0 + 10_000, false, ids(&["b"]))],
    );
    let fx = c.placed(T0, &[("a".into(), None)]);
    assert_eq!(
        rung(&fx),
        [("b".into(), 1)],
        "nobody can ring: the next step starts now"
    );
    let fx = c.placed(T0, &[("b".into(), None)]);
    assert!(fx.is_empty());
    assert_eq!(c.record().end, Some(CallEnd::Missed { at_ms: T0 }));
}

#[test]
fn a_restart_mid_escalation_starts_a_step_that_fell_due_at_once_or_ends_a_call_whose_deadline_passed() {
    let c = call(&["a"], &[(10_000, false, &["b"])]);
    let stored = c.record().clone();
    let mut back = CallCore::from_record(stored.clone()).expect("decodes");
    assert_eq!(back.next_due(), Some(T0 + 10_000), "the step is still planned");
    let fx = back.due(T0 + 15_000);
    assert_eq!(rung(&fx), [("b".into(), 1)]);
    assert_eq!(
        back.record().steps[1].started_ms,
        T0 + 15_000,
        "started at once, not back-dated"
    );

    let mut late = CallCore::from_record(stored).expect("decodes");
    let fx = late.due(T0 + 45_000);
    assert!(rung(&fx).is_empty(), "never rung late");
    assert_eq!(stopped(&fx), [("a".into(), CancelReason::Missed)]);
    assert_eq!(late.record().end, Some(CallEnd::Missed { at_ms: T0 + 30_000 }));
}

#[test]
fn finished_calls_are_remembered_then_forgotten() {
    let mut calls = Calls::default();
    let mut c = call(&["a"], &[]);
    c.cancel(T0 + 1_000, CancelReason::CallerCancelled);
    assert!(calls.open(c.clone()));
    assert!(!calls.open(c), "an id still remembered is refused");
    assert!(calls.forget_finished(T0 + 30_000 + CALL_MEMORY_MS - 1).is_empty());
    assert_eq!(calls.forget_finished(T0 + 30_000 + CALL_MEMORY_MS), ["c"]);
    assert!(calls.get("c").is_none());
}

#[test]
fn a_restart_finds_a_callee_placed_by_its_queued_invite_when_the_placement_was_not_stored() {
    // Stored at opening, before the invites: nobody placed yet.
    let opened = CallCore::new(invite(30_000), T0, ids(&["a", "b"]), Vec::new());
    let mut calls = Calls::default();
    assert!(calls.open(CallCore::from_record(opened.record().clone()).expect("decodes")));
    let queued = StoredPush {
        device_id: "a".into(),
        seq: 7,
        id: "c".into(),
        kind: PushKind::CallInvite,
        encoded: Push {
            id: "c".into(),
            seq: 7,
            body: Some(push::Body::CallInvite(invite(30_000))),
        }
        .encode_to_vec(),
        collapse_key: String::new(),
        expires_at_ms: T0 + 30_000,
    };
    calls.restore_invite(&queued);
    let call = calls.get_mut("c").expect("restored");
    let a = call.callee("a").expect("a");
    assert!(
        a.placed && a.seq == 7,
        "its queued invite says it was placed: {a:?}"
    );
    // So a cancel stops it (a callee never placed would wait for a placement that never comes).
    let (ringing, fx) = call.cancel(T0 + 1_000, CancelReason::CallerCancelled);
    assert!(ringing);
    assert_eq!(stopped(&fx), [("a".into(), CancelReason::CallerCancelled)]);
}

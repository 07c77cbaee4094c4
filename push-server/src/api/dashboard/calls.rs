//! The dashboard's picture of calls: a pure view of a stored [`CallRecord`] and its callees'
//! receipts (the same inputs as the sender API's `GetCallStatus`), shaped for the page.

use prost::Message;
use serde::Serialize;

use crate::store::{CallEnd, CallRecord, Receipt, ReceiptState};

/// One call, whole.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CallView {
    pub call_id: String,
    pub call_uuid: String,
    pub caller_name: String,
    pub caller_handle: String,
    pub video: bool,
    /// `ringing`, `answered`, `declined`, `missed` or `cancelled`.
    pub state: &'static str,
    pub answered_by: Option<String>,
    pub placed_at_ms: i64,
    pub deadline_ms: i64,
    pub ended_at_ms: Option<i64>,
    pub hung_up_at_ms: Option<i64>,
    /// Answer time − placement time.
    pub time_to_answer_ms: Option<i64>,
    /// Step 0 is the call's own target, then the escalation plan.
    pub steps: Vec<StepView>,
    pub callees: Vec<CalleeView>,
}

/// One step of a call.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct StepView {
    pub index: u32,
    pub due_at_ms: i64,
    /// `None`: it did not ring (yet).
    pub started_at_ms: Option<i64>,
    pub stop_earlier: bool,
    pub device_ids: Vec<String>,
}

/// One callee of a call.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CalleeView {
    pub device_id: String,
    /// The step that rang it.
    pub step: u32,
    /// What the page shows: `waiting` (not rung yet), `ringing`, or its outcome (`answered`,
    /// `declined`, `missed`, `cancelled`, `expired`, `undeliverable`).
    pub status: &'static str,
    /// Its receipt's delivery state.
    pub state: &'static str,
    /// `local`, `apns`, or empty when no path reached it.
    pub path: String,
    /// When `state` was reached.
    pub at_ms: i64,
    pub reason: String,
}

/// A call as one device's history shows it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DeviceCall {
    pub call_id: String,
    pub caller_name: String,
    pub placed_at_ms: i64,
    /// The call's state.
    pub call_state: &'static str,
    pub answered_by: Option<String>,
    pub time_to_answer_ms: Option<i64>,
    /// This device's part.
    pub step: u32,
    pub status: &'static str,
    pub path: String,
    pub at_ms: i64,
    pub reason: String,
}

fn call_state(end: Option<&CallEnd>) -> &'static str {
    match end {
        None => "ringing",
        Some(CallEnd::Answered { .. }) => "answered",
        Some(CallEnd::Declined { .. }) => "declined",
        Some(CallEnd::Missed { .. }) => "missed",
        Some(CallEnd::Cancelled { .. }) => "cancelled",
    }
}

/// A callee's status from its receipt (if any) and the call's own record of it.
fn callee_status(receipt: Option<&Receipt>, outcome: Option<ReceiptState>, rang: bool) -> &'static str {
    let state = receipt.map(|r| r.state);
    // A final receipt other than "it rang" is the outcome; the record's outcome covers a
    // receipt not yet caught up.
    match state
        .filter(|s| s.is_final() && *s != ReceiptState::Acked)
        .or(outcome)
    {
        Some(s) => s.label(),
        None if rang || matches!(state, Some(ReceiptState::Delivered | ReceiptState::Acked)) => "ringing",
        None => "waiting",
    }
}

/// The view of `call`, with `receipts` (its callees' latest receipts, any order).
pub(crate) fn call_view(call: &CallRecord, receipts: &[Receipt]) -> CallView {
    let invite = push_proto::device::CallInvite::decode(call.invite.as_slice()).unwrap_or_default();
    let answered = match &call.end {
        Some(CallEnd::Answered { device_id, at_ms }) => Some((device_id.clone(), *at_ms)),
        _ => None,
    };
    let mut callees: Vec<CalleeView> = call
        .callees
        .iter()
        .map(|c| {
            let r = receipts.iter().find(|r| r.device_id == c.device_id);
            CalleeView {
                device_id: c.device_id.clone(),
                step: c.step,
                status: callee_status(r, c.outcome.map(|(s, _)| s), c.rang),
                state: r.map_or("accepted", |r| r.state.label()),
                path: r.map(|r| r.path.clone()).unwrap_or_default(),
                at_ms: r
                    .map(|r| r.at_ms)
                    .or(c.outcome.map(|(_, at)| at))
                    .unwrap_or(call.placed_at_ms),
                reason: r.map(|r| r.reason.clone()).unwrap_or_default(),
            }
        })
        .collect();
    // A receipt for a device the record does not list (refused at placement, e.g. unknown).
    for r in receipts {
        if !callees.iter().any(|c| c.device_id == r.device_id) {
            callees.push(CalleeView {
                device_id: r.device_id.clone(),
                step: 0,
                status: callee_status(Some(r), None, false),
                state: r.state.label(),
                path: r.path.clone(),
                at_ms: r.at_ms,
                reason: r.reason.clone(),
            });
        }
    }
    CallView {
        call_uuid: push_proto::call_uuid(&call.call_id),
        call_id: call.call_id.clone(),
        caller_name: invite.caller_name,
        caller_handle: invite.caller_handle,
        video: invite.video,
        state: call_state(call.end.as_ref()),
        time_to_answer_ms: answered.as_ref().map(|(_, at)| at - call.placed_at_ms),
        answered_by: answered.map(|(d, _)| d),
        placed_at_ms: call.placed_at_ms,
        deadline_ms: call.deadline_ms,
        ended_at_ms: call.end.as_ref().map(CallEnd::at_ms),
        hung_up_at_ms: (call.hung_up_at_ms > 0).then_some(call.hung_up_at_ms),
        steps: call
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| StepView {
                index: i as u32,
                due_at_ms: s.due_ms,
                started_at_ms: (s.started_ms > 0).then_some(s.started_ms),
                stop_earlier: s.stop_earlier,
                device_ids: s.device_ids.clone(),
            })
            .collect(),
        callees,
    }
}

/// `device_id`'s part in `call`, if the call rang (or meant to ring) it.
pub(crate) fn device_call(call: &CallView, device_id: &str) -> Option<DeviceCall> {
    let me = call.callees.iter().find(|c| c.device_id == device_id)?;
    Some(DeviceCall {
        call_id: call.call_id.clone(),
        caller_name: call.caller_name.clone(),
        placed_at_ms: call.placed_at_ms,
        call_state: call.state,
        answered_by: call.answered_by.clone(),
        time_to_answer_ms: call.time_to_answer_ms,
        step: me.step,
        status: me.status,
        path: me.path.clone(),
        at_ms: me.at_ms,
        reason: me.reason.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CallStepRecord, CalleeRecord};

    fn callee(device_id: &str, step: u32, rang: bool, outcome: Option<(ReceiptState, i64)>) -> CalleeRecord {
        CalleeRecord {
            device_id: device_id.into(),
            step,
            seq: 1,
            placed: true,
            rang,
            outcome,
        }
    }

    fn receipt(device_id: &str, state: ReceiptState, path: &str, at_ms: i64) -> Receipt {
        Receipt {
            id: "c".into(),
            device_id: device_id.into(),
            state,
            reason: String::new(),
            at_ms,
            path: path.into(),
        }
    }

    fn record(end: Option<CallEnd>, callees: Vec<CalleeRecord>) -> CallRecord {
        let invite = push_proto::device::CallInvite {
            call_id: "c".into(),
            caller_name: "Bed 12".into(),
            ..Default::default()
        };
        CallRecord {
            call_id: "c".into(),
            invite: invite.encode_to_vec(),
            placed_at_ms: 1_000,
            deadline_ms: 31_000,
            steps: vec![
                CallStepRecord {
                    due_ms: 1_000,
                    stop_earlier: false,
                    device_ids: vec!["a".into(), "b".into()],
                    started_ms: 1_000,
                },
                CallStepRecord {
                    due_ms: 11_000,
                    stop_earlier: true,
                    device_ids: vec!["c".into()],
                    started_ms: 0,
                },
            ],
            callees,
            end,
            hung_up_at_ms: 0,
        }
    }

    #[test]
    fn an_answered_call_names_who_answered_and_how_long_it_took() {
        let call = record(
            Some(CallEnd::Answered {
                device_id: "b".into(),
                at_ms: 5_500,
            }),
            vec![
                callee("a", 0, true, Some((ReceiptState::Cancelled, 5_500))),
                callee("b", 0, true, Some((ReceiptState::Answered, 5_500))),
            ],
        );
        let receipts = [
            receipt("a", ReceiptState::Cancelled, "local", 5_501),
            receipt("b", ReceiptState::Answered, "apns", 5_500),
        ];
        let v = call_view(&call, &receipts);
        assert_eq!((v.state, v.answered_by.as_deref()), ("answered", Some("b")));
        assert_eq!(v.time_to_answer_ms, Some(4_500));
        assert_eq!(v.ended_at_ms, Some(5_500));
        assert_eq!(v.caller_name, "Bed 12");
        let by: Vec<_> = v
            .callees
            .iter()
            .map(|c| (c.device_id.as_str(), c.status, c.path.as_str()))
            .collect();
        assert_eq!(by, [("a", "cancelled", "local"), ("b", "answered", "apns")]);
        assert_eq!(v.steps[0].started_at_ms, Some(1_000));
        assert_eq!(v.steps[1].started_at_ms, None, "the step never rang");
        let mine = device_call(&v, "a").unwrap();
        assert_eq!((mine.status, mine.call_state), ("cancelled", "answered"));
        assert!(device_call(&v, "c").is_none(), "c never rang");
    }

    #[test]
    fn a_live_call_tells_ringing_from_waiting() {
        let call = record(
            None,
            vec![callee("a", 0, true, None), callee("b", 0, false, None)],
        );
        let receipts = [
            receipt("a", ReceiptState::Acked, "local", 1_200),
            receipt("b", ReceiptState::Accepted, "", 1_000),
        ];
        let v = call_view(&call, &receipts);
        assert_eq!(
            (v.state, v.ended_at_ms, v.time_to_answer_ms),
            ("ringing", None, None)
        );
        let status: Vec<_> = v.callees.iter().map(|c| c.status).collect();
        assert_eq!(status, ["ringing", "waiting"]);
    }
}

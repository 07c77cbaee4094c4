//! The clinical call loop: a call rings a team of phones, one answers, and the server tells the
//! caller (`WatchCall` shows the phone ANSWERED), the answering phone (`CallOutcomeReply`
//! RECORDED) and every other phone that rang (`CallCancel{ANSWERED_ELSEWHERE}`).
//!
//! Each of `in_flight` slots has its own team of `callees` phones (real SDK clients) and places
//! its calls one after the other, so at most `in_flight` calls are under way and a phone never
//! rings for two calls at once. A call: `PlaceCall` to the team, `WatchCall` opened at once;
//! once every phone had the invite (its app callback ran) and the watch shows every phone
//! ACKED (it rang: the phone acknowledged the invite), the answering phone (round-robin over
//! the team by call number) reports ANSWERED through its SDK. The clock starts when the report
//! is handed to the SDK. Every call is checked ([`CallCheck`]); violations are counted and
//! make the run fail.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use futures::StreamExt;
use mobile_sdk::core::{CallOutcome, CallOutcomeResult, CancelReason};
use push_proto::sender::{
    DeliveryState, DeliveryUpdate, DeviceList, PlaceCallRequest, Target, WatchCallRequest, target,
};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::{
    bench::{Env, Table, connected},
    push::{Fleet, PushTarget, device_id},
    recorder::{CallEvent, CallSeen},
    stats::{Summary, now_ns},
    worker::System,
};

/// Longest wait for each phase of a call (ringing everywhere; everything after the answer).
const PHASE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the last call, how long late events (a second reply, a second cancel) may still come.
const LATE_GRACE: Duration = Duration::from_millis(500);
/// Calls of the warm-up round per slot (checked, not measured).
const WARM_UP_PER_SLOT: usize = 5;

/// What one call saw, from the phones' events and the caller's `WatchCall` updates: pure
/// bookkeeping (times are `now_ns()` values), so the rules can be tested without a server.
#[derive(Debug, Clone)]
pub struct CallCheck {
    /// The phone (position in the team) that answers.
    answerer: usize,
    invited: Vec<bool>,
    /// The watch showed the phone ACKED (or any later state).
    rang: Vec<bool>,
    /// When the phone's ANSWERED report was handed to the SDK.
    answered_at: Option<u64>,
    /// When the watch first showed the answerer ANSWERED.
    watch_answered: Option<u64>,
    replies: Vec<(CallOutcome, CallOutcomeResult, u64)>,
    cancels: Vec<Vec<(CancelReason, u64)>>,
    /// Broken rules seen on the way (a watch showing another phone ANSWERED, errors, timeouts).
    problems: Vec<String>,
}

impl CallCheck {
    pub fn new(callees: usize, answerer: usize) -> Self {
        Self {
            answerer,
            invited: vec![false; callees],
            rang: vec![false; callees],
            answered_at: None,
            watch_answered: None,
            replies: Vec::new(),
            cancels: vec![Vec::new(); callees],
            problems: Vec::new(),
        }
    }

    /// Phone `pos` saw `seen` at `at`.
    pub fn phone(&mut self, pos: usize, seen: CallSeen, at: u64) {
        match seen {
            CallSeen::Invite => self.invited[pos] = true,
            CallSeen::Cancel(reason) => self.cancels[pos].push((reason, at)),
            CallSeen::Reply(outcome, result) => {
                if pos == self.answerer {
                    self.replies.push((outcome, result, at));
                } else {
                    self.fail(format!("phone {pos} got a reply to a report it never sent"));
                }
            }
        }
    }

    /// The caller's watch showed phone `pos` in `state` at `at`.
    pub fn watch(&mut self, pos: usize, state: DeliveryState, at: u64) {
        match state {
            DeliveryState::Unspecified | DeliveryState::Accepted | DeliveryState::Delivered => {}
            DeliveryState::Acked => self.rang[pos] = true,
            DeliveryState::Answered if pos == self.answerer => {
                self.rang[pos] = true;
                if self.answered_at.is_none() {
                    self.fail("the watch showed ANSWERED before the phone answered".into());
                }
                self.watch_answered.get_or_insert(at);
            }
            DeliveryState::Cancelled if pos != self.answerer && self.answered_at.is_some() => {}
            other => self.fail(format!("the watch showed phone {pos} {}", other.as_str_name())),
        }
    }

    pub fn fail(&mut self, problem: String) {
        self.problems.push(problem);
    }

    /// Every phone had the invite and the caller saw every one ring: time to answer.
    pub fn ringing(&self) -> bool {
        self.invited.iter().all(|&b| b) && self.rang.iter().all(|&b| b)
    }

    /// The answering phone's report is handed to the SDK now.
    pub fn answer(&mut self, at: u64) {
        self.answered_at = Some(at);
    }

    /// The caller saw ANSWERED, the answering phone has its reply and every other phone its
    /// cancel: nothing more is expected.
    pub fn settled(&self) -> bool {
        self.watch_answered.is_some()
            && !self.replies.is_empty()
            && self
                .cancels
                .iter()
                .enumerate()
                .all(|(pos, c)| pos == self.answerer || !c.is_empty())
    }

    /// Every rule this call broke: exactly one reply to the answering phone, ANSWERED and
    /// RECORDED; exactly one `CallCancel{ANSWERED_ELSEWHERE}` to each other phone and none to
    /// it; the caller saw it ANSWERED.
    pub fn violations(&self) -> Vec<String> {
        let mut v = self.problems.clone();
        if self.answered_at.is_none() {
            return v;
        }
        match self.replies.as_slice() {
            [(CallOutcome::Answered, CallOutcomeResult::Recorded, _)] => {}
            [] => v.push("no reply to the answering phone".into()),
            [(o, r, _)] => v.push(format!(
                "the answering phone's reply was {} {}",
                o.as_str_name(),
                r.as_str_name()
            )),
            more => v.push(format!("{} replies to the answering phone", more.len())),
        }
        for (pos, cancels) in self.cancels.iter().enumerate() {
            if pos == self.answerer {
                if !cancels.is_empty() {
                    v.push(format!("the answering phone got {} cancel(s)", cancels.len()));
                }
                continue;
            }
            match cancels.as_slice() {
                [(CancelReason::AnsweredElsewhere, _)] => {}
                [] => v.push(format!("phone {pos} got no cancel")),
                [(r, _)] => v.push(format!("phone {pos} was cancelled with {}", r.as_str_name())),
                more => v.push(format!("phone {pos} got {} cancels", more.len())),
            }
        }
        if self.watch_answered.is_none() {
            v.push("the caller's watch never showed ANSWERED".into());
        }
        v
    }

    /// Report -> ANSWERED on the watch, -> each other phone's cancel, -> the reply (ns).
    pub fn latencies(&self) -> (Option<u64>, Vec<u64>, Option<u64>) {
        let Some(t0) = self.answered_at else {
            return (None, Vec::new(), None);
        };
        let since = |t: u64| t.saturating_sub(t0);
        let cancels = self
            .cancels
            .iter()
            .enumerate()
            .filter(|(pos, _)| *pos != self.answerer)
            .filter_map(|(_, c)| c.first().map(|&(_, at)| since(at)))
            .collect();
        (
            self.watch_answered.map(since),
            cancels,
            self.replies.first().map(|&(_, _, at)| since(at)),
        )
    }
}

/// One call, as it went.
struct Done {
    call_id: String,
    team: Vec<usize>,
    check: CallCheck,
    /// `PlaceCall` -> every phone ACKED on the watch (ns).
    ringing: Option<u64>,
    /// For the events that come after the call settled.
    rx: UnboundedReceiver<CallEvent>,
}

/// Feed `check` from the phones and the watch until `until` holds, for at most
/// [`PHASE_TIMEOUT`]; false on the deadline.
async fn pump<W, E>(
    check: &mut CallCheck,
    team: &[usize],
    rx: &mut UnboundedReceiver<CallEvent>,
    watch: &mut Option<W>,
    until: impl Fn(&CallCheck) -> bool,
) -> bool
where
    W: futures::Stream<Item = Result<DeliveryUpdate, E>> + Unpin,
    E: std::fmt::Display,
{
    let ids: Vec<String> = team.iter().map(|&d| device_id(d)).collect();
    let deadline = Instant::now() + PHASE_TIMEOUT;
    while !until(check) {
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => match team.iter().position(|&d| d == ev.device) {
                    Some(pos) => check.phone(pos, ev.seen, ev.at),
                    None => check.fail(format!("device {} is not a callee", ev.device)),
                },
                None => return false,
            },
            u = async { watch.as_mut().expect("polled only while open").next().await }, if watch.is_some() => {
                let at = now_ns();
                match u {
                    Some(Ok(u)) => match ids.iter().position(|id| *id == u.device_id) {
                        Some(pos) => check.watch(pos, u.state(), at),
                        None => check.fail(format!("the watch named {}", u.device_id)),
                    },
                    Some(Err(e)) => {
                        check.fail(format!("WatchCall failed: {e}"));
                        *watch = None;
                    }
                    None => *watch = None,
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => return false,
        }
    }
    true
}

/// Place call `call_id` to `team`, wait until it rings everywhere, answer on `team[answerer]`,
/// and follow it until it settled.
async fn one_call(
    t: &PushTarget,
    fleet: &Fleet,
    call_id: String,
    team: Vec<usize>,
    answerer: usize,
    mut rx: UnboundedReceiver<CallEvent>,
) -> Done {
    let mut check = CallCheck::new(team.len(), answerer);
    let mut api = t.api.sender();
    let placed_at = now_ns();
    let done = |check, ringing, rx| Done {
        call_id: call_id.clone(),
        team: team.clone(),
        check,
        ringing,
        rx,
    };
    let placed = api
        .place_call(PlaceCallRequest {
            call_id: call_id.clone(),
            target: Some(Target {
                kind: Some(target::Kind::Devices(DeviceList {
                    device_ids: team.iter().map(|&d| device_id(d)).collect(),
                })),
            }),
            caller_name: "Bed 12".into(),
            caller_handle: "4711".into(),
            ..Default::default()
        })
        .await;
    if let Err(e) = placed {
        check.fail(format!("PlaceCall failed: {e}"));
        return done(check, None, rx);
    }
    let mut watch = match api
        .watch_call(WatchCallRequest {
            call_id: call_id.clone(),
        })
        .await
    {
        Ok(w) => Some(w.into_inner()),
        Err(e) => {
            check.fail(format!("WatchCall failed: {e}"));
            return done(check, None, rx);
        }
    };
    if !pump(&mut check, &team, &mut rx, &mut watch, CallCheck::ringing).await {
        let (inv, rang) = (
            check.invited.iter().filter(|&&b| b).count(),
            check.rang.iter().filter(|&&b| b).count(),
        );
        check.fail(format!(
            "not ringing everywhere after {PHASE_TIMEOUT:?}: {inv} invited, {rang} ACKED on the watch, of {}",
            team.len()
        ));
        return done(check, None, rx);
    }
    let ringing = now_ns() - placed_at;
    let at_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    check.answer(now_ns());
    if let Err(e) = fleet.report_call_outcome(team[answerer], &call_id, CallOutcome::Answered, at_ms) {
        check.fail(format!("the SDK refused the report: {e:#}"));
        return done(check, Some(ringing), rx);
    }
    if !pump(&mut check, &team, &mut rx, &mut watch, CallCheck::settled).await {
        check.fail(format!("not settled {PHASE_TIMEOUT:?} after the answer"));
    }
    done(check, Some(ringing), rx)
}

/// One round of `n` calls over `in_flight` slots; returns every call.
async fn round(
    t: &PushTarget,
    fleet: &Arc<Fleet>,
    name: &str,
    n: usize,
    callees: usize,
    in_flight: usize,
) -> anyhow::Result<Vec<Done>> {
    let rxs = fleet.rec.arm_calls(n);
    let rxs: Arc<Vec<std::sync::Mutex<Option<UnboundedReceiver<CallEvent>>>>> =
        Arc::new(rxs.into_iter().map(|r| std::sync::Mutex::new(Some(r))).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let mut slots = Vec::new();
    for slot in 0..in_flight {
        let (t, fleet, rxs, next, name) = (
            t.clone(),
            fleet.clone(),
            rxs.clone(),
            next.clone(),
            name.to_string(),
        );
        slots.push(tokio::spawn(async move {
            let team: Vec<usize> = (slot * callees..(slot + 1) * callees).collect();
            let mut done = Vec::new();
            loop {
                let k = next.fetch_add(1, Ordering::AcqRel);
                if k >= n {
                    break;
                }
                let rx = rxs[k].lock().expect("poisoned").take().expect("taken once");
                let answerer = answerer(k, callees);
                done.push((
                    k,
                    one_call(&t, &fleet, format!("c{k}-{name}"), team.clone(), answerer, rx).await,
                ));
            }
            done
        }));
    }
    let mut all = Vec::with_capacity(n);
    for s in slots {
        all.extend(s.await?);
    }
    // Late events: a second reply or cancel would be a violation too.
    tokio::time::sleep(LATE_GRACE).await;
    all.sort_by_key(|(k, _)| *k);
    Ok(all
        .into_iter()
        .map(|(_, mut d)| {
            while let Ok(ev) = d.rx.try_recv() {
                match d.team.iter().position(|&x| x == ev.device) {
                    Some(pos) => d.check.phone(pos, ev.seen, ev.at),
                    None => d.check.fail(format!("device {} is not a callee", ev.device)),
                }
            }
            d
        })
        .collect())
}

/// The answering phone of call `k`: round-robin over the team.
pub fn answerer(k: usize, callees: usize) -> usize {
    k % callees
}

/// `calls` calls, each ringing a team of `callees` phones, `in_flight` at a time: the answer
/// to ANSWERED on the caller's watch, to each other phone's cancel, and to the answering
/// phone's reply. Returns the figures and the number of calls that broke a rule.
pub async fn answer(
    env: &Env,
    calls: usize,
    callees: usize,
    in_flight: usize,
) -> anyhow::Result<(Table, usize)> {
    let mut table = Table::default();
    if !env.runs(System::Push) {
        return Ok((table, 0));
    }
    anyhow::ensure!(
        callees >= 2,
        "--callees must be at least 2 (one answers, the others are cancelled)"
    );
    let in_flight = in_flight.clamp(1, calls.max(1));
    let devices = callees * in_flight;
    println!("  command: {}", std::env::args().collect::<Vec<_>>().join(" "));
    println!(
        "== push-server: call answered on one of {callees} phones -> ANSWERED on the caller's WatchCall, CallCancel{{ANSWERED_ELSEWHERE}} on the others, CallOutcomeReply; {calls} calls, {in_flight} in flight, {devices} phones"
    );
    let (server, fleet) = connected(env, devices, &[]).await?;
    let fleet = Arc::new(fleet);
    let t = server.target.clone();
    let mut bad = 0;
    let mut report = |name: &str, done: &[Done]| {
        let mut shown = 0;
        for d in done {
            let v = d.check.violations();
            if !v.is_empty() {
                bad += 1;
                if shown < 10 {
                    shown += 1;
                    println!("  VIOLATION ({name}) {}: {}", d.call_id, v.join("; "));
                }
            }
        }
    };
    let warm = round(
        &t,
        &fleet,
        "warm-up",
        WARM_UP_PER_SLOT * in_flight,
        callees,
        in_flight,
    )
    .await?;
    report("warm-up", &warm);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu0 = server.proc().cpu_time();
    let started = Instant::now();
    let done = round(&t, &fleet, "measured", calls, callees, in_flight).await?;
    let took = started.elapsed() - LATE_GRACE;
    let cpu = server.proc().cpu_time() - cpu0;
    report("measured", &done);
    let (mut watch, mut cancel, mut last_cancel, mut reply, mut ringing) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for d in &done {
        let (w, c, r) = d.check.latencies();
        watch.extend(w);
        if c.len() == callees - 1 {
            last_cancel.extend(c.iter().max().copied());
        }
        cancel.extend(c);
        reply.extend(r);
        ringing.extend(d.ringing);
    }
    println!(
        "  {calls} calls in {:.1} s ({:.0} calls/s); server CPU {:.0} µs per call (placing, ringing, answering)",
        took.as_secs_f64(),
        calls as f64 / took.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / calls as f64
    );
    let f = |s: Summary| {
        format!(
            "p50 {:.3} / p99 {:.3} / p99.9 {:.3} / max {:.3} ms (n={})",
            s.p50, s.p99, s.p999, s.max, s.count
        )
    };
    let what = format!("{calls} calls to {callees} phones, {in_flight} in flight");
    for (figure, ns) in [
        ("ANSWERED report -> ANSWERED on the caller's WatchCall", watch),
        (
            "ANSWERED report -> CallCancel{ANSWERED_ELSEWHERE} on each other phone",
            cancel,
        ),
        ("ANSWERED report -> the last other phone's cancel", last_cancel),
        (
            "ANSWERED report -> CallOutcomeReply on the answering phone",
            reply,
        ),
        (
            "PlaceCall -> every phone ACKED on the watch (before answering)",
            ringing,
        ),
    ] {
        table.row("push-server", format!("{what}: {figure}"), f(Summary::of_ns(ns)));
    }
    table.row(
        "push-server",
        format!("{what}: calls that broke a rule (warm-up included)"),
        bad.to_string(),
    );
    Ok((table, bad))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Call to three phones, phone 1 answers at t=100.
    fn rung() -> CallCheck {
        let mut c = CallCheck::new(3, 1);
        for pos in 0..3 {
            c.phone(pos, CallSeen::Invite, 10);
            assert!(!c.ringing());
            c.watch(pos, DeliveryState::Delivered, 11);
        }
        for pos in 0..3 {
            c.watch(pos, DeliveryState::Acked, 12);
        }
        assert!(c.ringing());
        c.answer(100);
        c
    }

    #[test]
    fn a_call_that_settles_as_it_should() {
        let mut c = rung();
        c.phone(0, CallSeen::Cancel(CancelReason::AnsweredElsewhere), 130);
        c.phone(
            1,
            CallSeen::Reply(CallOutcome::Answered, CallOutcomeResult::Recorded),
            120,
        );
        assert!(!c.settled(), "the watch has not shown ANSWERED yet");
        c.watch(1, DeliveryState::Answered, 150);
        assert!(!c.settled(), "phone 2 has no cancel yet");
        c.watch(0, DeliveryState::Cancelled, 155);
        c.phone(2, CallSeen::Cancel(CancelReason::AnsweredElsewhere), 160);
        assert!(c.settled());
        assert_eq!(c.violations(), Vec::<String>::new());
        assert_eq!(c.latencies(), (Some(50), vec![30, 60], Some(20)));
    }

    #[test]
    fn broken_rules_are_violations() {
        let mut c = rung();
        c.phone(
            1,
            CallSeen::Reply(CallOutcome::Answered, CallOutcomeResult::Recorded),
            120,
        );
        c.phone(
            1,
            CallSeen::Reply(CallOutcome::Answered, CallOutcomeResult::Recorded),
            121,
        );
        c.phone(1, CallSeen::Cancel(CancelReason::AnsweredElsewhere), 122);
        c.phone(0, CallSeen::Cancel(CancelReason::CallerCancelled), 130);
        c.watch(2, DeliveryState::Answered, 140);
        let v = c.violations();
        assert_eq!(v.len(), 6, "{v:?}");
        for want in [
            "the watch showed phone 2 DELIVERY_STATE_ANSWERED",
            "2 replies",
            "the answering phone got 1 cancel",
            "phone 0 was cancelled with CANCEL_REASON_CALLER_CANCELLED",
            "phone 2 got no cancel",
            "never showed ANSWERED",
        ] {
            assert!(v.iter().any(|s| s.contains(want)), "{want:?} not in {v:?}");
        }

        let mut refused = rung();
        refused.phone(
            1,
            CallSeen::Reply(CallOutcome::Answered, CallOutcomeResult::AnsweredElsewhere),
            120,
        );
        assert!(refused.violations()[0].contains("CALL_OUTCOME_RESULT_ANSWERED_ELSEWHERE"));
    }

    #[test]
    fn answering_before_ringing_or_early_states_are_caught() {
        let mut c = CallCheck::new(2, 0);
        c.watch(0, DeliveryState::Answered, 5);
        c.watch(1, DeliveryState::Cancelled, 6);
        let v = c.violations();
        assert_eq!(v.len(), 2, "{v:?}");
    }

    #[test]
    fn round_robin_answerer() {
        let picked: Vec<usize> = (0..7).map(|k| answerer(k, 3)).collect();
        assert_eq!(picked, [0, 1, 2, 0, 1, 2, 0]);
    }
}

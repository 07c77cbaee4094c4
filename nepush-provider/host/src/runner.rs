//! Runs a scenario: the Wi-Fi relay, the server, enrollment, the phone, then each step with
//! the invariant checks after it, and the report.

use std::{
    collections::HashMap,
    fmt,
    sync::Arc,
    time::{Duration, Instant},
};

use mobile_sdk::{Snapshot, voip};
use nepush_provider::{
    CallOutcome, NEProviderStopReason, PendingCallOutcomes, ProviderConfiguration, State, user_info,
};
use push_proto::{
    device::{CancelReason, Priority},
    sender::{
        CallState, CallStatus, CancelCallRequest, DeliveryState, DeliveryUpdate, GetMessageStatusRequest,
        PlaceCallRequest, SendMessageRequest, Target, WatchCallRequest, target,
    },
};

use crate::{
    phone::{Phone, STEP_TIMEOUT},
    resources,
    scenario::{
        CallExpectation, CancelExpectation, NotificationExpectation, OfflineExpectation, OutcomeExpectation,
        Repeat, Scenario, Step, Within, result_name,
    },
    site::{HeldSessions, Site},
    wifi::Wifi,
};

/// Resource figures at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    /// Open file descriptors of this process.
    pub fds: usize,
    /// Resident memory, KiB.
    pub rss_kib: u64,
    /// Threads of this process.
    pub threads: u64,
    /// SDK counters of the running extension process (zero if none).
    pub counters: Snapshot,
}

/// Figures of one `repeat`.
#[derive(Debug, Clone, Default)]
pub struct RepeatFigures {
    /// Iterations run.
    pub iterations: u32,
    /// Iterations before the baseline.
    pub warmup: u32,
    /// Lifecycle events driven (join, leave, start, stop, timer, advance, kill, relaunch, new
    /// instance, stop racing start).
    pub lifecycle_events: u64,
    /// Server logins during the repeat.
    pub server_sessions: u64,
    /// Wall time.
    pub wall: Duration,
    /// Simulated time.
    pub simulated: Duration,
    /// Settled, after the warm-up.
    pub baseline: Resources,
    /// Settled, at the end.
    pub end: Resources,
    /// Highest open fds and RSS sampled after each iteration.
    pub max_fds: usize,
    /// See `max_fds`.
    pub max_rss_kib: u64,
}

/// What a run found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Scenario name.
    pub name: String,
    /// Failed expectations and broken invariants; empty means passed.
    pub failures: Vec<String>,
    /// Wall time of the run.
    pub wall: Duration,
    /// Steps run (repeats expanded).
    pub steps: u64,
    /// Lifecycle events driven.
    pub lifecycle_events: u64,
    /// Simulated time.
    pub simulated: Duration,
    /// Stops of the phone's clock while simulated time passed.
    pub clock_stops: u64,
    /// `handleTimerEvent` calls (collapsed ones included).
    pub timer_events: u64,
    /// Extension processes launched.
    pub processes: u32,
    /// Kills.
    pub kills: u32,
    /// Provider instances created.
    pub instances: u32,
    /// Notifications shown.
    pub notifications: usize,
    /// `reportIncomingCall` invocations.
    pub call_reports: usize,
    /// Replies to call-outcome reports the instances were told.
    pub outcome_replies: usize,
    /// Server logins of the device.
    pub server_logins: u64,
    /// Server offline events of the device.
    pub server_offline: u64,
    /// Logins that replaced a session the phone had already given up (killed, cut off).
    pub replaced_dead: u64,
    /// Most server sessions of the device alive at once.
    pub max_server_sessions: usize,
    /// Highest SDK counters seen at any change.
    pub max_counters: Snapshot,
    /// Connections relayed by the Wi-Fi, and black-holed by leaving.
    pub wifi_relayed: u64,
    /// See `wifi_relayed`.
    pub wifi_blackholed: u64,
    /// Measured offline detections: (what, measured, limit).
    pub offline: Vec<(String, Duration, Duration)>,
    /// Measured returns after an outage (phone's clock): (measured, limit).
    pub back_after: Vec<(Duration, Duration)>,
    /// Per repeat.
    pub repeats: Vec<RepeatFigures>,
    /// Before anything started, and after everything was torn down and settled.
    pub start: Resources,
    /// See `start`.
    pub end: Resources,
}

impl Report {
    /// Whether every expectation and invariant held.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        writeln!(
            f,
            "scenario {:?}: {verdict} in {:.1} s",
            self.name,
            self.wall.as_secs_f64()
        )?;
        writeln!(
            f,
            "  steps {} (lifecycle events {}), simulated {:.1} h in {} clock stops, timer events {}",
            self.steps,
            self.lifecycle_events,
            self.simulated.as_secs_f64() / 3600.0,
            self.clock_stops,
            self.timer_events
        )?;
        writeln!(
            f,
            "  phone: processes {}, kills {}, instances {}, notifications {}, call reports {}, outcome replies {}; wifi relayed {} connections, black-holed {}",
            self.processes,
            self.kills,
            self.instances,
            self.notifications,
            self.call_reports,
            self.outcome_replies,
            self.wifi_relayed,
            self.wifi_blackholed
        )?;
        writeln!(
            f,
            "  server: logins {}, offline {}, replaced sessions the phone had given up {}, max sessions of the device at once {}",
            self.server_logins, self.server_offline, self.replaced_dead, self.max_server_sessions
        )?;
        let m = self.max_counters;
        writeln!(
            f,
            "  sdk max: instances {} sessions {} tasks {} sockets {} connected {}",
            m.instances, m.sessions, m.tasks, m.sockets, m.connected
        )?;
        for (what, took, limit) in &self.offline {
            writeln!(
                f,
                "  offline on server after {what}: {} ms (limit {} ms)",
                took.as_millis(),
                limit.as_millis()
            )?;
        }
        for (took, limit) in &self.back_after {
            writeln!(
                f,
                "  back after the outage: {} ms (limit {} ms)",
                took.as_millis(),
                limit.as_millis()
            )?;
        }
        for r in &self.repeats {
            writeln!(
                f,
                "  repeat: {} iterations ({} warm-up), {} lifecycle events, {} server sessions, {:.1} s wall, {:.1} simulated days",
                r.iterations,
                r.warmup,
                r.lifecycle_events,
                r.server_sessions,
                r.wall.as_secs_f64(),
                r.simulated.as_secs_f64() / 86_400.0
            )?;
            writeln!(
                f,
                "    after warm-up: fds {} rss {:.1} MiB threads {} {:?}",
                r.baseline.fds,
                mib(r.baseline.rss_kib),
                r.baseline.threads,
                r.baseline.counters
            )?;
            writeln!(
                f,
                "    at the end:    fds {} rss {:.1} MiB threads {} {:?}",
                r.end.fds,
                mib(r.end.rss_kib),
                r.end.threads,
                r.end.counters
            )?;
            writeln!(
                f,
                "    max sampled: fds {} rss {:.1} MiB",
                r.max_fds,
                mib(r.max_rss_kib)
            )?;
        }
        writeln!(
            f,
            "  process: fds {} -> {}, rss {:.1} -> {:.1} MiB, threads {} -> {}",
            self.start.fds,
            self.end.fds,
            mib(self.start.rss_kib),
            mib(self.end.rss_kib),
            self.start.threads,
            self.end.threads
        )?;
        for failure in &self.failures {
            writeln!(f, "  FAILED: {failure}")?;
        }
        Ok(())
    }
}

fn measure(phone: Option<&Phone>) -> Resources {
    Resources {
        fds: resources::open_fds().unwrap_or(0),
        rss_kib: resources::rss_kib().unwrap_or(0),
        threads: resources::threads().unwrap_or(0),
        counters: phone
            .and_then(|p| p.process.as_ref())
            .map(|p| p.registry.counters())
            .unwrap_or_default(),
    }
}

/// Poll `f` until it is true or `timeout` passes: only for the OS's figures (open fds), which
/// announce nothing.
async fn poll_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the senders did, to check the phone's side against.
#[derive(Default)]
struct Sent {
    messages: HashMap<String, (String, String)>,
    calls: HashMap<String, (PlaceCallRequest, String, i64)>,
    /// `CancelCallResponse.cancels_sent` per call.
    cancels: HashMap<String, u32>,
}

struct Run<'a> {
    scenario: &'a Scenario,
    site: Site,
    phone: Phone,
    sent: Sent,
    report: Report,
    /// Lines printed as steps run (off inside repeats).
    verbose: bool,
    /// When the last outage ended, by the phone's clock.
    outage_ended: Option<Instant>,
}

/// Options of a run.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Print each step (outside repeats) as it runs.
    pub verbose: bool,
}

/// Run `scenario` against a push-server started for it. Setup errors are failures too.
pub async fn run(scenario: &Scenario, options: RunOptions) -> Report {
    let started = Instant::now();
    let mut report = Report {
        name: scenario.name.clone(),
        start: measure(None),
        ..Report::default()
    };
    match setup(scenario).await {
        Err(e) => report.failures.push(format!("setup: {e:#}")),
        Ok((site, phone)) => {
            let mut run = Run {
                scenario,
                site,
                phone,
                sent: Sent::default(),
                report,
                verbose: options.verbose,
                outage_ended: None,
            };
            run.steps(&scenario.steps, true).await;
            run.teardown().await;
            let Run {
                site,
                phone,
                report: r,
                ..
            } = run;
            // Phone off, server stopped: everything the run opened is closed from here on.
            drop(phone);
            drop(site);
            report = r;
            settle_process(&mut report, scenario.checks.fd_tolerance).await;
        }
    }
    report.wall = started.elapsed();
    report
}

async fn setup(scenario: &Scenario) -> anyhow::Result<(Site, Phone)> {
    let wifi = Wifi::bind().await?;
    let held = Arc::new(HeldSessions::default());
    let site = Site::start(
        &scenario.server,
        &scenario.phone.site_ssids,
        wifi.addr,
        held.clone(),
    )
    .await?;
    wifi.set_upstream(site.server.device_addr);
    // The container app enrolls and saves one push manager per `managers` entry, each with
    // `providerConfiguration`; iOS hands that dictionary to the provider unchanged.
    let enrollment = site.enroll(&scenario.phone.device_id).await?;
    let dict = enrollment
        .get("providerConfiguration")
        .and_then(|v| v.as_dictionary())
        .ok_or_else(|| anyhow::anyhow!("enrollment has no providerConfiguration dictionary"))?;
    let configuration = ProviderConfiguration::from_plist(dict)?;
    anyhow::ensure!(
        configuration.match_ssids == scenario.phone.site_ssids,
        "enrollment changed the SSIDs: {:?} instead of {:?}",
        configuration.match_ssids,
        scenario.phone.site_ssids
    );
    let mut match_ssids = Vec::new();
    for manager in enrollment
        .get("managers")
        .and_then(|v| v.as_array())
        .ok_or_else(|| anyhow::anyhow!("enrollment has no managers"))?
    {
        let ssids = manager
            .as_dictionary()
            .and_then(|m| m.get("matchSSIDs"))
            .and_then(|v| v.as_array())
            .ok_or_else(|| anyhow::anyhow!("a manager without matchSSIDs"))?;
        anyhow::ensure!(
            ssids.len() <= 10,
            "a manager with {} SSIDs (iOS takes 10)",
            ssids.len()
        );
        match_ssids.extend(ssids.iter().filter_map(|s| s.as_string().map(str::to_owned)));
    }
    let phone = Phone::new(
        wifi,
        configuration,
        match_ssids,
        scenario.phone.voip_token.clone(),
        scenario.phone.path_monitor,
        scenario.phone.clock_skew_ms,
        held,
    );
    Ok((site, phone))
}

/// After teardown: everything the run opened must be closed again.
async fn settle_process(report: &mut Report, tolerance: usize) {
    let start = report.start.fds;
    let settled = poll_until(STEP_TIMEOUT, || {
        resources::open_fds().unwrap_or(0) <= start + tolerance
    })
    .await;
    report.end = measure(None);
    if !settled {
        report.failures.push(format!(
            "file descriptors did not return to the start: {} at the start, {} after teardown (tolerance {tolerance})",
            start, report.end.fds
        ));
    }
}

impl Run<'_> {
    async fn steps(&mut self, steps: &[Step], top: bool) -> bool {
        for step in steps {
            if !self.report.failures.is_empty() {
                return false;
            }
            self.report.steps += 1;
            if step.is_lifecycle() {
                self.report.lifecycle_events += 1;
            }
            if self.verbose && top {
                println!("  - {step}");
            }
            let result = Box::pin(self.step(step)).await;
            if let Err(e) = result {
                self.report.failures.push(format!("step `{step}`: {e}"));
                return false;
            }
            self.check_invariants(step).await;
        }
        self.report.failures.is_empty()
    }

    async fn step(&mut self, step: &Step) -> Result<(), String> {
        let phone = &mut self.phone;
        match step {
            Step::Join(ssid) => phone.join(ssid),
            Step::Leave(_) => {
                phone.leave_network();
                phone.stop(NEProviderStopReason::NoNetworkAvailable).await?;
            }
            Step::LeaveWithoutStop(_) => phone.leave_network(),
            Step::Start(_) => phone.start().await?,
            Step::Stop(reason) => phone.stop(*reason).await?,
            Step::Timer(n) => phone.timer(*n),
            Step::Advance(d) => {
                let moved = phone.advance(d.0, |_| false).await?;
                self.site.advance_clock(moved).await?;
            }
            Step::Outage(true) => {
                // Before the cut: the server may notice it before this thread runs again.
                phone.cut_at = Some(Instant::now());
                phone.wifi.set_server_reachable(false);
                self.outage_ended = None;
                // Both ends close at once: the SDK has seen it before time passes.
                if let Some(i) = phone.current() {
                    i.wait_state(STEP_TIMEOUT, |s| !matches!(s, State::Connected { .. }))
                        .await?;
                }
            }
            Step::Outage(false) => {
                phone.wifi.set_server_reachable(true);
                self.outage_ended = Some(phone.clock.now());
            }
            Step::ExpectBackWithin(d) => self.expect_back_within(d.0).await?,
            Step::ExpectNotShown(id) => {
                if phone.shared.with(|log| log.ever_shown(id)) {
                    return Err(format!("{id} was shown"));
                }
            }
            Step::ExpectCallState(e) => self.expect_call_state(&e.id, &e.state).await?,
            Step::ExpectMessageState(e) => self.expect_message_state(&e.id, &e.state).await?,
            Step::Kill(_) => phone.kill().await?,
            Step::Relaunch(_) => {
                if phone.process.is_some() {
                    return Err("relaunch: the extension is still running".into());
                }
                phone.start().await?;
            }
            Step::NewInstanceWithoutStop(n) => phone.new_instance_without_stop(n.release_old()).await?,
            Step::StopRacingStart(r) => phone.stop_racing_start(r.reason(), r.new_instance()).await?,
            Step::Send(m) => {
                let r = self
                    .site
                    .api
                    .sender()
                    .send_message(SendMessageRequest {
                        target: Some(to(&self.scenario.phone.device_id)),
                        title: m.title.clone(),
                        body: m.body.clone(),
                        message_id: m.id.clone(),
                        priority: if m.high_priority {
                            Priority::High
                        } else {
                            Priority::Normal
                        } as i32,
                        ttl_seconds: m
                            .ttl
                            .map_or(0, |t| u32::try_from(t.0.as_secs()).unwrap_or(u32::MAX)),
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("SendMessage: {e}"))?
                    .into_inner();
                if r.recipients.len() != 1 || r.recipients[0].state() != DeliveryState::Accepted {
                    return Err(format!("not accepted: {r:?}"));
                }
                self.sent
                    .messages
                    .insert(m.id.clone(), (m.title.clone(), m.body.clone()));
            }
            Step::Call(c) => {
                let request = PlaceCallRequest {
                    call_id: c.id.clone(),
                    target: Some(to(&self.scenario.phone.device_id)),
                    caller_name: c.caller_name.clone(),
                    caller_handle: c.caller_handle.clone(),
                    video: c.video,
                    ring_timeout_seconds: c.ring_seconds,
                    escalation: Vec::new(),
                };
                let r = self
                    .site
                    .api
                    .sender()
                    .place_call(request.clone())
                    .await
                    .map_err(|e| format!("PlaceCall: {e}"))?
                    .into_inner();
                self.sent
                    .calls
                    .insert(c.id.clone(), (request, r.call_uuid, r.ring_deadline_ms));
            }
            Step::CancelCall(c) => {
                let reason = match c.reason() {
                    "callerCancelled" => CancelReason::CallerCancelled,
                    "answeredElsewhere" => CancelReason::AnsweredElsewhere,
                    "declinedElsewhere" => CancelReason::DeclinedElsewhere,
                    "missed" => CancelReason::Missed,
                    "escalated" => CancelReason::Escalated,
                    other => return Err(format!("unknown cancel reason {other:?}")),
                };
                let r = self
                    .site
                    .api
                    .sender()
                    .cancel_call(CancelCallRequest {
                        call_id: c.id().into(),
                        reason: reason as i32,
                    })
                    .await
                    .map_err(|e| format!("CancelCall: {e}"))?
                    .into_inner();
                self.sent.cancels.insert(c.id().to_owned(), r.cancels_sent);
            }
            Step::AnswerCall(id) => phone.user_acted(id, CallOutcome::Answered)?,
            Step::DeclineCall(id) => phone.user_acted(id, CallOutcome::Declined)?,
            Step::HangUpCall(id) => phone.user_acted(id, CallOutcome::Ended)?,
            Step::LetCallRingOut(id) => phone.user_acted(id, CallOutcome::Missed)?,
            Step::ExpectOutcomeReplied(o) => self.expect_outcome_replied(o).await?,
            Step::ExpectPendingOutcomes(n) => self.expect_pending_outcomes(*n).await?,
            Step::ExpectCallEnded(c) => self.expect_call_ended(c).await?,
            Step::ExpectMissedCallNotification(id) => {
                let note = format!("missed-call:{id}");
                self.expect_notification(&NotificationExpectation::Id(note))
                    .await?
            }
            Step::ExpectConnected(_) => self.expect_connected().await?,
            Step::ExpectOfflineOnServer(o) => self.expect_offline(o).await?,
            Step::ExpectNotification(n) => self.expect_notification(n).await?,
            Step::ExpectIncomingCall(c) => self.expect_call(c).await?,
            Step::ExpectCallCancelled(c) => self.expect_cancel(c).await?,
            Step::ExpectCallFellBackToApns(id) => self.expect_apns(id).await?,
            Step::ExpectVoipPushRings(id) => self.expect_voip_rings(id).await?,
            Step::Repeat(r) => self.repeat(r).await?,
        }
        Ok(())
    }

    /// Time passes (stepped) from the outage's end until the phone is connected, at most
    /// `limit`; then the server must show the session.
    async fn expect_back_within(&mut self, limit: Duration) -> Result<(), String> {
        let Some(ended) = self.outage_ended else {
            return Err("no outage ended before (`outage = false`)".into());
        };
        let left = (ended + limit).saturating_duration_since(self.phone.clock.now());
        let moved = self.phone.advance(left, |s| s.connected > 0).await?;
        self.site.advance_clock(moved).await?;
        let took = self.phone.clock.now().saturating_duration_since(ended);
        let connected = self
            .phone
            .current()
            .is_some_and(|i| matches!(i.provider.state(), State::Connected { .. }));
        if !connected {
            let state = self.phone.current().map(|i| i.provider.state());
            return Err(format!(
                "not connected {} ms after the outage ended (limit {} ms): {state:?}",
                took.as_millis(),
                limit.as_millis()
            ));
        }
        self.report.back_after.push((took, limit));
        self.expect_connected().await
    }

    /// Watch the call to its end (every callee final), then its status.
    async fn expect_call_state(&mut self, id: &str, want: &str) -> Result<(), String> {
        drain(self.watch_call(id).await?).await?;
        let status = self.call_status(id).await?;
        let got = call_state_name(status.state());
        if got != want {
            return Err(format!("call {id} is {got}, not {want}: {status:?}"));
        }
        Ok(())
    }

    async fn watch_call(&self, id: &str) -> Result<tonic::Streaming<DeliveryUpdate>, String> {
        let r = self
            .site
            .api
            .sender()
            .watch_call(WatchCallRequest { call_id: id.into() })
            .await;
        r.map(tonic::Response::into_inner)
            .map_err(|e| format!("WatchCall: {e}"))
    }

    async fn call_status(&self, id: &str) -> Result<CallStatus, String> {
        let r = self
            .site
            .api
            .sender()
            .get_call_status(WatchCallRequest { call_id: id.into() })
            .await;
        r.map(tonic::Response::into_inner)
            .map_err(|e| format!("GetCallStatus: {e}"))
    }

    /// Watch the message to its end; the device's final state.
    async fn expect_message_state(&mut self, id: &str, want: &str) -> Result<(), String> {
        let stream = self
            .site
            .api
            .sender()
            .watch_message(GetMessageStatusRequest {
                message_id: id.into(),
            })
            .await
            .map_err(|e| format!("WatchMessage: {e}"))?
            .into_inner();
        let updates = drain(stream).await?;
        let device = &self.scenario.phone.device_id;
        let last = updates.iter().rev().find(|u| &u.device_id == device);
        let got = last.map_or("none", |u| delivery_state_name(u.state()));
        if got != want {
            return Err(format!(
                "message {id} is {got} for {device}, not {want}: {updates:?}"
            ));
        }
        Ok(())
    }

    async fn expect_connected(&mut self) -> Result<(), String> {
        let Some(instance) = self.phone.current() else {
            return Err("no provider instance".into());
        };
        let sid = instance.connected(STEP_TIMEOUT).await?;
        let device = self.scenario.phone.device_id.clone();
        let online = self
            .site
            .presence
            .wait(STEP_TIMEOUT, |log| log.online.get(&device) == Some(&sid))
            .await;
        if !online {
            let now = self.site.presence.with(|log| log.online.get(&device).cloned());
            return Err(format!(
                "the phone is connected with server session {sid}, the server shows {now:?}"
            ));
        }
        Ok(())
    }

    async fn expect_offline(&mut self, o: &OfflineExpectation) -> Result<(), String> {
        let Some(cut) = self.phone.cut_at else {
            return Err("nothing cut the phone off before".into());
        };
        let device = self.scenario.phone.device_id.clone();
        let limit = match o.within {
            Within::Heartbeat => {
                self.site.settings.heartbeat_deadline()
                    + Duration::from_millis(self.scenario.checks.deadline_slack_ms)
            }
            Within::Duration(d) => d.0,
        };
        // The device is offline on the server, and went offline after the cut.
        let went = |log: &crate::site::PresenceLog| -> Option<(String, Instant)> {
            if log.online.contains_key(&device) {
                return None;
            }
            log.offline
                .iter()
                .rev()
                .find(|(d, ..)| *d == device)
                .filter(|(.., at)| *at >= cut)
                .map(|(_, _, reason, at)| (reason.clone(), *at))
        };
        let wait = STEP_TIMEOUT.max(limit + Duration::from_secs(1));
        self.site.presence.wait(wait, |log| went(log).is_some()).await;
        let Some((reason, at)) = self.site.presence.with(went) else {
            return Err(format!(
                "the server still shows the device online {wait:?} after it was cut off"
            ));
        };
        let took = at.saturating_duration_since(cut);
        self.report
            .offline
            .push((format!("cut-off ({})", reason), took, limit));
        if took > limit {
            return Err(format!(
                "offline after {} ms, later than {} ms ({})",
                took.as_millis(),
                limit.as_millis(),
                o.within
            ));
        }
        if let Some(expected) = &o.reason
            && !reason.contains(expected.as_str())
        {
            return Err(format!("offline reason {reason:?} does not contain {expected:?}"));
        }
        Ok(())
    }

    async fn expect_notification(&mut self, n: &NotificationExpectation) -> Result<(), String> {
        let id = n.id().to_owned();
        let shown = self
            .phone
            .shared
            .wait(STEP_TIMEOUT, |log| {
                log.notifications.iter().any(|(_, x)| x.id == id)
            })
            .await;
        if !shown {
            return Err(format!("message {id} not shown within {STEP_TIMEOUT:?}"));
        }
        let note = self
            .phone
            .shared
            .with(|log| log.notifications.iter().find(|(_, x)| x.id == id).cloned())
            .map(|(_, n)| n)
            .expect("shown");
        let (title, body) = match n {
            NotificationExpectation::Options { title, body, .. } => (title.clone(), body.clone()),
            NotificationExpectation::Id(_) => (None, None),
        };
        // Expected once: forget it, so a long run's bookkeeping does not grow.
        let sent = self.sent.messages.remove(&id);
        let want_title = title.or(sent.as_ref().map(|s| s.0.clone()));
        let want_body = body.or(sent.as_ref().map(|s| s.1.clone()));
        if want_title.is_some_and(|t| t != note.title) || want_body.is_some_and(|b| b != note.body) {
            return Err(format!(
                "message {id} shown as {:?} / {:?}",
                note.title, note.body
            ));
        }
        if note.seq == 0 {
            return Err(format!("message {id} without a sequence number"));
        }
        Ok(())
    }

    async fn reported(&self, kind: &'static str, id: &str) -> Result<plist::Dictionary, String> {
        let find = |log: &crate::phone::PhoneLog| {
            log.calls
                .iter()
                .find(|(_, d)| {
                    d.get(user_info::KIND).and_then(|v| v.as_string()) == Some(kind)
                        && d.get(user_info::CALL_ID).and_then(|v| v.as_string()) == Some(id)
                })
                .map(|(_, d)| d.clone())
        };
        self.phone
            .shared
            .wait(STEP_TIMEOUT, |log| find(log).is_some())
            .await;
        self.phone.shared.with(find).ok_or_else(|| {
            format!("no reportIncomingCall with kind {kind:?} for {id} within {STEP_TIMEOUT:?}")
        })
    }

    async fn expect_call(&mut self, c: &CallExpectation) -> Result<(), String> {
        let d = self.reported(user_info::KIND_CALL, &c.id).await?;
        let Some((placed, uuid, deadline)) = self.sent.calls.get(&c.id).cloned() else {
            return Err(format!("call {} was not placed by this scenario", c.id));
        };
        let mut keys: Vec<&str> = d.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let documented = [
            user_info::CALL_ID,
            user_info::CALL_UUID,
            user_info::CALLER_HANDLE,
            user_info::CALLER_NAME,
            user_info::KIND,
            user_info::RING_DEADLINE_MS,
            user_info::RING_REMAINING_MS,
            user_info::SEQ,
            user_info::VIDEO,
        ];
        let mut problems = Vec::new();
        if keys != documented {
            problems.push(format!("keys {keys:?}"));
        }
        let s = |k: &str| d.get(k).and_then(|v| v.as_string()).map(str::to_owned);
        let i = |k: &str| d.get(k).and_then(|v| v.as_signed_integer());
        let want_name = c.caller_name.clone().unwrap_or(placed.caller_name);
        let want_handle = c.caller_handle.clone().unwrap_or(placed.caller_handle);
        let want_video = c.video.unwrap_or(placed.video);
        if s(user_info::CALL_UUID) != Some(uuid.clone()) {
            problems.push(format!(
                "callUUID {:?}, the server said {uuid}",
                s(user_info::CALL_UUID)
            ));
        }
        if s(user_info::CALLER_NAME) != Some(want_name.clone()) {
            problems.push(format!(
                "callerName {:?}, expected {want_name:?}",
                s(user_info::CALLER_NAME)
            ));
        }
        if s(user_info::CALLER_HANDLE) != Some(want_handle.clone()) {
            problems.push(format!(
                "callerHandle {:?}, expected {want_handle:?}",
                s(user_info::CALLER_HANDLE)
            ));
        }
        if d.get(user_info::VIDEO).and_then(|v| v.as_boolean()) != Some(want_video) {
            problems.push(format!(
                "video {:?}, expected {want_video}",
                d.get(user_info::VIDEO)
            ));
        }
        if i(user_info::RING_DEADLINE_MS) != Some(deadline) {
            problems.push(format!(
                "ringDeadlineMs {:?}, the server said {deadline}",
                i(user_info::RING_DEADLINE_MS)
            ));
        }
        // The SDK reads the server's clock from the hello, so it may lag by the latency: allow
        // a second over the ring time.
        let ring_ms = i64::from(placed.ring_timeout_seconds) * 1000 + 1000;
        if !i(user_info::RING_REMAINING_MS).is_some_and(|r| r > 0 && r <= ring_ms) {
            problems.push(format!(
                "ringRemainingMs {:?} not in 1..={ring_ms}",
                i(user_info::RING_REMAINING_MS)
            ));
        }
        if i(user_info::SEQ).is_none_or(|q| q <= 0) {
            problems.push(format!("seq {:?}", i(user_info::SEQ)));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(format!("call {} dictionary: {}", c.id, problems.join("; ")))
        }
    }

    async fn expect_cancel(&mut self, c: &CancelExpectation) -> Result<(), String> {
        let d = self.reported(user_info::KIND_CANCEL, c.id()).await.map_err(|e| {
            let sent = self.sent.cancels.get(c.id());
            format!("{e} (the server said it sent {sent:?} cancels)")
        })?;
        let uuid = self.sent.calls.get(c.id()).map(|x| x.1.clone());
        let got_uuid = d
            .get(user_info::CALL_UUID)
            .and_then(|v| v.as_string())
            .map(str::to_owned);
        if got_uuid != uuid {
            return Err(format!(
                "cancel of {}: callUUID {got_uuid:?}, placed {uuid:?}",
                c.id()
            ));
        }
        if let CancelExpectation::Options { reason, .. } = c {
            let got = d.get(user_info::REASON).and_then(|v| v.as_string());
            if got != Some(reason.as_str()) {
                return Err(format!(
                    "cancel of {}: reason {got:?}, expected {reason:?}",
                    c.id()
                ));
            }
        }
        Ok(())
    }

    async fn expect_outcome_replied(&mut self, o: &OutcomeExpectation) -> Result<(), String> {
        let replied = |log: &crate::phone::PhoneLog| {
            let told = log.outcome_replies.iter().any(|(_, r)| {
                r.call_id == o.id && r.outcome == o.outcome && o.result.is_none_or(|x| x == r.result)
            });
            let deleted = !PendingCallOutcomes::parse(&log.app_group_outcomes)
                .reports()
                .any(|r| r.call_id == o.id && r.outcome == o.outcome);
            told && deleted
        };
        if self.phone.shared.wait(STEP_TIMEOUT, replied).await {
            return Ok(());
        }
        let (replies, pending) = self.phone.shared.with(|log| {
            let replies: Vec<String> = log
                .outcome_replies
                .iter()
                .map(|(n, r)| {
                    format!(
                        "{} {:?} {} (instance {n})",
                        r.call_id,
                        r.outcome,
                        result_name(r.result)
                    )
                })
                .collect();
            (replies, PendingCallOutcomes::parse(&log.app_group_outcomes).len())
        });
        Err(format!(
            "no reply to the {:?} report of {} deleted from the app group within {STEP_TIMEOUT:?}: replies {replies:?}, {pending} pending",
            o.outcome, o.id
        ))
    }

    async fn expect_pending_outcomes(&mut self, n: usize) -> Result<(), String> {
        let count = |log: &crate::phone::PhoneLog| PendingCallOutcomes::parse(&log.app_group_outcomes).len();
        if self.phone.shared.wait(STEP_TIMEOUT, |log| count(log) == n).await {
            return Ok(());
        }
        Err(format!(
            "the app group holds {} pending call outcomes, not {n}",
            self.phone.shared.with(count)
        ))
    }

    async fn expect_call_ended(&mut self, c: &CancelExpectation) -> Result<(), String> {
        let d = self.reported(user_info::KIND_END, c.id()).await?;
        if let CancelExpectation::Options { reason, .. } = c {
            let got = d.get(user_info::REASON).and_then(|v| v.as_string());
            if got != Some(reason.as_str()) {
                return Err(format!("end of {}: reason {got:?}, expected {reason:?}", c.id()));
            }
        }
        Ok(())
    }

    async fn expect_apns(&mut self, id: &str) -> Result<(), String> {
        let mut stream = self.watch_call(id).await?;
        let mut seen = Vec::new();
        let found = tokio::time::timeout(STEP_TIMEOUT, async {
            while let Ok(Some(u)) = stream.message().await {
                let apns = u.path == "apns" && u.state() == DeliveryState::Delivered;
                seen.push(format!("{:?}/{}", u.state(), u.path));
                if apns {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false);
        if !found {
            return Err(format!(
                "WatchCall never reported delivery through APNs: {seen:?}"
            ));
        }
        self.site.wait_apns_request(id, STEP_TIMEOUT).await.map(|_| ())
    }

    /// What the app's PushKit handler does with the call's VoIP push, on the phone's clock.
    async fn expect_voip_rings(&mut self, id: &str) -> Result<(), String> {
        self.expect_apns(id).await?;
        let Some((placed, uuid, deadline)) = self.sent.calls.get(id).cloned() else {
            return Err(format!("call {id} was not placed by this scenario"));
        };
        let status = self.call_status(id).await?;
        // The `lpush` dictionary the bridge builds from the invite (see `apns-bridge`).
        let payload = voip::VoipPayload {
            version: voip::PAYLOAD_VERSION,
            call_id: id.into(),
            call_uuid: uuid,
            caller_name: placed.caller_name,
            caller_handle: placed.caller_handle,
            video: placed.video,
            created_at_ms: status.placed_at_ms,
            ring_deadline_ms: deadline,
        };
        let known = voip::KnownCall {
            reported: self.phone.shared.with(|log| log.ever_shown(id)),
            cancelled: false,
        };
        let now_ms = self.phone.wall_ms();
        let ring_ms = i64::from(placed.ring_timeout_seconds) * 1000;
        match voip::decide(&payload, None, now_ms, known) {
            voip::VoipAction::Report { ring_for_ms } if ring_for_ms > 0 && ring_for_ms <= ring_ms => Ok(()),
            action => Err(format!(
                "the PushKit handler decided {action:?} at phone time {now_ms} for a call placed at {} ringing until {deadline}",
                status.placed_at_ms
            )),
        }
    }

    async fn repeat(&mut self, r: &Repeat) -> Result<(), String> {
        let started = Instant::now();
        let sim_start = self.phone.stats.simulated;
        let logins_start = self.site.presence.with(|l| l.logins);
        let events_start = self.report.lifecycle_events;
        let mut fig = RepeatFigures {
            warmup: r.warmup,
            ..RepeatFigures::default()
        };
        for i in 0..r.times {
            if i == r.warmup {
                self.settle().await?;
                fig.baseline = measure(Some(&self.phone));
            }
            let steps: Vec<Step> = r.steps.iter().map(|s| s.for_iteration(i)).collect();
            if !Box::pin(self.steps(&steps, false)).await {
                fig.iterations = i;
                self.report.repeats.push(fig);
                return Err(format!("iteration {i} failed"));
            }
            fig.iterations = i + 1;
            fig.max_fds = fig.max_fds.max(resources::open_fds().unwrap_or(0));
            fig.max_rss_kib = fig.max_rss_kib.max(resources::rss_kib().unwrap_or(0));
        }
        if r.warmup >= r.times {
            self.settle().await?;
            fig.baseline = measure(Some(&self.phone));
        }
        self.settle().await?;
        fig.end = measure(Some(&self.phone));
        fig.wall = started.elapsed();
        fig.simulated = self.phone.stats.simulated - sim_start;
        fig.server_sessions = self.site.presence.with(|l| l.logins) - logins_start;
        fig.lifecycle_events = self.report.lifecycle_events - events_start;
        let (b, e) = (fig.baseline, fig.end);
        let mut problems = Vec::new();
        if e.fds > b.fds + self.scenario.checks.fd_tolerance {
            problems.push(format!("open fds grew from {} to {}", b.fds, e.fds));
        }
        let rss_max = self.scenario.checks.rss_growth_max_kib;
        if e.rss_kib > b.rss_kib + rss_max {
            problems.push(format!(
                "resident memory grew from {} KiB to {} KiB (more than {rss_max} KiB)",
                b.rss_kib, e.rss_kib
            ));
        }
        if e.threads > b.threads {
            problems.push(format!("threads grew from {} to {}", b.threads, e.threads));
        }
        let (bc, ec) = (b.counters, e.counters);
        // Instances are those iOS holds (checked after every step); nothing else may grow.
        if ec.sessions > bc.sessions
            || ec.tasks > bc.tasks
            || ec.sockets > bc.sockets
            || ec.connected > bc.connected
        {
            problems.push(format!("SDK counters grew from {bc:?} to {ec:?}"));
        }
        self.report.repeats.push(fig);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Wait until the phone's and the relay's state is steady: no black-holed connection left
    /// (the server ended its side by its heartbeat deadline, the phone its own), the process's
    /// counters settled.
    async fn settle(&mut self) -> Result<(), String> {
        let deadline = self.site.settings.heartbeat_deadline() + STEP_TIMEOUT;
        let wifi = &self.phone.wifi;
        if !wifi.blackholes_closed(deadline).await {
            return Err(format!(
                "black-holed connections still open after {deadline:?}: {:?}",
                wifi.stats()
            ));
        }
        self.settled_counters().await
    }

    /// The process's SDK counters, once settled: every instance iOS holds and nothing else;
    /// at most one session, task, socket and server-accepted connection (one device).
    async fn settled_counters(&self) -> Result<(), String> {
        let Some(p) = &self.phone.process else {
            return Ok(());
        };
        let held = p.held().count();
        p.registry
            .wait_for_counters(STEP_TIMEOUT, |s| {
                s.instances == held && s.sessions <= 1 && s.tasks <= 1 && s.sockets <= 1 && s.connected <= 1
            })
            .await
            .map(|_| ())
            .map_err(|s| format!("SDK counters did not settle: {s:?} with {held} instances held by iOS"))
    }

    async fn check_invariants(&mut self, step: &Step) {
        let mut failures = Vec::new();
        if let Err(e) = self.settled_counters().await {
            failures.push(e);
        }
        // Instances iOS keeps after a newer one started hold no session of their own.
        if let Some(p) = &self.phone.process {
            for i in &p.abandoned {
                let state = i.provider.state();
                if !matches!(state, nepush_provider::State::Stopped(_)) {
                    failures.push(format!("older instance {} still active: {state:?}", i.n));
                }
            }
        }
        let max = self.phone.max.get();
        if max.connected > 1 || max.sockets > 1 || max.sessions > 1 {
            failures.push(format!(
                "the phone had more than one session, socket or connection at once: {max:?}"
            ));
        }
        self.phone
            .shared
            .with(|log| failures.extend(log.violations.iter().cloned()));
        self.site.presence.with(|log| {
            failures.extend(log.replaced_live.iter().cloned());
            if let Some(b) = &log.broken {
                failures.push(b.clone());
            }
        });
        if !failures.is_empty() {
            failures.dedup();
            for f in failures {
                if !self.report.failures.contains(&f) {
                    self.report.failures.push(format!("after `{step}`: {f}"));
                }
            }
        }
    }

    async fn teardown(&mut self) {
        // The phone is switched off: the extension dies with it.
        if self.phone.process.is_some()
            && let Err(e) = self.phone.kill().await
        {
            self.report.failures.push(format!("teardown: {e}"));
        }
        let stats = self.phone.stats;
        let wifi = self.phone.wifi.stats();
        let log = self
            .site
            .presence
            .with(|l| (l.logins, l.offline_count, l.replaced_dead, l.max_sessions));
        let r = &mut self.report;
        r.simulated = stats.simulated;
        r.clock_stops = stats.clock_stops;
        r.timer_events = stats.timer_events;
        r.processes = stats.processes;
        r.kills = stats.kills;
        r.instances = stats.instances;
        (r.notifications, r.call_reports, r.outcome_replies) = self
            .phone
            .shared
            .with(|l| (l.notifications_shown, l.calls.len(), l.outcome_replies.len()));
        (
            r.server_logins,
            r.server_offline,
            r.replaced_dead,
            r.max_server_sessions,
        ) = log;
        r.max_counters = self.phone.max.get();
        r.wifi_relayed = wifi.relayed;
        r.wifi_blackholed = wifi.blackholed;
    }
}

/// Every update of a watch, to its end (the server ends it once everything is final).
async fn drain(mut stream: tonic::Streaming<DeliveryUpdate>) -> Result<Vec<DeliveryUpdate>, String> {
    let mut updates = Vec::new();
    let read = async {
        while let Some(u) = stream.message().await.map_err(|e| e.to_string())? {
            updates.push(u);
        }
        Ok::<_, String>(())
    };
    match tokio::time::timeout(STEP_TIMEOUT, read).await {
        Ok(r) => r.map(|()| updates),
        Err(_) => Err(format!("not final within {STEP_TIMEOUT:?}: {updates:?}")),
    }
}

fn call_state_name(s: CallState) -> &'static str {
    match s {
        CallState::Unspecified => "unspecified",
        CallState::Ringing => "ringing",
        CallState::Answered => "answered",
        CallState::Declined => "declined",
        CallState::Missed => "missed",
        CallState::Cancelled => "cancelled",
    }
}

fn delivery_state_name(s: DeliveryState) -> &'static str {
    match s {
        DeliveryState::Unspecified => "unspecified",
        DeliveryState::Accepted => "accepted",
        DeliveryState::Delivered => "delivered",
        DeliveryState::Acked => "acked",
        DeliveryState::Expired => "expired",
        DeliveryState::Undeliverable => "undeliverable",
        DeliveryState::Superseded => "superseded",
        DeliveryState::Cancelled => "cancelled",
        DeliveryState::Answered => "answered",
        DeliveryState::Declined => "declined",
        DeliveryState::Missed => "missed",
    }
}

fn to(device: &str) -> Target {
    Target {
        kind: Some(target::Kind::DeviceId(device.into())),
    }
}

//! The simulated phone: its Wi-Fi, its app group, its extension process and the provider
//! instances iOS holds in it.
//!
//! A process is its own tokio runtime and its own `mobile_sdk::Registry`, as the real extension
//! has one SDK per process. A kill shuts the runtime down in the background: its tasks are
//! dropped and their sockets closed without a goodbye, as the kernel closes a killed process's
//! sockets. A relaunch is a new runtime and registry, and new instances read the last seen
//! sequence and its epoch from the app group, which survives.
//!
//! The container app's side of calls is here too: when the user answers, declines, hangs up
//! or lets a call ring out, the app appends the report to the app group's pending-outcomes file
//! and posts a Darwin notification; a running instance hands the file to its provider, a new
//! instance does so when it is created, and each reply deletes its report from the file (the
//! same file format and calls as the Swift files).

use std::{
    collections::{HashSet, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use mobile_sdk::{Clock, Registry, Snapshot, clock::Settled};
use nepush_provider::{
    CallOutcome, LastSeen, LocalNotification, NEProviderStopReason, NetworkEvent, OutcomeReply,
    OutcomeReport, PendingCallOutcomes, Provider, ProviderConfiguration, ProviderHost, State, StopCause,
    user_info,
};
use tokio::{sync::watch, task::JoinHandle};

use crate::{site::HeldSessions, time, wifi::Wifi};

/// Notifications kept in the log.
pub const RECENT: usize = 256;

/// Longest wait for anything the host waits on.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Most stops of one `advance` (a phone retrying every 250 ms for a week would need more: a
/// scenario that gets here is stuck, not slow).
const MAX_STOPS: u32 = 100_000;

/// What the phone's app saw, and what went wrong on the phone's side.
#[derive(Debug, Default)]
pub struct PhoneLog {
    /// Notifications shown.
    pub notifications_shown: usize,
    /// The latest notifications shown (at most [`RECENT`]): (instance, notification). Bounded,
    /// so a long run's memory figures measure the phone, not this log; every id shown is kept
    /// (in a set) for the exactly-once check.
    pub notifications: VecDeque<(u32, LocalNotification)>,
    /// `reportIncomingCall` dictionaries: (instance, userInfo).
    pub calls: Vec<(u32, plist::Dictionary)>,
    /// The app group's last seen sequence and its epoch, stored as one value.
    pub app_group_last_seen: LastSeen,
    /// The app group's pending call-outcomes file (its bytes; empty: no file).
    pub app_group_outcomes: Vec<u8>,
    /// Replies to call-outcome reports the instances were told: (instance, reply).
    pub outcome_replies: Vec<(u32, OutcomeReply)>,
    /// Every call outcome the app reported (call id, outcome).
    pub outcomes_made: HashSet<(String, CallOutcome)>,
    /// Broken invariants seen in callbacks.
    pub violations: Vec<String>,
    seen_messages: HashSet<String>,
    seen_calls: HashSet<(String, String)>,
}

impl PhoneLog {
    /// Whether a notification or an incoming call with this id was ever shown or reported.
    pub fn ever_shown(&self, id: &str) -> bool {
        self.seen_messages.contains(id)
            || self
                .seen_calls
                .iter()
                .any(|(kind, call)| kind == user_info::KIND_CALL && call == id)
    }
}

/// State shared with the instances' callbacks.
pub struct PhoneShared {
    log: Mutex<PhoneLog>,
    version: watch::Sender<u64>,
    held: Arc<HeldSessions>,
}

impl PhoneShared {
    /// Read the log.
    pub fn with<T>(&self, f: impl FnOnce(&PhoneLog) -> T) -> T {
        f(&self.log.lock().expect("poisoned"))
    }

    fn update(&self, f: impl FnOnce(&mut PhoneLog)) {
        f(&mut self.log.lock().expect("poisoned"));
        self.version.send_modify(|v| *v += 1);
    }

    /// Wait until `pred` holds on the log, at most `timeout`.
    pub async fn wait(&self, timeout: Duration, pred: impl Fn(&PhoneLog) -> bool) -> bool {
        let mut rx = self.version.subscribe();
        let wait = async {
            loop {
                if self.with(&pred) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

/// One instance's callbacks (what the Swift subclass does).
struct InstanceHost {
    n: u32,
    /// The last seen sequence and epoch it was created with (from the app group).
    created_with: LastSeen,
    shared: Arc<PhoneShared>,
    state: watch::Sender<State>,
}

impl ProviderHost for InstanceHost {
    fn report_incoming_call(&self, user_info: plist::Dictionary) {
        // iOS accepts property-list values only: the dictionary must survive serialisation.
        let mut xml = Vec::new();
        let round_trip = plist::to_writer_xml(&mut xml, &user_info)
            .map_err(|e| e.to_string())
            .and_then(|()| plist::Value::from_reader_xml(&xml[..]).map_err(|e| e.to_string()));
        let kind = text(&user_info, "kind");
        let call_id = text(&user_info, "callId");
        self.shared.update(|log| {
            match round_trip {
                Ok(v) if v.as_dictionary() == Some(&user_info) => {}
                Ok(_) => log.violations.push(format!(
                    "call dictionary {call_id}: changed through a plist round trip"
                )),
                Err(e) => log
                    .violations
                    .push(format!("call dictionary {call_id}: not a property list: {e}")),
            }
            // An end may come again when a report crossed its reply (harmless: the app ends a
            // call already ended); an invite or a cancel must come once.
            if kind != user_info::KIND_END && !log.seen_calls.insert((kind.clone(), call_id.clone())) {
                log.violations
                    .push(format!("{kind} {call_id} reported twice (instance {})", self.n));
            }
            log.calls.push((self.n, user_info));
        });
    }

    fn show_notification(&self, notification: LocalNotification) {
        self.shared.update(|log| {
            if !log.seen_messages.insert(notification.id.clone()) {
                let first = log
                    .notifications
                    .iter()
                    .find(|(_, n)| n.id == notification.id)
                    .map(|(i, n)| format!("instance {i}, seq {}", n.seq))
                    .unwrap_or_else(|| "an earlier instance".into());
                log.violations.push(format!(
                    "message {} shown twice: by {first}, again by instance {} (seq {}, created with last seen {:?})",
                    notification.id, self.n, notification.seq, self.created_with
                ));
            }
            log.notifications_shown += 1;
            if log.notifications.len() == RECENT {
                log.notifications.pop_front();
            }
            log.notifications.push_back((self.n, notification));
        });
    }

    fn persist_last_seen(&self, last_seen: LastSeen) {
        self.shared.update(|log| {
            let before = log.app_group_last_seen;
            // Within one store's numbering the floor only rises; a new epoch renumbers above
            // the floor the device had, so it never starts above it.
            let in_order = if last_seen.epoch == before.epoch {
                last_seen.seq >= before.seq
            } else {
                last_seen.seq <= before.seq
            };
            if !in_order || last_seen.epoch == 0 {
                log.violations.push(format!(
                    "instance {} persisted last seen {last_seen:?} after {before:?}: a relaunch would show \
                     pushes again or acknowledge pushes the app never saw",
                    self.n
                ));
            }
            log.app_group_last_seen = last_seen;
        });
    }

    fn call_outcome_replied(&self, reply: OutcomeReply) {
        self.shared.update(|log| {
            let key = (reply.call_id.clone(), reply.outcome);
            if !log.outcomes_made.contains(&key) {
                log.violations.push(format!(
                    "instance {} was told of a reply to {key:?}, which the app never reported",
                    self.n
                ));
            }
            // What the extension does: delete the report from the app group's file.
            let mut file = PendingCallOutcomes::parse(&log.app_group_outcomes);
            file.remove(&reply.call_id, reply.outcome);
            log.app_group_outcomes = file.to_bytes();
            log.outcome_replies.push((self.n, reply));
        });
    }

    fn state_changed(&self, state: &State) {
        let held = match state {
            State::Connected { session_id, .. } => Some(session_id.clone()),
            _ => None,
        };
        self.shared.held.set(self.n, held);
        if let State::Stopped(StopCause::Replaced) = state {
            self.shared.update(|log| {
                log.violations.push(format!(
                    "instance {}: the server replaced its live session (two sessions of the device at once)",
                    self.n
                ))
            });
        }
        self.state.send_replace(state.clone());
    }
}

fn text(d: &plist::Dictionary, key: &str) -> String {
    d.get(key).and_then(|v| v.as_string()).unwrap_or("?").to_owned()
}

/// A provider instance iOS holds.
pub struct Instance {
    /// Creation number (phone-wide).
    pub n: u32,
    /// The provider.
    pub provider: Arc<Provider>,
    state: watch::Receiver<State>,
}

impl Instance {
    /// Wait until the instance's state satisfies `pred`, at most `timeout`.
    pub async fn wait_state(&self, timeout: Duration, pred: impl Fn(&State) -> bool) -> Result<(), String> {
        let mut rx = self.state.clone();
        match tokio::time::timeout(timeout, rx.wait_for(|s| pred(s))).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(format!(
                "instance {}: still {:?} after {timeout:?}",
                self.n,
                self.provider.state()
            )),
        }
    }

    /// Wait until the instance is connected; returns the server session id.
    pub async fn connected(&self, timeout: Duration) -> Result<String, String> {
        let mut rx = self.state.clone();
        let r = tokio::time::timeout(timeout, rx.wait_for(|s| matches!(s, State::Connected { .. }))).await;
        match r {
            Ok(Ok(s)) => match &*s {
                State::Connected { session_id, .. } => Ok(session_id.clone()),
                _ => unreachable!("waited for Connected"),
            },
            _ => Err(format!(
                "instance {} not connected within {timeout:?}; state {:?}",
                self.n,
                self.provider.state()
            )),
        }
    }
}

/// Highest counter values seen, at every change the counters announce.
#[derive(Debug, Default)]
pub struct MaxCounters([AtomicUsize; 5]);

impl MaxCounters {
    fn record(&self, s: &Snapshot) {
        for (slot, v) in self
            .0
            .iter()
            .zip([s.instances, s.sessions, s.tasks, s.sockets, s.connected])
        {
            slot.fetch_max(v, Ordering::Relaxed);
        }
    }

    /// The maxima.
    pub fn get(&self) -> Snapshot {
        let g = |i: usize| self.0[i].load(Ordering::Relaxed);
        Snapshot {
            instances: g(0),
            sessions: g(1),
            tasks: g(2),
            sockets: g(3),
            connected: g(4),
        }
    }
}

/// The extension process.
pub struct Process {
    /// Launch number.
    pub id: u32,
    runtime: Option<tokio::runtime::Runtime>,
    /// Its SDK registry.
    pub registry: Registry,
    /// The instance iOS talks to.
    pub current: Option<Instance>,
    /// Older instances iOS replaced without stopping and still holds (field report): it never
    /// calls them again; they die with the process.
    pub abandoned: Vec<Instance>,
    monitor: JoinHandle<()>,
}

impl Process {
    fn launch(id: u32, max: Arc<MaxCounters>, clock: Clock) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("extension-{id}"))
            .enable_all()
            .build()?;
        let registry = Registry::new_with_clock(runtime.handle().clone(), clock);
        let watched = registry.clone();
        // Every change of the counters is recorded (the predicate never holds).
        let monitor = tokio::spawn(async move {
            let _ = watched
                .wait_for_counters(Duration::from_secs(365 * 86_400), move |s| {
                    max.record(s);
                    false
                })
                .await;
        });
        Ok(Self {
            id,
            runtime: Some(runtime),
            registry,
            current: None,
            abandoned: Vec::new(),
            monitor,
        })
    }

    /// Every instance iOS holds.
    pub fn held(&self) -> impl Iterator<Item = &Instance> {
        self.abandoned.iter().chain(self.current.as_ref())
    }
}

impl Process {
    /// The process dies: its tasks stop where they are (no goodbye) and are dropped, which
    /// closes their sockets. The instances are left for the caller to drop afterwards: dropping
    /// a live instance first would let its task say goodbye, which a killed process never does.
    fn die(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.monitor.abort();
        self.die();
        self.current = None;
        self.abandoned.clear();
    }
}

/// Figures about the phone.
#[derive(Debug, Default, Clone, Copy)]
pub struct PhoneStats {
    /// Extension processes launched.
    pub processes: u32,
    /// Kills.
    pub kills: u32,
    /// Provider instances created.
    pub instances: u32,
    /// `handleTimerEvent` calls (collapsed ones included).
    pub timer_events: u64,
    /// Simulated time: how far the phone's clock was moved ahead.
    pub simulated: Duration,
    /// Stops of the phone's clock while time passed (see [`crate::time`]).
    pub clock_stops: u64,
}

/// The phone.
pub struct Phone {
    /// Callbacks' shared state.
    pub shared: Arc<PhoneShared>,
    /// The site's Wi-Fi.
    pub wifi: Wifi,
    /// What iOS hands every instance.
    pub configuration: ProviderConfiguration,
    /// The push managers' `matchSSIDs` (union of every manager the app saved).
    pub match_ssids: Vec<String>,
    voip_token: Option<String>,
    path_monitor: bool,
    /// The current SSID.
    pub ssid: Option<String>,
    /// The extension process, if running.
    pub process: Option<Process>,
    /// Highest counters of any process so far.
    pub max: Arc<MaxCounters>,
    /// Figures.
    pub stats: PhoneStats,
    /// When the phone was last cut off from the server (leave, stop, kill, outage).
    pub cut_at: Option<Instant>,
    /// The phone's clock, shared by every extension process it launches.
    pub clock: Clock,
    /// When iOS's next timer event is due, by the phone's clock.
    next_timer: Instant,
    /// How far the phone's wall clock is off (ms, positive: fast).
    clock_skew_ms: i64,
}

impl Phone {
    /// A phone with an app that enrolled and saved its managers, not on any Wi-Fi yet.
    pub fn new(
        wifi: Wifi,
        configuration: ProviderConfiguration,
        match_ssids: Vec<String>,
        voip_token: Option<String>,
        path_monitor: bool,
        clock_skew_ms: i64,
        held: Arc<HeldSessions>,
    ) -> Self {
        let clock = Clock::default();
        Self {
            next_timer: clock.now() + time::TIMER_PERIOD,
            clock,
            clock_skew_ms,
            shared: Arc::new(PhoneShared {
                log: Mutex::new(PhoneLog::default()),
                version: watch::channel(0).0,
                held,
            }),
            wifi,
            configuration,
            match_ssids,
            voip_token,
            path_monitor,
            ssid: None,
            process: None,
            max: Arc::new(MaxCounters::default()),
            stats: PhoneStats::default(),
            cut_at: None,
        }
    }

    /// The phone's wall clock, Unix ms: the real one, moved ahead by the simulated time, off by
    /// the scenario's skew.
    pub fn wall_ms(&self) -> i64 {
        let real = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let ahead = i64::try_from(self.clock.shift().as_millis()).unwrap_or(i64::MAX);
        real.saturating_add(ahead).saturating_add(self.clock_skew_ms)
    }

    /// Server sessions the phone holds now.
    pub fn held_sessions(&self) -> usize {
        self.shared.held.count()
    }

    /// What the current instance's `NWPathMonitor` reports (abandoned instances are inert).
    fn notify_path(&self, event: NetworkEvent) {
        if self.path_monitor
            && let Some(i) = self.current()
        {
            i.provider.network_changed(event);
        }
    }

    /// Join `ssid`. Roaming from one of the site's SSIDs to another keeps the phone on the
    /// site's network (its connections survive); any other change loses the old network first.
    pub fn join(&mut self, ssid: &str) {
        let on_site = self.match_ssids.iter().any(|s| s == ssid);
        let was_on_site = self.ssid.as_ref().is_some_and(|s| self.match_ssids.contains(s));
        if self.ssid.is_some() && !(on_site && was_on_site) {
            self.leave_network();
        }
        self.wifi.set_on_site(on_site);
        self.ssid = Some(ssid.to_owned());
        self.notify_path(NetworkEvent::Joined {
            ssid: ssid.to_owned(),
        });
    }

    /// The Wi-Fi is gone (no stop).
    pub fn leave_network(&mut self) {
        self.cut_at = Some(Instant::now());
        self.wifi.set_on_site(false);
        self.ssid = None;
        self.notify_path(NetworkEvent::Left);
    }

    fn ensure_process(&mut self) -> Result<&mut Process, String> {
        if self.process.is_none() {
            self.stats.processes += 1;
            let p = Process::launch(self.stats.processes, self.max.clone(), self.clock.clone())
                .map_err(|e| format!("cannot launch the extension process: {e}"))?;
            self.process = Some(p);
        }
        Ok(self.process.as_mut().expect("just launched"))
    }

    /// iOS creates an instance in the (running or launched) process, as the Swift `init` does:
    /// the configuration, the app group's last seen sequence, the PushKit token.
    pub fn create_instance(&mut self) -> Result<(), String> {
        self.stats.instances += 1;
        let n = self.stats.instances;
        let persisted = self.shared.with(|l| l.app_group_last_seen);
        let configuration = self.configuration.clone();
        let voip = self.voip_token.clone();
        let shared = self.shared.clone();
        let outcomes = self.shared.with(|l| l.app_group_outcomes.clone());
        let process = self.ensure_process()?;
        let (state_tx, state) = watch::channel(State::Idle);
        let host = Arc::new(InstanceHost {
            n,
            created_with: persisted,
            shared,
            state: state_tx,
        });
        let provider = Provider::new(&process.registry, configuration, persisted, host)
            .map_err(|e| format!("instance {n}: {e}"))?;
        if let Some(t) = voip {
            provider.set_voip_token(t);
        }
        // As the Swift `start()` does: every report still in the app group's file.
        provider.report_pending_call_outcomes(&outcomes);
        let new = Instance {
            n,
            provider: Arc::new(provider),
            state,
        };
        if let Some(old) = process.current.replace(new) {
            process.abandoned.push(old);
        }
        Ok(())
    }

    /// The user acted on a call in CallKit: the app appends the report to the app group's
    /// pending file and posts its Darwin notification, which the current instance (if the
    /// extension runs) answers by handing the whole file to its provider.
    pub fn user_acted(&mut self, call_id: &str, outcome: CallOutcome) -> Result<(), String> {
        let at_ms = self.wall_ms();
        let report = OutcomeReport {
            call_id: call_id.to_owned(),
            outcome,
            at_ms,
        };
        let mut result = Ok(());
        self.shared.update(|log| {
            let mut file = PendingCallOutcomes::parse(&log.app_group_outcomes);
            match file.add(report) {
                Ok(_) => {
                    log.app_group_outcomes = file.to_bytes();
                    log.outcomes_made.insert((call_id.to_owned(), outcome));
                }
                Err(e) => result = Err(format!("the app cannot report {call_id}: {e}")),
            }
        });
        result?;
        if let Some(i) = self.current() {
            let file = self.shared.with(|l| l.app_group_outcomes.clone());
            i.provider.report_pending_call_outcomes(&file);
        }
        Ok(())
    }

    /// The instance iOS talks to.
    pub fn current(&self) -> Option<&Instance> {
        self.process.as_ref().and_then(|p| p.current.as_ref())
    }

    /// `start()` on the current instance, creating the process and instance if needed.
    pub async fn start(&mut self) -> Result<(), String> {
        if self.current().is_none() {
            self.create_instance()?;
        }
        let i = self.current().expect("created");
        let (n, provider) = (i.n, i.provider.clone());
        provider
            .start()
            .await
            .map_err(|e| format!("start of instance {n}: {e}"))
    }

    /// `stop(reason)` on the current instance; returns once its completion would be called.
    /// Then iOS releases it. Fails if anything of it is still alive once stop returned.
    pub async fn stop(&mut self, reason: NEProviderStopReason) -> Result<(), String> {
        let Some(process) = &mut self.process else {
            return Err("stop: the extension is not running".into());
        };
        let Some(instance) = process.current.take() else {
            return Err("stop: no provider instance".into());
        };
        self.cut_at = Some(Instant::now());
        instance.provider.stop(reason).await;
        let state = instance.provider.state();
        let expected = State::Stopped(StopCause::Host(reason.sdk_reason()));
        let mut problems = Vec::new();
        if state != expected {
            problems.push(format!("state after stop is {state:?}, not {expected:?}"));
        }
        // Older instances iOS still holds have no session of their own (superseded), so the
        // process must be quiet the moment stop returns: nothing left to release later.
        let c = process.registry.counters();
        if !c.is_quiet() {
            problems.push(format!("stop returned with resources alive: {c:?}"));
        }
        drop(instance);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// `handleTimerEvent()` `n` times on the current instance, now (the clock does not move).
    pub fn timer(&mut self, n: u32) {
        self.fire_timer_events(u64::from(n));
        self.stats.timer_events += u64::from(n);
    }

    fn fire_timer_events(&self, n: u64) {
        if let Some(i) = self.current() {
            for _ in 0..n {
                i.provider.handle_timer_event();
            }
        }
    }

    /// `d` of simulated time passes on the phone, stop by stop (see [`crate::time`]), or less
    /// if `done` holds on the settled SDK at a stop first. Returns how far the clock moved; the
    /// caller moves the server's clock by as much.
    pub async fn advance(
        &mut self,
        d: Duration,
        done: impl Fn(&Settled) -> bool,
    ) -> Result<Duration, String> {
        let start = self.clock.shift();
        let target = start + d;
        let mut settled = self.clock.settle(STEP_TIMEOUT).await?;
        let mut stops = 0;
        while !done(&settled) && self.clock.shift() < target {
            stops += 1;
            if stops > MAX_STOPS {
                return Err(format!(
                    "time stuck: {MAX_STOPS} stops without reaching the end ({settled:?})"
                ));
            }
            // The end in the phone's clock now: real time passes while the host steps, and the
            // server's clock with it, so the end is a shift, not an instant.
            let end = Instant::now() + target;
            let stop = time::next_stop(end, settled.next_deadline, self.next_timer);
            settled = if stop >= end {
                self.clock.advance_shift_to(target, STEP_TIMEOUT).await?
            } else {
                self.clock.advance_to(stop, STEP_TIMEOUT).await?
            };
            let (due, fire, next) = time::timer_events(self.clock.now(), self.next_timer);
            self.next_timer = next;
            self.stats.timer_events += due;
            if fire > 0 {
                self.fire_timer_events(fire);
                settled = self.clock.settle(STEP_TIMEOUT).await?;
            }
        }
        self.stats.clock_stops += u64::from(stops);
        let moved = self.clock.shift().saturating_sub(start);
        self.stats.simulated += moved;
        Ok(moved)
    }

    /// Kill the extension process; returns once the OS would have closed everything.
    pub async fn kill(&mut self) -> Result<(), String> {
        let Some(mut process) = self.process.take() else {
            return Err("kill: the extension is not running".into());
        };
        self.cut_at = Some(Instant::now());
        self.stats.kills += 1;
        for i in process.held() {
            self.shared.held.set(i.n, None);
        }
        let registry = process.registry.clone();
        process.die();
        let dead = registry.wait_for_counters(STEP_TIMEOUT, Snapshot::is_quiet).await;
        // Only now the objects go (iOS's references die with the process).
        drop(process);
        let gone = registry
            .wait_for_counters(STEP_TIMEOUT, |s| s.is_quiet() && s.instances == 0)
            .await;
        dead.and(gone)
            .map(|_| ())
            .map_err(|s| format!("the killed process still holds resources after {STEP_TIMEOUT:?}: {s:?}"))
    }

    /// Create a new instance and start it without stopping the current one; `release_old`
    /// drops the old one unstopped first.
    pub async fn new_instance_without_stop(&mut self, release_old: bool) -> Result<(), String> {
        let Some(process) = &mut self.process else {
            return Err("new instance: the extension is not running".into());
        };
        let old = if release_old { process.current.take() } else { None };
        self.create_instance()?;
        drop(old);
        self.start().await
    }

    /// `stop(reason)` of the current instance (created if there is none) racing `start()` of
    /// the same instance, or of a new one. Afterwards the stopped instance is released.
    pub async fn stop_racing_start(
        &mut self,
        reason: NEProviderStopReason,
        new_instance: bool,
    ) -> Result<(), String> {
        // No instance yet: iOS creates one, and stops it while it starts.
        if self.current().is_none() {
            self.create_instance()?;
        }
        let old = self.current().map(|i| (i.n, i.provider.clone())).expect("exists");
        self.cut_at = Some(Instant::now());
        if new_instance {
            self.create_instance()?;
        }
        let new = self.current().map(|i| i.provider.clone()).expect("exists");
        let (_, started) = tokio::join!(old.1.stop(reason), new.start());
        let process = self.process.as_mut().expect("running");
        if new_instance {
            started.map_err(|e| format!("start of the new instance: {e}"))?;
            // iOS stopped the old one: it releases it.
            process.abandoned.retain(|i| i.n != old.0);
            return Ok(());
        }
        // Same instance: either order is legal; the last to run decides the state.
        match (started, old.1.state()) {
            (_, State::Stopped(StopCause::Host(_))) => {
                process.current = None;
                Ok(())
            }
            (Ok(()), _) => Ok(()),
            (Err(e), state) => Err(format!(
                "start failed ({e}) and the instance is not stopped: {state:?}"
            )),
        }
    }
}

//! The recorder: the in-memory history of sessions and deliveries behind the ops dashboard
//! ([`Observer`]), and the diagnoses for the hard cases. It sits below the hub, which tells it
//! what happened; it decides nothing about devices and depends on nothing above it (the
//! dashboard in `api::dashboard` reads it). [`run_ticks`] samples its series.
//!
//! The [`Observer`] only remembers, in bounded rings, what the hub tells it (sessions started
//! and ended, receipts). It lives in memory only: a restart starts with an empty history (the
//! registry facts the dashboard shows, such as last SSID and last stop reason, come from the
//! store through the hub). In cluster mode each node observes its own sessions.
//!
//! Diagnoses (thresholds in `config::Limits`, each raised once per window with one warning
//! line, a counter and a flag in the dashboard):
//! - **instance churn**: the extension logs in with a new `Hello.instance_id` more than
//!   `diag_instance_churn_max` times within `diag_window_secs` (iOS keeps restarting it);
//! - **heartbeat silent**: a session ended `HEARTBEAT_TIMEOUT`, i.e. the phone stopped answering
//!   while its TCP connection stayed open (the session core ends such sessions), and the phone
//!   had not reported a network change in it: silence after a network change, or a goodbye
//!   saying iOS stopped the provider for a network reason ([`provider_stop`]), is the phone
//!   **leaving the Wi-Fi**, counted per device and site but never flagged;
//! - **site drop**: at least `diag_site_drop_percent` % of the devices last seen on one SSID
//!   (and at least `diag_site_drop_min_devices`) dropped within `diag_site_drop_window_secs`:
//!   likely an access point or SSID problem, not the phones.

pub(crate) mod provider_stop;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
};

use parking_lot::Mutex;

use serde::Serialize;
use tokio::sync::broadcast;

use tokio_util::sync::CancellationToken;

use crate::{
    config::Limits,
    metrics,
    store::{PushKind, ReceiptState},
};

/// Points kept for the "connected devices" chart (one per change, at most one per second, plus
/// a sample every [`TICK`] from [`run_ticks`]): about an hour.
const SERIES_POINTS: usize = 720;
/// How often [`run_ticks`] samples the series.
const TICK: std::time::Duration = std::time::Duration::from_secs(10);
/// Recent delivery latencies kept for the latency chart.
const LATENCIES: usize = 1000;
/// Recent diagnoses kept for the dashboard.
const DIAGNOSES: usize = 100;
/// Instance changes kept per device (the churn count only needs those within the window, and
/// the login rate keeps them far fewer).
const INSTANCE_CHANGES: usize = 1024;

/// One session in a device's history.
#[derive(Debug, Clone, Serialize)]
pub struct SessionRecord {
    /// Session id.
    pub session_id: u64,
    /// Unix ms it started.
    pub started_ms: i64,
    /// Unix ms it ended, if it did.
    pub ended_ms: Option<i64>,
    /// SSID at login.
    pub ssid: String,
    /// Extension instance id at login.
    pub instance_id: String,
    /// SDK version at login.
    pub sdk_version: String,
    /// Why it ended.
    pub reason: String,
    /// Why iOS stopped the provider, from its goodbye (Apple's `NEProviderStopReason` name,
    /// `unknown`, or empty).
    pub provider_stop_reason: &'static str,
    /// It ended because the phone left the Wi-Fi.
    pub left_wifi: bool,
}

/// One receipt in a device's history.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryRecord {
    /// Message or call id.
    pub id: String,
    /// `message`, `call_invite`, `call_cancel`.
    pub kind: &'static str,
    /// Receipt state.
    pub state: &'static str,
    /// `local`, `apns` or empty.
    pub path: String,
    /// Reason, for final states.
    pub reason: String,
    /// Unix ms.
    pub at_ms: i64,
    /// Accepted to this state, for delivered and acked.
    pub latency_ms: Option<i64>,
}

/// A diagnosis raised by the server.
#[derive(Debug, Clone, Serialize)]
pub struct Diagnosis {
    /// `instance_churn`, `heartbeat_silent` or `site_drop`.
    pub kind: &'static str,
    /// The device, for device diagnoses.
    pub device_id: String,
    /// The SSID concerned.
    pub ssid: String,
    /// Unix ms.
    pub at_ms: i64,
    /// What the ops team should know.
    pub detail: String,
}

/// What the observer knows about one device beyond its registry record.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceObservation {
    /// Unix ms a frame was last heard from the device in its live session.
    pub last_heard_ms: i64,
    /// Extension instance id of the last login.
    pub instance_id: String,
    /// Path of the last call invite that reached the device (`local`, `apns`), and its state.
    pub last_call_path: String,
    /// State of the last call invite.
    pub last_call_state: String,
    /// Heartbeat timeouts seen (since start).
    pub heartbeat_misses: u32,
    /// Instance changes within the current window.
    pub instance_changes: u32,
    /// Flags raised and still within their window (`instance_churn`, `heartbeat_silent`).
    pub flags: Vec<&'static str>,
    /// Why iOS last stopped the provider (Apple's `NEProviderStopReason` name), if it said.
    pub last_provider_stop_reason: &'static str,
    /// The last session ended because the phone left the Wi-Fi.
    pub left_wifi: bool,
}

/// A site's health (site = SSID).
#[derive(Debug, Clone, Serialize)]
pub struct SiteHealth {
    /// The SSID.
    pub ssid: String,
    /// Devices online on it now.
    pub online: usize,
    /// Devices whose last session was on it (the devices it should have).
    pub expected: usize,
    /// Logins on it within the diagnosis window, per device expected.
    pub reconnects_per_device: f64,
    /// Heartbeat timeouts on it (since start).
    pub heartbeat_misses: u64,
    /// Instance-churn diagnoses on it (since start).
    pub duplicate_instances: u64,
    /// Whether a site-wide drop is flagged within the window.
    pub drop_flagged: bool,
    /// Sessions on it that ended with the phone leaving the Wi-Fi (since start).
    pub left_wifi: u64,
    /// Sessions on it iOS stopped, by `NEProviderStopReason` name (since start).
    pub provider_stops: BTreeMap<&'static str, u64>,
}

#[derive(Default)]
struct DeviceObs {
    sessions: VecDeque<SessionRecord>,
    deliveries: VecDeque<DeliveryRecord>,
    heard: Arc<AtomicI64>,
    ssid: String,
    online: bool,
    instance_id: String,
    instance_changes: VecDeque<i64>,
    churn_flag_ms: Option<i64>,
    heartbeat_misses: u32,
    heartbeat_flag_ms: Option<i64>,
    /// The phone reported a network change in its current session.
    network_changed: bool,
    last_provider_stop: &'static str,
    left_wifi: bool,
    last_call: Option<(String, &'static str)>,
    /// Unix ms of the last thing recorded about the device (which devices to forget first).
    touched_ms: i64,
}

impl DeviceObs {
    /// Flags raised within `window` of `now`.
    fn flags(&self, now: i64, window: i64) -> Vec<&'static str> {
        let mut flags = Vec::new();
        if self.churn_flag_ms.is_some_and(|t| now - t <= window) {
            flags.push("instance_churn");
        }
        if self.heartbeat_flag_ms.is_some_and(|t| now - t <= window) {
            flags.push("heartbeat_silent");
        }
        flags
    }
}

#[derive(Default)]
struct SiteObs {
    /// Devices whose last session was on this SSID (kept as sessions start, so that a session
    /// end need not count them: that was a scan of every device per session end, quadratic
    /// when a whole site drops at once).
    members: usize,
    logins: VecDeque<i64>,
    drops: VecDeque<i64>,
    heartbeat_misses: u64,
    duplicate_instances: u64,
    left_wifi: u64,
    provider_stops: BTreeMap<&'static str, u64>,
    drop_flag_ms: Option<i64>,
    /// Unix ms of the last login or drop on the site (which sites to forget first).
    touched_ms: i64,
}

#[derive(Default)]
struct State {
    devices: HashMap<String, DeviceObs>,
    sites: HashMap<String, SiteObs>,
    series: VecDeque<(i64, u32)>,
    online: u32,
    latencies: VecDeque<(i64, &'static str, String, i64)>,
    diagnoses: VecDeque<Diagnosis>,
}

/// Bounded in-memory history of sessions and deliveries, and the diagnoses.
pub struct Observer {
    limits: Limits,
    state: Mutex<State>,
    diagnoses: broadcast::Sender<Diagnosis>,
}

/// Keep only entries newer than `since`.
fn prune(q: &mut VecDeque<i64>, since: i64) {
    while q.front().is_some_and(|t| *t < since) {
        q.pop_front();
    }
}

/// Make room for one more entry under `cap`: when full, forget the entries `evictable` allows
/// that were touched longest ago, a tenth of the cap at a time, so a stream of new keys costs
/// one sort per tenth of the cap rather than a scan per key. Returns the entries forgotten.
fn make_room<V>(
    map: &mut HashMap<String, V>,
    cap: usize,
    evictable: impl Fn(&V) -> bool,
    touched: impl Fn(&V) -> i64,
) -> Vec<(String, V)> {
    if map.len() < cap.max(1) {
        return Vec::new();
    }
    let mut old: Vec<(i64, &String)> = map
        .iter()
        .filter(|(_, v)| evictable(v))
        .map(|(k, v)| (touched(v), k))
        .collect();
    let n = (map.len() + 1 - cap.max(1)).max(cap / 10).min(old.len());
    if n == 0 {
        return Vec::new();
    }
    old.select_nth_unstable(n - 1);
    let keys: Vec<String> = old[..n].iter().map(|(_, k)| (*k).clone()).collect();
    keys.into_iter()
        .filter_map(|k| map.remove(&k).map(|v| (k, v)))
        .collect()
}

/// The device's entry, created (forgetting the offline devices heard from least recently when
/// `limits.observe_max_devices` is reached) if new. Online devices are never forgotten: their
/// number is bounded by `limits.max_sessions`. Takes the two maps, not the state, so the caller
/// may use the state's other fields while it holds the entry.
fn device_entry<'a>(
    devices: &'a mut HashMap<String, DeviceObs>,
    sites: &mut HashMap<String, SiteObs>,
    device_id: &str,
    cap: usize,
    now: i64,
) -> &'a mut DeviceObs {
    if !devices.contains_key(device_id) {
        for (_, gone) in make_room(devices, cap, |d| !d.online, |d| d.touched_ms) {
            if let Some(site) = sites.get_mut(&gone.ssid) {
                site.members = site.members.saturating_sub(1);
            }
        }
        devices.insert(device_id.to_string(), DeviceObs::default());
    }
    let d = devices.get_mut(device_id).expect("present");
    d.touched_ms = now;
    d
}

impl State {
    /// The site's entry, created if new; when `limits.observe_max_sites` is reached, the sites
    /// without devices and quiet longest are forgotten first (sites with devices are bounded
    /// by the devices remembered).
    fn site(&mut self, ssid: &str, cap: usize, now: i64) -> &mut SiteObs {
        if !self.sites.contains_key(ssid) {
            make_room(&mut self.sites, cap, |s| s.members == 0, |s| s.touched_ms);
            self.sites.insert(ssid.to_string(), SiteObs::default());
        }
        let s = self.sites.get_mut(ssid).expect("present");
        s.touched_ms = now;
        s
    }
}

fn push_bounded<T>(q: &mut VecDeque<T>, item: T, cap: usize) {
    if q.len() >= cap.max(1) {
        q.pop_front();
    }
    if q.capacity() == 0 {
        // Room for one to start with, not the default four: most devices have one session
        // and it is kept for every idle one (about 0.4 KiB per device at 10,000 devices).
        q.reserve_exact(1);
    }
    q.push_back(item);
}

impl Observer {
    /// An empty observer with the diagnosis thresholds of `limits`.
    pub fn new(limits: &Limits) -> Self {
        Self {
            limits: limits.clone(),
            state: Mutex::new(State::default()),
            diagnoses: broadcast::channel(limits.diagnosis_backlog).0,
        }
    }

    /// Diagnoses as they are raised.
    pub fn subscribe_diagnoses(&self) -> broadcast::Receiver<Diagnosis> {
        self.diagnoses.subscribe()
    }

    fn window_ms(&self) -> i64 {
        self.limits.diag_window_secs as i64 * 1000
    }

    fn raise(&self, st: &mut State, d: Diagnosis) {
        tracing::warn!(kind = d.kind, device = %d.device_id, ssid = %d.ssid, detail = %d.detail, "diagnosis");
        metrics::diagnosis(d.kind);
        push_bounded(&mut st.diagnoses, d.clone(), DIAGNOSES);
        let _ = self.diagnoses.send(d);
    }

    fn sample(st: &mut State, now: i64) {
        let online = st.online;
        match st.series.back_mut() {
            Some(last) if now - last.0 < 1000 => last.1 = online,
            _ => push_bounded(&mut st.series, (now, online), SERIES_POINTS),
        }
    }

    /// A session was admitted (called by the hub under the device's lock, before presence is
    /// announced). Returns the cell the session driver updates whenever it hears the device.
    pub fn session_started(
        &self,
        device_id: &str,
        session_id: u64,
        ssid: &str,
        instance_id: &str,
        sdk_version: &str,
        now: i64,
    ) -> Arc<AtomicI64> {
        let mut st = self.state.lock();
        let st = &mut *st;
        let window = self.window_ms();
        let created = !st.devices.contains_key(device_id);
        let d = device_entry(
            &mut st.devices,
            &mut st.sites,
            device_id,
            self.limits.observe_max_devices,
            now,
        );
        if let Some(open) = d.sessions.back_mut().filter(|s| s.ended_ms.is_none()) {
            open.ended_ms = Some(now);
            open.reason = "replaced by a newer session".into();
        }
        push_bounded(
            &mut d.sessions,
            SessionRecord {
                session_id,
                started_ms: now,
                ended_ms: None,
                ssid: ssid.into(),
                instance_id: instance_id.into(),
                sdk_version: sdk_version.into(),
                reason: String::new(),
                provider_stop_reason: "",
                left_wifi: false,
            },
            self.limits.observe_sessions_per_device,
        );
        let mut churn = None;
        if !d.instance_id.is_empty() && d.instance_id != instance_id {
            push_bounded(&mut d.instance_changes, now, INSTANCE_CHANGES);
            prune(&mut d.instance_changes, now - window);
            if d.instance_changes.len() > self.limits.diag_instance_churn_max as usize
                && d.churn_flag_ms.is_none_or(|t| now - t > window)
            {
                d.churn_flag_ms = Some(now);
                churn = Some(d.instance_changes.len());
            }
        }
        d.instance_id = instance_id.into();
        d.network_changed = false;
        if !d.online {
            st.online += 1;
        }
        d.online = true;
        let moved = (d.ssid != ssid).then(|| std::mem::replace(&mut d.ssid, ssid.into()));
        d.heard = Arc::new(AtomicI64::new(now));
        let heard = d.heard.clone();
        if let Some(old) = moved.as_ref().filter(|_| !created)
            && let Some(site) = st.sites.get_mut(old)
        {
            site.members = site.members.saturating_sub(1);
        }
        let site = st.site(ssid, self.limits.observe_max_sites, now);
        if created || moved.is_some() {
            site.members += 1;
        }
        site.logins.push_back(now);
        prune(&mut site.logins, now - window);
        if let Some(n) = churn {
            site.duplicate_instances += 1;
            self.raise(
                st,
                Diagnosis {
                    kind: "instance_churn",
                    device_id: device_id.into(),
                    ssid: ssid.into(),
                    at_ms: now,
                    detail: format!(
                        "the extension logged in with {n} new instances within {} s: iOS keeps restarting it (crash, memory limit, or provider configuration changes)",
                        self.limits.diag_window_secs
                    ),
                },
            );
        }
        Self::sample(st, now);
        heard
    }

    /// The device reported a network change in its live session (the hub calls it as it
    /// records the new SSID): a silence that follows is the phone leaving the Wi-Fi.
    pub fn network_changed(&self, device_id: &str) {
        self.path_lost(device_id, true);
    }

    /// The device reported its path to the server failing (`lost`: iOS says the Wi-Fi is
    /// unviable or gone, so a silence that follows is the phone leaving the Wi-Fi) or back on
    /// the same SSID (a silence that follows is a phone silent on the SSID again).
    pub fn path_lost(&self, device_id: &str, lost: bool) {
        if let Some(d) = self.state.lock().devices.get_mut(device_id) {
            d.network_changed = lost;
        }
    }

    /// A login's hello says why the host stopped the device's previous session (`name`, Apple's
    /// case name), whose goodbye may never have reached the server: if that session ended in a
    /// heartbeat silence nothing explained and `name` is a network reason, the phone had left
    /// the Wi-Fi. It is counted so, and the silence's flag is dropped (its log line stays).
    pub fn previous_stop(&self, device_id: &str, name: &str) {
        let name = provider_stop::parse(name);
        if !provider_stop::is_network(name) {
            return;
        }
        let mut st = self.state.lock();
        let st = &mut *st;
        let Some(d) = st.devices.get_mut(device_id) else {
            return;
        };
        let Some(s) = d.sessions.back_mut() else {
            return;
        };
        if s.ended_ms.is_none() || s.left_wifi || metrics::reason_class(&s.reason) != "heartbeat_timeout" {
            return;
        }
        s.left_wifi = true;
        s.provider_stop_reason = name;
        d.left_wifi = true;
        d.last_provider_stop = name;
        if d.heartbeat_flag_ms == s.ended_ms {
            d.heartbeat_flag_ms = None;
        }
        let ssid = s.ssid.clone();
        metrics::session_stopped(name, true);
        if let Some(site) = st.sites.get_mut(&ssid) {
            site.left_wifi += 1;
            *site.provider_stops.entry(name).or_default() += 1;
        }
    }

    /// The device's current session ended (called by the hub when it clears presence).
    pub fn session_ended(&self, device_id: &str, session_id: u64, reason: &str, now: i64) {
        metrics::session_ended(reason);
        let class = metrics::reason_class(reason);
        let mut st = self.state.lock();
        let st = &mut *st;
        let window = self.window_ms();
        let Some(d) = st.devices.get_mut(device_id) else {
            return;
        };
        d.touched_ms = now;
        let ios = provider_stop::in_reason(reason);
        let left = provider_stop::is_network(ios) || (class == "heartbeat_timeout" && d.network_changed);
        metrics::session_stopped(ios, left);
        if !ios.is_empty() {
            d.last_provider_stop = ios;
        }
        d.left_wifi = left;
        if let Some(s) = d.sessions.iter_mut().rev().find(|s| s.session_id == session_id) {
            s.ended_ms = Some(now);
            s.reason = reason.into();
            s.provider_stop_reason = ios;
            s.left_wifi = left;
        }
        if d.online {
            d.online = false;
            st.online = st.online.saturating_sub(1);
        }
        let ssid = d.ssid.clone();
        let mut raise = Vec::new();
        if class == "heartbeat_timeout" {
            d.heartbeat_misses += 1;
            if !left && d.heartbeat_flag_ms.is_none_or(|t| now - t > window) {
                d.heartbeat_flag_ms = Some(now);
                raise.push(Diagnosis {
                    kind: "heartbeat_silent",
                    device_id: device_id.into(),
                    ssid: ssid.clone(),
                    at_ms: now,
                    detail: "the device stopped answering heartbeats while its connection stayed open (phone asleep off-network, extension suspended, or Wi-Fi roaming that TCP did not notice)".into(),
                });
            }
        }
        let site_drop = !left && !matches!(class, "replaced" | "revoked" | "shutdown" | "device_goodbye");
        let site = st.site(&ssid, self.limits.observe_max_sites, now);
        let expected = site.members;
        if class == "heartbeat_timeout" {
            site.heartbeat_misses += 1;
        }
        site.left_wifi += u64::from(left);
        if !ios.is_empty() {
            *site.provider_stops.entry(ios).or_default() += 1;
        }
        if site_drop && !ssid.is_empty() {
            let site_window = self.limits.diag_site_drop_window_secs as i64 * 1000;
            site.drops.push_back(now);
            prune(&mut site.drops, now - site_window);
            let needed = (expected * self.limits.diag_site_drop_percent as usize)
                .div_ceil(100)
                .max(self.limits.diag_site_drop_min_devices as usize);
            if site.drops.len() >= needed && site.drop_flag_ms.is_none_or(|t| now - t > site_window) {
                site.drop_flag_ms = Some(now);
                raise.push(Diagnosis {
                    kind: "site_drop",
                    device_id: String::new(),
                    ssid: ssid.clone(),
                    at_ms: now,
                    detail: format!(
                        "{} of {expected} devices on this SSID dropped within {} s: likely an access point, SSID or network problem, not the phones",
                        site.drops.len(),
                        self.limits.diag_site_drop_window_secs
                    ),
                });
            }
        }
        for d in raise {
            self.raise(st, d);
        }
        Self::sample(st, now);
    }

    /// A receipt was announced for a push of `kind` to `device_id`; `latency_ms` is the time
    /// since the push was accepted (delivered and acked receipts).
    #[allow(clippy::too_many_arguments)]
    pub fn receipt(
        &self,
        device_id: &str,
        id: &str,
        kind: PushKind,
        state: ReceiptState,
        path: &str,
        reason: &str,
        at_ms: i64,
        latency_ms: Option<i64>,
    ) {
        let mut st = self.state.lock();
        let st = &mut *st;
        let kind = kind.label();
        if let (Some(ms), ReceiptState::Delivered) = (latency_ms, state) {
            push_bounded(&mut st.latencies, (at_ms, kind, path.to_string(), ms), LATENCIES);
        }
        let d = device_entry(
            &mut st.devices,
            &mut st.sites,
            device_id,
            self.limits.observe_max_devices,
            at_ms,
        );
        Self::delivery(d, id, kind, state, path, reason, at_ms, latency_ms, &self.limits);
    }

    #[allow(clippy::too_many_arguments)]
    fn delivery(
        d: &mut DeviceObs,
        id: &str,
        kind: &'static str,
        state: ReceiptState,
        path: &str,
        reason: &str,
        at_ms: i64,
        latency_ms: Option<i64>,
        limits: &Limits,
    ) {
        if kind == "call_invite" && !path.is_empty() {
            d.last_call = Some((path.to_string(), state.label()));
        }
        push_bounded(
            &mut d.deliveries,
            DeliveryRecord {
                id: id.into(),
                kind,
                state: state.label(),
                path: path.into(),
                reason: reason.into(),
                at_ms,
                latency_ms,
            },
            limits.observe_deliveries_per_device,
        );
    }

    /// What the observer knows about `device_id`.
    pub fn device(&self, device_id: &str, now: i64) -> DeviceObservation {
        let st = self.state.lock();
        let Some(d) = st.devices.get(device_id) else {
            return DeviceObservation::default();
        };
        let window = self.window_ms();
        let flags = d.flags(now, window);
        let (last_call_path, last_call_state) = d
            .last_call
            .clone()
            .map(|(p, s)| (p, s.to_string()))
            .unwrap_or_default();
        DeviceObservation {
            last_heard_ms: d.heard.load(Ordering::Relaxed),
            instance_id: d.instance_id.clone(),
            last_call_path,
            last_call_state,
            heartbeat_misses: d.heartbeat_misses,
            instance_changes: d.instance_changes.iter().filter(|t| **t > now - window).count() as u32,
            flags,
            last_provider_stop_reason: d.last_provider_stop,
            left_wifi: d.left_wifi,
        }
    }

    /// The devices with a flag raised and still within its window, with their flags (one pass
    /// under one lock: the dashboard's counters need them for every device).
    pub fn flagged_devices(&self, now: i64) -> HashMap<String, Vec<&'static str>> {
        let st = self.state.lock();
        let window = self.window_ms();
        st.devices
            .iter()
            .map(|(id, d)| (id, d.flags(now, window)))
            .filter(|(_, flags)| !flags.is_empty())
            .map(|(id, flags)| (id.clone(), flags))
            .collect()
    }

    /// A device's recent sessions and deliveries, newest first.
    pub fn history(&self, device_id: &str) -> (Vec<SessionRecord>, Vec<DeliveryRecord>) {
        let st = self.state.lock();
        match st.devices.get(device_id) {
            Some(d) => (
                d.sessions.iter().rev().cloned().collect(),
                d.deliveries.iter().rev().cloned().collect(),
            ),
            None => (Vec::new(), Vec::new()),
        }
    }

    /// Health of every site seen since start, given each SSID's devices online now.
    pub fn sites(&self, online_by_ssid: &HashMap<String, usize>, now: i64) -> Vec<SiteHealth> {
        let st = self.state.lock();
        let mut expected: HashMap<&str, usize> = HashMap::new();
        for d in st.devices.values().filter(|d| !d.ssid.is_empty()) {
            *expected.entry(d.ssid.as_str()).or_default() += 1;
        }
        let site_window = self.limits.diag_site_drop_window_secs as i64 * 1000;
        let window = self.window_ms();
        let mut sites: Vec<SiteHealth> = st
            .sites
            .iter()
            .filter(|(ssid, _)| !ssid.is_empty())
            .map(|(ssid, s)| {
                let exp = expected.get(ssid.as_str()).copied().unwrap_or(0);
                let logins = s.logins.iter().filter(|t| **t > now - window).count();
                SiteHealth {
                    ssid: ssid.clone(),
                    online: online_by_ssid.get(ssid).copied().unwrap_or(0),
                    expected: exp,
                    reconnects_per_device: if exp == 0 { 0.0 } else { logins as f64 / exp as f64 },
                    heartbeat_misses: s.heartbeat_misses,
                    duplicate_instances: s.duplicate_instances,
                    drop_flagged: s.drop_flag_ms.is_some_and(|t| now - t <= site_window.max(window)),
                    left_wifi: s.left_wifi,
                    provider_stops: s.provider_stops.clone(),
                }
            })
            .collect();
        sites.sort_by(|a, b| a.ssid.cmp(&b.ssid));
        sites
    }

    /// Recent diagnoses, newest first.
    pub fn diagnoses(&self) -> Vec<Diagnosis> {
        self.state.lock().diagnoses.iter().rev().cloned().collect()
    }

    /// Record a point of the connected-devices series now ([`run_ticks`] samples periodically
    /// so the chart has points when nothing changes).
    pub fn tick(&self, now: i64) {
        Self::sample(&mut self.state.lock(), now);
    }

    /// `(unix ms, devices online)` points, oldest first.
    pub fn series(&self) -> Vec<(i64, u32)> {
        self.state.lock().series.iter().copied().collect()
    }

    /// Recent delivery latencies `(unix ms, kind, path, ms)`, oldest first.
    pub fn latencies(&self) -> Vec<(i64, &'static str, String, i64)> {
        self.state.lock().latencies.iter().cloned().collect()
    }

    /// `(devices flagged for churn, for heartbeat silence, sites flagged)` now.
    pub fn flagged(&self, now: i64) -> (usize, usize, usize) {
        let st = self.state.lock();
        let window = self.window_ms();
        let site_window = (self.limits.diag_site_drop_window_secs as i64 * 1000).max(window);
        let within = |at: Option<i64>, window| at.is_some_and(|t| now - t <= window);
        let devices =
            |at: fn(&DeviceObs) -> Option<i64>| st.devices.values().filter(|d| within(at(d), window)).count();
        let sites = st.sites.values().filter(|s| within(s.drop_flag_ms, site_window));
        let churn = devices(|d| d.churn_flag_ms);
        (churn, devices(|d| d.heartbeat_flag_ms), sites.count())
    }
}

/// Sample `observer`'s series every [`TICK`], at the time `now` reads, until `shutdown`.
pub(crate) async fn run_ticks(observer: Arc<Observer>, now: fn() -> i64, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = every.tick() => observer.tick(now()),
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observer() -> Observer {
        Observer::new(&Limits {
            diag_instance_churn_max: 2,
            diag_site_drop_min_devices: 3,
            diag_site_drop_percent: 60,
            ..Limits::default()
        })
    }

    #[test]
    fn instance_churn_is_flagged_once_per_window() {
        let o = observer();
        let mut rx = o.subscribe_diagnoses();
        for (i, t) in (0..4).zip([0, 1000, 2000, 3000]) {
            o.session_started("p", i, "Ward", &format!("inst-{i}"), "sdk", t);
        }
        let d = rx.try_recv().expect("flagged");
        assert_eq!((d.kind, d.device_id.as_str()), ("instance_churn", "p"));
        o.session_started("p", 9, "Ward", "inst-9", "sdk", 4000);
        assert!(rx.try_recv().is_err(), "once per window");
        assert_eq!(o.device("p", 4000).flags, ["instance_churn"]);
        // Same instance logging in again is not churn.
        o.session_started("q", 1, "Ward", "same", "sdk", 0);
        o.session_started("q", 2, "Ward", "same", "sdk", 1);
        o.session_started("q", 3, "Ward", "same", "sdk", 2);
        assert!(o.device("q", 3).flags.is_empty());
    }

    #[test]
    fn heartbeat_timeouts_flag_the_device() {
        let o = observer();
        o.session_started("p", 1, "Ward", "i", "sdk", 0);
        o.session_ended("p", 1, "heartbeat timeout", 10);
        let d = o.device("p", 20);
        assert_eq!(
            (d.heartbeat_misses, d.flags.clone()),
            (1, vec!["heartbeat_silent"])
        );
        assert_eq!(o.diagnoses()[0].kind, "heartbeat_silent");
        let (sessions, _) = o.history("p");
        assert_eq!(sessions[0].reason, "heartbeat timeout");
    }

    #[test]
    fn leaving_the_wifi_is_told_apart_from_silence_on_the_ssid() {
        let o = observer();
        // Silent after reporting a network change: it walked out of the Wi-Fi.
        o.session_started("walker", 1, "Ward", "i", "sdk", 0);
        o.network_changed("walker");
        o.session_ended("walker", 1, "heartbeat timeout", 10);
        // Stopped by iOS for a network reason, said in its goodbye.
        o.session_started("leaver", 2, "Ward", "i", "sdk", 0);
        let bye = "device goodbye: GOODBYE_REASON_CLIENT_STOPPING (iOS: noNetworkAvailable)";
        o.session_ended("leaver", 2, bye, 20);
        // Silent with no network change: on the SSID and not answering, the case to flag. Its
        // earlier session's network change does not carry over.
        o.session_started("silent", 3, "Ward", "i", "sdk", 0);
        o.network_changed("silent");
        o.session_started("silent", 4, "Ward", "i", "sdk", 5);
        o.session_ended("silent", 4, "heartbeat timeout", 30);
        // Its path failed (iOS said the Wi-Fi went) and the connection died with it.
        o.session_started("faded", 5, "Ward", "i", "sdk", 0);
        o.path_lost("faded", true);
        o.session_ended("faded", 5, "heartbeat timeout", 30);
        // Its path failed and came back: a silence after that is on the SSID again.
        o.session_started("flapper", 6, "Ward", "i", "sdk", 0);
        o.path_lost("flapper", true);
        o.path_lost("flapper", false);
        o.session_ended("flapper", 6, "heartbeat timeout", 30);
        for (device, left, flags) in [
            ("walker", true, vec![]),
            ("leaver", true, vec![]),
            ("silent", false, vec!["heartbeat_silent"]),
            ("faded", true, vec![]),
            ("flapper", false, vec!["heartbeat_silent"]),
        ] {
            let d = o.device(device, 40);
            assert_eq!((d.left_wifi, d.flags), (left, flags), "{device}");
        }
        assert_eq!(
            o.device("leaver", 40).last_provider_stop_reason,
            "noNetworkAvailable"
        );
        let (sessions, _) = o.history("leaver");
        assert_eq!(
            (sessions[0].provider_stop_reason, sessions[0].left_wifi),
            ("noNetworkAvailable", true)
        );
        let site = &o.sites(&HashMap::new(), 40)[0];
        assert_eq!((site.left_wifi, site.heartbeat_misses), (3, 4));
        // Silent with its connection already dead, then back: its next hello says iOS stopped
        // it for leaving the network. The silence was the walk out; the flag goes.
        o.previous_stop("silent", "noNetworkAvailable");
        let d = o.device("silent", 40);
        assert_eq!(
            (d.left_wifi, d.flags, d.last_provider_stop_reason),
            (true, vec![], "noNetworkAvailable")
        );
        // Said twice, or for a reason that is not the network, or about a session that did
        // not end in silence: nothing changes.
        o.previous_stop("silent", "noNetworkAvailable");
        o.previous_stop("flapper", "userInitiated");
        o.previous_stop("leaver", "noNetworkAvailable");
        let site = &o.sites(&HashMap::new(), 40)[0];
        assert_eq!((site.left_wifi, site.heartbeat_misses), (4, 4));
        assert_eq!(o.device("flapper", 40).flags, ["heartbeat_silent"]);
        // The leaver's goodbye and the silent phone's late word.
        assert_eq!(site.provider_stops, BTreeMap::from([("noNetworkAvailable", 2)]));
        let diagnosed: Vec<_> = o.diagnoses().into_iter().map(|d| d.device_id).collect();
        assert_eq!(
            diagnosed,
            ["flapper", "silent"],
            "newest first; a log line stays said"
        );
    }

    #[test]
    fn most_of_an_ssid_dropping_at_once_flags_the_site() {
        let o = observer();
        for i in 0..5 {
            o.session_started(&format!("p{i}"), i, "Ward 4B", "i", "sdk", 0);
        }
        // Goodbyes are deliberate and never count; two network drops are below 60 % of 5.
        o.session_ended("p0", 0, "device goodbye: GOODBYE_REASON_CLIENT_STOPPING", 100);
        o.session_ended("p1", 1, "read failed: connection reset", 200);
        o.session_ended("p2", 2, "heartbeat timeout", 300);
        assert!(o.diagnoses().iter().all(|d| d.kind != "site_drop"));
        o.session_ended("p3", 3, "connection closed by device", 400);
        let d = o
            .diagnoses()
            .into_iter()
            .find(|d| d.kind == "site_drop")
            .expect("site flagged");
        assert_eq!(d.ssid, "Ward 4B");
        let sites = o.sites(&HashMap::from([("Ward 4B".to_string(), 1)]), 500);
        assert!(sites[0].drop_flagged && sites[0].expected == 5 && sites[0].online == 1);
        assert_eq!(o.flagged(500).2, 1);
    }

    #[test]
    fn a_site_counts_the_devices_last_seen_on_it() {
        let o = observer();
        for i in 0..5 {
            o.session_started(&format!("p{i}"), i, "Ward 4B", "i", "sdk", 0);
        }
        // Two phones roam to another ward and log in there; Ward 4B now has three.
        o.session_started("p3", 13, "Ward 5C", "i", "sdk", 10);
        o.session_started("p4", 14, "Ward 5C", "i", "sdk", 10);
        // A new session on the same SSID changes nothing.
        o.session_started("p0", 10, "Ward 4B", "i", "sdk", 20);
        o.session_ended("p0", 10, "read failed: connection reset", 100);
        o.session_ended("p1", 1, "read failed: connection reset", 200);
        assert!(o.diagnoses().iter().all(|d| d.kind != "site_drop"));
        // All three drop (the minimum of 3 is met): flagged, out of 3, not 5.
        o.session_ended("p2", 2, "read failed: connection reset", 300);
        let d = o
            .diagnoses()
            .into_iter()
            .find(|d| d.kind == "site_drop")
            .expect("site flagged");
        assert!(d.detail.starts_with("3 of 3 devices"), "{}", d.detail);
    }

    #[test]
    fn devices_and_sites_named_by_peers_are_bounded() {
        let o = Observer::new(&Limits {
            observe_max_devices: 100,
            observe_max_sites: 10,
            ..Limits::default()
        });
        o.session_started("online-phone", 0, "Ward 4B", "inst", "sdk", 0);
        // A thousand devices, each on an SSID of its own, then receipts for ten thousand
        // device ids nobody registered.
        for i in 1..1000u64 {
            let (id, t) = (format!("p{i}"), i as i64);
            o.session_started(&id, i, &format!("ssid-{i}"), "inst", "sdk", t);
            o.session_ended(&id, i, "connection closed by device", t);
        }
        for i in 0..10_000i64 {
            let id = format!("junk-{i}");
            o.receipt(
                &id,
                "m",
                PushKind::Message,
                ReceiptState::Undeliverable,
                "",
                "unknown device",
                5_000 + i,
                None,
            );
        }
        {
            let st = o.state.lock();
            assert!(st.devices.len() <= 100, "{} devices", st.devices.len());
            // Sites with a remembered device stay; the others are capped.
            assert!(st.sites.len() <= 100 + 10, "{} sites", st.sites.len());
        }
        // The online device was never forgotten, nor its site.
        assert_eq!(o.device("online-phone", 20_000).instance_id, "inst");
        assert_eq!(o.history("online-phone").0.len(), 1);
        let sites = o.sites(&HashMap::new(), 20_000);
        let ward = sites.iter().find(|s| s.ssid == "Ward 4B").expect("site kept");
        assert_eq!(ward.expected, 1);
        // The newest junk id is remembered, the oldest forgotten.
        assert_eq!(o.history("junk-9999").1.len(), 1);
        assert!(o.history("junk-0").1.is_empty());
    }

    #[test]
    fn history_is_bounded() {
        let o = Observer::new(&Limits {
            observe_deliveries_per_device: 3,
            ..Limits::default()
        });
        for i in 0..10 {
            let id = format!("m{i}");
            o.receipt(
                "p",
                &id,
                PushKind::Message,
                ReceiptState::Acked,
                "local",
                "",
                i,
                Some(1),
            );
        }
        let (_, deliveries) = o.history("p");
        let ids: Vec<_> = deliveries.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["m9", "m8", "m7"]);
    }
}

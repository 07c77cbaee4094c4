//! Scenario files: TOML, one `[[step]]` table per thing that happens, so a field report becomes
//! a test without code. See `nepush-provider/scenarios/README.md` for the format.

use std::{fmt, path::Path, time::Duration};

use nepush_provider::{CallOutcome, CallOutcomeResult, NEProviderStopReason, outcomes};
use serde::{Deserialize, Deserializer, de::Error as _};

/// One scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, printed in the report.
    pub name: String,
    /// The field report or behaviour it reproduces.
    #[serde(default)]
    pub description: String,
    /// How the push-server is started.
    #[serde(default)]
    pub server: ServerSettings,
    /// The simulated phone.
    pub phone: PhoneSettings,
    /// Tolerances of the invariant checks.
    #[serde(default)]
    pub checks: Checks,
    /// What happens, in order.
    #[serde(rename = "step")]
    pub steps: Vec<Step>,
}

impl Scenario {
    /// Read and check a scenario file.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Parse and check scenario text.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let s: Scenario = toml::from_str(text)?;
        if s.steps.is_empty() {
            anyhow::bail!("no [[step]]");
        }
        if s.phone.site_ssids.is_empty() {
            anyhow::bail!("phone.site_ssids is empty: the site needs at least one SSID");
        }
        Ok(s)
    }
}

/// The `[server]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// `--heartbeat-interval-ms`.
    pub heartbeat_interval_ms: u64,
    /// `--heartbeat-timeout-ms`.
    pub heartbeat_timeout_ms: u64,
    /// `limits.call_ack_window_ms`.
    pub call_ack_window_ms: u64,
    /// Run the APNs bridge (`apns-bridge serve --fake-apns`) and route the VoIP fallback to it.
    pub apns_fallback: bool,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 30_000,
            heartbeat_timeout_ms: 10_000,
            call_ack_window_ms: 3_000,
            apns_fallback: false,
        }
    }
}

impl ServerSettings {
    /// The longest a silent device stays online on the server: one interval until the next
    /// heartbeat, then the answer deadline.
    pub fn heartbeat_deadline(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms + self.heartbeat_timeout_ms)
    }
}

/// The `[phone]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhoneSettings {
    /// The device id it is enrolled as.
    pub device_id: String,
    /// The site's SSIDs (the server's `[site] ssids`); enrollment hands them to the app, which
    /// saves them as the push managers' `matchSSIDs`.
    pub site_ssids: Vec<String>,
    /// The app's PushKit token (hex), handed to every instance as the app group would.
    #[serde(default)]
    pub voip_token: Option<String>,
    /// Forward Wi-Fi joins and departures to running instances as `network_changed`, as the
    /// Swift subclass does from `NWPathMonitor` (default true).
    #[serde(default = "yes")]
    pub path_monitor: bool,
    /// How far the phone's wall clock is off, ms (positive: fast). Only the app's own clock
    /// readings see it (the PushKit handler, call-outcome times); the SDK runs on monotonic time.
    #[serde(default)]
    pub clock_skew_ms: i64,
}

fn yes() -> bool {
    true
}

/// The `[checks]` table: tolerances of the invariant checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Checks {
    /// Added to deadlines measured on the server (scheduling, the presence stream).
    pub deadline_slack_ms: u64,
    /// Open file descriptors allowed above the baseline once everything settled.
    pub fd_tolerance: usize,
    /// Resident memory growth allowed over a repeat, after its warm-up, KiB.
    pub rss_growth_max_kib: u64,
}

impl Default for Checks {
    fn default() -> Self {
        Self {
            deadline_slack_ms: 500,
            fd_tolerance: 4,
            rss_growth_max_kib: 8 * 1024,
        }
    }
}

/// One thing that happens. In a file: `[[step]]` with one key, or `{ key = value }` inside a
/// `repeat`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// The phone joins this Wi-Fi (matching or not). Roaming between the site's SSIDs keeps its
    /// connections; any other change loses the old network first.
    Join(String),
    /// The phone leaves the Wi-Fi (the path is gone first), then iOS calls
    /// `stop(noNetworkAvailable)` and releases the instance.
    Leave(Yes),
    /// The phone leaves the Wi-Fi and iOS never calls stop (field report).
    LeaveWithoutStop(Yes),
    /// iOS starts the provider: launches the extension and creates an instance if needed.
    Start(Yes),
    /// iOS stops the current instance with this `NEProviderStopReason` (Swift case name),
    /// waits for the completion handler, and releases it.
    Stop(#[serde(deserialize_with = "stop_reason")] NEProviderStopReason),
    /// `handleTimerEvent()` this many times.
    Timer(u32),
    /// Simulated time passes ("4h", "10m", "90s") for the server, the SDK and iOS (see
    /// [`crate::time`]): the server's deadlines fire, the SDK's retries and timeouts play out,
    /// iOS fires `handleTimerEvent()` every 60 s (consecutive events with nothing in between
    /// collapsed to at most three).
    Advance(SimDuration),
    /// `true`: the site loses the server (a crash, or its link cut): every open connection is
    /// closed at both ends and new ones are refused, while the phone stays on the Wi-Fi.
    /// `false`: the server is reachable again.
    Outage(bool),
    /// The extension process is killed (jetsam, watchdog): no stop, no goodbye.
    Kill(Yes),
    /// iOS relaunches the killed extension: a new process reads the app group and starts a new
    /// instance.
    Relaunch(Yes),
    /// iOS creates and starts a new instance while the current one is never stopped (field
    /// report). `true`, or `{ release_old = true }` when iOS also drops the old object.
    NewInstanceWithoutStop(NewInstance),
    /// `stop(reason)` and `start()` at the same moment (on a new instance if there is none):
    /// `"reason"`, or `{ reason = "...", new_instance = true }` for the stop of the current
    /// instance racing the start of a new one.
    StopRacingStart(Race),
    /// A sender sends a text message to the device.
    Send(SendMessage),
    /// A sender calls the device.
    Call(PlaceCall),
    /// The caller cancels: `"call-id"` or `{ id = "...", reason = "answeredElsewhere" }`.
    CancelCall(CancelCall),
    /// The user answers the call in CallKit (`CXAnswerCallAction`): the app reports `answered`
    /// through the app group (forwarded by a running provider, else after the next start).
    AnswerCall(String),
    /// The user declines the ringing call (`CXEndCallAction` before answering): `declined`.
    DeclineCall(String),
    /// The user hangs up the answered call (`CXEndCallAction` after answering): `ended`.
    HangUpCall(String),
    /// The call rings out on the phone unanswered (the app ends it): `missed`.
    LetCallRingOut(String),
    /// The current instance is connected and the server shows the device online with the same
    /// session.
    ExpectConnected(Yes),
    /// The server marks the device offline: `{ within = "heartbeat" | "500ms", reason = "..." }`,
    /// measured from the last step that cut the phone off.
    ExpectOfflineOnServer(OfflineExpectation),
    /// A notification was shown: `"message-id"` or `{ id = "...", title = "...", body = "..." }`.
    ExpectNotification(NotificationExpectation),
    /// A call was reported with the expected dictionary.
    ExpectIncomingCall(CallExpectation),
    /// A cancellation was reported: `"call-id"` or `{ id = "...", reason = "..." }`.
    ExpectCallCancelled(CancelExpectation),
    /// The server rang this call through the APNs bridge (`WatchCall` path "apns", and the
    /// fake APNs received it).
    ExpectCallFellBackToApns(String),
    /// The call fell back to APNs (as `expect_call_fell_back_to_apns`) and the app's PushKit
    /// handler, deciding with the phone's own clock (`mobile_sdk::voip::decide`, the payload the
    /// bridge builds from the invite), rings it for at most its ring time.
    ExpectVoipPushRings(String),
    /// The server replied to the app's report and the extension deleted it from the app group:
    /// `{ id = "...", outcome = "answered", result = "recorded" }` (`result` left out: any).
    ExpectOutcomeReplied(OutcomeExpectation),
    /// The app group's pending-outcomes file holds exactly this many reports.
    ExpectPendingOutcomes(usize),
    /// The server refused the phone's answer and the provider told the app to end the call
    /// (`reportIncomingCall`, `kind` = `"end"`): `"call-id"` or `{ id = "...", reason =
    /// "answeredElsewhere" | "callEnded" }`.
    ExpectCallEnded(CancelExpectation),
    /// A missed-call notification was shown for this call (a cancel with reason `missed`).
    ExpectMissedCallNotification(String),
    /// Nothing with this id was shown or reported so far (no notification, no incoming call).
    ExpectNotShown(String),
    /// After the last `outage = false`, the phone is connected again within this much time
    /// (simulated, stepped through its retries; "5s").
    ExpectBackWithin(SimDuration),
    /// The sender sees this outcome of the call once it ended (`WatchCall` to its end, then
    /// `GetCallStatus`): `{ id, state = "missed" | "answered" | "declined" | "cancelled" }`.
    ExpectCallState(StateExpectation),
    /// The sender sees this final state of the message for the device (`WatchMessage` to its
    /// end): `{ id, state = "acked" | "expired" }`.
    ExpectMessageState(StateExpectation),
    /// Run `steps` `times` times (churn); resources are compared between the end of the
    /// warm-up and the end.
    Repeat(Repeat),
}

impl Step {
    /// Lifecycle events a step drives (counted as churn cycles).
    pub fn is_lifecycle(&self) -> bool {
        matches!(
            self,
            Step::Join(_)
                | Step::Leave(_)
                | Step::LeaveWithoutStop(_)
                | Step::Start(_)
                | Step::Stop(_)
                | Step::Timer(_)
                | Step::Advance(_)
                | Step::Outage(_)
                | Step::Kill(_)
                | Step::Relaunch(_)
                | Step::NewInstanceWithoutStop(_)
                | Step::StopRacingStart(_)
        )
    }
}

impl Step {
    /// The step as run in iteration `i` of a `repeat`: `{i}` in ids becomes the iteration
    /// number, so each iteration sends its own messages and calls.
    pub fn for_iteration(&self, i: u32) -> Step {
        let sub = |s: &str| s.replace("{i}", &i.to_string());
        let mut step = self.clone();
        match &mut step {
            Step::Send(m) => m.id = sub(&m.id),
            Step::Call(c) => c.id = sub(&c.id),
            Step::CancelCall(CancelCall::Id(id) | CancelCall::Options { id, .. })
            | Step::ExpectNotification(
                NotificationExpectation::Id(id) | NotificationExpectation::Options { id, .. },
            )
            | Step::ExpectCallCancelled(CancelExpectation::Id(id) | CancelExpectation::Options { id, .. })
            | Step::ExpectCallFellBackToApns(id)
            | Step::ExpectVoipPushRings(id) => *id = sub(id),
            Step::ExpectIncomingCall(c) => c.id = sub(&c.id),
            Step::AnswerCall(id)
            | Step::DeclineCall(id)
            | Step::HangUpCall(id)
            | Step::LetCallRingOut(id)
            | Step::ExpectMissedCallNotification(id)
            | Step::ExpectNotShown(id)
            | Step::ExpectCallEnded(CancelExpectation::Id(id) | CancelExpectation::Options { id, .. }) => {
                *id = sub(id)
            }
            Step::ExpectCallState(e) | Step::ExpectMessageState(e) => e.id = sub(&e.id),
            Step::ExpectOutcomeReplied(o) => o.id = sub(&o.id),
            _ => {}
        }
        step
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Join(ssid) => write!(f, "join {ssid:?}"),
            Step::Leave(_) => write!(f, "leave (stop noNetworkAvailable)"),
            Step::LeaveWithoutStop(_) => write!(f, "leave without stop"),
            Step::Start(_) => write!(f, "start"),
            Step::Stop(r) => write!(f, "stop {r}"),
            Step::Timer(n) => write!(f, "timer x{n}"),
            Step::Advance(d) => write!(f, "advance {d}"),
            Step::Outage(true) => write!(f, "outage: the server is unreachable"),
            Step::Outage(false) => write!(f, "outage ends: the server is reachable"),
            Step::Kill(_) => write!(f, "kill"),
            Step::Relaunch(_) => write!(f, "relaunch"),
            Step::NewInstanceWithoutStop(n) => {
                write!(
                    f,
                    "new instance without stop (old {})",
                    if n.release_old() { "released" } else { "kept" }
                )
            }
            Step::StopRacingStart(r) => write!(
                f,
                "stop {} racing start{}",
                r.reason(),
                if r.new_instance() {
                    " of a new instance"
                } else {
                    ""
                }
            ),
            Step::Send(m) => write!(f, "send {}", m.id),
            Step::Call(c) => write!(f, "call {}", c.id),
            Step::CancelCall(c) => write!(f, "cancel call {}", c.id()),
            Step::AnswerCall(id) => write!(f, "the user answers call {id}"),
            Step::DeclineCall(id) => write!(f, "the user declines call {id}"),
            Step::HangUpCall(id) => write!(f, "the user hangs up call {id}"),
            Step::LetCallRingOut(id) => write!(f, "call {id} rings out on the phone"),
            Step::ExpectConnected(_) => write!(f, "expect connected"),
            Step::ExpectOfflineOnServer(o) => write!(f, "expect offline on server within {}", o.within),
            Step::ExpectNotification(n) => write!(f, "expect notification {}", n.id()),
            Step::ExpectIncomingCall(c) => write!(f, "expect incoming call {}", c.id),
            Step::ExpectCallCancelled(c) => write!(f, "expect call cancelled {}", c.id()),
            Step::ExpectCallFellBackToApns(id) => write!(f, "expect call {id} fell back to APNs"),
            Step::ExpectVoipPushRings(id) => write!(f, "expect the VoIP push of call {id} to ring"),
            Step::ExpectOutcomeReplied(o) => write!(
                f,
                "expect the {} report of call {} replied{}",
                outcomes::outcome_name(o.outcome).unwrap_or("?"),
                o.id,
                o.result
                    .map(|r| format!(" {}", result_name(r)))
                    .unwrap_or_default()
            ),
            Step::ExpectPendingOutcomes(n) => write!(f, "expect {n} call outcomes pending in the app group"),
            Step::ExpectCallEnded(c) => write!(f, "expect call {} ended by the server's reply", c.id()),
            Step::ExpectMissedCallNotification(id) => write!(f, "expect a missed-call notification for {id}"),
            Step::ExpectNotShown(id) => write!(f, "expect {id} never shown"),
            Step::ExpectBackWithin(d) => write!(f, "expect the phone back within {d} of the outage's end"),
            Step::ExpectCallState(e) => write!(f, "expect call {} {}", e.id, e.state),
            Step::ExpectMessageState(e) => write!(f, "expect message {} {}", e.id, e.state),
            Step::Repeat(r) => write!(f, "repeat x{} ({} steps)", r.times, r.steps.len()),
        }
    }
}

/// `true` (a flag that must be set).
#[derive(Debug, Clone, Copy)]
pub struct Yes;

impl<'de> Deserialize<'de> for Yes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if bool::deserialize(d)? {
            Ok(Yes)
        } else {
            Err(D::Error::custom("write `true` (or leave the step out)"))
        }
    }
}

fn stop_reason<'de, D: Deserializer<'de>>(d: D) -> Result<NEProviderStopReason, D::Error> {
    let name = String::deserialize(d)?;
    NEProviderStopReason::from_name(&name).ok_or_else(|| {
        let all: Vec<&str> = NEProviderStopReason::ALL.iter().map(|r| r.name()).collect();
        D::Error::custom(format!(
            "unknown NEProviderStopReason {name:?}; one of {}",
            all.join(", ")
        ))
    })
}

/// A simulated or real duration: "4h", "10m", "90s", "250ms", "1d".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimDuration(pub Duration);

impl SimDuration {
    /// Parse "4h", "10m", "90s", "250ms", "1d".
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (n, unit) = s.split_at(split);
        let n: u64 = n
            .parse()
            .map_err(|_| format!("{s:?}: expected a number and a unit (4h, 10m, 90s, 250ms)"))?;
        let ms = match unit.trim() {
            "ms" => n,
            "s" => n * 1000,
            "m" | "min" => n * 60_000,
            "h" => n * 3_600_000,
            "d" => n * 86_400_000,
            other => return Err(format!("{s:?}: unknown unit {other:?} (ms, s, m, h, d)")),
        };
        Ok(Self(Duration::from_millis(ms)))
    }
}

impl fmt::Display for SimDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        match ms {
            0 => write!(f, "0s"),
            m if m % 86_400_000 == 0 => write!(f, "{}d", m / 86_400_000),
            m if m % 3_600_000 == 0 => write!(f, "{}h", m / 3_600_000),
            m if m % 60_000 == 0 => write!(f, "{}m", m / 60_000),
            m if m % 1000 == 0 => write!(f, "{}s", m / 1000),
            m => write!(f, "{m}ms"),
        }
    }
}

impl<'de> Deserialize<'de> for SimDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::parse(&String::deserialize(d)?).map_err(D::Error::custom)
    }
}

/// `new_instance_without_stop`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum NewInstance {
    /// `true`: the old object stays referenced (as in the report).
    Flag(bool),
    /// `{ release_old = true }`.
    Options {
        /// iOS drops the old object without stopping it.
        release_old: bool,
    },
}

impl NewInstance {
    /// Whether iOS drops the old instance.
    pub fn release_old(&self) -> bool {
        matches!(self, NewInstance::Options { release_old: true })
    }
}

/// `stop_racing_start`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Race {
    /// The reason; stop and start of the same instance.
    Reason(#[serde(deserialize_with = "stop_reason")] NEProviderStopReason),
    /// `{ reason = "...", new_instance = true }`.
    Options {
        /// The stop reason.
        #[serde(deserialize_with = "stop_reason")]
        reason: NEProviderStopReason,
        /// The stop of the current instance races the start of a new one.
        #[serde(default)]
        new_instance: bool,
    },
}

impl Race {
    /// The stop reason.
    pub fn reason(&self) -> NEProviderStopReason {
        match self {
            Race::Reason(r) | Race::Options { reason: r, .. } => *r,
        }
    }

    /// Whether a new instance starts.
    pub fn new_instance(&self) -> bool {
        matches!(
            self,
            Race::Options {
                new_instance: true,
                ..
            }
        )
    }
}

/// `send`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    /// Message id (the notification's identifier).
    pub id: String,
    /// Title.
    #[serde(default)]
    pub title: String,
    /// Body.
    #[serde(default)]
    pub body: String,
    /// Time-sensitive.
    #[serde(default)]
    pub high_priority: bool,
    /// Time to live ("5m"); left out, the server's default (24 h).
    #[serde(default)]
    pub ttl: Option<SimDuration>,
}

/// `expect_call_state` and `expect_message_state`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateExpectation {
    /// Call or message id.
    pub id: String,
    /// The state's short name (`missed`, `expired`, ...).
    pub state: String,
}

/// `call`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaceCall {
    /// Call id.
    pub id: String,
    /// Caller display name.
    #[serde(default)]
    pub caller_name: String,
    /// Caller handle.
    #[serde(default)]
    pub caller_handle: String,
    /// Video call.
    #[serde(default)]
    pub video: bool,
    /// Ring time, seconds.
    #[serde(default = "ring_seconds")]
    pub ring_seconds: u32,
}

fn ring_seconds() -> u32 {
    30
}

/// `cancel_call`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CancelCall {
    /// The call id (reason `callerCancelled`).
    Id(String),
    /// `{ id, reason }`.
    Options {
        /// Call id.
        id: String,
        /// `callerCancelled`, `answeredElsewhere` or `declinedElsewhere`.
        reason: String,
    },
}

impl CancelCall {
    /// Call id.
    pub fn id(&self) -> &str {
        match self {
            CancelCall::Id(id) | CancelCall::Options { id, .. } => id,
        }
    }

    /// The reason's name.
    pub fn reason(&self) -> &str {
        match self {
            CancelCall::Id(_) => "callerCancelled",
            CancelCall::Options { reason, .. } => reason,
        }
    }
}

/// `expect_offline_on_server`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfflineExpectation {
    /// `"heartbeat"` (interval + timeout + slack) or a duration ("500ms").
    pub within: Within,
    /// Text the server's offline reason must contain ("heartbeat", "goodbye").
    #[serde(default)]
    pub reason: Option<String>,
}

/// A deadline.
#[derive(Debug, Clone, Copy)]
pub enum Within {
    /// The server's heartbeat deadline.
    Heartbeat,
    /// A fixed time.
    Duration(SimDuration),
}

impl fmt::Display for Within {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Within::Heartbeat => write!(f, "the heartbeat deadline"),
            Within::Duration(d) => write!(f, "{d}"),
        }
    }
}

impl<'de> Deserialize<'de> for Within {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "heartbeat" {
            return Ok(Within::Heartbeat);
        }
        SimDuration::parse(&s)
            .map(Within::Duration)
            .map_err(D::Error::custom)
    }
}

/// `expect_notification`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum NotificationExpectation {
    /// The message id.
    Id(String),
    /// `{ id, title, body }`.
    Options {
        /// Message id.
        id: String,
        /// Expected title.
        #[serde(default)]
        title: Option<String>,
        /// Expected body.
        #[serde(default)]
        body: Option<String>,
    },
}

impl NotificationExpectation {
    /// Message id.
    pub fn id(&self) -> &str {
        match self {
            NotificationExpectation::Id(id) | NotificationExpectation::Options { id, .. } => id,
        }
    }
}

/// `expect_incoming_call`: the call's `userInfo`. The call UUID and ring deadline are checked
/// against what the server answered to `PlaceCall`; the rest against what was placed, or the
/// values given here.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallExpectation {
    /// Call id.
    pub id: String,
    /// Expected `callerName`.
    #[serde(default)]
    pub caller_name: Option<String>,
    /// Expected `callerHandle`.
    #[serde(default)]
    pub caller_handle: Option<String>,
    /// Expected `video`.
    #[serde(default)]
    pub video: Option<bool>,
}

/// `expect_call_cancelled`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CancelExpectation {
    /// Call id.
    Id(String),
    /// `{ id, reason }`.
    Options {
        /// Call id.
        id: String,
        /// Expected `reason`.
        reason: String,
    },
}

impl CancelExpectation {
    /// Call id.
    pub fn id(&self) -> &str {
        match self {
            CancelExpectation::Id(id) | CancelExpectation::Options { id, .. } => id,
        }
    }
}

/// `expect_outcome_replied`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutcomeExpectation {
    /// Call id.
    pub id: String,
    /// The report's outcome: `answered`, `declined`, `missed` or `ended`.
    #[serde(deserialize_with = "outcome")]
    pub outcome: CallOutcome,
    /// The server's result: `recorded`, `answeredElsewhere`, `callEnded` or `unknownCall`; left
    /// out, any result passes.
    #[serde(default, deserialize_with = "result")]
    pub result: Option<CallOutcomeResult>,
}

const RESULTS: [(CallOutcomeResult, &str); 4] = [
    (CallOutcomeResult::Recorded, "recorded"),
    (CallOutcomeResult::AnsweredElsewhere, "answeredElsewhere"),
    (CallOutcomeResult::CallEnded, "callEnded"),
    (CallOutcomeResult::UnknownCall, "unknownCall"),
];

/// The scenario name of a result (`"unspecified"` for one no scenario can name).
pub fn result_name(r: CallOutcomeResult) -> &'static str {
    RESULTS
        .iter()
        .find(|(x, _)| *x == r)
        .map_or("unspecified", |(_, n)| n)
}

fn outcome<'de, D: Deserializer<'de>>(d: D) -> Result<CallOutcome, D::Error> {
    let name = String::deserialize(d)?;
    outcomes::outcome_from_name(&name).ok_or_else(|| {
        D::Error::custom(format!(
            "unknown call outcome {name:?}; one of answered, declined, missed, ended"
        ))
    })
}

fn result<'de, D: Deserializer<'de>>(d: D) -> Result<Option<CallOutcomeResult>, D::Error> {
    let name = String::deserialize(d)?;
    RESULTS
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(r, _)| Some(*r))
        .ok_or_else(|| {
            let all: Vec<&str> = RESULTS.iter().map(|(_, n)| *n).collect();
            D::Error::custom(format!(
                "unknown call outcome result {name:?}; one of {}",
                all.join(", ")
            ))
        })
}

/// `repeat`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Repeat {
    /// Iterations.
    pub times: u32,
    /// Iterations before the resource baseline is taken.
    #[serde(default)]
    pub warmup: u32,
    /// The steps of one iteration; `{i}` in message and call ids is the iteration number.
    pub steps: Vec<Step>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_step_form() {
        let s = Scenario::parse(
            r#"
name = "all"
[phone]
device_id = "p"
site_ssids = [" Ward 4B ", "Station Ünfall 🚑"]
[[step]]
join = " Ward 4B "
[[step]]
start = true
[[step]]
stop = "unrecoverableNetworkChange"
[[step]]
advance = "4h"
[[step]]
new_instance_without_stop = { release_old = true }
[[step]]
stop_racing_start = { reason = "noNetworkAvailable", new_instance = true }
[[step]]
stop_racing_start = "superceded"
[[step]]
expect_offline_on_server = { within = "heartbeat", reason = "heartbeat" }
[[step]]
cancel_call = { id = "c1", reason = "answeredElsewhere" }
[[step]]
repeat = { times = 3, warmup = 1, steps = [{ timer = 2 }, { kill = true }, { relaunch = true }] }
[[step]]
outage = true
[[step]]
expect_back_within = "5s"
[[step]]
expect_call_state = { id = "c-{i}", state = "missed" }
[[step]]
send = { id = "m", ttl = "5m" }
"#,
        )
        .unwrap();
        assert_eq!(s.phone.site_ssids[0], " Ward 4B ");
        assert!(matches!(&s.steps[0], Step::Join(x) if x == " Ward 4B "));
        assert!(matches!(
            s.steps[2],
            Step::Stop(NEProviderStopReason::UnrecoverableNetworkChange)
        ));
        assert!(matches!(s.steps[3], Step::Advance(SimDuration(d)) if d == Duration::from_secs(4 * 3600)));
        assert!(matches!(&s.steps[4], Step::NewInstanceWithoutStop(n) if n.release_old()));
        assert!(matches!(&s.steps[5], Step::StopRacingStart(r) if r.new_instance()));
        assert!(matches!(&s.steps[9], Step::Repeat(r) if r.times == 3 && r.steps.len() == 3));
        assert!(s.phone.path_monitor);
        let Step::Repeat(r) = &s.steps[9] else {
            unreachable!()
        };
        let sent = Step::Send(SendMessage {
            id: "m-{i}".into(),
            title: String::new(),
            body: String::new(),
            high_priority: false,
            ttl: None,
        });
        assert!(matches!(sent.for_iteration(7), Step::Send(m) if m.id == "m-7"));
        assert!(matches!(r.steps[0].for_iteration(7), Step::Timer(2)));
        assert!(matches!(s.steps[10], Step::Outage(true)));
        assert!(matches!(s.steps[11], Step::ExpectBackWithin(SimDuration(d)) if d == Duration::from_secs(5)));
        assert!(
            matches!(s.steps[12].for_iteration(3), Step::ExpectCallState(e) if e.id == "c-3" && e.state == "missed")
        );
        assert!(
            matches!(&s.steps[13], Step::Send(m) if m.ttl == Some(SimDuration(Duration::from_secs(300))))
        );
        assert_eq!(s.phone.clock_skew_ms, 0);
    }

    #[test]
    fn mistakes_are_named() {
        let base = "name = \"x\"\n[phone]\ndevice_id = \"p\"\nsite_ssids = [\"a\"]\n";
        let err = Scenario::parse(&format!("{base}[[step]]\nstop = \"superseded\"\n")).unwrap_err();
        assert!(err.to_string().contains("unknown NEProviderStopReason"), "{err}");
        let err = Scenario::parse(&format!("{base}[[step]]\nadvance = \"4 hours\"\n")).unwrap_err();
        assert!(err.to_string().contains("unknown unit"), "{err}");
        let err = Scenario::parse(&format!("{base}[[step]]\nstart = false\n")).unwrap_err();
        assert!(err.to_string().contains("true"), "{err}");
        assert!(Scenario::parse(&format!("{base}[[step]]\nfly = true\n")).is_err());
        assert!(Scenario::parse(base).is_err(), "no steps");
    }

    #[test]
    fn parses_the_users_call_steps_and_their_expectations() {
        let s = Scenario::parse(
            r#"
name = "outcomes"
[phone]
device_id = "p"
site_ssids = ["Ward 4B"]
[[step]]
answer_call = "c1"
[[step]]
decline_call = "c2"
[[step]]
hang_up_call = "c1"
[[step]]
let_call_ring_out = "c3"
[[step]]
expect_outcome_replied = { id = "c1", outcome = "answered", result = "answeredElsewhere" }
[[step]]
expect_outcome_replied = { id = "c3", outcome = "missed" }
[[step]]
expect_pending_outcomes = 0
[[step]]
expect_call_ended = { id = "c1", reason = "callEnded" }
[[step]]
expect_call_ended = "c1"
[[step]]
expect_missed_call_notification = "c3"
"#,
        )
        .unwrap();
        assert!(matches!(&s.steps[0], Step::AnswerCall(id) if id == "c1"));
        assert!(matches!(&s.steps[1], Step::DeclineCall(id) if id == "c2"));
        assert!(matches!(&s.steps[2], Step::HangUpCall(id) if id == "c1"));
        assert!(matches!(&s.steps[3], Step::LetCallRingOut(id) if id == "c3"));
        assert!(matches!(
            &s.steps[4],
            Step::ExpectOutcomeReplied(OutcomeExpectation {
                outcome: CallOutcome::Answered,
                result: Some(CallOutcomeResult::AnsweredElsewhere),
                ..
            })
        ));
        assert!(matches!(
            &s.steps[5],
            Step::ExpectOutcomeReplied(OutcomeExpectation {
                outcome: CallOutcome::Missed,
                result: None,
                ..
            })
        ));
        assert!(matches!(s.steps[6], Step::ExpectPendingOutcomes(0)));
        assert!(matches!(
            &s.steps[7],
            Step::ExpectCallEnded(CancelExpectation::Options { reason, .. }) if reason == "callEnded"
        ));
        assert!(matches!(
            &s.steps[8],
            Step::ExpectCallEnded(CancelExpectation::Id(_))
        ));
        assert!(matches!(&s.steps[9], Step::ExpectMissedCallNotification(id) if id == "c3"));
        assert!(
            s.steps.iter().all(|s| !s.is_lifecycle()),
            "the user's steps are no lifecycle events"
        );
        let step = Step::AnswerCall("c-{i}".into()).for_iteration(4);
        assert!(matches!(step, Step::AnswerCall(id) if id == "c-4"));
        assert_eq!(
            s.steps[4].to_string(),
            "expect the answered report of call c1 replied answeredElsewhere"
        );
    }

    #[test]
    fn outcome_mistakes_are_named() {
        let base = "name = \"x\"\n[phone]\ndevice_id = \"p\"\nsite_ssids = [\"a\"]\n[[step]]\n";
        let err = Scenario::parse(&format!(
            "{base}expect_outcome_replied = {{ id = \"c\", outcome = \"picked up\" }}\n"
        ))
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown call outcome \"picked up\""),
            "{err:#}"
        );
        let err = Scenario::parse(&format!(
            "{base}expect_outcome_replied = {{ id = \"c\", outcome = \"answered\", result = \"ok\" }}\n"
        ))
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown call outcome result"),
            "{err:#}"
        );
        assert!(Scenario::parse(&format!("{base}answer_call = true\n")).is_err());
        assert!(Scenario::parse(&format!("{base}expect_pending_outcomes = -1\n")).is_err());
    }

    #[test]
    fn durations() {
        for (s, ms) in [
            ("250ms", 250),
            ("90s", 90_000),
            ("10m", 600_000),
            ("4h", 14_400_000),
            ("1d", 86_400_000),
        ] {
            let d = SimDuration::parse(s).unwrap();
            assert_eq!(d.0.as_millis(), ms);
            assert_eq!(d.to_string(), s);
        }
        assert!(SimDuration::parse("h").is_err());
    }
}

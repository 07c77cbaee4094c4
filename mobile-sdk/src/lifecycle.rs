//! Lifecycle: idempotent start and stop, and at most one live session per device per process.
//!
//! iOS has been seen to create new provider instances without releasing old ones, each logging
//! in again. So the [`Registry`] keys running sessions by device id, and instances carry a
//! generation (creation order): when an instance starts, an older instance's session for the
//! same device is stopped, and its release awaited, before the new one connects. An older
//! instance can never take the device back. A session task holds no reference to its
//! [`Client`], so a client the host forgets is freed, and its task ends with it.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    runtime::Handle,
    sync::{mpsc, watch},
    task::AbortHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{
    clock::Clock,
    config::{ClientConfig, ConfigError},
    core::{
        self, CallOutcome, HostStop, InvalidReport, LastSeen, NetworkEvent, OutcomeReport, Session, State,
        StopReason,
    },
    counters::{Counters, Guard, Resource, Snapshot},
    driver::{Driver, DriverStats, EventHandler, Input, Shared, Transport},
    tls,
};

/// A stopping session gets this long to say goodbye and close before its task is aborted.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Host inputs (network changes, timer events) queued for a session.
const INPUT_QUEUE: usize = 32;

/// Why a start was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A newer instance for the same device exists; this one stays stopped.
    #[error("a newer instance for device {0} has started; this one stays stopped")]
    Superseded(String),
    /// The runtime the registry spawns on is shutting down.
    #[error("the SDK runtime is shutting down")]
    RuntimeGone,
}

/// The process-wide (or, in tests, per-simulated-process) set of live sessions.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<RegistryInner>,
}

struct RegistryInner {
    runtime: Handle,
    clock: Clock,
    counters: Arc<Counters>,
    slots: Mutex<HashMap<String, Slot>>,
    /// Per device, the floor (and its epoch) the latest ended session handed over: a newer
    /// instance starts from it even if the host created it from a persisted value not yet up
    /// to date.
    taken: Mutex<HashMap<String, LastSeen>>,
    /// Per device, why the host stopped its latest session (Apple's name), for the next
    /// session's hello: the goodbye that said it may not have got through.
    stops: Mutex<HashMap<String, &'static str>>,
    next_generation: AtomicU64,
}

/// The device's current owner (highest generation that started) and its running session.
struct Slot {
    generation: u64,
    running: Option<Arc<Running>>,
}

/// A running session task, as seen from outside.
struct Running {
    cancel: CancellationToken,
    reason: Arc<Mutex<Option<HostStop>>>,
    inputs: mpsc::Sender<Input>,
    finished: watch::Receiver<bool>,
    abort: AbortHandle,
}

impl Running {
    fn is_finished(&self) -> bool {
        *self.finished.borrow()
    }

    async fn wait_finished(&self) {
        // The sender only goes away after reporting `true`.
        let _ = self.finished.clone().wait_for(|done| *done).await;
    }

    /// Stop gracefully; abort only if the task does not finish within the grace period.
    async fn stop(&self, reason: HostStop) {
        self.reason.lock().expect("poisoned").get_or_insert(reason);
        self.cancel.cancel();
        if tokio::time::timeout(STOP_GRACE, self.wait_finished())
            .await
            .is_err()
        {
            tracing::warn!("session task did not stop in time; aborting it");
            self.abort.abort();
            self.wait_finished().await;
        }
    }
}

/// Owned by a session task: when the task ends (or is aborted), it frees the device slot,
/// then the task count, and only then reports the task finished, so whoever waits for the
/// finish sees everything released.
struct TaskGuard {
    registry: Weak<RegistryInner>,
    device_id: String,
    generation: u64,
    shared: Arc<Shared>,
    task: Option<Guard>,
    finished: watch::Sender<bool>,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if let Some(registry) = self.registry.upgrade() {
            let mut slots = registry.slots.lock().expect("poisoned");
            if slots
                .get(&self.device_id)
                .is_some_and(|s| s.generation == self.generation)
            {
                slots.remove(&self.device_id);
            }
            drop(slots);
            let mut taken = registry.taken.lock().expect("poisoned");
            // A device's sessions run one after the other, each starting from the previous
            // one's floor: the ending one has the latest.
            taken.insert(self.device_id.clone(), self.shared.last_seen());
        }
        drop(self.task.take());
        self.finished.send_replace(true);
    }
}

impl Registry {
    /// A registry whose sessions run on `runtime`.
    pub fn new(runtime: Handle) -> Self {
        Self::with_clock(runtime, Clock::default())
    }

    /// A registry whose sessions read the time from `clock`, which the Linux lifecycle host
    /// moves forward (simulated time; never in the app).
    #[cfg(feature = "test-clock")]
    pub fn new_with_clock(runtime: Handle, clock: Clock) -> Self {
        Self::with_clock(runtime, clock)
    }

    fn with_clock(runtime: Handle, clock: Clock) -> Self {
        Self {
            inner: Arc::new(RegistryInner {
                runtime,
                clock,
                counters: Arc::new(Counters::default()),
                slots: Mutex::new(HashMap::new()),
                taken: Mutex::new(HashMap::new()),
                stops: Mutex::new(HashMap::new()),
                next_generation: AtomicU64::new(1),
            }),
        }
    }

    /// Live instances, sessions, tasks, sockets and connections.
    pub fn counters(&self) -> Snapshot {
        self.inner.counters.snapshot()
    }

    /// Wait until `pred` holds on the counters, at most `timeout`.
    pub async fn wait_for_counters(
        &self,
        timeout: Duration,
        pred: impl Fn(&Snapshot) -> bool,
    ) -> Result<Snapshot, Snapshot> {
        self.inner.counters.wait_until(timeout, pred).await
    }

    /// Create a client (not started). Newer clients win over older ones for the same device.
    pub fn client(
        &self,
        config: ClientConfig,
        handler: Arc<dyn EventHandler>,
    ) -> Result<Client, ConfigError> {
        config.validate()?;
        let transport = Transport {
            host: config.host.clone(),
            port: config.port,
            server_name: tls::server_name(config.server_name())?,
            tls: Arc::new(tls::client_config(&config.trust)?),
            write_timeout: config.write_timeout,
            keepalive: config.tcp_keepalive,
            local_addr: config.local_addr,
        };
        let inner = ClientInner {
            generation: self.inner.next_generation.fetch_add(1, Ordering::SeqCst),
            instance_id: uuid::Uuid::new_v4().to_string(),
            jitter_seed: config.jitter_seed.unwrap_or_else(rand::random),
            shared: Arc::new(Shared::new(config.last_seen, config.voip_token.clone())),
            transport: Arc::new(transport),
            handler,
            config,
            run: Mutex::new(None),
            ops: tokio::sync::Mutex::new(()),
            _instance: self.inner.counters.guard(Resource::Instance),
            registry: self.clone(),
        };
        Ok(Client {
            inner: Arc::new(inner),
        })
    }

    /// Take the device for `generation`: returns the older running session to stop, or
    /// refuses if a newer generation holds the device.
    fn claim(&self, device_id: &str, generation: u64) -> Result<Option<Arc<Running>>, StartError> {
        let mut slots = self.inner.slots.lock().expect("poisoned");
        let slot = slots.entry(device_id.to_owned()).or_insert(Slot {
            generation,
            running: None,
        });
        if slot.generation > generation {
            return Err(StartError::Superseded(device_id.to_owned()));
        }
        slot.generation = generation;
        Ok(slot.running.take())
    }

    /// Spawn the session task, under the registry lock, if `generation` still owns the device:
    /// a newer instance claiming it afterwards finds this session and stops it.
    fn spawn(&self, client: &ClientInner) -> Result<Arc<Running>, StartError> {
        let mut slots = self.inner.slots.lock().expect("poisoned");
        let device_id = &client.config.device_id;
        let slot = match slots.get_mut(device_id) {
            Some(slot) if slot.generation == client.generation => slot,
            _ => return Err(StartError::Superseded(device_id.clone())),
        };
        let (inputs_tx, inputs) = mpsc::channel(INPUT_QUEUE);
        let (finished_tx, finished) = watch::channel(false);
        let cancel = CancellationToken::new();
        let reason = Arc::new(Mutex::new(None));
        let c = &client.config;
        let session = Session::new(core::Config {
            instance_id: client.instance_id.clone(),
            ssid: c.ssid.clone(),
            // A restarted client resumes from what its app took, not from its configuration.
            last_seen: client.shared.last_seen(),
            voip_token: client.shared.voip_token(),
            // Reports of an earlier session of this client that the server never answered.
            outcome_reports: client.shared.pending_outcomes(),
            previous_stop: self
                .inner
                .stops
                .lock()
                .expect("poisoned")
                .remove(device_id)
                .unwrap_or(""),
            timing: c.timing,
            backoff: c.backoff,
            jitter_seed: client.jitter_seed,
            ..core::Config::new(c.credential.clone())
        });
        let driver = Driver {
            session,
            transport: client.transport.clone(),
            handler: client.handler.clone(),
            shared: client.shared.clone(),
            inputs,
            cancel: cancel.clone(),
            stop_reason: reason.clone(),
            counters: self.inner.counters.clone(),
            clock: self.inner.clock.session(),
        };
        // Created before the spawn, so even a task aborted before its first poll reports.
        let guard = TaskGuard {
            registry: Arc::downgrade(&self.inner),
            device_id: device_id.clone(),
            generation: client.generation,
            shared: client.shared.clone(),
            task: Some(self.inner.counters.guard(Resource::Task)),
            finished: finished_tx,
        };
        let task = self.inner.runtime.spawn(async move {
            let guard = guard;
            driver.run().await;
            drop(guard);
        });
        let running = Arc::new(Running {
            cancel,
            reason,
            inputs: inputs_tx,
            finished,
            abort: task.abort_handle(),
        });
        slot.running = Some(running.clone());
        Ok(running)
    }
}

/// One provider instance's connection: create it with [`Registry::client`], then
/// [`Client::start`] and [`Client::stop`] (both idempotent). Cheap to clone; the session stops
/// when the last clone is dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    registry: Registry,
    generation: u64,
    instance_id: String,
    jitter_seed: u64,
    config: ClientConfig,
    transport: Arc<Transport>,
    handler: Arc<dyn EventHandler>,
    shared: Arc<Shared>,
    run: Mutex<Option<Arc<Running>>>,
    /// Serialises start and stop of this instance.
    ops: tokio::sync::Mutex<()>,
    _instance: Guard,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        // Cannot wait here: ask the task to stop; it releases everything on its own.
        if let Some(run) = self.run.get_mut().expect("poisoned").take() {
            run.reason
                .lock()
                .expect("poisoned")
                .get_or_insert(StopReason::HostRequested.into());
            run.cancel.cancel();
        }
    }
}

impl Client {
    /// Start connecting (and keep reconnecting) unless already running. Stops an older
    /// instance's session for the same device first, and waits until it is released.
    pub async fn start(&self) -> Result<(), StartError> {
        let inner = self.inner.clone();
        self.on_runtime(async move { inner.start().await })
            .await
            .unwrap_or(Err(StartError::RuntimeGone))
    }

    /// Stop: say goodbye (with the host's reason, see [`HostStop`]), close the connection, end
    /// the task. Returns once all of it is released. Does nothing if not running.
    pub async fn stop(&self, reason: impl Into<HostStop>) {
        let (inner, reason) = (self.inner.clone(), reason.into());
        // Only fails if the runtime itself is gone, and with it every task.
        let _ = self.on_runtime(async move { inner.stop(reason).await }).await;
    }

    /// Report a network change.
    pub fn network_changed(&self, event: NetworkEvent) {
        self.inner.send(Input::Network(event));
    }

    /// Register the PushKit (VoIP) token (hex), or clear it with an empty string, so calls
    /// reach the device through APNs when it is off-site. Kept for later starts of this client.
    pub fn set_voip_token(&self, token: String) {
        self.inner.shared.set_voip_token(token.clone());
        self.inner.send(Input::VoipToken(token));
    }

    /// Report what the user did with a call (CallKit's answer or end action, or a ring that
    /// timed out), at `at_ms` by the phone's clock (Unix ms). Sent on the live session, and
    /// again at the start of every later session of this client (restarts included) until the
    /// server replies; then [`core::Event::CallOutcomeReplied`] tells the host, which deletes its
    /// durable copy. Keep that copy (the app group) and report it again to a new client: this one
    /// remembers only while it lives. Refused if the server would refuse it (empty or overlong
    /// call id, unspecified outcome). A repeat of a pending report is not sent twice.
    pub fn report_call_outcome(
        &self,
        call_id: String,
        outcome: CallOutcome,
        at_ms: i64,
    ) -> Result<(), InvalidReport> {
        let report = OutcomeReport {
            call_id,
            outcome,
            at_ms,
        };
        report.check()?;
        self.inner.shared.add_outcome(report.clone());
        self.inner.send(Input::CallOutcome(report));
        Ok(())
    }

    /// Call-outcome reports not replied to yet, oldest first.
    pub fn pending_call_outcomes(&self) -> Vec<OutcomeReport> {
        self.inner.shared.pending_outcomes()
    }

    /// Report the host's periodic timer (`handleTimerEvent`): a backstop only.
    pub fn timer_event(&self) {
        self.inner.send(Input::SystemTimer);
    }

    /// Last reported connection state.
    pub fn state(&self) -> State {
        self.inner.shared.state()
    }

    /// The floor (highest push sequence the app has taken) and its epoch: persist them
    /// together, pass them back at the next start.
    pub fn last_seen(&self) -> LastSeen {
        self.inner.shared.last_seen()
    }

    /// The random id of this instance (sent in the hello).
    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    /// Driver statistics.
    pub fn stats(&self) -> DriverStats {
        self.inner.shared.stats()
    }

    /// Run a lifecycle operation on the registry's runtime, so the caller's executor (Swift,
    /// Python's asyncio, a test) does not matter and a dropped caller cannot cut it in half.
    async fn on_runtime<T: Send + 'static>(&self, op: impl Future<Output = T> + Send + 'static) -> Option<T> {
        let counters = &self.inner.registry.inner.counters;
        let guard = counters.guard(Resource::Task);
        let task = self.inner.registry.inner.runtime.spawn(async move {
            let out = op.await;
            drop(guard);
            out
        });
        match task.await {
            Ok(out) => Some(out),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => None,
        }
    }
}

impl ClientInner {
    async fn start(&self) -> Result<(), StartError> {
        let _op = self.ops.lock().await;
        let current = self.run.lock().expect("poisoned").clone();
        if let Some(run) = current {
            if !run.is_finished() && !matches!(self.shared.state(), State::Stopped(_)) {
                return Ok(());
            }
            // Stopped for good by the server: its task is on its way out.
            run.wait_finished().await;
        }
        let registry = &self.registry;
        if let Some(older) = registry.claim(&self.config.device_id, self.generation)? {
            tracing::info!(device = %self.config.device_id, "a newer instance supersedes the running session");
            older.stop(StopReason::Superseded.into()).await;
        }
        let taken = registry.inner.taken.lock().expect("poisoned");
        if let Some(seen) = taken.get(&self.config.device_id) {
            self.shared.raise_last_seen(*seen);
        }
        drop(taken);
        let running = registry.spawn(self)?;
        *self.run.lock().expect("poisoned") = Some(running);
        Ok(())
    }

    async fn stop(&self, reason: HostStop) {
        let _op = self.ops.lock().await;
        let run = self.run.lock().expect("poisoned").take();
        if let Some(run) = run {
            run.stop(reason).await;
            if !reason.provider_reason.is_empty() {
                let mut stops = self.registry.inner.stops.lock().expect("poisoned");
                stops.insert(self.config.device_id.clone(), reason.provider_reason);
            }
        }
    }

    fn send(&self, input: Input) {
        let run = self.run.lock().expect("poisoned").clone();
        if let Some(run) = run
            && let Err(e) = run.inputs.try_send(input)
        {
            // Only a host flooding inputs fills the queue; the timer backstop covers a loss, and
            // call outcomes are handed over again from `shared` at the next session.
            tracing::warn!(error = %e, "session input dropped");
        }
    }
}

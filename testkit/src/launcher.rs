//! The `push-server` and `apns-bridge` binaries as child processes (e2e's tests, loadgen's
//! benchmarks): where the binaries are, a clean command line, the ready line and its addresses,
//! kill (SIGKILL), stop (SIGTERM) and restart on the same data directory, and talking to the
//! server over real TLS with the `push-server` crate's device and API clients.
//!
//! The binaries are taken from `target/<profile>/`, next to the test executable; build them
//! first with `cargo build -p push-server -p apns-bridge` (or set `PUSH_SERVER_BIN`,
//! `APNS_BRIDGE_BIN`).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::OnceLock,
    time::{Duration, Instant, SystemTime},
};

use push_proto::{
    device::Hello,
    sender::{
        DeliveryState, GetMessageStatusRequest, IssueDeviceCredentialRequest, SendMessageRequest,
        SendMessageResponse, Target, target,
    },
};
use push_server::{
    api_client::ApiClient,
    client::{ClientError, ClientOptions, DeviceClient},
    server::Ready,
};

use crate::{
    SERVER_NAME,
    harness::ServerInfo,
    process::{ChildProc, LineReader, wait_exit},
};

/// How long a server may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for any single network step of a test (a hang fails instead of blocking forever).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat settings used unless a test passes its own: long enough that an idle test client
/// is never dropped for not answering.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 30_000;
/// See [`DEFAULT_HEARTBEAT_INTERVAL_MS`].
pub const DEFAULT_HEARTBEAT_TIMEOUT_MS: u64 = 10_000;

/// Path of the `push-server` binary under test.
///
/// Panics when it is missing or older than the sources it is built from, with the command that
/// fixes it: `cargo test -p e2e` does not rebuild another package's binary.
pub fn server_binary() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate_binary("push-server", "PUSH_SERVER_BIN"))
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Path of the `apns-bridge` binary under test (`APNS_BRIDGE_BIN` overrides), with the same
/// staleness check as [`server_binary`]: build it with `cargo build -p apns-bridge`.
pub fn bridge_binary() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate_binary("apns-bridge", "APNS_BRIDGE_BIN"))
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn locate_binary(name: &str, env: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the test executable: {e}"))?;
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/push-server
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected test executable location {}", exe.display()))?;
    let bin = profile_dir.join(name);
    let built = std::fs::metadata(&bin).and_then(|m| m.modified()).map_err(|_| {
        format!(
            "{name} binary not found at {}: run `cargo build -p {name}` first \
             (or `cargo build --workspace`), or set {env}",
            bin.display()
        )
    })?;
    if std::env::var_os("E2E_ALLOW_STALE_BINARY").is_none()
        && let Some((newest, path)) = newest_source(&bin)
        && newest > built
    {
        return Err(format!(
            "{name} binary at {} is older than {}: run `cargo build -p {name}` \
             (set E2E_ALLOW_STALE_BINARY=1 to test it anyway)",
            bin.display(),
            path.display()
        ));
    }
    Ok(bin)
}

/// Newest source the binary was built from, per cargo's dep-info file next to it
/// (`<name>.d`: `<binary>: <source> <source> ...`).
fn newest_source(bin: &Path) -> Option<(SystemTime, PathBuf)> {
    let info = std::fs::read_to_string(bin.with_extension("d")).ok()?;
    let (_, deps) = info.lines().next()?.split_once(": ")?;
    deps.replace("\\ ", "\0")
        .split_whitespace()
        .map(|p| PathBuf::from(p.replace('\0', " ")))
        .filter_map(|p| newest_mtime(&p))
        .max()
}

/// Newest modification time of a file or, recursively, of a directory's files.
fn newest_mtime(path: &Path) -> Option<(SystemTime, PathBuf)> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return Some((meta.modified().ok()?, path.to_path_buf()));
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| newest_mtime(&e.path()))
        .max()
}

/// A `push-server` command with a clean environment: no `PUSH_*` variables leak in from the
/// caller, logs at info level without colours. Stdin is closed.
pub fn server_command() -> Command {
    command_for(&server_binary())
}

/// [`server_command`] for the binary at `bin`.
fn command_for(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PUSH_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    cmd
}

/// Bundle id the test bridge pushes for (VoIP topic `<bundle id>.voip`).
pub const BRIDGE_BUNDLE_ID: &str = "com.example.ward";
const BRIDGE_API_KEY: &str = "e2e-bridge-key-0123456789";

/// `apns-bridge serve --fake-apns` on loopback with TLS and an API key, its files in a directory
/// of the caller's; killed on drop. The fake APNs prints every request it receives: those lines
/// are what "a VoIP push was sent" means.
pub struct BridgeProcess {
    _child: ChildProc,
    stdout: LineReader,
    ready: String,
    addr: SocketAddr,
    dir: PathBuf,
}

impl BridgeProcess {
    /// Start it with its certificate, key and API key written to `dir`, and `extra` arguments
    /// (for example `--fake-response`). `Err` carries the bridge's log.
    pub fn start(dir: &Path, extra: &[String]) -> Result<Self, String> {
        let write = |name: &str, contents: &str| {
            std::fs::write(dir.join(name), contents).map_err(|e| format!("cannot write {name}: {e}"))
        };
        let (pki, _) = push_server::pki::load_or_create(&dir.join("bridge-tls"), &[])
            .map_err(|e| format!("bridge certificate: {e}"))?;
        write("bridge.pem", &pki.server_cert_pem)?;
        write("bridge.key.pem", &pki.server_key_pem)?;
        write("bridge-ca.pem", &pki.ca_cert_pem)?;
        write("bridge-api.key", BRIDGE_API_KEY)?;
        let mut cmd = Command::new(bridge_binary());
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--bundle-id",
            BRIDGE_BUNDLE_ID,
        ])
        .arg("--api-key-file")
        .arg(dir.join("bridge-api.key"))
        .arg("--tls-cert")
        .arg(dir.join("bridge.pem"))
        .arg("--tls-key")
        .arg(dir.join("bridge.key.pem"))
        .arg("--fake-apns")
        .args(extra)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
        let mut child = ChildProc::spawn("apns-bridge", cmd, Some(&dir.join("bridge.log")))
            .map_err(|e| format!("{e:#}"))?;
        let stdout = LineReader::spawn(child.child_mut().stdout.take().expect("piped"));
        let mut bridge = Self {
            _child: child,
            stdout,
            ready: String::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir: dir.to_path_buf(),
        };
        bridge.ready = bridge.wait_line("apns-bridge ready: ", READY_TIMEOUT)?;
        bridge.addr = bridge
            .ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("listen="))
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("no address in {:?}", bridge.ready))?;
        Ok(bridge)
    }

    /// The line the bridge printed when it was ready.
    pub fn ready_line(&self) -> &str {
        &self.ready
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `[apns]` section that points a push-server at this bridge (remote mode).
    pub fn apns_config(&self) -> String {
        let quoted = |name: &str| format!("{:?}", self.dir.join(name).display().to_string());
        format!(
            "[apns]\nmode = \"remote\"\nendpoint = \"https://{}\"\nserver_name = \"localhost\"\nca_file = {}\napi_key_file = {}\n",
            self.addr,
            quoted("bridge-ca.pem"),
            quoted("bridge-api.key"),
        )
    }

    /// The next request the fake APNs received, within `timeout`.
    pub fn next_request(&self, timeout: Duration) -> Result<String, String> {
        self.wait_line("fake-apns: ", timeout)
    }

    /// The next stdout line containing `needle`; the error carries the bridge's log.
    fn wait_line(&self, needle: &str, timeout: Duration) -> Result<String, String> {
        self.stdout.wait_for(needle, timeout).map_err(|e| {
            let log = std::fs::read_to_string(self.dir.join("bridge.log")).unwrap_or_default();
            format!("{e}; bridge log:\n{log}")
        })
    }
}

/// How a [`ServerProcess`] is launched; [`Launch::default`] is what tests use.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The binary; [`server_binary`] when `None`.
    pub bin: Option<PathBuf>,
    /// Arguments after `serve --data-dir DIR` (and the loopback listen defaults).
    pub args: Vec<String>,
    /// Environment set on top of [`server_command`]'s (for example `("RUST_LOG", "debug")`).
    pub env: Vec<(String, String)>,
    /// Add the test heartbeat defaults (see [`DEFAULT_HEARTBEAT_INTERVAL_MS`]) unless `args`
    /// set them; a benchmark measures the server's own.
    pub test_heartbeats: bool,
    /// How long the server may take to print its ready line.
    pub ready_timeout: Duration,
}

impl Default for Launch {
    fn default() -> Self {
        Self {
            bin: None,
            args: Vec::new(),
            env: Vec::new(),
            test_heartbeats: true,
            ready_timeout: READY_TIMEOUT,
        }
    }
}

/// A `push-server serve` process on loopback with ephemeral ports.
pub struct ServerProcess {
    child: Option<ChildProc>,
    data_dir: PathBuf,
    launch: Launch,
    log_path: PathBuf,
    stdout: LineReader,
    /// Where devices connect (changes on every start, unless [`Self::restart_in_place`]).
    pub device_addr: SocketAddr,
    /// Where the gRPC API listens (changes on every start, unless [`Self::restart_in_place`]).
    pub api_addr: SocketAddr,
    /// Where the dashboard and `/metrics` listen (HTTPS).
    pub http_addr: SocketAddr,
    /// The store epoch of the last `ServerHello`, sent with the floor as an SDK does.
    epoch: std::sync::atomic::AtomicU64,
}

impl ServerProcess {
    /// Start `push-server serve` on `data_dir` (created if missing) and wait for its ready line.
    /// `extra_args` are appended; the heartbeat defaults are only added when they do not set
    /// `--heartbeat-interval-ms` / `--heartbeat-timeout-ms` themselves. Stderr goes to a log
    /// file in the data directory, one per start.
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> Self {
        Self::start_with_env(data_dir, extra_args, &[])
    }

    /// Like [`Self::start`], with environment variables set for the server on top of
    /// [`server_command`]'s (for example `("RUST_LOG", "debug")`); kept across restarts.
    pub fn start_with_env(data_dir: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Self {
        let launch = Launch {
            args: extra_args.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Launch::default()
        };
        Self::launch(data_dir, launch).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start the server as `launch` says on `data_dir` (created if missing); `Err` carries why
    /// it did not become ready, with its output.
    pub fn launch(data_dir: &Path, launch: Launch) -> Result<Self, String> {
        let (child, log_path, stdout, ready) = spawn_server(data_dir, &launch, &[])?;
        Ok(Self {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            launch,
            log_path,
            stdout,
            device_addr: ready.devices,
            api_addr: ready.api,
            http_addr: ready.dashboard,
            epoch: Default::default(),
        })
    }

    /// Start a new process on the same data directory with the same arguments (killing the
    /// current one first if it still runs). The addresses are updated.
    pub fn restart(&mut self) {
        self.respawn(&[]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Like [`Self::restart`], listening on the same addresses as before (clients reconnect
    /// to where they were).
    pub fn restart_in_place(&mut self) -> Result<(), String> {
        let listen = [self.device_addr, self.api_addr, self.http_addr].map(|a| a.to_string());
        self.respawn(&[
            "--device-listen",
            &listen[0],
            "--api-listen",
            &listen[1],
            "--http-listen",
            &listen[2],
        ])
    }

    fn respawn(&mut self, listen: &[&str]) -> Result<(), String> {
        self.kill();
        let (child, log_path, stdout, ready) = spawn_server(&self.data_dir, &self.launch, listen)?;
        self.child = Some(child);
        self.log_path = log_path;
        self.stdout = stdout;
        self.device_addr = ready.devices;
        self.api_addr = ready.api;
        self.http_addr = ready.dashboard;
        Ok(())
    }

    /// The running process (its pid, CPU time, memory, log tail).
    pub fn proc(&self) -> &ChildProc {
        self.child.as_ref().expect("server not running")
    }

    /// SIGTERM, then SIGKILL after `grace`; see [`ChildProc::terminate`].
    pub fn terminate_within(&mut self, grace: Duration) {
        if let Some(child) = self.child.as_mut() {
            child.terminate(grace);
        }
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Process id of the running server.
    pub fn pid(&self) -> u32 {
        self.proc().pid()
    }

    /// SIGKILL: no goodbye, no flush. Returns once the process is gone.
    pub fn kill(&mut self) {
        // Dropping it kills and reaps it.
        self.child = None;
    }

    /// SIGTERM, then wait for the exit (graceful shutdown is bounded at 10 s by the server).
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("server not running");
        let pid = libc::pid_t::try_from(child.pid()).expect("pid fits pid_t");
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet (so the pid
        // cannot have been reused).
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed: {}", std::io::Error::last_os_error());
        match wait_exit(child.child_mut(), Duration::from_secs(20)) {
            Some(status) => status,
            None => {
                drop(child);
                panic!("server did not exit within 20 s of SIGTERM; log:\n{}", self.log());
            }
        }
    }

    /// Stderr of the current process so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Stdout lines of the current process so far.
    pub fn stdout(&self) -> Vec<String> {
        self.stdout.lines()
    }

    /// Current length of the log, to wait for lines written after this point.
    pub fn log_mark(&self) -> usize {
        self.log().len()
    }

    /// Wait until the log written after `mark` (see [`Self::log_mark`]) contains `needle`;
    /// returns that part of the log. Panics with the log on timeout.
    pub fn wait_for_log_after(&self, mark: usize, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            let tail = log.get(mark..).unwrap_or_default();
            if tail.contains(needle) {
                return tail.to_string();
            }
            if Instant::now() >= deadline {
                panic!("server log has no {needle:?} after {timeout:?}; log since mark:\n{tail}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Simulated time, for a server started with `--test-clock-file FILE`: write `offset_ms`
    /// (ahead of the wall clock) to `file`, signal the server (SIGUSR2) and wait until its hub
    /// reads the new time, so every deadline now due has been handed to its deadline task.
    pub fn set_clock_offset(&self, file: &Path, offset_ms: i64, timeout: Duration) -> Result<(), String> {
        std::fs::write(file, offset_ms.to_string())
            .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet (so the pid
        // cannot have been reused).
        if unsafe { libc::kill(pid, libc::SIGUSR2) } != 0 {
            return Err(format!("kill(SIGUSR2): {}", std::io::Error::last_os_error()));
        }
        self.stdout
            .wait_for(&format!("push-server clock: offset_ms={offset_ms}"), timeout)
            .map(|_| ())
            .map_err(|e| format!("the server did not move its clock: {e}; log:\n{}", self.log()))
    }

    /// Where it runs now (its CA, admin key, API client).
    pub fn info(&self) -> ServerInfo {
        ServerInfo {
            dir: self.data_dir.clone(),
            device_addr: self.device_addr,
            api_addr: self.api_addr,
        }
    }

    /// The server's CA certificate (PEM).
    pub fn ca_pem(&self) -> String {
        self.info().ca_pem()
    }

    /// The bootstrap admin API key.
    pub fn admin_key(&self) -> String {
        self.info().admin_key()
    }

    /// A gRPC client with the admin key.
    pub async fn api(&self) -> ApiClient {
        self.info().api().await
    }

    /// Register `device_id` through the admin API and return a new credential for it.
    pub async fn issue(&self, device_id: &str) -> String {
        let response = within(
            "IssueDeviceCredential",
            self.api()
                .await
                .admin()
                .issue_device_credential(IssueDeviceCredentialRequest {
                    device_id: device_id.into(),
                    groups: Vec::new(),
                    valid_days: 0,
                }),
        )
        .await
        .expect("IssueDeviceCredential")
        .into_inner();
        assert_eq!(response.device_id, device_id);
        response.credential
    }

    /// How a device with `credential` that has seen up to `last_seen_seq` connects.
    pub fn device_options(&self, credential: &str, last_seen_seq: u64) -> ClientOptions {
        ClientOptions {
            addr: self.device_addr,
            server_name: SERVER_NAME.into(),
            ca_pem: self.ca_pem(),
            hello: Hello {
                credential: credential.into(),
                sdk_version: "e2e".into(),
                last_seen_seq,
                ssid: "e2e-wifi".into(),
                instance_id: format!("e2e-{last_seen_seq}"),
                epoch: self.epoch.load(std::sync::atomic::Ordering::SeqCst),
                device_time_ms: 0,
                previous_stop_reason: String::new(),
            },
        }
    }

    /// Connect a device session (TLS, hello, server hello or goodbye), sending the floor with
    /// the epoch of the last server hello, as an SDK does.
    pub async fn connect(&self, credential: &str, last_seen_seq: u64) -> Result<DeviceClient, ClientError> {
        let client = within(
            "device connect",
            DeviceClient::connect(self.device_options(credential, last_seen_seq)),
        )
        .await?;
        self.epoch
            .store(client.server_hello.epoch, std::sync::atomic::Ordering::SeqCst);
        Ok(client)
    }

    /// Send a text message to one device with a caller-chosen id; asserts it was accepted for
    /// that device (which means it is durably stored).
    pub async fn send_text(&self, device_id: &str, message_id: &str, body: &str) -> SendMessageResponse {
        let response = within(
            "SendMessage",
            self.api().await.sender().send_message(SendMessageRequest {
                target: Some(Target {
                    kind: Some(target::Kind::DeviceId(device_id.into())),
                }),
                title: "e2e".into(),
                body: body.into(),
                message_id: message_id.into(),
                ..Default::default()
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("SendMessage {message_id}: {e}"))
        .into_inner();
        assert_eq!(response.message_id, message_id);
        assert_eq!(response.recipients.len(), 1, "{response:?}");
        assert_eq!(
            response.recipients[0].state(),
            DeliveryState::Accepted,
            "message {message_id} not accepted: {response:?}"
        );
        response
    }

    /// Wait until the store says every recipient of `message_id` acknowledged it.
    /// `GetMessageStatus` reads receipts from the store after a commit, so once it reports ACKED
    /// the acknowledgement is on disk and survives a SIGKILL.
    pub async fn wait_durably_acked(&self, message_id: &str) {
        let mut sender = self.api().await.sender();
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let status = within(
                "GetMessageStatus",
                sender.get_message_status(GetMessageStatusRequest {
                    message_id: message_id.into(),
                }),
            )
            .await
            .unwrap_or_else(|e| panic!("GetMessageStatus {message_id}: {e}"))
            .into_inner();
            if !status.recipients.is_empty()
                && status
                    .recipients
                    .iter()
                    .all(|r| r.state() == DeliveryState::Acked)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{message_id} not acknowledged in the store within {STEP_TIMEOUT:?}: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let mut out = String::new();
            let _ = writeln!(out, "---- push-server log ({}) ----", self.log_path.display());
            out.push_str(&self.log());
            eprintln!("{out}---- end of push-server log ----");
        }
    }
}

fn spawn_server(
    data_dir: &Path,
    launch: &Launch,
    listen: &[&str],
) -> Result<(ChildProc, PathBuf, LineReader, Ready), String> {
    use std::os::unix::fs::DirBuilderExt;
    // Owner-only, as the server makes it (else it warns that the directory is open).
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|e| format!("cannot create {}: {e}", data_dir.display()))?;
    let log_path = (1..)
        .map(|n| data_dir.join(format!("server-{n}.log")))
        .find(|p| !p.exists())
        .expect("a free log name");
    let mut cmd = match &launch.bin {
        Some(bin) => command_for(bin),
        None => server_command(),
    };
    cmd.arg("serve").arg("--data-dir").arg(data_dir).args(listen);
    let has = |flag: &str| {
        listen
            .iter()
            .copied()
            .chain(launch.args.iter().map(String::as_str))
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
    };
    for flag in ["--device-listen", "--api-listen", "--http-listen"] {
        if !has(flag) {
            cmd.args([flag, "127.0.0.1:0"]);
        }
    }
    if launch.test_heartbeats && !has("--heartbeat-interval-ms") {
        cmd.arg(format!("--heartbeat-interval-ms={DEFAULT_HEARTBEAT_INTERVAL_MS}"));
    }
    if launch.test_heartbeats && !has("--heartbeat-timeout-ms") {
        cmd.arg(format!("--heartbeat-timeout-ms={DEFAULT_HEARTBEAT_TIMEOUT_MS}"));
    }
    cmd.args(&launch.args)
        .envs(launch.env.iter().map(|(k, v)| (k, v)));
    let (child, stdout, ready) = spawn_ready(cmd, &log_path, launch.ready_timeout)?;
    Ok((child, log_path, stdout, ready))
}

/// Spawn `cmd`, a `push-server serve`, its stderr to `log`, and wait up to `timeout` for its
/// ready line: the process, its stdout (drained for as long as it runs) and the addresses; or,
/// once it is killed, why not with its exit status, stdout and log.
pub fn spawn_ready(
    mut cmd: Command,
    log: &Path,
    timeout: Duration,
) -> Result<(ChildProc, LineReader, Ready), String> {
    cmd.stdout(Stdio::piped());
    let mut child = ChildProc::spawn("push-server", cmd, Some(log)).map_err(|e| format!("{e:#}"))?;
    let stdout = LineReader::spawn(child.child_mut().stdout.take().expect("piped stdout"));
    let failure = match stdout.wait_for(Ready::PREFIX, timeout) {
        Ok(line) => match line[line.find(Ready::PREFIX).unwrap_or(0)..]
            .trim()
            .parse::<Ready>()
        {
            Ok(ready) => return Ok((child, stdout, ready)),
            Err(e) => format!("{e}"),
        },
        Err(e) => e,
    };
    child.kill();
    let status = child.child_mut().wait();
    Err(format!(
        "push-server did not become ready: {failure} (exit: {status:?})\nstdout:\n{}\nlog:\n{}",
        stdout.lines().join("\n"),
        std::fs::read_to_string(log).unwrap_or_default()
    ))
}

/// Await `fut`, panicking if it takes longer than [`STEP_TIMEOUT`].
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(STEP_TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {STEP_TIMEOUT:?}"),
    }
}

//! `apns-bridge serve`: the APNs VoIP fallback as its own process, for the usual hospital set-up
//! where only a DMZ host may reach the internet. The push-server calls it over gRPC (see
//! `proto/apns.proto`); the logic is the library's, shared with the embedded mode.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use apns_bridge::{
    Bridge, BridgeSettings, BundleId,
    apple::{A2Transport, Environment},
    fake::{FakeAnswer, FakeApns},
    policy::RetryPolicy,
    remote::{self, TlsIdentity},
    transport::ApnsTransport,
};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "apns-bridge", version, about = "APNs VoIP fallback for ringing calls")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the bridge API (lpush.apns.v1.ApnsBridge) to push-servers.
    Serve(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "APNS_BRIDGE_LISTEN", default_value = "0.0.0.0:7450")]
    listen: SocketAddr,
    /// The app's bundle id (pushes go to topic <bundle id>.voip).
    #[arg(long, env = "APNS_BRIDGE_BUNDLE_ID")]
    bundle_id: String,
    /// APNs auth key (.p8, PKCS#8 PEM) from the Apple developer account.
    #[arg(long, env = "APNS_BRIDGE_P8", required_unless_present = "fake_apns")]
    p8: Option<PathBuf>,
    /// Key id of the .p8 key.
    #[arg(long, env = "APNS_BRIDGE_KEY_ID", required_unless_present = "fake_apns")]
    key_id: Option<String>,
    /// Apple developer team id.
    #[arg(long, env = "APNS_BRIDGE_TEAM_ID", required_unless_present = "fake_apns")]
    team_id: Option<String>,
    /// Use APNs' sandbox (development builds of the app).
    #[arg(long, env = "APNS_BRIDGE_SANDBOX")]
    sandbox: bool,
    /// File holding the API key push-servers must present (Bearer).
    #[arg(long, env = "APNS_BRIDGE_API_KEY_FILE")]
    api_key_file: PathBuf,
    /// TLS certificate chain (PEM). Without it the bridge serves plain HTTP/2, on loopback only.
    #[arg(long, env = "APNS_BRIDGE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "APNS_BRIDGE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Longest wait for one APNs answer, ms (also cut to the ring time left).
    #[arg(long, default_value_t = 5000)]
    send_timeout_ms: u64,
    /// First retry delay after 429/5xx, ms (doubles per retry).
    #[arg(long, default_value_t = 250)]
    retry_base_ms: u64,
    /// Longest retry delay, ms.
    #[arg(long, default_value_t = 2000)]
    retry_max_ms: u64,
    /// Most requests per push, the first included.
    #[arg(long, default_value_t = 5)]
    max_attempts: u32,
    /// No request starts with less ring time than this left, ms.
    #[arg(long, default_value_t = 1000)]
    min_ring_left_ms: u64,
    /// TESTS ONLY: answer from an in-process fake APNs instead of Apple, and print every request
    /// it receives on stdout.
    #[arg(long)]
    fake_apns: bool,
    /// TESTS ONLY (with --fake-apns): TOKEN=ANSWER, where ANSWER is 200, 410:Unregistered,
    /// 503:ServiceUnavailable, unreachable or hang. Repeatable; TOKEN `*` sets the default.
    #[arg(long = "fake-response", requires = "fake_apns")]
    fake_responses: Vec<String>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    apns_bridge::daemon::init_tracing(false);
    let Command::Serve(args) = Cli::parse().command;
    match serve(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let bundle = BundleId::parse(&args.bundle_id)?;
    let api_key = std::fs::read_to_string(&args.api_key_file)
        .with_context(|| format!("cannot read {}", args.api_key_file.display()))?
        .trim()
        .to_string();
    if api_key.len() < 16 {
        bail!(
            "the API key in {} is shorter than 16 characters",
            args.api_key_file.display()
        );
    }
    let send_timeout = Duration::from_millis(args.send_timeout_ms);
    let transport: Arc<dyn ApnsTransport> = if args.fake_apns {
        tracing::warn!("--fake-apns: nothing is sent to Apple; for tests only");
        let fake = FakeApns::new(bundle.clone());
        for spec in &args.fake_responses {
            let (token, answer) = spec
                .split_once('=')
                .and_then(|(t, a)| Some((t, FakeAnswer::parse(a)?)))
                .with_context(|| format!("bad --fake-response {spec:?}: want TOKEN=ANSWER"))?;
            if token == "*" {
                fake.set_default(answer);
            } else {
                fake.script(token, std::iter::repeat_n(answer, 1000));
            }
        }
        fake.observe(|r| {
            println!(
                "fake-apns: token={} call={} uuid={} push-type={} topic={} priority={} expiration={} collapse-id={} bytes={} answer={:?} violations={:?}",
                r.device_token,
                r.call_id,
                r.call_uuid,
                r.header("apns-push-type").unwrap_or("-"),
                r.header("apns-topic").unwrap_or("-"),
                r.header("apns-priority").unwrap_or("-"),
                r.header("apns-expiration").unwrap_or("-"),
                r.header("apns-collapse-id").unwrap_or("-"),
                r.payload.len(),
                r.answer,
                r.violations,
            )
        });
        fake
    } else {
        let (Some(p8), Some(key_id), Some(team_id)) = (&args.p8, &args.key_id, &args.team_id) else {
            bail!("--p8, --key-id and --team-id are required (or --fake-apns for tests)");
        };
        let key = std::fs::File::open(p8).with_context(|| format!("cannot open {}", p8.display()))?;
        let env = if args.sandbox {
            Environment::Sandbox
        } else {
            Environment::Production
        };
        Arc::new(
            A2Transport::new(key, key_id, team_id, env, send_timeout)
                .with_context(|| format!("cannot use the APNs key {}", p8.display()))?,
        )
    };
    let settings = BridgeSettings {
        bundle_id: bundle,
        send_timeout,
        retry: RetryPolicy {
            base: Duration::from_millis(args.retry_base_ms),
            max: Duration::from_millis(args.retry_max_ms),
            max_attempts: args.max_attempts.max(1),
            min_ring_left: Duration::from_millis(args.min_ring_left_ms),
        },
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsIdentity {
            cert_pem: std::fs::read_to_string(cert)
                .with_context(|| format!("cannot read {}", cert.display()))?,
            key_pem: std::fs::read_to_string(key)
                .with_context(|| format!("cannot read {}", key.display()))?,
        }),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    if tls.is_none() && !addr.ip().is_loopback() {
        bail!("{}", remote::RemoteError::PlaintextNotLoopback(addr.to_string()));
    }
    let signal = apns_bridge::daemon::shutdown_signal()?;
    let bridge = Arc::new(Bridge::new(transport, settings));
    let tls_note = if tls.is_some() {
        "tls"
    } else {
        "plaintext-loopback"
    };
    let server = remote::serve(listener, bridge, &api_key, tls, signal);
    println!("apns-bridge ready: listen={addr} transport={tls_note}");
    server.await?;
    tracing::info!("apns-bridge stopped");
    Ok(())
}

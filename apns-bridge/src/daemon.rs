//! What the workspace's two daemons, `apns-bridge serve` and `push-server serve`, share: logs on
//! stderr and the shutdown signal.

use anyhow::Context;

/// Log to stderr at `RUST_LOG`'s levels (default `info`), as JSON lines with `json`.
pub fn init_tracing(json: bool) {
    init_tracing_at("info", json)
}

/// [`init_tracing`] with `default` levels where `RUST_LOG` is unset (the workspace's other
/// programs, `push-loadgen` and the provider host, log `warn` and up).
pub fn init_tracing_at(default: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal (and without NO_COLOR): journald and log files get plain text.
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        );
    if json {
        builder.json().init()
    } else {
        builder.init()
    }
}

/// Install the SIGTERM and SIGINT handlers now; the future resolves on either.
pub fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown requested");
    })
}

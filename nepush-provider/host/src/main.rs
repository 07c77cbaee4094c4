//! `nepush-host <scenario.toml>...`: run scenarios against a push-server started for each, print
//! what happened and the invariant figures, exit 1 if any failed.
//!
//! The `push-server` and `apns-bridge` binaries are taken from next to this one (build them
//! with `cargo build -p push-server -p apns-bridge`), or from `PUSH_SERVER_BIN` /
//! `APNS_BRIDGE_BIN`.

use std::{path::PathBuf, process::ExitCode};

use nepush_host::{RunOptions, Scenario};

fn main() -> ExitCode {
    let paths: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if paths.is_empty() || paths.iter().any(|p| p == "-h" || p == "--help") {
        eprintln!(
            "usage: nepush-host <scenario.toml>...\n\nRuns each scenario against its own push-server (see nepush-provider/scenarios/README.md)."
        );
        return ExitCode::from(2);
    }
    locate_binaries();
    apns_bridge::daemon::init_tracing_at("warn", false);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut failed = 0;
    for path in &paths {
        let scenario = match Scenario::from_file(path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{e:#}");
                failed += 1;
                continue;
            }
        };
        println!("running {} ({})", scenario.name, path.display());
        let report = runtime.block_on(nepush_host::run(&scenario, RunOptions { verbose: true }));
        println!("{report}");
        if !report.passed() {
            failed += 1;
        }
    }
    println!("{} passed, {} failed", paths.len() - failed, failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Point the `e2e` helpers at the binaries next to this one, unless the environment does.
fn locate_binaries() {
    let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(PathBuf::from))
    else {
        return;
    };
    for (name, var) in [
        ("push-server", "PUSH_SERVER_BIN"),
        ("apns-bridge", "APNS_BRIDGE_BIN"),
    ] {
        let bin = dir.join(name);
        if std::env::var_os(var).is_none() && bin.exists() {
            // SAFETY: called at the start of main, before any other thread exists.
            unsafe { std::env::set_var(var, &bin) };
        }
    }
}

//! `push-server doctor` against a real server and its data directory: a healthy site passes with
//! exit status 0; a broken one (the device host missing from the certificate, a bad SSID list, a
//! world-writable data directory, a phone whose clock is off) fails with one line per finding.

use std::{
    net::IpAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use e2e::{ServerProcess, server_command};
use push_server::client::DeviceClient;

/// This machine's address on its default route: what phones on a site would dial. The doctor
/// rightly fails a loopback device host, so the test needs a real one.
fn site_address() -> Option<IpAddr> {
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    // TEST-NET-1: connecting a UDP socket only picks the route; nothing is sent.
    probe.connect("192.0.2.1:9").ok()?;
    let ip = probe.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A server on `dir`/data run with the configuration `text` (saved as `dir`/`name`), its device
/// listener on every address as a site's would be.
fn start_site(dir: &Path, name: &str, text: &str) -> (PathBuf, ServerProcess) {
    let config = write_config(dir, name, text);
    let server = ServerProcess::start(
        &dir.join("data"),
        &[
            "--config",
            config.to_str().unwrap(),
            "--device-listen",
            "0.0.0.0:0",
        ],
    );
    (config, server)
}

/// Run `push-server doctor` on `config` and `server`'s data directory, with the listener
/// addresses the server really bound (as `serve` takes them, from the environment).
async fn doctor(config: &Path, server: &ServerProcess) -> (i32, Vec<String>) {
    let mut cmd = server_command();
    cmd.arg("doctor")
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(server.data_dir())
        .env("PUSH_DEVICE_LISTEN", server.device_addr.to_string())
        .env("PUSH_API_LISTEN", server.api_addr.to_string());
    let out = tokio::process::Command::from(cmd).output().await.unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    (
        out.status.code().expect("doctor exited by a signal"),
        stdout.lines().map(String::from).collect(),
    )
}

fn has_line(lines: &[String], prefix: &str, needle: &str) -> bool {
    lines.iter().any(|l| l.starts_with(prefix) && l.contains(needle))
}

/// A phone of `server` whose clock reads `offset_ms` from the test's.
async fn phone(server: &ServerProcess, device_id: &str, offset_ms: i64) -> DeviceClient {
    let credential = server.issue(device_id).await;
    let mut opts = server.device_options(&credential, 0);
    opts.hello.device_time_ms = push_server::hub::now_ms() + offset_ms;
    DeviceClient::connect(opts).await.unwrap()
}

#[tokio::test]
async fn a_healthy_site_passes_and_a_phone_with_a_wrong_clock_fails_it() {
    let Some(ip) = site_address() else {
        eprintln!("SKIPPED: this machine has no non-loopback address to stand for the site's");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (config, server) = start_site(
        dir.path(),
        "site.toml",
        &format!(
            "server_names = [\"{ip}\"]\n[site]\nssids = [\"Ward-4B\", \"Ward-5A\"]\ndevice_host = \"{ip}\"\n"
        ),
    );
    let _good = phone(&server, "phone-good", 150).await;

    let (code, lines) = doctor(&config, &server).await;
    let report = lines.join("\n");
    assert_eq!(code, 0, "{report}");
    assert!(!report.contains("FAIL"), "{report}");
    for (check, needle) in [
        ("ok   certificate:", format!("cover \"{ip}\"").as_str()),
        ("ok   dns:", ip.to_string().as_str()),
        (
            "ok   reach:",
            format!("{ip}:{}", server.device_addr.port()).as_str(),
        ),
        ("ok   ssids:", "2 SSIDs"),
        ("ok   data-dir:", "mode 700"),
        ("ok   clock:", "1 phones online"),
        ("NOTE wifi:", "primary route"),
    ] {
        assert!(
            has_line(&lines, check, needle),
            "no {check} line with {needle:?}:\n{report}"
        );
    }

    // A phone a minute behind: the clock check fails and names it.
    let _late = phone(&server, "phone-late", -60_000).await;
    let (code, lines) = doctor(&config, &server).await;
    let report = lines.join("\n");
    assert_eq!(code, 1, "{report}");
    assert!(
        has_line(&lines, "FAIL clock:", "1 of 2 phones")
            && has_line(&lines, "FAIL clock:", "phone-late -60."),
        "{report}"
    );
    assert!(has_line(&lines, "doctor:", "1 failed"), "{report}");
}

#[tokio::test]
async fn a_broken_site_fails_with_one_line_per_finding() {
    let Some(ip) = site_address() else {
        eprintln!("SKIPPED: this machine has no non-loopback address to stand for the site's");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The server runs without the site's address in server_names, so its certificate lacks it;
    // then the operator edits the SSIDs badly and opens the data directory to everyone.
    let (_, server) = start_site(
        dir.path(),
        "started.toml",
        &format!("[site]\nssids = [\"Ward-4B\"]\ndevice_host = \"{ip}\"\n"),
    );
    let edited = write_config(
        dir.path(),
        "edited.toml",
        &format!("[site]\nssids = [\"Ward-4B\", \"ward-4b\", \"Ward-4B\"]\ndevice_host = \"{ip}\"\n"),
    );
    std::fs::set_permissions(server.data_dir(), std::fs::Permissions::from_mode(0o777)).unwrap();

    let (code, lines) = doctor(&edited, &server).await;
    let report = lines.join("\n");
    assert_eq!(code, 1, "{report}");
    for (check, needle) in [
        (
            "FAIL certificate:",
            format!("the device host \"{ip}\" is not among the certificate's names").as_str(),
        ),
        ("FAIL ssids:", "site.ssids[2] repeats site.ssids[0] \"Ward-4B\""),
        ("WARN ssids:", "differ only in case"),
        ("FAIL data-dir:", "is world-writable (mode 777)"),
        ("doctor:", "3 failed"),
    ] {
        assert!(
            has_line(&lines, check, needle),
            "no {check} line with {needle:?}:\n{report}"
        );
    }
    // What works is still said to work.
    assert!(has_line(&lines, "ok   reach:", &ip.to_string()), "{report}");
}

//! The `apns-bridge` binary refuses unsafe or broken set-ups with a clear message. (Also makes
//! `cargo test --workspace` build the binary that `e2e` runs as a separate process.)

use std::process::Command;

fn serve(dir: &std::path::Path, key: &str, listen: &str) -> std::process::Output {
    let key_file = dir.join("bridge.key");
    std::fs::write(&key_file, key).unwrap();
    Command::new(env!("CARGO_BIN_EXE_apns-bridge"))
        .args([
            "serve",
            "--fake-apns",
            "--bundle-id",
            "com.example.nurse",
            "--listen",
            listen,
        ])
        .arg("--api-key-file")
        .arg(&key_file)
        .output()
        .expect("apns-bridge runs")
}

#[test]
fn plaintext_off_loopback_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = serve(dir.path(), "0123456789abcdef0123", "0.0.0.0:0");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("loopback"), "{stderr}");
}

#[test]
fn short_api_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = serve(dir.path(), "short", "127.0.0.1:0");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("shorter than 16"), "{stderr}");
}

//! A broken configuration file stops `push-server serve` at once with an actionable message,
//! before it touches the data directory or opens a port.

use std::{path::Path, process::Stdio, time::Duration};

use e2e::{server_command, wait_exit};

/// Run `serve --config <file>` (expecting a quick, clean failure) and return its stderr.
fn serve_with_config(dir: &Path, name: &str, contents: &str) -> String {
    let config = dir.join(name);
    std::fs::write(&config, contents).unwrap();
    let data = dir.join(format!("data-{name}"));
    let stderr_path = dir.join(format!("{name}.stderr"));
    let mut child = server_command()
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--device-listen",
            "127.0.0.1:0",
            "--api-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("spawn push-server");
    let status = wait_exit(&mut child, Duration::from_secs(10));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    let status =
        status.unwrap_or_else(|| panic!("serve with {name} still running after 10 s; stderr:\n{stderr}"));
    assert!(
        !status.success(),
        "serve with {name} must fail; stderr:\n{stderr}"
    );
    assert_eq!(
        status.code(),
        Some(1),
        "a clean error exit, not a crash; stderr:\n{stderr}"
    );
    assert!(
        !data.exists(),
        "serve with {name} created the data directory {} although it refused to start",
        data.display()
    );
    assert!(!stderr.contains("panicked"), "stderr:\n{stderr}");
    stderr
}

#[test]
fn unknown_key_names_the_file_the_key_and_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = serve_with_config(
        dir.path(),
        "typo.toml",
        "heartbeat_interval_ms = 5000\n\n[limits]\nmax_sesions = 10\n",
    );
    assert!(
        stderr.contains("typo.toml"),
        "stderr must name the file:\n{stderr}"
    );
    assert!(
        stderr.contains("max_sesions"),
        "stderr must name the key:\n{stderr}"
    );
    assert!(stderr.contains("line 4"), "stderr must name the line:\n{stderr}");
}

#[test]
fn wrong_type_names_the_file_the_key_and_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = serve_with_config(
        dir.path(),
        "types.toml",
        "[limits]\nmax_sessions = 10\ntls_handshake_timeout_ms = \"fast\"\n",
    );
    assert!(
        stderr.contains("types.toml"),
        "stderr must name the file:\n{stderr}"
    );
    assert!(
        stderr.contains("tls_handshake_timeout_ms"),
        "stderr must name the key:\n{stderr}"
    );
    assert!(stderr.contains("line 3"), "stderr must name the line:\n{stderr}");
}

#[test]
fn toml_syntax_error_names_the_file_and_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = serve_with_config(dir.path(), "syntax.toml", "data_dir = \"x\"\ndevice_listen = [\n");
    assert!(
        stderr.contains("syntax.toml"),
        "stderr must name the file:\n{stderr}"
    );
    assert!(stderr.contains("line 2"), "stderr must name the line:\n{stderr}");
}

#[test]
fn inconsistent_values_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let stderr = serve_with_config(dir.path(), "zero.toml", "heartbeat_timeout_ms = 0\n");
    assert!(
        stderr.contains("heartbeat_timeout_ms"),
        "stderr must name the key:\n{stderr}"
    );
}

#[test]
fn missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let stderr_path = dir.path().join("stderr");
    let mut child = server_command()
        .arg("serve")
        .arg("--config")
        .arg(&missing)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(10)).expect("exits");
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("nope.toml"), "stderr:\n{stderr}");
    assert!(!dir.path().join("data").exists());
}

//! The deployment files: `docker-compose.yml` is valid (checked by Debian's docker-compose; no
//! Docker engine runs here) and names only binaries the Dockerfile builds and installs.

use std::{path::Path, process::Command};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(repo().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn the_compose_file_is_valid_and_runs_two_nodes_on_redis_with_a_replica_sentinels_and_the_bridge() {
    let out = Command::new("docker-compose")
        .current_dir(repo())
        .args(["-f", "docker-compose.yml", "config"])
        .output()
        .expect("docker-compose is installed by the README's test command");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "docker-compose config failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for service in [
        "redis:",
        "redis-replica:",
        "sentinel-1:",
        "sentinel-2:",
        "sentinel-3:",
        "push-a:",
        "push-b:",
        "apns-bridge:",
    ] {
        assert!(
            text.contains(&format!("  {service}")),
            "service {service} missing:\n{text}"
        );
    }
    assert_eq!(
        text.matches(
            "PUSH_REDIS_URL: redis+sentinel://sentinel-1:26379,sentinel-2:26379,sentinel-3:26379/mymaster/0"
        )
        .count(),
        2,
        "both nodes share one Redis, found through the Sentinels"
    );
    assert_eq!(
        text.matches("sentinel monitor mymaster redis 6379 2").count(),
        3,
        "three Sentinels watch the primary, two must agree"
    );
    assert!(
        text.contains("--appendfsync") && text.contains("always"),
        "Redis must fsync what it acknowledges"
    );
    assert!(text.contains("--replicaof"), "the replica follows the primary");
}

#[test]
fn every_binary_the_compose_file_runs_is_built_and_installed_by_the_dockerfile() {
    let compose = read("docker-compose.yml");
    let dockerfile = read("Dockerfile");
    // The image's default entrypoint, and every entrypoint a service overrides.
    let mut binaries = vec!["push-server".to_string()];
    for line in compose.lines() {
        if let Some(rest) = line.trim().strip_prefix("entrypoint:") {
            let name = rest
                .trim()
                .trim_matches(['[', ']', '"', ' '])
                .split('"')
                .next()
                .unwrap_or("");
            binaries.push(name.to_string());
        }
    }
    assert!(binaries.contains(&"apns-bridge".to_string()), "{binaries:?}");
    for bin in &binaries {
        assert!(
            dockerfile.contains(&format!("-p {bin}")),
            "the Dockerfile does not build {bin}"
        );
        assert!(
            dockerfile.contains(&format!("/src/target/release/{bin} /usr/local/bin/{bin}")),
            "the Dockerfile does not install {bin}"
        );
    }
}

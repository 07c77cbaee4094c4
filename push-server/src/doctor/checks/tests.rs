use super::*;
use crate::doctor::Severity;

const NOW: i64 = 1_800_000_000_000;
const DAY: i64 = 86_400_000;

fn severities(findings: &[Finding]) -> Vec<Severity> {
    findings.iter().map(|f| f.severity).collect()
}

/// The one failing finding's message (panics if there is not exactly one failure).
fn the_failure(findings: &[Finding]) -> &str {
    let fails: Vec<_> = findings.iter().filter(|f| f.severity == Fail).collect();
    assert_eq!(fails.len(), 1, "{findings:#?}");
    &fails[0].message
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn good_cert() -> CertFacts {
    CertFacts {
        names: strings(&["push.ward.local", "10.20.0.5", "localhost", "127.0.0.1", "::1"]),
        server_auth: true,
        not_before_ms: NOW - DAY,
        not_after_ms: NOW + 819 * DAY,
        key: KeyKind::Ec(256),
        sha2_signature: true,
    }
}

#[test]
fn a_good_certificate_covers_the_host_by_name_or_address() {
    for host in ["push.ward.local", "PUSH.Ward.Local.", "10.20.0.5"] {
        let out = certificate(&Result::Ok(good_cert()), host, NOW);
        assert_eq!(severities(&out), [Ok], "{host}: {out:#?}");
        assert!(out[0].message.contains("ECDSA P-256"), "{}", out[0]);
    }
    // An IPv6 host matches however it is written.
    let mut cert = good_cert();
    cert.names.push("fd00::5".into());
    assert_eq!(
        severities(&certificate(&Result::Ok(cert), "fd00:0::5", NOW)),
        [Ok]
    );
}

#[test]
fn a_device_host_missing_from_the_certificate_fails_naming_both() {
    let out = certificate(&Result::Ok(good_cert()), "push2.ward.local", NOW);
    let m = the_failure(&out);
    assert!(m.contains("\"push2.ward.local\" is not among"), "{m}");
    assert!(m.contains("push.ward.local, 10.20.0.5"), "{m}");
    // A name is not an address, nor a prefix of another name.
    assert_eq!(
        severities(&certificate(&Result::Ok(good_cert()), "10.20.0.6", NOW)),
        [Fail]
    );
    assert_eq!(
        severities(&certificate(&Result::Ok(good_cert()), "push.ward", NOW)),
        [Fail]
    );
}

#[test]
fn every_ios_rule_is_its_own_failure() {
    /// Breaks one rule of a good certificate.
    type Break = fn(&mut CertFacts);
    let cases: [(Break, &str); 8] = [
        (|c| c.server_auth = false, "serverAuth"),
        (
            |c| c.not_after_ms = c.not_before_ms + 826 * DAY,
            "valid for 826 days",
        ),
        (|c| c.key = KeyKind::Rsa(1024), "Rsa(1024)"),
        (|c| c.key = KeyKind::Ec(521), "Ec(521)"),
        (|c| c.key = KeyKind::Other("Ed25519".into()), "Ed25519"),
        (|c| c.sha2_signature = false, "SHA-2"),
        (|c| c.not_after_ms = NOW - 1, "expired at"),
        (|c| c.not_before_ms = NOW + DAY, "not valid before"),
    ];
    for (break_it, needle) in cases {
        let mut cert = good_cert();
        break_it(&mut cert);
        let out = certificate(&Result::Ok(cert), "push.ward.local", NOW);
        assert!(the_failure(&out).contains(needle), "{needle}: {out:#?}");
    }
    let mut rsa = good_cert();
    rsa.key = KeyKind::Rsa(2048);
    assert_eq!(
        severities(&certificate(&Result::Ok(rsa), "push.ward.local", NOW)),
        [Ok]
    );
}

#[test]
fn a_certificate_near_its_end_warns_and_an_unreadable_one_fails() {
    let mut cert = good_cert();
    cert.not_after_ms = NOW + 29 * DAY;
    let out = certificate(&Result::Ok(cert), "push.ward.local", NOW);
    assert_eq!(severities(&out), [Warn], "{out:#?}");
    assert!(out[0].message.contains("restart the server"));
    let out = certificate(&Err("cannot read tls/server.pem".into()), "h", NOW);
    assert_eq!(the_failure(&out), "cannot read tls/server.pem");
}

#[test]
fn ssid_lists_ios_and_802_11_refuse_fail_with_the_index() {
    assert_eq!(severities(&ssids(&strings(&["Ward 4B", "Ward 5A"]))), [Ok]);
    for (list, needle) in [
        (vec![], "site.ssids is empty"),
        (vec!["ok", ""], "site.ssids[1] is empty"),
        (vec!["ÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄX"], "33 bytes"),
        (vec!["a", "b", "a"], "site.ssids[2] repeats site.ssids[0]"),
        (vec!["tab\there"], "control character"),
    ] {
        let out = ssids(&strings(&list));
        assert!(the_failure(&out).contains(needle), "{list:?}: {out:#?}");
    }
}

#[test]
fn ssids_that_are_likely_typos_or_too_many_for_one_manager_warn() {
    let out = ssids(&strings(&["Ward 4B", "ward 4b"]));
    assert_eq!(severities(&out), [Warn]);
    assert!(out[0].message.contains("differ only in case"), "{}", out[0]);
    let out = ssids(&strings(&[" Ward 4B"]));
    assert_eq!(severities(&out), [Warn]);
    assert!(out[0].message.contains("space"), "{}", out[0]);
    let eleven: Vec<String> = (0..11).map(|i| format!("ward-{i}")).collect();
    let out = ssids(&eleven);
    assert_eq!(severities(&out), [Warn]);
    assert!(out[0].message.contains("at most 10") && out[0].message.contains("all 2 managers"));
    let ten: Vec<String> = (0..10).map(|i| format!("ward-{i}")).collect();
    assert_eq!(severities(&ssids(&ten)), [Ok]);
}

#[test]
fn dns_must_answer_fast_with_an_address_phones_can_dial() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let ms = Duration::from_millis;
    let ok = dns(
        "push.ward.local",
        &Resolution::Resolved(vec![ip("10.20.0.5")], ms(3)),
    );
    assert_eq!(severities(&ok), [Ok]);
    assert_eq!(
        severities(&dns("10.20.0.5", &Resolution::Literal(ip("10.20.0.5")))),
        [Ok]
    );
    let slow = dns(
        "push.ward.local",
        &Resolution::Resolved(vec![ip("10.20.0.5")], ms(1500)),
    );
    assert_eq!(severities(&slow), [Warn]);
    assert!(slow[0].message.contains("1500 ms"), "{}", slow[0]);
    for (host, r, needle) in [
        (
            "h",
            Resolution::TimedOut(Duration::from_secs(5)),
            "did not resolve within 5 s",
        ),
        (
            "h",
            Resolution::Failed("no such host".into(), ms(2)),
            "does not resolve: no such host",
        ),
        (
            "localhost",
            Resolution::Resolved(vec![ip("127.0.0.1"), ip("::1")], ms(1)),
            "phones cannot dial",
        ),
        (
            "0.0.0.0",
            Resolution::Literal(ip("0.0.0.0")),
            "phones cannot dial",
        ),
        ("h", Resolution::Resolved(vec![], ms(1)), "no address"),
    ] {
        let out = dns(host, &r);
        assert!(the_failure(&out).contains(needle), "{r:?}: {out:#?}");
    }
}

#[test]
fn each_unreachable_address_is_a_failure() {
    let a: SocketAddr = "10.20.0.5:7443".parse().unwrap();
    let b: SocketAddr = "[fd00::5]:7443".parse().unwrap();
    let out = reachability(
        "push.ward.local",
        7443,
        &[
            (a, Result::Ok(Duration::from_millis(2))),
            (b, Err("connection refused".into())),
        ],
    );
    assert_eq!(severities(&out), [Ok, Fail]);
    assert!(out[1].message.contains("[fd00::5]:7443") && out[1].message.contains("connection refused"));
}

fn dir(mode: u32, secrets: &[(&str, u32)], avail: u64, total: u64) -> Result<DirFacts, String> {
    Result::Ok(DirFacts {
        mode,
        secret_files: secrets.iter().map(|(n, m)| (n.to_string(), *m)).collect(),
        avail_bytes: avail,
        total_bytes: total,
    })
}

#[test]
fn the_data_directory_is_closed_to_others_and_has_room() {
    let path = std::path::Path::new("/var/lib/lpush");
    let (gib, tib) = (1u64 << 30, 1u64 << 40);
    let keys = [("tls/ca.key", 0o100600), ("admin.key", 0o100600)];
    assert_eq!(
        severities(&data_dir(path, &dir(0o40700, &keys, 100 * gib, tib))),
        [Ok]
    );
    let out = data_dir(path, &dir(0o40777, &keys, 100 * gib, tib));
    assert!(
        the_failure(&out).contains("/var/lib/lpush is world-writable (mode 777)"),
        "{out:#?}"
    );
    assert_eq!(
        severities(&data_dir(path, &dir(0o40750, &keys, 100 * gib, tib))),
        [Warn]
    );
    let out = data_dir(path, &dir(0o40700, &[("tls/ca.key", 0o100644)], 100 * gib, tib));
    assert!(the_failure(&out).contains("tls/ca.key is readable by others (mode 644)"));
    let out = data_dir(path, &dir(0o40700, &keys, 50 << 20, tib));
    assert!(the_failure(&out).contains("50 MiB free"), "{out:#?}");
    // Under 1 GiB, or under 5 % of the file system, warns.
    assert_eq!(
        severities(&data_dir(path, &dir(0o40700, &keys, 512 << 20, 2 * gib))),
        [Warn]
    );
    assert_eq!(
        severities(&data_dir(path, &dir(0o40700, &keys, 40 * gib, tib))),
        [Warn]
    );
    assert_eq!(
        the_failure(&data_dir(path, &Err("cannot read".into()))),
        "cannot read"
    );
}

fn phones(offsets: &[i64]) -> Result<Vec<PhoneClock>, String> {
    Result::Ok(
        offsets
            .iter()
            .enumerate()
            .map(|(i, &offset_ms)| PhoneClock {
                device_id: format!("phone-{i}"),
                offset_ms,
            })
            .collect(),
    )
}

#[test]
fn phone_clocks_far_off_fail_naming_the_worst_first() {
    assert_eq!(severities(&clocks(&phones(&[120, -900, 1_999]))), [Ok]);
    let out = clocks(&phones(&[120, -2_500, 300]));
    assert_eq!(severities(&out), [Warn]);
    assert!(out[0].message.contains("1 of 3 phones") && out[0].message.contains("phone-1 -2.5 s"));
    let out = clocks(&phones(&[120, 42_000, -15_000, 300]));
    let m = the_failure(&out);
    assert!(m.contains("2 of 4 phones"), "{m}");
    assert!(m.contains("(phone-1 +42.0 s, phone-2 -15.0 s)"), "{m}");
}

#[test]
fn when_most_phones_agree_the_servers_clock_is_blamed() {
    let m = clocks(&phones(&[61_000, 60_500, 59_800, 0]))
        .into_iter()
        .find(|f| f.severity == Fail)
        .unwrap()
        .message;
    assert!(
        m.contains("median of 4 phones is +60.5 s") && m.contains("this server's clock"),
        "{m}"
    );
    // Two phones are not enough to blame the server.
    let m = clocks(&phones(&[61_000, 60_500])).remove(0).message;
    assert!(m.contains("2 of 2 phones"), "{m}");
}

#[test]
fn clocks_unknown_are_a_note_not_a_pass() {
    assert_eq!(severities(&clocks(&phones(&[]))), [Note]);
    let out = clocks(&Err("the API at 127.0.0.1:7444 did not answer within 3 s".into()));
    assert_eq!(severities(&out), [Note]);
    assert!(out[0].message.contains("skew not checked: the API"));
}

#[test]
fn the_wifi_pitfalls_name_the_sites_port_and_heartbeat() {
    let out = wifi_pitfalls(3, 443, (30_000, 10_000));
    assert!(out.iter().all(|f| f.severity == Note && f.check == "wifi"));
    let text: Vec<String> = out.iter().map(|f| f.message.clone()).collect();
    let text = text.join("\n");
    for needle in [
        "primary route",
        "at most 10",
        "TCP port 443",
        "more than 40 s",
        "~30 s",
    ] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
}

#[test]
fn a_report_line_is_severity_check_and_message() {
    let f = Finding::new(Fail, "ssids", "site.ssids[1] is empty");
    assert_eq!(f.to_string(), "FAIL ssids: site.ssids[1] is empty");
    assert_eq!(Finding::new(Ok, "dns", "x").to_string(), "ok   dns: x");
}

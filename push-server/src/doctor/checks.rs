//! The checks: pure functions from gathered facts to findings.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use super::{
    Finding,
    Severity::{Fail, Note, Ok, Warn},
};
use crate::{api::enrollment::SSIDS_PER_MANAGER, config::MAX_SSID_BYTES, hub::fmt_utc};

/// Apple's longest validity for a TLS server certificate.
pub const MAX_CERT_DAYS: i64 = 825;
/// A certificate expiring sooner than this is reported (the server reissues it at start).
pub const CERT_RENEW_DAYS: i64 = 30;
/// A name that takes longer than this to resolve is reported: phones resolve synchronously.
pub const SLOW_DNS: Duration = Duration::from_secs(1);
/// Free space below this fails: the store cannot commit.
pub const MIN_FREE_BYTES: u64 = 100 << 20;
/// Free space below this (or below [`LOW_FREE_PERCENT`]) is reported.
pub const LOW_FREE_BYTES: u64 = 1 << 30;
/// See [`LOW_FREE_BYTES`].
pub const LOW_FREE_PERCENT: u64 = 5;
/// A phone whose clock differs from the server's by more than this is reported.
pub const CLOCK_WARN_MS: i64 = 2_000;
/// ... and by more than this fails: a call rings 30 s by default, and the phone judges its ring
/// deadline by its own clock.
pub const CLOCK_FAIL_MS: i64 = 10_000;
/// Fewest phones whose common offset blames the server's clock rather than theirs.
const CLOCK_QUORUM: usize = 3;

/// Everything the checks look at.
#[derive(Debug, Clone)]
pub struct Facts {
    /// Why the configuration is unusable apart from its SSIDs (which [`ssids`] checks), if it is.
    pub config_problem: Option<String>,
    /// `site.ssids`.
    pub ssids: Vec<String>,
    /// The host phones dial (see `enrollment::device_endpoint`).
    pub device_host: String,
    /// The port phones dial.
    pub device_port: u16,
    /// The server's heartbeat interval and answer deadline, ms.
    pub heartbeat_ms: (u64, u64),
    /// The server certificate, or why it could not be read.
    pub certificate: Result<CertFacts, String>,
    /// How `device_host` resolved.
    pub resolution: Resolution,
    /// A TCP connect to each resolved address at `device_port`: time taken, or the error.
    pub reachability: Vec<(SocketAddr, Result<Duration, String>)>,
    /// The data directory.
    pub data_dir: PathBuf,
    /// What the data directory looks like, or why it could not be read.
    pub data_dir_facts: Result<DirFacts, String>,
    /// Clock offsets of the phones online, or why they are unknown.
    pub phone_clocks: Result<Vec<PhoneClock>, String>,
    /// Now, Unix ms.
    pub now_ms: i64,
}

/// What iOS looks at in the server certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// subjectAltName entries: DNS names, and IP addresses in text form.
    pub names: Vec<String>,
    /// ExtendedKeyUsage contains serverAuth.
    pub server_auth: bool,
    /// Validity, Unix ms.
    pub not_before_ms: i64,
    /// Validity, Unix ms.
    pub not_after_ms: i64,
    /// The public key.
    pub key: KeyKind,
    /// The signature's hash is SHA-256, -384 or -512.
    pub sha2_signature: bool,
}

/// A certificate's public key, as far as iOS cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA with this many modulus bits.
    Rsa(usize),
    /// ECDSA on a curve of this many bits (256: P-256, 384: P-384).
    Ec(usize),
    /// Anything else (Ed25519, DSA, ...), by name.
    Other(String),
}

/// How the device host resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// The host is an IP address: nothing to resolve.
    Literal(IpAddr),
    /// Resolved to these addresses in this time.
    Resolved(Vec<IpAddr>, Duration),
    /// Resolution failed after this time.
    Failed(String, Duration),
    /// No answer within this time.
    TimedOut(Duration),
}

/// The data directory's permissions and room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirFacts {
    /// The directory's mode bits.
    pub mode: u32,
    /// The key files present (name, mode bits).
    pub secret_files: Vec<(String, u32)>,
    /// Bytes free for the server's user.
    pub avail_bytes: u64,
    /// Size of the file system.
    pub total_bytes: u64,
}

/// What one online phone's clock said against the server's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhoneClock {
    /// The phone.
    pub device_id: String,
    /// Phone clock minus server clock at its hello, ms.
    pub offset_ms: i64,
}

/// Every check, in report order.
pub fn all(f: &Facts) -> Vec<Finding> {
    let mut out = Vec::new();
    out.extend(config(f.config_problem.as_deref()));
    out.extend(ssids(&f.ssids));
    out.extend(certificate(&f.certificate, &f.device_host, f.now_ms));
    out.extend(dns(&f.device_host, &f.resolution));
    out.extend(reachability(&f.device_host, f.device_port, &f.reachability));
    out.extend(data_dir(&f.data_dir, &f.data_dir_facts));
    out.extend(clocks(&f.phone_clocks));
    out.extend(wifi_pitfalls(f.ssids.len(), f.device_port, f.heartbeat_ms));
    out
}

/// The configuration validates (its SSIDs aside).
pub fn config(problem: Option<&str>) -> Vec<Finding> {
    vec![match problem {
        None => Finding::new(Ok, "config", "valid"),
        Some(p) => Finding::new(Fail, "config", p),
    }]
}

/// `site.ssids`: what iOS and 802.11 accept, and what is likely a typo.
pub fn ssids(list: &[String]) -> Vec<Finding> {
    let mut out = Vec::new();
    let fail = |m: String| Finding::new(Fail, "ssids", m);
    let warn = |m: String| Finding::new(Warn, "ssids", m);
    if list.is_empty() {
        out.push(fail(
            "site.ssids is empty: iOS starts the provider only on listed Wi-Fi networks".into(),
        ));
    }
    for (i, ssid) in list.iter().enumerate() {
        if ssid.is_empty() {
            out.push(fail(format!("site.ssids[{i}] is empty")));
        } else if ssid.len() > MAX_SSID_BYTES {
            out.push(fail(format!(
                "site.ssids[{i}] {ssid:?} is {} bytes; an SSID has at most {MAX_SSID_BYTES}",
                ssid.len()
            )));
        }
        if ssid.chars().any(char::is_control) {
            out.push(fail(format!(
                "site.ssids[{i}] {ssid:?} holds a control character: no access point broadcasts that"
            )));
        }
        if ssid.trim() != ssid && !ssid.trim().is_empty() {
            out.push(warn(format!(
                "site.ssids[{i}] {ssid:?} starts or ends with a space: iOS matches it exactly; \
                 check the access point broadcasts it so"
            )));
        }
        if let Some(j) = list[..i].iter().position(|s| s == ssid) {
            out.push(fail(format!("site.ssids[{i}] repeats site.ssids[{j}] {ssid:?}")));
        } else if let Some(j) = list[..i]
            .iter()
            .position(|s| s.to_lowercase() == ssid.to_lowercase())
        {
            out.push(warn(format!(
                "site.ssids[{i}] {ssid:?} and site.ssids[{j}] {:?} differ only in case: SSIDs are \
                 case-sensitive, is one a typo?",
                list[j]
            )));
        }
    }
    if list.len() > SSIDS_PER_MANAGER {
        out.push(warn(format!(
            "{} SSIDs: iOS takes at most {SSIDS_PER_MANAGER} per push manager, so the app must save \
             all {} managers enrollment hands it",
            list.len(),
            list.len().div_ceil(SSIDS_PER_MANAGER)
        )));
    }
    or_ok(out, "ssids", || format!("{} SSIDs: {list:?}", list.len()))
}

/// Whether `name` (a DNS name or an IP address) is one of the certificate's names.
fn covers(names: &[String], host: &str) -> bool {
    match host.parse::<IpAddr>() {
        Result::Ok(ip) => names.iter().any(|n| n.parse::<IpAddr>() == Result::Ok(ip)),
        Err(_) => names.iter().any(|n| {
            n.trim_end_matches('.')
                .eq_ignore_ascii_case(host.trim_end_matches('.'))
        }),
    }
}

/// The server certificate against iOS's rules and the host phones dial.
pub fn certificate(cert: &Result<CertFacts, String>, host: &str, now_ms: i64) -> Vec<Finding> {
    let c = match cert {
        Result::Ok(c) => c,
        Err(e) => return vec![Finding::new(Fail, "certificate", e.clone())],
    };
    let fail = |m: String| Finding::new(Fail, "certificate", m);
    let mut out = Vec::new();
    if !covers(&c.names, host) {
        out.push(fail(format!(
            "the device host {host:?} is not among the certificate's names ({}): phones refuse \
             the server; add it to server_names and restart the server",
            c.names.join(", ")
        )));
    }
    if !c.server_auth {
        out.push(fail("no ExtendedKeyUsage serverAuth: iOS refuses it".into()));
    }
    let day = 86_400_000;
    let days = (c.not_after_ms - c.not_before_ms) / day;
    if days > MAX_CERT_DAYS {
        out.push(fail(format!(
            "valid for {days} days: iOS refuses more than {MAX_CERT_DAYS}"
        )));
    }
    if now_ms < c.not_before_ms {
        out.push(fail(format!(
            "not valid before {}: is this server's clock right?",
            fmt_utc(c.not_before_ms)
        )));
    }
    if c.not_after_ms <= now_ms {
        out.push(fail(format!(
            "expired at {}: restart the server to reissue it",
            fmt_utc(c.not_after_ms)
        )));
    } else if c.not_after_ms - now_ms < CERT_RENEW_DAYS * day {
        out.push(Finding::new(
            Warn,
            "certificate",
            format!(
                "expires at {}: restart the server to reissue it",
                fmt_utc(c.not_after_ms)
            ),
        ));
    }
    let key = match &c.key {
        KeyKind::Rsa(bits) if *bits >= 2048 => format!("RSA {bits}"),
        KeyKind::Ec(bits @ (256 | 384)) => format!("ECDSA P-{bits}"),
        other => {
            out.push(fail(format!(
                "key {other:?}: iOS takes RSA of at least 2048 bits or ECDSA P-256/P-384"
            )));
            String::new()
        }
    };
    if !c.sha2_signature {
        out.push(fail("signature hash is not SHA-2: iOS refuses it".into()));
    }
    or_ok(out, "certificate", || {
        format!(
            "names {} cover {host:?}; {key}, serverAuth, {days} days, expires {}",
            c.names.join(", "),
            fmt_utc(c.not_after_ms)
        )
    })
}

/// `found`, or one `ok` line saying what was checked when nothing was found.
fn or_ok(mut found: Vec<Finding>, check: &'static str, checked: impl FnOnce() -> String) -> Vec<Finding> {
    if found.is_empty() {
        found.push(Finding::new(Ok, check, checked()));
    }
    found
}

/// The device host resolves, quickly, to an address phones can dial.
pub fn dns(host: &str, r: &Resolution) -> Vec<Finding> {
    let fail = |m: String| vec![Finding::new(Fail, "dns", m)];
    let addrs = match r {
        Resolution::Literal(ip) => std::slice::from_ref(ip),
        Resolution::Resolved(addrs, took) if *took > SLOW_DNS => {
            return vec![Finding::new(
                Warn,
                "dns",
                format!(
                    "{host:?} took {} ms to resolve: phones resolve synchronously and hang in \
                     restricted networks; give phones an IP (site.device_host) or a DNS server that answers at once",
                    took.as_millis()
                ),
            )];
        }
        Resolution::Resolved(addrs, _) => addrs.as_slice(),
        Resolution::Failed(e, _) => return fail(format!("{host:?} does not resolve: {e}")),
        Resolution::TimedOut(t) => {
            return fail(format!(
                "{host:?} did not resolve within {} s: phones hang on it (about 30 s in restricted \
                 networks); fix DNS or give phones an IP (site.device_host)",
                t.as_secs()
            ));
        }
    };
    if addrs.is_empty() {
        return fail(format!("{host:?} resolves to no address"));
    }
    if addrs.iter().all(|a| a.is_loopback() || a.is_unspecified()) {
        return fail(format!(
            "the device host {host:?} is {addrs:?}, which phones cannot dial: set site.device_host \
             (or server_names) to this server's name or address on the Wi-Fi"
        ));
    }
    vec![Finding::new(Ok, "dns", format!("{host:?} is {addrs:?}"))]
}

/// The device port answers on every address of the device host, from this machine.
pub fn reachability(host: &str, port: u16, tries: &[(SocketAddr, Result<Duration, String>)]) -> Vec<Finding> {
    tries
        .iter()
        .map(|(addr, r)| match r {
            Result::Ok(t) => Finding::new(
                Ok,
                "reach",
                format!(
                    "{host}:{port} ({addr}) accepts connections ({} ms)",
                    t.as_millis()
                ),
            ),
            Err(e) => Finding::new(
                Fail,
                "reach",
                format!(
                    "cannot connect to {host}:{port} ({addr}): {e}; is the server running, and \
                     does a firewall or a wrong address stand between?"
                ),
            ),
        })
        .collect()
}

/// The data directory: closed to others, its keys owner-only, room to commit.
pub fn data_dir(path: &std::path::Path, facts: &Result<DirFacts, String>) -> Vec<Finding> {
    let d = match facts {
        Result::Ok(d) => d,
        Err(e) => return vec![Finding::new(Fail, "data-dir", e.clone())],
    };
    let shown = path.display();
    let mut out = Vec::new();
    if d.mode & 0o002 != 0 {
        out.push(Finding::new(
            Fail,
            "data-dir",
            format!(
                "{shown} is world-writable (mode {:o}): anyone can replace its keys; chmod 700 it",
                d.mode & 0o7777
            ),
        ));
    } else if d.mode & 0o077 != 0 {
        out.push(Finding::new(
            Warn,
            "data-dir",
            format!(
                "{shown} is open to group/others (mode {:o}); it holds keys and message content: chmod 700 it",
                d.mode & 0o7777
            ),
        ));
    }
    for (name, mode) in &d.secret_files {
        if mode & 0o077 != 0 {
            out.push(Finding::new(
                Fail,
                "data-dir",
                format!(
                    "{shown}/{name} is readable by others (mode {:o}): chmod 600 it",
                    mode & 0o7777
                ),
            ));
        }
    }
    let mib = |b: u64| b >> 20;
    if d.avail_bytes < MIN_FREE_BYTES {
        out.push(Finding::new(
            Fail,
            "data-dir",
            format!(
                "{} MiB free under {shown}: the store cannot commit",
                mib(d.avail_bytes)
            ),
        ));
    } else if d.avail_bytes < LOW_FREE_BYTES || d.avail_bytes * 100 < d.total_bytes * LOW_FREE_PERCENT {
        out.push(Finding::new(
            Warn,
            "data-dir",
            format!(
                "only {} MiB of {} MiB free under {shown}",
                mib(d.avail_bytes),
                mib(d.total_bytes)
            ),
        ));
    }
    or_ok(out, "data-dir", || {
        format!(
            "{shown} mode {:o}, {} key files owner-only, {} MiB free",
            d.mode & 0o7777,
            d.secret_files.len(),
            mib(d.avail_bytes)
        )
    })
}

fn secs(ms: i64) -> String {
    format!("{:+.1} s", ms as f64 / 1000.0)
}

/// The phones' clocks against this server's: one common offset blames the server (NTP), single
/// phones are listed by how far off they are.
pub fn clocks(phones: &Result<Vec<PhoneClock>, String>) -> Vec<Finding> {
    let phones = match phones {
        Result::Ok(p) if p.is_empty() => {
            return vec![Finding::new(
                Note,
                "clock",
                "no phone online has reported its clock: skew not checked",
            )];
        }
        Result::Ok(p) => p,
        Err(e) => return vec![Finding::new(Note, "clock", format!("skew not checked: {e}"))],
    };
    let mut offsets: Vec<i64> = phones.iter().map(|p| p.offset_ms).collect();
    offsets.sort_unstable();
    let median = offsets[offsets.len() / 2];
    if phones.len() >= CLOCK_QUORUM && median.abs() > CLOCK_FAIL_MS {
        return vec![Finding::new(
            Fail,
            "clock",
            format!(
                "the median of {} phones is {} off this server's clock: this server's clock is \
                 likely wrong; check its time synchronisation (NTP)",
                phones.len(),
                secs(median)
            ),
        )];
    }
    let mut worst: Vec<&PhoneClock> = phones.iter().collect();
    worst.sort_by_key(|p| std::cmp::Reverse(p.offset_ms.abs()));
    let over = |limit: i64| worst.iter().take_while(|p| p.offset_ms.abs() > limit).count();
    let list = |n: usize| {
        worst
            .iter()
            .take(n.min(5))
            .map(|p| format!("{} {}", p.device_id, secs(p.offset_ms)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (failing, warning) = (over(CLOCK_FAIL_MS), over(CLOCK_WARN_MS));
    let finding = if failing > 0 {
        Finding::new(
            Fail,
            "clock",
            format!(
                "{failing} of {} phones are more than {} s off this server's clock ({}): they \
                 misjudge call ring deadlines; check their time settings",
                phones.len(),
                CLOCK_FAIL_MS / 1000,
                list(failing)
            ),
        )
    } else if warning > 0 {
        Finding::new(
            Warn,
            "clock",
            format!(
                "{warning} of {} phones are more than {} s off this server's clock ({})",
                phones.len(),
                CLOCK_WARN_MS / 1000,
                list(warning)
            ),
        )
    } else {
        Finding::new(
            Ok,
            "clock",
            format!(
                "{} phones online within {} s of this server's clock (largest {})",
                phones.len(),
                CLOCK_WARN_MS / 1000,
                secs(worst[0].offset_ms)
            ),
        )
    };
    vec![finding]
}

/// What only the access points can tell: the field's pitfalls, for the operator to check.
pub fn wifi_pitfalls(ssid_count: usize, port: u16, (interval_ms, timeout_ms): (u64, u64)) -> Vec<Finding> {
    let note = |m: String| Finding::new(Note, "wifi", m);
    vec![
        note(format!(
            "each of the {ssid_count} SSIDs must be broadcast exactly as listed (case, spaces); iOS \
             takes at most {SSIDS_PER_MANAGER} per push manager"
        )),
        note(
            "on those SSIDs the Wi-Fi must be the phone's primary route: iOS starts the provider \
             only then"
                .into(),
        ),
        note(format!(
            "phones on every listed SSID (each VLAN) must reach TCP port {port} of this server: \
             check client isolation, ACLs and firewalls between the Wi-Fi and the server"
        )),
        note(format!(
            "access points and firewalls must keep an idle TCP connection open for more than {} s \
             (heartbeat every {} s, answer within {} s)",
            (interval_ms + timeout_ms).div_ceil(1000),
            interval_ms / 1000,
            timeout_ms / 1000
        )),
        note(
            "the Wi-Fi's DNS must answer the device host at once (or give phones an IP): phones \
             resolve synchronously, and restricted networks leave them hanging ~30 s"
                .into(),
        ),
        note(
            "phones on an isolated network may have no time source: check their clocks against \
             this server's (call deadlines and certificate validity depend on it)"
                .into(),
        ),
    ]
}

#[cfg(test)]
mod tests;

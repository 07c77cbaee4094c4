//! The facts `doctor` checks, read from this machine: the configuration, the data directory,
//! the server certificate, DNS, TCP, and the phones' clocks from the running server's API (the
//! store is not opened: the running server holds it).

use std::{
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    os::unix::fs::PermissionsExt,
    path::Path,
    time::{Duration, Instant},
};

use push_proto::sender::ListDevicesRequest;
use x509_parser::{
    oid_registry::{
        OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
        OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ECDSA_WITH_SHA512,
    },
    prelude::{FromDer, GeneralName, X509Certificate},
    public_key::PublicKey,
};

use super::{
    Finding, Severity,
    checks::{CertFacts, DirFacts, Facts, KeyKind, PhoneClock, Resolution},
};
use crate::{
    api::enrollment::device_endpoint,
    api_client::ApiClient,
    config::{Config, ConfigArgs},
    data_dir::{ADMIN_KEY_FILE, STORE_FILE, TLS_DIR},
    hub::now_ms,
    pki::{CA_CERT_FILE, CA_KEY_FILE, CA_NEXT_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE},
};

/// Longest wait for the device host to resolve.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a TCP connect, and for the API.
const NET_TIMEOUT: Duration = Duration::from_secs(3);

/// Gather every fact; `Err` when the configuration cannot even be read.
pub async fn gather(args: &ConfigArgs) -> Result<Facts, Finding> {
    let cfg = args.read().map_err(|e| Finding {
        severity: Severity::Fail,
        check: "config",
        message: e.to_string(),
    })?;
    // The SSIDs get their own, fuller check.
    let mut rest = cfg.clone();
    rest.site.ssids.clear();
    let config_problem = rest.validate().err().map(|e| e.to_string());
    let endpoint = device_endpoint(&cfg, cfg.device_listen);
    let (device_host, device_port) = (endpoint.host, endpoint.port);
    let resolution = resolve(&device_host, device_port);
    let addrs = match &resolution {
        Resolution::Literal(ip) => vec![*ip],
        Resolution::Resolved(addrs, _) => addrs.clone(),
        _ => Vec::new(),
    };
    let mut reachability = Vec::new();
    for ip in addrs {
        let addr = SocketAddr::new(ip, device_port);
        reachability.push((addr, connect(addr).await));
    }
    let tls = cfg.data_dir.join(TLS_DIR);
    Ok(Facts {
        config_problem,
        ssids: cfg.site.ssids.clone(),
        device_host,
        device_port,
        heartbeat_ms: (cfg.heartbeat_interval_ms, cfg.heartbeat_timeout_ms),
        certificate: certificate(&tls.join(SERVER_CERT_FILE)),
        resolution,
        reachability,
        data_dir: cfg.data_dir.clone(),
        data_dir_facts: data_dir(&cfg.data_dir),
        phone_clocks: phone_clocks(&cfg).await,
        now_ms: now_ms(),
    })
}

/// Resolve `host` as a phone would (the system resolver), giving up after [`DNS_TIMEOUT`]. The
/// resolver blocks, so it runs on its own thread, left behind if it hangs.
fn resolve(host: &str, port: u16) -> Resolution {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Resolution::Literal(ip);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let target = (host.to_string(), port);
    let start = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(
            target
                .to_socket_addrs()
                .map(|a| a.map(|a| a.ip()).collect::<Vec<_>>()),
        );
    });
    match rx.recv_timeout(DNS_TIMEOUT) {
        Ok(Ok(mut addrs)) => {
            addrs.dedup();
            Resolution::Resolved(addrs, start.elapsed())
        }
        Ok(Err(e)) => Resolution::Failed(e.to_string(), start.elapsed()),
        Err(_) => Resolution::TimedOut(DNS_TIMEOUT),
    }
}

async fn connect(addr: SocketAddr) -> Result<Duration, String> {
    let start = Instant::now();
    match tokio::time::timeout(NET_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} s", NET_TIMEOUT.as_secs())),
    }
}

/// What iOS looks at in the PEM certificate at `path` (the first in the file).
fn certificate(path: &Path) -> Result<CertFacts, String> {
    let shown = path.display();
    let pem = std::fs::read(path)
        .map_err(|e| format!("cannot read {shown}: {e} (the server writes it at its first start)"))?;
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .ok_or_else(|| format!("{shown} holds no PEM certificate"))?
        .map_err(|e| format!("{shown}: {e}"))?;
    let (_, cert) =
        X509Certificate::from_der(&der).map_err(|e| format!("{shown}: not an X.509 certificate: {e}"))?;
    cert_facts(&cert).map_err(|e| format!("{shown}: {e}"))
}

fn cert_facts(cert: &X509Certificate<'_>) -> Result<CertFacts, String> {
    let names = match cert.subject_alternative_name().map_err(|e| e.to_string())? {
        Some(san) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => Some(IpAddr::from(<[u8; 4]>::try_from(*b).ok()?).to_string()),
                    16 => Some(IpAddr::from(<[u8; 16]>::try_from(*b).ok()?).to_string()),
                    _ => None,
                },
                _ => None,
            })
            .collect(),
        None => Vec::new(),
    };
    let server_auth = cert
        .extended_key_usage()
        .map_err(|e| e.to_string())?
        .is_some_and(|eku| eku.value.server_auth);
    let key = match cert.public_key().parsed() {
        Ok(PublicKey::RSA(rsa)) => KeyKind::Rsa(rsa.key_size()),
        Ok(PublicKey::EC(ec)) => KeyKind::Ec(ec.key_size()),
        Ok(other) => KeyKind::Other(format!("{other:?}").chars().take(24).collect()),
        Err(e) => KeyKind::Other(e.to_string()),
    };
    let sig = &cert.signature_algorithm.algorithm;
    let sha2_signature = [
        OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384,
        OID_SIG_ECDSA_WITH_SHA512,
        OID_PKCS1_SHA256WITHRSA,
        OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA,
        OID_PKCS1_RSASSAPSS,
    ]
    .iter()
    .any(|oid| oid == sig);
    let validity = cert.validity();
    Ok(CertFacts {
        names,
        server_auth,
        not_before_ms: validity.not_before.timestamp() * 1000,
        not_after_ms: validity.not_after.timestamp() * 1000,
        key,
        sha2_signature,
    })
}

/// The data directory's mode, its key files' modes, and the room on its file system.
fn data_dir(dir: &Path) -> Result<DirFacts, String> {
    let shown = dir.display();
    let meta = std::fs::metadata(dir).map_err(|e| {
        format!("cannot read the data directory {shown}: {e} (the server creates it at its first start)")
    })?;
    if !meta.is_dir() {
        return Err(format!("{shown} is not a directory"));
    }
    let tls = Path::new(TLS_DIR);
    let secrets = [
        tls.join(CA_KEY_FILE),
        tls.join(CA_NEXT_KEY_FILE),
        tls.join(SERVER_KEY_FILE),
        crate::auth::KEY_FILE.into(),
        ADMIN_KEY_FILE.into(),
        STORE_FILE.into(),
    ];
    let secret_files = secrets
        .iter()
        .filter_map(|name| {
            let mode = std::fs::metadata(dir.join(name)).ok()?.permissions().mode();
            Some((name.display().to_string(), mode))
        })
        .collect();
    let (avail_bytes, total_bytes) =
        room(dir).map_err(|e| format!("cannot stat the file system of {shown}: {e}"))?;
    Ok(DirFacts {
        mode: meta.permissions().mode(),
        secret_files,
        avail_bytes,
        total_bytes,
    })
}

/// Bytes available to an unprivileged user, and the size, of the file system holding `dir`.
fn room(dir: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: an all-zero `statvfs` is a valid value (integers only).
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `st` a live, writable statvfs.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frag = st.f_frsize as u64;
    Ok((st.f_bavail as u64 * frag, st.f_blocks as u64 * frag))
}

/// The clock offsets the online phones reported, asked of the running server's API with the
/// admin key from the data directory.
async fn phone_clocks(cfg: &Config) -> Result<Vec<PhoneClock>, String> {
    let mut addr = cfg.api_listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    let ca = read(&cfg.data_dir.join(TLS_DIR).join(CA_CERT_FILE))?;
    let key = read(&cfg.data_dir.join(ADMIN_KEY_FILE))?;
    let ask = async {
        let api = ApiClient::connect(addr, "localhost", &ca, key.trim())
            .await
            .map_err(|e| format!("{e:#}"))?;
        api.sender()
            .list_devices(ListDevicesRequest {
                group: String::new(),
                online_only: true,
            })
            .await
            .map_err(|s| format!("the API at {addr} answered {:?}: {}", s.code(), s.message()))
    };
    let devices = tokio::time::timeout(NET_TIMEOUT, ask)
        .await
        .map_err(|_| {
            format!(
                "the API at {addr} did not answer within {} s",
                NET_TIMEOUT.as_secs()
            )
        })??
        .into_inner()
        .devices;
    Ok(devices
        .into_iter()
        .filter_map(|d| {
            Some(PhoneClock {
                offset_ms: d.clock_offset_ms?,
                device_id: d.device_id,
            })
        })
        .collect())
}

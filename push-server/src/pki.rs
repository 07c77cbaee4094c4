//! Private PKI for the device-facing TLS listener.
//!
//! On first start the server creates, in its data directory, a private CA (`ca.pem`, `ca.key`)
//! and a server certificate issued by it (`server.pem`, `server.key`). Devices trust (pin) the CA,
//! so the CA is never replaced automatically; the server certificate is reissued from the existing
//! CA whenever it is missing, close to expiry or does not cover the configured host names.
//!
//! The server certificate follows Apple's requirements for TLS server certificates: ECDSA P-256 with
//! an ECDSA-SHA256 signature, every host name / IP in subjectAltName (the CN is not used),
//! ExtendedKeyUsage serverAuth and a validity period of at most 825 days.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData as _, SanType,
};
use rustls::RootCertStore;
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use sha2::{Digest as _, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::der_parser::asn1_rs::Tag;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::time::ASN1Time;
use x509_parser::x509::X509Name;

mod rotate;
pub use rotate::{CertSlot, Rotator, rotate_ca};

/// File name of the CA certificate (PEM) inside the PKI directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key (PKCS#8 PEM, mode 0600) inside the PKI directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the standby CA key (PKCS#8 PEM, mode 0600): the key the next CA will have.
/// Its pin is handed out at enrollment next to the current CA's, so devices enrolled today
/// still trust the server after the CA is rotated onto it.
pub const CA_NEXT_KEY_FILE: &str = "ca-next.key";
/// File name of the CA's generation (decimal text): 0, or absent, for the first CA of a site,
/// one more after each rotation ([`rotate_ca`]).
pub const CA_GENERATION_FILE: &str = "ca-generation";
/// File name of the server certificate (PEM) inside the PKI directory.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// File name of the server private key (PKCS#8 PEM, mode 0600) inside the PKI directory.
pub const SERVER_KEY_FILE: &str = "server.key";

/// Common name of the generated CA (informational only).
pub const CA_COMMON_NAME: &str = "lpush private CA";
/// Common name of the generated server certificate (informational only: iOS ignores the CN).
const SERVER_COMMON_NAME: &str = "lpush server";

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// CA validity (10 years).
const CA_VALIDITY: Duration = Duration::from_secs(3650 * 24 * 60 * 60);
/// Server certificate validity: Apple's limit is 825 days, keep a margin.
const SERVER_VALIDITY: Duration = Duration::from_secs(820 * 24 * 60 * 60);
/// Certificates are backdated by this much so that a device whose clock is a little behind the
/// server's still accepts a freshly issued certificate (counted inside the validity above).
const BACKDATE: Duration = DAY;
/// Reissue the server certificate when it expires within this period.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// Warn when the CA itself expires within this period (it is never replaced automatically).
const CA_WARN_BEFORE: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// TLS 1.3 session tickets sent after each full handshake (resumption for reconnect storms).
const TLS13_TICKETS: usize = 2;

/// Names always present in the server certificate, in addition to the configured ones.
const ALWAYS_DNS: &[&str] = &["localhost"];
const ALWAYS_IPS: &[IpAddr] = &[IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)];

/// Errors of the PKI module. Messages name the file involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// Reading or writing a file (or creating the directory) failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: io::Error,
    },
    /// A certificate file is not valid PEM / X.509, or not what it should be.
    #[error("{}: invalid certificate: {reason}", path.display())]
    InvalidCertificate {
        /// Offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A private key file is not a valid PEM private key.
    #[error("{}: invalid private key: {reason}", path.display())]
    InvalidKey {
        /// Offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `ca.pem` exists but `ca.key` does not.
    #[error(
        "CA certificate {} exists but its private key {} is missing; refusing to create a new CA \
         because deployed devices pin the existing one (restore the key, or move the CA files away \
         deliberately to start over)",
        cert.display(),
        key.display()
    )]
    CaKeyMissing {
        /// The CA certificate file.
        cert: PathBuf,
        /// The missing key file.
        key: PathBuf,
    },
    /// `ca.key` exists but `ca.pem` does not.
    #[error(
        "CA private key {} exists but the CA certificate {} is missing; refusing to create a new CA \
         over an existing key (restore the certificate, or move the key away deliberately to start over)",
        key.display(),
        cert.display()
    )]
    CaCertMissing {
        /// The missing CA certificate file.
        cert: PathBuf,
        /// The CA key file.
        key: PathBuf,
    },
    /// `ca.key` does not belong to `ca.pem`.
    #[error("CA private key {} does not match the CA certificate {}", key.display(), cert.display())]
    CaKeyMismatch {
        /// The CA certificate file.
        cert: PathBuf,
        /// The CA key file.
        key: PathBuf,
    },
    /// The CA certificate has expired; it is never replaced automatically.
    #[error(
        "CA certificate {} expired at {not_after} (unix time); devices will reject the server. \
         Create a new CA deliberately (move the CA files away) and redeploy its pin",
        path.display()
    )]
    CaExpired {
        /// The CA certificate file.
        path: PathBuf,
        /// Expiry, unix seconds.
        not_after: i64,
    },
    /// `server.pem` was not issued by `ca.pem` (or is not a valid serverAuth certificate).
    #[error("server certificate {} is not a valid server certificate issued by the CA {}: {reason}",
        cert.display(), ca.display())]
    ServerCertNotFromCa {
        /// The server certificate file.
        cert: PathBuf,
        /// The CA certificate file.
        ca: PathBuf,
        /// Why verification failed.
        reason: String,
    },
    /// A configured server name is neither an IP address nor a valid DNS name.
    #[error("invalid server name {name:?}: {reason}")]
    InvalidServerName {
        /// The name as configured.
        name: String,
        /// Why it was rejected.
        reason: String,
    },
    /// Certificate or key generation failed.
    #[error("generating the {what} failed: {source}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// Underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// PEM passed in memory (e.g. to [`client_config`]) is not a usable certificate.
    #[error("invalid {what}: {reason}")]
    InvalidInput {
        /// What was passed.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Building a rustls configuration failed.
    #[error("building the TLS {what} configuration failed: {source}")]
    Tls {
        /// "server" or "client".
        what: &'static str,
        /// Underlying error.
        #[source]
        source: rustls::Error,
    },
}

/// The server's PKI material, as loaded from (or just written to) the data directory.
#[derive(Clone)]
pub struct Pki {
    /// Directory holding `ca.pem`, `ca.key`, `server.pem`, `server.key`.
    pub dir: PathBuf,
    /// The CA certificate (PEM): what devices install / pin.
    pub ca_cert_pem: String,
    /// The server certificate (PEM), issued by the CA.
    pub server_cert_pem: String,
    /// The server private key (PKCS#8 PEM). Never printed by `Debug`.
    pub server_key_pem: String,
    /// `sha256/<base64>` pin of the CA's SubjectPublicKeyInfo.
    pub ca_pin: String,
    /// `sha256/<base64>` pin of the standby CA key ([`CA_NEXT_KEY_FILE`]).
    pub next_ca_pin: String,
    /// `sha256/<base64>` pin of the server certificate's SubjectPublicKeyInfo (changes on reissue).
    pub server_pin: String,
    /// Every subjectAltName of the server certificate (DNS names, and IP addresses in their
    /// textual form), in certificate order: the configured names plus localhost, 127.0.0.1, ::1.
    pub server_names: Vec<String>,
    /// End of the server certificate's validity.
    pub server_not_after: SystemTime,
    /// The CA's generation: 0 for a site's first CA, one more after each rotation. A device
    /// enrolled at generation `g` pins generations `g` and `g + 1`.
    pub ca_generation: u32,
}

impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .field("ca_cert_pem", &self.ca_cert_pem)
            .field("server_cert_pem", &self.server_cert_pem)
            .field("server_key_pem", &"<redacted>")
            .field("ca_pin", &self.ca_pin)
            .field("next_ca_pin", &self.next_ca_pin)
            .field("server_pin", &self.server_pin)
            .field("server_names", &self.server_names)
            .field("server_not_after", &self.server_not_after)
            .field("ca_generation", &self.ca_generation)
            .finish()
    }
}

/// What [`load_or_create`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PkiStatus {
    /// Everything was present and valid; nothing was written.
    Loaded,
    /// No CA existed: a new CA and server certificate were created.
    CreatedCa,
    /// The existing CA issued a new server certificate (with a new key).
    ReissuedServerCert,
}

/// Loads the PKI from `dir`, creating the CA and/or (re)issuing the server certificate as needed.
///
/// * no CA: create CA + server certificate -> [`PkiStatus::CreatedCa`];
/// * CA present: reuse it; reissue the server certificate (new key) when it or its key is missing,
///   the key does not match it, it expires within 30 days or is not yet valid, or it does not
///   cover every name in `server_names`
///   -> [`PkiStatus::ReissuedServerCert`]; otherwise [`PkiStatus::Loaded`].
///
/// A CA certificate without its key (or the reverse), unparsable PEM, a CA key not matching the CA
/// certificate, or a server certificate not issued by the CA are errors: an existing CA is never
/// overwritten, because deployed devices pin it.
///
/// `server_names` are host names or IP addresses the devices connect to; "localhost", 127.0.0.1
/// and ::1 are always included.
pub fn load_or_create(dir: &Path, server_names: &[String]) -> Result<(Pki, PkiStatus), PkiError> {
    let wanted = wanted_names(server_names)?;
    let paths = Paths::new(dir);

    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| PkiError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
    }

    match rotate::recover(dir)? {
        Some(true) => tracing::info!(dir = %dir.display(), "finished a CA rotation that was interrupted"),
        Some(false) => {
            tracing::warn!(dir = %dir.display(), "undid a CA rotation interrupted before its commit")
        }
        None => {}
    }
    let ca_cert_exists = exists(&paths.ca_cert)?;
    let ca_key_exists = exists(&paths.ca_key)?;
    let now = unix_now();

    let (ca, created) = match (ca_cert_exists, ca_key_exists) {
        (true, true) => (Ca::load(&paths)?, false),
        (true, false) => {
            return Err(PkiError::CaKeyMissing {
                cert: paths.ca_cert,
                key: paths.ca_key,
            });
        }
        (false, true) => {
            return Err(PkiError::CaCertMissing {
                cert: paths.ca_cert,
                key: paths.ca_key,
            });
        }
        (false, false) => (Ca::create(&paths, now)?, true),
    };

    if ca.not_after <= now {
        return Err(PkiError::CaExpired {
            path: paths.ca_cert.clone(),
            not_after: ca.not_after,
        });
    }
    if ca.not_after - now < secs(CA_WARN_BEFORE) {
        tracing::warn!(
            ca = %paths.ca_cert.display(),
            ca_not_after = ca.not_after,
            "the private CA expires within a year; server certificates are capped at its expiry"
        );
    }

    let reissue_reason = if created {
        None
    } else {
        check_server(&paths, &ca, &wanted, now)?
    };
    let status = match (created, &reissue_reason) {
        (true, _) => PkiStatus::CreatedCa,
        (false, Some(_)) => PkiStatus::ReissuedServerCert,
        (false, None) => PkiStatus::Loaded,
    };
    if status != PkiStatus::Loaded {
        let (cert_pem, key_pem) = ca.issue_server_cert(&wanted, now)?;
        // Key first: a crash in between leaves a mismatching pair, which the next start reissues.
        write_file(&paths.server_key, key_pem.as_bytes(), 0o600)?;
        write_file(&paths.server_cert, cert_pem.as_bytes(), 0o644)?;
        sync_dir(dir);
    }

    let next_ca_pin = standby_ca_pin(&paths.ca_next_key)?;
    let pki = assemble(dir, &paths, &ca, next_ca_pin)?;
    match status {
        PkiStatus::CreatedCa => tracing::info!(
            ca = %paths.ca_cert.display(),
            ca_key = %paths.ca_key.display(),
            server_cert = %paths.server_cert.display(),
            server_key = %paths.server_key.display(),
            ca_pin = %pki.ca_pin,
            server_pin = %pki.server_pin,
            server_names = ?pki.server_names,
            "created a new private CA and server certificate; install/pin this CA on the devices"
        ),
        PkiStatus::ReissuedServerCert => tracing::info!(
            reason = reissue_reason.as_deref().unwrap_or_default(),
            ca = %paths.ca_cert.display(),
            server_cert = %paths.server_cert.display(),
            server_key = %paths.server_key.display(),
            ca_pin = %pki.ca_pin,
            server_pin = %pki.server_pin,
            server_names = ?pki.server_names,
            "reissued the server certificate from the existing CA"
        ),
        PkiStatus::Loaded => tracing::debug!(
            dir = %dir.display(),
            ca_pin = %pki.ca_pin,
            server_pin = %pki.server_pin,
            "loaded the existing PKI"
        ),
    }
    Ok((pki, status))
}

/// HPKP/OkHttp-style pin of a certificate's public key:
/// `"sha256/" + base64(SHA-256(DER SubjectPublicKeyInfo))`.
pub fn spki_pin(cert_der: &[u8]) -> Result<String, PkiError> {
    let der = CertificateDer::from(cert_der);
    let parsed = ParsedCertificate::try_from(&der).map_err(|e| PkiError::InvalidInput {
        what: "DER certificate",
        reason: e.to_string(),
    })?;
    Ok(pin_of_spki(parsed.subject_public_key_info().as_ref()))
}

/// The rustls configuration of the device listener: TLS 1.3 only, ALPN [`push_proto::ALPN`],
/// no client authentication, aws-lc-rs, stateless resumption with TLS 1.3 session tickets.
pub fn server_config(pki: &Pki) -> Result<rustls::ServerConfig, PkiError> {
    server_config_from(CertSlot::new(pki)?)
}

/// [`server_config`] presenting whatever `certs` holds at each handshake, so a CA rotation
/// reaches new connections without a restart.
pub fn server_config_from(certs: Arc<CertSlot>) -> Result<rustls::ServerConfig, PkiError> {
    let tls = |source| PkiError::Tls {
        what: "server",
        source,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(server_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_no_client_auth()
        .with_cert_resolver(certs.clone());
    config.alpn_protocols = vec![push_proto::ALPN.to_vec()];
    // Our order of suites, not the client's (which puts AES-256-GCM-SHA384 first).
    config.ignore_client_order = true;
    config.ticketer = certs;
    config.send_tls13_tickets = TLS13_TICKETS;
    Ok(config)
}

/// The chain (server certificate, then the CA) and key the listeners present.
fn certified_key(pki: &Pki) -> Result<rustls::sign::CertifiedKey, PkiError> {
    let server_cert = pki.dir.join(SERVER_CERT_FILE);
    let server_key = pki.dir.join(SERVER_KEY_FILE);
    let mut chain = pem_certs(&pki.server_cert_pem).map_err(|reason| PkiError::InvalidCertificate {
        path: server_cert.clone(),
        reason,
    })?;
    // The CA goes in the chain too, so a device can check a pin on the CA's key (stable across
    // server-certificate reissues) without also shipping the CA certificate.
    chain.extend(
        pem_certs(&pki.ca_cert_pem).map_err(|reason| PkiError::InvalidCertificate {
            path: pki.dir.join(CA_CERT_FILE),
            reason,
        })?,
    );
    let key = pem_private_key(&pki.server_key_pem).map_err(|reason| PkiError::InvalidKey {
        path: server_key,
        reason,
    })?;
    rustls::sign::CertifiedKey::from_der(chain, key, &server_provider()).map_err(|source| PkiError::Tls {
        what: "server",
        source,
    })
}

/// A client configuration trusting only the CA in `ca_cert_pem` (for test clients and the CLI):
/// TLS 1.3 only, ALPN [`push_proto::ALPN`], no client certificate.
pub fn client_config(ca_cert_pem: &str) -> Result<rustls::ClientConfig, PkiError> {
    let what = "CA certificate PEM";
    let certs = pem_certs(ca_cert_pem).map_err(|reason| PkiError::InvalidInput { what, reason })?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| PkiError::InvalidInput {
            what,
            reason: e.to_string(),
        })?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| PkiError::Tls {
            what: "client",
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![push_proto::ALPN.to_vec()];
    Ok(config)
}

// ---------------------------------------------------------------------------------------------

struct Paths {
    ca_cert: PathBuf,
    ca_key: PathBuf,
    ca_next_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl Paths {
    fn new(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join(CA_CERT_FILE),
            ca_key: dir.join(CA_KEY_FILE),
            ca_next_key: dir.join(CA_NEXT_KEY_FILE),
            server_cert: dir.join(SERVER_CERT_FILE),
            server_key: dir.join(SERVER_KEY_FILE),
        }
    }
}

/// A subjectAltName we want in the server certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Name {
    Dns(String),
    Ip(IpAddr),
}

impl Name {
    fn to_san(&self) -> Result<SanType, PkiError> {
        Ok(match self {
            Name::Ip(ip) => SanType::IpAddress(*ip),
            Name::Dns(name) => SanType::DnsName(name.as_str().try_into().map_err(|e: rcgen::Error| {
                PkiError::InvalidServerName {
                    name: name.clone(),
                    reason: e.to_string(),
                }
            })?),
        })
    }

    fn covered_by(&self, sans: &[Name]) -> bool {
        sans.iter().any(|san| match (self, san) {
            (Name::Ip(a), Name::Ip(b)) => a == b,
            (Name::Dns(a), Name::Dns(b)) => a.eq_ignore_ascii_case(b),
            _ => false,
        })
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Name::Dns(name) => f.write_str(name),
            Name::Ip(ip) => ip.fmt(f),
        }
    }
}

/// Validates the configured names and adds the always-present ones (deduplicated, in order).
fn wanted_names(server_names: &[String]) -> Result<Vec<Name>, PkiError> {
    let mut names: Vec<Name> = Vec::new();
    let mut push = |name: Name| {
        if !name.covered_by(&names) {
            names.push(name);
        }
    };
    for raw in server_names {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(PkiError::InvalidServerName {
                name: raw.clone(),
                reason: "empty".into(),
            });
        }
        if let Ok(ip) = trimmed.parse::<IpAddr>() {
            push(Name::Ip(ip));
            continue;
        }
        let dns = trimmed.strip_suffix('.').unwrap_or(trimmed);
        match ServerName::try_from(dns) {
            Ok(ServerName::DnsName(_)) => push(Name::Dns(dns.to_ascii_lowercase())),
            _ => {
                return Err(PkiError::InvalidServerName {
                    name: raw.clone(),
                    reason: "neither an IP address nor a valid DNS name".into(),
                });
            }
        }
    }
    for dns in ALWAYS_DNS {
        push(Name::Dns((*dns).to_string()));
    }
    for ip in ALWAYS_IPS {
        push(Name::Ip(*ip));
    }
    Ok(names)
}

/// The loaded (or freshly created) CA, ready to issue server certificates.
struct Ca {
    cert_path: PathBuf,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    pin: String,
    not_before: i64,
    not_after: i64,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn create(paths: &Paths, now: i64) -> Result<Self, PkiError> {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| PkiError::Generate {
                what: "CA key",
                source,
            })?;
        let ca = Self::self_signed(paths, &key, now)?;
        write_file(&paths.ca_key, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&paths.ca_cert, ca.cert_pem.as_bytes(), 0o644)?;
        Ok(ca)
    }

    /// A new CA certificate for `key`, valid from `now` (minus the backdate) for ten years.
    /// Nothing is written.
    fn self_signed(paths: &Paths, key: &KeyPair, now: i64) -> Result<Self, PkiError> {
        let generate = |what| move |source| PkiError::Generate { what, source };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, CA_COMMON_NAME);
        // Distinct subject per CA (derived from its key), so that two deployments' CAs are told
        // apart by name (path building, "unknown issuer" errors, device trust settings).
        let key_id: String = Sha256::digest(key.subject_public_key_info())[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, format!("ca-{key_id}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let not_before = now - secs(BACKDATE);
        set_validity(&mut params, not_before, not_before + secs(CA_VALIDITY))?;
        let cert = params.self_signed(key).map_err(generate("CA certificate"))?;
        // Round-trip through the same path as an existing CA, so what we write is what we load.
        Self::from_pem(paths, cert.pem(), &key.serialize_pem())
    }

    fn load(paths: &Paths) -> Result<Self, PkiError> {
        let cert_pem = read_to_string(&paths.ca_cert)?;
        let key_pem = read_to_string(&paths.ca_key)?;
        warn_if_loose_permissions(&paths.ca_key);
        Self::from_pem(paths, cert_pem, &key_pem)
    }

    fn from_pem(paths: &Paths, cert_pem: String, key_pem: &str) -> Result<Self, PkiError> {
        let invalid = |reason: String| PkiError::InvalidCertificate {
            path: paths.ca_cert.clone(),
            reason,
        };
        let cert_der = first_cert(&cert_pem).map_err(invalid)?;
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| invalid(format!("not a parsable X.509 certificate: {e}")))?;
        match x509.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            Ok(_) => {
                return Err(invalid(
                    "not a CA certificate (basicConstraints CA is not set)".into(),
                ));
            }
            Err(e) => return Err(invalid(format!("bad basicConstraints: {e}"))),
        }

        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::InvalidKey {
            path: paths.ca_key.clone(),
            reason: e.to_string(),
        })?;
        if key.subject_public_key_info() != x509.public_key().raw {
            return Err(PkiError::CaKeyMismatch {
                cert: paths.ca_cert.clone(),
                key: paths.ca_key.clone(),
            });
        }

        // rcgen's own CA-from-certificate constructor needs its `x509-parser` feature; rebuild the
        // issuer fields (subject name, key identifier, key usages) from the parsed certificate.
        let mut params = CertificateParams::default();
        params.distinguished_name = dn_from_x509(x509.subject()).map_err(invalid)?;
        params.key_identifier_method = match subject_key_identifier(&x509) {
            Some(ski) => KeyIdMethod::PreSpecified(ski),
            None => KeyIdMethod::Sha256,
        };
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let not_before = x509.validity().not_before.timestamp();
        let not_after = x509.validity().not_after.timestamp();
        let pin = pin_of_spki(x509.public_key().raw);
        drop(x509);

        Ok(Self {
            cert_path: paths.ca_cert.clone(),
            cert_pem,
            cert_der,
            pin,
            not_before,
            not_after,
            issuer: Issuer::new(params, key),
        })
    }

    /// Issues a server certificate (new P-256 key) valid from `now` minus the backdate margin for
    /// [`SERVER_VALIDITY`] (capped at the CA's expiry). Returns (certificate PEM, key PEM).
    fn issue_server_cert(&self, names: &[Name], now: i64) -> Result<(String, String), PkiError> {
        let not_before = now - secs(BACKDATE);
        let not_after = (not_before + secs(SERVER_VALIDITY)).min(self.not_after);
        self.issue_server_cert_with_validity(names, not_before, not_after)
    }

    fn issue_server_cert_with_validity(
        &self,
        names: &[Name],
        not_before: i64,
        not_after: i64,
    ) -> Result<(String, String), PkiError> {
        let generate = |what| move |source| PkiError::Generate { what, source };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generate("server key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, SERVER_COMMON_NAME);
        params.subject_alt_names = names.iter().map(Name::to_san).collect::<Result<_, _>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, not_before, not_after)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(generate("server certificate"))?;

        // Never write a certificate the CA does not actually validate (e.g. a subject-name
        // encoding mismatch): fail loudly instead.
        self.verify_issued(cert.der(), not_before)
            .map_err(|reason| PkiError::ServerCertNotFromCa {
                cert: PathBuf::from(SERVER_CERT_FILE),
                ca: self.cert_path.clone(),
                reason: format!("freshly issued certificate does not verify: {reason}"),
            })?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Path validation of `cert` (chain to this CA, signature, serverAuth EKU), performed at a
    /// moment when both certificates are valid (right after the later `not_before`), so that
    /// expiry is left to the caller.
    fn verify_issued(&self, cert: &CertificateDer<'_>, cert_not_before: i64) -> Result<(), String> {
        let at = cert_not_before.max(self.not_before).max(0) + 1;
        let mut roots = RootCertStore::empty();
        roots
            .add(self.cert_der.clone())
            .map_err(|e| format!("CA certificate unusable: {e}"))?;
        let parsed = ParsedCertificate::try_from(cert).map_err(|e| e.to_string())?;
        let at = UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(at).unwrap_or(0)));
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            at,
            provider().signature_verification_algorithms.all,
        )
        .map_err(|e| e.to_string())
    }
}

/// Checks the existing server certificate. `Ok(Some(reason))` means "reissue", `Ok(None)` "keep".
fn check_server(paths: &Paths, ca: &Ca, wanted: &[Name], now: i64) -> Result<Option<String>, PkiError> {
    if !exists(&paths.server_cert)? {
        return Ok(Some(format!("{} is missing", paths.server_cert.display())));
    }
    if !exists(&paths.server_key)? {
        return Ok(Some(format!("{} is missing", paths.server_key.display())));
    }
    let cert_pem = read_to_string(&paths.server_cert)?;
    let key_pem = read_to_string(&paths.server_key)?;
    warn_if_loose_permissions(&paths.server_key);

    let invalid = |reason: String| PkiError::InvalidCertificate {
        path: paths.server_cert.clone(),
        reason,
    };
    let cert_der = first_cert(&cert_pem).map_err(invalid)?;
    let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
        .map_err(|e| invalid(format!("not a parsable X.509 certificate: {e}")))?;
    let not_before = x509.validity().not_before.timestamp();
    let not_after = x509.validity().not_after.timestamp();

    // Signature / chain check inside the validity period, so that an expired (but genuine)
    // certificate is reissued rather than reported as foreign.
    ca.verify_issued(&cert_der, not_before)
        .map_err(|reason| PkiError::ServerCertNotFromCa {
            cert: paths.server_cert.clone(),
            ca: paths.ca_cert.clone(),
            reason,
        })?;

    let key = KeyPair::from_pem(&key_pem).map_err(|e| PkiError::InvalidKey {
        path: paths.server_key.clone(),
        reason: e.to_string(),
    })?;
    if key.subject_public_key_info() != x509.public_key().raw {
        return Ok(Some(format!(
            "{} does not match {}",
            paths.server_key.display(),
            paths.server_cert.display()
        )));
    }

    // (A certificate already capped at the CA's expiry cannot be extended by reissuing it.)
    if not_after - now < secs(RENEW_BEFORE) && not_after < ca.not_after {
        return Ok(Some(format!(
            "expires within 30 days (not_after {not_after}, unix time)"
        )));
    }
    if not_before > now {
        return Ok(Some(format!(
            "not valid yet (not_before {not_before}, unix time)"
        )));
    }
    let sans = san_names(&x509).map_err(invalid)?;
    let missing: Vec<String> = wanted
        .iter()
        .filter(|n| !n.covered_by(&sans))
        .map(Name::to_string)
        .collect();
    if !missing.is_empty() {
        return Ok(Some(format!("subjectAltName lacks {}", missing.join(", "))));
    }
    Ok(None)
}

/// Reads back the files and builds the [`Pki`] value.
fn assemble(dir: &Path, paths: &Paths, ca: &Ca, next_ca_pin: String) -> Result<Pki, PkiError> {
    let server_cert_pem = read_to_string(&paths.server_cert)?;
    let server_key_pem = read_to_string(&paths.server_key)?;
    let invalid = |reason: String| PkiError::InvalidCertificate {
        path: paths.server_cert.clone(),
        reason,
    };
    let der = first_cert(&server_cert_pem).map_err(invalid)?;
    let (_, x509) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| invalid(format!("not a parsable X.509 certificate: {e}")))?;
    let server_names = san_names(&x509)
        .map_err(invalid)?
        .iter()
        .map(Name::to_string)
        .collect();
    let not_after = x509.validity().not_after.timestamp();
    let server_not_after = UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after).unwrap_or(0));
    let server_pin = pin_of_spki(x509.public_key().raw);
    Ok(Pki {
        dir: dir.to_path_buf(),
        ca_cert_pem: ca.cert_pem.clone(),
        server_cert_pem,
        server_key_pem,
        ca_pin: ca.pin.clone(),
        next_ca_pin,
        server_pin,
        server_names,
        server_not_after,
        ca_generation: rotate::generation(dir)?,
    })
}

/// Pin of the standby CA key, created on first use (also for a data directory that predates it).
fn standby_ca_pin(path: &Path) -> Result<String, PkiError> {
    let key = if exists(path)? {
        warn_if_loose_permissions(path);
        KeyPair::from_pem(&read_to_string(path)?).map_err(|e| PkiError::InvalidKey {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
    } else {
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| PkiError::Generate {
                what: "standby CA key",
                source,
            })?;
        write_file(path, key.serialize_pem().as_bytes(), 0o600)?;
        key
    };
    Ok(pin_of_spki(&key.subject_public_key_info()))
}

fn exists(path: &Path) -> Result<bool, PkiError> {
    fs::exists(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_to_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `path` atomically (temporary file created with `mode`, fsync, rename over `path`).
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PkiError::Io { path, source }
    };
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&tmp)(e)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_err(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Best effort: make the renames durable.
fn sync_dir(dir: &Path) {
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), error = %e, "fsync of the PKI directory failed");
    }
}

fn warn_if_loose_permissions(key: &Path) {
    if let Ok(meta) = fs::metadata(key)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            key = %key.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "private key is readable by group/others; it should be mode 0600"
        );
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The server's provider: TLS13_AES_128_GCM_SHA256 first. The handshake's transcript hash and
/// key schedule then run on SHA-256 (SHA-NI where the CPU has it) instead of SHA-384, whose
/// SHA-512 blocks were about a sixth of the server's CPU per full handshake in the reconnect
/// storm benchmark (BENCHMARKS.md). AES-128-GCM is the suite every TLS 1.3 implementation
/// must support.
fn server_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

fn pin_of_spki(spki_der: &[u8]) -> String {
    let digest = Sha256::digest(spki_der);
    format!(
        "sha256/{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM CERTIFICATE block found".into());
    }
    Ok(certs)
}

fn first_cert(pem: &str) -> Result<CertificateDer<'static>, String> {
    Ok(pem_certs(pem)?.swap_remove(0))
}

fn pem_private_key(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| format!("bad PEM: {e}"))?
        .ok_or_else(|| "no PEM private key block found".into())
}

/// Subject name for the issuer side of rcgen, preserving each attribute's string type so that
/// issued certificates' issuer field is byte-identical to the CA's subject.
fn dn_from_x509(name: &X509Name<'_>) -> Result<DistinguishedName, String> {
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err("subject has an empty or multi-valued RDN (unsupported)".into());
        };
        let oid: Vec<u64> = attr
            .attr_type()
            .iter()
            .ok_or("subject attribute OID out of range")?
            .collect();
        let value = attr.attr_value();
        let text = || std::str::from_utf8(value.data).map_err(|_| "subject attribute is not valid text");
        let bad = |e: rcgen::Error| format!("subject attribute: {e}");
        let value = match value.header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text()?.to_owned()),
            Tag::PrintableString => DnValue::PrintableString(text()?.try_into().map_err(bad)?),
            Tag::Ia5String => DnValue::Ia5String(text()?.try_into().map_err(bad)?),
            Tag::T61String => DnValue::TeletexString(text()?.try_into().map_err(bad)?),
            Tag::BmpString => {
                DnValue::BmpString(rcgen::string::BmpString::from_utf16be(value.data.to_vec()).map_err(bad)?)
            }
            Tag::UniversalString => DnValue::UniversalString(
                rcgen::string::UniversalString::from_utf32be(value.data.to_vec()).map_err(bad)?,
            ),
            other => return Err(format!("unsupported subject attribute string type {other:?}")),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}

fn subject_key_identifier(x509: &X509Certificate<'_>) -> Option<Vec<u8>> {
    x509.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
}

fn san_names(x509: &X509Certificate<'_>) -> Result<Vec<Name>, String> {
    let Some(san) = x509
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(Name::Dns((*dns).to_string())),
            GeneralName::IPAddress(octets) => match octets.len() {
                4 => <[u8; 4]>::try_from(*octets)
                    .ok()
                    .map(|o| Name::Ip(IpAddr::from(o))),
                16 => <[u8; 16]>::try_from(*octets)
                    .ok()
                    .map(|o| Name::Ip(IpAddr::from(o))),
                _ => None,
            },
            _ => None,
        })
        .collect())
}

fn unix_now() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    i64::try_from(secs).unwrap_or(i64::MAX)
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// Sets rcgen's validity from unix seconds. (`time` is not a direct dependency, so its
/// `OffsetDateTime` is reached through x509-parser's `ASN1Time`, the same `time` crate.)
fn set_validity(params: &mut CertificateParams, not_before: i64, not_after: i64) -> Result<(), PkiError> {
    let date = |unix: i64| {
        ASN1Time::from_timestamp(unix)
            .map(|t| t.to_datetime())
            .map_err(|e| PkiError::InvalidInput {
                what: "certificate validity",
                reason: format!("{unix} (unix time): {e}"),
            })
    };
    params.not_before = date(not_before)?;
    params.not_after = date(not_after)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{ClientConnection, HandshakeKind, ProtocolVersion, ServerConnection};
    use x509_parser::oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256, OID_X509_COMMON_NAME,
    };

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn fresh(dir: &Path, list: &[&str]) -> Pki {
        let (pki, status) = load_or_create(dir, &names(list)).expect("load_or_create");
        assert_eq!(status, PkiStatus::CreatedCa);
        pki
    }

    fn der_of(pem: &str) -> CertificateDer<'static> {
        first_cert(pem).expect("PEM certificate")
    }

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    /// Shuttles TLS records between the two in-memory endpoints until both finish the handshake
    /// (or one side reports an error).
    fn handshake(client: &mut ClientConnection, server: &mut ServerConnection) -> Result<(), rustls::Error> {
        for _ in 0..32 {
            let mut progressed = false;
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).expect("client write_tls");
            }
            if !buf.is_empty() {
                progressed = true;
                let mut rd = &buf[..];
                while !rd.is_empty() {
                    server.read_tls(&mut rd).expect("server read_tls");
                    server.process_new_packets()?;
                }
            }
            let mut buf = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut buf).expect("server write_tls");
            }
            if !buf.is_empty() {
                progressed = true;
                let mut rd = &buf[..];
                while !rd.is_empty() {
                    client.read_tls(&mut rd).expect("client read_tls");
                    client.process_new_packets()?;
                }
            }
            if !progressed && !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not complete");
    }

    fn connect(
        client_cfg: &Arc<rustls::ClientConfig>,
        server_cfg: &Arc<rustls::ServerConfig>,
        name: &str,
    ) -> (Result<(), rustls::Error>, ClientConnection, ServerConnection) {
        let server_name = ServerName::try_from(name.to_string()).expect("server name");
        let mut client = ClientConnection::new(client_cfg.clone(), server_name).expect("client");
        let mut server = ServerConnection::new(server_cfg.clone()).expect("server");
        let result = handshake(&mut client, &mut server);
        (result, client, server)
    }

    #[test]
    fn fresh_dir_creates_all_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("nested").join("pki");
        let pki = fresh(&dir, &["push.example.test"]);
        for file in [CA_CERT_FILE, CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE] {
            assert!(dir.join(file).is_file(), "{file} missing");
        }
        assert_eq!(pki.dir, dir);
        assert_eq!(
            fs::read_to_string(dir.join(CA_CERT_FILE)).unwrap(),
            pki.ca_cert_pem
        );
        assert_eq!(
            fs::read_to_string(dir.join(SERVER_CERT_FILE)).unwrap(),
            pki.server_cert_pem
        );
        assert_eq!(
            fs::read_to_string(dir.join(SERVER_KEY_FILE)).unwrap(),
            pki.server_key_pem
        );
        assert!(pki.ca_pin.starts_with("sha256/") && pki.ca_pin.len() == "sha256/".len() + 44);
        assert_ne!(pki.ca_pin, pki.server_pin);
        assert!(pki.server_key_pem.contains("PRIVATE KEY"));
        // No temporary files are left behind.
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn key_files_are_mode_0600() {
        let tmp = tempfile::tempdir().unwrap();
        fresh(tmp.path(), &[]);
        assert_eq!(mode_of(&tmp.path().join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode_of(&tmp.path().join(SERVER_KEY_FILE)), 0o600);
        // Reissued keys too.
        load_or_create(tmp.path(), &names(&["added.example.test"])).unwrap();
        assert_eq!(mode_of(&tmp.path().join(SERVER_KEY_FILE)), 0o600);
    }

    #[test]
    fn reload_is_loaded_with_identical_pins() {
        let tmp = tempfile::tempdir().unwrap();
        let first = fresh(tmp.path(), &["push.example.test", "10.0.0.5"]);
        let (second, status) =
            load_or_create(tmp.path(), &names(&["push.example.test", "10.0.0.5"])).unwrap();
        assert_eq!(status, PkiStatus::Loaded);
        assert_eq!(second.ca_pin, first.ca_pin);
        assert_eq!(second.server_pin, first.server_pin);
        // The standby key is made once and kept: enrolled devices pin it.
        assert_eq!(second.next_ca_pin, first.next_ca_pin);
        assert_ne!(first.next_ca_pin, first.ca_pin);
        assert_eq!(mode_of(&tmp.path().join(CA_NEXT_KEY_FILE)), 0o600);
        assert_eq!(second.server_cert_pem, first.server_cert_pem);
        assert_eq!(second.server_not_after, first.server_not_after);
        // A subset of the names (and differently-cased names) is still covered.
        let (third, status) = load_or_create(tmp.path(), &names(&["PUSH.example.test"])).unwrap();
        assert_eq!(status, PkiStatus::Loaded);
        assert_eq!(third.server_pin, first.server_pin);
    }

    #[test]
    fn server_cert_meets_ios_requirements() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = fresh(tmp.path(), &["push.example.test", "10.0.0.5", "fd00::5"]);
        let der = der_of(&pki.server_cert_pem);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();

        let eku = cert.extended_key_usage().unwrap().expect("EKU present");
        assert!(eku.value.server_auth);
        let ku = cert.key_usage().unwrap().expect("keyUsage present");
        assert!(ku.value.digital_signature());
        assert!(!ku.value.key_cert_sign());
        assert!(!cert.is_ca());

        let spki = cert.public_key();
        assert_eq!(spki.algorithm.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .expect("curve")
            .as_oid()
            .unwrap();
        assert_eq!(curve, OID_EC_P256);
        assert_eq!(cert.signature_algorithm.algorithm, OID_SIG_ECDSA_WITH_SHA256);

        let validity = cert.validity();
        let days = (validity.not_after.timestamp() - validity.not_before.timestamp()) / 86_400;
        assert!(days <= 825, "validity {days} days");
        assert!(days >= 800, "validity {days} days");
        assert!(cert.validity().is_valid());
        let expected_not_after = UNIX_EPOCH + Duration::from_secs(validity.not_after.timestamp() as u64);
        assert_eq!(pki.server_not_after, expected_not_after);

        let san = cert.subject_alternative_name().unwrap().expect("SAN present");
        let mut dns = Vec::new();
        let mut ips = Vec::new();
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(o) => ips.push(o.to_vec()),
                other => panic!("unexpected SAN {other:?}"),
            }
        }
        assert!(dns.contains(&"push.example.test".to_string()));
        assert!(dns.contains(&"localhost".to_string()));
        assert!(ips.contains(&vec![10, 0, 0, 5]));
        assert!(ips.contains(&vec![127, 0, 0, 1]));
        assert!(ips.contains(&Ipv6Addr::LOCALHOST.octets().to_vec()));
        assert!(ips.contains(&"fd00::5".parse::<Ipv6Addr>().unwrap().octets().to_vec()));
        // IP addresses are not smuggled in as DNS names.
        assert!(!dns.iter().any(|d| d.parse::<IpAddr>().is_ok()));
        for expected in [
            "push.example.test",
            "10.0.0.5",
            "fd00::5",
            "localhost",
            "127.0.0.1",
            "::1",
        ] {
            assert!(
                pki.server_names.contains(&expected.to_string()),
                "{expected} not in {:?}",
                pki.server_names
            );
        }

        // The CN is not one of the host names: clients must (and do, see the handshake tests) use SANs.
        let cns: Vec<_> = cert
            .subject()
            .iter_by_oid(&OID_X509_COMMON_NAME)
            .map(|a| a.as_str().unwrap().to_string())
            .collect();
        assert!(
            !cns.iter()
                .any(|cn| cn == "push.example.test" || cn == "localhost"),
            "{cns:?}"
        );

        // Issued by the CA: issuer name is byte-identical to the CA subject, AKI = CA SKI.
        let ca_der = der_of(&pki.ca_cert_pem);
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(cert.issuer().as_raw(), ca.subject().as_raw());
        let aki = cert
            .extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|k| k.0.to_vec())
                }
                _ => None,
            })
            .expect("AKI present");
        assert_eq!(Some(aki), subject_key_identifier(&ca));
    }

    #[test]
    fn ca_cert_is_a_constrained_p256_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = fresh(tmp.path(), &[]);
        let der = der_of(&pki.ca_cert_pem);
        let (_, ca) = x509_parser::parse_x509_certificate(&der).unwrap();
        let bc = ca.basic_constraints().unwrap().expect("basicConstraints");
        assert!(bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, Some(0));
        let ku = ca.key_usage().unwrap().expect("keyUsage");
        assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
        assert!(!ku.value.digital_signature());
        assert_eq!(ca.signature_algorithm.algorithm, OID_SIG_ECDSA_WITH_SHA256);
        let curve = ca
            .public_key()
            .algorithm
            .parameters
            .as_ref()
            .unwrap()
            .as_oid()
            .unwrap();
        assert_eq!(curve, OID_EC_P256);
        let days = (ca.validity().not_after.timestamp() - ca.validity().not_before.timestamp()) / 86_400;
        assert_eq!(days, 3650);
        let cn = ca
            .subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(cn, CA_COMMON_NAME);
        // Two CAs never share a subject name.
        let other = tempfile::tempdir().unwrap();
        let other_der = der_of(&fresh(other.path(), &[]).ca_cert_pem);
        let (_, other_ca) = x509_parser::parse_x509_certificate(&other_der).unwrap();
        assert_ne!(other_ca.subject().as_raw(), ca.subject().as_raw());
        assert!(subject_key_identifier(&ca).is_some());
    }

    #[test]
    fn new_server_name_reissues_server_cert_and_keeps_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let first = fresh(tmp.path(), &["push.example.test"]);
        let ca_key_before = fs::read(tmp.path().join(CA_KEY_FILE)).unwrap();

        let wanted = names(&["push.example.test", "192.168.10.20", "new.example.test"]);
        let (second, status) = load_or_create(tmp.path(), &wanted).unwrap();
        assert_eq!(status, PkiStatus::ReissuedServerCert);
        assert_eq!(second.ca_pin, first.ca_pin);
        assert_eq!(second.ca_cert_pem, first.ca_cert_pem);
        assert_eq!(fs::read(tmp.path().join(CA_KEY_FILE)).unwrap(), ca_key_before);
        assert_ne!(second.server_pin, first.server_pin, "a reissue uses a new key");
        assert_ne!(second.server_key_pem, first.server_key_pem);
        assert!(second.server_names.contains(&"new.example.test".to_string()));
        assert!(second.server_names.contains(&"192.168.10.20".to_string()));

        let (third, status) = load_or_create(tmp.path(), &wanted).unwrap();
        assert_eq!(status, PkiStatus::Loaded);
        assert_eq!(third.server_pin, second.server_pin);
    }

    #[test]
    fn missing_or_mismatched_server_files_reissue() {
        let tmp = tempfile::tempdir().unwrap();
        let first = fresh(tmp.path(), &[]);
        fs::remove_file(tmp.path().join(SERVER_CERT_FILE)).unwrap();
        let (second, status) = load_or_create(tmp.path(), &[]).unwrap();
        assert_eq!(status, PkiStatus::ReissuedServerCert);
        assert_eq!(second.ca_pin, first.ca_pin);
        assert_ne!(second.server_pin, first.server_pin);

        fs::remove_file(tmp.path().join(SERVER_KEY_FILE)).unwrap();
        let (third, status) = load_or_create(tmp.path(), &[]).unwrap();
        assert_eq!(status, PkiStatus::ReissuedServerCert);
        assert_ne!(third.server_pin, second.server_pin);

        // A key from another issuance (e.g. a crash between the two writes) is replaced.
        fs::write(tmp.path().join(SERVER_KEY_FILE), &second.server_key_pem).unwrap();
        let (_, status) = load_or_create(tmp.path(), &[]).unwrap();
        assert_eq!(status, PkiStatus::ReissuedServerCert);
        let (_, status) = load_or_create(tmp.path(), &[]).unwrap();
        assert_eq!(status, PkiStatus::Loaded);
    }

    #[test]
    fn expiring_server_cert_is_reissued() {
        let tmp = tempfile::tempdir().unwrap();
        let first = fresh(tmp.path(), &[]);
        let paths = Paths::new(tmp.path());
        let ca = Ca::load(&paths).unwrap();
        let now = unix_now();
        let wanted = wanted_names(&[]).unwrap();
        let (cert, key) = ca
            .issue_server_cert_with_validity(&wanted, now - 800 * 86_400, now + 10 * 86_400)
            .unwrap();
        write_file(&paths.server_key, key.as_bytes(), 0o600).unwrap();
        write_file(&paths.server_cert, cert.as_bytes(), 0o644).unwrap();

        let (second, status) = load_or_create(tmp.path(), &[]).unwrap();
        assert_eq!(status, PkiStatus::ReissuedServerCert);
        assert_eq!(second.ca_pin, first.ca_pin);
        let remaining = second.server_not_after.duration_since(SystemTime::now()).unwrap();
        assert!(remaining > Duration::from_secs(800 * 86_400), "{remaining:?}");

        // An already expired (but genuine) certificate is reissued too, not reported as foreign.
        let (cert, key) = ca
            .issue_server_cert_with_validity(&wanted, now - 900 * 86_400, now - 60)
            .unwrap();
        write_file(&paths.server_key, key.as_bytes(), 0o600).unwrap();
        write_file(&paths.server_cert, cert.as_bytes(), 0o644).unwrap();
        let (_, status) = load_or_create(tmp.path(), &[]).unwrap();
        assert_eq!(status, PkiStatus::ReissuedServerCert);
    }

    #[test]
    fn ca_key_missing_is_an_error_and_ca_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = fresh(tmp.path(), &[]);
        fs::remove_file(tmp.path().join(CA_KEY_FILE)).unwrap();
        let err = load_or_create(tmp.path(), &[]).unwrap_err();
        assert!(matches!(err, PkiError::CaKeyMissing { .. }), "{err:?}");
        assert!(err.to_string().contains(CA_KEY_FILE), "{err}");
        assert_eq!(
            fs::read_to_string(tmp.path().join(CA_CERT_FILE)).unwrap(),
            pki.ca_cert_pem
        );
        assert!(!tmp.path().join(CA_KEY_FILE).exists());
    }

    #[test]
    fn ca_cert_missing_with_key_present_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        fresh(tmp.path(), &[]);
        let key_before = fs::read(tmp.path().join(CA_KEY_FILE)).unwrap();
        fs::remove_file(tmp.path().join(CA_CERT_FILE)).unwrap();
        let err = load_or_create(tmp.path(), &[]).unwrap_err();
        assert!(matches!(err, PkiError::CaCertMissing { .. }), "{err:?}");
        assert!(err.to_string().contains(CA_CERT_FILE), "{err}");
        assert_eq!(fs::read(tmp.path().join(CA_KEY_FILE)).unwrap(), key_before);
    }

    #[test]
    fn garbage_ca_pem_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        fresh(tmp.path(), &[]);
        fs::write(tmp.path().join(CA_CERT_FILE), "this is not a certificate\n").unwrap();
        let err = load_or_create(tmp.path(), &[]).unwrap_err();
        assert!(matches!(err, PkiError::InvalidCertificate { .. }), "{err:?}");
        assert!(err.to_string().contains(CA_CERT_FILE), "{err}");
        assert_eq!(
            fs::read_to_string(tmp.path().join(CA_CERT_FILE)).unwrap(),
            "this is not a certificate\n"
        );

        // A well-formed PEM block with garbage inside is rejected as well.
        fs::write(
            tmp.path().join(CA_CERT_FILE),
            "-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = load_or_create(tmp.path(), &[]).unwrap_err();
        assert!(matches!(err, PkiError::InvalidCertificate { .. }), "{err:?}");
        assert!(err.to_string().contains(CA_CERT_FILE), "{err}");
    }

    #[test]
    fn garbage_ca_key_and_mismatched_ca_key_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        fresh(tmp.path(), &[]);
        let other = tempfile::tempdir().unwrap();
        fresh(other.path(), &[]);

        fs::copy(other.path().join(CA_KEY_FILE), tmp.path().join(CA_KEY_FILE)).unwrap();
        let err = load_or_create(tmp.path(), &[]).unwrap_err();
        assert!(matches!(err, PkiError::CaKeyMismatch { .. }), "{err:?}");

        fs::write(tmp.path().join(CA_KEY_FILE), "garbage").unwrap();
        let err = load_or_create(tmp.path(), &[]).unwrap_err();
        assert!(matches!(err, PkiError::InvalidKey { .. }), "{err:?}");
        assert!(err.to_string().contains(CA_KEY_FILE), "{err}");
    }

    #[test]
    fn server_cert_from_another_ca_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        fresh(tmp.path(), &[]);
        let other = tempfile::tempdir().unwrap();
        let foreign = fresh(other.path(), &[]);
        fs::write(tmp.path().join(SERVER_CERT_FILE), &foreign.server_cert_pem).unwrap();
        fs::write(tmp.path().join(SERVER_KEY_FILE), &foreign.server_key_pem).unwrap();

        let err = load_or_create(tmp.path(), &[]).unwrap_err();
        assert!(matches!(err, PkiError::ServerCertNotFromCa { .. }), "{err:?}");
        assert!(err.to_string().contains(SERVER_CERT_FILE), "{err}");
        assert_eq!(
            fs::read_to_string(tmp.path().join(SERVER_CERT_FILE)).unwrap(),
            foreign.server_cert_pem
        );

        // Using the CA certificate itself as the server certificate is rejected too.
        let ca_pem = fs::read_to_string(tmp.path().join(CA_CERT_FILE)).unwrap();
        fs::write(tmp.path().join(SERVER_CERT_FILE), ca_pem).unwrap();
        let err = load_or_create(tmp.path(), &[]).unwrap_err();
        assert!(matches!(err, PkiError::ServerCertNotFromCa { .. }), "{err:?}");
    }

    #[test]
    fn invalid_server_names_are_rejected() {
        for bad in [
            "",
            "   ",
            "bad name.example",
            "h\u{f4}pital.example",
            "under_score..example",
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let err = load_or_create(tmp.path(), &names(&[bad])).unwrap_err();
            assert!(
                matches!(err, PkiError::InvalidServerName { .. }),
                "{bad:?}: {err:?}"
            );
            // Nothing was created for an invalid configuration.
            assert!(!tmp.path().join(CA_KEY_FILE).exists());
        }
    }

    #[test]
    fn spki_pin_matches_independent_computation() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = fresh(tmp.path(), &[]);
        for (pem, expected_pin) in [
            (&pki.ca_cert_pem, &pki.ca_pin),
            (&pki.server_cert_pem, &pki.server_pin),
        ] {
            let der = der_of(pem);
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            let digest = Sha256::digest(cert.public_key().raw);
            let independent = format!(
                "sha256/{}",
                base64::engine::general_purpose::STANDARD.encode(digest)
            );
            assert_eq!(spki_pin(&der).unwrap(), independent);
            assert_eq!(expected_pin, &independent);
        }
        assert!(matches!(spki_pin(b"not DER"), Err(PkiError::InvalidInput { .. })));
    }

    #[test]
    fn tls13_handshake_with_alpn_succeeds() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = fresh(tmp.path(), &["push.example.test", "10.0.0.5"]);
        let server_cfg = Arc::new(server_config(&pki).unwrap());
        let client_cfg = Arc::new(client_config(&pki.ca_cert_pem).unwrap());
        for name in ["push.example.test", "10.0.0.5", "localhost", "127.0.0.1", "::1"] {
            let (result, client, server) = connect(&client_cfg, &server_cfg, name);
            result.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(client.alpn_protocol(), Some(push_proto::ALPN));
            assert_eq!(server.alpn_protocol(), Some(push_proto::ALPN));
            assert_eq!(client.protocol_version(), Some(ProtocolVersion::TLSv1_3));
            assert_eq!(server.protocol_version(), Some(ProtocolVersion::TLSv1_3));
            // Leaf then CA, so a CA SPKI pin can be checked from the handshake alone.
            let presented = client.peer_certificates().expect("server sent certificates");
            assert_eq!(presented.len(), 2);
            assert_eq!(spki_pin(presented[1].as_ref()).unwrap(), pki.ca_pin);
        }
        // A name that is not in the SANs fails even though it chains to the right CA.
        let (result, _, _) = connect(&client_cfg, &server_cfg, "other.example.test");
        assert!(
            matches!(result, Err(rustls::Error::InvalidCertificate(_))),
            "{result:?}"
        );
    }

    #[test]
    fn handshake_with_another_ca_fails() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = fresh(tmp.path(), &[]);
        let other = tempfile::tempdir().unwrap();
        let other_pki = fresh(other.path(), &[]);
        let server_cfg = Arc::new(server_config(&pki).unwrap());
        let client_cfg = Arc::new(client_config(&other_pki.ca_cert_pem).unwrap());
        let (result, client, _) = connect(&client_cfg, &server_cfg, "localhost");
        assert!(
            matches!(
                result,
                Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer
                ))
            ),
            "{result:?}"
        );
        assert!(client.is_handshaking());
    }

    #[test]
    fn tls13_session_resumption_works() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = fresh(tmp.path(), &[]);
        let server_cfg = Arc::new(server_config(&pki).unwrap());
        let client_cfg = Arc::new(client_config(&pki.ca_cert_pem).unwrap());

        let (result, mut client, mut server) = connect(&client_cfg, &server_cfg, "localhost");
        result.unwrap();
        assert_eq!(client.handshake_kind(), Some(HandshakeKind::Full));
        // Deliver the NewSessionTicket messages the server queued after the handshake.
        handshake(&mut client, &mut server).unwrap();

        let (result, client, server) = connect(&client_cfg, &server_cfg, "localhost");
        result.unwrap();
        assert_eq!(client.handshake_kind(), Some(HandshakeKind::Resumed));
        assert_eq!(server.handshake_kind(), Some(HandshakeKind::Resumed));
        assert_eq!(client.alpn_protocol(), Some(push_proto::ALPN));
    }

    #[test]
    fn client_config_rejects_garbage_pem() {
        assert!(matches!(
            client_config("nope"),
            Err(PkiError::InvalidInput { .. })
        ));
        let err = client_config("-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n");
        assert!(matches!(err, Err(PkiError::InvalidInput { .. })), "{err:?}");
    }

    #[test]
    fn debug_redacts_server_key() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = fresh(tmp.path(), &[]);
        let printed = format!("{pki:?}");
        assert!(!printed.contains("PRIVATE KEY"), "{printed}");
        let key_body: String = pki.server_key_pem.lines().nth(1).unwrap().to_string();
        assert!(!printed.contains(&key_body));
        assert!(printed.contains("<redacted>"));
        assert!(printed.contains(&pki.ca_pin));
    }
}

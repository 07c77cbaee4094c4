//! Enrollment: everything a container app needs to save its `NEAppPushManager`s, in one answer.
//!
//! The app (or an installer acting for it) presents an API key with the `enroll` scope and a
//! device id; it gets a fresh device credential, the host and port to dial, whom to trust (the
//! CA certificate, the CA key's pin and the standby key's pin, so a CA rotation needs no
//! re-enrollment), and the site's SSIDs split into managers of at most ten, because iOS takes
//! no more per manager. The same answer is served over gRPC (`EnrollDevice`) and as a property
//! list or JSON over HTTPS (`POST /v1/enroll`); the `providerConfiguration` keys are the ones
//! the provider (crate `nepush-provider`) reads.
//!
//! An `enroll` key ships to every phone through MDM, so it is treated as public: it may only
//! enroll devices that are not registered yet (decided atomically with the registration, see
//! `Hub::register_new_device`), only into the groups fixed on the key when it was created (the
//! request may name a subset; none means all of them), with a credential no longer than
//! `limits.max_enroll_credential_days`, and at most `limits.enrollments_per_key_per_minute`
//! times a minute per key. Re-enrolling a known device is an admin's act, and moves the device
//! to a new credential generation. Every enrollment and credential issue is logged (never the
//! credential) and kept in a bounded list the dashboard shows.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    num::NonZeroU32,
    sync::{Arc, Mutex, PoisonError},
};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use push_proto::sender::{EnrollDeviceRequest, Enrollment, ProviderConfiguration, PushManagerConfig};
use serde::Serialize;

use crate::{
    api::keys::{Holder, valid_name},
    auth::{DeviceAuthority, Scope},
    config::Config,
    hub::{Hub, now_ms},
    pki::Pki,
    store::StoreError,
};

/// iOS accepts at most this many SSIDs in one `NEAppPushManager.matchSSIDs`.
pub const SSIDS_PER_MANAGER: usize = 10;
/// Default and longest credential lifetime, in days.
const DEFAULT_VALID_DAYS: u32 = 365;
const MAX_VALID_DAYS: u32 = 3650;
/// Enrollments kept for the dashboard.
pub const RECENT_ENROLLMENTS: usize = 200;

/// Why an enrollment (or a credential) was refused.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// A device id or group name is unusable.
    #[error("{0} must be 1-{1} bytes, not only spaces, without control characters")]
    InvalidName(&'static str, usize),
    /// The caller may only enroll new devices and this one exists.
    #[error(
        "device {0:?} is already enrolled; an admin re-enrolls it (`push-server device enroll`, admin key)"
    )]
    AlreadyEnrolled(String),
    /// The key may not do this (no enroll scope, or a group it was not given).
    #[error("{0}")]
    NotAllowed(String),
    /// The key enrolled too often within the last minute.
    #[error(
        "API key {0:?} made too many enrollments (limits.enrollments_per_key_per_minute); retry in a minute"
    )]
    RateLimited(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Who asks: the authenticated key, where from, and over which API.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    /// The key.
    pub key: &'a Holder,
    /// The peer's address, when known.
    pub source: Option<SocketAddr>,
    /// "grpc" or "https".
    pub via: &'static str,
}

/// One enrollment or credential issue, as the dashboard lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EnrollmentEvent {
    /// Unix ms.
    pub at_ms: i64,
    /// The device.
    pub device_id: String,
    /// "enroll", "re-enroll" (admin), "issue" or "re-issue" (admin, credential only).
    pub kind: &'static str,
    /// Name of the key used.
    pub key_name: String,
    /// Id of the key used (hash prefix).
    pub key_id: String,
    /// Peer address; empty when unknown.
    pub source: String,
    /// "grpc" or "https".
    pub via: &'static str,
    /// Groups the device joined.
    pub groups: Vec<String>,
    /// Credential expiry, Unix ms.
    pub expires_at_ms: i64,
}

/// A credential just issued.
#[derive(Debug, Clone)]
pub struct Credential {
    /// The JWT.
    pub token: String,
    /// Expiry, Unix ms.
    pub expires_at_ms: i64,
}

/// Where phones dial this server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEndpoint {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Nothing named a host and the listener binds every address: `host` is "localhost", which
    /// only works on this machine.
    pub fallback: bool,
}

/// Where phones dial: `site.device_host`, else the first of `server_names`, else the device
/// listener's address ("localhost" when it binds every address); `site.device_port`, else the
/// listener's port. `device_addr` is the listener's bound address.
pub fn device_endpoint(cfg: &Config, device_addr: SocketAddr) -> DeviceEndpoint {
    let site = &cfg.site;
    let (host, fallback) = if !site.device_host.is_empty() {
        (site.device_host.clone(), false)
    } else if let Some(name) = cfg.server_names.first() {
        (name.clone(), false)
    } else if !device_addr.ip().is_unspecified() {
        (device_addr.ip().to_string(), false)
    } else {
        ("localhost".into(), true)
    };
    let port = if site.device_port != 0 {
        site.device_port
    } else {
        device_addr.port()
    };
    DeviceEndpoint { host, port, fallback }
}

/// Where and how phones reach this server: fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct SiteProfile {
    host: String,
    port: u16,
    ca_pem: String,
    pins: Vec<String>,
    ssids: Vec<String>,
    warnings: Vec<String>,
}

impl SiteProfile {
    /// The profile from the configuration, the device listener's bound address and the PKI.
    pub fn new(cfg: &Config, device_addr: SocketAddr, pki: &Pki) -> Self {
        let mut warnings = Vec::new();
        let DeviceEndpoint { host, port, fallback } = device_endpoint(cfg, device_addr);
        if fallback {
            warnings.push(
                "site.device_host is not set and the device listener binds every address: phones \
                 are told \"localhost\", which only works on this machine; set site.device_host"
                    .into(),
            );
        }
        if !pki.server_names.iter().any(|n| n.eq_ignore_ascii_case(&host)) {
            warnings.push(format!(
                "{host:?} is not in the server certificate ({}); add it to server_names",
                pki.server_names.join(", ")
            ));
        }
        let ssids = cfg.site.ssids.clone();
        if ssids.is_empty() {
            warnings
                .push("site.ssids is empty: iOS starts the provider only on listed Wi-Fi networks".into());
        } else if ssids.len() > SSIDS_PER_MANAGER {
            warnings.push(format!(
                "the site has {} SSIDs and iOS accepts at most {SSIDS_PER_MANAGER} per push manager: \
                 save all {} managers",
                ssids.len(),
                ssids.len().div_ceil(SSIDS_PER_MANAGER)
            ));
        }
        Self {
            host,
            port,
            ca_pem: pki.ca_cert_pem.clone(),
            pins: vec![pki.ca_pin.clone(), pki.next_ca_pin.clone()],
            ssids,
            warnings,
        }
    }

    /// What an installer must know about this site's enrollments.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

/// The JSON body of `POST /v1/enroll`, as a container app sends it. Public so the fuzz target
/// parses bodies exactly as the HTTPS handler does.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnrollForm {
    /// The device to enroll.
    pub device_id: String,
    /// Groups to put it in.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Credential lifetime in days (0: the default).
    #[serde(default)]
    pub valid_days: u32,
}

impl From<EnrollForm> for EnrollDeviceRequest {
    fn from(form: EnrollForm) -> Self {
        Self {
            device_id: form.device_id,
            groups: form.groups,
            valid_days: form.valid_days,
        }
    }
}

/// Issues credentials and enrollments.
#[derive(Clone)]
pub struct Enroller {
    hub: Hub,
    auth: Arc<DeviceAuthority>,
    /// Replaced (trust only) by a CA rotation.
    site: Arc<parking_lot::RwLock<Arc<SiteProfile>>>,
    /// Enrollments per `enroll` key (by key id). Only authenticated keys reach it, so its
    /// memory is bounded by the number of keys.
    limiter: Arc<DefaultKeyedRateLimiter<String>>,
    recent: Arc<Mutex<VecDeque<EnrollmentEvent>>>,
}

impl Enroller {
    /// An enroller over the hub's device registry, with the hub's limits.
    pub fn new(hub: Hub, auth: Arc<DeviceAuthority>, site: SiteProfile) -> Self {
        let per_minute =
            NonZeroU32::new(hub.limits().enrollments_per_key_per_minute).unwrap_or(NonZeroU32::MIN);
        Self {
            hub,
            auth,
            site: Arc::new(parking_lot::RwLock::new(Arc::new(site))),
            limiter: Arc::new(RateLimiter::keyed(Quota::per_minute(per_minute))),
            recent: Arc::default(),
        }
    }

    /// Hand out `pki`'s CA and pins (current and standby) from now on (after a CA rotation).
    pub fn set_trust(&self, pki: &Pki) {
        let mut site = self.site.write();
        let mut new = SiteProfile::clone(&site);
        new.ca_pem = pki.ca_cert_pem.clone();
        new.pins = vec![pki.ca_pin.clone(), pki.next_ca_pin.clone()];
        *site = Arc::new(new);
    }

    /// The latest enrollments and credential issues, newest first (at most
    /// [`RECENT_ENROLLMENTS`], since this process started).
    pub fn recent(&self) -> Vec<EnrollmentEvent> {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        recent.iter().rev().cloned().collect()
    }

    /// Register the device (or update its groups, invalidating its earlier credentials) and
    /// issue a credential valid for `valid_days` (0: a year; at most ten years). Admin only.
    pub async fn issue_credential(
        &self,
        caller: Caller<'_>,
        device_id: &str,
        groups: Vec<String>,
        valid_days: u32,
    ) -> Result<Credential, EnrollError> {
        if !caller.key.grants(Scope::Admin) {
            return Err(EnrollError::NotAllowed(format!(
                "API key {:?} lacks the Admin scope",
                caller.key.name()
            )));
        }
        check_names(device_id, &groups, self.hub.limits().max_name_bytes)?;
        let days = match valid_days {
            0 => DEFAULT_VALID_DAYS,
            d => d.min(MAX_VALID_DAYS),
        };
        let (credential, existed) = self.register(device_id, groups.clone(), days, false).await?;
        let kind = if existed { "re-issue" } else { "issue" };
        self.remember(caller, device_id, kind, groups, &credential);
        Ok(credential)
    }

    /// Register and issue; `new_only`: refuse a known device. Also says whether the device
    /// existed before (for the log only: `new_only` decides atomically in the hub).
    async fn register(
        &self,
        device_id: &str,
        groups: Vec<String>,
        days: u32,
        new_only: bool,
    ) -> Result<(Credential, bool), EnrollError> {
        let existed = self.hub.device_view(device_id).await.is_some();
        let generation = if new_only {
            self.hub
                .register_new_device(device_id, groups)
                .await?
                .ok_or_else(|| EnrollError::AlreadyEnrolled(device_id.into()))?
        } else {
            self.hub.register_device(device_id, groups).await?
        };
        let (token, claims) = self.auth.issue(device_id, generation, u64::from(days) * 86_400);
        let credential = Credential {
            token,
            expires_at_ms: claims.exp as i64 * 1000,
        };
        Ok((credential, existed))
    }

    /// Log an enrollment (never the credential) and keep it for the dashboard.
    fn remember(
        &self,
        caller: Caller<'_>,
        device_id: &str,
        kind: &'static str,
        groups: Vec<String>,
        c: &Credential,
    ) {
        let source = caller.source.map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(
            device = %device_id, kind, api_key = %caller.key.name(), key_id = %caller.key.id,
            source = %source, via = caller.via, groups = ?groups, expires_at_ms = c.expires_at_ms,
            "device enrolled"
        );
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() >= RECENT_ENROLLMENTS {
            recent.pop_front();
        }
        recent.push_back(EnrollmentEvent {
            at_ms: now_ms(),
            device_id: device_id.into(),
            kind,
            key_name: caller.key.name().into(),
            key_id: caller.key.id.clone(),
            source,
            via: caller.via,
            groups,
            expires_at_ms: c.expires_at_ms,
        });
    }

    /// Enroll a device: a credential plus everything the container app saves. An admin key
    /// may (re-)enroll any device with any groups; an `enroll` key is held to the rules in the
    /// module docs.
    pub async fn enroll(
        &self,
        req: EnrollDeviceRequest,
        caller: Caller<'_>,
    ) -> Result<Enrollment, EnrollError> {
        let mut warnings = Vec::new();
        let (credential, kind, groups) = if caller.key.grants(Scope::Admin) {
            check_names(&req.device_id, &req.groups, self.hub.limits().max_name_bytes)?;
            let days = match req.valid_days {
                0 => DEFAULT_VALID_DAYS,
                d => d.min(MAX_VALID_DAYS),
            };
            let (c, existed) = self
                .register(&req.device_id, req.groups.clone(), days, false)
                .await?;
            (c, if existed { "re-enroll" } else { "enroll" }, req.groups)
        } else if caller.key.grants(Scope::Enroll) {
            // Every attempt counts, refused ones too: probing for ids costs the same.
            if self.limiter.check_key(&caller.key.id).is_err() {
                tracing::warn!(api_key = %caller.key.name(), key_id = %caller.key.id, "enrollment rate limit reached");
                return Err(EnrollError::RateLimited(caller.key.name().into()));
            }
            check_names(&req.device_id, &req.groups, self.hub.limits().max_name_bytes)?;
            let allowed = &caller.key.record.enroll_groups;
            let groups = if req.groups.is_empty() {
                allowed.clone()
            } else if let Some(g) = req.groups.iter().find(|g| !allowed.contains(g)) {
                return Err(EnrollError::NotAllowed(format!(
                    "group {g:?} is not among the groups of API key {:?} ({}); an admin sets them when creating the key",
                    caller.key.name(),
                    allowed.join(", ")
                )));
            } else {
                req.groups
            };
            let cap = self.hub.limits().max_enroll_credential_days;
            let days = match req.valid_days {
                0 => DEFAULT_VALID_DAYS.min(cap),
                d if d > cap => {
                    warnings.push(format!(
                        "valid_days {d} was shortened to {cap} (limits.max_enroll_credential_days)"
                    ));
                    cap
                }
                d => d,
            };
            let (c, _) = self.register(&req.device_id, groups.clone(), days, true).await?;
            (c, "enroll", groups)
        } else {
            return Err(EnrollError::NotAllowed(format!(
                "API key {:?} lacks the enroll scope",
                caller.key.name()
            )));
        };
        self.remember(caller, &req.device_id, kind, groups, &credential);
        let site = self.site.read().clone();
        let managers: Vec<PushManagerConfig> = site
            .ssids
            .chunks(SSIDS_PER_MANAGER)
            .enumerate()
            .map(|(i, chunk)| PushManagerConfig {
                localized_description: if site.ssids.len() > SSIDS_PER_MANAGER {
                    format!(
                        "Local push ({} of {})",
                        i + 1,
                        site.ssids.len().div_ceil(SSIDS_PER_MANAGER)
                    )
                } else {
                    "Local push".into()
                },
                match_ssids: chunk.to_vec(),
            })
            .collect();
        let mut enrollment = Enrollment {
            device_id: req.device_id.clone(),
            credential_expires_at_ms: credential.expires_at_ms,
            provider_configuration: Some(ProviderConfiguration {
                host: site.host.clone(),
                port: u32::from(site.port),
                server_name: site.host.clone(),
                device_id: req.device_id,
                credential: credential.token,
                ca_certificate: site.ca_pem.clone(),
                pins: site.pins.clone(),
                match_ssids: site.ssids.clone(),
            }),
            managers,
            warnings: site.warnings.iter().cloned().chain(warnings).collect(),
            plist: String::new(),
        };
        enrollment.plist = to_plist_xml(&enrollment);
        Ok(enrollment)
    }
}

/// The enrollment as a plist dictionary: `deviceId`, `credentialExpiresAtMs`,
/// `providerConfiguration` (the manager's dictionary, keys as the provider reads them),
/// `managers` (`localizedDescription`, `matchSSIDs`) and `warnings`.
pub fn to_plist(e: &Enrollment) -> plist::Dictionary {
    use plist::Value;
    use push_proto::provider_keys as keys;
    let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
    let mut provider = plist::Dictionary::new();
    if let Some(p) = &e.provider_configuration {
        provider.insert(keys::HOST.into(), Value::String(p.host.clone()));
        provider.insert(keys::PORT.into(), Value::Integer(u64::from(p.port).into()));
        provider.insert(keys::SERVER_NAME.into(), Value::String(p.server_name.clone()));
        provider.insert(keys::DEVICE_ID.into(), Value::String(p.device_id.clone()));
        provider.insert(keys::CREDENTIAL.into(), Value::String(p.credential.clone()));
        provider.insert(
            keys::CA_CERTIFICATE.into(),
            Value::String(p.ca_certificate.clone()),
        );
        provider.insert(keys::PINS.into(), strings(&p.pins));
        provider.insert(keys::MATCH_SSIDS.into(), strings(&p.match_ssids));
    }
    let managers = e
        .managers
        .iter()
        .map(|m| {
            let mut d = plist::Dictionary::new();
            d.insert(
                "localizedDescription".into(),
                Value::String(m.localized_description.clone()),
            );
            d.insert("matchSSIDs".into(), strings(&m.match_ssids));
            Value::Dictionary(d)
        })
        .collect();
    let mut root = plist::Dictionary::new();
    root.insert("deviceId".into(), Value::String(e.device_id.clone()));
    root.insert(
        "credentialExpiresAtMs".into(),
        Value::Integer(e.credential_expires_at_ms.into()),
    );
    root.insert("providerConfiguration".into(), Value::Dictionary(provider));
    root.insert("managers".into(), Value::Array(managers));
    root.insert("warnings".into(), strings(&e.warnings));
    root
}

/// [`to_plist`] as an XML property list.
pub fn to_plist_xml(e: &Enrollment) -> String {
    let mut out = Vec::new();
    plist::to_writer_xml(&mut out, &plist::Value::Dictionary(to_plist(e)))
        .expect("writing a plist of strings and integers to memory cannot fail");
    String::from_utf8(out).expect("XML plists are UTF-8")
}

fn check_names(device_id: &str, groups: &[String], max_bytes: usize) -> Result<(), EnrollError> {
    check_name("device_id", device_id, max_bytes)?;
    groups.iter().try_for_each(|g| check_name("group", g, max_bytes))
}

/// `value` as a device id or group name ([`valid_name`]), else the error naming `what`.
pub fn check_name(what: &'static str, value: &str, max_bytes: usize) -> Result<(), EnrollError> {
    valid_name(value, max_bytes)
        .then_some(())
        .ok_or(EnrollError::InvalidName(what, max_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enrollment(ssids: &[&str]) -> Enrollment {
        Enrollment {
            device_id: "phone 1".into(),
            credential_expires_at_ms: 1_900_000_000_000,
            provider_configuration: Some(ProviderConfiguration {
                host: "push.ward.local".into(),
                port: 7443,
                server_name: "push.ward.local".into(),
                device_id: "phone 1".into(),
                credential: "jwt".into(),
                ca_certificate: "-----BEGIN CERTIFICATE-----\n...".into(),
                pins: vec!["sha256/a".into(), "sha256/b".into()],
                match_ssids: ssids.iter().map(|s| s.to_string()).collect(),
            }),
            managers: vec![PushManagerConfig {
                localized_description: "Local push".into(),
                match_ssids: ssids.iter().map(|s| s.to_string()).collect(),
            }],
            warnings: vec![],
            plist: String::new(),
        }
    }

    #[test]
    fn plist_round_trips_with_spaces_and_unicode_intact() {
        let ssids = [" Ward 4B ", "Station Ünfall 🚑", "a&b<c>"];
        let xml = to_plist_xml(&enrollment(&ssids));
        let parsed: plist::Dictionary = plist::from_bytes(xml.as_bytes()).unwrap();
        let provider = parsed["providerConfiguration"].as_dictionary().unwrap();
        assert_eq!(provider["port"].as_unsigned_integer(), Some(7443));
        assert_eq!(provider["deviceId"].as_string(), Some("phone 1"));
        let listed: Vec<&str> = provider["matchSSIDs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_string().unwrap())
            .collect();
        assert_eq!(listed, ssids);
        assert_eq!(parsed["managers"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("device_id", "bed 12 / ward 4B", 128).is_ok());
        // Regression (found by the enrollment fuzz target): a device id of spaces was enrolled,
        // and the provider refused the profile it was given.
        for bad in ["", "   ", "\u{3000}", "a\nb", &"x".repeat(129)] {
            assert!(matches!(
                check_name("device_id", bad, 128),
                Err(EnrollError::InvalidName("device_id", 128))
            ));
        }
    }
}

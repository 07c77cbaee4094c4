//! What the host hands the SDK: the provider configuration (server, credential, trust) and the
//! state it persisted (the floor and its epoch), checked once at creation so a bad configuration
//! fails loudly instead of retrying forever.

use std::{net::IpAddr, time::Duration};

use crate::core::{BackoffConfig, LastSeen, Timing};

/// Configuration of one client instance.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Server host name or IP address.
    pub host: String,
    /// Server port (the device listener).
    pub port: u16,
    /// Name to verify in the server certificate; empty means `host`.
    pub server_name: String,
    /// Device id the credential was issued for. The process keeps at most one live session per
    /// device id: a newer instance with the same id replaces an older one.
    pub device_id: String,
    /// Device credential (JWT).
    pub credential: String,
    /// Whom to trust.
    pub trust: Trust,
    /// The floor and its epoch, as persisted by the host together (both 0 the first time; an
    /// app group holding a floor without an epoch, from an older SDK, means epoch 0).
    pub last_seen: LastSeen,
    /// SSID at start, if known.
    pub ssid: String,
    /// PushKit (VoIP) token, hex, as persisted by the host; `None` if not registered.
    pub voip_token: Option<String>,
    /// Protocol timeouts.
    pub timing: Timing,
    /// Reconnection backoff.
    pub backoff: BackoffConfig,
    /// Seed of the backoff jitter; `None` draws one at random (tests fix it).
    pub jitter_seed: Option<u64>,
    /// Deadline for writing one burst of frames.
    pub write_timeout: Duration,
    /// TCP keepalive idle time (then probes every third of it, three times).
    pub tcp_keepalive: Duration,
    /// Local address to bind the connection to; `None` (the default) lets the OS choose. A phone
    /// leaves it unset; a load generator spreads many clients over 127.0.0.0/8 with it.
    pub local_addr: Option<IpAddr>,
}

impl ClientConfig {
    /// A configuration with default timing.
    pub fn new(
        host: impl Into<String>,
        port: u16,
        device_id: impl Into<String>,
        credential: impl Into<String>,
        trust: Trust,
    ) -> Self {
        Self {
            host: host.into(),
            port,
            server_name: String::new(),
            device_id: device_id.into(),
            credential: credential.into(),
            trust,
            last_seen: LastSeen::default(),
            ssid: String::new(),
            voip_token: None,
            timing: Timing::default(),
            backoff: BackoffConfig::default(),
            jitter_seed: None,
            write_timeout: Duration::from_secs(10),
            tcp_keepalive: Duration::from_secs(30),
            local_addr: None,
        }
    }

    /// The name the certificate must carry.
    pub fn server_name(&self) -> &str {
        if self.server_name.is_empty() {
            &self.host
        } else {
            &self.server_name
        }
    }

    /// Reject what can never work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let missing = |what| Err(ConfigError::Missing(what));
        if self.host.trim().is_empty() {
            return missing("host");
        }
        if self.port == 0 {
            return missing("port");
        }
        if self.device_id.trim().is_empty() {
            return missing("device_id");
        }
        if self.credential.trim().is_empty() {
            return missing("credential");
        }
        if self.trust.ca_pem.is_none() && self.trust.pins.is_empty() {
            return missing("trust (a CA certificate or an SPKI pin)");
        }
        if self.backoff.base.is_zero() || self.backoff.cap < self.backoff.base {
            return Err(ConfigError::Invalid(
                "backoff: base must be positive and at most cap".into(),
            ));
        }
        if self.timing.connect_timeout.is_zero() || self.write_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "connect and write timeouts must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// Whom the SDK trusts. Pins are `sha256/<base64 of the SHA-256 of the SubjectPublicKeyInfo>`;
/// several may be listed so a key can be rotated (publish the next pin before switching).
///
/// - CA only: the server's certificate must chain to one of the CAs and name the server.
/// - Pins only: the server's own key must be pinned, or its certificate must chain (and name
///   the server) to a CA certificate it presents whose key is pinned.
/// - Both: as pins only, and the listed CAs count as presented.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// PEM of one or more CA certificates.
    pub ca_pem: Option<String>,
    /// SPKI pins.
    pub pins: Vec<String>,
}

impl Trust {
    /// Trust the CA(s) in `pem`.
    pub fn ca(pem: impl Into<String>) -> Self {
        Self {
            ca_pem: Some(pem.into()),
            pins: Vec::new(),
        }
    }

    /// Trust keys by pin.
    pub fn pins(pins: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            ca_pem: None,
            pins: pins.into_iter().map(Into::into).collect(),
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required value is missing.
    #[error("missing {0}")]
    Missing(&'static str),
    /// A value is malformed or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The trust settings are unusable (bad PEM, bad pin, bad server name).
    #[error("invalid trust settings: {0}")]
    Trust(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> ClientConfig {
        ClientConfig::new("push.local", 7443, "dev-1", "jwt", Trust::pins(["sha256/x"]))
    }

    #[test]
    fn validation_names_what_is_missing() {
        valid().validate().unwrap();
        let mut c = valid();
        c.credential.clear();
        assert_eq!(c.validate(), Err(ConfigError::Missing("credential")));
        let mut c = valid();
        c.trust = Trust::default();
        assert!(matches!(c.validate(), Err(ConfigError::Missing(w)) if w.contains("trust")));
        let mut c = valid();
        c.backoff.base = Duration::ZERO;
        assert!(matches!(c.validate(), Err(ConfigError::Invalid(_))));
    }

    #[test]
    fn server_name_defaults_to_host() {
        let mut c = valid();
        assert_eq!(c.server_name(), "push.local");
        c.server_name = "other".into();
        assert_eq!(c.server_name(), "other");
    }
}

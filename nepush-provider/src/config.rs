//! The provider configuration: `NEAppPushManager.providerConfiguration`, a property-list
//! dictionary the container app saved from the push-server's enrollment answer.
//!
//! The keys are listed once, in `push_proto::provider_keys`, which the enrollment endpoint
//! (`push-server/src/api/enrollment.rs`) writes with. Parsing never panics: every problem is a [`ConfigurationError`] that
//! names the key. Unknown keys are ignored, so a newer server can add some without breaking
//! deployed extensions.

use std::io::Cursor;

use plist::{Dictionary, Value};

use push_proto::provider_keys as keys;

/// What the provider reads from `providerConfiguration`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderConfiguration {
    /// Server host name or IP address.
    pub host: String,
    /// Server port (the device listener).
    pub port: u16,
    /// Name to verify in the server certificate (`host` when the key is absent or empty).
    pub server_name: String,
    /// Device id the credential was issued for.
    pub device_id: String,
    /// Device credential (JWT).
    pub credential: String,
    /// PEM of the CA certificate(s) to trust, if given (an empty string counts as absent).
    pub ca_certificate: Option<String>,
    /// SPKI pins, current and next (for rotation).
    pub pins: Vec<String>,
    /// The site's SSIDs, exactly as written (spaces and unicode intact).
    pub match_ssids: Vec<String>,
}

/// Why a `providerConfiguration` cannot be used. The message names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigurationError {
    /// A required key is absent.
    #[error("missing key \"{0}\"")]
    Missing(&'static str),
    /// A key has the wrong type or an unusable value.
    #[error("\"{key}\" must be {expected}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// What it must be.
        expected: &'static str,
    },
    /// Neither `caCertificate` nor `pins` is given: the server could not be verified.
    #[error("missing key \"caCertificate\" or \"pins\": at least one is required to verify the server")]
    NoTrust,
    /// The bytes are not a property list whose root is a dictionary.
    #[error("providerConfiguration is not a property-list dictionary: {0}")]
    NotADictionary(String),
}

impl ProviderConfiguration {
    /// Parse the dictionary iOS hands the provider.
    pub fn from_plist(dict: &Dictionary) -> Result<Self, ConfigurationError> {
        let host = required_string(dict, keys::HOST)?;
        let port = match dict.get(keys::PORT) {
            None => return Err(ConfigurationError::Missing(keys::PORT)),
            Some(v) => v
                .as_signed_integer()
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0)
                .ok_or(ConfigurationError::Invalid {
                    key: keys::PORT,
                    expected: "an integer 1-65535",
                })?,
        };
        let server_name = optional_string(dict, keys::SERVER_NAME)?
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| host.clone());
        let device_id = required_string(dict, keys::DEVICE_ID)?;
        let credential = required_string(dict, keys::CREDENTIAL)?;
        let ca_certificate = optional_string(dict, keys::CA_CERTIFICATE)?.filter(|s| !s.trim().is_empty());
        let pins = string_array(dict, keys::PINS)?;
        if let Some(bad) = pins.iter().find(|p| !p.starts_with("sha256/")) {
            tracing::warn!(pin = %bad, "pin without the sha256/ prefix");
            return Err(ConfigurationError::Invalid {
                key: keys::PINS,
                expected: "an array of \"sha256/<base64>\" strings",
            });
        }
        if ca_certificate.is_none() && pins.is_empty() {
            return Err(ConfigurationError::NoTrust);
        }
        let match_ssids = string_array(dict, keys::MATCH_SSIDS)?;
        Ok(Self {
            host,
            port,
            server_name,
            device_id,
            credential,
            ca_certificate,
            pins,
            match_ssids,
        })
    }

    /// Parse a serialized property list (XML or binary), as Swift produces it with
    /// `PropertyListSerialization.data(fromPropertyList:format:options:)`.
    pub fn from_plist_bytes(bytes: &[u8]) -> Result<Self, ConfigurationError> {
        let value = Value::from_reader(Cursor::new(bytes))
            .map_err(|e| ConfigurationError::NotADictionary(e.to_string()))?;
        let dict = value
            .into_dictionary()
            .ok_or_else(|| ConfigurationError::NotADictionary("the root is not a dictionary".into()))?;
        Self::from_plist(&dict)
    }

    /// The dictionary form, with the same keys ([`Self::from_plist`] reads it back unchanged).
    pub fn to_plist(&self) -> Dictionary {
        let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
        let mut d = Dictionary::new();
        d.insert(keys::HOST.into(), Value::String(self.host.clone()));
        d.insert(keys::PORT.into(), Value::Integer(self.port.into()));
        d.insert(keys::SERVER_NAME.into(), Value::String(self.server_name.clone()));
        d.insert(keys::DEVICE_ID.into(), Value::String(self.device_id.clone()));
        d.insert(keys::CREDENTIAL.into(), Value::String(self.credential.clone()));
        if let Some(ca) = &self.ca_certificate {
            d.insert(keys::CA_CERTIFICATE.into(), Value::String(ca.clone()));
        }
        d.insert(keys::PINS.into(), strings(&self.pins));
        d.insert(keys::MATCH_SSIDS.into(), strings(&self.match_ssids));
        d
    }

    /// The SDK configuration for one instance that resumes from `last_seen` (the floor and
    /// epoch the host persisted in the app group; zeros the first time).
    pub fn client_config(&self, last_seen: mobile_sdk::core::LastSeen) -> mobile_sdk::ClientConfig {
        let trust = mobile_sdk::Trust {
            ca_pem: self.ca_certificate.clone(),
            pins: self.pins.clone(),
        };
        let mut c = mobile_sdk::ClientConfig::new(
            self.host.clone(),
            self.port,
            self.device_id.clone(),
            self.credential.clone(),
            trust,
        );
        c.server_name = self.server_name.clone();
        c.last_seen = last_seen;
        c
    }
}

fn required_string(dict: &Dictionary, key: &'static str) -> Result<String, ConfigurationError> {
    let s = optional_string(dict, key)?.ok_or(ConfigurationError::Missing(key))?;
    if s.trim().is_empty() {
        return Err(ConfigurationError::Invalid {
            key,
            expected: "a non-empty string",
        });
    }
    Ok(s)
}

fn optional_string(dict: &Dictionary, key: &'static str) -> Result<Option<String>, ConfigurationError> {
    match dict.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ConfigurationError::Invalid {
            key,
            expected: "a string",
        }),
    }
}

fn string_array(dict: &Dictionary, key: &'static str) -> Result<Vec<String>, ConfigurationError> {
    let invalid = ConfigurationError::Invalid {
        key,
        expected: "an array of strings",
    };
    match dict.get(key) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_string().map(str::to_owned).ok_or(invalid.clone()))
            .collect(),
        Some(_) => Err(invalid),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SSIDS: [&str; 3] = [" Ward 4B ", "Station Ünfall 🚑", "ICU  2"];

    fn sample() -> Dictionary {
        let mut d = Dictionary::new();
        d.insert("host".into(), Value::String("push.ward.local".into()));
        d.insert("port".into(), Value::Integer(7443u64.into()));
        d.insert("deviceId".into(), Value::String("phone-17".into()));
        d.insert("credential".into(), Value::String("eyJ.jwt.sig".into()));
        d.insert(
            "pins".into(),
            Value::Array(vec![
                Value::String("sha256/AAAA".into()),
                Value::String("sha256/BBBB".into()),
            ]),
        );
        d.insert(
            "matchSSIDs".into(),
            Value::Array(SSIDS.iter().map(|s| Value::String((*s).into())).collect()),
        );
        d
    }

    fn err(d: &Dictionary) -> String {
        ProviderConfiguration::from_plist(d).unwrap_err().to_string()
    }

    #[test]
    fn parses_the_enrollment_keys_and_keeps_ssids_intact() {
        let c = ProviderConfiguration::from_plist(&sample()).unwrap();
        assert_eq!(c.host, "push.ward.local");
        assert_eq!(c.port, 7443);
        assert_eq!(c.server_name, "push.ward.local", "defaults to host");
        assert_eq!(c.device_id, "phone-17");
        assert_eq!(c.ca_certificate, None);
        assert_eq!(c.pins, ["sha256/AAAA", "sha256/BBBB"]);
        assert_eq!(c.match_ssids, SSIDS, "spaces and unicode kept byte for byte");
        let last_seen = mobile_sdk::core::LastSeen { epoch: 7, seq: 41 };
        let sdk = c.client_config(last_seen);
        assert_eq!((sdk.last_seen, sdk.server_name()), (last_seen, "push.ward.local"));
        sdk.validate().unwrap();
    }

    #[test]
    fn round_trips_through_to_plist_and_xml() {
        let mut d = sample();
        d.insert("serverName".into(), Value::String("push".into()));
        d.insert(
            "caCertificate".into(),
            Value::String("-----BEGIN CERTIFICATE-----".into()),
        );
        let c = ProviderConfiguration::from_plist(&d).unwrap();
        assert_eq!(ProviderConfiguration::from_plist(&c.to_plist()).unwrap(), c);
        let mut xml = Vec::new();
        plist::to_writer_xml(&mut xml, &c.to_plist()).unwrap();
        assert_eq!(ProviderConfiguration::from_plist_bytes(&xml).unwrap(), c);
        let mut binary = Vec::new();
        plist::to_writer_binary(&mut binary, &c.to_plist()).unwrap();
        let back = ProviderConfiguration::from_plist_bytes(&binary).unwrap();
        assert_eq!(back.match_ssids, SSIDS);
    }

    #[test]
    fn errors_name_the_key_and_never_panic() {
        let mut d = sample();
        d.remove("port");
        assert_eq!(err(&d), r#"missing key "port""#);
        for bad in [
            Value::Integer(0u64.into()),
            Value::Integer(65536u64.into()),
            Value::Integer((-1i64).into()),
            Value::String("7443".into()),
            Value::Real(7443.0),
        ] {
            d.insert("port".into(), bad);
            assert_eq!(err(&d), r#""port" must be an integer 1-65535"#);
        }
        let mut d = sample();
        d.insert("host".into(), Value::Boolean(true));
        assert_eq!(err(&d), r#""host" must be a string"#);
        d.insert("host".into(), Value::String("  ".into()));
        assert_eq!(err(&d), r#""host" must be a non-empty string"#);
        let mut d = sample();
        d.remove("credential");
        assert_eq!(err(&d), r#"missing key "credential""#);
        let mut d = sample();
        d.insert(
            "matchSSIDs".into(),
            Value::Array(vec![Value::Integer(1u64.into())]),
        );
        assert_eq!(err(&d), r#""matchSSIDs" must be an array of strings"#);
        let mut d = sample();
        d.insert("pins".into(), Value::Array(vec![Value::String("md5/x".into())]));
        assert!(err(&d).contains(r#""pins""#));
        d.remove("pins");
        assert!(err(&d).contains("caCertificate"));
        // An empty caCertificate (as enrollment writes when it has none) counts as absent.
        d.insert("caCertificate".into(), Value::String(String::new()));
        assert!(matches!(
            ProviderConfiguration::from_plist(&d),
            Err(ConfigurationError::NoTrust)
        ));
        assert!(matches!(
            ProviderConfiguration::from_plist_bytes(b"not a plist"),
            Err(ConfigurationError::NotADictionary(_))
        ));
        let mut xml = Vec::new();
        plist::to_writer_xml(&mut xml, &Value::Array(vec![])).unwrap();
        assert!(matches!(
            ProviderConfiguration::from_plist_bytes(&xml),
            Err(ConfigurationError::NotADictionary(_))
        ));
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let mut d = sample();
        d.insert("futureKey".into(), Value::Boolean(true));
        ProviderConfiguration::from_plist(&d).unwrap();
    }
}

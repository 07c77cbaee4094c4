//! Device credentials (JWTs signed with the server's key) and sender API keys.
//!
//! Device credentials are HS256 JWTs: only this server (or, later, its cluster peers that share
//! the key) ever verifies them, and HMAC verification is cheap enough for reconnect storms.
//! Revocation is by generation: a credential carries the device's credential generation at issue
//! time, and revoking bumps the generation, so every older credential stops working at once.

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

const AUDIENCE: &str = "lpush-device";
/// File holding the device-credential signing key (mode 0600) in the data directory.
pub const KEY_FILE: &str = "device-jwt.key";

/// Claims of a device credential.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceClaims {
    /// Device id.
    pub sub: String,
    /// Credential generation (see module docs).
    pub generation: u64,
    /// Issued at, Unix seconds.
    pub iat: u64,
    /// Expires at, Unix seconds.
    pub exp: u64,
    /// Audience, always "lpush-device".
    pub aud: String,
}

/// Why a credential was refused. The text goes to logs and to the device's goodbye, so it never
/// contains the credential itself.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    /// Past its expiry.
    #[error("credential expired")]
    Expired,
    /// Bad signature, wrong audience, malformed token.
    #[error("credential invalid: {0}")]
    Invalid(String),
    /// Valid signature, but the device was revoked since.
    #[error("credential revoked")]
    Revoked,
    /// Valid signature for a device this server does not know.
    #[error("unknown device")]
    UnknownDevice,
}

/// Issues and verifies device credentials.
pub struct DeviceAuthority {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl DeviceAuthority {
    /// Load the signing key from `dir`, creating a random one (mode 0600) on first start.
    pub fn load_or_create(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join(KEY_FILE);
        let secret = match std::fs::read_to_string(&path) {
            Ok(text) => URL_SAFE_NO_PAD.decode(text.trim()).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut secret = vec![0u8; 32];
                rand::rng().fill_bytes(&mut secret);
                write_secret(&path, &URL_SAFE_NO_PAD.encode(&secret))?;
                secret
            }
            Err(e) => return Err(e),
        };
        Ok(Self::from_secret(&secret))
    }

    /// An authority over a given HMAC secret.
    pub fn from_secret(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "sub", "aud"]);
        validation.leeway = 0;
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Issue a credential for `device_id` at `generation`, valid for `valid_secs` from now.
    pub fn issue(&self, device_id: &str, generation: u64, valid_secs: u64) -> (String, DeviceClaims) {
        self.issue_until(device_id, generation, unix_secs() + valid_secs)
    }

    /// Issue a credential that expires at `exp` (Unix seconds; may be in the past, for tests).
    pub fn issue_until(&self, device_id: &str, generation: u64, exp: u64) -> (String, DeviceClaims) {
        let iat = unix_secs().min(exp);
        let claims = DeviceClaims {
            sub: device_id.into(),
            generation,
            iat,
            exp,
            aud: AUDIENCE.into(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing with an in-memory key cannot fail");
        (token, claims)
    }

    /// Check signature, audience and expiry. Revocation is checked by the hub, which knows the
    /// device's current generation.
    pub fn verify(&self, token: &str) -> Result<DeviceClaims, CredentialError> {
        jsonwebtoken::decode::<DeviceClaims>(token, &self.decoding, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => CredentialError::Expired,
                kind => CredentialError::Invalid(format!("{kind:?}")),
            })
    }
}

/// A sender API scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Send messages.
    Send,
    /// Place and cancel calls.
    Call,
    /// Read statuses, devices and presence.
    Read,
    /// Enroll new devices (`EnrollDevice`, `POST /v1/enroll`): the key a container app carries.
    Enroll,
    /// Everything, including PushAdmin.
    Admin,
}

impl Scope {
    /// Parse a scope name.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "send" => Self::Send,
            "call" => Self::Call,
            "read" => Self::Read,
            "enroll" => Self::Enroll,
            "admin" => Self::Admin,
            _ => return None,
        })
    }

    /// Whether a key with `granted` scopes may act with this one.
    pub fn granted_by(self, granted: &[String]) -> bool {
        granted
            .iter()
            .any(|g| g == "admin" || Scope::parse(g) == Some(self))
    }
}

/// A new random API key ("lpk_" + 256 bits, base64url).
pub fn new_api_key() -> String {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    format!("lpk_{}", URL_SAFE_NO_PAD.encode(raw))
}

/// The form an API key is stored and looked up by: hex SHA-256.
pub fn api_key_hash(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Write a secret file readable only by its owner.
pub fn write_secret(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

/// Seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_then_verify() {
        let auth = DeviceAuthority::from_secret(b"0123456789abcdef0123456789abcdef");
        let (token, claims) = auth.issue("phone-1", 3, 3600);
        assert_eq!(auth.verify(&token), Ok(claims));
    }

    #[test]
    fn other_key_and_garbage_are_invalid() {
        let a = DeviceAuthority::from_secret(b"0123456789abcdef0123456789abcdef");
        let b = DeviceAuthority::from_secret(b"fedcba9876543210fedcba9876543210");
        let (token, _) = a.issue("phone-1", 0, 3600);
        assert!(matches!(b.verify(&token), Err(CredentialError::Invalid(_))));
        assert!(matches!(a.verify("not.a.jwt"), Err(CredentialError::Invalid(_))));
    }

    #[test]
    fn expired_is_reported_as_expired() {
        let auth = DeviceAuthority::from_secret(b"0123456789abcdef0123456789abcdef");
        let (token, _) = auth.issue_until("p", 0, unix_secs() - 10);
        assert_eq!(auth.verify(&token), Err(CredentialError::Expired));
    }

    #[test]
    fn key_is_created_once_with_owner_only_mode() {
        let dir = tempfile::tempdir().unwrap();
        let a = DeviceAuthority::load_or_create(dir.path()).unwrap();
        let b = DeviceAuthority::load_or_create(dir.path()).unwrap();
        let (token, _) = a.issue("phone-1", 0, 60);
        assert!(
            b.verify(&token).is_ok(),
            "reloaded key must verify earlier credentials"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn scopes() {
        let granted = vec!["send".to_string(), "read".to_string()];
        assert!(Scope::Send.granted_by(&granted));
        assert!(!Scope::Call.granted_by(&granted));
        assert!(Scope::Call.granted_by(&["admin".to_string()]));
        assert_ne!(api_key_hash("a"), api_key_hash("b"));
        assert!(new_api_key().starts_with("lpk_"));
    }
}

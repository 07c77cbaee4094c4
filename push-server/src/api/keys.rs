//! Sender API keys: who holds which scopes, until when, and revocation that takes effect at once.
//!
//! A key is `lpk_` + 256 random bits; the store keeps only its SHA-256 (hex). Listings name a
//! key by its *id*, the first [`ID_LEN`] hex digits of that hash: enough to pick a key to revoke,
//! useless to an attacker (it is a prefix of a hash of 256 random bits).
//!
//! Every API entry point (gRPC, dashboard, `POST /v1/enroll`) authenticates through [`Keys`]:
//! - [`Keys::caller`] reads the key from a request's `authorization: Bearer <key>` value and
//!   [`Holder::require`] checks a scope: the faces only map the refusal to their own answers.
//! - Verified keys are cached for `limits.key_cache_ttl_ms` so a busy sender does not cost a store read per
//!   request; the TTL bounds how long a change made elsewhere (another node, later) takes to be
//!   seen. A revocation made here drops the cache entry at once, and a lookup that raced with it
//!   does not re-fill the cache (see `revocations`).
//! - A [`Holder`] (an authenticated key) can wait for its own end ([`Holder::ended`]): long
//!   streams and dashboard event streams select on it, so revoking a key ends them at once and
//!   an expiring key ends them at its expiry.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{Scope, api_key_hash, new_api_key},
    config::Limits,
    hub::{fmt_utc, now_ms},
    store::{ApiKeyRecord, Op, Store, StoreError, commit},
};

/// Hex digits of the key's hash shown as its id.
pub const ID_LEN: usize = 12;
/// Longest key lifetime that can be asked for, in days.
pub const MAX_KEY_DAYS: u32 = 3650;

/// Why a key was refused or a key operation failed. The text goes to callers and logs; it never
/// contains a key or a full hash.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The request names no key.
    #[error("missing `authorization: Bearer <api key>`")]
    Missing,
    /// The key (by name) lacks the scope the request needs.
    #[error("API key {0:?} lacks the {1:?} scope")]
    Forbidden(String, Scope),
    /// No key with that secret (or id).
    #[error("unknown API key")]
    Unknown,
    /// The key was revoked.
    #[error("API key {name:?} was revoked at {}", fmt_utc(*.at_ms))]
    Revoked {
        /// The key's name.
        name: String,
        /// When, Unix ms.
        at_ms: i64,
    },
    /// The key is past its expiry.
    #[error("API key {name:?} expired at {}; ask an admin for a new key", fmt_utc(*.at_ms))]
    Expired {
        /// The key's name.
        name: String,
        /// When, Unix ms.
        at_ms: i64,
    },
    /// A create or revoke request is unusable.
    #[error("{0}")]
    Invalid(String),
    /// The request would leave the server without a usable admin key.
    #[error("{0}")]
    Refused(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The state of a key, as listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Usable.
    Active,
    /// Past its expiry.
    Expired,
    /// Revoked.
    Revoked,
}

/// A key as listed: never the key, never its full hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeySummary {
    /// First [`ID_LEN`] hex digits of the key's hash.
    pub id: String,
    /// Holder's name.
    pub name: String,
    /// Granted scopes.
    pub scopes: Vec<String>,
    /// Groups an enroll key enrolls into.
    pub enroll_groups: Vec<String>,
    /// Unix ms.
    pub created_at_ms: i64,
    /// Unix ms; 0: never.
    pub expires_at_ms: i64,
    /// Unix ms; 0: not revoked.
    pub revoked_at_ms: i64,
    /// Derived from the above at listing time.
    pub state: KeyState,
}

/// What a new key may do.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    /// Holder's name (1-128 bytes, no control characters).
    pub name: String,
    /// Scope names: send, call, read, enroll, admin.
    pub scopes: Vec<String>,
    /// Lifetime in days; 0: never expires.
    pub valid_days: u32,
    /// For an `enroll` key: the groups it enrolls devices into.
    pub enroll_groups: Vec<String>,
}

/// An authenticated key.
#[derive(Debug, Clone)]
pub struct Holder {
    /// The key's id (hash prefix), for logs.
    pub id: String,
    /// The key's record.
    pub record: ApiKeyRecord,
    hash: String,
    revoked: CancellationToken,
}

impl Holder {
    /// The key's name, for logs and answers.
    pub fn name(&self) -> &str {
        &self.record.name
    }

    /// Whether the key grants `scope`.
    pub fn grants(&self, scope: Scope) -> bool {
        scope.granted_by(&self.record.scopes)
    }

    /// The holder, if its key grants `scope`.
    pub fn require(self, scope: Scope) -> Result<Self, KeyError> {
        match self.grants(scope) {
            true => Ok(self),
            false => Err(KeyError::Forbidden(self.record.name, scope)),
        }
    }

    /// The key's hash, for sessions that re-check the key on every request.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// Resolves when the key is revoked on this node or reaches its expiry, with the reason.
    /// Streams opened with the key select on it and end with that error.
    pub async fn ended(&self) -> KeyError {
        let expiry = async {
            match self.record.expires_at_ms {
                0 => std::future::pending::<()>().await,
                at => {
                    let left = u64::try_from(at - now_ms()).unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(left)).await
                }
            }
        };
        tokio::select! {
            _ = self.revoked.cancelled() => KeyError::Revoked { name: self.record.name.clone(), at_ms: now_ms() },
            _ = expiry => KeyError::Expired { name: self.record.name.clone(), at_ms: self.record.expires_at_ms },
        }
    }
}

/// The API keys: authentication, creation, listing and revocation.
pub struct Keys {
    store: Arc<dyn Store>,
    /// Verified records by hash, with when they were read.
    cache: Mutex<HashMap<String, (ApiKeyRecord, Instant)>>,
    /// Cancelled when the key (by hash) is revoked here; made for keys that authenticated, so
    /// bounded by the number of stored keys.
    tokens: Mutex<HashMap<String, CancellationToken>>,
    /// Bumped by every revocation: a lookup that read the store before a revocation committed
    /// must not put its (stale) record into the cache after the revocation cleared it.
    revocations: AtomicU64,
    /// `limits.max_name_bytes`, `key_cache_entries` (the cache is cleared when full: keys are
    /// few, this only bounds junk) and `key_cache_ttl_ms`.
    name_max: usize,
    cache_max: usize,
    cache_ttl: Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not turn every later authentication into a failure: the data here
    // (a cache and tokens) is valid whatever happened mid-update.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Keys {
    /// Keys stored in `store`, names and the cache bounded by `limits`.
    pub fn new(store: Arc<dyn Store>, limits: &Limits) -> Self {
        Self {
            store,
            cache: Mutex::default(),
            tokens: Mutex::default(),
            revocations: AtomicU64::new(0),
            name_max: limits.max_name_bytes,
            cache_max: limits.key_cache_entries,
            cache_ttl: Duration::from_millis(limits.key_cache_ttl_ms),
        }
    }

    /// The caller of a request whose `authorization` value is `Bearer <key>` (the scheme
    /// case-insensitive, RFC 9110 section 11.1): the key, authenticated.
    pub fn caller(&self, authorization: Option<&str>) -> Result<Holder, KeyError> {
        self.authenticate(authorization.and_then(bearer).ok_or(KeyError::Missing)?)
    }

    /// Authenticate the secret `key`.
    pub fn authenticate(&self, key: &str) -> Result<Holder, KeyError> {
        self.by_hash(&api_key_hash(key.trim()))
    }

    /// Authenticate by the key's hash (dashboard sessions remember the hash, not the key).
    pub fn by_hash(&self, hash: &str) -> Result<Holder, KeyError> {
        let record = self.record(hash)?;
        let now = now_ms();
        if record.revoked_at_ms != 0 {
            return Err(KeyError::Revoked {
                name: record.name,
                at_ms: record.revoked_at_ms,
            });
        }
        if record.expires_at_ms != 0 && now >= record.expires_at_ms {
            return Err(KeyError::Expired {
                name: record.name,
                at_ms: record.expires_at_ms,
            });
        }
        let revoked = lock(&self.tokens).entry(hash.to_owned()).or_default().clone();
        Ok(Holder {
            id: key_id(hash),
            record,
            hash: hash.to_owned(),
            revoked,
        })
    }

    /// The record under `hash`, from the cache or the store.
    fn record(&self, hash: &str) -> Result<ApiKeyRecord, KeyError> {
        if let Some((record, at)) = lock(&self.cache).get(hash)
            && at.elapsed() < self.cache_ttl
        {
            return Ok(record.clone());
        }
        let before = self.revocations.load(Ordering::SeqCst);
        let record = self.store.api_key(hash)?.ok_or(KeyError::Unknown)?;
        let mut cache = lock(&self.cache);
        if self.revocations.load(Ordering::SeqCst) == before {
            if cache.len() >= self.cache_max {
                cache.clear();
            }
            cache.insert(hash.to_owned(), (record.clone(), Instant::now()));
        }
        Ok(record)
    }

    /// Create and store a key; returns the key (shown once) and its listing.
    pub async fn create(&self, new: NewKey) -> Result<(String, KeySummary), KeyError> {
        let invalid = |m: String| Err(KeyError::Invalid(m));
        let name_rule = format!(
            "1-{} bytes, not only spaces, without control characters",
            self.name_max
        );
        if !valid_name(&new.name, self.name_max) {
            return invalid(format!("name must be {name_rule}"));
        }
        if new.scopes.is_empty() {
            return invalid("at least one scope is required".into());
        }
        if let Some(bad) = new.scopes.iter().find(|s| Scope::parse(s).is_none()) {
            return invalid(format!(
                "unknown scope {bad:?}; use send, call, read, enroll or admin"
            ));
        }
        if new.valid_days > MAX_KEY_DAYS {
            return invalid(format!(
                "valid_days must be at most {MAX_KEY_DAYS} (0: never expires)"
            ));
        }
        if !new.enroll_groups.is_empty() && !new.scopes.iter().any(|s| s == "enroll") {
            return invalid("enroll groups apply only to a key with the enroll scope".into());
        }
        if !new.enroll_groups.iter().all(|g| valid_name(g, self.name_max)) {
            return invalid(format!("a group must be {name_rule}"));
        }
        let now = now_ms();
        let record = ApiKeyRecord {
            expires_at_ms: match new.valid_days {
                0 => 0,
                d => now + i64::from(d) * 86_400_000,
            },
            enroll_groups: new.enroll_groups,
            ..ApiKeyRecord::new(&new.name, new.scopes, now)
        };
        // Ids must name one key: draw again in the (2^-48) case of a clash.
        let existing = self.store.api_keys()?;
        let key = loop {
            let key = new_api_key();
            let id = key_id(&api_key_hash(&key));
            if !existing.iter().any(|(h, _)| key_id(h) == id) {
                break key;
            }
        };
        let hash = api_key_hash(&key);
        self.put(&hash, &record).await?;
        Ok((key, summary(&hash, &record, now)))
    }

    /// Every key, oldest first.
    pub fn list(&self) -> Result<Vec<KeySummary>, KeyError> {
        let now = now_ms();
        let mut keys: Vec<KeySummary> = self
            .store
            .api_keys()?
            .iter()
            .map(|(hash, record)| summary(hash, record, now))
            .collect();
        keys.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        Ok(keys)
    }

    /// Revoke the key with id `id`: refused from now on, its streams and dashboard sessions end.
    /// Revoking a revoked key changes nothing. The last usable admin key cannot be revoked (the
    /// server could then not be administered without its data directory).
    pub async fn revoke(&self, id: &str) -> Result<KeySummary, KeyError> {
        let id = id.trim().to_ascii_lowercase();
        if id.len() != ID_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(KeyError::Invalid(format!(
                "a key id is {ID_LEN} hex digits, as `key list` shows"
            )));
        }
        let now = now_ms();
        let keys = self.store.api_keys()?;
        let (hash, mut record) = keys
            .iter()
            .find(|(h, _)| key_id(h) == id)
            .cloned()
            .ok_or(KeyError::Unknown)?;
        if record.revoked_at_ms != 0 {
            return Ok(summary(&hash, &record, now));
        }
        let usable_admin = |h: &String, r: &ApiKeyRecord| {
            *h != hash && summary(h, r, now).state == KeyState::Active && Scope::Admin.granted_by(&r.scopes)
        };
        if Scope::Admin.granted_by(&record.scopes) && !keys.iter().any(|(h, r)| usable_admin(h, r)) {
            return Err(KeyError::Refused(format!(
                "key {id} is the last usable admin key; create another admin key first"
            )));
        }
        record.revoked_at_ms = now;
        self.put(&hash, &record).await?;
        // Durable first, then forget: a lookup from here on reads the revoked record.
        self.revocations.fetch_add(1, Ordering::SeqCst);
        lock(&self.cache).remove(&hash);
        if let Some(token) = lock(&self.tokens).remove(&hash) {
            token.cancel();
        }
        Ok(summary(&hash, &record, now))
    }

    async fn put(&self, hash: &str, record: &ApiKeyRecord) -> Result<(), StoreError> {
        let (hash, record) = (hash.to_owned(), record.clone());
        commit(&*self.store, vec![Op::PutApiKey { hash, record }]).await
    }
}

/// A holder shows as its key's name (logs: never the key).
impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.record.name)
    }
}

/// Whether `value` may name a key, device or group: 1 to `max_bytes` (`limits.max_name_bytes`)
/// bytes, not only whitespace (the provider refuses a blank device id), no control characters.
pub fn valid_name(value: &str, max_bytes: usize) -> bool {
    !value.trim().is_empty() && value.len() <= max_bytes && !value.chars().any(char::is_control)
}

/// The key in an `authorization` value `Bearer <key>`.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, key) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
}

/// The listed id of the key with hash `hash`.
pub fn key_id(hash: &str) -> String {
    hash.chars().take(ID_LEN).collect()
}

fn summary(hash: &str, r: &ApiKeyRecord, now: i64) -> KeySummary {
    KeySummary {
        id: key_id(hash),
        name: r.name.clone(),
        scopes: r.scopes.clone(),
        enroll_groups: r.enroll_groups.clone(),
        created_at_ms: r.created_at_ms,
        expires_at_ms: r.expires_at_ms,
        revoked_at_ms: r.revoked_at_ms,
        state: if r.revoked_at_ms != 0 {
            KeyState::Revoked
        } else if r.expires_at_ms != 0 && now >= r.expires_at_ms {
            KeyState::Expired
        } else {
            KeyState::Active
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_prefixes() {
        let hash = api_key_hash("lpk_x");
        assert_eq!(key_id(&hash).len(), ID_LEN);
        assert!(hash.starts_with(&key_id(&hash)));
    }
}

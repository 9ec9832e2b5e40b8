//! Client keys: made with `POST /api/v1/keys`, shown once, kept as a SHA-256 digest, and held
//! in an in-memory index so that checking a key on `/mcp` reads no database.
//!
//! A key is 32 random bytes, written `sbk_<base64url>`. SHA-256 is enough for a secret of that
//! entropy (there is nothing to brute-force, so a slow password hash would only cost CPU on
//! every request). The index finds a key by the first 8 bytes of its digest and compares the
//! whole digest in constant time.
//!
//! Revocation is immediate on this node: the key leaves the index (the next request with it
//! is refused) and its [`CancellationToken`] is cancelled, which ends every request and stream
//! it has open. Other nodes sharing the database learn of new and revoked keys at their next
//! [`Keys::refresh`] (every [`REFRESH_EVERY`]).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{
    principal::{BadGrant, Grants, Principal, PrincipalKind},
    quota::Quota,
};
use crate::store::{KeyRecord, Store, StoreError};

/// What every key starts with, so a leaked one is recognisable (secret scanners, logs).
pub const KEY_PREFIX: &str = "sbk_";

/// How often the index is reloaded from the store, for keys created or revoked on another node.
pub const REFRESH_EVERY: Duration = Duration::from_secs(10);

/// `POST /api/v1/keys`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// For people: who or what holds the key (1-200 characters).
    pub name: String,
    /// What the key may call: `"*"` (every tool), a tool's slug (`"everything"`), or one MCP
    /// tool of a slug (`"everything/echo"`). At least one.
    pub tools: Vec<String>,
    /// The key stops working this many seconds after it is made (default: never).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub expires_in_s: Option<u64>,
    /// Requests per minute, in bursts of up to this many (default: no limit).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub rate_limit_per_min: Option<u32>,
    /// Requests in flight at once, open response streams included (default: no limit).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_concurrent: Option<u32>,
}

/// A key as the API shows it: never the key, never its digest.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ClientKey {
    pub id: Uuid,
    pub name: String,
    pub tools: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub rate_limit_per_min: Option<u32>,
    pub max_concurrent: Option<u32>,
}

impl From<&KeyRecord> for ClientKey {
    fn from(r: &KeyRecord) -> ClientKey {
        ClientKey {
            id: r.id,
            name: r.name.clone(),
            tools: r.grants.clone(),
            created_at: r.created_at,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
            rate_limit_per_min: r.rate_limit_per_min,
            max_concurrent: r.max_concurrent,
        }
    }
}

/// The answer to `POST /api/v1/keys`: the key itself, this once, and what `GET` shows.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedKey {
    /// The key (`sbk_...`): send it as `Authorization: Bearer <key>` on `/mcp`. It is shown
    /// only now; Switchboard keeps a digest of it.
    pub key: String,
    #[serde(flatten)]
    pub info: ClientKey,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no key with id '{0}'")]
    NotFound(String),
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(field: &'static str, message: impl Into<String>) -> KeyError {
    KeyError::Invalid {
        field,
        message: message.into(),
    }
}

/// The SHA-256 digest of a presented key.
fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn bucket(digest: &[u8; 32]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(b)
}

/// A fresh key and its digest.
fn generate() -> Result<(String, [u8; 32]), KeyError> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| invalid("key", format!("no randomness: {e}")))?;
    let key = format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    );
    let d = digest(&key);
    Ok((key, d))
}

/// A key the index holds: what a request with it needs, without a database read.
#[derive(Debug)]
pub struct LiveKey {
    digest: [u8; 32],
    pub expires_at: Option<DateTime<Utc>>,
    pub principal: Arc<Principal>,
    pub quota: Arc<Quota>,
    /// Cancelled when the key is revoked: ends what it has open.
    pub revoked: CancellationToken,
}

impl LiveKey {
    fn from_record(r: &KeyRecord) -> Result<LiveKey, BadGrant> {
        Ok(LiveKey {
            digest: r.key_hash,
            expires_at: r.expires_at,
            principal: Arc::new(Principal {
                id: r.id.to_string(),
                kind: PrincipalKind::Key,
                grants: Grants::parse(&r.grants)?,
            }),
            quota: Arc::new(Quota::new(r.rate_limit_per_min, r.max_concurrent)),
            revoked: CancellationToken::new(),
        })
    }

    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|e| e <= now)
    }
}

#[derive(Default)]
struct Index {
    by_bucket: HashMap<u64, Vec<Arc<LiveKey>>>,
    by_id: HashMap<Uuid, Arc<LiveKey>>,
    /// Keys revoked through this node: a refresh that read the store before the revocation
    /// must not bring them back.
    revoked: HashSet<Uuid>,
}

impl Index {
    /// Adds a key unless it is indexed already (a refresh may have found it first) or was
    /// revoked here.
    fn insert(&mut self, id: Uuid, k: Arc<LiveKey>) {
        if self.by_id.contains_key(&id) || self.revoked.contains(&id) {
            return;
        }
        self.by_bucket
            .entry(bucket(&k.digest))
            .or_default()
            .push(Arc::clone(&k));
        self.by_id.insert(id, k);
    }

    fn remove(&mut self, id: Uuid) -> Option<Arc<LiveKey>> {
        self.revoked.insert(id);
        let k = self.by_id.remove(&id)?;
        let b = bucket(&k.digest);
        if let Some(v) = self.by_bucket.get_mut(&b) {
            v.retain(|x| !Arc::ptr_eq(x, &k));
            if v.is_empty() {
                self.by_bucket.remove(&b);
            }
        }
        Some(k)
    }
}

/// The keys: the store's records, and the index of those that are not revoked.
pub struct Keys {
    store: Store,
    index: Mutex<Index>,
}

impl Keys {
    /// Loads every key that is not revoked.
    pub async fn load(store: Store) -> Result<Keys, StoreError> {
        let keys = Keys {
            store,
            index: Mutex::new(Index::default()),
        };
        keys.refresh().await?;
        Ok(keys)
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the index in line with the store: keys made elsewhere are added, keys revoked
    /// elsewhere are removed and their streams ended. Keys already indexed keep their entry
    /// (and so their quota state and open streams).
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let records = self.store.list_keys().await?;
        let mut ended = Vec::new();
        {
            let mut index = self.index();
            for r in &records {
                let known = index.by_id.contains_key(&r.id) || index.revoked.contains(&r.id);
                match (known, r.revoked_at.is_some()) {
                    (false, false) => match LiveKey::from_record(r) {
                        Ok(k) => index.insert(r.id, Arc::new(k)),
                        Err(e) => tracing::warn!(key = %r.id, error = %e, "Key skipped"),
                    },
                    (_, true) => ended.extend(index.remove(r.id)),
                    (true, false) => {}
                }
            }
        }
        for k in ended {
            k.revoked.cancel();
        }
        Ok(())
    }

    /// The key a request presents, if it is one this node knows and it is not revoked (it may
    /// have expired: the caller says so). Reads no database.
    pub fn find(&self, presented: &str) -> Option<Arc<LiveKey>> {
        let d = digest(presented);
        let index = self.index();
        index
            .by_bucket
            .get(&bucket(&d))?
            .iter()
            .find(|k| bool::from(k.digest.ct_eq(&d)))
            .cloned()
    }

    pub async fn create(&self, req: NewKey) -> Result<CreatedKey, KeyError> {
        let name = req.name.trim().to_owned();
        if name.is_empty() || name.chars().count() > 200 {
            return Err(invalid("name", "give 1-200 characters"));
        }
        if req.tools.is_empty() {
            return Err(invalid(
                "tools",
                "grant at least one: '*', a tool slug, or 'slug/mcp-tool'",
            ));
        }
        Grants::parse(&req.tools).map_err(|e| invalid("tools", e.to_string()))?;
        let expires_at = match req.expires_in_s {
            None => None,
            Some(0) => return Err(invalid("expires_in_s", "must be at least 1")),
            Some(s) => {
                let after = i64::try_from(s)
                    .ok()
                    .and_then(chrono::TimeDelta::try_seconds)
                    .and_then(|d| crate::store::now().checked_add_signed(d))
                    .filter(|t| t.timestamp() < 253_402_300_799) // year 9999: every backend's limit
                    .ok_or_else(|| invalid("expires_in_s", "is too far in the future"))?;
                Some(after)
            }
        };
        for (field, v) in [
            ("rate_limit_per_min", req.rate_limit_per_min),
            ("max_concurrent", req.max_concurrent),
        ] {
            if v == Some(0) {
                return Err(invalid(
                    field,
                    "must be at least 1 (leave it out for no limit)",
                ));
            }
        }
        let (key, key_hash) = generate()?;
        let record = KeyRecord {
            id: Uuid::new_v4(),
            name,
            key_hash,
            grants: req.tools,
            created_at: crate::store::now(),
            expires_at,
            revoked_at: None,
            rate_limit_per_min: req.rate_limit_per_min,
            max_concurrent: req.max_concurrent,
        };
        self.store.insert_key(&record).await?;
        let live = LiveKey::from_record(&record).map_err(|e| invalid("tools", e.to_string()))?;
        self.index().insert(record.id, Arc::new(live));
        Ok(CreatedKey {
            key,
            info: ClientKey::from(&record),
        })
    }

    pub async fn list(&self) -> Result<Vec<ClientKey>, KeyError> {
        Ok(self
            .store
            .list_keys()
            .await?
            .iter()
            .map(ClientKey::from)
            .collect())
    }

    pub async fn get(&self, id: &str) -> Result<ClientKey, KeyError> {
        let not_found = || KeyError::NotFound(id.to_owned());
        let uuid = Uuid::parse_str(id).map_err(|_| not_found())?;
        let r = self.store.get_key(uuid).await?.ok_or_else(not_found)?;
        Ok(ClientKey::from(&r))
    }

    /// Revokes a key (again: no change). The next request with it is refused and what it has
    /// open on this node ends now.
    pub async fn revoke(&self, id: &str) -> Result<ClientKey, KeyError> {
        let not_found = || KeyError::NotFound(id.to_owned());
        let uuid = Uuid::parse_str(id).map_err(|_| not_found())?;
        let r = self
            .store
            .revoke_key(uuid, crate::store::now())
            .await?
            .ok_or_else(not_found)?;
        let removed = self.index().remove(uuid);
        if let Some(k) = removed {
            k.revoked.cancel();
        }
        Ok(ClientKey::from(&r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str) -> KeyRecord {
        KeyRecord {
            id: Uuid::new_v4(),
            name: "k".into(),
            key_hash: digest(key),
            grants: vec!["*".into()],
            created_at: crate::store::now(),
            expires_at: None,
            revoked_at: None,
            rate_limit_per_min: None,
            max_concurrent: None,
        }
    }

    fn find(index: &Index, key: &str) -> bool {
        let d = digest(key);
        index
            .by_bucket
            .get(&bucket(&d))
            .is_some_and(|v| v.iter().any(|k| bool::from(k.digest.ct_eq(&d))))
    }

    /// A refresh and a create may both index one new key, and a refresh that read the store
    /// before a revocation may offer the key again: neither may leave a revoked key findable.
    #[test]
    fn a_key_indexed_twice_or_offered_after_revocation_stays_revoked() {
        let r = record("sbk_a");
        let mut index = Index::default();
        index.insert(r.id, Arc::new(LiveKey::from_record(&r).unwrap()));
        index.insert(r.id, Arc::new(LiveKey::from_record(&r).unwrap()));
        assert!(find(&index, "sbk_a"));
        assert!(index.remove(r.id).is_some());
        assert!(!find(&index, "sbk_a"));
        index.insert(r.id, Arc::new(LiveKey::from_record(&r).unwrap()));
        assert!(!find(&index, "sbk_a"), "a revoked key came back");
        assert!(index.by_bucket.is_empty() && index.by_id.is_empty());
    }

    #[test]
    fn keys_are_prefixed_random_and_hashed() {
        let (a, da) = generate().unwrap();
        let (b, db) = generate().unwrap();
        assert!(
            a.starts_with(KEY_PREFIX) && a.len() == KEY_PREFIX.len() + 43,
            "{a}"
        );
        assert_ne!(a, b);
        assert_eq!(da, digest(&a));
        assert_ne!(da, db);
    }
}

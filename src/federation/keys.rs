//! Our signing keys (SPEC §3): generate, rotate, and publish them.
//!
//! Signing and verification are pure functions elsewhere; this is the only
//! stateful part on our side. The rotation timer and the CLI's `key rotate`
//! call the same [`Keys::rotate`] (through `Federation::rotate`, which
//! audits it).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use ed25519_dalek::SigningKey;
use rand::RngCore;

use crate::clock::rfc3339;
use crate::error::{Code, Error, Result};
use crate::ids::{KeyId, ServerName};
use crate::protocol::wire::{Descriptor, Endpoints, OldKey};
use crate::storage::{KeyRecord, KeyRing, Store, T};

const KEYS: &[u8] = b"keys";

/// The key we sign with now.
#[derive(Clone)]
pub struct CurrentKey {
    pub key_id: KeyId,
    pub signing: SigningKey,
}

/// Shows the key id only: the secret never reaches a log.
impl std::fmt::Debug for CurrentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CurrentKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// Shared, cheap to clone. The lock is std's: it is never held across
/// `.await`, only around copying the ring in or out.
#[derive(Clone)]
pub struct Keys {
    store: Store,
    ring: Arc<RwLock<KeyRing>>,
}

pub(crate) fn public_key_text(key: &[u8; 32]) -> String {
    format!(
        "ed25519:{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

/// Parse `ed25519:<base64 of 32 bytes>`.
pub(crate) fn parse_public_key(text: &str) -> Option<[u8; 32]> {
    let b64 = text.strip_prefix("ed25519:")?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    raw.try_into().ok()
}

fn new_record(now_ms: i64) -> KeyRecord {
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    let public = SigningKey::from_bytes(&seed).verifying_key().to_bytes();
    KeyRecord {
        seed,
        key_id: KeyId::derive(&public).to_string(),
        created_at_ms: now_ms,
        rotated_at_ms: None,
        expires_at_ms: None,
    }
}

impl Keys {
    pub fn load(store: &Store) -> Result<Keys> {
        let ring: KeyRing = store.get(T::Meta, KEYS)?.unwrap_or_default();
        Ok(Keys {
            store: store.clone(),
            ring: Arc::new(RwLock::new(ring)),
        })
    }

    fn save(&self, ring: KeyRing) -> Result<()> {
        self.store.put(T::Meta, KEYS, &ring)?;
        self.store.flush_blocking()?;
        *self.ring.write().expect("key ring lock") = ring;
        Ok(())
    }

    pub fn ring(&self) -> KeyRing {
        self.ring.read().expect("key ring lock").clone()
    }

    /// The current key, or `SW_FED_NO_KEY`.
    pub fn current(&self) -> Result<CurrentKey> {
        let ring = self.ring.read().expect("key ring lock");
        let rec = ring.current.as_ref().ok_or_else(no_key)?;
        Ok(CurrentKey {
            key_id: KeyId::parse(&rec.key_id)?,
            signing: SigningKey::from_bytes(&rec.seed),
        })
    }

    /// One of our own keys, by id, for verifying our own events (history
    /// that comes back by backfill): the current key always; an old one
    /// for events made before it was rotated out.
    pub fn own_key_for_event(
        &self,
        key_id: &KeyId,
        origin_ts_ms: i64,
    ) -> Option<ed25519_dalek::VerifyingKey> {
        let ring = self.ring.read().expect("key ring lock");
        let current = ring.current.iter().filter(|c| c.key_id == key_id.as_str());
        let old = ring.old.iter().filter(|k| {
            k.key_id == key_id.as_str() && k.rotated_at_ms.is_some_and(|r| origin_ts_ms < r)
        });
        current
            .chain(old)
            .next()
            .map(|k| SigningKey::from_bytes(&k.seed).verifying_key())
    }

    pub fn has_key(&self) -> bool {
        self.ring.read().expect("key ring lock").current.is_some()
    }

    /// Create the first key. Refuses when one exists: that is `rotate`.
    pub fn generate(&self, now_ms: i64) -> Result<KeyRecord> {
        let mut ring = self.ring();
        if let Some(cur) = &ring.current {
            return Err(Error::bad_request(format!(
                "a signing key already exists ({}); use `scaiwave admin federation key rotate` to replace it",
                cur.key_id
            )));
        }
        let rec = new_record(now_ms);
        ring.current = Some(rec.clone());
        self.save(ring)?;
        Ok(rec)
    }

    /// Make a new key current; the previous one verifies until `now + overlap`
    /// (or not at all for new signatures with `revoke_previous`).
    pub fn rotate(
        &self,
        now_ms: i64,
        overlap: Duration,
        revoke_previous: bool,
    ) -> Result<KeyRecord> {
        let mut ring = self.ring();
        let rec = new_record(now_ms);
        if let Some(mut prev) = ring.current.take() {
            prev.rotated_at_ms = Some(now_ms);
            prev.expires_at_ms = Some(if revoke_previous {
                now_ms
            } else {
                now_ms + overlap.as_millis() as i64
            });
            ring.old.push(prev);
        }
        ring.current = Some(rec.clone());
        self.save(ring)?;
        Ok(rec)
    }

    /// When the timer will rotate the current key.
    pub fn rotates_at_ms(&self, interval: Duration) -> Option<i64> {
        let ring = self.ring.read().expect("key ring lock");
        ring.current
            .as_ref()
            .map(|c| c.created_at_ms + interval.as_millis() as i64)
    }

    /// Our descriptor (SPEC §3); `""` fields while no key exists.
    pub fn descriptor(&self, server_name: &ServerName) -> Descriptor {
        let ring = self.ring.read().expect("key ring lock");
        let (public_key, key_id) = match &ring.current {
            Some(c) => (
                public_key_text(&SigningKey::from_bytes(&c.seed).verifying_key().to_bytes()),
                c.key_id.clone(),
            ),
            None => (String::new(), String::new()),
        };
        Descriptor {
            server_name: server_name.to_string(),
            public_key,
            key_id,
            protocol_versions: vec!["v1".into()],
            endpoints: Endpoints::v1(),
            old_keys: ring
                .old
                .iter()
                .map(|k| OldKey {
                    key_id: k.key_id.clone(),
                    public_key: public_key_text(
                        &SigningKey::from_bytes(&k.seed).verifying_key().to_bytes(),
                    ),
                    rotated_at: rfc3339(k.rotated_at_ms.unwrap_or(k.created_at_ms)),
                    expires_at: rfc3339(k.expires_at_ms.unwrap_or(k.created_at_ms)),
                })
                .collect(),
        }
    }
}

pub(crate) fn no_key() -> Error {
    Error::new(
        Code::NoKey,
        "this server has no federation signing key; run `scaiwave admin federation key generate`",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_rotate_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let keys = Keys::load(&store).unwrap();
        let name = ServerName::parse("a.test").unwrap();
        assert_eq!(keys.current().unwrap_err().code, Code::NoKey);
        assert_eq!(keys.descriptor(&name).public_key, "");
        let first = keys.generate(1_000).unwrap();
        assert!(keys.generate(2_000).is_err(), "generate twice must refuse");
        let second = keys
            .rotate(10_000, Duration::from_secs(30 * 86400), false)
            .unwrap();
        assert_ne!(first.key_id, second.key_id);
        let d = keys.descriptor(&name);
        assert_eq!(d.key_id, second.key_id);
        assert_eq!(d.old_keys.len(), 1);
        assert_eq!(d.old_keys[0].key_id, first.key_id);
        keys.rotate(20_000, Duration::from_secs(30 * 86400), true)
            .unwrap();
        let ring = Keys::load(&store).unwrap().ring();
        let revoked = ring.old.last().unwrap();
        assert_eq!(revoked.expires_at_ms, revoked.rotated_at_ms);
        assert_eq!(
            parse_public_key(&d.public_key).map(|k| KeyId::derive(&k).to_string()),
            Some(second.key_id)
        );
    }
}

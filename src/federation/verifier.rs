//! The verifier key cache (SPEC §3): peers' descriptors, fetched over
//! verified HTTPS, cached for min(max-age, 24 h), re-fetched once for an
//! unknown key_id (at most once per peer per minute), negative-cached for
//! 5 min on failure, and never trusting a key_id bound to another key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ed25519_dalek::VerifyingKey;

use crate::clock::Clock;
use crate::error::{Code, Error, Result};
use crate::federation::client::Outbound;
use crate::federation::keys::parse_public_key;
use crate::federation::wire::Descriptor;
use crate::ids::{KeyId, ServerName};
use crate::limits::{
    DESCRIPTOR_CACHE_SECS_MAX, DESCRIPTOR_NEGATIVE_CACHE_SECS, DESCRIPTOR_REFETCH_INTERVAL_SECS,
    NEW_ORIGIN_FETCHES_PER_SEC_MAX,
};

/// What a key is being used to check, which decides whether an old key counts.
#[derive(Debug, Clone, Copy)]
pub enum KeyUse {
    /// A request signature made now: old keys count until `expires_at`.
    Request { now_ms: i64 },
    /// An event signature: old keys count for events before `rotated_at`.
    Event { origin_ts_ms: i64 },
}

#[derive(Debug, Clone)]
struct PeerKey {
    key: VerifyingKey,
    current: bool,
    rotated_at_ms: Option<i64>,
    expires_at_ms: Option<i64>,
}

#[derive(Debug, Default)]
struct Entry {
    keys: HashMap<KeyId, PeerKey>,
    protocol_versions: Vec<String>,
    fresh_until_ms: i64,
    last_forced_ms: Option<i64>,
    failed_until_ms: i64,
    failure: String,
}

#[derive(Default)]
struct State {
    peers: HashMap<ServerName, Entry>,
    /// Every (server, key_id) → key we have accepted; a key_id never moves.
    bindings: HashMap<(ServerName, KeyId), [u8; 32]>,
    new_origin_window: (i64, u32),
}

/// Shared, cheap to clone. The std mutex guards plain map updates and is
/// never held across a fetch.
#[derive(Clone)]
pub struct Verifier {
    outbound: Outbound,
    clock: Clock,
    state: Arc<Mutex<State>>,
    /// One fetch in flight per peer, so a burst does not fetch N times.
    fetching: Arc<Mutex<HashMap<ServerName, Arc<tokio::sync::Mutex<()>>>>>,
}

fn parse_time(text: &str) -> Option<i64> {
    humantime::parse_rfc3339(text)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
}

fn usable(k: &PeerKey, usage: KeyUse) -> bool {
    if k.current {
        return true;
    }
    match usage {
        KeyUse::Request { now_ms } => k.expires_at_ms.is_some_and(|e| now_ms < e),
        KeyUse::Event { origin_ts_ms } => k.rotated_at_ms.is_some_and(|r| origin_ts_ms < r),
    }
}

impl Verifier {
    pub fn new(outbound: Outbound, clock: Clock) -> Verifier {
        Verifier {
            outbound,
            clock,
            state: Arc::default(),
            fetching: Arc::default(),
        }
    }

    /// The key `key_id` of `origin`, valid for `usage`, fetching as SPEC §3 says.
    pub async fn key(
        &self,
        origin: &ServerName,
        key_id: &KeyId,
        usage: KeyUse,
    ) -> Result<VerifyingKey> {
        let now = self.clock.now_ms();
        let mut fetched_fresh = false;
        if self.needs_fetch(origin, now)? {
            self.fetch(origin, false).await?;
            fetched_fresh = true;
        }
        if let Some(found) = self.lookup(origin, key_id, usage) {
            return found;
        }
        if !fetched_fresh && self.may_force(origin, now) {
            self.fetch(origin, true).await?;
            if let Some(found) = self.lookup(origin, key_id, usage) {
                return found;
            }
        }
        Err(Error::signature(format!(
            "{origin} does not publish key {key_id}; if {origin} rotated its key, refresh it with POST /v1/admin/federation/foreign/{{fqid}}/refresh"
        )))
    }

    /// Re-fetch a peer's descriptor now (admin refresh).
    pub async fn refresh(&self, origin: &ServerName) -> Result<()> {
        self.fetch(origin, true).await
    }

    /// Protocol versions a peer's last descriptor listed.
    pub fn protocol_versions(&self, origin: &ServerName) -> Vec<String> {
        let state = self.state.lock().expect("verifier lock");
        state
            .peers
            .get(origin)
            .map(|e| e.protocol_versions.clone())
            .unwrap_or_default()
    }

    fn lookup(
        &self,
        origin: &ServerName,
        key_id: &KeyId,
        usage: KeyUse,
    ) -> Option<Result<VerifyingKey>> {
        let state = self.state.lock().expect("verifier lock");
        let k = state.peers.get(origin)?.keys.get(key_id)?;
        Some(if usable(k, usage) {
            Ok(k.key)
        } else {
            Err(Error::signature(format!(
                "key {key_id} of {origin} was rotated out and no longer verifies this signature; the sender must sign with its current key"
            )))
        })
    }

    /// True when we hold no fresh copy; an error while a failure is cached.
    fn needs_fetch(&self, origin: &ServerName, now: i64) -> Result<bool> {
        let mut state = self.state.lock().expect("verifier lock");
        let seen = state.peers.contains_key(origin);
        if let Some(e) = state.peers.get(origin) {
            if now < e.failed_until_ms {
                return Err(Error::signature(format!(
                    "could not fetch the descriptor of {origin} (retrying after a pause): {}",
                    e.failure
                )));
            }
            return Ok(now >= e.fresh_until_ms);
        }
        if !seen {
            let sec = now.div_euclid(1000);
            let (window, count) = &mut state.new_origin_window;
            if *window != sec {
                *window = sec;
                *count = 0;
            }
            *count += 1;
            if *count > NEW_ORIGIN_FETCHES_PER_SEC_MAX {
                let mut e = Error::new(
                    Code::RateLimited,
                    "too many never-seen servers at once; retry in a second",
                );
                e.retry_after_secs = Some(1);
                return Err(e);
            }
        }
        Ok(true)
    }

    fn may_force(&self, origin: &ServerName, now: i64) -> bool {
        let mut state = self.state.lock().expect("verifier lock");
        let Some(e) = state.peers.get_mut(origin) else {
            return true;
        };
        let ok = e
            .last_forced_ms
            .is_none_or(|t| now - t >= DESCRIPTOR_REFETCH_INTERVAL_SECS as i64 * 1000);
        if ok {
            e.last_forced_ms = Some(now);
        }
        ok
    }

    async fn fetch(&self, origin: &ServerName, no_cache: bool) -> Result<()> {
        let lock = {
            let mut map = self.fetching.lock().expect("fetch map lock");
            map.entry(origin.clone()).or_default().clone()
        };
        let _guard = lock.lock().await;
        let result = self.outbound.descriptor(origin, no_cache).await;
        let now = self.clock.now_ms();
        let outcome = result.and_then(|(d, max_age, _)| self.accept(origin, &d, max_age, now));
        if let Err(why) = &outcome {
            tracing::warn!(
                name: "federation.peer_discovery_failed",
                peer = %origin,
                error = %why,
                "federation.peer_discovery_failed"
            );
            let mut state = self.state.lock().expect("verifier lock");
            let e = state.peers.entry(origin.clone()).or_default();
            e.failed_until_ms = now + DESCRIPTOR_NEGATIVE_CACHE_SECS as i64 * 1000;
            e.failure = why.clone();
        }
        outcome.map_err(|why| {
            Error::signature(format!(
                "could not get a usable descriptor from https://{origin}/.well-known/scaiwave/server: {why}; check that it is reachable with a valid certificate"
            ))
        })
    }

    /// Validate a fetched descriptor and cache it; nothing is cached if any
    /// check fails.
    fn accept(
        &self,
        origin: &ServerName,
        d: &Descriptor,
        max_age: Option<u64>,
        now: i64,
    ) -> std::result::Result<(), String> {
        if d.server_name != origin.as_str() {
            return Err(format!(
                "the descriptor names {:?}, not {origin}",
                d.server_name
            ));
        }
        let mut keys = HashMap::new();
        let mut add = |id: &str,
                       public: &str,
                       current: bool,
                       rotated: Option<i64>,
                       expires: Option<i64>|
         -> std::result::Result<(), String> {
            let raw = parse_public_key(public).ok_or_else(|| {
                format!("public key {public:?} is not ed25519:<base64 of 32 bytes>")
            })?;
            let derived = KeyId::derive(&raw);
            if derived.as_str() != id {
                return Err(format!(
                    "key_id {id} does not derive from its public key (expected {derived})"
                ));
            }
            let key =
                VerifyingKey::from_bytes(&raw).map_err(|e| format!("bad public key {id}: {e}"))?;
            keys.insert(
                derived,
                PeerKey {
                    key,
                    current,
                    rotated_at_ms: rotated,
                    expires_at_ms: expires,
                },
            );
            Ok(())
        };
        if d.public_key.is_empty() {
            return Err("the peer has no signing key yet (empty public_key); its admin must run `scaiwave admin federation key generate`".into());
        }
        add(&d.key_id, &d.public_key, true, None, None)?;
        for old in &d.old_keys {
            let rotated =
                parse_time(&old.rotated_at).ok_or("old key rotated_at is not RFC 3339")?;
            let expires =
                parse_time(&old.expires_at).ok_or("old key expires_at is not RFC 3339")?;
            add(
                &old.key_id,
                &old.public_key,
                false,
                Some(rotated),
                Some(expires),
            )?;
        }
        let mut state = self.state.lock().expect("verifier lock");
        for (id, k) in &keys {
            if let Some(bound) = state.bindings.get(&(origin.clone(), id.clone())) {
                if *bound != k.key.to_bytes() {
                    return Err(format!(
                        "key_id {id} was seen before with a different key; refusing the descriptor"
                    ));
                }
            }
        }
        for (id, k) in &keys {
            state
                .bindings
                .insert((origin.clone(), id.clone()), k.key.to_bytes());
        }
        let ttl = max_age
            .unwrap_or(DESCRIPTOR_CACHE_SECS_MAX)
            .min(DESCRIPTOR_CACHE_SECS_MAX) as i64;
        let e = state.peers.entry(origin.clone()).or_default();
        e.keys = keys;
        e.protocol_versions = d.protocol_versions.clone();
        e.fresh_until_ms = now + ttl * 1000;
        e.failed_until_ms = 0;
        e.failure.clear();
        Ok(())
    }
}

//! The verifier key cache (SPEC §3): peers' descriptors, fetched over
//! verified HTTPS, cached for min(max-age, 24 h), re-fetched once for an
//! unknown key_id (at most once per peer per minute), negative-cached for
//! 5 min on failure, and never trusting a key_id bound to another key.
//! Everything here is keyed by names from unauthenticated requests, so it
//! is bounded: at most [`VERIFIER_PEERS_MAX`] peers (stale and failed
//! entries evicted first, then the least recently used), key bindings only
//! for peers still held, and a fetch lock only while someone holds it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ed25519_dalek::VerifyingKey;

use crate::clock::Clock;
use crate::error::{Code, Error, Result};
use crate::federation::client::Outbound;
use crate::federation::keys::parse_public_key;
use crate::ids::{KeyId, ServerName};
use crate::limits::DESCRIPTOR_OLD_KEYS_KEPT;
use crate::limits::{
    DESCRIPTOR_CACHE_SECS_MAX, DESCRIPTOR_NEGATIVE_CACHE_SECS, DESCRIPTOR_REFETCH_INTERVAL_SECS,
    NEW_ORIGIN_FETCHES_PER_SEC_MAX, VERIFIER_PEERS_MAX,
};
use crate::metrics::Metrics;
use crate::protocol::wire::Descriptor;

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
    /// Every key_id → key of this peer we have accepted; a key_id never
    /// moves. Kept with the entry, so it goes when the peer is evicted.
    bindings: HashMap<KeyId, [u8; 32]>,
    /// When a signature last asked for this peer: the eviction order.
    last_used_ms: i64,
}

impl Entry {
    /// Worth nothing now: no fresh descriptor and no failure to remember.
    fn stale(&self, now_ms: i64) -> bool {
        now_ms >= self.fresh_until_ms && now_ms >= self.failed_until_ms
    }
}

#[derive(Default)]
struct State {
    peers: HashMap<ServerName, Entry>,
    new_origin_window: (i64, u32),
}

/// Make room for one more peer in `peers` (at most `peers_max`): drop the
/// stale entries, and if that is not enough, the least recently used one,
/// failed fetches before held descriptors.
fn make_room(peers: &mut HashMap<ServerName, Entry>, now_ms: i64, peers_max: usize) {
    if peers.len() < peers_max {
        return;
    }
    peers.retain(|_, e| !e.stale(now_ms));
    while peers.len() >= peers_max {
        let Some(victim) = peers
            .iter()
            .min_by_key(|(_, e)| (!e.keys.is_empty(), e.last_used_ms))
            .map(|(name, _)| name.clone())
        else {
            return;
        };
        peers.remove(&victim);
    }
}

/// The per-peer fetch locks; an entry lives while a [`FetchClaim`] holds it.
type FetchLocks = Arc<Mutex<HashMap<ServerName, Arc<tokio::sync::Mutex<()>>>>>;

/// One caller's use of a peer's fetch lock: the last one out removes it
/// from the map, so names nobody fetches now leave nothing behind.
struct FetchClaim {
    origin: ServerName,
    lock: Arc<tokio::sync::Mutex<()>>,
    map: FetchLocks,
}

impl FetchClaim {
    fn new(map: &FetchLocks, origin: &ServerName) -> FetchClaim {
        let lock = map
            .lock()
            .expect("fetch map lock")
            .entry(origin.clone())
            .or_default()
            .clone();
        FetchClaim {
            origin: origin.clone(),
            lock,
            map: map.clone(),
        }
    }
}

impl Drop for FetchClaim {
    fn drop(&mut self) {
        let mut map = self.map.lock().expect("fetch map lock");
        // Claims clone the lock under the map lock, so a count of two (the
        // map's and ours) means nobody else holds or waits for it.
        let last = map
            .get(&self.origin)
            .is_some_and(|l| Arc::ptr_eq(l, &self.lock) && Arc::strong_count(l) == 2);
        if last {
            map.remove(&self.origin);
        }
    }
}

/// Shared, cheap to clone. The std mutex guards plain map updates and is
/// never held across a fetch.
#[derive(Clone)]
pub struct Verifier {
    outbound: Outbound,
    clock: Clock,
    state: Arc<Mutex<State>>,
    /// One fetch in flight per peer, so a burst does not fetch N times.
    fetching: FetchLocks,
    metrics: Arc<Metrics>,
}

impl State {
    /// The entry of `origin`, made (with room made for it) if new.
    fn entry_for(&mut self, origin: &ServerName, now_ms: i64) -> &mut Entry {
        if !self.peers.contains_key(origin) {
            make_room(&mut self.peers, now_ms, VERIFIER_PEERS_MAX);
        }
        let e = self.peers.entry(origin.clone()).or_default();
        e.last_used_ms = e.last_used_ms.max(now_ms);
        e
    }
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
    pub fn new(outbound: Outbound, clock: Clock, metrics: Arc<Metrics>) -> Verifier {
        Verifier {
            outbound,
            clock,
            state: Arc::default(),
            fetching: Arc::default(),
            metrics,
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
        if let Some(e) = state.peers.get_mut(origin) {
            e.last_used_ms = now;
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
        let claim = FetchClaim::new(&self.fetching, origin);
        let _guard = claim.lock.clone().lock_owned().await;
        let result = self.outbound.descriptor(origin, no_cache).await;
        let now = self.clock.now_ms();
        let outcome = result.and_then(|(d, max_age, _)| self.accept(origin, &d, max_age, now));
        self.metrics
            .descriptor_fetch(if outcome.is_ok() { "ok" } else { "error" });
        if let Err(why) = &outcome {
            tracing::warn!(
                name: "federation.peer_discovery_failed",
                peer = %origin,
                error = %why,
                "federation.peer_discovery_failed"
            );
            let mut state = self.state.lock().expect("verifier lock");
            let e = state.entry_for(origin, now);
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
        if let Some(held) = state.peers.get(origin) {
            for (id, k) in &keys {
                if let Some(bound) = held.bindings.get(id) {
                    if *bound != k.key.to_bytes() {
                        return Err(format!(
                            "key_id {id} was seen before with a different key; refusing the descriptor"
                        ));
                    }
                }
            }
        }
        let ttl = max_age
            .unwrap_or(DESCRIPTOR_CACHE_SECS_MAX)
            .min(DESCRIPTOR_CACHE_SECS_MAX) as i64;
        let e = state.entry_for(origin, now);
        // Bindings of keys the peer no longer lists go once they are more
        // than the descriptor holds: a peer rotating on every fetch must
        // not grow them for ever (a key_id derives from its key anyway).
        if e.bindings.len() > keys.len() + DESCRIPTOR_OLD_KEYS_KEPT {
            e.bindings.retain(|id, _| keys.contains_key(id));
        }
        for (id, k) in &keys {
            e.bindings.insert(id.clone(), k.key.to_bytes());
        }
        e.keys = keys;
        e.protocol_versions = d.protocol_versions.clone();
        e.fresh_until_ms = now + ttl * 1000;
        e.failed_until_ms = 0;
        e.failure.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(i: usize) -> ServerName {
        ServerName::parse(&format!("peer-{i}.example")).unwrap()
    }

    fn with_keys() -> HashMap<KeyId, PeerKey> {
        let raw = [7u8; 32];
        let key = ed25519_dalek::SigningKey::from_bytes(&raw).verifying_key();
        HashMap::from([(
            KeyId::derive(&key.to_bytes()),
            PeerKey {
                key,
                current: true,
                rotated_at_ms: None,
                expires_at_ms: None,
            },
        )])
    }

    #[test]
    fn peers_are_bounded_stale_first_then_failed_then_least_recently_used() {
        let now = 1_000_000;
        let mut peers = HashMap::new();
        let fresh = |last_used_ms| Entry {
            keys: with_keys(),
            fresh_until_ms: now + 1,
            last_used_ms,
            ..Entry::default()
        };
        let failed = |last_used_ms| Entry {
            failed_until_ms: now + 1,
            last_used_ms,
            ..Entry::default()
        };
        peers.insert(name(0), fresh(10));
        peers.insert(name(1), fresh(5));
        peers.insert(name(2), failed(20));
        peers.insert(name(3), Entry::default()); // stale
                                                 // Full at 4: the stale entry goes, nothing else.
        make_room(&mut peers, now, 4);
        assert_eq!(peers.len(), 3);
        assert!(!peers.contains_key(&name(3)));
        // Full at 3: a failed fetch goes before any held descriptor.
        make_room(&mut peers, now, 3);
        assert!(!peers.contains_key(&name(2)));
        // Then the least recently used descriptor.
        make_room(&mut peers, now, 2);
        assert_eq!(peers.keys().collect::<Vec<_>>(), [&name(0)]);
    }

    #[test]
    fn a_flood_of_new_names_never_holds_more_than_the_limit() {
        let mut state = State::default();
        for i in 0..VERIFIER_PEERS_MAX + 500 {
            let now = i as i64;
            let e = state.entry_for(&name(i), now);
            e.failed_until_ms = now + DESCRIPTOR_NEGATIVE_CACHE_SECS as i64 * 1000;
            e.bindings.insert(KeyId::derive(&[1; 32]), [1; 32]);
        }
        assert_eq!(state.peers.len(), VERIFIER_PEERS_MAX);
        assert!(state.peers.contains_key(&name(VERIFIER_PEERS_MAX + 499)));
        assert!(!state.peers.contains_key(&name(0)), "the oldest went");
    }

    #[tokio::test]
    async fn a_fetch_lock_goes_when_nobody_holds_it() {
        let map = FetchLocks::default();
        let first = FetchClaim::new(&map, &name(1));
        let guard = first.lock.clone().lock_owned().await;
        let second = FetchClaim::new(&map, &name(1));
        drop(guard);
        drop(first);
        assert_eq!(map.lock().unwrap().len(), 1, "the second still waits");
        drop(second);
        assert!(map.lock().unwrap().is_empty());
    }
}

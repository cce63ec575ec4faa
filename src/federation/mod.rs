//! Federation: talking to other servers, and nothing of rooms.
//!
//! - [`Federation`]: this server as its peers see it: name, keys, policy,
//!   signed requests out, audit and peer rows.
//! - [`auth`]: §4 authentication of inbound requests, event keys.
//! - [`peer_api`]: the S2S calls we make, their paths and retry classes.
//! - [`keys`]: our keys; [`verifier`]: peers' keys (descriptor cache).
//! - [`policy`]: whom we talk to; [`client`]: outbound HTTPS.
//! - [`outbox`]: the doorbells of the per-peer queues (the queues are
//!   rows in storage, drained by `delivery/`).
//! - [`check`]: the handshake diagnostics of §13.
//!
//! **Invariant of absence:** nothing here knows rooms, HTTP routes or the
//! composition (`App`): the layers above call down into it.

pub mod auth;
pub mod check;
pub mod client;
pub mod keys;
pub mod outbox;
pub mod peer_api;
pub mod policy;
pub mod verifier;

use std::sync::{Arc, Mutex, RwLock};

use crate::clock::Clock;
use crate::config::{Config, FederationConfig};
use crate::error::{Code, Error, Result};
use crate::ids::{Fqid, LocalId, ServerName};
use crate::limits::{AUDIT_UNVERIFIED_PER_SEC_MAX, S2S_REPLY_BYTES_MAX};
use crate::metrics::Metrics;
use crate::storage::{AuditRow, KeyRecord, PeerError, Store, T};

use client::{NetworkError, Outbound, Reply, Signer};
use keys::Keys;
use outbox::{NewPeers, Outbox};
use policy::Policy;
use verifier::Verifier;

const POLICY: &[u8] = b"policy";
/// The tenant's own federation switch (SPEC §14); absent means on.
const FEDERATION_ENABLED: &[u8] = b"federation_enabled";

/// This server as a party to federation: what every layer above needs to
/// sign, admit, audit and reach a peer. One per server_name.
pub struct Federation {
    pub server_name: ServerName,
    /// The `[federation]` section this server runs with.
    pub config: FederationConfig,
    pub store: Store,
    pub keys: Keys,
    pub clock: Clock,
    pub outbound: Outbound,
    pub verifier: Verifier,
    pub outbox: Outbox,
    /// This tenant's SPEC §16 counters.
    pub metrics: Arc<Metrics>,
    /// Read on every request, written by an admin: std lock, never held
    /// across `.await`.
    policy: RwLock<Policy>,
    /// `admin tenant federation enable|disable`, as stored; the delivery
    /// tasks watch it and hold their queues while it is off.
    switch: tokio::sync::watch::Sender<bool>,
    /// How many audit rows of unverified requests were written this second
    /// (and how many were not): anyone can send those, so their rows are
    /// rated. A std mutex: held for a counter update, never across `.await`.
    unverified_audit: Mutex<UnverifiedWindow>,
}

#[derive(Default)]
struct UnverifiedWindow {
    second: i64,
    written: u32,
    skipped: u64,
}

impl Federation {
    /// Load keys and policy from `store`; the receiver it also answers is
    /// for the delivery worker, which starts a task for each new peer.
    pub fn open(config: &Config, store: Store, clock: Clock) -> Result<(Federation, NewPeers)> {
        let metrics = Arc::new(Metrics::new(config.server_name.as_str()));
        let store = store.with_metrics(metrics.clone());
        let keys = Keys::load(&store)?;
        let policy = store.get::<Policy>(T::Meta, POLICY)?.unwrap_or_default();
        let switch = store
            .get::<bool>(T::Meta, FEDERATION_ENABLED)?
            .unwrap_or(true);
        let outbound = Outbound::new(config)?;
        let verifier = Verifier::new(outbound.clone(), clock.clone(), metrics.clone());
        let (outbox, new_peers) = Outbox::new(store.clone(), clock.clone());
        Ok((
            Federation {
                server_name: config.server_name.clone(),
                config: config.federation.clone(),
                store,
                keys,
                clock,
                outbound,
                verifier,
                outbox,
                metrics,
                policy: RwLock::new(policy),
                switch: tokio::sync::watch::channel(switch).0,
                unverified_audit: Mutex::default(),
            },
            new_peers,
        ))
    }

    pub fn fqid(&self, local: &LocalId) -> Fqid {
        Fqid::new(local, &self.server_name)
    }

    pub fn is_local(&self, fqid: &Fqid) -> bool {
        fqid.server() == self.server_name
    }

    // --- policy ---

    pub fn policy(&self) -> Policy {
        self.policy.read().expect("policy lock").clone()
    }

    pub fn set_policy(&self, policy: Policy) -> Result<()> {
        self.store.put(T::Meta, POLICY, &policy)?;
        self.store.flush_blocking()?;
        *self.policy.write().expect("policy lock") = policy;
        Ok(())
    }

    /// Policy towards `peer`; a refusal is audited and logged.
    pub fn admit(&self, peer: &ServerName) -> Result<()> {
        self.policy().admit(peer).inspect_err(|e| {
            tracing::warn!(name: "federation.policy_rejected", peer = %peer, code = %e.code, "federation.policy_rejected");
            self.audit("federation.policy_rejected", Some(peer), None, None, Some(e.code), &e.message);
        })
    }

    /// [`Federation::admit`] for an origin a request only claims (SPEC §4
    /// step 5 comes before the signature): audited as unverified, and rated.
    pub fn admit_claimed(&self, claimed: &ServerName) -> Result<()> {
        self.policy().admit(claimed).inspect_err(|e| {
            tracing::warn!(name: "federation.policy_rejected", peer = %claimed, code = %e.code, "federation.policy_rejected (unverified origin)");
            self.audit_unverified("federation.policy_rejected", Some(claimed), e.code, &e.message);
        })
    }

    // --- the tenant's federation switch ---

    /// Whether this tenant federates: `federation.enabled` in the
    /// configuration, and its own switch.
    pub fn enabled(&self) -> bool {
        self.config.enabled && *self.switch.borrow()
    }

    /// Returns once federation is enabled (never while the configuration
    /// disables it).
    pub async fn enabled_again(&self) {
        if !self.config.enabled {
            return std::future::pending().await;
        }
        let mut rx = self.switch.subscribe();
        let _ = rx.wait_for(|on| *on).await;
    }

    /// The refusal of anything that would federate while it is off.
    pub fn disabled_error(&self) -> Error {
        let fix = if self.config.enabled {
            format!(
                "`scaiwave admin tenant federation enable {}` turns it on",
                self.server_name
            )
        } else {
            "set federation.enabled = true in the configuration to federate".to_string()
        };
        Error::new(
            Code::TenantDisabled,
            format!("federation is disabled on {}; {fix}", self.server_name),
        )
    }

    /// Turn the switch, durably and audited. Queued traffic is kept while
    /// it is off, and sent once it is on again.
    pub fn set_enabled(&self, on: bool) -> Result<()> {
        if on && !self.config.enabled {
            return Err(Error::bad_request(
                "federation.enabled = false in the configuration; set it to true and restart",
            ));
        }
        self.store.put(T::Meta, FEDERATION_ENABLED, &on)?;
        self.store.flush_blocking()?;
        self.switch.send_replace(on);
        let action = if on {
            "federation.tenant.enabled"
        } else {
            "federation.tenant.disabled"
        };
        self.audit(
            action,
            None,
            None,
            None,
            None,
            &format!(
                "federation of {} turned {}",
                self.server_name,
                if on { "on" } else { "off" }
            ),
        );
        tracing::info!(name: "federation.tenant.switch", tenant = %self.server_name, enabled = on, "{action}");
        Ok(())
    }

    // --- signing and sending ---

    /// The signer for an outbound request now.
    pub fn signer(&self) -> Result<Signer> {
        Ok(Signer {
            origin: self.server_name.clone(),
            key: self.keys.current()?,
            now_secs: self.clock.now_secs(),
        })
    }

    /// A signed S2S request from us to `dest` whose answer is small (read
    /// up to [`S2S_REPLY_BYTES_MAX`]). The outer error is ours: no key to
    /// sign with, or our policy refuses `dest` (SPEC §7: we never send to a
    /// server we would refuse, whatever the flow); the inner one means no
    /// HTTP answer came back.
    pub async fn s2s(
        &self,
        method: http::Method,
        dest: &ServerName,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        timeout: std::time::Duration,
    ) -> Result<std::result::Result<Reply, NetworkError>> {
        self.s2s_reading(
            method,
            dest,
            path_and_query,
            body,
            timeout,
            S2S_REPLY_BYTES_MAX,
        )
        .await
    }

    /// [`Federation::s2s`] for an answer that may be up to `reply_bytes_max`.
    pub async fn s2s_reading(
        &self,
        method: http::Method,
        dest: &ServerName,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        timeout: std::time::Duration,
        reply_bytes_max: usize,
    ) -> Result<std::result::Result<Reply, NetworkError>> {
        if !self.enabled() {
            // What we were asked to do cannot federate now (SPEC §6: 409).
            return Err(self.disabled_error().as_conflict());
        }
        self.admit(dest)?;
        let signer = self.signer()?;
        Ok(self
            .outbound
            .signed(
                &signer,
                method,
                dest,
                path_and_query,
                body,
                timeout,
                reply_bytes_max,
            )
            .await)
    }

    /// Rotate our key and audit it (the timer and the admin command).
    pub fn rotate(&self, revoke_previous: bool) -> Result<KeyRecord> {
        let rec = self.keys.rotate(
            self.clock.now_ms(),
            self.config.key_overlap,
            revoke_previous,
        )?;
        self.audit(
            "federation.key.rotated",
            None,
            None,
            None,
            None,
            &format!("new key {}", rec.key_id),
        );
        tracing::info!(key_id = %rec.key_id, "rotated the federation signing key");
        Ok(rec)
    }

    /// Rotate the key when it reaches `key_rotation_interval`, until
    /// `shutdown` (the same rotation as `admin federation key rotate`).
    pub async fn rotation_timer(&self, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            let due = self.keys.rotates_at_ms(self.config.key_rotation_interval);
            let wait = async {
                match due {
                    Some(at) => self.clock.sleep_until_ms(at).await,
                    // No key yet: look again later (an admin may generate one).
                    None => tokio::time::sleep(std::time::Duration::from_secs(60)).await,
                }
            };
            tokio::select! {
                _ = wait => {}
                _ = shutdown.cancelled() => return,
            }
            if due.is_some() {
                if let Err(e) = self.rotate(false) {
                    tracing::error!(error = %e, "scheduled key rotation failed");
                }
            }
        }
    }

    // --- audit and peer rows ---

    pub fn audit(
        &self,
        action: &str,
        peer: Option<&ServerName>,
        event_id: Option<&str>,
        room_id: Option<&str>,
        code: Option<Code>,
        detail: &str,
    ) {
        let now = self.clock.now_ms();
        let row = AuditRow::new(now, action, peer, event_id, room_id, code, detail);
        self.store.audit(vec![row]);
    }

    /// Audit a request whose origin is only claimed (its signature was not,
    /// or could not be, verified): marked `unverified`, and at most
    /// [`AUDIT_UNVERIFIED_PER_SEC_MAX`] rows a second; the first row of a
    /// second says how many were left out before it.
    pub fn audit_unverified(
        &self,
        action: &str,
        claimed: Option<&ServerName>,
        code: Code,
        detail: &str,
    ) {
        let now = self.clock.now_ms();
        let skipped = {
            let mut w = self.unverified_audit.lock().expect("audit window lock");
            let second = now.div_euclid(1000);
            if w.second != second {
                w.second = second;
                w.written = 0;
            }
            if w.written >= AUDIT_UNVERIFIED_PER_SEC_MAX {
                w.skipped += 1;
                return;
            }
            w.written += 1;
            std::mem::take(&mut w.skipped)
        };
        let detail = match skipped {
            0 => detail.to_string(),
            n => format!("{detail} ({n} more unverified rows were not written before this one)"),
        };
        let mut row = AuditRow::new(now, action, claimed, None, None, Some(code), &detail);
        row.unverified = true;
        self.store.audit(vec![row]);
    }

    pub fn peer_success(&self, peer: &ServerName, sent: u64, received: u64) {
        let now = self.clock.now_ms();
        let versions = self.verifier.protocol_versions(peer);
        self.store.update_peer(peer, |r| {
            r.last_seen_ms = Some(now);
            if sent > 0 {
                r.sent.add(now, sent);
                r.last_error = None;
            }
            if received > 0 {
                r.received.add(now, received);
            }
            if !versions.is_empty() {
                r.protocol_versions = versions;
            }
        });
    }

    pub fn peer_failure(&self, peer: &ServerName, code: &str, message: &str) {
        let now = self.clock.now_ms();
        self.store.update_peer(peer, |r| {
            r.last_error = Some(PeerError {
                code: code.to_string(),
                message: message.to_string(),
                at_ms: now,
            });
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path, config_enabled: bool) -> Federation {
        crate::tls::install_crypto_provider();
        let mut config = Config::default_embedded();
        config.federation.enabled = config_enabled;
        let store = Store::open(dir).unwrap();
        Federation::open(&config, store, Clock::starting_at(0))
            .unwrap()
            .0
    }

    #[tokio::test]
    async fn the_switch_is_kept_audited_and_stops_every_outbound_call() {
        let dir = tempfile::tempdir().unwrap();
        {
            let fed = open(dir.path(), true);
            assert!(fed.enabled());
            fed.set_enabled(false).unwrap();
            let peer = ServerName::parse("b.test").unwrap();
            let timeout = std::time::Duration::from_secs(1);
            let e = fed
                .s2s(http::Method::GET, &peer, "/", None, timeout)
                .await
                .unwrap_err();
            assert_eq!((e.code, e.status()), (Code::TenantDisabled, 409));
            fed.store.flush_blocking().unwrap();
        }
        let fed = open(dir.path(), true);
        assert!(!fed.enabled(), "kept across a restart");
        let actions: Vec<String> = fed
            .store
            .audit_rows()
            .unwrap()
            .into_iter()
            .map(|r| r.action)
            .collect();
        assert_eq!(actions, ["federation.tenant.disabled"]);
        fed.set_enabled(true).unwrap();
        // Whoever waits for it hears it at once.
        tokio::time::timeout(std::time::Duration::from_secs(5), fed.enabled_again())
            .await
            .unwrap();
    }

    #[test]
    fn the_configuration_off_switch_wins() {
        let dir = tempfile::tempdir().unwrap();
        let fed = open(dir.path(), false);
        assert!(!fed.enabled());
        let e = fed.set_enabled(true).unwrap_err();
        assert!(e.message.contains("federation.enabled"), "{}", e.message);
        assert!(!fed.enabled());
        assert!(fed
            .disabled_error()
            .message
            .contains("federation.enabled = true"));
    }
}

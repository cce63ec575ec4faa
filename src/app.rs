//! The running server's shared state and the operations every front end
//! (HTTP routes, CLI, background tasks) calls: one production path each.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::config::Config;
use crate::error::{Code, Error, Result};
use crate::federation::client::{NetworkError, Outbound, Reply, Signer};
use crate::federation::delivery::{Delivery, HttpsTransport, Transport};
use crate::federation::keys::Keys;
use crate::federation::policy::Policy;
use crate::federation::verifier::Verifier;
use crate::ids::{Fqid, LocalId, ServerName};
use crate::limits::{AUDIT_DETAIL_BYTES_MAX, AUDIT_UNVERIFIED_PER_SEC_MAX, S2S_REPLY_BYTES_MAX};
use crate::protocol::event::{Presence, PresenceStatus};
use crate::rooms::RoomLocks;
use crate::storage::{keys, AuditRow, Participant, PeerError, PeerRecord, PowerLevel, Store, T};

pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// Live events buffered per stream before a slow reader starts losing them.
const LIVE_EVENTS_BUFFERED: usize = 1024;

/// A room event just stored, as live streams see it.
#[derive(Debug, Clone)]
pub struct LiveEvent {
    pub room_id: String,
    pub seq: u64,
    pub wire: Arc<Vec<u8>>,
}
const POLICY: &[u8] = b"policy";

pub struct App {
    pub config: Config,
    pub server_name: ServerName,
    pub store: Store,
    pub keys: Keys,
    pub clock: Clock,
    pub outbound: Outbound,
    pub verifier: Verifier,
    /// Read on every request, written by an admin: std lock, never held
    /// across `.await`.
    policy: RwLock<Policy>,
    pub room_locks: RoomLocks,
    pub delivery: Delivery,
    /// How the delivery loop reaches peers (HTTPS; scripted in tests).
    pub transport: Arc<dyn Transport>,
    /// New room events, for `GET /v1/events` streams (lagging readers
    /// lose the oldest; the stream is a hint, history is the truth).
    pub live: tokio::sync::broadcast::Sender<LiveEvent>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
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

/// Audit detail as stored: control characters escaped (it often quotes
/// what a peer sent) and cut to [`AUDIT_DETAIL_BYTES_MAX`].
pub fn audit_detail(detail: &str) -> String {
    let mut out = String::with_capacity(detail.len().min(AUDIT_DETAIL_BYTES_MAX));
    for c in detail.chars() {
        let piece: String = if c.is_control() {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        if out.len() + piece.len() > AUDIT_DETAIL_BYTES_MAX - '…'.len_utf8() {
            out.push('…');
            break;
        }
        out.push_str(&piece);
    }
    out
}

/// A fresh random bearer token (256 bits, hex) and the hash we store.
pub fn new_token() -> (String, [u8; 32]) {
    use rand::RngCore;
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let hash = token_hash(&token);
    (token, hash)
}

pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl App {
    /// Open the data dir and load state. `first_start` work (key, admin
    /// token) is done by [`App::first_start`].
    pub fn open(config: Config, clock: Clock) -> Result<Arc<App>> {
        App::open_with(config, clock, Arc::new(HttpsTransport))
    }

    /// [`App::open`] with another delivery transport (tests script one).
    pub fn open_with(
        config: Config,
        clock: Clock,
        transport: Arc<dyn Transport>,
    ) -> Result<Arc<App>> {
        crate::tls::install_crypto_provider();
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            Error::bad_request(format!(
                "cannot create data_dir {}: {e}",
                config.data_dir.display()
            ))
        })?;
        let store = Store::open(&config.data_dir.join("db"))?;
        crate::storage::make_private(&config.data_dir)?;
        let keys = Keys::load(&store)?;
        let policy = store.get::<Policy>(T::Meta, POLICY)?.unwrap_or_default();
        let outbound = Outbound::new(&config)?;
        let verifier = Verifier::new(outbound.clone(), clock.clone());
        Ok(Arc::new(App {
            server_name: config.server_name.clone(),
            config,
            store,
            keys,
            clock,
            outbound,
            verifier,
            policy: RwLock::new(policy),
            room_locks: RoomLocks::default(),
            delivery: Delivery::default(),
            transport,
            live: tokio::sync::broadcast::channel(LIVE_EVENTS_BUFFERED).0,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            unverified_audit: Mutex::default(),
        }))
    }

    /// First-start behaviour of SPEC §12: a signing key (unless disabled)
    /// and the first admin, whose token goes to `<data_dir>/admin-token`.
    pub fn first_start(&self) -> Result<()> {
        if self.config.federation.generate_key_on_start && !self.keys.has_key() {
            let rec = self.keys.generate(self.clock.now_ms())?;
            tracing::info!(key_id = %rec.key_id, "generated the federation signing key");
        }
        let admin = LocalId::parse("admin")?;
        if self.participant(&admin)?.is_none() {
            let token = self.create_participant(&admin, "Admin", PowerLevel::Admin)?;
            let path = self.admin_token_path();
            crate::tls::write_private(&path, format!("{token}\n").as_bytes())?;
            tracing::info!(path = %path.display(), "wrote the first admin token (mode 0600)");
        }
        Ok(())
    }

    /// Whether any live stream is open: without one, nobody needs the
    /// wire form of stored events built for [`App::publish`].
    pub fn has_live_listeners(&self) -> bool {
        self.live.receiver_count() > 0
    }

    /// Tell live streams about stored events (after their commit).
    pub fn publish(&self, events: impl IntoIterator<Item = (String, u64, Vec<u8>)>) {
        for (room_id, seq, wire) in events {
            // No receivers is fine: nobody is listening.
            let _ = self.live.send(LiveEvent {
                room_id,
                seq,
                wire: Arc::new(wire),
            });
        }
    }

    pub fn admin_token_path(&self) -> PathBuf {
        self.config.data_dir.join(ADMIN_TOKEN_FILE)
    }

    pub fn fqid(&self, local: &LocalId) -> Fqid {
        Fqid::new(local, &self.server_name)
    }

    pub fn is_local(&self, fqid: &Fqid) -> bool {
        fqid.server() == self.server_name
    }

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

    /// [`App::admit`] for an origin a request only claims (SPEC §4 step 5
    /// comes before the signature): audited as unverified, and rated.
    pub fn admit_claimed(&self, claimed: &ServerName) -> Result<()> {
        self.policy().admit(claimed).inspect_err(|e| {
            tracing::warn!(name: "federation.policy_rejected", peer = %claimed, code = %e.code, "federation.policy_rejected (unverified origin)");
            self.audit_unverified("federation.policy_rejected", Some(claimed), e.code, &e.message);
        })
    }

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

    /// [`App::s2s`] for an answer that may be up to `reply_bytes_max`.
    pub async fn s2s_reading(
        &self,
        method: http::Method,
        dest: &ServerName,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        timeout: std::time::Duration,
        reply_bytes_max: usize,
    ) -> Result<std::result::Result<Reply, NetworkError>> {
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

    // --- participants and tokens ---

    pub fn participant(&self, local: &LocalId) -> Result<Option<Participant>> {
        self.store.get(T::Participants, local.as_str().as_bytes())
    }

    /// Create a participant and its first token (returned once, stored hashed).
    pub fn create_participant(
        &self,
        local: &LocalId,
        display_name: &str,
        power: PowerLevel,
    ) -> Result<String> {
        if self.participant(local)?.is_some() {
            return Err(Error::new(
                Code::Conflict,
                format!(
                    "participant {} already exists; pick another local_id",
                    self.fqid(local)
                ),
            ));
        }
        let p = Participant {
            local_id: local.to_string(),
            display_name: display_name.to_string(),
            power_level: power,
            presence: Presence {
                status: PresenceStatus::Offline,
                status_msg: None,
            },
            created_at_ms: self.clock.now_ms(),
        };
        let (token, hash) = new_token();
        let mut w = crate::storage::WriteSet::default();
        w.put(T::Participants, local.as_str().as_bytes().to_vec(), &p)?;
        w.put(T::Tokens, hash.to_vec(), &local.to_string())?;
        self.store.commit(&w)?;
        self.store.flush_blocking()?;
        Ok(token)
    }

    /// The participant a bearer token belongs to.
    pub fn authenticate(&self, token: &str) -> Result<Participant> {
        let unauth = || {
            Error::new(
                Code::Unauthenticated,
                "missing or unknown bearer token; send Authorization: Bearer <token>",
            )
        };
        let local: String = self
            .store
            .get(T::Tokens, &token_hash(token))?
            .ok_or_else(unauth)?;
        self.store
            .get(T::Participants, local.as_bytes())?
            .ok_or_else(unauth)
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
        self.audit_many(vec![
            self.audit_row(action, peer, event_id, room_id, code, detail)
        ]);
    }

    pub fn audit_row(
        &self,
        action: &str,
        peer: Option<&ServerName>,
        event_id: Option<&str>,
        room_id: Option<&str>,
        code: Option<Code>,
        detail: &str,
    ) -> AuditRow {
        AuditRow {
            at_ms: self.clock.now_ms(),
            action: action.to_string(),
            peer: peer.map(|p| p.to_string()),
            event_id: event_id.map(str::to_string),
            room_id: room_id.map(str::to_string),
            code: code.map(|c| c.as_str().to_string()),
            detail: audit_detail(detail),
            unverified: false,
        }
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
        let mut row = self.audit_row(action, claimed, None, None, Some(code), &detail);
        row.unverified = true;
        self.audit_many(vec![row]);
    }

    /// Write audit rows in one batch. Audit rows are a log, not state: they
    /// ride on the next flush rather than costing one of their own.
    pub fn audit_many(&self, rows: Vec<AuditRow>) {
        let keyed: Result<Vec<(Vec<u8>, AuditRow)>> = rows
            .into_iter()
            .map(|row| Ok((keys::audit(row.at_ms, self.store.generate_id()?), row)))
            .collect();
        if let Err(e) = keyed.and_then(|items| self.store.put_many(T::Audit, &items)) {
            tracing::error!(error = %e, "could not write audit rows");
        }
    }

    /// Drop audit rows older than `audit.retention`; answers how many.
    pub fn prune_audit(&self) -> Result<usize> {
        let cutoff = self.clock.now_ms() - self.config.audit.retention.as_millis() as i64;
        if cutoff <= 0 {
            return Ok(0);
        }
        self.store
            .remove_range(T::Audit, &[], &keys::audit(cutoff, 0))
    }

    pub fn peer_record(&self, peer: &ServerName) -> Result<PeerRecord> {
        Ok(self
            .store
            .get(T::Peers, peer.as_str().as_bytes())?
            .unwrap_or_default())
    }

    /// Update a peer's row. Peer rows are statistics: a lost update under a
    /// race costs a counter tick, never an event, so no transaction.
    pub fn update_peer(&self, peer: &ServerName, f: impl FnOnce(&mut PeerRecord)) {
        let r = self.peer_record(peer).and_then(|mut rec| {
            f(&mut rec);
            self.store.put(T::Peers, peer.as_str().as_bytes(), &rec)
        });
        if let Err(e) = r {
            tracing::error!(error = %e, peer = %peer, "could not update a peer row");
        }
    }

    pub fn peer_success(&self, peer: &ServerName, sent: u64, received: u64) {
        let now = self.clock.now_ms();
        let versions = self.verifier.protocol_versions(peer);
        self.update_peer(peer, |r| {
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
        self.update_peer(peer, |r| {
            r.last_error = Some(PeerError {
                code: code.to_string(),
                message: message.to_string(),
                at_ms: now,
            });
        });
    }
}

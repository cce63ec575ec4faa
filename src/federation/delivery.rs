//! Outbound delivery (SPEC §11): a durable FIFO queue per peer in the
//! `outbox` tree, drained by one task per peer that has work.
//!
//! Handlers only enqueue (in the same transaction that stores the event)
//! and [`Delivery::wake`] the peer's task. The task owns that peer's backoff
//! state: nobody else writes it. A crash between a send and the delete of
//! the delivered rows re-sends the same transaction, which receivers answer
//! as `duplicate`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;

use crate::app::App;
use crate::error::{Code, Result};
use crate::ids::{RoomId, ServerName};
use crate::limits::{DELIVERY_TIMEOUT_SECS, EVENTS_PER_TRANSACTION_MAX};
use crate::protocol::event::Event;
use crate::protocol::wire::{SendAnswer, SendStatus};
use crate::storage::{self, keys, OutboxItem, OutboxKind, WriteSet, T};

/// Add `event` (in wire form) to `peer`'s queue inside the caller's write set.
pub fn enqueue_event(
    app: &App,
    w: &mut WriteSet,
    peer: &ServerName,
    event: &Event,
    wire: Vec<u8>,
    now_ms: i64,
) -> Result<()> {
    let id = app.store.generate_id()?;
    w.put(
        T::Outbox,
        keys::outbox(peer.as_str(), id),
        &OutboxItem {
            queued_at_ms: now_ms,
            kind: OutboxKind::Event {
                room_id: event.room_id.to_string(),
                event_id: event.event_id.to_string(),
                origin: event.origin.to_string(),
                wire,
            },
        },
    )
}

struct PeerSignals {
    /// New rows (or EDUs) were queued.
    queued: Notify,
    /// The peer talked to us: if we are backing off, try again now.
    inbound: Notify,
    /// When the task will try again (ms), 0 when it is not backing off.
    next_retry_at_ms: AtomicI64,
    /// Presence EDUs waiting for this peer: latest per sender, kept in memory
    /// only (they are ephemeral) and dropped after [`EDU_TTL_MS`].
    edus: Mutex<BTreeMap<String, (i64, serde_json::Value)>>,
}

/// A presence update older than this is not worth delivering any more.
pub const EDU_TTL_MS: i64 = 5 * 60 * 1000;

/// How a transaction reaches a peer. Production uses signed HTTPS; tests
/// of the delivery loop script the answers and drive time.
pub trait Transport: Send + Sync {
    fn send<'a>(
        &'a self,
        app: &'a App,
        peer: &'a ServerName,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Attempt>;
}

/// Signed HTTPS `POST /send` through [`crate::federation::client::Outbound`].
pub struct HttpsTransport;

impl Transport for HttpsTransport {
    fn send<'a>(
        &'a self,
        app: &'a App,
        peer: &'a ServerName,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Attempt> {
        Box::pin(async move {
            let timeout = Duration::from_secs(DELIVERY_TIMEOUT_SECS);
            match app
                .s2s(
                    http::Method::POST,
                    peer,
                    "/_scaiwave/federation/v1/send",
                    Some(body),
                    timeout,
                )
                .await
            {
                Ok(reply) => classify(reply),
                // We cannot sign (no key yet): retry, an admin may generate one.
                Err(e) => Attempt::Retry {
                    code: e.code.as_str().into(),
                    message: e.message,
                    retry_after_secs: None,
                },
            }
        })
    }
}

#[derive(Default)]
pub struct Delivery {
    app: OnceLock<Weak<App>>,
    peers: Mutex<HashMap<ServerName, Arc<PeerSignals>>>,
}

/// What one attempt to send a transaction came to.
#[derive(Debug)]
pub enum Attempt {
    /// The peer answered 200 with one result per event.
    Answered(SendAnswer),
    /// Try again later (network, 5xx, 408, 429, signature or unknown peer).
    Retry {
        code: String,
        message: String,
        retry_after_secs: Option<u64>,
    },
    /// The peer refused the whole transaction for good.
    Refused { code: String, message: String },
}

impl Delivery {
    /// Give the delivery loop its handle on the app and start a task for
    /// every peer that already has queued rows (work left from a previous run).
    pub fn start(&self, app: &Arc<App>) -> Result<()> {
        let _ = self.app.set(Arc::downgrade(app));
        let mut peers = Vec::new();
        for item in app.store.tree(T::Outbox).iter().keys() {
            let k = item.map_err(|e| crate::error::Error::internal("outbox scan", e))?;
            let name = k.split(|b| *b == 0).next().unwrap_or_default();
            if let Ok(peer) = ServerName::parse(&String::from_utf8_lossy(name)) {
                if peers.last() != Some(&peer) {
                    peers.push(peer);
                }
            }
        }
        for peer in peers {
            self.wake(app, &peer);
        }
        Ok(())
    }

    /// The app itself, for work spawned from code that only holds `&App`.
    pub fn app_handle(&self) -> Option<Arc<App>> {
        self.app.get().and_then(Weak::upgrade)
    }

    fn signals(&self, app: &App, peer: &ServerName) -> Arc<PeerSignals> {
        let mut map = self.peers.lock().expect("delivery map lock");
        if let Some(s) = map.get(peer) {
            return s.clone();
        }
        let s = Arc::new(PeerSignals {
            queued: Notify::new(),
            inbound: Notify::new(),
            next_retry_at_ms: AtomicI64::new(0),
            edus: Mutex::new(BTreeMap::new()),
        });
        map.insert(peer.clone(), s.clone());
        if let Some(app_arc) = self.app.get().and_then(Weak::upgrade) {
            let (peer, signals) = (peer.clone(), s.clone());
            app.tasks.spawn(run_peer(app_arc, peer, signals));
        }
        s
    }

    /// New rows are queued for `peer`.
    pub fn wake(&self, app: &App, peer: &ServerName) {
        self.signals(app, peer).queued.notify_one();
    }

    /// Queue a presence EDU for `peer`, replacing an older one of the same sender.
    pub fn queue_edu(&self, app: &App, peer: &ServerName, sender: &str, edu: serde_json::Value) {
        let s = self.signals(app, peer);
        s.edus
            .lock()
            .expect("edu lock")
            .insert(sender.to_string(), (app.clock.now_ms(), edu));
        s.queued.notify_one();
    }

    /// When `peer`'s task will try again, if it is backing off.
    pub fn next_retry_at_ms(&self, peer: &ServerName) -> Option<i64> {
        let map = self.peers.lock().expect("delivery map lock");
        map.get(peer)
            .map(|s| s.next_retry_at_ms.load(Ordering::Relaxed))
            .filter(|t| *t > 0)
    }

    /// `peer` just talked to us: cut its backoff short.
    pub fn peer_is_back(&self, app: &App, peer: &ServerName) {
        let known = self
            .peers
            .lock()
            .expect("delivery map lock")
            .get(peer)
            .cloned();
        if let Some(s) = known {
            s.inbound.notify_one();
        } else if app
            .store
            .count_prefix(T::Outbox, &storage::prefix(peer.as_str()))
            > 0
        {
            self.wake(app, peer);
        }
    }
}

/// Backoff before attempt `failures + 1`: `initial · 2^(failures-1)`, capped,
/// with jitter in [½, 1] of that so peers that failed together spread out.
pub fn backoff(initial: Duration, max: Duration, failures: u32, jitter: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let base = initial.saturating_mul(1u32 << exp).min(max);
    base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// A peer's `Retry-After`, clamped to `[0, retry_max_interval]`: a peer
/// can slow us down as far as our own backoff would, never further, and a
/// huge value cannot overflow into a negative delay (a hot retry loop).
pub fn retry_after(secs: Option<u64>, retry_max_interval: Duration) -> Duration {
    Duration::from_secs(secs.unwrap_or(0)).min(retry_max_interval)
}

/// Classify a transport result by SPEC §10's retry classes.
pub fn classify(
    reply: std::result::Result<
        crate::federation::client::Reply,
        crate::federation::client::NetworkError,
    >,
) -> Attempt {
    let reply = match reply {
        Ok(r) => r,
        Err(e) => {
            return Attempt::Retry {
                code: "network".into(),
                message: e.0,
                retry_after_secs: None,
            }
        }
    };
    if reply.status == 200 {
        return match reply.json::<SendAnswer>() {
            Ok(a) => Attempt::Answered(a),
            Err(e) => Attempt::Retry {
                code: "bad_answer".into(),
                message: e,
                retry_after_secs: None,
            },
        };
    }
    let err = reply.error();
    let code = err
        .as_ref()
        .map(|e| e.code.clone())
        .unwrap_or_else(|| format!("http_{}", reply.status));
    let message = err
        .map(|e| e.message)
        .unwrap_or_else(|| format!("HTTP {}", reply.status));
    let retry = reply.status >= 500
        || reply.status == 408
        || reply.status == 429
        || Code::parse(&code)
            .is_some_and(|c| matches!(c, Code::SignatureMismatch | Code::PeerUnknown));
    if retry {
        Attempt::Retry {
            code,
            message,
            retry_after_secs: reply.retry_after_secs,
        }
    } else {
        Attempt::Refused { code, message }
    }
}

fn transaction_body(items: &[(Vec<u8>, OutboxItem)], edus: Vec<serde_json::Value>) -> Vec<u8> {
    // The ids of the first and last row name the transaction: a re-send of
    // the same rows after a crash is the same transaction.
    let txn_id = match (items.first(), items.last()) {
        (Some(first), Some(last)) => format!(
            "{:x}-{:x}",
            keys::trailing_u64(&first.0),
            keys::trailing_u64(&last.0)
        ),
        _ => format!("edu-{}", uuid::Uuid::now_v7()),
    };
    // Queued events are already JSON in wire form: splice them in as they
    // are instead of parsing and re-serialising each one.
    let mut body =
        Vec::with_capacity(items.iter().map(|(_, it)| it.wire_len() + 1).sum::<usize>() + 128);
    body.extend_from_slice(b"{\"txn_id\":");
    body.extend_from_slice(&serde_json::to_vec(&txn_id).unwrap_or_default());
    body.extend_from_slice(b",\"events\":[");
    for (i, (_, it)) in items.iter().enumerate() {
        let OutboxKind::Event { wire, .. } = &it.kind;
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(wire);
    }
    body.extend_from_slice(b"],\"edus\":");
    body.extend_from_slice(&serde_json::to_vec(&edus).unwrap_or_default());
    body.push(b'}');
    body
}

/// Drop a queued item for good: audit it, log it, and mark our own event failed.
async fn give_up(
    app: &App,
    peer: &ServerName,
    key: &[u8],
    item: &OutboxItem,
    code: &str,
    why: &str,
) {
    let OutboxKind::Event {
        room_id,
        event_id,
        origin,
        ..
    } = &item.kind;
    tracing::warn!(name: "federation.send.failed", peer = %peer, event_id = %event_id, room_id = %room_id, code, "federation.send.failed: {why}");
    app.audit(
        "federation.send.failed",
        Some(peer),
        Some(event_id),
        Some(room_id),
        Code::parse(code),
        &format!("{code}: {why}"),
    );
    app.peer_failure(peer, code, why);
    if let Err(e) = app.store.remove(T::Outbox, key) {
        tracing::error!(error = %e, "could not drop a given-up outbox row");
    }
    if *origin == app.server_name.as_str() {
        if let Ok(room) = RoomId::parse(room_id) {
            if room.host() != app.server_name {
                if let Err(e) = crate::rooms::replica::fail(app, &room, event_id).await {
                    tracing::error!(error = %e, "could not mark an event failed");
                }
            }
        }
    }
}

/// Apply a 200 answer: settle delivered rows, give up refused ones, keep
/// the retryable ones (and any the answer forgot) queued. Returns how many
/// were delivered and how many rows left the queue in all.
async fn apply_answer(
    app: &App,
    peer: &ServerName,
    items: &[(Vec<u8>, OutboxItem)],
    answer: &SendAnswer,
) -> Result<(u64, u64)> {
    let mut delivered = Vec::new();
    let mut given_up = 0u64;
    let by_id: HashMap<&str, &crate::protocol::wire::SendResult> = answer
        .results
        .iter()
        .map(|r| (r.event_id.as_str(), r))
        .collect();
    for (key, item) in items {
        let OutboxKind::Event {
            event_id,
            wire,
            room_id,
            ..
        } = &item.kind;
        let Some(result) = by_id.get(event_id.as_str()) else {
            continue;
        };
        match result.status {
            SendStatus::Accepted | SendStatus::Duplicate => {
                let ours_to_host = RoomId::parse(room_id).is_ok_and(|r| r.host() == *peer);
                if let (true, Some(seq)) = (ours_to_host, result.seq) {
                    if let Ok((event, _)) = Event::parse(wire) {
                        // A seq conflict marks the event failed; either way
                        // the row has left the queue.
                        crate::rooms::replica::settle(app, &event, seq).await?;
                    }
                }
                delivered.push(key.clone());
            }
            SendStatus::Rejected => {
                let err = result.error.clone();
                let retryable = err.as_ref().is_some_and(|e| e.retryable);
                if !retryable {
                    let (code, msg) = err
                        .map(|e| (e.code, e.message))
                        .unwrap_or_else(|| ("unknown".into(), "rejected".into()));
                    give_up(app, peer, key, item, &code, &msg).await;
                    given_up += 1;
                }
            }
        }
    }
    let count = delivered.len() as u64;
    app.store.remove_all(T::Outbox, &delivered)?;
    Ok((count, count + given_up))
}

/// Transactions in flight at once to one peer, when the order of arrival
/// cannot matter (every event carries the `seq` we gave it as host).
/// Measured on 2 cores draining a backlog to one peer: 3 left the cores
/// idle between answers (8 400 events/s), 8 keeps them busy (9 500 – 11 000
/// in the same series); 12 was no faster, only each request slower.
pub const PIPELINE_DEPTH: usize = 8;

/// What one round of sending came to.
#[derive(Default)]
struct Round {
    /// A transaction came back with only retryable per-event refusals.
    stuck: bool,
    /// The last retryable failure, with its Retry-After.
    retry: Option<(String, String, Option<u64>)>,
}

type Rows = Vec<(Vec<u8>, OutboxItem)>;

/// Rows that can travel in parallel transactions: events of rooms we host
/// carry their `seq`, so the receiver orders them whatever comes first.
/// Our own events to another host are sequenced by arrival: one at a time.
fn parallel_safe(app: &App, item: &OutboxItem) -> bool {
    match &item.kind {
        OutboxKind::Event { room_id, .. } => {
            RoomId::parse(room_id).is_ok_and(|r| r.host() == app.server_name)
        }
    }
}

/// The queue as the sending window sees it: rows read but not yet handed
/// to a transaction, and where to read on from.
struct Feed {
    pending: std::collections::VecDeque<(Vec<u8>, OutboxItem)>,
    /// Key of the last row read; rows after it are not read yet.
    cursor: Option<Vec<u8>>,
    /// Whether reading on may give more rows for parallel transactions.
    more: bool,
    /// The round's time, and the age at which rows are given up: older
    /// rows are left for the outer loop.
    now: i64,
    max_age_ms: i64,
}

impl Feed {
    /// The next transaction's rows: at most [`EVENTS_PER_TRANSACTION_MAX`],
    /// read on from the queue (parallel-safe, not yet aged rows only; the
    /// outer loop handles the others from the head).
    fn next_chunk(&mut self, app: &App, peer: &ServerName) -> Rows {
        let step = EVENTS_PER_TRANSACTION_MAX;
        if self.pending.len() < step && self.more {
            if let Some(cursor) = &self.cursor {
                let read = app.store.scan_after::<OutboxItem>(
                    T::Outbox,
                    &storage::prefix(peer.as_str()),
                    cursor,
                    step,
                );
                match read {
                    Ok(rows) => {
                        for (k, it) in rows {
                            let aged = self.now - it.queued_at_ms >= self.max_age_ms;
                            if aged || !parallel_safe(app, &it) {
                                self.more = false;
                                break;
                            }
                            self.cursor = Some(k.clone());
                            self.pending.push_back((k, it));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, peer = %peer, "cannot read the outbox");
                        self.more = false;
                    }
                }
            }
        }
        let n = self.pending.len().min(step);
        self.pending.drain(..n).collect()
    }
}

/// Send what the queue holds. Events we host go through a window of
/// [`PIPELINE_DEPTH`] transactions kept full while the peer keeps up (a
/// completed one is replaced at once, so neither side waits for the
/// other); anything else, or a probe while backing off, is one
/// transaction. The first retryable failure stops the window.
async fn send_round(
    app: &App,
    peer: &ServerName,
    signals: &PeerSignals,
    mut feed: Feed,
    edus: Vec<serde_json::Value>,
    probing: bool,
) -> Round {
    let now = feed.now;
    // We never send to a server our policy refuses (SPEC §7): its rows
    // wait (an admin may change the policy) until they age out.
    if let Err(e) = app.policy().admit(peer) {
        app.peer_failure(peer, e.code.as_str(), &e.message);
        return Round {
            retry: Some((e.code.as_str().to_string(), e.message, None)),
            ..Round::default()
        };
    }
    let parallel = !probing
        && !feed.pending.is_empty()
        && feed.pending.iter().all(|(_, it)| parallel_safe(app, it));
    let depth = if parallel { PIPELINE_DEPTH } else { 1 };
    feed.more = parallel;
    let launch = |rows: Rows, edus: Vec<serde_json::Value>| async move {
        let started = tokio::time::Instant::now();
        // The rows were read before this point; a commit that wrote them
        // may not have flushed yet, and nothing leaves before it is durable.
        let attempt = match app.store.make_reads_durable().await {
            Ok(()) => {
                app.transport
                    .send(app, peer, transaction_body(&rows, edus))
                    .await
            }
            Err(e) => Attempt::Retry {
                code: e.code.as_str().into(),
                message: e.message,
                retry_after_secs: None,
            },
        };
        (rows, attempt, started)
    };
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    // EDUs ride on the first transaction, which goes even without events.
    in_flight.push(launch(feed.next_chunk(app, peer), edus));
    let mut round = Round::default();
    loop {
        while parallel && round.retry.is_none() && !round.stuck && in_flight.len() < depth {
            let rows = feed.next_chunk(app, peer);
            if rows.is_empty() || app.shutdown.is_cancelled() {
                break;
            }
            in_flight.push(launch(rows, Vec::new()));
        }
        let Some((part, attempt, started)) = in_flight.next().await else {
            return round;
        };
        match attempt {
            Attempt::Answered(answer) => {
                signals
                    .edus
                    .lock()
                    .expect("edu lock")
                    .retain(|_, (at, _)| *at > now);
                match apply_answer(app, peer, &part, &answer).await {
                    Ok((delivered, left_queue)) => {
                        // Nothing left the queue (only retryable refusals, or
                        // an answer without our events): back off, never spin.
                        round.stuck |= left_queue == 0 && !part.is_empty();
                        if delivered > 0 {
                            let total_ms = started.elapsed().as_secs_f64() * 1000.0;
                            tracing::info!(name: "federation.send.success", peer = %peer, events = delivered, total_ms, "federation.send.success");
                            app.peer_success(peer, delivered, 0);
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, peer = %peer, "could not record a delivery");
                        round.retry = Some(("internal".into(), e.message, None));
                    }
                }
            }
            Attempt::Retry {
                code,
                message,
                retry_after_secs,
            } => {
                app.peer_failure(peer, &code, &message);
                round.retry = Some((code, message, retry_after_secs));
            }
            Attempt::Refused { code, message } => {
                app.peer_failure(peer, &code, &message);
                signals
                    .edus
                    .lock()
                    .expect("edu lock")
                    .retain(|_, (at, _)| *at > now);
                for (k, it) in &part {
                    give_up(app, peer, k, it, &code, &message).await;
                }
            }
        }
    }
}

/// The per-peer loop. Exits on shutdown; queued rows stay for the next run.
async fn run_peer(app: Arc<App>, peer: ServerName, signals: Arc<PeerSignals>) {
    let fed = app.config.federation.clone();
    let max_age_ms = fed.retry_max_age.as_millis() as i64;
    let mut failures: u32 = 0;
    loop {
        if app.shutdown.is_cancelled() {
            return;
        }
        let scan = app.store.scan_limit(
            T::Outbox,
            &storage::prefix(peer.as_str()),
            EVENTS_PER_TRANSACTION_MAX,
        );
        let items: Vec<(Vec<u8>, OutboxItem)> = scan.unwrap_or_else(|e| {
            tracing::error!(error = %e, peer = %peer, "cannot read the outbox");
            Vec::new()
        });
        let now = app.clock.now_ms();
        let edus: Vec<serde_json::Value> = {
            let mut map = signals.edus.lock().expect("edu lock");
            map.retain(|_, (at, _)| now - *at < EDU_TTL_MS);
            map.values().map(|(_, v)| v.clone()).collect()
        };
        if items.is_empty() && edus.is_empty() {
            signals.next_retry_at_ms.store(0, Ordering::Relaxed);
            tokio::select! {
                _ = signals.queued.notified() => continue,
                _ = app.shutdown.cancelled() => return,
            }
        }
        let (aged, live): (Vec<_>, Vec<_>) = items
            .into_iter()
            .partition(|(_, it)| now - it.queued_at_ms >= max_age_ms);
        for (k, it) in &aged {
            give_up(
                &app,
                &peer,
                k,
                it,
                "retry_max_age",
                "undelivered for retry_max_age; dropped from the queue",
            )
            .await;
        }
        if !aged.is_empty() && live.is_empty() {
            continue;
        }
        let oldest_at = live.first().map(|(_, it)| it.queued_at_ms);
        let feed = Feed {
            cursor: live.last().map(|(k, _)| k.clone()),
            pending: live.into(),
            more: false,
            now,
            max_age_ms,
        };
        let round = send_round(&app, &peer, &signals, feed, edus, failures > 0).await;
        let delay = match (&round.retry, round.stuck) {
            (None, false) => {
                failures = 0;
                signals.next_retry_at_ms.store(0, Ordering::Relaxed);
                continue;
            }
            (retry, _) => {
                // A retryable failure, or only retryable refusals left: back off.
                failures = failures.saturating_add(1);
                let d = backoff(
                    fed.retry_initial,
                    fed.retry_max_interval,
                    failures,
                    rand::rng().random(),
                );
                if let Some((code, message, _)) = retry {
                    tracing::warn!(peer = %peer, code = %code, attempt = failures, "delivery failed, will retry: {message}");
                }
                d.max(retry_after(
                    retry.as_ref().and_then(|r| r.2),
                    fed.retry_max_interval,
                ))
            }
        };
        // Wake at the retry time, or when the oldest row reaches its
        // give-up age if that comes first (so give-up happens on time).
        let now = app.clock.now_ms();
        let mut wake_at = now + delay.as_millis() as i64;
        if let Some(oldest_at) = oldest_at {
            wake_at = wake_at.min(oldest_at + max_age_ms);
        }
        signals.next_retry_at_ms.store(wake_at, Ordering::Relaxed);
        tokio::select! {
            _ = app.clock.sleep_until_ms(wake_at) => {}
            _ = signals.inbound.notified() => {}
            _ = app.shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(
        status: u16,
        code: Option<&str>,
        retry_after: Option<u64>,
    ) -> std::result::Result<
        crate::federation::client::Reply,
        crate::federation::client::NetworkError,
    > {
        let body = code
            .map(|c| {
                serde_json::to_vec(
                    &crate::error::Error::new(Code::parse(c).unwrap(), "x").to_body(),
                )
                .unwrap()
            })
            .unwrap_or_default();
        Ok(crate::federation::client::Reply {
            status,
            retry_after_secs: retry_after,
            date_secs: None,
            max_age_secs: None,
            body: body.into(),
        })
    }

    #[test]
    fn retry_classes_follow_spec_section_10() {
        let retry = |r| matches!(classify(r), Attempt::Retry { .. });
        assert!(retry(Err(crate::federation::client::NetworkError(
            "refused".into()
        ))));
        assert!(retry(reply(500, None, None)));
        assert!(retry(reply(503, Some("SW_FED_NO_KEY"), None)));
        assert!(retry(reply(408, None, None)));
        assert!(retry(reply(401, Some("SW_FED_SIGNATURE_MISMATCH"), None)));
        assert!(retry(reply(403, Some("SW_FED_PEER_UNKNOWN"), None)));
        match classify(reply(429, Some("SW_FED_RATE_LIMITED"), Some(30))) {
            Attempt::Retry {
                retry_after_secs, ..
            } => assert_eq!(retry_after_secs, Some(30)),
            other => panic!("{other:?}"),
        }
        for (status, code) in [
            (403, "SW_FED_POLICY_REJECTED"),
            (400, "SW_FED_BAD_REQUEST"),
            (421, "SW_FED_WRONG_DESTINATION"),
            (403, "SW_FED_TENANT_DISABLED"),
        ] {
            assert!(
                matches!(
                    classify(reply(status, Some(code), None)),
                    Attempt::Refused { .. }
                ),
                "{code}"
            );
        }
        assert!(matches!(
            classify(reply(404, None, None)),
            Attempt::Refused { .. }
        ));
    }

    #[test]
    fn retry_after_is_clamped_to_the_backoff_cap() {
        let max = Duration::from_secs(3600);
        assert_eq!(retry_after(None, max), Duration::ZERO);
        assert_eq!(retry_after(Some(30), max), Duration::from_secs(30));
        assert_eq!(retry_after(Some(u64::MAX), max), max);
        // The delay becomes a wake-up time in milliseconds: it must stay positive.
        assert!(retry_after(Some(u64::MAX), max).as_millis() as i64 > 0);
    }

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let (i, m) = (Duration::from_secs(2), Duration::from_secs(3600));
        assert_eq!(backoff(i, m, 1, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(i, m, 2, 1.0), Duration::from_secs(4));
        assert_eq!(backoff(i, m, 5, 1.0), Duration::from_secs(32));
        assert_eq!(backoff(i, m, 40, 1.0), m);
        assert_eq!(backoff(i, m, 3, 0.0), Duration::from_secs(4));
    }
}

//! Outbound delivery (SPEC §11): the durable FIFO queue of each peer (the
//! `outbox` rows of storage), drained by one task per peer that has work.
//!
//! Handlers only enqueue (in the same transaction that stores the event)
//! and ring the peer's doorbell (`federation::outbox`); [`Delivery::run`]
//! starts the peer's task on its first ring. The task owns that peer's
//! backoff state: nobody else writes it. A crash between a send and the
//! delete of the delivered rows re-sends the same transaction, which
//! receivers answer as `duplicate`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use rand::Rng;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{Code, Result};
use crate::federation::outbox::{NewPeers, PeerSignals};
use crate::federation::peer_api::{self, Attempt};
use crate::federation::Federation;
use crate::ids::{RoomId, ServerName};
use crate::limits::{EDU_TTL_MS, EVENTS_PER_TRANSACTION_MAX, PIPELINE_DEPTH};
use crate::protocol::event::Event;
use crate::protocol::wire::{SendAnswer, SendStatus};
use crate::rooms::Rooms;
use crate::storage::{self, keys, OutboxItem, OutboxKind, T};

/// How a transaction reaches a peer. Production uses signed HTTPS; tests
/// of the delivery loop script the answers and drive time.
pub trait Transport: Send + Sync {
    fn send<'a>(
        &'a self,
        fed: &'a Federation,
        peer: &'a ServerName,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Attempt>;
}

/// Signed HTTPS `POST /send` ([`peer_api::send_transaction`]).
pub struct HttpsTransport;

impl Transport for HttpsTransport {
    fn send<'a>(
        &'a self,
        fed: &'a Federation,
        peer: &'a ServerName,
        body: Vec<u8>,
    ) -> BoxFuture<'a, Attempt> {
        Box::pin(peer_api::send_transaction(fed, peer, body))
    }
}

/// The delivery worker of one server: what its peer tasks need.
pub struct Delivery {
    rooms: Arc<Rooms>,
    transport: Arc<dyn Transport>,
    shutdown: CancellationToken,
}

impl Delivery {
    pub fn new(
        rooms: Arc<Rooms>,
        transport: Arc<dyn Transport>,
        shutdown: CancellationToken,
    ) -> Arc<Delivery> {
        Arc::new(Delivery {
            rooms,
            transport,
            shutdown,
        })
    }

    /// Start a task for every peer that already has queued rows (work
    /// left from a previous run), then one for each peer rung for the
    /// first time, on `tasks`, until shutdown.
    pub async fn run(self: Arc<Self>, mut new_peers: NewPeers, tasks: TaskTracker) {
        match self.rooms.store.outbox_peers() {
            Ok(peers) => {
                for peer in peers {
                    self.rooms.fed.outbox.wake(&peer);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the outbox"),
        }
        loop {
            let (peer, signals) = tokio::select! {
                p = new_peers.recv() => match p { Some(p) => p, None => return },
                _ = self.shutdown.cancelled() => return,
            };
            tasks.spawn(run_peer(self.clone(), peer, signals));
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
    delivery: &Delivery,
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
    delivery.rooms.fed.audit(
        "federation.send.failed",
        Some(peer),
        Some(event_id),
        Some(room_id),
        Code::parse(code),
        &format!("{code}: {why}"),
    );
    delivery.rooms.fed.peer_failure(peer, code, why);
    if let Err(e) = delivery.rooms.store.remove(T::Outbox, key) {
        tracing::error!(error = %e, "could not drop a given-up outbox row");
    }
    if *origin == delivery.rooms.server_name.as_str() {
        if let Ok(room) = RoomId::parse(room_id) {
            if room.host() != delivery.rooms.server_name {
                if let Err(e) = crate::rooms::replica::fail(&delivery.rooms, &room, event_id).await
                {
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
    delivery: &Delivery,
    peer: &ServerName,
    items: &[(Vec<u8>, OutboxItem)],
    answer: &SendAnswer,
) -> Result<(u64, u64)> {
    let mut delivered = Vec::new();
    let mut queued_at = Vec::new();
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
                        crate::rooms::replica::settle(&delivery.rooms, &event, seq).await?;
                    }
                }
                delivered.push(key.clone());
                queued_at.push(item.queued_at_ms);
            }
            SendStatus::Rejected => {
                let err = result.error.clone();
                let retryable = err.as_ref().is_some_and(|e| e.retryable);
                if !retryable {
                    let (code, msg) = err
                        .map(|e| (e.code, e.message))
                        .unwrap_or_else(|| ("unknown".into(), "rejected".into()));
                    give_up(delivery, peer, key, item, &code, &msg).await;
                    given_up += 1;
                }
            }
        }
    }
    let count = delivered.len() as u64;
    delivery.rooms.store.remove_all(T::Outbox, &delivered)?;
    // Enqueue → acknowledged, per event (SPEC §16); clocks never run
    // backwards here, but a negative age would be clamped, not wrapped.
    let now = delivery.rooms.clock.now_ms();
    delivery.rooms.fed.metrics.events_sent(
        peer.as_str(),
        queued_at
            .iter()
            .map(|at| std::time::Duration::from_millis((now - at).max(0) as u64)),
    );
    Ok((count, count + given_up))
}

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
fn parallel_safe(delivery: &Delivery, item: &OutboxItem) -> bool {
    match &item.kind {
        OutboxKind::Event { room_id, .. } => {
            RoomId::parse(room_id).is_ok_and(|r| r.host() == delivery.rooms.server_name)
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
    fn next_chunk(&mut self, delivery: &Delivery, peer: &ServerName) -> Rows {
        let step = EVENTS_PER_TRANSACTION_MAX;
        if self.pending.len() < step && self.more {
            if let Some(cursor) = &self.cursor {
                let read = delivery.rooms.store.scan_after::<OutboxItem>(
                    T::Outbox,
                    &storage::prefix(peer.as_str()),
                    cursor,
                    step,
                );
                match read {
                    Ok(rows) => {
                        for (k, it) in rows {
                            let aged = self.now - it.queued_at_ms >= self.max_age_ms;
                            if aged || !parallel_safe(delivery, &it) {
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
    delivery: &Delivery,
    peer: &ServerName,
    signals: &PeerSignals,
    mut feed: Feed,
    edus: Vec<serde_json::Value>,
    probing: bool,
) -> Round {
    let now = feed.now;
    // We never send to a server our policy refuses (SPEC §7): its rows
    // wait (an admin may change the policy) until they age out.
    if let Err(e) = delivery.rooms.fed.policy().admit(peer) {
        delivery
            .rooms
            .fed
            .peer_failure(peer, e.code.as_str(), &e.message);
        return Round {
            retry: Some((e.code.as_str().to_string(), e.message, None)),
            ..Round::default()
        };
    }
    let parallel = !probing
        && !feed.pending.is_empty()
        && feed
            .pending
            .iter()
            .all(|(_, it)| parallel_safe(delivery, it));
    let depth = if parallel { PIPELINE_DEPTH } else { 1 };
    feed.more = parallel;
    let launch = |rows: Rows, edus: Vec<serde_json::Value>| async move {
        let started = tokio::time::Instant::now();
        // The rows were read before this point; a commit that wrote them
        // may not have flushed yet, and nothing leaves before it is durable.
        let attempt = match delivery.rooms.store.make_reads_durable().await {
            Ok(()) => {
                delivery
                    .transport
                    .send(&delivery.rooms.fed, peer, transaction_body(&rows, edus))
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
    in_flight.push(launch(feed.next_chunk(delivery, peer), edus));
    let mut round = Round::default();
    loop {
        while parallel && round.retry.is_none() && !round.stuck && in_flight.len() < depth {
            let rows = feed.next_chunk(delivery, peer);
            if rows.is_empty() || delivery.shutdown.is_cancelled() {
                break;
            }
            in_flight.push(launch(rows, Vec::new()));
        }
        let Some(sent) = in_flight.next().await else {
            return round;
        };
        settle_attempt(delivery, peer, signals, now, sent, &mut round).await;
    }
}

/// Take what one transaction came to into the round: delivered rows leave
/// the queue, refused ones are given up, a retryable failure ends the
/// window. EDUs queued before the round went with it once the peer
/// answered (or refused for good).
async fn settle_attempt(
    delivery: &Delivery,
    peer: &ServerName,
    signals: &PeerSignals,
    now: i64,
    (part, attempt, started): (Rows, Attempt, tokio::time::Instant),
    round: &mut Round,
) {
    let edus_sent = || {
        signals
            .edus
            .lock()
            .expect("edu lock")
            .retain(|_, (at, _)| *at > now)
    };
    match attempt {
        Attempt::Answered(answer) => {
            edus_sent();
            match apply_answer(delivery, peer, &part, &answer).await {
                Ok((delivered, left_queue)) => {
                    // Nothing left the queue (only retryable refusals, or
                    // an answer without our events): back off, never spin.
                    round.stuck |= left_queue == 0 && !part.is_empty();
                    if delivered > 0 {
                        let total_ms = started.elapsed().as_secs_f64() * 1000.0;
                        tracing::info!(name: "federation.send.success", peer = %peer, events = delivered, total_ms, "federation.send.success");
                        delivery.rooms.fed.peer_success(peer, delivered, 0);
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
            delivery.rooms.fed.peer_failure(peer, &code, &message);
            round.retry = Some((code, message, retry_after_secs));
        }
        Attempt::Refused { code, message } => {
            delivery.rooms.fed.peer_failure(peer, &code, &message);
            edus_sent();
            for (k, it) in &part {
                give_up(delivery, peer, k, it, &code, &message).await;
            }
        }
    }
}

/// The first transaction's worth of `peer`'s queue (none if it cannot be
/// read: logged, and tried again on the next wake).
fn queue_head(delivery: &Delivery, peer: &ServerName) -> Rows {
    let scan = delivery.rooms.store.scan_limit(
        T::Outbox,
        &storage::prefix(peer.as_str()),
        EVENTS_PER_TRANSACTION_MAX,
    );
    scan.unwrap_or_else(|e| {
        tracing::error!(error = %e, peer = %peer, "cannot read the outbox");
        Vec::new()
    })
}

/// The presence EDUs waiting for the peer, once those past
/// [`EDU_TTL_MS`] are dropped.
fn fresh_edus(signals: &PeerSignals, now: i64) -> Vec<serde_json::Value> {
    let mut map = signals.edus.lock().expect("edu lock");
    map.retain(|_, (at, _)| now - *at < EDU_TTL_MS);
    map.values().map(|(_, v)| v.clone()).collect()
}

/// How long to wait after the `failures`-th failure in a row: the jittered
/// backoff, or the peer's `Retry-After` if that is longer (both capped).
fn retry_delay(
    fed: &crate::config::FederationConfig,
    failures: u32,
    retry_after_secs: Option<u64>,
) -> Duration {
    let d = backoff(
        fed.retry_initial,
        fed.retry_max_interval,
        failures,
        rand::rng().random(),
    );
    d.max(retry_after(retry_after_secs, fed.retry_max_interval))
}

/// The per-peer loop. Exits on shutdown; queued rows stay for the next run.
async fn run_peer(delivery: Arc<Delivery>, peer: ServerName, signals: Arc<PeerSignals>) {
    let fed = delivery.rooms.fed.config.clone();
    let max_age_ms = fed.retry_max_age.as_millis() as i64;
    let mut failures: u32 = 0;
    loop {
        if delivery.shutdown.is_cancelled() {
            return;
        }
        // A tenant with federation off sends nothing (SPEC §14): its rows
        // stay queued, and neither age out nor count as failures, until
        // it is on again.
        if !delivery.rooms.fed.enabled() {
            signals.next_retry_at_ms.store(0, Ordering::Relaxed);
            tokio::select! {
                _ = delivery.rooms.fed.enabled_again() => continue,
                _ = delivery.shutdown.cancelled() => return,
            }
        }
        let items = queue_head(&delivery, &peer);
        let now = delivery.rooms.clock.now_ms();
        let edus = fresh_edus(&signals, now);
        if items.is_empty() && edus.is_empty() {
            signals.next_retry_at_ms.store(0, Ordering::Relaxed);
            tokio::select! {
                _ = signals.queued.notified() => continue,
                _ = delivery.shutdown.cancelled() => return,
            }
        }
        let (aged, live): (Vec<_>, Vec<_>) = items
            .into_iter()
            .partition(|(_, it)| now - it.queued_at_ms >= max_age_ms);
        for (k, it) in &aged {
            give_up(
                &delivery,
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
        let round = send_round(&delivery, &peer, &signals, feed, edus, failures > 0).await;
        let delay = match (&round.retry, round.stuck) {
            (None, false) => {
                failures = 0;
                signals.next_retry_at_ms.store(0, Ordering::Relaxed);
                continue;
            }
            (retry, _) => {
                // A retryable failure, or only retryable refusals left: back off.
                failures = failures.saturating_add(1);
                if let Some((code, message, _)) = retry {
                    tracing::warn!(peer = %peer, code = %code, attempt = failures, "delivery failed, will retry: {message}");
                }
                let retry_after_secs = retry.as_ref().and_then(|r| r.2);
                retry_delay(&fed, failures, retry_after_secs)
            }
        };
        // Wake at the retry time, or when the oldest row reaches its
        // give-up age if that comes first (so give-up happens on time).
        let now = delivery.rooms.clock.now_ms();
        let mut wake_at = now + delay.as_millis() as i64;
        if let Some(oldest_at) = oldest_at {
            wake_at = wake_at.min(oldest_at + max_age_ms);
        }
        signals.next_retry_at_ms.store(wake_at, Ordering::Relaxed);
        tokio::select! {
            _ = delivery.rooms.clock.sleep_until_ms(wake_at) => {}
            _ = signals.inbound.notified() => {}
            _ = delivery.shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! One inbound `/send` transaction (SPEC §8) once §4 authenticated its
//! origin: the envelope, each event parsed and verified on its own, routed
//! to the host sequencer or the replica, EDUs, and the cached answer.

use std::collections::HashMap;

use serde_json::Value;

use crate::error::{Code, Error, Result};
use crate::federation::auth::event_keys;
use crate::ids::{KeyId, ServerName};
use crate::limits::{
    EDUS_PER_TRANSACTION_MAX, EVENTS_PER_TRANSACTION_MAX, ON_EXECUTOR_EVENTS_MAX, TXN_CACHE_SECS,
};
use crate::protocol::canonical;
use crate::protocol::event::{Content, Event, Membership, PresenceEdu};
use crate::protocol::wire::{SendAnswer, SendResult, SendStatus};
use crate::storage::{keys, AuditRow, TxnRecord, T};

use super::host::{self, Source};
use super::{replica, Outcome, Rooms};
use crate::metrics::Outcome as Counted;

/// Run `f` over `items` on the blocking pool, split across the cores:
/// canonicalisation and Ed25519 are CPU work that must not stall the
/// executor threads serving other requests. A few items run where they
/// are: their work is shorter than the hand-off to the pool and back.
async fn on_cores<T, R>(items: Vec<T>, f: fn(T) -> R) -> Result<Vec<R>>
where
    T: Send + 'static,
    R: Send + 'static,
{
    if items.len() <= ON_EXECUTOR_EVENTS_MAX {
        return Ok(items.into_iter().map(f).collect());
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let chunk = items.len().div_ceil(cores).max(1);
    let mut items = items;
    let mut handles = Vec::new();
    while !items.is_empty() {
        let rest = items.split_off(chunk.min(items.len()));
        let part = std::mem::replace(&mut items, rest);
        handles.push(tokio::task::spawn_blocking(move || {
            part.into_iter().map(f).collect::<Vec<R>>()
        }));
    }
    let mut out = Vec::new();
    for h in handles {
        out.extend(
            h.await
                .map_err(|e| Error::internal("verification task", e))?,
        );
    }
    Ok(out)
}

fn rejected(event_id: String, e: &Error) -> SendResult {
    SendResult {
        event_id,
        status: SendStatus::Rejected,
        seq: None,
        error: Some(e.to_body().error),
    }
}

fn from_outcome(event_id: String, o: &Outcome) -> SendResult {
    match o {
        Outcome::Accepted(seq) => SendResult {
            event_id,
            status: SendStatus::Accepted,
            seq: Some(*seq),
            error: None,
        },
        Outcome::Duplicate(seq) => SendResult {
            event_id,
            status: SendStatus::Duplicate,
            seq: *seq,
            error: None,
        },
        Outcome::Rejected(e) => rejected(event_id, e),
    }
}

/// Check an event a replica sends us as host: its origin is the sender
/// (before any key of that origin is fetched), and the origin_ts window.
fn check_for_host(rooms: &Rooms, origin: &ServerName, event: &Event) -> Result<()> {
    if event.origin != *origin {
        return Err(Error::bad_event(format!(
            "event origin {} differs from the sending server {origin}; a replica sends only its own participants' events",
            event.origin
        )));
    }
    let now = rooms.clock.now_ms();
    let skew = rooms.fed.config.max_clock_skew.as_millis() as i64;
    let oldest = rooms.fed.config.retry_max_age.as_millis() as i64 + skew;
    if event.origin_ts_ms > now + skew || event.origin_ts_ms < now - oldest {
        return Err(Error::bad_event(
            "origin_ts is too far in the future or too old; check the sender's clock",
        )
        .with_reason("origin_ts"));
    }
    Ok(())
}

/// Check an event the host relays: a third server's event is only taken
/// (and its key only fetched) for a sender the room knows.
fn check_from_host(rooms: &Rooms, event: &Event) -> Result<()> {
    if event.origin != event.room_id.host() && !rooms.is_local(&event.sender) {
        // One row, not the room's member list: a big room's relayed
        // events would otherwise each read every member.
        let known = rooms
            .store
            .member(event.room_id.as_str(), event.sender.as_str())?
            .is_some();
        let joining = matches!(&event.content, Content::Member { membership: Membership::Join, target, .. } if *target == event.sender);
        // An invite of one of ours for a room we do not know yet: the host
        // checked that its sender is a member.
        let inviting_ours = matches!(&event.content, Content::Member { membership: Membership::Invite, target, .. } if rooms.is_local(target));
        if !known && !joining && !inviting_ours {
            rooms.fed.admit(&event.origin)?;
            return Err(Error::new(
                Code::NotMember,
                format!("{} is not a member of {}", event.sender, event.room_id),
            ));
        }
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct SendEnvelope<'a> {
    txn_id: String,
    #[serde(default, borrow)]
    events: Vec<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    edus: Vec<&'a serde_json::value::RawValue>,
}

/// `POST /send` once §4 passed: 200 with one result per event, in order.
pub async fn receive(rooms: &Rooms, origin: &ServerName, body: &[u8]) -> Result<Vec<u8>> {
    let envelope = parse_envelope(body)?;
    let txn_id = envelope.txn_id.as_str();
    let now = rooms.clock.now_ms();
    if let Some(answer) = cached_answer(rooms, origin, txn_id, now)? {
        return Ok(answer);
    }
    let t0 = std::time::Instant::now();
    let mut results: Vec<Option<SendResult>> = vec![None; envelope.events.len()];
    let parsed = parse_events(&envelope.events).await?;
    let t_parsed = t0.elapsed();
    let prepared = route(rooms, origin, parsed, &mut results).await;
    let t_routed = t0.elapsed();
    let (to_host, from_host) = verify(prepared, &mut results).await?;
    let t_verified = t0.elapsed();
    store(rooms, origin, to_host, from_host, &mut results).await?;
    let t_stored = t0.elapsed();
    receive_edus(rooms, origin, &envelope.edus)?;
    let results: Vec<SendResult> = results
        .into_iter()
        .map(|r| r.expect("every event has a result"))
        .collect();
    let accepted = audit(rooms, origin, &results);
    let answer = cache_answer(rooms, origin, txn_id, now, results)?;
    tracing::debug!(
        parse_us = t_parsed.as_micros() as u64,
        route_us = (t_routed - t_parsed).as_micros() as u64,
        verify_us = t_verified.as_micros() as u64,
        store_us = (t_stored - t_verified).as_micros() as u64,
        total_us = t0.elapsed().as_micros() as u64,
        "send timings"
    );
    // No flush of its own: the events were flushed by their commit, and the
    // cached answer only spares a re-sent transaction the dedup work.
    rooms.fed.peer_success(origin, 0, accepted);
    Ok(answer)
}

/// The envelope, parsed leniently; each event is parsed strictly on its
/// own later, so one bad event is refused alone (SPEC §5) and keeps its
/// exact bytes.
fn parse_envelope(body: &[u8]) -> Result<SendEnvelope<'_>> {
    let envelope: SendEnvelope = serde_json::from_slice(body).map_err(|e| {
        Error::fed_bad_request(format!(
            "the body is not a valid {{\"txn_id\", \"events\", \"edus\"}} object: {e}"
        ))
    })?;
    let txn_id = envelope.txn_id.as_str();
    if txn_id.is_empty() || txn_id.len() > 256 {
        return Err(Error::fed_bad_request(
            "`txn_id` must be a string of 1-256 bytes",
        ));
    }
    let (events, edus) = (&envelope.events, &envelope.edus);
    if events.len() > EVENTS_PER_TRANSACTION_MAX || edus.len() > EDUS_PER_TRANSACTION_MAX {
        return Err(Error::fed_bad_request(format!(
            "at most {EVENTS_PER_TRANSACTION_MAX} events and {EDUS_PER_TRANSACTION_MAX} EDUs per transaction; split it"
        )));
    }
    Ok(envelope)
}

/// The answer we gave this transaction before, if it is still cached.
fn cached_answer(
    rooms: &Rooms,
    origin: &ServerName,
    txn_id: &str,
    now: i64,
) -> Result<Option<Vec<u8>>> {
    let txn_key = keys::txn(origin.as_str(), txn_id);
    Ok(rooms
        .store
        .get::<TxnRecord>(T::Txns, &txn_key)?
        .filter(|cached| now - cached.at_ms < TXN_CACHE_SECS as i64 * 1000)
        .map(|cached| cached.answer))
}

/// Each event's id (for its answer) and the event with its seq, or why it
/// is refused.
type Parsed = (String, Result<(Event, Option<u64>)>);

/// Parse and validate every event strictly (CPU, off the executor).
async fn parse_events(events: &[&serde_json::value::RawValue]) -> Result<Vec<Parsed>> {
    let raws: Vec<String> = events.iter().map(|r| r.get().to_string()).collect();
    on_cores(raws, |raw| {
        let value = canonical::parse_strict(raw.as_bytes());
        let id = value
            .as_ref()
            .ok()
            .and_then(|v| v.get("event_id"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        (id, value.and_then(Event::from_value))
    })
    .await
}

/// An event that passed routing: where it was in the transaction, its
/// seq if a host sent it, and the keys its signatures name.
type Prepared = (
    usize,
    Event,
    Option<u64>,
    HashMap<KeyId, ed25519_dalek::VerifyingKey>,
);

/// Route each parsed event (host or replica role), check it against room
/// state and policy, and find its keys (cheap, async). Refusals go into
/// `results`.
async fn route(
    rooms: &Rooms,
    origin: &ServerName,
    parsed: Vec<Parsed>,
    results: &mut [Option<SendResult>],
) -> Vec<Prepared> {
    let mut prepared = Vec::new();
    for (i, (id, event)) in parsed.into_iter().enumerate() {
        let routed = async {
            let (event, seq) = event?;
            let seq = if event.room_id.host() == rooms.server_name {
                check_for_host(rooms, origin, &event)?;
                None
            } else {
                if event.room_id.host() != *origin {
                    return Err(Error::new(
                        Code::NotRoomHost,
                        format!(
                            "{origin} does not host {}; send room events to its host {}",
                            event.room_id,
                            event.room_id.host()
                        ),
                    ));
                }
                check_from_host(rooms, &event)?;
                Some(seq.ok_or_else(|| Error::bad_event("a host's event must carry unsigned.seq"))?)
            };
            let keys = event_keys(&rooms.fed, &event).await?;
            Ok((event, seq, keys))
        }
        .await;
        match routed {
            Ok((event, seq, keys)) => prepared.push((i, event, seq, keys)),
            Err(e) => results[i] = Some(rejected(id, &e)),
        }
    }
    prepared
}

/// Events for us as host (with their place), and from a host (with seq).
type Verified = (Vec<(usize, Event)>, Vec<(usize, Event, u64)>);

/// Verify every signature strictly (CPU, off the executor); refusals go
/// into `results`.
async fn verify(prepared: Vec<Prepared>, results: &mut [Option<SendResult>]) -> Result<Verified> {
    let verified = on_cores(prepared, |(i, event, seq, keys)| {
        let ok = event.verify(|id| keys.get(id).copied());
        (i, event, seq, ok)
    })
    .await?;
    let (mut to_host, mut from_host) = (Vec::new(), Vec::new());
    for (i, event, seq, ok) in verified {
        if let Err(e) = ok {
            results[i] = Some(rejected(event.event_id.to_string(), &e));
            continue;
        }
        match seq {
            None => to_host.push((i, event)),
            Some(seq) => from_host.push((i, event, seq)),
        }
    }
    Ok((to_host, from_host))
}

/// Hand the verified events to the host sequencer and the replica. The
/// events move into storage; answers need only where each was and its id.
async fn store(
    rooms: &Rooms,
    origin: &ServerName,
    to_host: Vec<(usize, Event)>,
    from_host: Vec<(usize, Event, u64)>,
    results: &mut [Option<SendResult>],
) -> Result<()> {
    if !to_host.is_empty() {
        let ids: Vec<(usize, String)> = to_host
            .iter()
            .map(|(i, e)| (*i, e.event_id.to_string()))
            .collect();
        let batch = to_host
            .into_iter()
            .map(|(_, e)| (e, Source::Peer(origin.clone())))
            .collect();
        let outcomes = host::commit(rooms, batch).await?;
        for ((i, id), o) in ids.into_iter().zip(outcomes.iter()) {
            results[i] = Some(from_outcome(id, o));
        }
    }
    if !from_host.is_empty() {
        let ids: Vec<(usize, String)> = from_host
            .iter()
            .map(|(i, e, _)| (*i, e.event_id.to_string()))
            .collect();
        let batch = from_host.into_iter().map(|(_, e, s)| (e, s)).collect();
        let outcomes = replica::accept_from_host(rooms, origin, batch).await?;
        for ((i, id), o) in ids.into_iter().zip(outcomes.iter()) {
            results[i] = Some(from_outcome(id, o));
        }
    }
    Ok(())
}

/// Presence EDUs. They are ephemeral: a malformed or foreign one is
/// dropped, never an error.
fn receive_edus(
    rooms: &Rooms,
    origin: &ServerName,
    edus: &[&serde_json::value::RawValue],
) -> Result<()> {
    for edu in edus {
        let parsed = serde_json::from_str::<Value>(edu.get())
            .map_err(|e| Error::bad_event(e.to_string()))
            .and_then(|v| PresenceEdu::from_value(&v));
        match parsed {
            Ok(p) => {
                if !crate::rooms::presence::receive(rooms, origin, &p)? {
                    tracing::debug!(peer = %origin, sender = %p.sender, "dropped a stale or foreign presence EDU");
                }
            }
            Err(e) => tracing::debug!(peer = %origin, error = %e, "dropped a malformed EDU"),
        }
    }
    Ok(())
}

/// One audit row per accepted or refused event, in one batch; answers how
/// many were accepted.
fn audit(rooms: &Rooms, origin: &ServerName, results: &[SendResult]) -> u64 {
    let now = rooms.clock.now_ms();
    let mut accepted = 0;
    let mut rows = Vec::new();
    rooms.fed.metrics.events_received(
        origin.as_str(),
        results.iter().map(|r| {
            let outcome = match r.status {
                SendStatus::Accepted => Counted::Accepted,
                SendStatus::Duplicate => Counted::Duplicate,
                SendStatus::Rejected => Counted::Rejected,
            };
            let code = r.error.as_ref().and_then(|e| Code::parse(&e.code));
            (outcome, code.map(Code::as_str).unwrap_or(""))
        }),
    );
    for r in results {
        let code = r.error.as_ref().and_then(|e| Code::parse(&e.code));
        let (action, code) = match (&r.status, code) {
            (SendStatus::Rejected, code) if r.error.is_some() => {
                ("federation.event.rejected", code)
            }
            (SendStatus::Accepted, _) => {
                accepted += 1;
                ("federation.event.accepted", None)
            }
            _ => continue,
        };
        let detail = r.error.as_ref().map(|e| e.message.as_str()).unwrap_or("");
        rows.push(AuditRow::new(
            now,
            action,
            Some(origin),
            Some(&r.event_id),
            None,
            code,
            detail,
        ));
    }
    rooms.store.audit(rows);
    accepted
}

/// Encode the answer, and cache it unless it holds a retryable refusal:
/// the sender will re-send that event, possibly in a transaction with the
/// same id, and must get a fresh look (the key may be fetchable by then).
fn cache_answer(
    rooms: &Rooms,
    origin: &ServerName,
    txn_id: &str,
    now: i64,
    results: Vec<SendResult>,
) -> Result<Vec<u8>> {
    let final_answer = !results
        .iter()
        .any(|r| r.error.as_ref().is_some_and(|e| e.retryable));
    let answer =
        serde_json::to_vec(&SendAnswer { results }).map_err(|e| Error::internal("encode", e))?;
    if final_answer {
        let record = TxnRecord {
            at_ms: now,
            answer: answer.clone(),
        };
        rooms.store.put_txn(origin.as_str(), txn_id, &record)?;
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread_of(_: usize) -> std::thread::ThreadId {
        std::thread::current().id()
    }

    #[tokio::test]
    async fn a_few_events_are_checked_where_the_request_runs_and_more_on_the_pool() {
        let here = std::thread::current().id();
        let few = on_cores((0..ON_EXECUTOR_EVENTS_MAX).collect(), thread_of)
            .await
            .unwrap();
        assert_eq!(few.len(), ON_EXECUTOR_EVENTS_MAX);
        assert!(few.iter().all(|t| *t == here));
        let more = on_cores((0..=ON_EXECUTOR_EVENTS_MAX).collect(), thread_of)
            .await
            .unwrap();
        assert_eq!(more.len(), ON_EXECUTOR_EVENTS_MAX + 1);
        assert!(more.iter().all(|t| *t != here));
    }
}

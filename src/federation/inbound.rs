//! The inbound S2S path: request authentication in the exact order of
//! SPEC §4 (cheap checks first, key fetch last), event verification, and
//! `/send` processing (SPEC §8) for both the host and the replica role.

use std::collections::HashMap;

use serde_json::Value;

use crate::app::App;
use crate::error::{Code, Error, Result};
use crate::federation::verifier::KeyUse;
use crate::ids::{KeyId, ServerName};
use crate::limits::{EDUS_PER_TRANSACTION_MAX, EVENTS_PER_TRANSACTION_MAX, TXN_CACHE_SECS};
use crate::protocol::canonical;
use crate::protocol::event::{Content, Event, Membership, PresenceEdu};
use crate::protocol::httpsig::{self, RequestParts};
use crate::protocol::wire::{SendAnswer, SendResult, SendStatus};
use crate::rooms::host::{self, Source};
use crate::rooms::{replica, Outcome};
use crate::storage::{keys, TxnRecord, T};
use ed25519_dalek::VerifyingKey;

/// What §4 needs from an inbound request's head, as received.
pub struct SignedRequest<'a> {
    pub method: &'a str,
    /// The Host header / HTTP/2 `:authority`.
    pub authority: Option<&'a str>,
    /// The TLS SNI of the connection.
    pub sni: Option<&'a str>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub signature_input: Option<&'a str>,
    pub signature: Option<&'a str>,
    pub content_digest: Option<&'a str>,
}

/// Requests of these methods carry a body, so a Content-Digest.
pub fn has_body(method: &str) -> bool {
    method == "POST" || method == "PUT"
}

/// A request failed authentication: its origin is only a claim, so the
/// audit row says so (and such rows are rated, see `App::audit_unverified`).
fn signature_failed(app: &App, claimed: Option<&ServerName>, e: &Error) {
    tracing::warn!(name: "federation.signature_verify_failed", peer = claimed.map(|o| o.as_str()).unwrap_or("-"), code = %e.code, "federation.signature_verify_failed: {}", crate::app::audit_detail(&e.message));
    app.audit_unverified(
        "federation.signature_verify_failed",
        claimed,
        e.code,
        &e.message,
    );
}

/// SPEC §4, steps 1-6 in order, on the request's head: the first failure
/// is the answer. Returns the authenticated origin. The body is not read
/// yet: step 4 here checks that Content-Digest is there and well-formed,
/// and [`check_body_digest`] compares it with the body once it is read
/// (the signature covers the Content-Digest header, so the request is
/// authenticated before its body is read; docs/decisions.md).
pub async fn authenticate(app: &App, req: &SignedRequest<'_>) -> Result<ServerName> {
    let has_body = has_body(req.method);
    // 1. headers present and well-formed.
    let parsed = httpsig::parse(req.signature_input, req.signature, has_body)
        .and_then(|p| {
            let origin = req.origin.ok_or_else(|| {
                Error::signature(
                    "the ScaiWave-Origin header is missing; send your server_name in it",
                )
            })?;
            let origin = ServerName::parse(origin).map_err(|_| {
                Error::signature(format!("ScaiWave-Origin {origin:?} is not a server name"))
            })?;
            Ok((p, origin))
        })
        .inspect_err(|e| signature_failed(app, None, e))?;
    let (sig, origin) = parsed;
    // 2. destination, key, tenant switch.
    let authority = req.authority.unwrap_or("").to_ascii_lowercase();
    if authority != app.server_name.as_str() {
        return Err(Error::new(
            Code::WrongDestination,
            format!("this server is {}, not {authority:?}; send the request to the server named in the room or FQID", app.server_name),
        ));
    }
    if req.sni.map(|s| s.to_ascii_lowercase()) != Some(app.server_name.host().to_string()) {
        return Err(Error::new(
            Code::WrongDestination,
            format!(
                "the TLS SNI must be {} (the host part of the Host header)",
                app.server_name.host()
            ),
        ));
    }
    if !app.keys.has_key() {
        return Err(crate::federation::keys::no_key());
    }
    if !app.config.federation.enabled {
        return Err(Error::new(
            Code::TenantDisabled,
            format!("federation is disabled on {}", app.server_name),
        ));
    }
    // 3. clock skew.
    let skew = app.config.federation.max_clock_skew.as_secs() as i64;
    let now = app.clock.now_secs();
    if (sig.created_unix_secs - now).abs() > skew {
        let e = Error::signature(format!(
            "the signature was created at {} but it is {now} here (allowed skew {skew}s); sync the clocks (NTP) on both servers",
            sig.created_unix_secs
        ))
        .with_reason("clock_skew");
        signature_failed(app, Some(&origin), &e);
        return Err(e);
    }
    // 4. the digest header (its match with the body comes after the read).
    if has_body {
        httpsig::content_digest_sha256(req.content_digest)
            .inspect_err(|e| signature_failed(app, Some(&origin), e))?;
    }
    // 5. policy, before any key fetch.
    app.admit_claimed(&origin)?;
    // 6. the signature itself.
    let parts = RequestParts {
        method: req.method,
        authority: &authority,
        path: req.path,
        query: req.query,
        origin: origin.as_str(),
        content_digest: req.content_digest,
    };
    let key = app
        .verifier
        .key(
            &origin,
            &sig.key_id,
            KeyUse::Request {
                now_ms: app.clock.now_ms(),
            },
        )
        .await
        .inspect_err(|e| signature_failed(app, Some(&origin), e))?;
    sig.verify(&parts, &key)
        .inspect_err(|e| signature_failed(app, Some(&origin), e))?;
    app.delivery.peer_is_back(app, &origin);
    Ok(origin)
}

/// Step 4's comparison, once the body of an authenticated request is read.
pub fn check_body_digest(
    app: &App,
    origin: &ServerName,
    content_digest: Option<&str>,
    body: &[u8],
) -> Result<()> {
    httpsig::check_content_digest(content_digest, body)
        .inspect_err(|e| signature_failed(app, Some(origin), e))
}

/// The keys an event's signatures name, as far as we can get them: policy
/// on the event's origin first, then our own ring or the verifier cache.
pub async fn event_keys(app: &App, event: &Event) -> Result<HashMap<KeyId, VerifyingKey>> {
    let mut keys = HashMap::new();
    if event.origin == app.server_name {
        for (key_id, _) in event.origin_signatures() {
            if let Some(k) = app.keys.own_key_for_event(&key_id, event.origin_ts_ms) {
                keys.insert(key_id, k);
            }
        }
        return Ok(keys);
    }
    app.admit(&event.origin)?;
    for (key_id, _) in event.origin_signatures() {
        let usage = KeyUse::Event {
            origin_ts_ms: event.origin_ts_ms,
        };
        if let Ok(k) = app.verifier.key(&event.origin, &key_id, usage).await {
            keys.insert(key_id, k);
        }
    }
    Ok(keys)
}

/// Policy on the event's origin, then its key, then its signature.
pub async fn verify_event(app: &App, event: &Event) -> Result<()> {
    let keys = event_keys(app, event).await?;
    event.verify(|id| keys.get(id).copied())
}

/// Run `f` over `items` on the blocking pool, split across the cores:
/// canonicalisation and Ed25519 are CPU work that must not stall the
/// executor threads serving other requests.
async fn on_cores<T, R>(items: Vec<T>, f: fn(T) -> R) -> Result<Vec<R>>
where
    T: Send + 'static,
    R: Send + 'static,
{
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
fn check_for_host(app: &App, origin: &ServerName, event: &Event) -> Result<()> {
    if event.origin != *origin {
        return Err(Error::bad_event(format!(
            "event origin {} differs from the sending server {origin}; a replica sends only its own participants' events",
            event.origin
        )));
    }
    let now = app.clock.now_ms();
    let skew = app.config.federation.max_clock_skew.as_millis() as i64;
    let oldest = app.config.federation.retry_max_age.as_millis() as i64 + skew;
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
fn check_from_host(app: &App, event: &Event) -> Result<()> {
    if event.origin != event.room_id.host() && !app.is_local(&event.sender) {
        let known =
            crate::rooms::load_members(app, &event.room_id)?.contains_key(event.sender.as_str());
        let joining = matches!(&event.content, Content::Member { membership: Membership::Join, target, .. } if *target == event.sender);
        // An invite of one of ours for a room we do not know yet: the host
        // checked that its sender is a member.
        let inviting_ours = matches!(&event.content, Content::Member { membership: Membership::Invite, target, .. } if app.is_local(target));
        if !known && !joining && !inviting_ours {
            app.admit(&event.origin)?;
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
pub async fn send(app: &App, origin: &ServerName, body: &[u8]) -> Result<Vec<u8>> {
    // The envelope is parsed leniently; each event strictly on its own, so
    // one bad event is refused alone (SPEC §5) and keeps its exact bytes.
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
    let txn_key = keys::txn(origin.as_str(), txn_id);
    let now = app.clock.now_ms();
    if let Some(cached) = app.store.get::<TxnRecord>(T::Txns, &txn_key)? {
        if now - cached.at_ms < TXN_CACHE_SECS as i64 * 1000 {
            return Ok(cached.answer);
        }
    }

    let t0 = std::time::Instant::now();
    let mut results: Vec<Option<SendResult>> = vec![None; events.len()];
    // 1. Parse and validate every event (CPU, off the executor).
    let raws: Vec<String> = events.iter().map(|r| r.get().to_string()).collect();
    let parsed = on_cores(raws, |raw| {
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
    .await?;
    let t_parsed = t0.elapsed();
    // 2. Route, check against room state and policy, find keys (cheap, async).
    let mut prepared = Vec::new();
    for (i, (id, event)) in parsed.into_iter().enumerate() {
        let routed = async {
            let (event, seq) = event?;
            let seq = if event.room_id.host() == app.server_name {
                check_for_host(app, origin, &event)?;
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
                check_from_host(app, &event)?;
                Some(seq.ok_or_else(|| Error::bad_event("a host's event must carry unsigned.seq"))?)
            };
            let keys = event_keys(app, &event).await?;
            Ok((event, seq, keys))
        }
        .await;
        match routed {
            Ok((event, seq, keys)) => prepared.push((i, event, seq, keys)),
            Err(e) => results[i] = Some(rejected(id, &e)),
        }
    }
    let t_routed = t0.elapsed();
    // 3. Verify every signature strictly (CPU, off the executor).
    let verified = on_cores(prepared, |(i, event, seq, keys)| {
        let ok = event.verify(|id| keys.get(id).copied());
        (i, event, seq, ok)
    })
    .await?;
    let mut to_host: Vec<(usize, Event)> = Vec::new();
    let mut from_host: Vec<(usize, Event, u64)> = Vec::new();
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
    let t_verified = t0.elapsed();
    // The events move into storage; answers need only where each was and its id.
    if !to_host.is_empty() {
        let ids: Vec<(usize, String)> = to_host
            .iter()
            .map(|(i, e)| (*i, e.event_id.to_string()))
            .collect();
        let batch = to_host
            .into_iter()
            .map(|(_, e)| (e, Source::Peer(origin.clone())))
            .collect();
        let outcomes = host::commit(app, batch).await?;
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
        let outcomes = replica::accept_from_host(app, origin, batch).await?;
        for ((i, id), o) in ids.into_iter().zip(outcomes.iter()) {
            results[i] = Some(from_outcome(id, o));
        }
    }
    let t_stored = t0.elapsed();
    for edu in edus {
        // EDUs are ephemeral: a malformed or foreign one is dropped, never an error.
        let parsed = serde_json::from_str::<Value>(edu.get())
            .map_err(|e| Error::bad_event(e.to_string()))
            .and_then(|v| PresenceEdu::from_value(&v));
        match parsed {
            Ok(p) => {
                if !crate::rooms::presence::receive(app, origin, &p)? {
                    tracing::debug!(peer = %origin, sender = %p.sender, "dropped a stale or foreign presence EDU");
                }
            }
            Err(e) => tracing::debug!(peer = %origin, error = %e, "dropped a malformed EDU"),
        }
    }
    let results: Vec<SendResult> = results
        .into_iter()
        .map(|r| r.expect("every event has a result"))
        .collect();
    let mut accepted = 0;
    let mut audit = Vec::new();
    for r in &results {
        let (action, code) = match (&r.status, &r.error) {
            (SendStatus::Rejected, Some(e)) => ("federation.event.rejected", Code::parse(&e.code)),
            (SendStatus::Accepted, _) => {
                accepted += 1;
                ("federation.event.accepted", None)
            }
            _ => continue,
        };
        let detail = r.error.as_ref().map(|e| e.message.as_str()).unwrap_or("");
        audit.push(app.audit_row(action, Some(origin), Some(&r.event_id), None, code, detail));
    }
    app.audit_many(audit);
    // An answer holding a retryable refusal is not cached: the sender will
    // re-send that event, possibly in a transaction with the same id, and
    // must get a fresh look (the key may be fetchable by then).
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
        app.store.put_txn(origin.as_str(), txn_id, &record)?;
    }
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
    app.peer_success(origin, 0, accepted);
    Ok(answer)
}

//! Admin routes (`/v1/admin/*`, SPEC §9): identity, peers, policy,
//! participants, audit, per-room federation switches and backfill.

use serde_json::{json, Value};

use crate::api::{json_reply, not_found_route, require_admin, Request, Response, Services};
use crate::clock::rfc3339;
use crate::error::{Code, Error, Result};
use crate::ids::{Fqid, LocalId, RoomId, ServerName};
use crate::limits::{AUDIT_PAGE_MAX, BACKFILL_EVENTS_MAX, SHORT_TEXT_BYTES_MAX};
use crate::rooms::commands;
use crate::storage::{self, AuditRow, OutboxItem, Participant, PowerLevel, T};

pub async fn route(
    svc: &Services,
    req: &Request,
    rest: &[&str],
    admin: Participant,
) -> Result<Response> {
    require_admin(&admin)?;
    match (req.method.as_str(), rest) {
        ("GET", ["federation", "identity"]) => Ok(json_reply(200, &identity(svc))),
        ("POST", ["federation", "key", "rotate"]) => {
            let revoke = match req.body.is_empty() {
                true => false,
                false => req
                    .json()?
                    .get("revoke_previous")
                    .map(|v| {
                        v.as_bool().ok_or_else(|| {
                            Error::bad_request("`revoke_previous` must be true or false")
                        })
                    })
                    .transpose()?
                    .unwrap_or(false),
            };
            let rec = svc.rooms.fed.rotate(revoke)?;
            Ok(json_reply(
                200,
                &json!({"key_id": rec.key_id.to_string(), "previous_revoked": revoke}),
            ))
        }
        ("GET", ["federation", "peers"]) => Ok(json_reply(200, &json!({ "peers": peers(svc)? }))),
        ("DELETE", ["federation", "peers", name]) => {
            let peer = ServerName::parse(name)?;
            Ok(json_reply(
                200,
                &crate::rooms::sever::remove_peer(&svc.rooms, &admin, &peer).await?,
            ))
        }
        ("GET", ["federation", "policy"]) => Ok(json_reply(200, &svc.rooms.fed.policy())),
        ("PUT", ["federation", "policy"]) => {
            let next = svc.rooms.fed.policy().patched(&req.json()?)?;
            svc.rooms.fed.set_policy(next.clone())?;
            Ok(json_reply(200, &next))
        }
        ("POST", ["federation", "foreign", fqid, "refresh"]) => {
            let refreshed = commands::refresh_foreign(&svc.rooms, &Fqid::parse(fqid)?).await?;
            Ok(json_reply(200, &refreshed))
        }
        ("PUT", ["rooms", room, "federate"]) => {
            let room_id = RoomId::parse(room)?;
            let enabled = req
                .json()?
                .get("enabled")
                .and_then(Value::as_bool)
                .ok_or_else(|| Error::bad_request("send {\"enabled\": true|false}"))?;
            commands::set_federate(&svc.rooms, &room_id, enabled).await?;
            Ok(json_reply(
                200,
                &json!({"room_id": room_id.to_string(), "federate": enabled}),
            ))
        }
        ("POST", ["rooms", room, "federation", "invite"]) => {
            let room_id = RoomId::parse(room)?;
            commands::room_for_admin(&svc.rooms, &room_id)?;
            let fqid = fqid_field(&req.json()?)?;
            let invite_id = commands::admin_invite(&svc.rooms, &admin, &room_id, &fqid).await?;
            Ok(json_reply(200, &json!({"invite_id": invite_id})))
        }
        ("POST", ["rooms", room, "federation", "backfill"]) => {
            backfill(svc, req, &RoomId::parse(room)?).await
        }
        ("POST", ["participants"]) => create_participant(svc, &req.json()?),
        ("GET", ["audit"]) => Ok(json_reply(200, &json!({ "rows": audit(svc, req)? }))),
        _ => Err(not_found_route(req)),
    }
}

/// `POST /v1/admin/rooms/{room_id}/federation/backfill`: pull history
/// from the room's host; a refusal of the host's is in the answer.
async fn backfill(svc: &Services, req: &Request, room_id: &RoomId) -> Result<Response> {
    commands::room_for_admin(&svc.rooms, room_id)?;
    if room_id.host() == svc.rooms.server_name {
        return Err(Error::bad_request(format!(
            "{} hosts {room_id} and holds its whole history; backfill pulls from a room's host",
            svc.rooms.server_name
        )));
    }
    let limit = match req.body.is_empty() {
        true => BACKFILL_EVENTS_MAX,
        false => req
            .json()?
            .get("limit")
            .and_then(Value::as_u64)
            .unwrap_or(BACKFILL_EVENTS_MAX)
            .clamp(1, BACKFILL_EVENTS_MAX),
    };
    match crate::rooms::history::backfill(&svc.rooms, room_id, None, limit).await {
        Ok(done) => Ok(json_reply(200, &done)),
        Err(e) if e.code != Code::Internal || e.status.is_some() => Ok(json_reply(
            200,
            &json!({"fetched": 0, "stored": 0, "rejected": 0, "remote_error": e.to_body().error}),
        )),
        Err(e) => Err(e),
    }
}

/// `POST /v1/admin/participants`: a participant and its first token.
fn create_participant(svc: &Services, body: &Value) -> Result<Response> {
    let local = LocalId::parse(body.get("local_id").and_then(Value::as_str).unwrap_or(""))?;
    let display = body
        .get("display_name")
        .and_then(Value::as_str)
        .unwrap_or(local.as_str())
        .to_string();
    if display.len() > SHORT_TEXT_BYTES_MAX {
        return Err(Error::bad_request(format!(
            "`display_name` is limited to {SHORT_TEXT_BYTES_MAX} bytes"
        )));
    }
    let power = match body
        .get("power_level")
        .and_then(Value::as_str)
        .unwrap_or("member")
    {
        "member" => PowerLevel::Member,
        "admin" => PowerLevel::Admin,
        _ => {
            return Err(Error::bad_request(
                "`power_level` must be \"member\" or \"admin\"",
            ))
        }
    };
    let token = svc.rooms.create_participant(&local, &display, power)?;
    Ok(json_reply(
        200,
        &json!({"fqid": svc.rooms.fqid(&local).to_string(), "token": token}),
    ))
}

fn fqid_field(body: &Value) -> Result<Fqid> {
    Fqid::parse(
        body.get("fqid")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::bad_request("send {\"fqid\": \"@local_id:server_name\"}"))?,
    )
}

pub fn identity(svc: &Services) -> Value {
    let d = svc.rooms.fed.keys.descriptor(&svc.rooms.server_name);
    let ring = svc.rooms.fed.keys.ring();
    json!({
        "server_name": d.server_name,
        "key_id": d.key_id,
        "public_key": d.public_key,
        "created_at": ring.current.as_ref().map(|c| rfc3339(c.created_at_ms)),
        "rotates_at": svc.rooms.fed.keys.rotates_at_ms(svc.rooms.fed.config.key_rotation_interval).map(rfc3339),
        "old_keys": d.old_keys,
        "protocol_versions": d.protocol_versions,
    })
}

/// One peer's row, as `peers` (SPEC §9) and the §16 gauges see it.
pub struct PeerHealth {
    pub name: ServerName,
    pub record: storage::PeerRecord,
    /// `ok`, `backoff` or `failing`.
    pub status: &'static str,
    pub queue_depth: usize,
    pub oldest_queued_at_ms: Option<i64>,
}

/// Every peer row, by name.
pub fn peer_health(svc: &Services) -> Result<Vec<PeerHealth>> {
    let now = svc.rooms.clock.now_ms();
    let mut rows: Vec<(ServerName, storage::PeerRecord)> = svc
        .rooms
        .store
        .scan::<storage::PeerRecord>(T::Peers, b"")?
        .into_iter()
        .filter_map(|(k, rec)| Some((ServerName::parse(&String::from_utf8_lossy(&k)).ok()?, rec)))
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = Vec::new();
    for (name, record) in rows {
        let prefix = storage::prefix(name.as_str());
        let queue_depth = svc.rooms.store.outbox_depth(&name);
        let oldest: Option<(Vec<u8>, OutboxItem)> = svc.rooms.store.first(T::Outbox, &prefix)?;
        let oldest_queued_at_ms = oldest.map(|(_, it)| it.queued_at_ms);
        let status = match oldest_queued_at_ms {
            None => "ok",
            Some(at) if now - at >= 3_600_000 => "failing",
            Some(_) if record.last_error.is_some() => "backoff",
            Some(_) => "ok",
        };
        out.push(PeerHealth {
            name,
            record,
            status,
            queue_depth,
            oldest_queued_at_ms,
        });
    }
    Ok(out)
}

/// Every peer we have a row or a queue for, with SPEC §9's fields.
pub fn peers(svc: &Services) -> Result<Vec<Value>> {
    let now = svc.rooms.clock.now_ms();
    Ok(peer_health(svc)?
        .into_iter()
        .map(|p| {
            let rec = &p.record;
            let name = &p.name;
            json!({
                "server_name": name.to_string(),
                "status": p.status,
                "last_seen": rec.last_seen_ms.map(rfc3339),
                "last_error": rec.last_error.as_ref().map(|e| json!({"code": e.code, "message": e.message, "at": rfc3339(e.at_ms)})),
                "events_sent_24h": rec.sent.total(now),
                "events_received_24h": rec.received.total(now),
                "queue_depth": p.queue_depth,
                "next_retry_at": svc.rooms.fed.outbox.next_retry_at_ms(name).filter(|_| p.queue_depth > 0).map(rfc3339),
                "protocol_versions": rec.protocol_versions,
            })
        })
        .collect())
}

/// An audit row as the API shows it (times in RFC 3339).
fn audit_view(row: &AuditRow) -> Value {
    json!({
        "at": rfc3339(row.at_ms),
        "action": row.action,
        "peer": row.peer,
        "event_id": row.event_id,
        "room_id": row.room_id,
        "code": row.code,
        "detail": row.detail,
        "unverified": row.unverified,
    })
}

fn audit(svc: &Services, req: &Request) -> Result<Vec<Value>> {
    let limit = req
        .query_param("limit")
        .map(|l| {
            l.parse::<usize>()
                .map_err(|_| Error::bad_request("`limit` must be a positive integer"))
        })
        .transpose()?
        .unwrap_or(100)
        .clamp(1, AUDIT_PAGE_MAX);
    let action = req.query_param("action");
    let peer = req.query_param("peer");
    let matches = |a: &str| match action.as_deref() {
        None => true,
        Some(p) => match p.strip_suffix('*') {
            Some(prefix) => a.starts_with(prefix),
            None => a == p,
        },
    };
    let mut rows = Vec::new();
    svc.rooms.store.audit_newest_first(|row| {
        if matches(&row.action) && peer.as_ref().is_none_or(|p| row.peer.as_ref() == Some(p)) {
            rows.push(audit_view(row));
        }
        rows.len() < limit
    })?;
    Ok(rows)
}

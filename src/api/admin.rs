//! Admin routes (`/v1/admin/*`, SPEC §9): identity, peers, policy,
//! participants, audit, per-room federation switches and backfill.

use serde_json::{json, Value};

use crate::api::{json_reply, not_found_route, require_admin, Request, Response};
use crate::app::App;
use crate::clock::rfc3339;
use crate::error::{Code, Error, Result};
use crate::ids::{Fqid, LocalId, RoomId, ServerName};
use crate::limits::{AUDIT_PAGE_MAX, BACKFILL_EVENTS_MAX, SHORT_TEXT_BYTES_MAX};
use crate::storage::{self, AuditRow, OutboxItem, Participant, PowerLevel, T};

pub async fn route(
    app: &App,
    req: &Request,
    rest: &[&str],
    admin: Participant,
) -> Result<Response> {
    require_admin(&admin)?;
    match (req.method.as_str(), rest) {
        ("GET", ["federation", "identity"]) => Ok(json_reply(200, &identity(app))),
        ("GET", ["federation", "peers"]) => Ok(json_reply(200, &json!({ "peers": peers(app)? }))),
        ("DELETE", ["federation", "peers", name]) => {
            let peer = ServerName::parse(name)?;
            Ok(json_reply(
                200,
                &crate::rooms::sever::remove_peer(app, &admin, &peer).await?,
            ))
        }
        ("GET", ["federation", "policy"]) => Ok(json_reply(200, &app.policy())),
        ("PUT", ["federation", "policy"]) => {
            let next = app.policy().patched(&req.json()?)?;
            app.set_policy(next.clone())?;
            Ok(json_reply(200, &next))
        }
        ("POST", ["federation", "foreign", fqid, "refresh"]) => {
            let fqid = Fqid::parse(fqid)?;
            // The descriptor fetch is unsigned but still contacts the peer:
            // never one our policy refuses.
            app.admit(&fqid.server()).map_err(Error::as_conflict)?;
            app.verifier
                .refresh(&fqid.server())
                .await
                .map_err(Error::as_conflict)?;
            let profile = crate::rooms::flows::fetch_profile(app, &fqid).await?;
            let updated = crate::rooms::flows::set_display_name(app, &fqid, &profile.display_name)?;
            Ok(json_reply(
                200,
                &json!({"fqid": profile.fqid, "display_name": profile.display_name, "presence": profile.presence, "rooms_updated": updated}),
            ))
        }
        ("PUT", ["rooms", room, "federate"]) => {
            let room_id = RoomId::parse(room)?;
            let enabled = req
                .json()?
                .get("enabled")
                .and_then(Value::as_bool)
                .ok_or_else(|| Error::bad_request("send {\"enabled\": true|false}"))?;
            let _guard = app.room_locks.lock_all([room_id.clone()]).await;
            let mut room = crate::rooms::flows::room_for_admin(app, &room_id)?;
            room.federate = enabled;
            app.store
                .put(T::Rooms, room_id.as_str().as_bytes(), &room)?;
            app.store.flush().await?;
            Ok(json_reply(
                200,
                &json!({"room_id": room_id.to_string(), "federate": enabled}),
            ))
        }
        ("POST", ["rooms", room, "federation", "invite"]) => {
            let room_id = RoomId::parse(room)?;
            crate::rooms::flows::room_for_admin(app, &room_id)?;
            let fqid = fqid_field(&req.json()?)?;
            let invite_id = crate::rooms::flows::admin_invite(app, &admin, &room_id, &fqid).await?;
            Ok(json_reply(200, &json!({"invite_id": invite_id})))
        }
        ("POST", ["rooms", room, "federation", "backfill"]) => {
            let room_id = RoomId::parse(room)?;
            crate::rooms::flows::room_for_admin(app, &room_id)?;
            if room_id.host() == app.server_name {
                return Err(Error::bad_request(format!(
                    "{} hosts {room_id} and holds its whole history; backfill pulls from a room's host",
                    app.server_name
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
            match crate::rooms::flows::backfill(app, &room_id, None, limit).await {
                Ok((fetched, stored, rejected)) => Ok(json_reply(
                    200,
                    &json!({"fetched": fetched, "stored": stored, "rejected": rejected}),
                )),
                Err(e) if e.code != Code::Internal || e.status.is_some() => Ok(json_reply(
                    200,
                    &json!({"fetched": 0, "stored": 0, "rejected": 0, "remote_error": e.to_body().error}),
                )),
                Err(e) => Err(e),
            }
        }
        ("POST", ["participants"]) => {
            let body = req.json()?;
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
            let token = app.create_participant(&local, &display, power)?;
            Ok(json_reply(
                200,
                &json!({"fqid": app.fqid(&local).to_string(), "token": token}),
            ))
        }
        ("GET", ["audit"]) => Ok(json_reply(200, &json!({ "rows": audit(app, req)? }))),
        _ => Err(not_found_route(req)),
    }
}

fn fqid_field(body: &Value) -> Result<Fqid> {
    Fqid::parse(
        body.get("fqid")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::bad_request("send {\"fqid\": \"@local_id:server_name\"}"))?,
    )
}

pub fn identity(app: &App) -> Value {
    let d = app.keys.descriptor(&app.server_name);
    let ring = app.keys.ring();
    json!({
        "server_name": d.server_name,
        "key_id": d.key_id,
        "public_key": d.public_key,
        "created_at": ring.current.as_ref().map(|c| rfc3339(c.created_at_ms)),
        "rotates_at": app.keys.rotates_at_ms(app.config.federation.key_rotation_interval).map(rfc3339),
        "old_keys": d.old_keys,
        "protocol_versions": d.protocol_versions,
    })
}

/// Every peer we have a row or a queue for, with SPEC §9's fields.
pub fn peers(app: &App) -> Result<Vec<Value>> {
    let now = app.clock.now_ms();
    let mut names: Vec<ServerName> = app
        .store
        .scan::<storage::PeerRecord>(T::Peers, b"")?
        .into_iter()
        .filter_map(|(k, _)| ServerName::parse(&String::from_utf8_lossy(&k)).ok())
        .collect();
    names.sort();
    let mut out = Vec::new();
    for name in names {
        let rec = app.peer_record(&name)?;
        let prefix = storage::prefix(name.as_str());
        let depth = app.store.count_prefix(T::Outbox, &prefix);
        let oldest: Option<(Vec<u8>, OutboxItem)> = app.store.first(T::Outbox, &prefix)?;
        let status = match &oldest {
            None => "ok",
            Some((_, it)) if now - it.queued_at_ms >= 3_600_000 => "failing",
            Some(_) if rec.last_error.is_some() => "backoff",
            Some(_) => "ok",
        };
        out.push(json!({
            "server_name": name.to_string(),
            "status": status,
            "last_seen": rec.last_seen_ms.map(rfc3339),
            "last_error": rec.last_error.as_ref().map(|e| json!({"code": e.code, "message": e.message, "at": rfc3339(e.at_ms)})),
            "events_sent_24h": rec.sent.total(now),
            "events_received_24h": rec.received.total(now),
            "queue_depth": depth,
            "next_retry_at": app.delivery.next_retry_at_ms(&name).filter(|_| depth > 0).map(rfc3339),
            "protocol_versions": rec.protocol_versions,
        }));
    }
    Ok(out)
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

fn audit(app: &App, req: &Request) -> Result<Vec<Value>> {
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
    app.store.scan_rev_while::<AuditRow>(T::Audit, |row| {
        if matches(&row.action) && peer.as_ref().is_none_or(|p| row.peer.as_ref() == Some(p)) {
            rows.push(audit_view(row));
        }
        rows.len() < limit
    })?;
    Ok(rows)
}

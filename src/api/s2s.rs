//! S2S routes (SPEC §3, §8). Every route but the descriptor is signed and
//! authenticated by `federation::auth::authenticate` before anything else.

use std::collections::BTreeMap;

use crate::api::{bytes_reply, json_reply, not_found_route, Request, Response, Services};
use crate::error::{Code, Error, Result};
use crate::federation::auth::{self, SignedRequest};
use crate::ids::{Fqid, LocalId, RoomId, ServerName};
use crate::protocol::event::Membership;
use crate::protocol::wire::{BackfillAnswer, MemberEntry, MembersAnswer, ProfileAnswer};
use crate::rooms::is_joined;
use crate::rooms::transaction;
use crate::storage::{keys, Member, Room, StoredEvent, T};

/// `GET /.well-known/scaiwave/server` (no auth, cacheable for 5 min).
pub fn descriptor(svc: &Services, req: &Request) -> Result<Response> {
    if req.method != http::Method::GET {
        return Err(not_found_route(req));
    }
    let mut r = json_reply(200, &svc.rooms.fed.keys.descriptor(&svc.rooms.server_name));
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("max-age=300"),
    );
    Ok(r)
}

/// SPEC §4 on the request's head (the body is not read yet).
pub(crate) async fn authenticate(svc: &Services, req: &Request) -> Result<ServerName> {
    let sig_input = req.header_joined("signature-input");
    let sig = req.header_joined("signature");
    let signed = SignedRequest {
        method: req.method.as_str(),
        authority: req.authority.as_deref(),
        sni: req.conn.as_ref().and_then(|c| c.sni.as_deref()),
        path: &req.path,
        query: req.query.as_deref(),
        origin: req.header("scaiwave-origin"),
        signature_input: sig_input.as_deref(),
        signature: sig.as_deref(),
        content_digest: req.header("content-digest"),
    };
    auth::authenticate(&svc.rooms.fed, &signed).await
}

/// Routes that exist: anything else is 404 before it is authenticated or
/// its body read.
pub fn known(method: &str, rest: &[&str]) -> bool {
    matches!(
        (method, rest),
        ("POST", ["send"])
            | ("GET", ["profile", _])
            | ("GET", ["rooms", _, "members" | "backfill"])
            | ("POST", ["rooms", _, "call-token"])
    )
}

pub fn has_body(method: &str) -> bool {
    auth::has_body(method)
}

/// Step 4 of SPEC §4 on the body just read.
pub(crate) fn check_digest(svc: &Services, req: &Request, origin: &ServerName) -> Result<()> {
    auth::check_body_digest(
        &svc.rooms.fed,
        origin,
        req.header("content-digest"),
        &req.body,
    )
}

/// An authenticated request from `origin` to a [`known`] route.
pub async fn route(
    svc: &Services,
    req: &Request,
    origin: &ServerName,
    rest: &[&str],
) -> Result<Response> {
    match rest {
        ["send"] => Ok(bytes_reply(
            200,
            transaction::receive(&svc.rooms, origin, &req.body).await?,
        )),
        ["profile", local] => profile(svc, origin, local),
        ["rooms", room, "call-token"] => call_token(svc, req, origin, room),
        ["rooms", room, what] => {
            let room_id = RoomId::parse(room).map_err(|e| Error::fed_bad_request(e.message))?;
            let (room, members) = hosted_room_for(svc, origin, &room_id)?;
            if *what == "members" {
                Ok(json_reply(
                    200,
                    &MembersAnswer {
                        room_id: room_id.to_string(),
                        host: svc.rooms.server_name.to_string(),
                        as_of_seq: room.next_seq.saturating_sub(1),
                        members: members
                            .values()
                            .map(|m| MemberEntry {
                                fqid: m.fqid.clone(),
                                membership: m.membership.as_str().to_string(),
                                display_name: m.display_name.clone(),
                            })
                            .collect(),
                    },
                ))
            } else {
                backfill(svc, req, &room_id)
            }
        }
        _ => Err(not_found_route(req)),
    }
}

fn profile(svc: &Services, origin: &ServerName, local: &str) -> Result<Response> {
    let not_found = || {
        Error::new(
            Code::ParticipantNotFound,
            format!(
                "no participant {local:?} on {}; check the FQID",
                svc.rooms.server_name
            ),
        )
    };
    let local = LocalId::parse(local).map_err(|_| not_found())?;
    let p = svc.rooms.store.participant(&local)?.ok_or_else(not_found)?;
    let fqid = Fqid::new(&local, &svc.rooms.server_name);
    // Presence only for servers that share a room (SPEC §5).
    let presence = if crate::rooms::presence::shares_room(&svc.rooms, &fqid, origin)? {
        serde_json::to_value(&p.presence).ok()
    } else {
        None
    };
    Ok(json_reply(
        200,
        &ProfileAnswer {
            fqid: fqid.to_string(),
            display_name: p.display_name,
            presence,
        },
    ))
}

/// Only the host serves room state, and only to participating servers.
/// `POST rooms/{room_id}/call-token` `{"fqid"}` (SPEC §14): a call token
/// for a joined member of the requesting server, in a room we host.
fn call_token(svc: &Services, req: &Request, origin: &ServerName, room: &str) -> Result<Response> {
    let room_id = RoomId::parse(room).map_err(|e| Error::fed_bad_request(e.message))?;
    let body = req.json().map_err(|e| Error::fed_bad_request(e.message))?;
    let fqid = body
        .get("fqid")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| Error::fed_bad_request("send {\"fqid\": \"@local:server\"}"))
        .and_then(|f| Fqid::parse(f).map_err(|e| Error::fed_bad_request(e.message)))?;
    if fqid.server() != *origin {
        return Err(Error::new(
            Code::NotMember,
            format!("{origin} asks for {fqid}, who is not its participant; a server asks only for its own"),
        ));
    }
    let (room, _) = hosted_room_for(svc, origin, &room_id)?;
    Ok(json_reply(
        200,
        &crate::rooms::calls::mint(&svc.rooms, &room, &fqid)?,
    ))
}

/// A room we host, federating, with a joined participant of `origin`: the
/// room and its members, or the refusal that says which of those fails.
fn hosted_room_for(
    svc: &Services,
    origin: &ServerName,
    room_id: &RoomId,
) -> Result<(Room, BTreeMap<String, Member>)> {
    if room_id.host() != svc.rooms.server_name {
        return Err(Error::new(
            Code::NotRoomHost,
            format!(
                "{} does not host {room_id}; ask {}",
                svc.rooms.server_name,
                room_id.host()
            ),
        ));
    }
    let room =
        svc.rooms.store.room(room_id)?.ok_or_else(|| {
            Error::new(Code::RoomNotFound, format!("room {room_id} does not exist"))
        })?;
    if !room.federate || !room.room_type.federable() {
        return Err(Error::new(
            Code::RoomNotFederated,
            format!("room {room_id} does not federate"),
        ));
    }
    let members = svc.rooms.store.members(room_id)?;
    let participating = members.values().any(|m| {
        m.membership == Membership::Join
            && Fqid::parse(&m.fqid).is_ok_and(|f| f.server() == *origin)
    });
    if !participating {
        return Err(Error::new(
            Code::NotMember,
            format!("{origin} has no joined participant in {room_id}"),
        ));
    }
    debug_assert!(members.keys().any(|k| is_joined(&members, k)));
    Ok((room, members))
}

fn backfill(svc: &Services, req: &Request, room_id: &RoomId) -> Result<Response> {
    let cap = svc.rooms.fed.policy().max_backfill_events_per_request;
    if cap == 0 {
        return Err(Error::new(
            Code::BackfillRefused,
            format!(
                "{} does not serve history (max_backfill_events_per_request is 0)",
                svc.rooms.server_name
            ),
        ));
    }
    let parse = |name: &str| -> Result<Option<u64>> {
        req.query_param(name)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    Error::fed_bad_request(format!("`{name}` must be a non-negative integer"))
                })
            })
            .transpose()
    };
    let limit = parse("limit")?.unwrap_or(cap).min(cap).max(1);
    let before = parse("before_seq")?.unwrap_or(u64::MAX);
    let from = keys::event(room_id.as_str(), 0);
    let to = keys::event(room_id.as_str(), before);
    let mut rows =
        svc.rooms
            .store
            .range_rev::<StoredEvent>(T::Events, &from, &to, limit as usize)?;
    rows.reverse();
    let mut events = Vec::with_capacity(rows.len());
    let mut lowest = None;
    for (k, stored) in rows {
        let seq = keys::trailing_u64(&k);
        lowest.get_or_insert(seq);
        if stored.rejected {
            events.push(serde_json::json!({"seq": seq, "rejected": true}));
        } else if let Ok((e, _)) = crate::protocol::event::Event::parse(&stored.json) {
            events.push(e.to_wire_value(Some(seq)));
        }
    }
    let next_before_seq = lowest.filter(|s| *s > 1);
    Ok(json_reply(
        200,
        &BackfillAnswer {
            events,
            next_before_seq,
        },
    ))
}

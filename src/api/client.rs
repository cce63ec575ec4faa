//! Client routes (`/v1/*` except admin, SPEC §9): my profile, rooms,
//! messages, reactions, invitations.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::api::{json_reply, not_found_route, Request, Response, Services};
use crate::error::{Error, Result};
use crate::ids::{EventId, Fqid, RoomId};
use crate::limits::MESSAGES_PAGE_MAX;
use crate::protocol::event::{Content, Membership, ReactionAction};
use crate::rooms::{calls, commands, fqid_of, joined_room, views};
use crate::storage::{Participant, Room};

fn room_view(svc: &Services, room: &Room) -> Value {
    // A tenant with federation off shows none of its rooms as federated
    // (SPEC §14); they are again once it is on.
    let federated = svc.rooms.fed.enabled()
        && (RoomId::parse(&room.room_id).is_ok_and(|r| r.host() != svc.rooms.server_name)
            || svc
                .rooms
                .store
                .members(&RoomId::parse(&room.room_id).expect("stored ids are valid"))
                .map(|m| {
                    m.keys()
                        .any(|f| Fqid::parse(f).is_ok_and(|f| !svc.rooms.is_local(&f)))
                })
                .unwrap_or(false));
    json!({
        "room_id": room.room_id,
        "name": room.name,
        "room_type": room.room_type.as_str(),
        "federated": federated,
        "federate": room.federate,
    })
}

fn str_field<'a>(body: &'a Value, name: &str) -> Result<&'a str> {
    body.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| Error::bad_request(format!("`{name}` is required and must be a string")))
}

fn mentions_field(body: &Value) -> Result<Vec<Fqid>> {
    match body.get("mentions") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                Fqid::parse(v.as_str().unwrap_or(""))
                    .map_err(|_| Error::bad_request("`mentions` must be a list of FQIDs"))
            })
            .collect(),
        Some(_) => Err(Error::bad_request("`mentions` must be a list of FQIDs")),
    }
}

fn opt_event_id(body: &Value, name: &str) -> Result<Option<EventId>> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => Ok(Some(EventId::parse(v.as_str().unwrap_or("")).map_err(
            |_| Error::bad_request(format!("`{name}` must be an event_id")),
        )?)),
    }
}

/// `GET /v1/events`: a server-sent event (`event: sw.event`, data = the
/// event's wire JSON with its seq) for each new event in the caller's rooms.
fn live_stream(svc: &Arc<Services>, me: Fqid) -> Response {
    use futures_util::StreamExt;
    let rx = svc.rooms.subscribe();
    // Streams end at shutdown, so graceful shutdown does not wait on them.
    let shutdown = svc.shutdown.clone().cancelled_owned();
    let svc = svc.clone();
    let events = tokio_stream_from(rx).filter_map(move |ev| {
        let member = svc
            .rooms
            .store
            .has_joined(&me, &ev.room_id)
            .unwrap_or(false);
        let out = member.then(|| {
            Ok::<_, std::convert::Infallible>(
                warp::sse::Event::default()
                    .event("sw.event")
                    .id(ev.seq.to_string())
                    .data(String::from_utf8_lossy(&ev.wire).into_owned()),
            )
        });
        async move { out }
    });
    let events = events.take_until(shutdown);
    warp::reply::Reply::into_response(warp::sse::reply(warp::sse::keep_alive().stream(events)))
}

/// A broadcast receiver as a stream; a reader that lags skips what it lost.
fn tokio_stream_from(
    rx: tokio::sync::broadcast::Receiver<crate::rooms::LiveEvent>,
) -> impl futures_util::Stream<Item = crate::rooms::LiveEvent> {
    futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(ev) => return Some((ev, rx)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

pub async fn route(
    svc: &Arc<Services>,
    req: &Request,
    rest: &[&str],
    me: Participant,
) -> Result<Response> {
    match (req.method.as_str(), rest) {
        ("GET", ["events"]) => Ok(live_stream(svc, fqid_of(&svc.rooms, &me))),
        ("GET", ["me"]) => Ok(json_reply(
            200,
            &json!({"fqid": fqid_of(&svc.rooms, &me).to_string(), "display_name": me.display_name, "presence": me.presence}),
        )),
        ("PUT", ["me", "presence"]) => {
            let presence: crate::protocol::event::Presence = serde_json::from_value(req.json()?)
                .map_err(|e| Error::bad_request(format!("send {{\"status\": \"online\"|\"idle\"|\"dnd\"|\"offline\", \"status_msg\"?}}: {e}")))?;
            crate::rooms::presence::set(&svc.rooms, &me, presence.clone())?;
            Ok(json_reply(200, &json!({ "presence": presence })))
        }
        ("GET", ["me", "invitations"]) => Ok(json_reply(
            200,
            &json!({"invitations": views::invitations(&svc.rooms, &me)?}),
        )),
        ("POST", ["me", "invitations", id, answer @ ("accept" | "decline")]) => {
            let answered =
                commands::answer_invitation(&svc.rooms, &me, id, *answer == "accept").await?;
            // Queued for an unreachable host: accepted, not yet done.
            let status = match answered.state {
                commands::AnswerState::Pending => 202,
                _ => 200,
            };
            Ok(json_reply(status, &answered))
        }
        ("POST", ["rooms"]) => {
            let body = req.json()?;
            let room = commands::create_room(
                &svc.rooms,
                &me,
                str_field(&body, "name")?,
                body.get("room_type")
                    .and_then(Value::as_str)
                    .unwrap_or("standard"),
            )
            .await?;
            Ok(json_reply(200, &room_view(svc, &room)))
        }
        ("GET", ["rooms"]) => my_rooms(svc, &me),
        ("GET", ["rooms", room, "members"]) => members(svc, &me, &RoomId::parse(room)?),
        ("POST", ["rooms", room, "messages"]) => {
            let content = message_content(&req.json()?)?;
            let posted = commands::post(&svc.rooms, &me, &RoomId::parse(room)?, content).await?;
            Ok(json_reply(200, &posted))
        }
        ("POST", ["rooms", room, "call"]) => {
            let token = calls::call(&svc.rooms, &me, &RoomId::parse(room)?).await?;
            Ok(json_reply(200, &token))
        }
        ("GET", ["rooms", room, "messages"]) => messages(svc, req, &me, &RoomId::parse(room)?),
        ("POST", ["rooms", room, "reactions"]) => {
            let content = reaction_content(&req.json()?)?;
            let posted = commands::post(&svc.rooms, &me, &RoomId::parse(room)?, content).await?;
            Ok(json_reply(200, &posted))
        }
        ("POST", ["rooms", room, "invitations"]) => {
            let room_id = RoomId::parse(room)?;
            let fqid = Fqid::parse(str_field(&req.json()?, "fqid")?)?;
            let invite_id = commands::invite(&svc.rooms, &me, &room_id, &fqid).await?;
            Ok(json_reply(
                200,
                &json!({"invite_id": invite_id, "room_id": room_id.to_string(), "fqid": fqid.to_string()}),
            ))
        }
        ("GET", ["search"]) => {
            let q = req.query_param("q").unwrap_or_default();
            let hits = crate::rooms::search::search(&svc.rooms, &fqid_of(&svc.rooms, &me), &q)?;
            let results: Vec<Value> = hits
                .into_iter()
                .map(|(room_id, m)| {
                    let mut v = serde_json::to_value(m).unwrap_or_default();
                    v["room_id"] = Value::from(room_id);
                    v
                })
                .collect();
            Ok(json_reply(200, &json!({ "results": results })))
        }
        ("POST", ["rooms", room, "kick"]) => {
            let room_id = RoomId::parse(room)?;
            let target = Fqid::parse(str_field(&req.json()?, "fqid")?)?;
            Ok(json_reply(
                200,
                &commands::kick(&svc.rooms, &me, &room_id, &target).await?,
            ))
        }
        ("POST", ["me", "federated-dms"]) => {
            let other = Fqid::parse(str_field(&req.json()?, "fqid")?)?;
            let room = commands::federated_dm(&svc.rooms, &me, &other).await?;
            Ok(json_reply(200, &room_view(svc, &room)))
        }
        ("POST", ["rooms", room, "leave"]) => {
            let room_id = RoomId::parse(room)?;
            let me_fqid = fqid_of(&svc.rooms, &me);
            let content = Content::Member {
                membership: Membership::Leave,
                target: me_fqid,
                expires_at_ms: None,
                room: None,
            };
            Ok(json_reply(
                200,
                &commands::post(&svc.rooms, &me, &room_id, content).await?,
            ))
        }
        _ => Err(not_found_route(req)),
    }
}

/// `GET /v1/rooms`: the rooms the caller has joined.
fn my_rooms(svc: &Services, me: &Participant) -> Result<Response> {
    let mut rooms = Vec::new();
    for room_id in svc.rooms.store.rooms_of(&fqid_of(&svc.rooms, me))? {
        if let Some(room) = svc.rooms.store.room(&room_id)? {
            rooms.push(room_view(svc, &room));
        }
    }
    Ok(json_reply(200, &json!({ "rooms": rooms })))
}

/// `GET /v1/rooms/{room_id}/members`, with presence and the foreign flag.
fn members(svc: &Services, me: &Participant, room_id: &RoomId) -> Result<Response> {
    joined_room(&svc.rooms, room_id, &fqid_of(&svc.rooms, me))?;
    let now = svc.rooms.clock.now_ms();
    let members: Vec<Value> = svc
        .rooms
        .store
        .members(room_id)?
        .values()
        .filter(|m| m.is_present(now))
        .map(|m| {
            let fqid = Fqid::parse(&m.fqid).ok();
            let foreign = fqid.as_ref().is_some_and(|f| !svc.rooms.is_local(f));
            let presence =
                fqid.and_then(|f| crate::rooms::presence::of(&svc.rooms, &f).ok().flatten());
            json!({
                "fqid": m.fqid,
                "display_name": m.display_name,
                "membership": m.membership.as_str(),
                "foreign": foreign,
                "presence": presence,
            })
        })
        .collect();
    Ok(json_reply(200, &json!({ "members": members })))
}

/// The content of `POST /v1/rooms/{room_id}/messages`.
fn message_content(body: &Value) -> Result<Content> {
    Ok(Content::Message {
        body: str_field(body, "body")?.to_string(),
        thread_root: opt_event_id(body, "thread_root")?,
        reply_to: opt_event_id(body, "reply_to")?,
        mentions: mentions_field(body)?,
    })
}

/// The content of `POST /v1/rooms/{room_id}/reactions`.
fn reaction_content(body: &Value) -> Result<Content> {
    let action = match body.get("action").and_then(Value::as_str).unwrap_or("add") {
        "add" => ReactionAction::Add,
        "remove" => ReactionAction::Remove,
        _ => return Err(Error::bad_request("`action` must be add or remove")),
    };
    let target = EventId::parse(str_field(body, "target")?)
        .map_err(|_| Error::bad_request("`target` must be an event_id"))?;
    Ok(Content::Reaction {
        target,
        key: str_field(body, "key")?.to_string(),
        action,
    })
}

/// `GET /v1/rooms/{room_id}/messages?after_seq=&limit=`.
fn messages(svc: &Services, req: &Request, me: &Participant, room_id: &RoomId) -> Result<Response> {
    let after = req
        .query_param("after_seq")
        .map(|v| v.parse::<u64>())
        .transpose()
        .map_err(|_| Error::bad_request("`after_seq` must be an integer"))?
        .unwrap_or(0);
    let limit = req
        .query_param("limit")
        .map(|v| v.parse::<usize>())
        .transpose()
        .map_err(|_| Error::bad_request("`limit` must be an integer"))?
        .unwrap_or(100)
        .clamp(1, MESSAGES_PAGE_MAX);
    Ok(json_reply(
        200,
        &json!({ "messages": views::messages(&svc.rooms, me, room_id, after, limit)? }),
    ))
}

//! What participants do: create rooms, post, invite, answer invitations,
//! read history. Each flow checks the caller's rights, signs the event, and
//! hands it to the host sequencer or the replica queue.

use serde::Serialize;
use serde_json::Value;

use crate::clock::rfc3339;
use crate::error::{Code, Error, Result};
use crate::federation::peer_api;
use crate::ids::{EventId, Fqid, RoomId};
use crate::limits::GAP_FILL_DELAY_MS;
use crate::limits::{BACKFILL_EVENTS_MAX, MEMBERS_ANSWER_ENTRIES_MAX, SHORT_TEXT_BYTES_MAX};
use crate::protocol::event::{Content, Event, Membership, RoomSummary};
use crate::protocol::wire::{MembersAnswer, ProfileAnswer};
use crate::rooms::host::{self, Source};
use crate::rooms::Rooms;
use crate::rooms::{load_members, load_room, replica, Outcome};
use crate::storage::{
    self, keys, DeliveryState, Invitation, Member, Participant, Room, RoomType, StoredEvent, T,
};

pub fn fqid_of(rooms: &Rooms, p: &Participant) -> Fqid {
    Fqid::new(
        &crate::ids::LocalId::parse(&p.local_id).expect("stored local ids are valid"),
        &rooms.server_name,
    )
}

/// Sign a new event from one of our participants.
pub fn sign(rooms: &Rooms, room_id: &RoomId, sender: &Fqid, content: Content) -> Result<Event> {
    content.validate()?;
    let key = rooms.fed.keys.current()?;
    Ok(Event::create(
        room_id.clone(),
        sender.clone(),
        rooms.clock.now_ms(),
        content,
        &key.key_id,
        &key.signing,
    ))
}

/// The room, if `who` is a joined member of it.
pub fn joined_room(rooms: &Rooms, room_id: &RoomId, who: &Fqid) -> Result<Room> {
    let not_found = || {
        Error::not_found(format!(
            "room {room_id} not found among your rooms; check the id or ask to be invited"
        ))
    };
    let room = load_room(rooms, room_id)?.ok_or_else(not_found)?;
    let m: Option<Member> = rooms
        .store
        .get(T::Members, &keys::member(room_id.as_str(), who.as_str()))?;
    if !m.is_some_and(|m| m.membership == Membership::Join) {
        return Err(not_found());
    }
    Ok(room)
}

fn outcome_to_result(o: Outcome) -> Result<Option<u64>> {
    match o {
        Outcome::Accepted(seq) => Ok(Some(seq)),
        Outcome::Duplicate(seq) => Ok(seq),
        Outcome::Rejected(e) => Err(e),
    }
}

/// Sequence an event in a room we host (one outcome).
async fn commit_local(rooms: &Rooms, event: Event) -> Result<Option<u64>> {
    commit_as(rooms, event, Source::Local).await
}

async fn commit_as(rooms: &Rooms, event: Event, source: Source) -> Result<Option<u64>> {
    let mut out = host::commit(rooms, vec![(event, source)]).await?;
    outcome_to_result(out.pop().expect("one outcome per event"))
}

/// A room of this server for an admin route (SPEC §9): any room, member or
/// not; a type that never federates is refused before anything else.
pub fn room_for_admin(rooms: &Rooms, room_id: &RoomId) -> Result<Room> {
    let room = load_room(rooms, room_id)?.ok_or_else(|| {
        Error::not_found(format!(
            "room {room_id} is not known on {}; check the id",
            rooms.server_name
        ))
    })?;
    if !room.room_type.federable() {
        return Err(Error::new(
            Code::RoomTypeForbidden,
            format!("{} rooms never federate", room.room_type.as_str()),
        )
        .as_conflict());
    }
    Ok(room)
}

pub async fn create_room(
    rooms: &Rooms,
    creator: &Participant,
    name: &str,
    room_type: &str,
) -> Result<Room> {
    create_room_with(rooms, creator, name, room_type, None).await
}

async fn create_room_with(
    rooms: &Rooms,
    creator: &Participant,
    name: &str,
    room_type: &str,
    dm_pair: Option<(String, String)>,
) -> Result<Room> {
    if name.is_empty() || name.len() > SHORT_TEXT_BYTES_MAX {
        return Err(Error::bad_request(format!(
            "`name` must be 1-{SHORT_TEXT_BYTES_MAX} bytes"
        )));
    }
    let rt = RoomType::parse(room_type).ok_or_else(|| {
        Error::bad_request("`room_type` must be one of standard, dm, incognito, bridge, sidekick")
    })?;
    let room_id = RoomId::generate(&rooms.server_name);
    let room = Room {
        room_id: room_id.to_string(),
        name: name.to_string(),
        room_type: rt,
        federate: rt.federable() && rooms.fed.config.enabled,
        created_at_ms: rooms.clock.now_ms(),
        next_seq: 1,
        joined_seq: None,
        contiguous_seq: None,
        dm_pair,
        creator: Some(fqid_of(rooms, creator).to_string()),
    };
    let me = fqid_of(rooms, creator);
    // The creator's join is seq 1. It is committed as a host event whose
    // membership check is skipped: nobody can invite the first member.
    let join = sign(
        rooms,
        &room_id,
        &me,
        Content::Member {
            membership: Membership::Join,
            target: me.clone(),
            expires_at_ms: None,
            room: None,
        },
    )?;
    let mut plan = crate::rooms::Plan::new_room(room.clone());
    let mut w = storage::WriteSet::default();
    let _guard = rooms.locks.lock_all([room_id.clone()]).await;
    crate::rooms::write_event(&mut w, &join, 1, join.content_hash())?;
    plan.room.next_seq = 2;
    plan.apply_membership(rooms, &join, &mut w, None)?;
    plan.finish(&mut w)?;
    rooms.store.commit(&w)?;
    rooms.store.flush().await?;
    Ok(plan.room)
}

/// `{"event_id", "state"}` of a posted event.
#[derive(Debug, Serialize)]
pub struct Posted {
    pub event_id: String,
    pub state: &'static str,
}

/// Post an event to a room: sequenced at once if we host it, queued for the
/// host otherwise.
pub async fn post(
    rooms: &Rooms,
    p: &Participant,
    room_id: &RoomId,
    content: Content,
) -> Result<Posted> {
    let me = fqid_of(rooms, p);
    joined_room(rooms, room_id, &me)?;
    let event = sign(rooms, room_id, &me, content)?;
    let event_id = event.event_id.to_string();
    if room_id.host() == rooms.server_name {
        commit_local(rooms, event).await?;
        Ok(Posted {
            event_id,
            state: "sent",
        })
    } else {
        replica::submit(rooms, &event).await?;
        Ok(Posted {
            event_id,
            state: "pending",
        })
    }
}

#[derive(Debug, Serialize)]
pub struct MessageView {
    pub event_id: String,
    pub seq: Option<u64>,
    pub sender: String,
    pub body: String,
    pub thread_root: Option<String>,
    pub reply_to: Option<String>,
    pub mentions: Vec<String>,
    pub origin_ts: i64,
    pub state: &'static str,
    pub reactions: std::collections::BTreeMap<String, Vec<String>>,
}

pub fn message_view(stored: &StoredEvent, seq: Option<u64>) -> Option<MessageView> {
    let (event, _) = Event::parse(&stored.json).ok()?;
    let Content::Message {
        body,
        thread_root,
        reply_to,
        mentions,
    } = &event.content
    else {
        return None;
    };
    Some(MessageView {
        event_id: event.event_id.to_string(),
        seq,
        sender: event.sender.to_string(),
        body: body.clone(),
        thread_root: thread_root.map(|t| t.to_string()),
        reply_to: reply_to.map(|t| t.to_string()),
        mentions: mentions.iter().map(|m| m.to_string()).collect(),
        origin_ts: event.origin_ts_ms,
        state: stored.state.as_str(),
        reactions: Default::default(),
    })
}

/// Messages in host order after `after_seq`, then our not-yet-sequenced ones.
pub fn messages(
    rooms: &Rooms,
    p: &Participant,
    room_id: &RoomId,
    after_seq: u64,
    limit: usize,
) -> Result<Vec<MessageView>> {
    joined_room(rooms, room_id, &fqid_of(rooms, p))?;
    let from = keys::event(room_id.as_str(), after_seq.saturating_add(1));
    let to = keys::event(room_id.as_str(), u64::MAX);
    let mut out = Vec::new();
    let mut reactions: Vec<(String, String, String, bool)> = Vec::new();
    for (k, stored) in rooms
        .store
        .range::<StoredEvent>(T::Events, &from, &to, usize::MAX)?
    {
        if stored.rejected {
            continue;
        }
        let seq = Some(keys::trailing_u64(&k));
        if let Some(v) = message_view(&stored, seq) {
            if out.len() < limit {
                out.push(v);
            }
        } else if let Ok((e, _)) = Event::parse(&stored.json) {
            if let Content::Reaction {
                target,
                key,
                action,
            } = &e.content
            {
                let add = *action == crate::protocol::event::ReactionAction::Add;
                reactions.push((target.to_string(), key.clone(), e.sender.to_string(), add));
            }
        }
    }
    for (_, stored) in rooms
        .store
        .scan::<StoredEvent>(T::Pending, &storage::prefix(room_id.as_str()))?
    {
        if out.len() >= limit {
            break;
        }
        if let Some(v) = message_view(&stored, None) {
            out.push(v);
        }
    }
    for (target, key, sender, add) in reactions {
        if let Some(m) = out.iter_mut().find(|m| m.event_id == target) {
            let who = m.reactions.entry(key.clone()).or_default();
            who.retain(|s| *s != sender);
            if add {
                who.push(sender);
            }
            if who.is_empty() {
                m.reactions.remove(&key);
            }
        }
    }
    Ok(out)
}

/// Ask `fqid`'s server for its profile (signed GET). Any failure is the
/// inviter's answer (SPEC §6 step 1).
pub async fn fetch_profile(rooms: &Rooms, fqid: &Fqid) -> Result<ProfileAnswer> {
    peer_api::profile(&rooms.fed, fqid).await
}

/// Invite a local or foreign participant to a room `p` is in.
pub async fn invite(
    rooms: &Rooms,
    p: &Participant,
    room_id: &RoomId,
    target: &Fqid,
) -> Result<String> {
    let room = joined_room(rooms, room_id, &fqid_of(rooms, p))?;
    invite_into(rooms, p, room, target, Source::Local).await
}

/// `POST /v1/admin/rooms/{room_id}/federation/invite`: a server admin
/// invites into any room this server hosts without being a member; in a
/// room hosted elsewhere the host decides, so the admin must be joined.
pub async fn admin_invite(
    rooms: &Rooms,
    admin: &Participant,
    room_id: &RoomId,
    target: &Fqid,
) -> Result<String> {
    let room = room_for_admin(rooms, room_id)?;
    if room_id.host() != rooms.server_name {
        let me = fqid_of(rooms, admin);
        if joined_room(rooms, room_id, &me).is_err() {
            return Err(Error::forbidden(format!(
                "{room_id} is hosted by {}, which decides who may invite; join the room as {me} first",
                room_id.host()
            )));
        }
        return invite(rooms, admin, room_id, target).await;
    }
    invite_into(rooms, admin, room, target, Source::LocalAdmin).await
}

async fn invite_into(
    rooms: &Rooms,
    p: &Participant,
    room: Room,
    target: &Fqid,
    source: Source,
) -> Result<String> {
    let me = fqid_of(rooms, p);
    let room_id = &RoomId::parse(&room.room_id)?;
    // In a room hosted elsewhere, the invite goes to the host, which checks
    // it against the room (membership, foreign limit), sequences it and
    // delivers it (SPEC §6: any participant can invite).
    let hosted_here = room_id.host() == rooms.server_name;
    let mut display_name = None;
    if rooms.is_local(target) {
        if rooms.store.participant(&target.local_id())?.is_none() {
            return Err(Error::not_found(format!(
                "{target} does not exist on this server"
            )));
        }
    } else {
        if !room.room_type.federable() {
            return Err(Error::new(
                Code::RoomTypeForbidden,
                format!("{} rooms never federate", room.room_type.as_str()),
            )
            .as_conflict());
        }
        if !rooms.fed.config.enabled {
            return Err(Error::new(
                Code::TenantDisabled,
                format!(
                    "federation is disabled on {}; set federation.enabled = true to federate",
                    rooms.server_name
                ),
            )
            .as_conflict());
        }
        if !room.federate {
            return Err(Error::new(Code::RoomNotFederated, "federation is off for this room; an admin can enable it with PUT /v1/admin/rooms/{room_id}/federate").as_conflict());
        }
        let server = target.server();
        rooms.fed.admit(&server).map_err(Error::as_conflict)?;
        let foreign = crate::rooms::foreign_count(rooms, &load_members(rooms, room_id)?, false);
        if hosted_here && foreign >= rooms.fed.policy().max_foreign_participants_per_room {
            return Err(Error::new(Code::ForeignLimit, "this room has reached max_foreign_participants_per_room; raise it in the federation policy").as_conflict());
        }
        let profile = fetch_profile(rooms, target).await?;
        display_name = Some(profile.display_name);
    }
    let now = rooms.clock.now_ms();
    let content = Content::Member {
        membership: Membership::Invite,
        target: target.clone(),
        expires_at_ms: Some(now + rooms.fed.config.invite_ttl.as_millis() as i64),
        room: Some(RoomSummary {
            name: room.name.clone(),
            room_type: room.room_type.as_str().into(),
        }),
    };
    let event = sign(rooms, room_id, &me, content)?;
    let invite_id = event.event_id.to_string();
    if !hosted_here {
        replica::submit(rooms, &event).await?;
        return Ok(invite_id);
    }
    commit_as(rooms, event, source).await?;
    if let Some(name) = display_name {
        let k = keys::member(room_id.as_str(), target.as_str());
        if let Some(mut m) = rooms.store.get::<Member>(T::Members, &k)? {
            m.display_name = Some(name);
            rooms.store.put(T::Members, &k, &m)?;
        }
    }
    Ok(invite_id)
}

#[derive(Debug, Serialize)]
pub struct InvitationView {
    pub invite_id: String,
    pub room_id: String,
    pub room: RoomSummary,
    pub inviter: String,
    pub expires_at: String,
}

pub fn invitations(rooms: &Rooms, p: &Participant) -> Result<Vec<InvitationView>> {
    let me = fqid_of(rooms, p).to_string();
    let now = rooms.clock.now_ms();
    Ok(rooms
        .store
        .invitations_of(&me)?
        .into_iter()
        .filter(|i| i.expires_at_ms > now)
        .map(|i| InvitationView {
            invite_id: i.invite_id,
            room_id: i.room_id,
            room: i.room,
            inviter: i.inviter,
            expires_at: rfc3339(i.expires_at_ms),
        })
        .collect())
}

fn my_invitation(rooms: &Rooms, p: &Participant, invite_id: &str) -> Result<Invitation> {
    let me = fqid_of(rooms, p).to_string();
    // A scan of the caller's own invitations, which the cap keeps short.
    let inv: Invitation = rooms
        .store
        .invitations_of(&me)?
        .into_iter()
        .find(|i| i.invite_id == invite_id)
        .ok_or_else(|| {
            Error::not_found(format!(
                "no pending invitation {invite_id} for you; list them with GET /v1/me/invitations"
            ))
        })?;
    if inv.expires_at_ms <= rooms.clock.now_ms() {
        return Err(Error::new(
            Code::InviteExpired,
            "this invitation expired; ask a member of the room to invite you again",
        ));
    }
    Ok(inv)
}

/// Send one event straight to its room's host and wait (≤ 10 s). `None`
/// means the host could not be reached.
pub async fn send_to_host(rooms: &Rooms, event: &Event) -> Result<Option<Outcome>> {
    Ok(peer_api::send_to_host(&rooms.fed, event)
        .await?
        .map(|answer| match answer {
            Ok(seq) => Outcome::Accepted(seq),
            Err(e) => Outcome::Rejected(e),
        }))
}

/// Accept or decline an invitation. Answers `{"room_id", "state"}`.
pub async fn answer_invitation(
    rooms: &Rooms,
    p: &Participant,
    invite_id: &str,
    accept: bool,
) -> Result<(u16, serde_json::Value)> {
    EventId::parse(invite_id).map_err(|_| Error::not_found("no such invitation"))?;
    let inv = my_invitation(rooms, p, invite_id)?;
    let room_id = RoomId::parse(&inv.room_id)?;
    let me = fqid_of(rooms, p);
    let membership = if accept {
        Membership::Join
    } else {
        Membership::Decline
    };
    let event = sign(
        rooms,
        &room_id,
        &me,
        Content::Member {
            membership,
            target: me.clone(),
            expires_at_ms: None,
            room: None,
        },
    )?;
    let state = |s: &str| serde_json::json!({"room_id": room_id.to_string(), "state": s});
    if room_id.host() == rooms.server_name {
        commit_local(rooms, event).await?;
        return Ok((200, state(if accept { "joined" } else { "declined" })));
    }
    if accept {
        let rt = RoomType::parse(&inv.room.room_type).unwrap_or(RoomType::Standard);
        replica::ensure_room(rooms, &room_id, &inv.room.name, rt)?;
    }
    match send_to_host(rooms, &event).await? {
        Some(Outcome::Accepted(seq)) | Some(Outcome::Duplicate(Some(seq))) => {
            if replica::settle(rooms, &event, seq).await? == replica::Settled::SeqTaken {
                return Err(Error::new(
                    Code::Conflict,
                    format!("{} answered with seq {seq}, which already holds another event of the room; nothing was applied (ask its admin to check the room)", room_id.host()),
                ));
            }
            rooms.store.remove_invitation(&inv)?;
            if accept {
                if let Err(e) = sync_after_join(rooms, &room_id, seq).await {
                    tracing::warn!(room_id = %room_id, error = %e, "joined, but could not load members and history yet");
                }
            }
            rooms.store.flush().await?;
            Ok((200, state(if accept { "joined" } else { "declined" })))
        }
        Some(Outcome::Rejected(e)) => {
            if accept && load_members(rooms, &room_id)?.is_empty() {
                rooms.store.remove(T::Rooms, room_id.as_str().as_bytes())?;
            }
            if matches!(e.code, Code::InviteExpired | Code::NotMember) {
                rooms.store.remove_invitation(&inv)?;
            }
            Err(e)
        }
        Some(Outcome::Duplicate(None)) | None => {
            replica::submit(rooms, &event).await?;
            Ok((202, state("pending")))
        }
    }
}

/// After our join at `join_seq`: the member list, and history before it.
pub async fn sync_after_join(rooms: &Rooms, room_id: &RoomId, join_seq: u64) -> Result<()> {
    if let Some(answer) = peer_api::members(&rooms.fed, room_id).await? {
        store_members(rooms, room_id, &answer).await?;
    }
    backfill(rooms, room_id, Some(join_seq), BACKFILL_EVENTS_MAX).await?;
    Ok(())
}

/// Take the host's member list after our join. It is the host's word, so
/// it is bounded ([`MEMBERS_ANSWER_ENTRIES_MAX`] entries, names of at most
/// [`SHORT_TEXT_BYTES_MAX`] bytes) and never touches our own participants,
/// whose membership only their own events decide.
async fn store_members(rooms: &Rooms, room_id: &RoomId, answer: &MembersAnswer) -> Result<()> {
    let _guard = rooms.locks.lock_all([room_id.clone()]).await;
    let mut w = storage::WriteSet::default();
    if answer.members.len() > MEMBERS_ANSWER_ENTRIES_MAX {
        tracing::warn!(room_id = %room_id, listed = answer.members.len(), "the host listed more members than we take; keeping the first {MEMBERS_ANSWER_ENTRIES_MAX}");
    }
    for m in answer.members.iter().take(MEMBERS_ANSWER_ENTRIES_MAX) {
        let Some(membership) = Membership::parse(&m.membership) else {
            continue;
        };
        let Ok(f) = Fqid::parse(&m.fqid) else {
            continue;
        };
        if rooms.is_local(&f) {
            continue;
        }
        let k = keys::member(room_id.as_str(), f.as_str());
        let prev: Option<Member> = rooms.store.get(T::Members, &k)?;
        let mut member = prev.unwrap_or(Member {
            fqid: f.to_string(),
            membership,
            display_name: None,
            invite_expires_at_ms: None,
        });
        member.membership = membership;
        crate::rooms::set_user_room(
            rooms,
            &f,
            room_id.as_str(),
            membership == Membership::Join,
            &mut w,
        )?;
        if let Some(name) = &m.display_name {
            // Truncated rather than dropped: the start of a long name still
            // tells members apart, and no name at all shows a bare FQID.
            member.display_name = Some(truncate_at_char_boundary(name, SHORT_TEXT_BYTES_MAX));
        }
        w.put(T::Members, k, &member)?;
    }
    rooms.store.commit(&w)?;
    Ok(())
}

/// The longest prefix of `text` of at most `bytes_max` bytes that ends
/// on a character boundary.
fn truncate_at_char_boundary(text: &str, bytes_max: usize) -> String {
    let mut end = text.len().min(bytes_max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Fetch history before `before_seq` from the host, verify every event, and
/// store those we lack. Answers `(fetched, stored, rejected)`.
pub async fn backfill(
    rooms: &Rooms,
    room_id: &RoomId,
    before_seq: Option<u64>,
    limit: u64,
) -> Result<(u64, u64, u64)> {
    let answer = peer_api::backfill(&rooms.fed, room_id, before_seq, limit).await?;
    let fetched = answer.events.len() as u64;
    let (mut stored, mut rejected) = (0, 0);
    let mut w = storage::WriteSet::default();
    let _guard = rooms.locks.lock_all([room_id.clone()]).await;
    let mut top = 0;
    for value in answer.events {
        if value.get("rejected").and_then(Value::as_bool) == Some(true) {
            // The host's tombstone: the gap at this seq is real.
            if let Some(seq) = value.get("seq").and_then(Value::as_u64) {
                let k = keys::event(room_id.as_str(), seq);
                if rooms.store.get::<StoredEvent>(T::Events, &k)?.is_none() {
                    w.put(
                        T::Events,
                        k,
                        &StoredEvent {
                            json: Vec::new(),
                            state: DeliveryState::Sent,
                            rejected: true,
                        },
                    )?;
                    top = top.max(seq.saturating_add(1));
                }
            }
            continue;
        }
        let parsed = Event::from_value(value);
        let ok = match parsed {
            Ok((event, Some(seq))) if event.room_id == *room_id => {
                match crate::federation::auth::verify_event(&rooms.fed, &event).await {
                    Ok(()) => Some((event, seq)),
                    Err(_) => None,
                }
            }
            _ => None,
        };
        let Some((event, seq)) = ok else {
            rejected += 1;
            continue;
        };
        let k = keys::event(room_id.as_str(), seq);
        if rooms.store.get::<StoredEvent>(T::Events, &k)?.is_some() {
            continue;
        }
        crate::rooms::write_event(&mut w, &event, seq, event.content_hash())?;
        top = top.max(seq.saturating_add(1));
        stored += 1;
    }
    rooms.store.commit(&w)?;
    // What was filled moves the replica's contiguous mark on, and next_seq
    // past everything stored (the replica relies on nothing being stored
    // at or above it).
    if let Some(mut plan) = crate::rooms::Plan::load(rooms, room_id)? {
        plan.room.next_seq = plan.room.next_seq.max(top);
        plan.advance_contiguous(rooms, &std::collections::BTreeSet::new())?;
        let mut room_write = storage::WriteSet::default();
        room_write.put(T::Rooms, room_id.as_str().as_bytes().to_vec(), &plan.room)?;
        rooms.store.commit(&room_write)?;
    }
    rooms.store.flush().await?;
    Ok((fetched, stored, rejected))
}

/// Our pending events' delivery state, for tests and the message list.
pub fn pending_state(
    rooms: &Rooms,
    room_id: &RoomId,
    event_id: &str,
) -> Result<Option<DeliveryState>> {
    Ok(rooms
        .store
        .get::<StoredEvent>(T::Pending, &keys::pending(room_id.as_str(), event_id))?
        .map(|s| s.state))
}

/// Kick `target` from a room we host. Only room admins (the creator or a
/// server admin) may; kicks never come from replicas (SPEC §6).
pub async fn kick(
    rooms: &Rooms,
    p: &Participant,
    room_id: &RoomId,
    target: &Fqid,
) -> Result<Posted> {
    let me = fqid_of(rooms, p);
    let room = joined_room(rooms, room_id, &me)?;
    if room_id.host() != rooms.server_name {
        return Err(Error::forbidden(format!(
            "only admins of the host {} can kick from this room",
            room_id.host()
        )));
    }
    let is_admin =
        p.power_level == storage::PowerLevel::Admin || room.creator.as_deref() == Some(me.as_str());
    if !is_admin {
        return Err(Error::forbidden(
            "only the room's creator or a server admin can kick",
        ));
    }
    let event = sign(
        rooms,
        room_id,
        &me,
        Content::Member {
            membership: Membership::Kick,
            target: target.clone(),
            expires_at_ms: None,
            room: None,
        },
    )?;
    let event_id = event.event_id.to_string();
    commit_local(rooms, event).await?;
    Ok(Posted {
        event_id,
        state: "sent",
    })
}

/// `POST /v1/me/federated-dms`: the DM room between the caller and `fqid`,
/// created (and the invitation sent) the first time, the same room after.
pub async fn federated_dm(rooms: &Rooms, p: &Participant, other: &Fqid) -> Result<Room> {
    let me = fqid_of(rooms, p);
    if rooms.is_local(other) {
        return Err(Error::bad_request(format!(
            "{other} is on this server; federated DMs are with participants of other servers"
        )));
    }
    let mut pair = [me.to_string(), other.to_string()];
    pair.sort();
    let pair = (pair[0].clone(), pair[1].clone());
    // One DM per pair: a lock per caller (a synthetic id in the room lock
    // table, never a real room) keeps two concurrent requests from making two.
    let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(me.as_str().as_bytes()).into();
    let lock_name: String = digest.iter().take(10).map(|b| format!("{b:02x}")).collect();
    let lock_id = RoomId::parse(&format!("!dm{lock_name}:{}", rooms.server_name))?;
    let _guard = rooms.locks.lock_all([lock_id]).await;
    for room in crate::rooms::presence::rooms_of(rooms, &me)? {
        if let Some(r) = load_room(rooms, &room)? {
            if r.dm_pair.as_ref() == Some(&pair) {
                return Ok(r);
            }
        }
    }
    // Check the other side exists before making anything.
    fetch_profile(rooms, other).await?;
    let room = create_room_with(rooms, p, &format!("{me} and {other}"), "dm", Some(pair)).await?;
    invite(rooms, p, &RoomId::parse(&room.room_id)?, other).await?;
    Ok(room)
}

/// Fill the seqs in `[lo, hi)` of `room_id` that are still missing after a
/// short wait, from the host's backfill endpoint (SPEC §6).
pub async fn fill_gap(rooms: &Rooms, room_id: &RoomId, lo: u64, hi: u64) -> Result<u64> {
    tokio::time::sleep(std::time::Duration::from_millis(GAP_FILL_DELAY_MS)).await;
    let hi = hi.min(lo.saturating_add(BACKFILL_EVENTS_MAX));
    let mut missing = Vec::new();
    for seq in lo..hi {
        if !rooms
            .store
            .contains(T::Events, &keys::event(room_id.as_str(), seq))?
        {
            missing.push(seq);
        }
    }
    let (Some(first), Some(last)) = (missing.first(), missing.last()) else {
        return Ok(0);
    };
    tracing::info!(room_id = %room_id, from = first, to = last, "filling a gap in the room's history from its host");
    let (_, stored, _) = backfill(
        rooms,
        room_id,
        Some(last.saturating_add(1)),
        last - first + 1,
    )
    .await?;
    Ok(stored)
}

/// Record a foreign participant's display name in every room they have
/// joined, found through their `user_rooms` rows (never a members scan).
pub fn set_display_name(rooms: &Rooms, fqid: &Fqid, name: &str) -> Result<usize> {
    let mut updated = 0;
    for room_id in crate::rooms::presence::rooms_of(rooms, fqid)? {
        let k = keys::member(room_id.as_str(), fqid.as_str());
        if let Some(mut m) = rooms.store.get::<Member>(T::Members, &k)? {
            if m.display_name.as_deref() != Some(name) {
                m.display_name = Some(name.to_string());
                rooms.store.put(T::Members, &k, &m)?;
                updated += 1;
            }
        }
    }
    Ok(updated)
}

//! What participants (and admins) do: create rooms, post, invite, answer
//! invitations, kick, open DMs. Each command checks the caller's rights,
//! signs the event, and hands it to the host sequencer or the replica
//! queue; answers are domain values, never HTTP statuses.

use serde::Serialize;

use crate::error::{Code, Error, Result};
use crate::federation::peer_api;
use crate::ids::{EventId, Fqid, RoomId};
use crate::limits::SHORT_TEXT_BYTES_MAX;
use crate::protocol::event::{Content, Event, Membership, RoomSummary};
use crate::protocol::wire::ProfileAnswer;
use crate::rooms::host::{self, Source};
use crate::rooms::Rooms;
use crate::rooms::{fqid_of, history, joined_room};
use crate::rooms::{replica, Outcome};
use crate::storage::{self, Invitation, Participant, Room, RoomType, T};

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
pub(crate) fn room_for_admin(rooms: &Rooms, room_id: &RoomId) -> Result<Room> {
    let room = rooms.store.room(room_id)?.ok_or_else(|| {
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

/// Ask `fqid`'s server for its profile (signed GET). Any failure is the
/// inviter's answer (SPEC §6 step 1).
pub(crate) async fn fetch_profile(rooms: &Rooms, fqid: &Fqid) -> Result<ProfileAnswer> {
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
pub(crate) async fn admin_invite(
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
        if !rooms.fed.enabled() {
            return Err(rooms.fed.disabled_error().as_conflict());
        }
        if !room.federate {
            return Err(Error::new(Code::RoomNotFederated, "federation is off for this room; an admin can enable it with PUT /v1/admin/rooms/{room_id}/federate").as_conflict());
        }
        let server = target.server();
        rooms.fed.admit(&server).map_err(Error::as_conflict)?;
        let foreign = crate::rooms::foreign_count(rooms, &rooms.store.members(room_id)?, false);
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
        if let Some(mut m) = rooms.store.member(room_id.as_str(), target.as_str())? {
            m.display_name = Some(name);
            rooms.store.put_member(room_id.as_str(), &m)?;
        }
    }
    Ok(invite_id)
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
pub(crate) async fn send_to_host(rooms: &Rooms, event: &Event) -> Result<Option<Outcome>> {
    Ok(peer_api::send_to_host(&rooms.fed, event)
        .await?
        .map(|answer| match answer {
            Ok(seq) => Outcome::Accepted(seq),
            Err(e) => Outcome::Rejected(e),
        }))
}

/// Where an answered invitation stands (SPEC §9 `{"room_id", "state"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Answered {
    pub room_id: String,
    pub state: AnswerState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerState {
    Joined,
    Declined,
    /// The host could not be reached: the answer is queued for it.
    Pending,
}

/// Accept or decline an invitation.
pub async fn answer_invitation(
    rooms: &Rooms,
    p: &Participant,
    invite_id: &str,
    accept: bool,
) -> Result<Answered> {
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
    let state = |state| Answered {
        room_id: room_id.to_string(),
        state,
    };
    let done = if accept {
        AnswerState::Joined
    } else {
        AnswerState::Declined
    };
    if room_id.host() == rooms.server_name {
        commit_local(rooms, event).await?;
        return Ok(state(done));
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
                if let Err(e) = history::sync_after_join(rooms, &room_id, seq).await {
                    tracing::warn!(room_id = %room_id, error = %e, "joined, but could not load members and history yet");
                }
            }
            rooms.store.flush().await?;
            Ok(state(done))
        }
        Some(Outcome::Rejected(e)) => {
            if accept && rooms.store.members(&room_id)?.is_empty() {
                rooms.store.remove(T::Rooms, room_id.as_str().as_bytes())?;
            }
            if matches!(e.code, Code::InviteExpired | Code::NotMember) {
                rooms.store.remove_invitation(&inv)?;
            }
            Err(e)
        }
        Some(Outcome::Duplicate(None)) | None => {
            replica::submit(rooms, &event).await?;
            Ok(state(AnswerState::Pending))
        }
    }
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
pub(crate) async fn federated_dm(rooms: &Rooms, p: &Participant, other: &Fqid) -> Result<Room> {
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
    for room in rooms.store.rooms_of(&me)? {
        if let Some(r) = rooms.store.room(&room)? {
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

/// Record a foreign participant's display name in every room they have
/// joined, found through their `user_rooms` rows (never a members scan).
pub(crate) fn set_display_name(rooms: &Rooms, fqid: &Fqid, name: &str) -> Result<usize> {
    let mut updated = 0;
    for room_id in rooms.store.rooms_of(fqid)? {
        if let Some(mut m) = rooms.store.member(room_id.as_str(), fqid.as_str())? {
            if m.display_name.as_deref() != Some(name) {
                m.display_name = Some(name.to_string());
                rooms.store.put_member(room_id.as_str(), &m)?;
                updated += 1;
            }
        }
    }
    Ok(updated)
}

/// What an admin's refresh of a foreign participant found (SPEC §9
/// `federation/foreign/{fqid}/refresh`).
#[derive(Debug, Serialize)]
pub struct Refreshed {
    pub fqid: String,
    pub display_name: String,
    /// As the peer sent it (presence is ephemeral; it is shown, not kept).
    pub presence: Option<serde_json::Value>,
    /// Rooms whose member row took the new display name.
    pub rooms_updated: usize,
}

/// Fetch a foreign participant's server descriptor and profile again,
/// and take their display name in every room they have joined. Both
/// contact the peer, so neither goes to one our policy refuses.
pub(crate) async fn refresh_foreign(rooms: &Rooms, fqid: &Fqid) -> Result<Refreshed> {
    let server = fqid.server();
    rooms.fed.admit(&server).map_err(Error::as_conflict)?;
    rooms
        .fed
        .verifier
        .refresh(&server)
        .await
        .map_err(Error::as_conflict)?;
    let profile = fetch_profile(rooms, fqid).await?;
    let rooms_updated = set_display_name(rooms, fqid, &profile.display_name)?;
    Ok(Refreshed {
        fqid: profile.fqid,
        display_name: profile.display_name,
        presence: profile.presence,
        rooms_updated,
    })
}

/// Turn federation of a room on or off (SPEC §9 `rooms/{room_id}/federate`),
/// under the room's lock, durably.
pub(crate) async fn set_federate(rooms: &Rooms, room_id: &RoomId, enabled: bool) -> Result<()> {
    let _guard = rooms.locks.lock_all([room_id.clone()]).await;
    let mut room = room_for_admin(rooms, room_id)?;
    room.federate = enabled;
    rooms
        .store
        .put(T::Rooms, room_id.as_str().as_bytes(), &room)?;
    rooms.store.flush().await
}

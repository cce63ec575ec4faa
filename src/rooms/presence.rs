//! Presence (SPEC §5): our participants' status goes as an ephemeral EDU to
//! every server that shares a joined room with them; a peer's EDUs are
//! taken only for its own participants joined in a room we know, and the
//! newest `ts` wins.

use std::collections::BTreeSet;

use crate::error::{Error, Result};
use crate::ids::{Fqid, ServerName};
use crate::limits::SHORT_TEXT_BYTES_MAX;
use crate::protocol::event::{Membership, Presence, PresenceEdu};
use crate::rooms::fqid_of;
use crate::rooms::Rooms;
use crate::storage::{self, ForeignPresence, Participant, T};

/// Other servers with a joined participant in a room `fqid` has joined.
pub(crate) fn servers_sharing_a_room(rooms: &Rooms, fqid: &Fqid) -> Result<BTreeSet<ServerName>> {
    let mut servers = BTreeSet::new();
    for room in rooms.store.rooms_of(fqid)? {
        servers.extend(crate::rooms::participating_servers(
            rooms,
            &rooms.store.members(&room)?,
        ));
    }
    Ok(servers)
}

/// `PUT /v1/me/presence`: store it and tell the servers that share a room.
pub fn set(rooms: &Rooms, p: &Participant, presence: Presence) -> Result<()> {
    if presence
        .status_msg
        .as_ref()
        .is_some_and(|m| m.len() > SHORT_TEXT_BYTES_MAX)
    {
        return Err(Error::bad_request(format!(
            "`status_msg` is limited to {SHORT_TEXT_BYTES_MAX} bytes"
        )));
    }
    let mut updated = p.clone();
    updated.presence = presence.clone();
    rooms
        .store
        .put(T::Participants, p.local_id.as_bytes(), &updated)?;
    let me = fqid_of(rooms, p);
    let edu = PresenceEdu {
        sender: me.clone(),
        ts_ms: rooms.clock.now_ms(),
        presence,
    }
    .to_value();
    let policy = rooms.fed.policy();
    for server in servers_sharing_a_room(rooms, &me)? {
        if policy.admit(&server).is_ok() {
            rooms
                .fed
                .outbox
                .queue_edu(&server, me.as_str(), edu.clone());
        }
    }
    Ok(())
}

/// A presence EDU from `origin`: kept if the sender is `origin`'s own and
/// it is newer than what we hold.
pub fn receive(rooms: &Rooms, origin: &ServerName, edu: &PresenceEdu) -> Result<bool> {
    if edu.sender.server() != *origin {
        return Ok(false);
    }
    // Only for a participant joined in a room we know: anything else is a
    // name the peer made up, and would be a row kept for ever.
    let joined_somewhere = !rooms
        .store
        .scan_limit::<()>(T::UserRooms, &storage::prefix(edu.sender.as_str()), 1)?
        .is_empty();
    if !joined_somewhere {
        return Ok(false);
    }
    let key = edu.sender.as_str().as_bytes();
    let held: Option<ForeignPresence> = rooms.store.get(T::Presence, key)?;
    if held.is_some_and(|h| h.ts_ms >= edu.ts_ms) {
        return Ok(false);
    }
    rooms.store.put(
        T::Presence,
        key,
        &ForeignPresence {
            ts_ms: edu.ts_ms,
            presence: edu.presence.clone(),
        },
    )?;
    Ok(true)
}

/// What we know of anyone's presence: ours from the participant row,
/// foreign from the last EDU.
pub fn of(rooms: &Rooms, fqid: &Fqid) -> Result<Option<Presence>> {
    if rooms.is_local(fqid) {
        return Ok(rooms
            .store
            .participant(&fqid.local_id())?
            .map(|p| p.presence));
    }
    Ok(rooms
        .store
        .get::<ForeignPresence>(T::Presence, fqid.as_str().as_bytes())?
        .map(|f| f.presence))
}

/// Does `server` share a joined room with our participant `fqid`?
pub(crate) fn shares_room(rooms: &Rooms, fqid: &Fqid, server: &ServerName) -> Result<bool> {
    for room in rooms.store.rooms_of(fqid)? {
        let members = rooms.store.members(&room)?;
        let shared = members.values().any(|m| {
            m.membership == Membership::Join
                && Fqid::parse(&m.fqid).is_ok_and(|f| f.server() == *server)
        });
        if shared {
            return Ok(true);
        }
    }
    Ok(false)
}

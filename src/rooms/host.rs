//! The sequencer of rooms we host (SPEC §6): check each event against the
//! room's state, give it the next `seq`, store it, and queue it for every
//! participating server, all in one transaction per batch.

use std::collections::{BTreeSet, HashMap};

use crate::error::{Code, Error, Result};
use crate::ids::{Fqid, RoomId, ServerName};
use crate::protocol::event::{Content, Event, Membership};
use crate::rooms::Rooms;
use crate::rooms::{
    dedup, foreign_count, is_joined, participating_servers, write_event, InviteCap, Outcome, Plan,
};
use crate::storage::WriteSet;

/// Who handed us an event to sequence.
#[derive(Debug, Clone)]
pub enum Source {
    /// One of our participants, already checked by the local API.
    Local,
    /// One of our server admins acting on a room through the admin API
    /// (SPEC §9): an invite from them needs no membership.
    LocalAdmin,
    /// A replica, in a request signed by this server.
    Peer(ServerName),
}

fn foreign_limit() -> Error {
    Error::new(Code::ForeignLimit, "the room has reached max_foreign_participants_per_room on its host; its admin can raise the limit")
}

fn not_member(sender: &Fqid, room: &str) -> Error {
    Error::new(
        Code::NotMember,
        format!("{sender} is not a joined member of {room}; only members can send to a room"),
    )
}

/// SPEC §6 "What the host accepts from a replica". Local events were
/// checked by the local API; both kinds pass the membership rules that
/// keep room state consistent.
fn check(rooms: &Rooms, plan: &Plan, event: &Event, source: &Source, now_ms: i64) -> Result<()> {
    let room = &plan.room;
    if let Source::Peer(peer) = source {
        if !room.room_type.federable() {
            return Err(Error::new(
                Code::RoomTypeForbidden,
                format!("{} rooms never federate", room.room_type.as_str()),
            ));
        }
        if !room.federate {
            return Err(Error::new(
                Code::RoomNotFederated,
                format!("room {} has federation turned off on {}; its admin can enable it with PUT /v1/admin/rooms/{{room_id}}/federate", room.room_id, rooms.server_name),
            ));
        }
        if event.origin != *peer {
            return Err(Error::bad_event(format!(
                "event origin {} differs from the sending server {peer}; a replica sends only its own participants' events",
                event.origin
            )));
        }
    }
    let sender = event.sender.as_str();
    match &event.content {
        Content::Member {
            membership, target, ..
        } => {
            match membership {
                Membership::Join => {
                    if target != &event.sender {
                        return Err(Error::bad_event("a join's target must be its sender"));
                    }
                    match plan.members.get(sender) {
                    Some(m) if m.membership == Membership::Join => {
                        return Err(Error::bad_event(format!("{sender} has already joined")));
                    }
                    Some(m) if m.membership == Membership::Invite => {
                        if m.invite_expires_at_ms.is_some_and(|e| now_ms >= e) {
                            return Err(Error::new(
                                Code::InviteExpired,
                                format!("the invitation of {sender} to {} expired; ask a member for a new one", room.room_id),
                            ));
                        }
                        if !rooms.is_local(&event.sender) && foreign_count(rooms, &plan.members, true) >= rooms.fed.policy().max_foreign_participants_per_room {
                            return Err(foreign_limit());
                        }
                    }
                    _ => {
                        return Err(Error::new(
                            Code::NotMember,
                            format!("{sender} has no pending invitation to {}; ask a member to invite them", room.room_id),
                        ))
                    }
                }
                }
                Membership::Decline => {
                    if target != &event.sender {
                        return Err(Error::bad_event("a decline's target must be its sender"));
                    }
                    if !plan
                        .members
                        .get(sender)
                        .is_some_and(|m| m.membership == Membership::Invite)
                    {
                        return Err(Error::new(
                            Code::NotMember,
                            format!("{sender} has no pending invitation to decline"),
                        ));
                    }
                }
                Membership::Leave => {
                    if target != &event.sender {
                        return Err(Error::bad_event(
                            "a leave's target must be its sender; use kick to remove someone else",
                        ));
                    }
                    if !is_joined(&plan.members, sender) {
                        return Err(not_member(&event.sender, &room.room_id));
                    }
                }
                Membership::Invite => {
                    if !matches!(source, Source::LocalAdmin) && !is_joined(&plan.members, sender) {
                        return Err(not_member(&event.sender, &room.room_id));
                    }
                    if is_joined(&plan.members, target.as_str()) {
                        return Err(Error::bad_event(format!("{target} has already joined")));
                    }
                    if !rooms.is_local(target)
                        && foreign_count(rooms, &plan.members, false)
                            >= rooms.fed.policy().max_foreign_participants_per_room
                    {
                        return Err(foreign_limit());
                    }
                }
                Membership::Kick => {
                    if matches!(source, Source::Peer(_)) {
                        return Err(Error::new(
                            Code::NotMember,
                            "kicks come only from the host's own room admins",
                        ));
                    }
                    if !is_joined(&plan.members, target.as_str())
                        && !plan
                            .members
                            .get(target.as_str())
                            .is_some_and(|m| m.membership == Membership::Invite)
                    {
                        return Err(Error::bad_event(format!("{target} is not in the room")));
                    }
                }
            }
        }
        Content::Message { .. } | Content::Reaction { .. } => {
            if !is_joined(&plan.members, sender) {
                return Err(not_member(&event.sender, &room.room_id));
            }
        }
    }
    Ok(())
}

/// Check, sequence, store and fan out a batch. The answer has one outcome
/// per input, in order. Durable (flushed) before it returns.
pub async fn commit(rooms: &Rooms, batch: Vec<(Event, Source)>) -> Result<Vec<Outcome>> {
    let room_ids: BTreeSet<RoomId> = batch.iter().map(|(e, _)| e.room_id.clone()).collect();
    let guards = rooms.locks.lock_all(room_ids.iter().cloned()).await;
    let now_ms = rooms.clock.now_ms();
    let invite_ttl_ms = rooms.fed.config.invite_ttl.as_millis() as i64;
    let policy = rooms.fed.policy();

    let mut plans: HashMap<RoomId, Plan> = HashMap::new();
    for r in &room_ids {
        if let Some(p) = Plan::load(rooms, r)? {
            plans.insert(r.clone(), p);
        }
    }
    let mut w = WriteSet::default();
    let mut seen: HashMap<(ServerName, String), [u8; 32]> = HashMap::new();
    let mut woken: BTreeSet<ServerName> = BTreeSet::new();
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut live = Vec::new();
    let mut invite_cap = InviteCap::default();

    for (event, source) in &batch {
        let hash = event.content_hash();
        let id_key = (event.origin.clone(), event.event_id.to_string());
        if let Some(prev) = seen.get(&id_key) {
            outcomes.push(if *prev == hash {
                Outcome::Duplicate(None)
            } else {
                Outcome::Rejected(Error::bad_event(
                    "the same event_id twice with different content",
                ))
            });
            continue;
        }
        if let Some(o) = dedup(rooms, event, &hash)? {
            outcomes.push(o);
            continue;
        }
        let Some(plan) = plans.get_mut(&event.room_id) else {
            outcomes.push(Outcome::Rejected(Error::new(
                Code::RoomNotFound,
                format!(
                    "room {} does not exist on {}",
                    event.room_id, rooms.server_name
                ),
            )));
            continue;
        };
        if let Err(e) =
            check(rooms, plan, event, source, now_ms).and_then(|()| invite_cap.admit(rooms, event))
        {
            outcomes.push(Outcome::Rejected(e));
            continue;
        }
        seen.insert(id_key, hash);
        let seq = plan.room.next_seq;
        let Some(next_seq) = seq.checked_add(1) else {
            outcomes.push(Outcome::Rejected(Error::bad_event(format!(
                "room {} has used every seq; it takes no more events",
                event.room_id
            ))));
            continue;
        };
        plan.room.next_seq = next_seq;
        write_event(&mut w, event, seq, hash)?;

        // Fan out to servers participating before this event (so a kicked or
        // leaving server learns it), plus an invitee's server, minus the
        // event's origin (never echoed) and us.
        let mut targets = participating_servers(rooms, &plan.members);
        if let Content::Member {
            target,
            membership: Membership::Invite | Membership::Kick | Membership::Leave,
            ..
        } = &event.content
        {
            if !rooms.is_local(target) {
                targets.insert(target.server());
            }
        }
        targets.remove(&event.origin);
        let expires = match &event.content {
            Content::Member {
                membership: Membership::Invite,
                ..
            } => Some(now_ms + invite_ttl_ms),
            _ => None,
        };
        plan.apply_membership(rooms, event, &mut w, expires)?;
        let wire = event.to_wire_bytes(Some(seq));
        for peer in targets {
            if let Err(e) = policy.admit(&peer) {
                rooms.fed.audit(
                    "federation.policy_rejected",
                    Some(&peer),
                    Some(&event.event_id.to_string()),
                    Some(event.room_id.as_str()),
                    Some(e.code),
                    "not sent: our policy refuses this peer",
                );
                continue;
            }
            rooms
                .store
                .queue_event(&mut w, &peer, event, wire.clone(), now_ms)?;
            woken.insert(peer);
        }
        live.push((event.room_id.to_string(), seq, wire));
        outcomes.push(Outcome::Accepted(seq));
    }
    for plan in plans.values() {
        plan.finish(&mut w)?;
    }
    rooms.store.commit(&w)?;
    // The flush needs no lock: a batch that read this one's writes is
    // answered only after its own flush, which covers these too.
    drop(guards);
    rooms.store.flush().await?;
    rooms.publish(live);
    for peer in woken {
        rooms.fed.outbox.wake(&peer);
    }
    Ok(outcomes)
}

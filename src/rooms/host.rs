//! The sequencer of rooms we host (SPEC §6): check each event against the
//! room's state, give it the next `seq`, store it, and queue it for every
//! participating server, all in one transaction per batch.

use std::collections::{BTreeSet, HashMap};

use crate::error::{Code, Error, Result};
use crate::federation::policy::Policy;
use crate::ids::{Fqid, RoomId, ServerName};
use crate::protocol::event::{Content, Event, Membership};
use crate::rooms::Rooms;
use crate::rooms::{
    dedup, foreign_count, is_joined, participating_servers, search, write_event, InviteCap,
    Outcome, Plan,
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
    if let Source::Peer(peer) = source {
        check_from_peer(rooms, plan, event, peer)?;
    }
    match &event.content {
        Content::Member {
            membership, target, ..
        } => check_membership(rooms, plan, event, source, now_ms, *membership, target),
        Content::Message { .. } | Content::Reaction { .. } => {
            if !is_joined(&plan.members, event.sender.as_str()) {
                return Err(not_member(&event.sender, &plan.room.room_id));
            }
            Ok(())
        }
    }
}

/// What a replica's event must be before its content is looked at: for a
/// room that federates, and from the server that sent it.
fn check_from_peer(rooms: &Rooms, plan: &Plan, event: &Event, peer: &ServerName) -> Result<()> {
    let room = &plan.room;
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
    Ok(())
}

/// The membership rules: who may join, decline, leave, invite or kick.
fn check_membership(
    rooms: &Rooms,
    plan: &Plan,
    event: &Event,
    source: &Source,
    now_ms: i64,
    membership: Membership,
    target: &Fqid,
) -> Result<()> {
    let room = &plan.room;
    let sender = event.sender.as_str();
    let invited = |who: &str| {
        plan.members
            .get(who)
            .is_some_and(|m| m.membership == Membership::Invite)
    };
    match membership {
        Membership::Join => {
            if target != &event.sender {
                return Err(Error::bad_event("a join's target must be its sender"));
            }
            check_join(rooms, plan, event, now_ms)
        }
        Membership::Decline => {
            if target != &event.sender {
                return Err(Error::bad_event("a decline's target must be its sender"));
            }
            if !invited(sender) {
                return Err(Error::new(
                    Code::NotMember,
                    format!("{sender} has no pending invitation to decline"),
                ));
            }
            Ok(())
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
            Ok(())
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
            Ok(())
        }
        Membership::Kick => {
            if matches!(source, Source::Peer(_)) {
                return Err(Error::new(
                    Code::NotMember,
                    "kicks come only from the host's own room admins",
                ));
            }
            if !is_joined(&plan.members, target.as_str()) && !invited(target.as_str()) {
                return Err(Error::bad_event(format!("{target} is not in the room")));
            }
            Ok(())
        }
    }
}

/// A join needs a pending, unexpired invitation, and room under the
/// foreign participant limit for a peer's participant.
fn check_join(rooms: &Rooms, plan: &Plan, event: &Event, now_ms: i64) -> Result<()> {
    let sender = event.sender.as_str();
    let room_id = &plan.room.room_id;
    match plan.members.get(sender) {
        Some(m) if m.membership == Membership::Join => {
            Err(Error::bad_event(format!("{sender} has already joined")))
        }
        Some(m) if m.membership == Membership::Invite => {
            if m.invite_expires_at_ms.is_some_and(|e| now_ms >= e) {
                return Err(Error::new(
                    Code::InviteExpired,
                    format!("the invitation of {sender} to {room_id} expired; ask a member for a new one"),
                ));
            }
            if !rooms.is_local(&event.sender)
                && foreign_count(rooms, &plan.members, true)
                    >= rooms.fed.policy().max_foreign_participants_per_room
            {
                return Err(foreign_limit());
            }
            Ok(())
        }
        _ => Err(Error::new(
            Code::NotMember,
            format!("{sender} has no pending invitation to {room_id}; ask a member to invite them"),
        )),
    }
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
    let mut postings = search::Postings::default();

    for (event, source) in &batch {
        let hash = event.content_hash();
        let id_key = (event.origin.clone(), event.event_id.to_string());
        // Seen earlier in this batch, or stored before.
        let known = match seen.get(&id_key) {
            Some(prev) if *prev == hash => Some(Outcome::Duplicate(None)),
            Some(_) => Some(Outcome::Rejected(Error::bad_event(
                "the same event_id twice with different content",
            ))),
            None => dedup(rooms, event, &hash)?,
        };
        if let Some(o) = known {
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
        postings.add(event, seq);

        let targets = fan_out_targets(rooms, plan, event);
        let expires = match &event.content {
            Content::Member {
                membership: Membership::Invite,
                ..
            } => Some(now_ms + invite_ttl_ms),
            _ => None,
        };
        plan.apply_membership(rooms, event, &mut w, expires)?;
        let wire = event.to_wire_bytes(Some(seq));
        let queued = queue_for(rooms, &policy, &mut w, event, &wire, targets, now_ms)?;
        woken.extend(queued);
        live.push((event.room_id.to_string(), seq, wire));
        outcomes.push(Outcome::Accepted(seq));
    }
    for plan in plans.values() {
        plan.finish(&mut w)?;
    }
    postings.write(&rooms.store, &mut w)?;
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

/// Where an event goes: the servers participating before it (so a kicked
/// or leaving server learns it), plus an invitee's server, minus the
/// event's origin (never echoed) and us.
fn fan_out_targets(rooms: &Rooms, plan: &Plan, event: &Event) -> BTreeSet<ServerName> {
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
    targets
}

/// Queue `wire` for each of `targets` our policy admits, in `w`; a refused
/// one is audited and skipped. Answers the peers queued for.
fn queue_for(
    rooms: &Rooms,
    policy: &Policy,
    w: &mut WriteSet,
    event: &Event,
    wire: &[u8],
    targets: BTreeSet<ServerName>,
    now_ms: i64,
) -> Result<Vec<ServerName>> {
    let mut queued = Vec::new();
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
            .queue_event(w, &peer, event, wire.to_vec(), now_ms)?;
        queued.push(peer);
    }
    Ok(queued)
}

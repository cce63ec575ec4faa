//! Rooms hosted elsewhere (SPEC §6): store what the host sends (verified
//! upstream), queue our participants' events to the host, and settle them
//! when the host answers with a `seq`.

use std::collections::{BTreeSet, HashMap};

use crate::error::{Code, Error, Result};
use crate::ids::{RoomId, ServerName};
use crate::limits::SEQ_AHEAD_MAX;
use crate::protocol::event::{Content, Event, Membership};
use crate::rooms::Rooms;
use crate::rooms::{dedup, search, write_event, InviteCap, Outcome, Plan};
use crate::storage::{self, keys, DeliveryState, EventRef, Room, StoredEvent, WriteSet, T};

/// Events from `host` for rooms it hosts, each with the `seq` it assigned.
/// An invite for one of our participants to a room we do not know yet only
/// creates the pending invitation (SPEC §6 step 2).
pub async fn accept_from_host(
    rooms: &Rooms,
    host: &ServerName,
    batch: Vec<(Event, u64)>,
) -> Result<Vec<Outcome>> {
    // What needs no room state is done before the room lock, which
    // serialises every batch of the room: each event's rows are encoded now.
    let mut staged = Vec::with_capacity(batch.len());
    for (event, seq) in &batch {
        let mut rows = WriteSet::default();
        write_event(&mut rows, event, *seq, event.content_hash())?;
        staged.push(Some(rows));
    }
    // Search postings of the events that pass the checks below, written
    // just before the commit: a crash in between leaves postings without
    // their event (search checks the message itself), never an event
    // without its postings, and a refused event leaves none.
    let mut postings = search::Postings::default();
    let room_ids: BTreeSet<RoomId> = batch.iter().map(|(e, _)| e.room_id.clone()).collect();
    let guards = rooms.locks.lock_all(room_ids.iter().cloned()).await;
    let mut plans: HashMap<RoomId, Plan> = HashMap::new();
    for r in &room_ids {
        if let Some(p) = Plan::load(rooms, r)? {
            plans.insert(r.clone(), p);
        }
    }
    // No stored event can sit at or above a room's next_seq as loaded: only
    // seqs below it need a look in the store, and this batch's own ones.
    let stored_below: HashMap<RoomId, u64> = plans
        .iter()
        .map(|(r, p)| (r.clone(), p.room.next_seq))
        .collect();
    let mut taken: BTreeSet<(RoomId, u64)> = BTreeSet::new();
    let mut w = WriteSet::default();
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut live = Vec::new();
    let mut invite_cap = InviteCap::default();
    for ((event, seq), rows) in batch.iter().zip(staged.iter_mut()) {
        let hash = event.content_hash();
        if let Some(o) = dedup(rooms, event, &hash)? {
            outcomes.push(o);
            continue;
        }
        if event.room_id.host() != *host {
            outcomes.push(Outcome::Rejected(Error::new(
                Code::NotRoomHost,
                format!(
                    "{host} does not host {}; only a room's host sends its events",
                    event.room_id
                ),
            )));
            continue;
        }
        let Some(plan) = plans.get_mut(&event.room_id) else {
            outcomes.push(invite_for_unknown_room(
                rooms,
                event,
                *seq,
                hash,
                &mut invite_cap,
                &mut w,
            )?);
            continue;
        };
        let seq_stored_below = stored_below[&event.room_id];
        if let Err(e) = admit_relayed(rooms, host, plan, event, *seq, seq_stored_below, &mut taken)?
            .and_then(|()| invite_cap.admit(rooms, event))
        {
            outcomes.push(Outcome::Rejected(e));
            continue;
        }
        w.append(rows.take().expect("each event is staged once"));
        postings.add(event, *seq);
        plan.room.next_seq = plan.room.next_seq.max(seq.saturating_add(1));
        let expires = match &event.content {
            Content::Member {
                membership: Membership::Invite,
                expires_at_ms,
                ..
            } => Some(capped_expiry(rooms, *expires_at_ms)),
            _ => None,
        };
        plan.apply_membership(rooms, event, &mut w, expires)?;
        if rooms.has_live_listeners() {
            live.push((
                event.room_id.to_string(),
                *seq,
                event.to_wire_bytes(Some(*seq)),
            ));
        }
        outcomes.push(Outcome::Accepted(*seq));
    }
    let gaps = gaps_after(rooms, &mut plans, &batch, &outcomes)?;
    for plan in plans.values() {
        plan.finish(&mut w)?;
    }
    rooms
        .store
        .put_many(T::Search, &postings.rows(&rooms.store)?)?;
    let t0 = std::time::Instant::now();
    rooms.store.commit(&w)?;
    // The flush needs no lock: a batch that read this one's writes is
    // answered only after its own flush, which covers these too.
    drop(guards);
    let t1 = t0.elapsed();
    rooms.store.flush().await?;
    rooms.publish(live);
    claim_gap_fills(rooms, gaps);
    tracing::debug!(
        commit_us = t1.as_micros() as u64,
        flush_us = (t0.elapsed() - t1).as_micros() as u64,
        "replica store timings"
    );
    Ok(outcomes)
}

/// Whether a host's event at `seq` may go into `plan`'s room, after dedup
/// and before the invitation cap: the room federates, the membership rules
/// hold, and the seq is neither far ahead nor taken (by this batch, in
/// `taken`, or by a stored event below `stored_below`, the room's
/// `next_seq` as loaded). The outer error is a storage failure.
fn admit_relayed(
    rooms: &Rooms,
    host: &ServerName,
    plan: &Plan,
    event: &Event,
    seq: u64,
    stored_below: u64,
    taken: &mut BTreeSet<(RoomId, u64)>,
) -> Result<std::result::Result<(), Error>> {
    if !plan.room.federate {
        return Ok(Err(Error::new(
            Code::RoomNotFederated,
            format!(
                "room {} has federation turned off on {}",
                event.room_id, rooms.server_name
            ),
        )));
    }
    if let Err(e) = check_relayed_membership(host, plan, event) {
        return Ok(Err(e));
    }
    // While we track the room's history, a seq far past what we have
    // seen would hold a gap open that no backfill can close. With no
    // participant of ours joined, nothing is tracked and a new invite
    // may come at any seq.
    let ahead_max = plan.room.next_seq.saturating_add(SEQ_AHEAD_MAX);
    if plan.room.joined_seq.is_some() && seq > ahead_max {
        return Ok(Err(Error::bad_event(format!(
            "seq {seq} of {} is more than {SEQ_AHEAD_MAX} past the newest seq {} has seen ({}); a host numbers a room's events one after another",
            event.room_id,
            rooms.server_name,
            plan.room.next_seq.saturating_sub(1)
        ))));
    }
    let held = !taken.insert((event.room_id.clone(), seq))
        || (seq < stored_below
            && rooms
                .store
                .contains(T::Events, &keys::event(event.room_id.as_str(), seq))?);
    if held {
        return Ok(Err(Error::bad_event(format!(
            "seq {seq} of {} already holds another event",
            event.room_id
        ))));
    }
    Ok(Ok(()))
}

/// Gaps (SPEC §6) left once the batch is planned: for each room, the first
/// seq between the contiguous mark and the newest that neither this batch
/// nor the store holds, and the room's next seq. Moves each plan's
/// contiguous mark on.
fn gaps_after(
    rooms: &Rooms,
    plans: &mut HashMap<RoomId, Plan>,
    batch: &[(Event, u64)],
    outcomes: &[Outcome],
) -> Result<Vec<(RoomId, u64, u64)>> {
    let mut gaps = Vec::new();
    for (room_id, plan) in plans.iter_mut() {
        let fresh: BTreeSet<u64> = batch
            .iter()
            .zip(outcomes)
            .filter(|((e, _), o)| e.room_id == *room_id && matches!(o, Outcome::Accepted(_)))
            .map(|((_, seq), _)| *seq)
            .collect();
        if let Some(first_missing) = plan.advance_contiguous(rooms, &fresh)? {
            gaps.push((room_id.clone(), first_missing, plan.room.next_seq));
        }
    }
    Ok(gaps)
}

/// Fill gaps shortly, if they are still there then; a gap that cannot be
/// filled now is tried again with the next batch for the room. One fill
/// per room at a time: batches arriving meanwhile would each pull the same
/// history (up to a whole backfill answer each).
fn claim_gap_fills(rooms: &Rooms, gaps: Vec<(RoomId, u64, u64)>) {
    for (room_id, from, to) in gaps {
        if !rooms.locks.begin_gap_fill(&room_id) {
            continue;
        }
        if let Err(unsent) = rooms.gap_fills.send(super::GapFill { room_id, from, to }) {
            // No runner (shutting down): nothing will fill it, so let the
            // next batch claim it again.
            rooms.locks.end_gap_fill(&unsent.0.room_id);
        }
    }
}

/// SPEC §6 "What the host accepts", applied again to what a host relays:
/// the host has no more right than a replica to act for someone else, so
/// it cannot join, decline or leave for our participants (or anyone),
/// kick from outside its own server, or invite in the name of a stranger.
/// No pending invite is required for a join: delivery pipelines several
/// transactions, so an invite and the join after it may arrive in either
/// order.
fn check_relayed_membership(host: &ServerName, plan: &Plan, event: &Event) -> Result<()> {
    let Content::Member {
        membership, target, ..
    } = &event.content
    else {
        return Ok(());
    };
    let sender = &event.sender;
    match membership {
        Membership::Join | Membership::Decline | Membership::Leave => {
            if target != sender {
                return Err(Error::bad_event(format!(
                    "a {} relayed by {host}: its target must be its sender, but {sender} names {target}; only a kick removes someone else",
                    membership.as_str()
                )));
            }
        }
        Membership::Kick => {
            if sender.server() != *host {
                return Err(Error::new(
                    Code::NotMember,
                    format!(
                        "a kick relayed by {host} comes from {sender}; kicks come only from the host's own room admins"
                    ),
                ));
            }
        }
        Membership::Invite => {
            if sender.server() != *host && !plan.members.contains_key(sender.as_str()) {
                return Err(Error::new(
                    Code::NotMember,
                    format!(
                        "{sender} is not known in {}; only members invite to a room",
                        event.room_id
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The expiry we keep for an invite received now: what its signer wrote,
/// but never later than our own `invite_ttl` from receipt (SPEC §6:
/// unanswered invites expire after `invite_ttl` on both sides), so a
/// host cannot plant invitations that never lapse.
fn capped_expiry(rooms: &Rooms, signed_ms: Option<i64>) -> i64 {
    let ttl_ms = i64::try_from(rooms.fed.config.invite_ttl.as_millis()).unwrap_or(i64::MAX);
    let cap = rooms.clock.now_ms().saturating_add(ttl_ms);
    signed_ms.map_or(cap, |e| e.min(cap))
}

fn invite_for_unknown_room(
    rooms: &Rooms,
    event: &Event,
    seq: u64,
    hash: [u8; 32],
    invite_cap: &mut InviteCap,
    w: &mut WriteSet,
) -> Result<Outcome> {
    let Content::Member {
        membership: Membership::Invite,
        target,
        room,
        expires_at_ms,
    } = &event.content
    else {
        return Ok(Outcome::Rejected(Error::new(
            Code::RoomNotFound,
            format!(
                "{} does not take part in room {}",
                rooms.server_name, event.room_id
            ),
        )));
    };
    if !rooms.is_local(target) || rooms.store.participant(&target.local_id())?.is_none() {
        return Ok(Outcome::Rejected(Error::new(
            Code::ParticipantNotFound,
            format!("{target} does not exist on {}", rooms.server_name),
        )));
    }
    if let Err(e) = invite_cap.admit(rooms, event) {
        return Ok(Outcome::Rejected(e));
    }
    crate::rooms::remove_invitations_for(rooms, event.room_id.as_str(), target.as_str(), w)?;
    let inv = storage::Invitation {
        invite_id: event.event_id.to_string(),
        room_id: event.room_id.to_string(),
        room: room.clone().unwrap_or(crate::protocol::event::RoomSummary {
            name: String::new(),
            room_type: "standard".into(),
        }),
        inviter: event.sender.to_string(),
        target: target.to_string(),
        expires_at_ms: capped_expiry(rooms, *expires_at_ms),
    };
    w.put_invitation(&inv)?;
    w.put(
        T::EventIndex,
        keys::event_index(event.origin.as_str(), &event.event_id.to_string()),
        &EventRef {
            room_id: event.room_id.to_string(),
            seq: Some(seq),
            hash,
        },
    )?;
    Ok(Outcome::Accepted(seq))
}

/// Gap fills running now (at most one per room).
pub fn gap_fills_running(rooms: &Rooms) -> usize {
    rooms.locks.gap_fills_running()
}

/// Create the local record of a replica room before our join goes out, so
/// events the host sends right after the join have a home.
pub fn ensure_room(
    rooms: &Rooms,
    room_id: &RoomId,
    name: &str,
    room_type: storage::RoomType,
) -> Result<()> {
    if rooms.store.room(room_id)?.is_some() {
        return Ok(());
    }
    let room = Room {
        room_id: room_id.to_string(),
        name: name.to_string(),
        room_type,
        federate: room_type.federable(),
        created_at_ms: rooms.clock.now_ms(),
        next_seq: 0,
        joined_seq: None,
        contiguous_seq: None,
        dm_pair: None,
        creator: None,
    };
    rooms
        .store
        .put(T::Rooms, room_id.as_str().as_bytes(), &room)
}

/// Queue one of our participants' events for the host, kept as pending
/// until the host answers with its `seq`.
pub async fn submit(rooms: &Rooms, event: &Event) -> Result<()> {
    let _guard = rooms.locks.lock_all([event.room_id.clone()]).await;
    let mut w = WriteSet::default();
    let event_id = event.event_id.to_string();
    w.put(
        T::Pending,
        keys::pending(event.room_id.as_str(), &event_id),
        &StoredEvent {
            json: event.to_wire_bytes(None),
            state: DeliveryState::Pending,
            rejected: false,
        },
    )?;
    w.put(
        T::EventIndex,
        keys::event_index(event.origin.as_str(), &event_id),
        &EventRef {
            room_id: event.room_id.to_string(),
            seq: None,
            hash: event.content_hash(),
        },
    )?;
    let host = event.room_id.host();
    rooms.store.queue_event(
        &mut w,
        &host,
        event,
        event.to_wire_bytes(None),
        rooms.clock.now_ms(),
    )?;
    rooms.store.commit(&w)?;
    rooms.store.flush().await?;
    rooms.fed.outbox.wake(&host);
    Ok(())
}

/// The host sequenced our event at `seq`: move it from pending into the
/// room's history and apply it.
pub async fn settle(rooms: &Rooms, event: &Event, seq: u64) -> Result<Settled> {
    let _guard = rooms.locks.lock_all([event.room_id.clone()]).await;
    let Some(mut plan) = Plan::load(rooms, &event.room_id)? else {
        return Ok(Settled::NoRoom);
    };
    let pending_key = keys::pending(event.room_id.as_str(), &event.event_id.to_string());
    let at = keys::event(event.room_id.as_str(), seq);
    if let Some(stored) = rooms.store.get::<StoredEvent>(T::Events, &at)? {
        let same = !stored.rejected
            && Event::parse(&stored.json)
                .is_ok_and(|(e, _)| e.origin == event.origin && e.event_id == event.event_id);
        if !same {
            // The host gave one seq to two events: what we hold there came
            // in first and stays; ours cannot be placed, so it failed.
            tracing::warn!(
                room_id = %event.room_id,
                event_id = %event.event_id,
                seq,
                "the host answered our event with a seq that holds another event; keeping the stored one and marking ours failed"
            );
            if let Some(mut ours) = rooms.store.get::<StoredEvent>(T::Pending, &pending_key)? {
                ours.state = DeliveryState::Failed;
                rooms.store.put(T::Pending, &pending_key, &ours)?;
                rooms.store.flush().await?;
            }
            return Ok(Settled::SeqTaken);
        }
    }
    let mut w = WriteSet::default();
    w.remove(T::Pending, pending_key);
    write_event(&mut w, event, seq, event.content_hash())?;
    plan.room.next_seq = plan.room.next_seq.max(seq.saturating_add(1));
    if let Content::Member {
        membership: Membership::Join,
        target,
        ..
    } = &event.content
    {
        if rooms.is_local(target) && plan.room.joined_seq.is_none() {
            plan.room.joined_seq = Some(seq);
        }
    }
    plan.apply_membership(rooms, event, &mut w, None)?;
    plan.advance_contiguous(rooms, &BTreeSet::from([seq]))?;
    plan.finish(&mut w)?;
    let mut postings = search::Postings::default();
    postings.add(event, seq);
    postings.write(&rooms.store, &mut w)?;
    rooms.store.commit(&w)?;
    rooms.store.flush().await?;
    rooms.publish([(
        event.room_id.to_string(),
        seq,
        event.to_wire_bytes(Some(seq)),
    )]);
    Ok(Settled::Stored)
}

/// What [`settle`] did with our event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Stored at its seq and applied.
    Stored,
    /// We hold no record of the room (a decline of an invite to a room we
    /// never joined): nothing to store.
    NoRoom,
    /// The seq the host named holds another event: ours is marked failed.
    SeqTaken,
}

/// The host refused our event for good (or it aged out): mark it failed.
pub async fn fail(rooms: &Rooms, room_id: &RoomId, event_id: &str) -> Result<()> {
    let _guard = rooms.locks.lock_all([room_id.clone()]).await;
    let k = keys::pending(room_id.as_str(), event_id);
    if let Some(mut stored) = rooms.store.get::<StoredEvent>(T::Pending, &k)? {
        stored.state = DeliveryState::Failed;
        rooms.store.put(T::Pending, &k, &stored)?;
        rooms.store.flush().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::clock::Clock;
    use crate::config::Config;
    use crate::federation::Federation;
    use crate::storage::Store;

    #[tokio::test]
    async fn a_gap_claimed_with_no_runner_is_released_and_one_runner_gets_each_claim() {
        crate::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let config = Config::default_embedded();
        let (fed, _new_peers) = Federation::open(&config, store, Clock::starting_at(0)).unwrap();
        let (rooms, mut fills) = Rooms::new(Arc::new(fed), None);
        let room = RoomId::parse("!RoomHostedOnPeer0000:b.test").unwrap();
        claim_gap_fills(&rooms, vec![(room.clone(), 3, 9)]);
        claim_gap_fills(&rooms, vec![(room.clone(), 3, 10)]);
        assert_eq!(gap_fills_running(&rooms), 1, "one fill per room");
        let claim = fills.try_recv().expect("the runner gets the first claim");
        assert_eq!((claim.room_id, claim.from, claim.to), (room.clone(), 3, 9));
        assert!(
            fills.try_recv().is_err(),
            "the second one only asks it to look again"
        );
        // The runner is gone (shutdown): a new claim is released at once,
        // so the next batch with a gap can claim it again.
        drop(fills);
        let other = RoomId::parse("!OtherRoomOnPeer00000:b.test").unwrap();
        claim_gap_fills(&rooms, vec![(other, 0, 5)]);
        assert_eq!(gap_fills_running(&rooms), 1, "only the first room's fill");
    }
}

//! Rooms: membership, ordering and invitations (SPEC §6).
//!
//! - [`Rooms`]: the room domain's handle (its store, clock, locks and live
//!   stream, over the [`Federation`] it talks to peers through).
//! - [`host`]: the sequencer of rooms this server hosts: checks, assigns
//!   `seq`, stores, and fans out through the outbox in one transaction.
//! - [`replica`]: rooms hosted elsewhere: storing what the host sends,
//!   queueing our participants' events to the host, acks, gap fills.
//! - [`transaction`]: one inbound `/send`, routed to host and replica.
//! - [`flows`]: what a participant does (create, post, invite, accept...),
//!   built on the two above; [`presence`], [`search`], [`sever`],
//!   [`retention`].
//!
//! **Invariant:** a room's state is only changed while holding its lock from
//! [`RoomLocks`], so `seq` assignment never races and plans read a stable
//! view; rooms run in parallel.
//!
//! **Invariant of absence:** nothing here knows HTTP (no status types, no
//! routes) or the composition (`App`); peers are reached through
//! `federation::peer_api`, and work for later (delivery, gap fills) is
//! handed over through channels that the layers above drain.

pub mod calls;
pub mod commands;
pub mod history;
pub mod host;
pub mod presence;
pub mod replica;
pub mod retention;
pub mod search;
pub mod sever;
pub mod transaction;
pub mod views;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc, OwnedMutexGuard};

use crate::clock::Clock;
use crate::config::LivekitConfig;
use crate::error::{Code, Error, Result};
use crate::federation::Federation;
use crate::ids::{Fqid, LocalId, RoomId, ServerName};
use crate::limits::{INVITATIONS_PENDING_PER_PARTICIPANT_MAX, LIVE_EVENTS_BUFFERED};
use crate::protocol::event::{Content, Event, Membership, Presence, PresenceStatus};
use crate::storage::{
    self, keys, Invitation, Member, Participant, Room, Store, StoredEvent, WriteSet, T,
};

/// The room domain of one server: what every flow, the host sequencer and
/// the replica work with.
pub struct Rooms {
    pub fed: Arc<Federation>,
    pub server_name: ServerName,
    pub store: Store,
    pub clock: Clock,
    pub locks: RoomLocks,
    /// New room events, for `GET /v1/events` streams (lagging readers
    /// lose the oldest; the stream is a hint, history is the truth).
    live: broadcast::Sender<LiveEvent>,
    /// The LiveKit this server mints call tokens for, if any (`[livekit]`).
    pub livekit: Option<LivekitConfig>,
    /// Rooms whose gap fill was claimed, for the fill runner
    /// ([`history::fill_gaps`]); at most one message per claim.
    gap_fills: mpsc::UnboundedSender<GapFill>,
}

/// A room event just stored, as live streams see it.
#[derive(Debug, Clone)]
pub struct LiveEvent {
    pub room_id: String,
    pub seq: u64,
    pub wire: Arc<Vec<u8>>,
}

impl Rooms {
    /// The rooms of `fed`'s server, and the receiver of their gap fills
    /// for [`history::fill_gaps`].
    pub fn new(fed: Arc<Federation>, livekit: Option<LivekitConfig>) -> (Rooms, GapFills) {
        let (gap_fills, fills) = mpsc::unbounded_channel();
        let rooms = Rooms {
            server_name: fed.server_name.clone(),
            store: fed.store.clone(),
            clock: fed.clock.clone(),
            fed,
            locks: RoomLocks::default(),
            livekit,
            live: broadcast::channel(LIVE_EVENTS_BUFFERED).0,
            gap_fills,
        };
        (rooms, fills)
    }

    pub fn fqid(&self, local: &LocalId) -> Fqid {
        self.fed.fqid(local)
    }

    pub fn is_local(&self, fqid: &Fqid) -> bool {
        self.fed.is_local(fqid)
    }

    /// Whether any live stream is open: without one, nobody needs the
    /// wire form of stored events built for [`Rooms::publish`].
    pub fn has_live_listeners(&self) -> bool {
        self.live.receiver_count() > 0
    }

    /// Tell live streams about stored events (after their commit).
    pub fn publish(&self, events: impl IntoIterator<Item = (String, u64, Vec<u8>)>) {
        for (room_id, seq, wire) in events {
            // No receivers is fine: nobody is listening.
            let _ = self.live.send(LiveEvent {
                room_id,
                seq,
                wire: Arc::new(wire),
            });
        }
    }

    /// Create one of our participants and its first token (returned
    /// once, stored hashed).
    pub fn create_participant(
        &self,
        local: &LocalId,
        display_name: &str,
        power: storage::PowerLevel,
    ) -> Result<String> {
        let p = storage::Participant {
            local_id: local.to_string(),
            display_name: display_name.to_string(),
            power_level: power,
            presence: Presence {
                status: PresenceStatus::Offline,
                status_msg: None,
            },
            created_at_ms: self.clock.now_ms(),
        };
        self.store.create_participant(&p, self.fqid(local).as_str())
    }

    /// A new live stream of every stored event.
    pub fn subscribe(&self) -> broadcast::Receiver<LiveEvent> {
        self.live.subscribe()
    }
}

/// A claimed gap fill: the seqs `[from, to)` of `room_id`.
#[derive(Debug)]
pub struct GapFill {
    room_id: RoomId,
    from: u64,
    to: u64,
}

/// Claimed gap fills, for [`history::fill_gaps`].
pub type GapFills = mpsc::UnboundedReceiver<GapFill>;

/// One async mutex per room, created on first use, and the per-room
/// background work that must not run twice at once (gap fills).
#[derive(Default)]
pub struct RoomLocks {
    /// Shared with every [`RoomGuard`], which removes its room's entry
    /// when it is the last one out: room ids come from peers, so the map
    /// holds only rooms locked or waited for now. A std mutex: held for
    /// map updates only, never across an await.
    locks: Arc<LockMap>,
    /// Rooms whose gap fill runs now, each with whether a batch came in
    /// meanwhile with a gap of its own (the fill then runs once more). A
    /// std mutex: held only for one map update, never across an await.
    /// One fill task runs per entry, so the map's size is the number of
    /// fill tasks running.
    filling: Mutex<HashMap<RoomId, bool>>,
}

impl RoomLocks {
    /// Claim the room's one gap fill; false if one already runs, which is
    /// then told to run once more when it is done (it may have started
    /// before this batch's gap could be filled).
    pub fn begin_gap_fill(&self, room_id: &RoomId) -> bool {
        let mut filling = self.filling.lock().expect("gap fill set");
        if let Some(again) = filling.get_mut(room_id) {
            *again = true;
            return false;
        }
        filling.insert(room_id.clone(), false);
        true
    }

    /// The claimed fill is done: true if it must run once more (a batch
    /// asked meanwhile), else the claim is released.
    pub fn end_gap_fill(&self, room_id: &RoomId) -> bool {
        let mut filling = self.filling.lock().expect("gap fill set");
        match filling.get_mut(room_id) {
            Some(again) if *again => {
                *again = false;
                true
            }
            Some(_) => {
                filling.remove(room_id);
                false
            }
            None => false,
        }
    }

    /// How many gap fill tasks run now.
    pub fn gap_fills_running(&self) -> usize {
        self.filling.lock().expect("gap fill set").len()
    }

    /// Lock every room in `rooms`, in sorted order so two batches never deadlock.
    pub async fn lock_all(&self, rooms: impl IntoIterator<Item = RoomId>) -> Vec<RoomGuard> {
        let sorted: BTreeSet<RoomId> = rooms.into_iter().collect();
        // Each room counts this caller as a user before any await, and the
        // count drops with the `LockUser` whether the lock was got or the
        // caller was cancelled while waiting.
        let entries: Vec<(LockUser, Arc<tokio::sync::Mutex<()>>)> = {
            let mut map = self.locks.lock().expect("room lock map");
            sorted
                .into_iter()
                .map(|r| {
                    let e = map.entry(r.clone()).or_insert_with(|| LockEntry {
                        lock: Arc::default(),
                        users: 0,
                    });
                    e.users += 1;
                    let user = LockUser {
                        room_id: r,
                        map: self.locks.clone(),
                    };
                    (user, e.lock.clone())
                })
                .collect()
        };
        let mut guards = Vec::with_capacity(entries.len());
        for (user, lock) in entries {
            guards.push(RoomGuard {
                _guard: lock.lock_owned().await,
                _user: user,
            });
        }
        guards
    }

    /// Rooms with a lock entry now (held or waited for).
    pub fn entries(&self) -> usize {
        self.locks.lock().expect("room lock map").len()
    }
}

struct LockEntry {
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Callers holding or waiting for `lock`.
    users: usize,
}

type LockMap = Mutex<HashMap<RoomId, LockEntry>>;

/// One caller's claim on a room's entry; the last one out removes it.
struct LockUser {
    room_id: RoomId,
    map: Arc<LockMap>,
}

impl Drop for LockUser {
    fn drop(&mut self) {
        let mut map = self.map.lock().expect("room lock map");
        if let Some(e) = map.get_mut(&self.room_id) {
            e.users -= 1;
            if e.users == 0 {
                map.remove(&self.room_id);
            }
        }
    }
}

/// A held room lock. Fields drop in order: the room is unlocked first,
/// then the claim on its entry goes.
pub struct RoomGuard {
    _guard: OwnedMutexGuard<()>,
    _user: LockUser,
}

pub fn fqid_of(rooms: &Rooms, p: &Participant) -> Fqid {
    Fqid::new(
        &crate::ids::LocalId::parse(&p.local_id).expect("stored local ids are valid"),
        &rooms.server_name,
    )
}

/// The room, if `who` is a joined member of it.
pub(crate) fn joined_room(rooms: &Rooms, room_id: &RoomId, who: &Fqid) -> Result<Room> {
    let not_found = || {
        Error::not_found(format!(
            "room {room_id} not found among your rooms; check the id or ask to be invited"
        ))
    };
    let room = rooms.store.room(room_id)?.ok_or_else(not_found)?;
    let m = rooms.store.member(room_id.as_str(), who.as_str())?;
    if !m.is_some_and(|m| m.membership == Membership::Join) {
        return Err(not_found());
    }
    Ok(room)
}

/// What happened to one event of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Accepted(u64),
    Duplicate(Option<u64>),
    Rejected(Error),
}

/// Servers other than us with at least one joined participant.
pub(crate) fn participating_servers(
    rooms: &Rooms,
    members: &BTreeMap<String, Member>,
) -> BTreeSet<ServerName> {
    members
        .values()
        .filter(|m| m.membership == Membership::Join)
        .filter_map(|m| crate::ids::Fqid::parse(&m.fqid).ok())
        .map(|f| f.server())
        .filter(|s| *s != rooms.server_name)
        .collect()
}

/// Foreign participants a room holds against its limit: joined ones, and
/// (unless `joined_only`) those with an open invitation.
pub(crate) fn foreign_count(
    rooms: &Rooms,
    members: &BTreeMap<String, Member>,
    joined_only: bool,
) -> u64 {
    let now = rooms.clock.now_ms();
    members
        .values()
        .filter(|m| {
            if joined_only {
                m.membership == Membership::Join
            } else {
                m.is_present(now)
            }
        })
        .filter(|m| crate::ids::Fqid::parse(&m.fqid).is_ok_and(|f| !rooms.is_local(&f)))
        .count() as u64
}

pub(crate) fn is_joined(members: &BTreeMap<String, Member>, fqid: &str) -> bool {
    members
        .get(fqid)
        .is_some_and(|m| m.membership == Membership::Join)
}

/// A room's state while a batch is planned: changes land here first, and
/// in the write set when the plan is done.
pub struct Plan {
    pub room: Room,
    pub members: BTreeMap<String, Member>,
    changed_members: BTreeSet<String>,
}

impl Plan {
    pub fn load(rooms: &Rooms, room_id: &RoomId) -> Result<Option<Plan>> {
        let Some(room) = rooms.store.room(room_id)? else {
            return Ok(None);
        };
        Ok(Some(Plan {
            members: rooms.store.members(room_id)?,
            room,
            changed_members: BTreeSet::new(),
        }))
    }

    pub fn new_room(room: Room) -> Plan {
        Plan {
            room,
            members: BTreeMap::new(),
            changed_members: BTreeSet::new(),
        }
    }

    pub fn set_member(&mut self, member: Member) {
        self.changed_members.insert(member.fqid.clone());
        self.members.insert(member.fqid.clone(), member);
    }

    /// Apply a membership event to the plan, and its side records (room
    /// list of local participants, invitations) to `w`.
    pub fn apply_membership(
        &mut self,
        rooms: &Rooms,
        event: &Event,
        w: &mut WriteSet,
        invite_expires_at_ms: Option<i64>,
    ) -> Result<()> {
        let Content::Member {
            membership,
            target,
            room,
            ..
        } = &event.content
        else {
            return Ok(());
        };
        let room_id = self.room.room_id.clone();
        let local_target = rooms.is_local(target);
        let previous = self.members.get(target.as_str()).cloned();
        let mut m = previous.clone().unwrap_or(Member {
            fqid: target.to_string(),
            membership: *membership,
            display_name: None,
            invite_expires_at_ms: None,
        });
        m.membership = *membership;
        m.invite_expires_at_ms = if *membership == Membership::Invite {
            invite_expires_at_ms
        } else {
            None
        };
        if local_target && m.display_name.is_none() {
            if let Some(p) = rooms.store.participant(&target.local_id())? {
                m.display_name = Some(p.display_name);
            }
        }
        self.set_member(m);
        let replica_room = RoomId::parse(&room_id).is_ok_and(|r| r.host() != rooms.server_name);
        if local_target && *membership != Membership::Join && replica_room {
            let anyone_of_ours_joined = self.members.values().any(|m| {
                m.membership == Membership::Join
                    && crate::ids::Fqid::parse(&m.fqid).is_ok_and(|f| rooms.is_local(&f))
            });
            if !anyone_of_ours_joined {
                // Nothing of this room is ours to keep complete any more; a
                // later invite may come at any seq, and gap tracking starts
                // again at the next join (which `replica::settle` records).
                self.room.joined_seq = None;
                self.room.contiguous_seq = None;
            }
        }
        // Joined members of every server have their room rows: ours list
        // their rooms, a peer's are what its presence is kept for.
        set_user_room(rooms, target, &room_id, *membership == Membership::Join, w)?;
        if local_target {
            match membership {
                Membership::Invite => {
                    let summary = room.clone().unwrap_or(crate::protocol::event::RoomSummary {
                        name: self.room.name.clone(),
                        room_type: self.room.room_type.as_str().to_string(),
                    });
                    // A new invite replaces any older one to the room: one
                    // row per room, so the cap counts rooms and a peer
                    // re-inviting grows nothing.
                    remove_invitations_for(rooms, &room_id, target.as_str(), w)?;
                    w.put_invitation(&Invitation {
                        invite_id: event.event_id.to_string(),
                        room_id: room_id.clone(),
                        room: summary,
                        inviter: event.sender.to_string(),
                        target: target.to_string(),
                        expires_at_ms: invite_expires_at_ms.unwrap_or(i64::MAX),
                    })?;
                }
                _ => remove_invitations_for(rooms, &room_id, target.as_str(), w)?,
            }
        }
        Ok(())
    }

    /// Move the replica's contiguous mark past every seq that is now held
    /// (in `fresh`, about to be written, or already stored). Returns the
    /// first missing seq below `next_seq`, if any: a gap.
    pub fn advance_contiguous(
        &mut self,
        rooms: &Rooms,
        fresh: &BTreeSet<u64>,
    ) -> Result<Option<u64>> {
        let Some(start) = self.room.contiguous_seq.or(self.room.joined_seq) else {
            return Ok(None);
        };
        let next_seq = self.room.next_seq;
        let after = |c: u64| c.checked_add(1).filter(|n| *n < next_seq);
        let mut c = start;
        while let Some(n) = after(c) {
            let held = fresh.contains(&n)
                || rooms
                    .store
                    .contains(T::Events, &keys::event(&self.room.room_id, n))?;
            if !held {
                break;
            }
            c = n;
        }
        self.room.contiguous_seq = Some(c);
        Ok(after(c))
    }

    /// Record the room and the changed members into `w`.
    pub fn finish(&self, w: &mut WriteSet) -> Result<()> {
        w.put(T::Rooms, self.room.room_id.as_bytes().to_vec(), &self.room)?;
        for fqid in &self.changed_members {
            if let Some(m) = self.members.get(fqid) {
                w.put(T::Members, keys::member(&self.room.room_id, fqid), m)?;
            }
        }
        Ok(())
    }
}

/// Keep `user_rooms` in step with one member row: a row while `joined`,
/// none otherwise. A peer's participant joined nowhere any more loses its
/// presence row too (presence is kept only for joined members).
pub(crate) fn set_user_room(
    rooms: &Rooms,
    target: &crate::ids::Fqid,
    room_id: &str,
    joined: bool,
    w: &mut WriteSet,
) -> Result<()> {
    let ur = keys::user_room(target.as_str(), room_id);
    if joined {
        return w.put(T::UserRooms, ur, &());
    }
    w.remove(T::UserRooms, ur.clone());
    if !rooms.is_local(target) {
        let elsewhere = rooms
            .store
            .scan_limit::<()>(T::UserRooms, &storage::prefix(target.as_str()), 2)?
            .into_iter()
            .any(|(k, ())| k != ur);
        if !elsewhere {
            w.remove(T::Presence, target.as_str().as_bytes().to_vec());
        }
    }
    Ok(())
}

/// Pending invitations of `target` to `room_id` are settled by any later
/// membership change (a prefix of the target's own rows).
pub(crate) fn remove_invitations_for(
    rooms: &Rooms,
    room_id: &str,
    target: &str,
    w: &mut WriteSet,
) -> Result<()> {
    for inv in rooms.store.invitations_to_room(target, room_id)? {
        w.remove_invitation(&inv);
    }
    Ok(())
}

/// The pending invitations of each local target while one batch is
/// planned: what the store holds plus what the batch adds, so the cap
/// [`INVITATIONS_PENDING_PER_PARTICIPANT_MAX`] holds inside a batch too.
#[derive(Default)]
pub struct InviteCap {
    rooms: HashMap<String, BTreeSet<String>>,
}

impl InviteCap {
    /// Refuse an invite of a local participant who already holds the
    /// most pending invitations; any other event passes. Call it last,
    /// once every other check passed: an admitted invite counts.
    pub fn admit(&mut self, rooms: &Rooms, event: &Event) -> Result<()> {
        let Content::Member {
            membership: Membership::Invite,
            target,
            ..
        } = &event.content
        else {
            return Ok(());
        };
        if !rooms.is_local(target) {
            return Ok(());
        }
        let held = match self.rooms.entry(target.to_string()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let now = rooms.clock.now_ms();
                e.insert(
                    rooms
                        .store
                        .invitations_of(target.as_str())?
                        .into_iter()
                        .filter(|i| i.expires_at_ms > now)
                        .map(|i| i.room_id)
                        .collect(),
                )
            }
        };
        let room = event.room_id.to_string();
        // A re-invite to a room replaces that room's invitation.
        if held.contains(&room) || held.len() < INVITATIONS_PENDING_PER_PARTICIPANT_MAX {
            held.insert(room);
            return Ok(());
        }
        Err(Error::new(
            Code::ForeignLimit,
            format!(
                "{target} already has {INVITATIONS_PENDING_PER_PARTICIPANT_MAX} pending invitations on {}; \
                 another can be sent once they accept or decline some, or some expire",
                rooms.server_name
            ),
        ))
    }
}

/// Store `event` at `seq` (signed bytes only; `unsigned` is per copy),
/// with its dedup index row and its reaction row. Its search postings go
/// into the commit's [`search::Postings`], written once per commit.
pub fn write_event(w: &mut WriteSet, event: &Event, seq: u64, hash: [u8; 32]) -> Result<()> {
    let room = event.room_id.as_str();
    w.put(
        T::Events,
        keys::event(room, seq),
        &StoredEvent {
            json: event.to_wire_bytes(None),
            state: storage::DeliveryState::Sent,
            rejected: false,
        },
    )?;
    if let Content::Reaction {
        target,
        key,
        action,
    } = &event.content
    {
        w.put(
            T::Reactions,
            keys::reaction(room, &target.to_string(), seq),
            &storage::ReactionRow {
                key: key.clone(),
                sender: event.sender.to_string(),
                add: *action == crate::protocol::event::ReactionAction::Add,
            },
        )?;
    }
    w.put(
        T::EventIndex,
        keys::event_index(event.origin.as_str(), &event.event_id.to_string()),
        &storage::EventRef {
            room_id: room.to_string(),
            seq: Some(seq),
            hash,
        },
    )
}

/// Dedup (SPEC §2): the same (origin, event_id) with the same bytes is a
/// duplicate; with other bytes it is a bad event.
pub fn dedup(rooms: &Rooms, event: &Event, hash: &[u8; 32]) -> Result<Option<Outcome>> {
    let k = keys::event_index(event.origin.as_str(), &event.event_id.to_string());
    match rooms.store.get::<storage::EventRef>(T::EventIndex, &k)? {
        None => Ok(None),
        Some(r) if r.hash == *hash => Ok(Some(Outcome::Duplicate(r.seq))),
        Some(_) => Ok(Some(Outcome::Rejected(Error::bad_event(format!(
            "event {} from {} was seen before with different content; an event_id names one event for ever",
            event.event_id, event.origin
        ))))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(n: u8) -> RoomId {
        RoomId::parse(&format!("!room{n:02}aaaaaaaaaaaaaaaa:a.test")).unwrap()
    }

    #[tokio::test]
    async fn a_room_lock_is_forgotten_when_its_last_user_is_gone() {
        let locks = Arc::new(RoomLocks::default());
        let held = locks.lock_all([room(1), room(2)]).await;
        assert_eq!(locks.entries(), 2);
        // A waiter keeps the entry while the holder lets go.
        let waiting = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let g = locks.lock_all([room(1)]).await;
                drop(g);
            })
        };
        tokio::task::yield_now().await;
        drop(held);
        waiting.await.unwrap();
        assert_eq!(locks.entries(), 0);
        // A lock_all cancelled while waiting leaves nothing behind.
        let held = locks.lock_all([room(3)]).await;
        let cancelled = tokio::time::timeout(
            std::time::Duration::from_millis(10),
            locks.lock_all([room(3), room(4)]),
        )
        .await;
        assert!(cancelled.is_err());
        drop(held);
        assert_eq!(locks.entries(), 0);
    }
}

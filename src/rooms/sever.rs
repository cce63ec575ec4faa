//! Removing a peer (SPEC §6): sever every room shared with it, on both
//! sides, drop what is queued for it, and refuse it from now on.

use serde_json::{json, Value};

use crate::error::Result;
use crate::ids::{Fqid, RoomId, ServerName};
use crate::protocol::event::{Content, Membership};
use crate::rooms::host::{self, Source};
use crate::rooms::Rooms;
use crate::rooms::{commands, fqid_of, Plan, RoomLocks};
use crate::storage::{self, keys, Participant, Room, WriteSet, T};

pub(crate) async fn remove_peer(
    rooms: &Rooms,
    admin: &Participant,
    peer: &ServerName,
) -> Result<Value> {
    let shared: Vec<Room> = rooms
        .store
        .scan::<Room>(T::Rooms, b"")?
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    let me = fqid_of(rooms, admin);
    let of_peer = |fqid: &str| Fqid::parse(fqid).is_ok_and(|f| f.server() == *peer);

    // Rooms the peer hosts: our participants leave. Tell the host while it
    // is still allowed (best effort), then leave locally whatever it said.
    let mut left = 0;
    for room in shared
        .iter()
        .filter(|r| RoomId::parse(&r.room_id).is_ok_and(|id| id.host() == *peer))
    {
        let room_id = RoomId::parse(&room.room_id)?;
        let ours: Vec<Fqid> = rooms
            .store
            .members(&room_id)?
            .values()
            .filter(|m| m.membership == Membership::Join)
            .filter_map(|m| Fqid::parse(&m.fqid).ok())
            .filter(|f| rooms.is_local(f))
            .collect();
        for who in ours {
            if let Ok(leave) = commands::sign(
                rooms,
                &room_id,
                &who,
                Content::Member {
                    membership: Membership::Leave,
                    target: who.clone(),
                    expires_at_ms: None,
                    room: None,
                },
            ) {
                let _ = commands::send_to_host(rooms, &leave).await;
                leave_locally(rooms, &rooms.locks, &room_id, &leave).await?;
                left += 1;
            }
        }
    }

    // From here on the peer is refused both ways (and so are relays of its
    // events by third hosts).
    let mut policy = rooms.fed.policy();
    policy.allowed_peers.retain(|p| p != peer);
    if !policy.denied_peers.contains(peer) {
        policy.denied_peers.push(peer.clone());
    }
    rooms.fed.set_policy(policy)?;

    // Rooms we host: its participants are kicked, fanned out to the others.
    let mut kicked = 0;
    for room in shared
        .iter()
        .filter(|r| RoomId::parse(&r.room_id).is_ok_and(|id| id.host() == rooms.server_name))
    {
        let room_id = RoomId::parse(&room.room_id)?;
        let targets: Vec<Fqid> = rooms
            .store
            .members(&room_id)?
            .values()
            .filter(|m| {
                matches!(m.membership, Membership::Join | Membership::Invite) && of_peer(&m.fqid)
            })
            .filter_map(|m| Fqid::parse(&m.fqid).ok())
            .collect();
        let mut batch = Vec::new();
        for target in targets {
            let kick = commands::sign(
                rooms,
                &room_id,
                &me,
                Content::Member {
                    membership: Membership::Kick,
                    target,
                    expires_at_ms: None,
                    room: None,
                },
            )?;
            batch.push((kick, Source::Local));
        }
        kicked += batch.len();
        if !batch.is_empty() {
            host::commit(rooms, batch).await?;
        }
    }

    let outbox = storage::prefix(peer.as_str());
    let mut end = outbox.clone();
    end.push(0xff);
    let dropped = rooms.store.remove_range(T::Outbox, &outbox, &end)?;
    rooms.store.remove(T::Peers, peer.as_str().as_bytes())?;
    rooms.store.flush().await?;
    let detail = format!("kicked {kicked}, left {left} rooms it hosts, dropped {dropped} queued items; added to denied_peers");
    rooms.fed.audit(
        "federation.peer.removed",
        Some(peer),
        None,
        None,
        None,
        &detail,
    );
    tracing::info!(peer = %peer, kicked, left, dropped, "removed a peer");
    Ok(json!({"server_name": peer.to_string(), "kicked": kicked, "left": left, "dropped": dropped}))
}

/// Apply our own leave to a replica room without a seq from the host.
async fn leave_locally(
    rooms: &Rooms,
    locks: &RoomLocks,
    room_id: &RoomId,
    leave: &crate::protocol::event::Event,
) -> Result<()> {
    let _guard = locks.lock_all([room_id.clone()]).await;
    let Some(mut plan) = Plan::load(rooms, room_id)? else {
        return Ok(());
    };
    let mut w = WriteSet::default();
    plan.apply_membership(rooms, leave, &mut w, None)?;
    plan.finish(&mut w)?;
    w.remove(
        T::UserRooms,
        keys::user_room(leave.sender.as_str(), room_id.as_str()),
    );
    rooms.store.commit(&w)
}

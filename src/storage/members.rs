//! Rooms, their member rows (one per room and participant, ours and
//! peers', so a room's members are one prefix scan) and each joined
//! member's list of rooms (`user_rooms`).

use std::collections::BTreeMap;

use crate::error::Result;
use crate::ids::{Fqid, RoomId};

use super::{keys, prefix, Member, Room, Store, T};

impl Store {
    pub fn room(&self, room_id: &RoomId) -> Result<Option<Room>> {
        self.get(T::Rooms, room_id.as_str().as_bytes())
    }

    /// A room's members by FQID.
    pub fn members(&self, room_id: &RoomId) -> Result<BTreeMap<String, Member>> {
        Ok(self
            .scan::<Member>(T::Members, &prefix(room_id.as_str()))?
            .into_iter()
            .map(|(_, m)| (m.fqid.clone(), m))
            .collect())
    }

    pub fn member(&self, room_id: &str, fqid: &str) -> Result<Option<Member>> {
        self.get(T::Members, &keys::member(room_id, fqid))
    }

    /// Overwrite one member row outside any batch (a display name change).
    pub fn put_member(&self, room_id: &str, m: &Member) -> Result<()> {
        self.put(T::Members, &keys::member(room_id, &m.fqid), m)
    }

    /// Rooms a participant has joined (their `user_rooms` rows): ours, or
    /// a peer's in a room we know. Every caller but presence receipt and a
    /// display name refresh asks for one of our participants, whose prefix
    /// holds only their own rows.
    pub fn rooms_of(&self, fqid: &Fqid) -> Result<Vec<RoomId>> {
        Ok(self
            .scan::<()>(T::UserRooms, &prefix(fqid.as_str()))?
            .into_iter()
            .filter_map(|(k, ())| {
                RoomId::parse(&String::from_utf8_lossy(&k[fqid.as_str().len() + 1..])).ok()
            })
            .collect())
    }

    /// Whether `fqid` has joined `room_id` (its `user_rooms` row is there).
    pub fn has_joined(&self, fqid: &Fqid, room_id: &str) -> Result<bool> {
        self.contains(T::UserRooms, &keys::user_room(fqid.as_str(), room_id))
    }
}

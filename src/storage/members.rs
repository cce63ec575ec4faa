//! Rooms and their member rows: one row per (room, participant), ours and
//! peers', so a room's members are one prefix scan.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::ids::RoomId;

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
}

//! The outbox (SPEC §11): one durable FIFO queue per peer, keyed peer ‖
//! id, written in the same write set as the event it carries.

use crate::error::Result;
use crate::ids::ServerName;
use crate::protocol::event::Event;

use super::{keys, OutboxItem, OutboxKind, Store, WriteSet, T};

impl Store {
    /// Add `event` (in wire form) to `peer`'s queue inside the caller's write set.
    pub fn queue_event(
        &self,
        w: &mut WriteSet,
        peer: &ServerName,
        event: &Event,
        wire: Vec<u8>,
        now_ms: i64,
    ) -> Result<()> {
        let id = self.generate_id()?;
        w.put(
            T::Outbox,
            keys::outbox(peer.as_str(), id),
            &OutboxItem {
                queued_at_ms: now_ms,
                kind: OutboxKind::Event {
                    room_id: event.room_id.to_string(),
                    event_id: event.event_id.to_string(),
                    origin: event.origin.to_string(),
                    wire,
                },
            },
        )
    }

    /// Every peer with at least one queued row, each once, in key order.
    pub fn outbox_peers(&self) -> Result<Vec<ServerName>> {
        let mut peers: Vec<ServerName> = Vec::new();
        for item in self.tree(T::Outbox).iter().keys() {
            let k = item.map_err(|e| self.sled_err(e))?;
            let name = k.split(|b| *b == 0).next().unwrap_or_default();
            if let Ok(peer) = ServerName::parse(&String::from_utf8_lossy(name)) {
                if peers.last() != Some(&peer) {
                    peers.push(peer);
                }
            }
        }
        Ok(peers)
    }

    /// Rows queued for `peer` now.
    pub fn outbox_depth(&self, peer: &ServerName) -> usize {
        self.count_prefix(T::Outbox, &super::prefix(peer.as_str()))
    }
}

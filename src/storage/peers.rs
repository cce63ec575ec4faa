//! Peer rows (SPEC §9 `GET /v1/admin/federation/peers`): last seen, last
//! error, versions and 24 h counters, one row per peer server.

use crate::ids::ServerName;

use super::{PeerRecord, Store, T};

impl Store {
    pub fn peer_record(&self, peer: &ServerName) -> crate::error::Result<PeerRecord> {
        Ok(self
            .get(T::Peers, peer.as_str().as_bytes())?
            .unwrap_or_default())
    }

    /// Update a peer's row. Peer rows are statistics: a lost update under a
    /// race costs a counter tick, never an event, so no transaction, and a
    /// failure is logged rather than failing the caller.
    pub fn update_peer(&self, peer: &ServerName, f: impl FnOnce(&mut PeerRecord)) {
        let r = self.peer_record(peer).and_then(|mut rec| {
            f(&mut rec);
            self.put(T::Peers, peer.as_str().as_bytes(), &rec)
        });
        if let Err(e) = r {
            tracing::error!(error = %e, peer = %peer, "could not update a peer row");
        }
    }
}

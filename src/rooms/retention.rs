//! The retention pass: what peers' traffic leaves behind (audit rows,
//! cached `/send` answers, expired invitations) is dropped once
//! its time is up, so no peer can grow our state for ever. Run hourly by
//! the server's retention task; time comes from the rooms' clock, so tests
//! drive a pass by moving the clock.

use std::time::Duration;

use crate::error::Result;
use crate::limits::TXN_CACHE_SECS;

use super::Rooms;

/// What one pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub audit_rows: usize,
    pub txn_answers: usize,
    pub invitations: usize,
}

/// One pass over every retained kind of row; audit rows live
/// `audit_retention` (SPEC §11).
pub fn run_pass(rooms: &Rooms, audit_retention: Duration) -> Result<Pruned> {
    let now = rooms.clock.now_ms();
    Ok(Pruned {
        audit_rows: rooms
            .store
            .prune_audit(now - audit_retention.as_millis() as i64)?,
        txn_answers: rooms
            .store
            .prune_txns(now.saturating_sub(TXN_CACHE_SECS as i64 * 1000))?,
        invitations: rooms.store.prune_invitations(now)?,
    })
}

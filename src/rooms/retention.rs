//! The retention pass: what peers' traffic leaves behind (audit rows,
//! cached `/send` answers, expired invitations) is dropped once
//! its time is up, so no peer can grow our state for ever. Run hourly by
//! the server's retention task; time comes from the app's clock, so tests
//! drive a pass by moving the clock.

use crate::app::App;
use crate::error::Result;
use crate::limits::TXN_CACHE_SECS;

/// What one pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub audit_rows: usize,
    pub txn_answers: usize,
    pub invitations: usize,
}

/// One pass over every retained kind of row.
pub fn run_pass(app: &App) -> Result<Pruned> {
    let now = app.clock.now_ms();
    Ok(Pruned {
        audit_rows: app.prune_audit()?,
        txn_answers: app
            .store
            .prune_txns(now.saturating_sub(TXN_CACHE_SECS as i64 * 1000))?,
        invitations: app.store.prune_invitations(now)?,
    })
}

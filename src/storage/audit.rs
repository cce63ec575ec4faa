//! The audit log (SPEC §9 `GET /v1/admin/audit`): rows keyed by time, so
//! pruning is one range removal and reading is newest first.

use crate::error::{Code, Result};
use crate::ids::ServerName;
use crate::limits::AUDIT_DETAIL_BYTES_MAX;

use super::{keys, AuditRow, Store, T};

/// Audit detail as stored: control characters escaped (it often quotes
/// what a peer sent) and cut to [`AUDIT_DETAIL_BYTES_MAX`].
pub fn audit_detail(detail: &str) -> String {
    let mut out = String::with_capacity(detail.len().min(AUDIT_DETAIL_BYTES_MAX));
    for c in detail.chars() {
        let piece: String = if c.is_control() {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        if out.len() + piece.len() > AUDIT_DETAIL_BYTES_MAX - '…'.len_utf8() {
            out.push('…');
            break;
        }
        out.push_str(&piece);
    }
    out
}

impl AuditRow {
    /// A verified row at `at_ms`; its detail is stored escaped and bounded.
    pub fn new(
        at_ms: i64,
        action: &str,
        peer: Option<&ServerName>,
        event_id: Option<&str>,
        room_id: Option<&str>,
        code: Option<Code>,
        detail: &str,
    ) -> AuditRow {
        AuditRow {
            at_ms,
            action: action.to_string(),
            peer: peer.map(|p| p.to_string()),
            event_id: event_id.map(str::to_string),
            room_id: room_id.map(str::to_string),
            code: code.map(|c| c.as_str().to_string()),
            detail: audit_detail(detail),
            unverified: false,
        }
    }
}

impl Store {
    /// Write audit rows in one batch. Audit rows are a log, not state: they
    /// ride on the next flush rather than costing one of their own, and a
    /// failure to write them is logged, never the caller's error.
    pub fn audit(&self, rows: Vec<AuditRow>) {
        let keyed: Result<Vec<(Vec<u8>, AuditRow)>> = rows
            .into_iter()
            .map(|row| Ok((keys::audit(row.at_ms, self.generate_id()?), row)))
            .collect();
        if let Err(e) = keyed.and_then(|items| self.put_many(T::Audit, &items)) {
            tracing::error!(error = %e, "could not write audit rows");
        }
    }

    /// Drop audit rows older than `cutoff_ms`; answers how many.
    pub fn prune_audit(&self, cutoff_ms: i64) -> Result<usize> {
        if cutoff_ms <= 0 {
            return Ok(0);
        }
        self.remove_range(T::Audit, &[], &keys::audit(cutoff_ms, 0))
    }

    /// Visit rows newest first until `keep` says stop (the admin API pages
    /// them).
    pub fn audit_newest_first(&self, keep: impl FnMut(&AuditRow) -> bool) -> Result<()> {
        self.scan_rev_while(T::Audit, keep)
    }
}

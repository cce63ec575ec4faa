//! The audit log (SPEC §9 `GET /v1/admin/audit`): rows keyed by time, so
//! pruning is one range removal and reading is newest first.

use crate::error::{Code, Result};
use crate::ids::ServerName;
use crate::limits::{AUDIT_DETAIL_BYTES_MAX, AUDIT_ROWS_PER_RECORD_MAX};

use super::{codec, keys, AuditRow, Store, T};

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

/// The first byte of a stored record that holds several rows. A record of
/// one row is a bincode `AuditRow`, which starts with the varint of
/// `at_ms`, and bincode never starts a varint with 0xFF: the two forms
/// cannot be mistaken for each other, so rows written before records held
/// several read unchanged.
const SEVERAL_ROWS: u8 = 0xFF;

fn encode_record(rows: &[AuditRow]) -> Result<Vec<u8>> {
    match rows {
        [row] => codec::encode(row),
        rows => {
            let mut bytes = vec![SEVERAL_ROWS];
            bytes.extend(codec::encode(&rows)?);
            Ok(bytes)
        }
    }
}

/// The rows of one stored record, in the order they were written.
fn decode_record(bytes: &[u8]) -> Result<Vec<AuditRow>> {
    match bytes.split_first() {
        Some((&SEVERAL_ROWS, rest)) => codec::decode(rest),
        _ => Ok(vec![codec::decode(bytes)?]),
    }
}

impl Store {
    /// Write audit rows. Audit rows are a log, not state: they ride on the
    /// next flush rather than costing one of their own, and a failure to
    /// write them is logged, never the caller's error.
    ///
    /// Rows of the same millisecond share one record (up to
    /// [`AUDIT_ROWS_PER_RECORD_MAX`]): a `/send` of 100 events writes one
    /// record, not 100 rows (those inserts took 7 % of the CPU of
    /// ingesting).
    pub fn audit(&self, rows: Vec<AuditRow>) {
        let written = rows
            .chunk_by(|a, b| a.at_ms == b.at_ms)
            .flat_map(|same_ms| same_ms.chunks(AUDIT_ROWS_PER_RECORD_MAX))
            .try_for_each(|record| {
                let key = keys::audit(record[0].at_ms, self.generate_id()?);
                self.wrote(self.tree(T::Audit).insert(key, encode_record(record)?))
                    .map(drop)
            });
        if let Err(e) = written {
            tracing::error!(error = %e, "could not write audit rows");
        }
    }

    /// Drop audit rows older than `cutoff_ms`; answers how many rows (not
    /// records) went.
    pub fn prune_audit(&self, cutoff_ms: i64) -> Result<usize> {
        if cutoff_ms <= 0 {
            return Ok(0);
        }
        let tree = self.tree(T::Audit);
        let mut batch = sled::Batch::default();
        let mut rows = 0;
        for item in tree.range(..keys::audit(cutoff_ms, 0)) {
            let (key, bytes) = item.map_err(|e| self.sled_err(e))?;
            // A record that does not decode is still old: it goes too.
            rows += decode_record(&bytes).map_or(1, |r| r.len());
            batch.remove(key);
        }
        self.wrote(tree.apply_batch(batch))?;
        Ok(rows)
    }

    /// Visit rows newest first until `keep` says stop (the admin API pages
    /// them).
    pub fn audit_newest_first(&self, mut keep: impl FnMut(&AuditRow) -> bool) -> Result<()> {
        for item in self.tree(T::Audit).iter().rev() {
            let (_, bytes) = item.map_err(|e| self.sled_err(e))?;
            for row in decode_record(&bytes)?.iter().rev() {
                if !keep(row) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Every audit row, oldest first.
    pub fn audit_rows(&self) -> Result<Vec<AuditRow>> {
        let mut rows = Vec::new();
        for item in self.tree(T::Audit).iter() {
            let (_, bytes) = item.map_err(|e| self.sled_err(e))?;
            rows.extend(decode_record(&bytes)?);
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(at_ms: i64, event_id: &str) -> AuditRow {
        AuditRow::new(
            at_ms,
            "federation.event.accepted",
            None,
            Some(event_id),
            None,
            None,
            "",
        )
    }

    fn ids(rows: &[AuditRow]) -> Vec<String> {
        rows.iter().map(|r| r.event_id.clone().unwrap()).collect()
    }

    #[test]
    fn rows_of_one_millisecond_share_a_record_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.audit(vec![row(5, "a"), row(5, "b"), row(5, "c"), row(6, "d")]);
        assert_eq!(
            store.count_prefix(T::Audit, b""),
            2,
            "one record per millisecond"
        );
        assert_eq!(ids(&store.audit_rows().unwrap()), ["a", "b", "c", "d"]);
        let mut newest_first = Vec::new();
        store
            .audit_newest_first(|r| {
                newest_first.push(r.clone());
                newest_first.len() < 3
            })
            .unwrap();
        assert_eq!(ids(&newest_first), ["d", "c", "b"], "stops where keep says");
    }

    #[test]
    fn a_record_holds_at_most_its_limit_of_rows() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let n = 2 * AUDIT_ROWS_PER_RECORD_MAX + 1;
        store.audit((0..n).map(|i| row(7, &i.to_string())).collect());
        assert_eq!(store.count_prefix(T::Audit, b""), 3);
        let expected: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        assert_eq!(ids(&store.audit_rows().unwrap()), expected);
    }

    #[test]
    fn a_row_stored_alone_is_a_plain_row_as_before_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // As written before records held several rows.
        store
            .put(T::Audit, &keys::audit(3, 0), &row(3, "old"))
            .unwrap();
        store.audit(vec![row(4, "alone")]);
        let stored: Vec<AuditRow> = store
            .scan::<AuditRow>(T::Audit, b"")
            .unwrap()
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        assert_eq!(
            ids(&stored),
            ["old", "alone"],
            "both decode as one AuditRow"
        );
        assert_eq!(ids(&store.audit_rows().unwrap()), ["old", "alone"]);
    }

    #[test]
    fn pruning_removes_whole_old_records_and_counts_their_rows() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.audit(vec![row(10, "a"), row(10, "b"), row(11, "c"), row(20, "d")]);
        assert_eq!(store.prune_audit(0).unwrap(), 0);
        assert_eq!(store.prune_audit(12).unwrap(), 3, "rows, not records");
        assert_eq!(ids(&store.audit_rows().unwrap()), ["d"]);
    }
}

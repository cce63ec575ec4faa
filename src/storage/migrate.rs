//! Upgrades of an older database, run in place by [`super::Store::open`]
//! before anything else reads it. Each step reads the old layout with its
//! own record types (kept here, frozen) and writes the current one.

use serde::{Deserialize, Serialize};

use super::{codec, keys, sled_err, AuditRow, Store, TxnRecord, T};
use crate::error::Result;

/// An audit row as version 1 stored it (before `unverified`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditRowV1 {
    pub at_ms: i64,
    pub action: String,
    pub peer: Option<String>,
    pub event_id: Option<String>,
    pub room_id: Option<String>,
    pub code: Option<String>,
    pub detail: String,
}

/// Version 1 → 2: audit rows gain `unverified`, and every cached `/send`
/// answer gets its row in the `txn_times` index. Rows are rewritten one at
/// a time: a crash midway leaves version 1 marked, and a rerun reads rows
/// already upgraded as the new format (see [`upgrade_audit_row`]).
pub fn v1_to_v2(store: &Store) -> Result<()> {
    let audit = store.tree(T::Audit);
    for item in audit.iter() {
        let (k, v) = item.map_err(sled_err)?;
        if let Some(row) = upgrade_audit_row(&v)? {
            audit.insert(k, codec::encode(&row)?).map_err(sled_err)?;
        }
    }
    for item in store.tree(T::Txns).iter() {
        let (k, v) = item.map_err(sled_err)?;
        let record: TxnRecord = codec::decode(&v)?;
        store.put(T::TxnTimes, &keys::txn_time(record.at_ms, &k), &())?;
    }
    Ok(())
}

/// The version 2 form of a stored audit row, or `None` if it already is.
/// Only a signature failure records a peer nobody verified: its `peer` is
/// what the request's `ScaiWave-Origin` claimed.
fn upgrade_audit_row(bytes: &[u8]) -> Result<Option<AuditRow>> {
    // Version 1 rows lack the last field and do not decode as version 2
    // (the other way round they would: bincode ignores trailing bytes).
    if codec::decode::<AuditRow>(bytes).is_ok() {
        return Ok(None);
    }
    let old: AuditRowV1 = codec::decode(bytes)?;
    Ok(Some(AuditRow {
        unverified: old.action == "federation.signature_verify_failed",
        at_ms: old.at_ms,
        action: old.action,
        peer: old.peer,
        event_id: old.event_id,
        room_id: old.room_id,
        code: old.code,
        detail: old.detail,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Write rows as version 1 laid them out, mark the store version 1,
    /// reopen it, and read them in the current layout.
    #[test]
    fn a_version_1_database_is_upgraded_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            for (i, action) in [
                "federation.signature_verify_failed",
                "federation.event.accepted",
            ]
            .iter()
            .enumerate()
            {
                let row = AuditRowV1 {
                    at_ms: 1_000 + i as i64,
                    action: action.to_string(),
                    peer: Some("b.test".into()),
                    event_id: None,
                    room_id: None,
                    code: None,
                    detail: "d".into(),
                };
                store
                    .put(T::Audit, &keys::audit(row.at_ms, i as u64), &row)
                    .unwrap();
            }
            let txn = TxnRecord {
                at_ms: 7_000,
                answer: b"{}".to_vec(),
            };
            store
                .put(T::Txns, &keys::txn("b.test", "t1"), &txn)
                .unwrap();
            store
                .tree(T::Meta)
                .insert(b"schema_version", &1u32.to_be_bytes())
                .unwrap();
            store.flush_blocking().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let rows: Vec<AuditRow> = store
            .scan::<AuditRow>(T::Audit, b"")
            .unwrap()
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        assert_eq!(
            rows.iter()
                .map(|r| (r.action.as_str(), r.unverified, r.peer.as_deref()))
                .collect::<Vec<_>>(),
            [
                ("federation.signature_verify_failed", true, Some("b.test")),
                ("federation.event.accepted", false, Some("b.test"))
            ]
        );
        assert!(store
            .contains(
                T::TxnTimes,
                &keys::txn_time(7_000, &keys::txn("b.test", "t1"))
            )
            .unwrap());
        assert_eq!(store.prune_txns(8_000).unwrap(), 1);
        let version = store.tree(T::Meta).get(b"schema_version").unwrap().unwrap();
        assert_eq!(
            version.as_ref(),
            &super::super::SCHEMA_VERSION.to_be_bytes()
        );
        drop(store);
        // Opening again changes nothing.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.count_prefix(T::Audit, b""), 2);
    }
}

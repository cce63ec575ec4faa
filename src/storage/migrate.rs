//! Upgrades of an older database, run in place by [`super::Store::open`]
//! before anything else reads it. Each step reads the old layout with its
//! own record types (kept here, frozen) and writes the current one.

use serde::{Deserialize, Serialize};

use super::{
    codec, keys, AuditRow, Invitation, Member, ReactionRow, Store, StoredEvent, TxnRecord, SEP, T,
};
use crate::error::Result;
use crate::protocol::event::{Content, Event, Membership, ReactionAction};

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

/// Version 1 → 2: audit rows gain `unverified`, every cached `/send`
/// answer gets its row in the `txn_times` index, and invitations move from
/// invite_id keys to target ‖ room_id ‖ invite_id with a row in the
/// `invite_times` index, and joined members of other servers get the
/// `user_rooms` rows ours always had. Rows are rewritten one at a time: a crash midway
/// leaves version 1 marked, and a rerun reads rows already upgraded as the
/// new format (see [`upgrade_audit_row`]; an invitation key with a zero
/// byte is already re-keyed, since event ids never hold one).
pub(crate) fn v1_to_v2(store: &Store) -> Result<()> {
    let audit = store.tree(T::Audit);
    for item in audit.iter() {
        let (k, v) = item.map_err(|e| store.sled_err(e))?;
        if let Some(row) = upgrade_audit_row(&v)? {
            audit
                .insert(k, codec::encode(&row)?)
                .map_err(|e| store.sled_err(e))?;
        }
    }
    for item in store.tree(T::Txns).iter() {
        let (k, v) = item.map_err(|e| store.sled_err(e))?;
        let record: TxnRecord = codec::decode(&v)?;
        store.put(T::TxnTimes, &keys::time_prefixed(record.at_ms, &k), &())?;
    }
    for item in store.tree(T::Invitations).iter() {
        let (k, v) = item.map_err(|e| store.sled_err(e))?;
        let inv: Invitation = codec::decode(&v)?;
        let new_key = keys::invitation(&inv.target, &inv.room_id, &inv.invite_id);
        // The index row first and the old row last: a crash in between
        // leaves both keys, and the rerun finishes the move.
        store.put(
            T::InviteTimes,
            &keys::time_prefixed(inv.expires_at_ms, &new_key),
            &(),
        )?;
        if !k.contains(&SEP) {
            store.put(T::Invitations, &new_key, &inv)?;
            store.remove(T::Invitations, &k)?;
        }
    }
    // Written for every joined member: ours have theirs already, and a
    // row written twice is the same row.
    for item in store.tree(T::Members).iter() {
        let (k, v) = item.map_err(|e| store.sled_err(e))?;
        let m: Member = codec::decode(&v)?;
        let room_id = k.split(|b| *b == SEP).next().unwrap_or_default();
        if m.membership == Membership::Join {
            let room_id = String::from_utf8_lossy(room_id);
            store.put(T::UserRooms, &keys::user_room(&m.fqid, &room_id), &())?;
        }
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

/// Version 2 → 3: every reaction event gets its row under the message it
/// targets (`T::Reactions`), which history pages read instead of scanning
/// the rest of the room. Rows are keyed by the reaction's own seq, so a
/// rerun after a crash midway writes the same rows again.
pub(crate) fn v2_to_v3(store: &Store) -> Result<()> {
    let events = store.tree(T::Events);
    for item in events.iter() {
        let (k, v) = item.map_err(|e| store.sled_err(e))?;
        let stored: StoredEvent = codec::decode(&v)?;
        if stored.rejected {
            continue;
        }
        if let Some((room, seq, row, target)) = reaction_row(&k, &stored) {
            store.put(T::Reactions, &keys::reaction(&room, &target, seq), &row)?;
        }
    }
    Ok(())
}

/// The index row of a stored reaction event: its room, seq, row and target.
fn reaction_row(k: &[u8], stored: &StoredEvent) -> Option<(String, u64, ReactionRow, String)> {
    let (e, _) = Event::parse(&stored.json).ok()?;
    let Content::Reaction {
        target,
        key,
        action,
    } = &e.content
    else {
        return None;
    };
    let seq = u64::from_be_bytes(k.get(k.len().checked_sub(8)?..)?.try_into().ok()?);
    Some((
        e.room_id.to_string(),
        seq,
        ReactionRow {
            key: key.clone(),
            sender: e.sender.to_string(),
            add: *action == ReactionAction::Add,
        },
        target.to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn old_invitation() -> Invitation {
        Invitation {
            invite_id: "0193aaaaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
            room_id: "!roomaaaaaaaaaaaaaaaa:a.test".into(),
            room: crate::protocol::event::RoomSummary {
                name: "r".into(),
                room_type: "standard".into(),
            },
            inviter: "@alice:a.test".into(),
            target: "@bob:b.test".into(),
            expires_at_ms: 9_000,
        }
    }

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
            // Version 1 keyed invitations by invite_id alone.
            store
                .put(
                    T::Invitations,
                    old_invitation().invite_id.as_bytes(),
                    &old_invitation(),
                )
                .unwrap();
            // Version 1 kept room rows only for our own participants.
            for (fqid, membership) in [
                ("@carol:b.test", Membership::Join),
                ("@dave:b.test", Membership::Leave),
            ] {
                let m = Member {
                    fqid: fqid.into(),
                    membership,
                    display_name: None,
                    invite_expires_at_ms: None,
                };
                store
                    .put(T::Members, &keys::member("!r:a.test", fqid), &m)
                    .unwrap();
            }
            store
                .tree(T::Meta)
                .insert(b"schema_version", &1u32.to_be_bytes())
                .unwrap();
            store.flush_blocking().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let rows = store.audit_rows().unwrap();
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
                &keys::time_prefixed(7_000, &keys::txn("b.test", "t1"))
            )
            .unwrap());
        assert_eq!(store.prune_txns(8_000).unwrap(), 1);
        let inv = old_invitation();
        assert_eq!(
            store.invitations_of(&inv.target).unwrap(),
            std::slice::from_ref(&inv)
        );
        assert_eq!(store.count_prefix(T::Invitations, b""), 1);
        assert_eq!(store.count_prefix(T::InviteTimes, b""), 1);
        assert_eq!(store.prune_invitations(inv.expires_at_ms - 1).unwrap(), 0);
        assert_eq!(store.prune_invitations(inv.expires_at_ms).unwrap(), 1);
        assert_eq!(store.count_prefix(T::InviteTimes, b""), 0);
        assert!(store
            .contains(T::UserRooms, &keys::user_room("@carol:b.test", "!r:a.test"))
            .unwrap());
        assert_eq!(store.count_prefix(T::UserRooms, b""), 1);
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

    #[test]
    fn version_2_gains_the_reaction_rows_of_its_events() {
        use crate::ids::{Fqid, KeyId, RoomId};
        use ed25519_dalek::SigningKey;
        let dir = tempfile::tempdir().unwrap();
        let signing = SigningKey::from_bytes(&[7; 32]);
        let key_id = KeyId::derive(&signing.verifying_key().to_bytes());
        let room = RoomId::parse("!abcdefghijklmnop:a.test").unwrap();
        let alice = Fqid::parse("@alice:a.test").unwrap();
        let message = Event::create(
            room.clone(),
            alice.clone(),
            1,
            Content::Message {
                body: "hi".into(),
                thread_root: None,
                reply_to: None,
                mentions: Vec::new(),
            },
            &key_id,
            &signing,
        );
        let reaction = |action| {
            Event::create(
                room.clone(),
                alice.clone(),
                2,
                Content::Reaction {
                    target: message.event_id,
                    key: "👍".into(),
                    action,
                },
                &key_id,
                &signing,
            )
        };
        let stored = |e: &Event| StoredEvent {
            json: e.to_wire_bytes(None),
            state: super::super::DeliveryState::Sent,
            rejected: false,
        };
        {
            let store = Store::open(dir.path()).unwrap();
            // What version 2 wrote: the events, no reaction rows.
            for (seq, e) in [
                (1, message.clone()),
                (2, reaction(ReactionAction::Add)),
                (3, reaction(ReactionAction::Remove)),
                (4, reaction(ReactionAction::Add)),
            ] {
                store
                    .put(T::Events, &keys::event(room.as_str(), seq), &stored(&e))
                    .unwrap();
            }
            store
                .tree(T::Meta)
                .insert(b"schema_version", &2u32.to_be_bytes())
                .unwrap();
            store.flush_blocking().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let rows: Vec<(Vec<u8>, ReactionRow)> = store
            .scan(
                T::Reactions,
                &keys::reactions_of(room.as_str(), &message.event_id.to_string()),
            )
            .unwrap();
        let adds: Vec<bool> = rows.iter().map(|(_, r)| r.add).collect();
        assert_eq!(
            adds,
            [true, false, true],
            "one row per reaction, in seq order"
        );
        assert!(rows
            .iter()
            .all(|(_, r)| r.key == "👍" && r.sender == "@alice:a.test"));
        let version = store.tree(T::Meta).get(b"schema_version").unwrap().unwrap();
        assert_eq!(version.as_ref(), &3u32.to_be_bytes());
    }
}

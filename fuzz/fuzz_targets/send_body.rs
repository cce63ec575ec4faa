//! The body of `POST /send` (SPEC §8) as `rooms::transaction::receive` reads
//! it before any storage: the lenient envelope, then every event strictly
//! (`canonical::parse_strict` + `Event::from_value`) and every EDU
//! (`PresenceEdu::from_value`). Must never panic, and every event that is
//! accepted must survive the trip back to the wire unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scaiwave::protocol::canonical;
use scaiwave::protocol::event::{Event, PresenceEdu};
use serde_json::value::RawValue;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A copy of the private `SendEnvelope` of `src/rooms/transaction.rs`.
#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct SendEnvelope<'a> {
    txn_id: String,
    #[serde(default, borrow)]
    events: Vec<&'a RawValue>,
    #[serde(default, borrow)]
    edus: Vec<&'a RawValue>,
}

fn check_event(event: &Event, seq: Option<u64>) {
    // The hash is over the canonical event without `unsigned`.
    let plain = canonical::canonical_bytes(&event.to_wire_value(None));
    assert_eq!(
        <[u8; 32]>::from(Sha256::digest(&plain)),
        event.content_hash(),
        "content_hash is not SHA-256 of the canonical event"
    );

    // What the signature covers is canonical JSON, and nothing but the event.
    let signing = event.signing_bytes();
    let reparsed = canonical::parse_strict(signing).expect("signing_bytes must parse strictly");
    assert_eq!(
        canonical::canonical_bytes(&reparsed),
        signing,
        "signing_bytes are not canonical"
    );
    assert!(reparsed.get("signatures").is_none() && reparsed.get("unsigned").is_none());

    for seq in [seq, None, Some(0)] {
        let bytes = event.to_wire_bytes(seq);
        let as_value: Value = serde_json::from_slice(&bytes).expect("to_wire_bytes must be JSON");
        assert_eq!(
            as_value,
            event.to_wire_value(seq),
            "to_wire_bytes and to_wire_value disagree"
        );
        let (again, again_seq) = Event::parse(&bytes).unwrap_or_else(|e| {
            panic!(
                "an accepted event must parse back from its wire bytes: {e}\n{}",
                String::from_utf8_lossy(&bytes)
            )
        });
        assert_eq!(again.content_hash(), event.content_hash(), "hash changed");
        assert_eq!(again_seq, seq, "seq changed");
        assert_eq!(again.signing_bytes(), event.signing_bytes());
        assert_eq!(again.event_id, event.event_id);
        assert_eq!(again.content, event.content);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = serde_json::from_slice::<SendEnvelope>(data) else {
        return;
    };
    for raw in &envelope.events {
        let Ok(value) = canonical::parse_strict(raw.get().as_bytes()) else {
            continue;
        };
        if let Ok((event, seq)) = Event::from_value(value) {
            check_event(&event, seq);
        }
    }
    for raw in &envelope.edus {
        if let Ok(value) = serde_json::from_str::<Value>(raw.get()) {
            if let Ok(edu) = PresenceEdu::from_value(&value) {
                let again = PresenceEdu::from_value(&edu.to_value())
                    .expect("PresenceEdu::to_value must parse back");
                assert_eq!(again, edu);
            }
        }
    }
});

//! `canonical::parse_strict` then `canonical::canonical_bytes` (RFC 8785)
//! on arbitrary bytes: every signature in the protocol is over these bytes,
//! so they must be a fixed point and agree with `serde_jcs`. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scaiwave::protocol::canonical;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = canonical::parse_strict(data) else {
        return;
    };
    // What parse_strict admits passes the number rules of check_value too.
    canonical::check_value(&value).expect("parse_strict output must pass check_value");
    let bytes = canonical::canonical_bytes(&value);
    assert_eq!(
        bytes,
        serde_jcs::to_vec(&value).expect("serde_jcs of a parsed Value"),
        "canonical_bytes disagrees with serde_jcs"
    );
    // Idempotent: the canonical form parses strictly to the same value and
    // canonicalises to the same bytes.
    let again = canonical::parse_strict(&bytes).unwrap_or_else(|e| {
        panic!(
            "canonical bytes must parse strictly: {e}\n{}",
            String::from_utf8_lossy(&bytes)
        )
    });
    assert_eq!(again, value, "canonical bytes parse to another value");
    assert_eq!(
        canonical::canonical_bytes(&again),
        bytes,
        "canonicalisation is not idempotent"
    );
    // The one-pass with/without of an object equals two canonicalisations,
    // for objects whose keys are ASCII (its documented precondition).
    if let serde_json::Value::Object(map) = &value {
        if map.keys().all(|k| k.is_ascii()) {
            let key = map.keys().next().cloned().unwrap_or_default();
            let (with, without) = canonical::canonical_bytes_with_and_without(map, &key);
            let mut rest = map.clone();
            rest.remove(&key);
            assert_eq!(with, bytes, "with_and_without: `with` differs");
            assert_eq!(
                without,
                canonical::canonical_bytes(&serde_json::Value::Object(rest)),
                "with_and_without: `without` differs"
            );
        }
    }
});

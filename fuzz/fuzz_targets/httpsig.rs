//! The RFC 9421 / RFC 9530 header parsers of `protocol::httpsig` on
//! arbitrary header values: they read attacker-controlled headers before any
//! key is known, so they must refuse bad input with an error, never panic.
//!
//! Input layout: byte 0 holds flags (bit 0: the request has a body, bits 1-3:
//! Signature-Input / Signature / Content-Digest are absent), the rest is split
//! at the first three `\n` into Signature-Input, Signature, Content-Digest and
//! the body. Header values are `&str` by the time they reach `parse`, so
//! non-UTF-8 bytes are replaced (lossy), as a lenient caller would do.
#![no_main]

use std::borrow::Cow;

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use scaiwave::protocol::httpsig::{self, RequestParts};
use scaiwave::ids::KeyId;

fn text(bytes: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(bytes)
}

fn fixed_parts(content_digest: Option<&str>) -> RequestParts<'_> {
    RequestParts {
        method: "POST",
        authority: "B.Example.com:8448",
        path: "/v1/send/txn%2F1",
        query: Some("a=1&b=%2F"),
        origin: "a.example.com",
        content_digest,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let has_body = flags & 1 != 0;
    let mut fields = rest.splitn(4, |&b| b == b'\n');
    let input = text(fields.next().unwrap_or_default());
    let signature = text(fields.next().unwrap_or_default());
    let digest = text(fields.next().unwrap_or_default());
    let body = fields.next().unwrap_or_default();

    let input = (flags & 2 == 0).then_some(&*input);
    let signature = (flags & 4 == 0).then_some(&*signature);
    let digest = (flags & 8 == 0).then_some(&*digest);

    // Content-Digest: never a panic, and our own digest of a body always checks.
    let _ = httpsig::check_content_digest(digest, body);
    let ours = httpsig::content_digest(body);
    httpsig::check_content_digest(Some(&ours), body)
        .expect("content_digest(body) must pass check_content_digest for the same body");

    if let Ok(parsed) = httpsig::parse(input, signature, has_body) {
        // What parse admits: every required component, content-digest iff a body.
        for required in [
            "@method",
            "@authority",
            "@path",
            "@query",
            "scaiwave-origin",
        ] {
            assert!(
                parsed.components.iter().any(|c| c == required),
                "{parsed:?}"
            );
        }
        assert_eq!(
            parsed.components.iter().any(|c| c == "content-digest"),
            has_body,
            "{parsed:?}"
        );
        for parts in [
            fixed_parts(digest),
            fixed_parts(None),
            fixed_parts(Some(&ours)),
        ] {
            let base = parsed.signature_base(&parts);
            assert!(base.ends_with(&parsed.signature_params), "{base:?}");
            let key = SigningKey::from_bytes(&[7; 32]).verifying_key();
            let _ = parsed.verify(&parts, &key);
        }
    }

    // Round trip: whatever the request looks like, what `sign` writes parses
    // back and verifies, unless a value holds a line break (refused by design).
    let created = i64::from_le_bytes(
        body.iter()
            .copied()
            .chain([0; 8])
            .take(8)
            .collect::<Vec<u8>>()
            .try_into()
            .unwrap(),
    ) % 1_000_000_000_000_000;
    let method = signature.unwrap_or("GET");
    let origin = digest.unwrap_or("a.example.com");
    let parts = RequestParts {
        method,
        authority: input.unwrap_or("b.example.com"),
        path: origin,
        query: input,
        origin,
        content_digest: has_body.then_some(&*ours),
    };
    let key = SigningKey::from_bytes(&[7; 32]);
    let key_id = KeyId::derive(key.verifying_key().as_bytes());
    let headers = httpsig::sign(&parts, &key_id, &key, created);
    let parsed = httpsig::parse(
        Some(&headers.signature_input),
        Some(&headers.signature),
        has_body,
    )
    .expect("what sign writes must parse");
    assert_eq!(parsed.created_unix_secs, created);
    assert_eq!(parsed.key_id, key_id);
    let line_break = [parts.method, parts.authority, parts.path, parts.origin]
        .into_iter()
        .chain(parts.query)
        .any(|v| v.contains(['\r', '\n']));
    if !line_break {
        parsed
            .verify(&parts, &key.verifying_key())
            .expect("what sign writes must verify");
    }
});

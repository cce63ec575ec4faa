//! Inbound request authentication in the exact order of SPEC §4 (cheap
//! checks first, key fetch last), and the keys an event's signatures name.

use std::collections::HashMap;

use ed25519_dalek::VerifyingKey;

use crate::error::{Code, Error, Result};
use crate::ids::{KeyId, ServerName};
use crate::protocol::event::Event;
use crate::protocol::httpsig::{self, RequestParts};
use crate::storage::audit::audit_detail;

use super::verifier::KeyUse;
use super::Federation;

/// What §4 needs from an inbound request's head, as received.
pub struct SignedRequest<'a> {
    pub method: &'a str,
    /// The Host header / HTTP/2 `:authority`.
    pub authority: Option<&'a str>,
    /// The TLS SNI of the connection.
    pub sni: Option<&'a str>,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub signature_input: Option<&'a str>,
    pub signature: Option<&'a str>,
    pub content_digest: Option<&'a str>,
}

/// Requests of these methods carry a body, so a Content-Digest.
pub fn has_body(method: &str) -> bool {
    method == "POST" || method == "PUT"
}

/// A request failed authentication: its origin is only a claim, so the
/// audit row says so (and such rows are rated, see [`Federation::audit_unverified`]).
/// `result` is its `scaiwave_federation_signature_verifications_total`
/// label (SPEC §16).
fn signature_failed(
    fed: &Federation,
    claimed: Option<&ServerName>,
    e: &Error,
    result: &'static str,
) {
    fed.metrics.signature_verification(result);
    tracing::warn!(name: "federation.signature_verify_failed", peer = claimed.map(|o| o.as_str()).unwrap_or("-"), code = %e.code, "federation.signature_verify_failed: {}", audit_detail(&e.message));
    fed.audit_unverified(
        "federation.signature_verify_failed",
        claimed,
        e.code,
        &e.message,
    );
}

/// SPEC §4, steps 1-6 in order, on the request's head: the first failure
/// is the answer. Returns the authenticated origin. The body is not read
/// yet: step 4 here checks that Content-Digest is there and well-formed,
/// and [`check_body_digest`] compares it with the body once it is read
/// (the signature covers the Content-Digest header, so the request is
/// authenticated before its body is read; docs/decisions.md).
pub(crate) async fn authenticate(fed: &Federation, req: &SignedRequest<'_>) -> Result<ServerName> {
    let has_body = has_body(req.method);
    // 1. headers present and well-formed.
    let parsed = httpsig::parse(req.signature_input, req.signature, has_body)
        .and_then(|p| {
            let origin = req.origin.ok_or_else(|| {
                Error::signature(
                    "the ScaiWave-Origin header is missing; send your server_name in it",
                )
            })?;
            let origin = ServerName::parse(origin).map_err(|_| {
                Error::signature(format!("ScaiWave-Origin {origin:?} is not a server name"))
            })?;
            Ok((p, origin))
        })
        .inspect_err(|e| signature_failed(fed, None, e, "malformed"))?;
    let (sig, origin) = parsed;
    // 2. destination, key, tenant switch.
    let authority = req.authority.unwrap_or("").to_ascii_lowercase();
    if authority != fed.server_name.as_str() {
        return Err(Error::new(
            Code::WrongDestination,
            format!("this server is {}, not {authority:?}; send the request to the server named in the room or FQID", fed.server_name),
        ));
    }
    if req.sni.map(|s| s.to_ascii_lowercase()) != Some(fed.server_name.host().to_string()) {
        return Err(Error::new(
            Code::WrongDestination,
            format!(
                "the TLS SNI must be {} (the host part of the Host header)",
                fed.server_name.host()
            ),
        ));
    }
    if !fed.keys.has_key() {
        return Err(super::keys::no_key());
    }
    if !fed.enabled() {
        return Err(fed.disabled_error());
    }
    // 3. clock skew.
    let skew = fed.config.max_clock_skew.as_secs() as i64;
    let now = fed.clock.now_secs();
    if (sig.created_unix_secs - now).abs() > skew {
        let e = Error::signature(format!(
            "the signature was created at {} but it is {now} here (allowed skew {skew}s); sync the clocks (NTP) on both servers",
            sig.created_unix_secs
        ))
        .with_reason("clock_skew");
        signature_failed(fed, Some(&origin), &e, "clock_skew");
        return Err(e);
    }
    // 4. the digest header (its match with the body comes after the read).
    if has_body {
        httpsig::content_digest_sha256(req.content_digest)
            .inspect_err(|e| signature_failed(fed, Some(&origin), e, "malformed"))?;
    }
    // 5. policy, before any key fetch.
    fed.admit_claimed(&origin)?;
    // 6. the signature itself.
    let parts = RequestParts {
        method: req.method,
        authority: &authority,
        path: req.path,
        query: req.query,
        origin: origin.as_str(),
        content_digest: req.content_digest,
    };
    let key = fed
        .verifier
        .key(
            &origin,
            &sig.key_id,
            KeyUse::Request {
                now_ms: fed.clock.now_ms(),
            },
        )
        .await
        .inspect_err(|e| signature_failed(fed, Some(&origin), e, "no_key"))?;
    sig.verify(&parts, &key)
        .inspect_err(|e| signature_failed(fed, Some(&origin), e, "mismatch"))?;
    fed.metrics.signature_verification("ok");
    fed.outbox.peer_is_back(&origin);
    Ok(origin)
}

/// Step 4's comparison, once the body of an authenticated request is read.
pub(crate) fn check_body_digest(
    fed: &Federation,
    origin: &ServerName,
    content_digest: Option<&str>,
    body: &[u8],
) -> Result<()> {
    httpsig::check_content_digest(content_digest, body)
        .inspect_err(|e| signature_failed(fed, Some(origin), e, "digest_mismatch"))
}

/// The keys an event's signatures name, as far as we can get them: policy
/// on the event's origin first, then our own ring or the verifier cache.
pub(crate) async fn event_keys(
    fed: &Federation,
    event: &Event,
) -> Result<HashMap<KeyId, VerifyingKey>> {
    let mut keys = HashMap::new();
    if event.origin == fed.server_name {
        for (key_id, _) in event.origin_signatures() {
            if let Some(k) = fed.keys.own_key_for_event(&key_id, event.origin_ts_ms) {
                keys.insert(key_id, k);
            }
        }
        return Ok(keys);
    }
    fed.admit(&event.origin)?;
    for (key_id, _) in event.origin_signatures() {
        let usage = KeyUse::Event {
            origin_ts_ms: event.origin_ts_ms,
        };
        if let Ok(k) = fed.verifier.key(&event.origin, &key_id, usage).await {
            keys.insert(key_id, k);
        }
    }
    Ok(keys)
}

/// Policy on the event's origin, then its key, then its signature.
pub(crate) async fn verify_event(fed: &Federation, event: &Event) -> Result<()> {
    let keys = event_keys(fed, event).await?;
    let verified = event.verify(|id| keys.get(id).copied());
    fed.metrics.signature_verification(if verified.is_ok() {
        "event_ok"
    } else {
        "event_mismatch"
    });
    verified
}

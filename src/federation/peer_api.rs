//! The S2S calls we make (SPEC §8): each federation path spelled once,
//! each answer typed, and how an answer counts for a retry (SPEC §10).
//! Callers above say what they want from a peer; this module knows how
//! it is asked.

use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::error::{Code, Error, Result};
use crate::ids::{Fqid, RoomId, ServerName};
use crate::limits::{
    backfill_reply_bytes_max, DELIVERY_TIMEOUT_SECS, MEMBERS_REPLY_BYTES_MAX, SYNC_S2S_TIMEOUT_SECS,
};
use crate::protocol::event::Event;
use crate::protocol::wire::{
    BackfillAnswer, CallToken, MembersAnswer, ProfileAnswer, SendAnswer, SendBody, SendStatus,
};

use super::client::{NetworkError, Reply};
use super::Federation;

/// Where every S2S path starts.
pub const PREFIX: &str = "/_scaiwave/federation/v1";

/// Characters left alone when percent-encoding an id into a path segment
/// (RFC 3986 unreserved).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub fn encode_segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

pub(crate) fn send_path() -> String {
    format!("{PREFIX}/send")
}

pub(crate) fn profile_path(local_id: &str) -> String {
    format!("{PREFIX}/profile/{}", encode_segment(local_id))
}

pub fn members_path(room_id: &RoomId) -> String {
    format!(
        "{PREFIX}/rooms/{}/members",
        encode_segment(room_id.as_str())
    )
}

pub(crate) fn backfill_path(room_id: &RoomId, before_seq: Option<u64>, limit: u64) -> String {
    let mut path = format!(
        "{PREFIX}/rooms/{}/backfill?limit={limit}",
        encode_segment(room_id.as_str())
    );
    if let Some(b) = before_seq {
        path.push_str(&format!("&before_seq={b}"));
    }
    path
}

pub fn call_token_path(room_id: &RoomId) -> String {
    format!(
        "{PREFIX}/rooms/{}/call-token",
        encode_segment(room_id.as_str())
    )
}

/// What one attempt to send a transaction came to.
#[derive(Debug)]
pub enum Attempt {
    /// The peer answered 200 with one result per event.
    Answered(SendAnswer),
    /// Try again later (network, 5xx, 408, 429, signature or unknown peer).
    Retry {
        code: String,
        message: String,
        retry_after_secs: Option<u64>,
    },
    /// The peer refused the whole transaction for good.
    Refused { code: String, message: String },
}

/// Classify a transport result by SPEC §10's retry classes.
pub(crate) fn classify(reply: std::result::Result<Reply, NetworkError>) -> Attempt {
    let reply = match reply {
        Ok(r) => r,
        Err(e) => {
            return Attempt::Retry {
                code: "network".into(),
                message: e.0,
                retry_after_secs: None,
            }
        }
    };
    if reply.status == 200 {
        return match reply.json::<SendAnswer>() {
            Ok(a) => Attempt::Answered(a),
            Err(e) => Attempt::Retry {
                code: "bad_answer".into(),
                message: e,
                retry_after_secs: None,
            },
        };
    }
    let err = reply.error();
    let code = err
        .as_ref()
        .map(|e| e.code.clone())
        .unwrap_or_else(|| format!("http_{}", reply.status));
    let message = err
        .map(|e| e.message)
        .unwrap_or_else(|| format!("HTTP {}", reply.status));
    let retry = reply.status >= 500
        || reply.status == 408
        || reply.status == 429
        || Code::parse(&code)
            .is_some_and(|c| matches!(c, Code::SignatureMismatch | Code::PeerUnknown));
    if retry {
        Attempt::Retry {
            code,
            message,
            retry_after_secs: reply.retry_after_secs,
        }
    } else {
        Attempt::Refused { code, message }
    }
}

/// A peer's error answer, passed on with the peer named.
pub fn remote_error(server: &ServerName, reply: &Reply) -> Error {
    match reply.error() {
        Some(e) => {
            let code = Code::parse(&e.code).unwrap_or(Code::Internal);
            let mut err = Error::new(code, format!("{server} answered {}: {}", e.code, e.message));
            err.status = Some(reply.status);
            err
        }
        None => Error::new(
            Code::Internal,
            format!("{server} answered HTTP {}", reply.status),
        ),
    }
}

/// `POST /send` of a prepared transaction body, as the delivery loop sends it.
pub(crate) async fn send_transaction(
    fed: &Federation,
    peer: &ServerName,
    body: Vec<u8>,
) -> Attempt {
    let timeout = Duration::from_secs(DELIVERY_TIMEOUT_SECS);
    match fed
        .s2s(http::Method::POST, peer, &send_path(), Some(body), timeout)
        .await
    {
        Ok(reply) => classify(reply),
        // We cannot sign (no key yet): retry, an admin may generate one.
        Err(e) => Attempt::Retry {
            code: e.code.as_str().into(),
            message: e.message,
            retry_after_secs: None,
        },
    }
}

/// Send one event straight to its room's host and wait (≤ 10 s): the
/// host's `seq` for it, or its refusal. `None` means the host could not
/// be reached (or asked us to come back later).
pub(crate) async fn send_to_host(
    fed: &Federation,
    event: &Event,
) -> Result<Option<std::result::Result<u64, Error>>> {
    let host = event.room_id.host();
    let body = serde_json::to_vec(&SendBody {
        txn_id: event.event_id.to_string(),
        events: vec![event.to_wire_value(None)],
        edus: Vec::new(),
    })
    .map_err(|e| Error::internal("encode", e))?;
    let reply = fed
        .s2s(
            http::Method::POST,
            &host,
            &send_path(),
            Some(body),
            Duration::from_secs(SYNC_S2S_TIMEOUT_SECS),
        )
        .await?;
    let refused = |code: &str, message: &str| {
        let c = Code::parse(code).unwrap_or(Code::Internal);
        Err(Error::new(c, format!("{host} refused: {message}")))
    };
    Ok(match classify(reply) {
        Attempt::Answered(a) => {
            let r = a
                .results
                .into_iter()
                .find(|r| r.event_id == event.event_id.to_string());
            Some(match r {
                Some(r) if r.status == SendStatus::Rejected => match r.error {
                    Some(e) => refused(&e.code, &e.message),
                    None => refused("internal", "rejected without a reason"),
                },
                Some(r) => Ok(r.seq.unwrap_or(0)),
                None => Err(Error::new(
                    Code::Internal,
                    format!("{host} did not answer for the event"),
                )),
            })
        }
        Attempt::Retry { .. } => None,
        Attempt::Refused { code, message } => Some(refused(&code, &message)),
    })
}

/// Ask `fqid`'s server for its profile (signed GET). Any failure is the
/// inviter's answer (SPEC §6 step 1).
pub async fn profile(fed: &Federation, fqid: &Fqid) -> Result<ProfileAnswer> {
    let server = fqid.server();
    let reply = fed
        .s2s(
            http::Method::GET,
            &server,
            &profile_path(fqid.local_id().as_str()),
            None,
            Duration::from_secs(SYNC_S2S_TIMEOUT_SECS),
        )
        .await?
        .map_err(|e| {
            Error::new(
                Code::ParticipantNotFound,
                format!("cannot reach {server} to look up {fqid}: {e}"),
            )
            .as_conflict()
        })?;
    if !reply.ok() {
        return Err(remote_error(&server, &reply));
    }
    reply.json::<ProfileAnswer>().map_err(|e| {
        Error::new(
            Code::ParticipantNotFound,
            format!("{server} answered the profile request with {e}"),
        )
    })
}

/// The host's member list of `room_id`; `None` if the host answered with
/// an error (the caller carries on without it).
pub async fn members(fed: &Federation, room_id: &RoomId) -> Result<Option<MembersAnswer>> {
    let reply = fed
        .s2s_reading(
            http::Method::GET,
            &room_id.host(),
            &members_path(room_id),
            None,
            Duration::from_secs(SYNC_S2S_TIMEOUT_SECS),
            MEMBERS_REPLY_BYTES_MAX,
        )
        .await?
        .map_err(|e| Error::new(Code::Internal, e.0))?;
    if !reply.ok() {
        return Ok(None);
    }
    reply
        .json()
        .map(Some)
        .map_err(|e| Error::new(Code::Internal, e))
}

/// Up to `limit` events of `room_id` before `before_seq`, from its host.
pub async fn backfill(
    fed: &Federation,
    room_id: &RoomId,
    before_seq: Option<u64>,
    limit: u64,
) -> Result<BackfillAnswer> {
    let host = room_id.host();
    let reply = fed
        .s2s_reading(
            http::Method::GET,
            &host,
            &backfill_path(room_id, before_seq, limit),
            None,
            Duration::from_secs(SYNC_S2S_TIMEOUT_SECS),
            backfill_reply_bytes_max(limit),
        )
        .await?
        .map_err(|e| Error::new(Code::Internal, format!("cannot reach {host}: {e}")))?;
    if !reply.ok() {
        return Err(remote_error(&host, &reply));
    }
    reply.json().map_err(|e| Error::new(Code::Internal, e))
}

/// A call token for our participant `fqid` from the host of `room_id`
/// (SPEC §14); the host's refusal comes back with its code and status.
pub async fn call_token(fed: &Federation, room_id: &RoomId, fqid: &Fqid) -> Result<CallToken> {
    let host = room_id.host();
    let body = serde_json::to_vec(&serde_json::json!({ "fqid": fqid.as_str() }))
        .map_err(|e| Error::internal("encode", e))?;
    let reply = fed
        .s2s(
            http::Method::POST,
            &host,
            &call_token_path(room_id),
            Some(body),
            Duration::from_secs(SYNC_S2S_TIMEOUT_SECS),
        )
        .await?
        .map_err(|e| Error::new(Code::Internal, format!("cannot reach {host}: {e}")))?;
    if !reply.ok() {
        return Err(remote_error(&host, &reply));
    }
    reply.json().map_err(|e| Error::new(Code::Internal, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(
        status: u16,
        code: Option<&str>,
        retry_after: Option<u64>,
    ) -> std::result::Result<Reply, NetworkError> {
        let body = code
            .map(|c| {
                serde_json::to_vec(
                    &crate::error::Error::new(Code::parse(c).unwrap(), "x").to_body(),
                )
                .unwrap()
            })
            .unwrap_or_default();
        Ok(Reply {
            status,
            retry_after_secs: retry_after,
            date_secs: None,
            max_age_secs: None,
            body: body.into(),
        })
    }

    #[test]
    fn retry_classes_follow_spec_section_10() {
        let retry = |r| matches!(classify(r), Attempt::Retry { .. });
        assert!(retry(Err(NetworkError("refused".into()))));
        assert!(retry(reply(500, None, None)));
        assert!(retry(reply(503, Some("SW_FED_NO_KEY"), None)));
        assert!(retry(reply(408, None, None)));
        assert!(retry(reply(401, Some("SW_FED_SIGNATURE_MISMATCH"), None)));
        assert!(retry(reply(403, Some("SW_FED_PEER_UNKNOWN"), None)));
        match classify(reply(429, Some("SW_FED_RATE_LIMITED"), Some(30))) {
            Attempt::Retry {
                retry_after_secs, ..
            } => assert_eq!(retry_after_secs, Some(30)),
            other => panic!("{other:?}"),
        }
        for (status, code) in [
            (403, "SW_FED_POLICY_REJECTED"),
            (400, "SW_FED_BAD_REQUEST"),
            (421, "SW_FED_WRONG_DESTINATION"),
            (403, "SW_FED_TENANT_DISABLED"),
        ] {
            assert!(
                matches!(
                    classify(reply(status, Some(code), None)),
                    Attempt::Refused { .. }
                ),
                "{code}"
            );
        }
        assert!(matches!(
            classify(reply(404, None, None)),
            Attempt::Refused { .. }
        ));
    }
}

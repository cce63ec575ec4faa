//! The one error type of the server, with the stable codes of SPEC §10.
//!
//! Every failure a caller can see is an [`Error`]: a [`Code`] (which knows its
//! `SW_…` string, HTTP status and whether a sender should retry), a message
//! that says what to do, and an optional machine `reason`. It becomes an HTTP
//! answer in exactly one place (`api::reply`). Codes are public API: they are
//! listed in `docs/errors.md` and never renamed.

use std::fmt;

/// A stable error code. The string form is the `code` field on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Code {
    // S2S codes (SPEC §10).
    PeerUnknown,
    PolicyRejected,
    SignatureMismatch,
    ProtocolVersion,
    WrongDestination,
    NoKey,
    FedBadRequest,
    BadEvent,
    TooLarge,
    RateLimited,
    RoomNotFound,
    RoomNotFederated,
    RoomTypeForbidden,
    TenantDisabled,
    NotRoomHost,
    NotMember,
    ForeignLimit,
    InviteExpired,
    ParticipantNotFound,
    BackfillRefused,
    /// Calls need `[livekit]` on the room's host (SPEC §14).
    CallsUnavailable,
    /// The data disk is full (SPEC §10): nothing was stored; retry once
    /// the operator has freed space.
    StorageFull,
    // Local (admin and client) API codes (SPEC §9).
    BadRequest,
    Unauthenticated,
    Forbidden,
    NotFound,
    Conflict,
    // A fault of ours; opaque to the caller, logged with its cause.
    Internal,
}

impl Code {
    pub const ALL: [Code; 28] = [
        Code::PeerUnknown,
        Code::PolicyRejected,
        Code::SignatureMismatch,
        Code::ProtocolVersion,
        Code::WrongDestination,
        Code::NoKey,
        Code::FedBadRequest,
        Code::BadEvent,
        Code::TooLarge,
        Code::RateLimited,
        Code::RoomNotFound,
        Code::RoomNotFederated,
        Code::RoomTypeForbidden,
        Code::TenantDisabled,
        Code::NotRoomHost,
        Code::NotMember,
        Code::ForeignLimit,
        Code::InviteExpired,
        Code::ParticipantNotFound,
        Code::BackfillRefused,
        Code::CallsUnavailable,
        Code::StorageFull,
        Code::BadRequest,
        Code::Unauthenticated,
        Code::Forbidden,
        Code::NotFound,
        Code::Conflict,
        Code::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Code::PeerUnknown => "SW_FED_PEER_UNKNOWN",
            Code::PolicyRejected => "SW_FED_POLICY_REJECTED",
            Code::SignatureMismatch => "SW_FED_SIGNATURE_MISMATCH",
            Code::ProtocolVersion => "SW_FED_PROTOCOL_VERSION",
            Code::WrongDestination => "SW_FED_WRONG_DESTINATION",
            Code::NoKey => "SW_FED_NO_KEY",
            Code::FedBadRequest => "SW_FED_BAD_REQUEST",
            Code::BadEvent => "SW_FED_BAD_EVENT",
            Code::TooLarge => "SW_FED_TOO_LARGE",
            Code::RateLimited => "SW_FED_RATE_LIMITED",
            Code::RoomNotFound => "SW_FED_ROOM_NOT_FOUND",
            Code::RoomNotFederated => "SW_FED_ROOM_NOT_FEDERATED",
            Code::RoomTypeForbidden => "SW_FED_ROOM_TYPE_FORBIDDEN",
            Code::TenantDisabled => "SW_FED_TENANT_DISABLED",
            Code::NotRoomHost => "SW_FED_NOT_ROOM_HOST",
            Code::NotMember => "SW_FED_NOT_MEMBER",
            Code::ForeignLimit => "SW_FED_FOREIGN_LIMIT",
            Code::InviteExpired => "SW_FED_INVITE_EXPIRED",
            Code::ParticipantNotFound => "SW_FED_PARTICIPANT_NOT_FOUND",
            Code::BackfillRefused => "SW_FED_BACKFILL_REFUSED",
            Code::CallsUnavailable => "SW_CALLS_UNAVAILABLE",
            Code::StorageFull => "SW_STORAGE_FULL",
            Code::BadRequest => "SW_BAD_REQUEST",
            Code::Unauthenticated => "SW_UNAUTHENTICATED",
            Code::Forbidden => "SW_FORBIDDEN",
            Code::NotFound => "SW_NOT_FOUND",
            Code::Conflict => "SW_CONFLICT",
            Code::Internal => "SW_INTERNAL",
        }
    }

    pub fn parse(s: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The HTTP status of SPEC §10.
    pub fn status(self) -> u16 {
        match self {
            Code::FedBadRequest | Code::BadEvent | Code::ProtocolVersion | Code::BadRequest => 400,
            Code::SignatureMismatch | Code::Unauthenticated => 401,
            Code::PolicyRejected
            | Code::PeerUnknown
            | Code::NotMember
            | Code::NotRoomHost
            | Code::RoomNotFederated
            | Code::RoomTypeForbidden
            | Code::TenantDisabled
            | Code::ForeignLimit
            | Code::BackfillRefused
            | Code::Forbidden => 403,
            Code::RoomNotFound | Code::ParticipantNotFound | Code::NotFound => 404,
            Code::Conflict => 409,
            Code::InviteExpired => 410,
            Code::TooLarge => 413,
            Code::WrongDestination => 421,
            Code::RateLimited => 429,
            Code::Internal => 500,
            Code::NoKey | Code::CallsUnavailable => 503,
            Code::StorageFull => 507,
        }
    }

    /// Whether a sender should retry a request or event that got this code
    /// (SPEC §10: network errors, 5xx, 408, 429, signature mismatch and
    /// unknown peer retry; every other code fails at once).
    pub fn retryable(self) -> bool {
        matches!(
            self,
            Code::NoKey
                | Code::RateLimited
                | Code::SignatureMismatch
                | Code::PeerUnknown
                | Code::Internal
                | Code::StorageFull
        )
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure with a code, a message that says what to do, and optional detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: Code,
    pub message: String,
    /// Machine-readable refinement, e.g. `clock_skew` or `digest` (SPEC §4).
    pub reason: Option<&'static str>,
    /// Overrides the code's status; the local API answers 409 for "this
    /// cannot federate" with the `SW_FED_*` code that says why (SPEC §9).
    pub status: Option<u16>,
    /// Seconds for a `Retry-After` header.
    pub retry_after_secs: Option<u64>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Error {
        Error {
            code,
            message: message.into(),
            reason: None,
            status: None,
            retry_after_secs: None,
        }
    }

    pub fn with_reason(mut self, reason: &'static str) -> Error {
        self.reason = Some(reason);
        self
    }

    /// The local API's 409 "this cannot federate" form of an S2S refusal.
    pub fn as_conflict(mut self) -> Error {
        self.status = Some(409);
        self
    }

    pub fn status(&self) -> u16 {
        self.status.unwrap_or_else(|| self.code.status())
    }

    pub fn retryable(&self) -> bool {
        self.code.retryable()
    }

    /// An internal fault: the caller sees an opaque message, the log sees why.
    pub fn internal(context: &str, cause: impl fmt::Display) -> Error {
        tracing::error!(context, %cause, "internal error");
        Error::new(
            Code::Internal,
            "internal error; the server logged the cause, retry later",
        )
    }

    pub fn bad_request(message: impl Into<String>) -> Error {
        Error::new(Code::BadRequest, message)
    }

    pub fn fed_bad_request(message: impl Into<String>) -> Error {
        Error::new(Code::FedBadRequest, message)
    }

    pub fn bad_event(message: impl Into<String>) -> Error {
        Error::new(Code::BadEvent, message)
    }

    pub fn not_found(message: impl Into<String>) -> Error {
        Error::new(Code::NotFound, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Error {
        Error::new(Code::Forbidden, message)
    }

    pub fn signature(message: impl Into<String>) -> Error {
        Error::new(Code::SignatureMismatch, message)
    }

    /// The §10 body: `{"error": {"code", "message", "reason"?, "retryable"}}`.
    pub fn to_body(&self) -> WireError {
        WireError {
            error: WireErrorInner {
                code: self.code.as_str().to_string(),
                message: self.message.clone(),
                reason: self.reason.map(str::to_string),
                retryable: self.retryable(),
            },
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if let Some(reason) = self.reason {
            write!(f, " (reason: {reason})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

/// The error body as it travels (SPEC §10).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WireError {
    pub error: WireErrorInner,
}

/// The object inside [`WireError`]; also the per-event `error` of `/send`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WireErrorInner {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub retryable: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_statuses_follow_spec() {
        for code in Code::ALL {
            assert_eq!(Code::parse(code.as_str()), Some(code));
        }
        assert_eq!(Code::TooLarge.status(), 413);
        assert_eq!(Code::WrongDestination.status(), 421);
        assert_eq!(Code::InviteExpired.status(), 410);
        assert!(Code::NoKey.retryable());
        assert_eq!(Code::StorageFull.as_str(), "SW_STORAGE_FULL");
        assert_eq!(Code::StorageFull.status(), 507);
        assert!(Code::StorageFull.retryable());
        assert!(!Code::BadEvent.retryable());
    }

    #[test]
    fn conflict_form_keeps_the_code() {
        let e = Error::new(Code::RoomTypeForbidden, "incognito rooms never federate").as_conflict();
        assert_eq!(e.status(), 409);
        assert_eq!(e.to_body().error.code, "SW_FED_ROOM_TYPE_FORBIDDEN");
    }
}

//! Wire types of the S2S protocol (SPEC §3, §8) that are not events: the
//! server descriptor and the `/send` envelope and answers. Kept apart from
//! storage and domain types; conversion is explicit at the edges.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::WireErrorInner;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Endpoints {
    pub send: String,
    pub profile: String,
    pub members: String,
    pub backfill: String,
}

impl Endpoints {
    pub fn v1() -> Endpoints {
        Endpoints {
            send: "/_scaiwave/federation/v1/send".into(),
            profile: "/_scaiwave/federation/v1/profile/{local_id}".into(),
            members: "/_scaiwave/federation/v1/rooms/{room_id}/members".into(),
            backfill: "/_scaiwave/federation/v1/rooms/{room_id}/backfill".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OldKey {
    pub key_id: String,
    pub public_key: String,
    pub rotated_at: String,
    pub expires_at: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Descriptor {
    pub server_name: String,
    pub public_key: String,
    pub key_id: String,
    pub protocol_versions: Vec<String>,
    pub endpoints: Endpoints,
    #[serde(default)]
    pub old_keys: Vec<OldKey>,
}

/// `POST /send` body. Events stay raw JSON: their bytes are signed.
#[derive(Debug, Clone, Serialize)]
pub struct SendBody {
    pub txn_id: String,
    pub events: Vec<Value>,
    pub edus: Vec<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendStatus {
    Accepted,
    Duplicate,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendResult {
    pub event_id: String,
    pub status: SendStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<WireErrorInner>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendAnswer {
    pub results: Vec<SendResult>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileAnswer {
    pub fqid: String,
    pub display_name: String,
    pub presence: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberEntry {
    pub fqid: String,
    pub membership: String,
    pub display_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MembersAnswer {
    pub room_id: String,
    pub host: String,
    pub as_of_seq: u64,
    pub members: Vec<MemberEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackfillAnswer {
    pub events: Vec<Value>,
    pub next_before_seq: Option<u64>,
}

/// A call token (SPEC §14): the LiveKit URL and the access token for it.
/// The answer of `POST /v1/rooms/{room_id}/call` and of the S2S
/// `call-token` request alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallToken {
    pub url: String,
    pub token: String,
}

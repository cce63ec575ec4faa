//! Calls (SPEC §14): a LiveKit access token for a joined member of a room.
//! The call lives on the room host's LiveKit, so the host mints every
//! token: for its own participants directly, for a replica's participant
//! on that replica's signed `call-token` request. This server never talks
//! to LiveKit; the token is all a participant needs to join.

use serde::{Deserialize, Serialize};

use crate::config::LivekitConfig;
use crate::error::{Code, Error, Result};
use crate::federation::peer_api;
use crate::ids::{Fqid, RoomId};
use crate::limits::CALL_TOKEN_SECS;
use crate::protocol::event::Membership;
use crate::protocol::wire::CallToken;
use crate::storage::{Participant, Room};

use super::{fqid_of, Rooms};

/// The claims of a LiveKit access token (RFC 7519, HS256 with the API
/// secret; SPEC §14 lists them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The LiveKit API key.
    pub iss: String,
    /// The participant's FQID: their identity in the call.
    pub sub: String,
    pub name: String,
    pub nbf: i64,
    pub exp: i64,
    pub video: VideoGrant,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VideoGrant {
    pub room_join: bool,
    /// The room_id: one LiveKit room per ScaiWave room.
    pub room: String,
    pub can_publish: bool,
    pub can_subscribe: bool,
}

/// A call token for one of our participants: minted here if we host the
/// room, else asked of its host.
pub async fn call(rooms: &Rooms, p: &Participant, room_id: &RoomId) -> Result<CallToken> {
    let me = fqid_of(rooms, p);
    let room = rooms
        .store
        .room(room_id)?
        .ok_or_else(|| Error::not_found(format!("room {room_id} not found; check the id")))?;
    if room_id.host() == rooms.server_name {
        return mint(rooms, &room, &me);
    }
    // Our own check first, so a call is never asked for a room we are not in.
    joined_name(rooms, &room, &me)?;
    peer_api::call_token(&rooms.fed, room_id, &me).await
}

/// A token for `fqid` in a room we host: they must be a joined member, a
/// peer's participant only in a room that federates, and this server needs
/// `[livekit]`.
pub(crate) fn mint(rooms: &Rooms, room: &Room, fqid: &Fqid) -> Result<CallToken> {
    let Some(livekit) = &rooms.livekit else {
        return Err(Error::new(
            Code::CallsUnavailable,
            format!(
                "{} mints no call tokens: its config has no [livekit] section; its admin can add one",
                rooms.server_name
            ),
        ));
    };
    if !rooms.is_local(fqid) && !room.room_type.federable() {
        return Err(Error::new(
            Code::RoomTypeForbidden,
            format!(
                "{} rooms never federate, so their calls are for {}'s own participants",
                room.room_type.as_str(),
                rooms.server_name
            ),
        ));
    }
    let name = joined_name(rooms, room, fqid)?;
    let now = rooms.clock.now_secs();
    let claims = Claims {
        iss: livekit.api_key.clone(),
        sub: fqid.to_string(),
        name,
        nbf: now,
        exp: now + CALL_TOKEN_SECS,
        video: VideoGrant {
            room_join: true,
            room: room.room_id.clone(),
            can_publish: true,
            can_subscribe: true,
        },
    };
    Ok(CallToken {
        url: livekit.url.clone(),
        token: sign(livekit, &claims)?,
    })
}

/// The name `fqid` shows in the room, if they have joined it; else 403.
fn joined_name(rooms: &Rooms, room: &Room, fqid: &Fqid) -> Result<String> {
    match rooms.store.member(&room.room_id, fqid.as_str())? {
        Some(m) if m.membership == Membership::Join => {
            Ok(m.display_name.unwrap_or_else(|| fqid.to_string()))
        }
        _ => Err(Error::new(
            Code::NotMember,
            format!(
                "{fqid} is not a joined member of {}; only members join its call",
                room.room_id
            ),
        )),
    }
}

fn sign(livekit: &LivekitConfig, claims: &Claims) -> Result<String> {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(livekit.api_secret.as_bytes()),
    )
    .map_err(|e| Error::internal("call token", e))
}

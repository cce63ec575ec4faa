//! Signed room events and the presence EDU of SPEC §5.
//!
//! An [`Event`] is validated once, on the way in ([`Event::from_value`]) or
//! when we mint it ([`Event::create`]); after that its typed fields can be
//! trusted. It also keeps the exact JSON object it was built from, because a
//! signature covers bytes, not our model of them: content fields this version
//! does not know must survive storage and relay unchanged or every other
//! server's verification breaks. Only `unsigned` (the host's `seq`) is outside
//! the signature, so it is kept apart and re-attached by [`Event::to_wire_value`].

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::{Code, Error, Result};
use crate::ids::{EventId, Fqid, KeyId, RoomId, ServerName};
use crate::limits::{
    EVENT_CANONICAL_BYTES_MAX, MENTIONS_MAX, MESSAGE_BODY_BYTES_MAX, REACTION_KEY_BYTES_MAX,
    SHORT_TEXT_BYTES_MAX,
};
use crate::protocol::canonical;

/// The only event protocol this server speaks.
pub const PROTOCOL_V1: &str = "v1";

/// The type of the one v1 EDU.
pub const PRESENCE_EDU_TYPE: &str = "sw.presence";

const TYPE_MESSAGE: &str = "sw.message";
const TYPE_REACTION: &str = "sw.reaction";
const TYPE_MEMBER: &str = "sw.member";

/// Every top-level field v1 defines; anything else is refused (SPEC §5)
/// because it would be signed yet meaningless to us.
const TOP_LEVEL_FIELDS: [&str; 10] = [
    "event_id",
    "protocol",
    "room_id",
    "type",
    "sender",
    "origin",
    "origin_ts",
    "content",
    "signatures",
    "unsigned",
];

/// `sw.member` membership values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Membership {
    Invite,
    Join,
    Decline,
    Leave,
    Kick,
}

impl Membership {
    pub fn as_str(self) -> &'static str {
        match self {
            Membership::Invite => "invite",
            Membership::Join => "join",
            Membership::Decline => "decline",
            Membership::Leave => "leave",
            Membership::Kick => "kick",
        }
    }

    pub fn parse(s: &str) -> Option<Membership> {
        [
            Membership::Invite,
            Membership::Join,
            Membership::Decline,
            Membership::Leave,
            Membership::Kick,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
    }
}

/// `sw.reaction` action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReactionAction {
    Add,
    Remove,
}

impl ReactionAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ReactionAction::Add => "add",
            ReactionAction::Remove => "remove",
        }
    }

    pub fn parse(s: &str) -> Option<ReactionAction> {
        [ReactionAction::Add, ReactionAction::Remove]
            .into_iter()
            .find(|a| a.as_str() == s)
    }
}

/// The room summary an invite carries, so the invitee can decide without
/// being able to read the room yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomSummary {
    pub name: String,
    pub room_type: String,
}

/// The typed meaning of an event's `content`. Unknown content fields are not
/// modelled here; they live on in the event's JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Message {
        body: String,
        thread_root: Option<EventId>,
        reply_to: Option<EventId>,
        mentions: Vec<Fqid>,
    },
    Reaction {
        target: EventId,
        key: String,
        action: ReactionAction,
    },
    Member {
        membership: Membership,
        target: Fqid,
        expires_at_ms: Option<i64>,
        room: Option<RoomSummary>,
    },
}

impl Content {
    /// The event `type` this content belongs to.
    pub fn type_name(&self) -> &'static str {
        match self {
            Content::Message { .. } => TYPE_MESSAGE,
            Content::Reaction { .. } => TYPE_REACTION,
            Content::Member { .. } => TYPE_MEMBER,
        }
    }

    /// Check the limits a receiver applies, so local input can be refused
    /// before it is signed rather than by every peer afterwards.
    pub fn validate(&self) -> Result<()> {
        match self.to_json() {
            Value::Object(map) => Content::from_json(self.type_name(), &map).map(|_| ()),
            _ => unreachable!("Content::to_json always builds an object"),
        }
    }

    /// The content object as we sign it; absent options are left out rather
    /// than written as null.
    fn to_json(&self) -> Value {
        let mut m = Map::new();
        match self {
            Content::Message {
                body,
                thread_root,
                reply_to,
                mentions,
            } => {
                m.insert("body".into(), Value::from(body.as_str()));
                if let Some(id) = thread_root {
                    m.insert("thread_root".into(), Value::from(id.to_string()));
                }
                if let Some(id) = reply_to {
                    m.insert("reply_to".into(), Value::from(id.to_string()));
                }
                if !mentions.is_empty() {
                    let list = mentions.iter().map(|f| Value::from(f.as_str())).collect();
                    m.insert("mentions".into(), Value::Array(list));
                }
            }
            Content::Reaction {
                target,
                key,
                action,
            } => {
                m.insert("target".into(), Value::from(target.to_string()));
                m.insert("key".into(), Value::from(key.as_str()));
                m.insert("action".into(), Value::from(action.as_str()));
            }
            Content::Member {
                membership,
                target,
                expires_at_ms,
                room,
            } => {
                m.insert("membership".into(), Value::from(membership.as_str()));
                m.insert("target".into(), Value::from(target.as_str()));
                if let Some(ms) = expires_at_ms {
                    m.insert("expires_at_ms".into(), Value::from(*ms));
                }
                if let Some(room) = room {
                    let mut r = Map::new();
                    r.insert("name".into(), Value::from(room.name.as_str()));
                    r.insert("room_type".into(), Value::from(room.room_type.as_str()));
                    m.insert("room".into(), Value::Object(r));
                }
            }
        }
        Value::Object(m)
    }

    fn from_json(type_name: &str, c: &Map<String, Value>) -> Result<Content> {
        let f = Fields {
            obj: c,
            at: "content",
        };
        match type_name {
            TYPE_MESSAGE => message_from_json(&f),
            TYPE_REACTION => reaction_from_json(&f),
            TYPE_MEMBER => member_from_json(&f),
            other => Err(Error::bad_event(format!(
                "event type {other:?} is unknown; \
                 v1 events are sw.message, sw.reaction and sw.member"
            ))),
        }
    }
}

fn message_from_json(f: &Fields<'_>) -> Result<Content> {
    let body = f.req_str("body")?;
    check_len("content.body", body, MESSAGE_BODY_BYTES_MAX)?;
    let mentions = match f.opt("mentions") {
        None => Vec::new(),
        Some(Value::Array(items)) => {
            if items.len() > MENTIONS_MAX {
                return Err(Error::bad_event(format!(
                    "content.mentions lists {} participants; mention at most {MENTIONS_MAX}",
                    items.len()
                )));
            }
            let mention = |(i, item): (usize, &Value)| {
                let at = format!("content.mentions[{i}]");
                let s = item
                    .as_str()
                    .ok_or_else(|| wrong_type(&at, "an FQID string"))?;
                Fqid::parse(s).map_err(|e| bad_id(&at, e))
            };
            items
                .iter()
                .enumerate()
                .map(mention)
                .collect::<Result<_>>()?
        }
        Some(_) => return Err(wrong_type("content.mentions", "an array of FQID strings")),
    };
    Ok(Content::Message {
        body: body.to_owned(),
        thread_root: f.opt_event_id("thread_root")?,
        reply_to: f.opt_event_id("reply_to")?,
        mentions,
    })
}

fn reaction_from_json(f: &Fields<'_>) -> Result<Content> {
    let target = f.req_event_id("target")?;
    let key = f.req_str("key")?;
    if key.is_empty() {
        return Err(Error::bad_event(
            "content.key is empty; send the reaction key, e.g. an emoji",
        ));
    }
    check_len("content.key", key, REACTION_KEY_BYTES_MAX)?;
    let action = f.req_str("action")?;
    let action = ReactionAction::parse(action).ok_or_else(|| {
        Error::bad_event(format!(
            "content.action {action:?} is unknown; use \"add\" or \"remove\""
        ))
    })?;
    Ok(Content::Reaction {
        target,
        key: key.to_owned(),
        action,
    })
}

fn member_from_json(f: &Fields<'_>) -> Result<Content> {
    let membership = f.req_str("membership")?;
    let membership = Membership::parse(membership).ok_or_else(|| {
        Error::bad_event(format!(
            "content.membership {membership:?} is unknown; \
             use invite, join, decline, leave or kick"
        ))
    })?;
    let target = Fqid::parse(f.req_str("target")?).map_err(|e| bad_id("content.target", e))?;
    let expires_at_ms = match f.opt("expires_at_ms") {
        None => None,
        Some(v) => Some(v.as_i64().ok_or_else(|| {
            wrong_type(
                "content.expires_at_ms",
                "an integer (milliseconds since the Unix epoch)",
            )
        })?),
    };
    let room = match f.opt("room") {
        None => None,
        Some(Value::Object(r)) => Some(room_summary_from_json(r)?),
        Some(_) => {
            return Err(wrong_type(
                "content.room",
                "an object {\"name\", \"room_type\"}",
            ))
        }
    };
    if membership == Membership::Invite {
        if expires_at_ms.is_none() {
            return Err(Error::bad_event(
                "an invite needs content.expires_at_ms; add when the invite lapses, \
                 in milliseconds since the Unix epoch",
            ));
        }
        if room.is_none() {
            return Err(Error::bad_event(
                "an invite needs content.room; add the room summary {\"name\", \"room_type\"}",
            ));
        }
    }
    Ok(Content::Member {
        membership,
        target,
        expires_at_ms,
        room,
    })
}

fn room_summary_from_json(r: &Map<String, Value>) -> Result<RoomSummary> {
    let f = Fields {
        obj: r,
        at: "content.room",
    };
    let name = f.req_str("name")?;
    check_len("content.room.name", name, SHORT_TEXT_BYTES_MAX)?;
    let room_type = f.req_str("room_type")?;
    check_len("content.room.room_type", room_type, SHORT_TEXT_BYTES_MAX)?;
    Ok(RoomSummary {
        name: name.to_owned(),
        room_type: room_type.to_owned(),
    })
}

/// A validated signed event. Keeps the exact JSON object as received or
/// created (including `signatures`, excluding `unsigned`) so every signed
/// byte, including unknown fields inside `content`, is preserved when stored
/// or relayed.
#[derive(Clone, Debug)]
pub struct Event {
    pub event_id: EventId,
    pub room_id: RoomId,
    pub sender: Fqid,
    pub origin: ServerName,
    pub origin_ts_ms: i64,
    pub content: Content,
    json: Map<String, Value>,
    /// SHA-256 of the canonical event without `unsigned`, computed once
    /// (it is needed for the size check anyway, and again for dedup).
    hash: [u8; 32],
    /// What the origin's signature covers, computed with the hash.
    signing: Vec<u8>,
}

impl Event {
    /// Validate a parsed event object (from [`canonical::parse_strict`]).
    /// Returns the event and `unsigned.seq` if present.
    ///
    /// A `protocol` other than `"v1"` is `SW_FED_PROTOCOL_VERSION` and is
    /// checked first, so a newer peer learns that rather than which of its
    /// fields we do not know; everything else is `SW_FED_BAD_EVENT`. The
    /// number rules of strict parsing are re-checked here because a `Value`
    /// may have been built another way (duplicate keys cannot be).
    pub fn from_value(v: Value) -> Result<(Event, Option<u64>)> {
        let Value::Object(mut json) = v else {
            return Err(Error::bad_event(
                "an event must be a JSON object; \
                 send the event as {\"event_id\", \"protocol\", …}",
            ));
        };
        match json.get("protocol") {
            None => {
                return Err(Error::bad_event(format!(
                    "event has no protocol; add \"protocol\": \"{PROTOCOL_V1}\""
                )))
            }
            Some(Value::String(p)) if p == PROTOCOL_V1 => {}
            Some(Value::String(p)) => {
                return Err(Error::new(
                    Code::ProtocolVersion,
                    format!(
                        "event protocol {p:?} is not supported; \
                         this server speaks \"{PROTOCOL_V1}\" only"
                    ),
                ))
            }
            Some(_) => return Err(wrong_type("protocol", "the string \"v1\"")),
        }
        if let Some(k) = json
            .keys()
            .find(|k| !TOP_LEVEL_FIELDS.contains(&k.as_str()))
        {
            return Err(Error::bad_event(format!(
                "unknown top-level event field {k:?}; v1 events carry only {}; \
                 put extra data inside content",
                TOP_LEVEL_FIELDS.join(", ")
            )));
        }
        let seq = match json.remove("unsigned") {
            None => None,
            Some(Value::Object(u)) => match u.get("seq") {
                None => None,
                // Bounded like every JSON integer of SPEC §5 (unsigned is
                // outside the signed checks, and lenient parsers such as a
                // backfill answer's take up to u64::MAX): no seq can then
                // reach the top of u64, where `seq + 1` would wrap.
                Some(s) => Some(
                    s.as_u64()
                        .filter(|&n| n <= crate::limits::JSON_INTEGER_ABS_MAX as u64)
                        .ok_or_else(|| {
                            wrong_type("unsigned.seq", "a non-negative integer of at most 2^53-1")
                        })?,
                ),
            },
            Some(_) => return Err(wrong_type("unsigned", "an object")),
        };
        let signed = Value::Object(json);
        canonical::check_value(&signed)?;
        let Value::Object(json) = signed else {
            unreachable!("built as an object above")
        };
        // Every top-level key is one of TOP_LEVEL_FIELDS (checked above): ASCII.
        let (canonical_form, signing) =
            canonical::canonical_bytes_with_and_without(&json, "signatures");
        let size = canonical_form.len();
        let hash: [u8; 32] = Sha256::digest(&canonical_form).into();
        if size > EVENT_CANONICAL_BYTES_MAX {
            return Err(Error::bad_event(format!(
                "event is {size} bytes in canonical form; \
                 the limit is {EVENT_CANONICAL_BYTES_MAX}, send less content"
            )));
        }

        let f = Fields { obj: &json, at: "" };
        let event_id = f.req_event_id("event_id")?;
        let room_id = RoomId::parse(f.req_str("room_id")?).map_err(|e| bad_id("room_id", e))?;
        let type_name = f.req_str("type")?;
        let sender = Fqid::parse(f.req_str("sender")?).map_err(|e| bad_id("sender", e))?;
        let origin = ServerName::parse(f.req_str("origin")?).map_err(|e| bad_id("origin", e))?;
        if origin != sender.server() {
            return Err(Error::bad_event(format!(
                "origin {origin} is not the server of sender {sender}; \
                 an event is sent and signed by its sender's server"
            )));
        }
        // check_value bounded every integer to 2^53, so the cast below is exact.
        let origin_ts_ms = f.req("origin_ts")?.as_u64().ok_or_else(|| {
            wrong_type(
                "origin_ts",
                "a non-negative integer (milliseconds since the Unix epoch)",
            )
        })? as i64;
        let content = match f.req("content")? {
            Value::Object(c) => Content::from_json(type_name, c)?,
            _ => return Err(wrong_type("content", "an object")),
        };
        check_signatures(f.req("signatures")?, &origin)?;

        Ok((
            Event {
                event_id,
                room_id,
                sender,
                origin,
                origin_ts_ms,
                content,
                json,
                hash,
                signing,
            },
            seq,
        ))
    }

    /// Strictly parse and validate an event as it arrives on the wire.
    pub fn parse(bytes: &[u8]) -> Result<(Event, Option<u64>)> {
        Event::from_value(canonical::parse_strict(bytes)?)
    }

    /// Build and sign a new event: a fresh v7 event id, protocol v1, origin
    /// the sender's server. Limits are not checked here (this cannot fail);
    /// check user input with [`Content::validate`] first.
    pub fn create(
        room_id: RoomId,
        sender: Fqid,
        origin_ts_ms: i64,
        content: Content,
        key_id: &KeyId,
        key: &SigningKey,
    ) -> Event {
        let event_id = EventId::generate();
        let origin = sender.server();
        let mut json = Map::new();
        json.insert("event_id".into(), Value::from(event_id.to_string()));
        json.insert("protocol".into(), Value::from(PROTOCOL_V1));
        json.insert("room_id".into(), Value::from(room_id.as_str()));
        json.insert("type".into(), Value::from(content.type_name()));
        json.insert("sender".into(), Value::from(sender.as_str()));
        json.insert("origin".into(), Value::from(origin.as_str()));
        json.insert("origin_ts".into(), Value::from(origin_ts_ms));
        json.insert("content".into(), content.to_json());
        let signing = canonical::canonical_bytes_without(&json, "signatures");
        let signature = key.sign(&signing);
        let mut by_key = Map::new();
        by_key.insert(
            key_id.as_str().into(),
            Value::from(BASE64.encode(signature.to_bytes())),
        );
        let mut signatures = Map::new();
        signatures.insert(origin.as_str().into(), Value::Object(by_key));
        json.insert("signatures".into(), Value::Object(signatures));
        let (canonical_form, _) = canonical::canonical_bytes_with_and_without(&json, "signatures");
        let hash = Sha256::digest(canonical_form).into();
        Event {
            event_id,
            room_id,
            sender,
            origin,
            origin_ts_ms,
            content,
            json,
            hash,
            signing,
        }
    }

    /// JCS bytes of the event without `signatures` and `unsigned`: what the
    /// signature covers.
    pub fn signing_bytes(&self) -> &[u8] {
        &self.signing
    }

    /// SHA-256 of the canonical event without `unsigned` (signatures
    /// included): equal hashes mean a true duplicate, different hashes for
    /// the same (origin, event_id) mean a conflicting copy (SPEC §2).
    pub fn content_hash(&self) -> [u8; 32] {
        self.hash
    }

    /// The origin server's signatures as (key id, signature bytes). Entries
    /// that are not a valid key id and 64 bytes of padded base64 are skipped:
    /// [`Event::from_value`] already refuses them, so this only matters for a
    /// broken invariant, and a skipped entry can only make [`Event::verify`]
    /// fail, never pass.
    pub fn origin_signatures(&self) -> Vec<(KeyId, [u8; 64])> {
        let Some(Value::Object(by_key)) = self
            .json
            .get("signatures")
            .and_then(|s| s.get(self.origin.as_str()))
        else {
            return Vec::new();
        };
        by_key
            .iter()
            .filter_map(|(kid, sig)| {
                let kid = KeyId::parse(kid).ok()?;
                let sig = decode_signature(sig.as_str()?)?;
                Some((kid, sig))
            })
            .collect()
    }

    /// Verify with strict Ed25519. `lookup(key_id)` returns the origin's
    /// verifying key valid for this event, or None. Passes if some origin
    /// signature made with a known key verifies; otherwise
    /// `SW_FED_SIGNATURE_MISMATCH` (which a sender retries: an admin may fix
    /// keys meanwhile).
    pub fn verify(&self, lookup: impl Fn(&KeyId) -> Option<VerifyingKey>) -> Result<()> {
        let signatures = self.origin_signatures();
        let mut unknown = Vec::new();
        let mut failed = Vec::new();
        for (kid, sig) in signatures {
            let Some(vk) = lookup(&kid) else {
                unknown.push(kid.to_string());
                continue;
            };
            if vk
                .verify_strict(&self.signing, &Signature::from_bytes(&sig))
                .is_ok()
            {
                return Ok(());
            }
            failed.push(kid.to_string());
        }
        let mut why = Vec::new();
        if !failed.is_empty() {
            why.push(format!(
                "signature by {} does not verify",
                failed.join(", ")
            ));
        }
        if !unknown.is_empty() {
            why.push(format!(
                "key {} is not a known key of {}",
                unknown.join(", "),
                self.origin
            ));
        }
        if why.is_empty() {
            why.push(format!("it carries no signature by {}", self.origin));
        }
        Err(Error::signature(format!(
            "event {} from {} fails verification: {}; check that {} publishes the signing key \
             in its descriptor and that the event was not altered in transit",
            self.event_id,
            self.origin,
            why.join("; "),
            self.origin
        )))
    }

    /// Wire JSON of the event, with `"unsigned": {"seq": n}` when `seq` is
    /// given and no `unsigned` otherwise.
    pub fn to_wire_value(&self, seq: Option<u64>) -> Value {
        let mut m = self.json.clone();
        if let Some(seq) = seq {
            let mut unsigned = Map::new();
            unsigned.insert("seq".into(), Value::from(seq));
            m.insert("unsigned".into(), Value::Object(unsigned));
        }
        Value::Object(m)
    }

    pub fn to_wire_bytes(&self, seq: Option<u64>) -> Vec<u8> {
        // `json` never holds `unsigned` (parsing takes it out), so adding
        // it cannot make a duplicate key.
        match seq {
            None => serde_json::to_vec(&self.json).expect("serialising a Map cannot fail"),
            Some(seq) => canonical::json_bytes_with(
                &self.json,
                "unsigned",
                &serde_json::json!({ "seq": seq }),
            ),
        }
    }

    pub fn type_name(&self) -> &'static str {
        self.content.type_name()
    }
}

/// `signatures` is `{server: {key_id: base64(64 bytes)}}` and must hold at
/// least one signature of the origin: an event nobody signed is malformed
/// (`SW_FED_BAD_EVENT`, final), not a verification failure worth retrying.
fn check_signatures(v: &Value, origin: &ServerName) -> Result<()> {
    let Value::Object(servers) = v else {
        return Err(wrong_type(
            "signatures",
            "an object {server_name: {key_id: base64}}",
        ));
    };
    for (server, by_key) in servers {
        let at = format!("signatures[{server:?}]");
        ServerName::parse(server).map_err(|e| bad_id(&at, e))?;
        let Value::Object(by_key) = by_key else {
            return Err(wrong_type(&at, "an object {key_id: base64}"));
        };
        for (kid, sig) in by_key {
            let at = format!("{at}[{kid:?}]");
            KeyId::parse(kid).map_err(|e| bad_id(&at, e))?;
            sig.as_str().and_then(decode_signature).ok_or_else(|| {
                wrong_type(&at, "a 64-byte Ed25519 signature in padded standard base64")
            })?;
        }
    }
    match servers.get(origin.as_str()) {
        Some(Value::Object(by_key)) if !by_key.is_empty() => Ok(()),
        _ => Err(Error::bad_event(format!(
            "event carries no signature by its origin {origin}; \
             the origin must sign the event under signatures[\"{origin}\"]"
        ))),
    }
}

fn decode_signature(s: &str) -> Option<[u8; 64]> {
    BASE64.decode(s).ok()?.try_into().ok()
}

/// Typed access to one JSON object's fields with errors naming the field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    /// Path of `obj` itself ("" for the event).
    at: &'a str,
}

impl<'a> Fields<'a> {
    fn path(&self, name: &str) -> String {
        if self.at.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.at)
        }
    }

    fn req(&self, name: &str) -> Result<&'a Value> {
        self.obj
            .get(name)
            .ok_or_else(|| Error::bad_event(format!("{} is missing; add it", self.path(name))))
    }

    /// An optional field; JSON null counts as absent so that peers which
    /// write nulls for empty options still interoperate.
    fn opt(&self, name: &str) -> Option<&'a Value> {
        self.obj.get(name).filter(|v| !v.is_null())
    }

    fn req_str(&self, name: &str) -> Result<&'a str> {
        self.req(name)?
            .as_str()
            .ok_or_else(|| wrong_type(&self.path(name), "a string"))
    }

    fn req_event_id(&self, name: &str) -> Result<EventId> {
        EventId::parse(self.req_str(name)?).map_err(|e| bad_id(&self.path(name), e))
    }

    fn opt_event_id(&self, name: &str) -> Result<Option<EventId>> {
        match self.opt(name) {
            None => Ok(None),
            Some(v) => {
                let s = v
                    .as_str()
                    .ok_or_else(|| wrong_type(&self.path(name), "an event_id string"))?;
                EventId::parse(s)
                    .map(Some)
                    .map_err(|e| bad_id(&self.path(name), e))
            }
        }
    }
}

fn wrong_type(at: &str, expected: &str) -> Error {
    Error::bad_event(format!("{at} must be {expected}"))
}

/// The ids module speaks to local callers (`SW_BAD_REQUEST`); inside an
/// event the same fault is `SW_FED_BAD_EVENT`, with its advice kept.
fn bad_id(at: &str, e: Error) -> Error {
    Error::bad_event(format!("{at}: {}", e.message))
}

fn check_len(at: &str, s: &str, max: usize) -> Result<()> {
    if s.len() > max {
        return Err(Error::bad_event(format!(
            "{at} is {} bytes; the limit is {max}, send a shorter one",
            s.len()
        )));
    }
    Ok(())
}

/// A participant's presence (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceStatus {
    Online,
    Idle,
    Dnd,
    Offline,
}

impl PresenceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PresenceStatus::Online => "online",
            PresenceStatus::Idle => "idle",
            PresenceStatus::Dnd => "dnd",
            PresenceStatus::Offline => "offline",
        }
    }

    pub fn parse(s: &str) -> Option<PresenceStatus> {
        [
            PresenceStatus::Online,
            PresenceStatus::Idle,
            PresenceStatus::Dnd,
            PresenceStatus::Offline,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

/// The `content` of a presence EDU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub status: PresenceStatus,
    // No `skip_serializing_if`: storage encodes this with bincode, which
    // cannot decode a struct whose fields come and go. The wire form is
    // built by `PresenceEdu::to_value`, which leaves a missing message out.
    #[serde(default)]
    pub status_msg: Option<String>,
}

/// The presence EDU: `{"type": "sw.presence", "sender", "ts", "content"}`.
/// EDUs are not signed, so unknown fields are ignored rather than refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceEdu {
    pub sender: Fqid,
    pub ts_ms: i64,
    pub presence: Presence,
}

impl PresenceEdu {
    pub fn from_value(v: &Value) -> Result<PresenceEdu> {
        let Value::Object(obj) = v else {
            return Err(Error::bad_event(
                "an EDU must be a JSON object {\"type\", \"sender\", \"ts\", \"content\"}",
            ));
        };
        let f = Fields { obj, at: "" };
        let ty = f.req_str("type")?;
        if ty != PRESENCE_EDU_TYPE {
            return Err(Error::bad_event(format!(
                "EDU type {ty:?} is unknown; v1 has only \"{PRESENCE_EDU_TYPE}\""
            )));
        }
        let sender = Fqid::parse(f.req_str("sender")?).map_err(|e| bad_id("sender", e))?;
        let ts_ms = f
            .req("ts")?
            .as_u64()
            .filter(|&t| t <= crate::limits::JSON_INTEGER_ABS_MAX as u64)
            .ok_or_else(|| {
                wrong_type(
                    "ts",
                    "a non-negative integer (milliseconds since the Unix epoch)",
                )
            })? as i64;
        let Value::Object(content) = f.req("content")? else {
            return Err(wrong_type(
                "content",
                "an object {\"status\", \"status_msg\"?}",
            ));
        };
        let c = Fields {
            obj: content,
            at: "content",
        };
        let status = c.req_str("status")?;
        let status = PresenceStatus::parse(status).ok_or_else(|| {
            Error::bad_event(format!(
                "content.status {status:?} is unknown; use online, idle, dnd or offline"
            ))
        })?;
        let status_msg = match c.opt("status_msg") {
            None => None,
            Some(Value::String(s)) => {
                check_len("content.status_msg", s, SHORT_TEXT_BYTES_MAX)?;
                Some(s.clone())
            }
            Some(_) => return Err(wrong_type("content.status_msg", "a string")),
        };
        Ok(PresenceEdu {
            sender,
            ts_ms,
            presence: Presence { status, status_msg },
        })
    }

    pub fn to_value(&self) -> Value {
        let mut content = Map::new();
        content.insert("status".into(), Value::from(self.presence.status.as_str()));
        if let Some(msg) = &self.presence.status_msg {
            content.insert("status_msg".into(), Value::from(msg.as_str()));
        }
        let mut m = Map::new();
        m.insert("type".into(), Value::from(PRESENCE_EDU_TYPE));
        m.insert("sender".into(), Value::from(self.sender.as_str()));
        m.insert("ts".into(), Value::from(self.ts_ms));
        m.insert("content".into(), Value::Object(content));
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ROOM: &str = "!Qm3xQm3xQm3xQm3xQm3x:a.example.com";
    const TS: i64 = 1_764_000_000_000;

    fn key(seed: u8) -> (KeyId, SigningKey) {
        let sk = SigningKey::from_bytes(&[seed; 32]);
        (KeyId::derive(sk.verifying_key().as_bytes()), sk)
    }

    fn alice() -> Fqid {
        Fqid::parse("@alice:a.example.com").unwrap()
    }

    fn message(body: &str) -> Content {
        Content::Message {
            body: body.into(),
            thread_root: None,
            reply_to: None,
            mentions: vec![],
        }
    }

    fn created(content: Content) -> (Event, KeyId, SigningKey) {
        let (kid, sk) = key(1);
        let e = Event::create(
            RoomId::parse(ROOM).unwrap(),
            alice(),
            TS,
            content,
            &kid,
            &sk,
        );
        (e, kid, sk)
    }

    fn lookup_for(kid: &KeyId, sk: &SigningKey) -> impl Fn(&KeyId) -> Option<VerifyingKey> {
        let (kid, vk) = (kid.clone(), sk.verifying_key());
        move |k| (k == &kid).then_some(vk)
    }

    /// A signed wire object from hand-written parts, for the refusal tests:
    /// `edit` may change anything, the result is then (re-)signed by alice.
    fn signed_json(edit: impl FnOnce(&mut Map<String, Value>)) -> Value {
        let (kid, sk) = key(1);
        let mut m = json!({
            "event_id": EventId::generate().to_string(),
            "protocol": "v1",
            "room_id": ROOM,
            "type": "sw.message",
            "sender": "@alice:a.example.com",
            "origin": "a.example.com",
            "origin_ts": TS,
            "content": {"body": "hello"},
        })
        .as_object()
        .unwrap()
        .clone();
        edit(&mut m);
        let mut unsigned = m.clone();
        unsigned.remove("signatures");
        unsigned.remove("unsigned");
        let sig = sk.sign(&canonical::canonical_bytes(&Value::Object(unsigned)));
        let origin = m["origin"].as_str().unwrap_or("a.example.com").to_owned();
        m.entry("signatures")
            .or_insert(json!({ origin: { kid.as_str(): BASE64.encode(sig.to_bytes()) } }));
        Value::Object(m)
    }

    fn refused(v: Value) -> Error {
        let bytes = serde_json::to_vec(&v).unwrap();
        let e = Event::parse(&bytes).expect_err("should be refused");
        assert_eq!(Event::from_value(v).unwrap_err().code, e.code);
        e
    }

    fn assert_bad_event(v: Value, needle: &str) {
        let e = refused(v);
        assert_eq!(e.code, Code::BadEvent, "{}", e.message);
        assert!(
            e.message.contains(needle),
            "{:?} lacks {needle:?}",
            e.message
        );
    }

    #[test]
    fn create_wire_parse_verify_round_trip_with_seq() {
        let target = EventId::generate();
        let content = Content::Message {
            body: "hello @bob".into(),
            thread_root: Some(target),
            reply_to: Some(target),
            mentions: vec![Fqid::parse("@bob:b.example.com").unwrap()],
        };
        let (e, kid, sk) = created(content.clone());
        e.verify(lookup_for(&kid, &sk)).unwrap();
        let wire = e.to_wire_bytes(Some(17));
        let (back, seq) = Event::parse(&wire).unwrap();
        assert_eq!(seq, Some(17));
        assert_eq!(back.event_id, e.event_id);
        assert_eq!(back.room_id, e.room_id);
        assert_eq!(back.sender, alice());
        assert_eq!(back.origin.as_str(), "a.example.com");
        assert_eq!(back.origin_ts_ms, TS);
        assert_eq!(back.content, content);
        assert_eq!(back.type_name(), "sw.message");
        back.verify(lookup_for(&kid, &sk)).unwrap();
        assert_eq!(back.content_hash(), e.content_hash());
        // No seq, no unsigned.
        assert!(back.to_wire_value(None).get("unsigned").is_none());
        assert_eq!(back.to_wire_value(Some(3))["unsigned"], json!({"seq": 3}));
        let (_, seq) = Event::parse(&back.to_wire_bytes(None)).unwrap();
        assert_eq!(seq, None);
        assert_eq!(back.origin_signatures().len(), 1);
        assert_eq!(back.origin_signatures()[0].0, kid);
    }

    #[test]
    fn borrowed_serialisations_match_the_copied_ones() {
        let (e, _, _) = created(Content::Message {
            body: "h\u{e9}llo \u{1f600}".into(),
            thread_root: None,
            reply_to: None,
            mentions: vec![],
        });
        let mut without = e.json.clone();
        without.remove("signatures");
        assert_eq!(
            e.signing_bytes(),
            canonical::canonical_bytes(&Value::Object(without))
        );
        for seq in [None, Some(0), Some(9_007_199_254_740_991)] {
            assert_eq!(
                e.to_wire_bytes(seq),
                serde_json::to_vec(&e.to_wire_value(seq)).unwrap()
            );
        }
    }

    #[test]
    fn every_content_type_round_trips() {
        let contents = [
            Content::Reaction {
                target: EventId::generate(),
                key: "👍".into(),
                action: ReactionAction::Remove,
            },
            Content::Member {
                membership: Membership::Invite,
                target: Fqid::parse("@bob:b.example.com").unwrap(),
                expires_at_ms: Some(TS + 1000),
                room: Some(RoomSummary {
                    name: "Ops".into(),
                    room_type: "group".into(),
                }),
            },
            Content::Member {
                membership: Membership::Join,
                target: alice(),
                expires_at_ms: None,
                room: None,
            },
        ];
        for c in contents {
            c.validate().unwrap();
            let (e, kid, sk) = created(c.clone());
            let (back, _) = Event::parse(&e.to_wire_bytes(Some(1))).unwrap();
            assert_eq!(back.content, c);
            assert_eq!(back.type_name(), c.type_name());
            back.verify(lookup_for(&kid, &sk)).unwrap();
        }
    }

    #[test]
    fn hashes_are_stable_across_key_order() {
        let (e, _, _) = created(message("order"));
        let wire = e.to_wire_value(Some(5));
        // Hand-write the same object with keys reversed and extra spacing.
        let obj = wire.as_object().unwrap();
        let mut text = String::from("{ ");
        for (i, (k, v)) in obj.iter().rev().enumerate() {
            if i > 0 {
                text.push_str(" ,\n ");
            }
            text.push_str(&format!(
                "{} : {}",
                Value::from(k.as_str()),
                serde_json::to_string_pretty(v).unwrap()
            ));
        }
        text.push_str(" }");
        let (back, seq) = Event::parse(text.as_bytes()).unwrap();
        assert_eq!(seq, Some(5));
        assert_eq!(back.signing_bytes(), e.signing_bytes());
        assert_eq!(back.content_hash(), e.content_hash());
        // The signing bytes leave out signatures; the hash covers them.
        let sb = String::from_utf8(e.signing_bytes().to_vec()).unwrap();
        assert!(!sb.contains("signatures") && !sb.contains("unsigned"));
        assert!(sb.starts_with("{\"content\":{\"body\":\"order\"},\"event_id\":"));
        // seq is outside both.
        let (other_seq, _) = Event::parse(&e.to_wire_bytes(Some(99))).unwrap();
        assert_eq!(other_seq.content_hash(), e.content_hash());
    }

    #[test]
    fn unknown_content_fields_survive_and_verify() {
        let v = signed_json(|m| {
            m.insert(
                "content".into(),
                json!({"body": "hi", "format": "markdown", "x-ext": {"n": [1, 2]}}),
            );
        });
        let (e, _) = Event::from_value(v).unwrap();
        let (kid, sk) = key(1);
        e.verify(lookup_for(&kid, &sk)).unwrap();
        let (relayed, _) = Event::parse(&e.to_wire_bytes(Some(2))).unwrap();
        relayed.verify(lookup_for(&kid, &sk)).unwrap();
        let wire = relayed.to_wire_value(None);
        assert_eq!(wire["content"]["format"], "markdown");
        assert_eq!(wire["content"]["x-ext"], json!({"n": [1, 2]}));
        assert_eq!(relayed.content_hash(), e.content_hash());
    }

    #[test]
    fn tampered_body_fails_verify() {
        let (e, kid, sk) = created(message("pay 10"));
        let mut wire = e.to_wire_value(None);
        wire["content"]["body"] = json!("pay 1000");
        let (tampered, _) = Event::from_value(wire).unwrap();
        let err = tampered.verify(lookup_for(&kid, &sk)).unwrap_err();
        assert_eq!(err.code, Code::SignatureMismatch);
        assert!(err.message.contains("does not verify"), "{}", err.message);
    }

    #[test]
    fn wrong_or_unknown_key_fails_verify() {
        let (e, kid, _) = created(message("hi"));
        let (_, other) = key(2);
        // The right key id but another key: a mismatch.
        let err = e.verify(lookup_for(&kid, &other)).unwrap_err();
        assert_eq!(err.code, Code::SignatureMismatch);
        // No key known at all.
        let err = e.verify(|_| None).unwrap_err();
        assert_eq!(err.code, Code::SignatureMismatch);
        assert!(err.message.contains("not a known key"), "{}", err.message);
    }

    #[test]
    fn any_valid_origin_signature_suffices() {
        let (kid2, sk2) = key(2);
        let v = signed_json(|m| {
            m.insert(
                "signatures".into(),
                json!({"a.example.com": {kid2.as_str(): BASE64.encode([0u8; 64])}}),
            );
        });
        // Only a bogus signature under kid2: refused by verify, not parse.
        let (e, _) = Event::from_value(v.clone()).unwrap();
        assert!(e.verify(lookup_for(&kid2, &sk2)).is_err());
        // Add alice's real signature next to it and it passes.
        let (kid1, sk1) = key(1);
        let mut v = v;
        let sig = sk1.sign(e.signing_bytes());
        v["signatures"]["a.example.com"][kid1.as_str()] = json!(BASE64.encode(sig.to_bytes()));
        let (e, _) = Event::from_value(v).unwrap();
        assert_eq!(e.origin_signatures().len(), 2);
        let both = |k: &KeyId| {
            if k == &kid1 {
                Some(sk1.verifying_key())
            } else if k == &kid2 {
                Some(sk2.verifying_key())
            } else {
                None
            }
        };
        e.verify(both).unwrap();
    }

    #[test]
    fn refuses_unknown_top_level_field() {
        assert_bad_event(
            signed_json(|m| {
                m.insert("depth".into(), json!(3));
            }),
            "\"depth\"",
        );
    }

    #[test]
    fn refuses_origin_other_than_sender_server() {
        assert_bad_event(
            signed_json(|m| {
                m.insert("origin".into(), json!("b.example.com"));
            }),
            "not the server of sender",
        );
    }

    #[test]
    fn refuses_upper_case_event_id() {
        let id = EventId::generate().to_string().to_uppercase();
        assert_bad_event(
            signed_json(|m| {
                m.insert("event_id".into(), json!(id));
            }),
            "event_id",
        );
    }

    #[test]
    fn refuses_float_in_content() {
        let (e, _, _) = created(message("x"));
        let text = String::from_utf8(e.to_wire_bytes(None)).unwrap();
        let bytes = text.replacen("\"body\":\"x\"", "\"body\":\"x\",\"n\":1.5", 1);
        assert_ne!(bytes, text);
        let bytes = bytes.as_bytes();
        let e = Event::parse(bytes).unwrap_err();
        assert_eq!(e.code, Code::BadEvent);
        assert!(e.message.contains("$.content.n"), "{}", e.message);
        // A Value built without strict parsing is caught too.
        let v = signed_json(|m| {
            m.insert("content".into(), json!({"body": "x", "n": 1.5}));
        });
        let e = Event::from_value(v).unwrap_err();
        assert_eq!(e.code, Code::BadEvent);
        assert!(e.message.contains("not an integer"), "{}", e.message);
    }

    #[test]
    fn refuses_duplicate_key() {
        let (e, _, _) = created(message("dup"));
        let text = String::from_utf8(e.to_wire_bytes(None)).unwrap();
        let dup = text.replacen("\"body\":\"dup\"", "\"body\":\"dup\",\"body\":\"other\"", 1);
        assert_ne!(dup, text);
        let err = Event::parse(dup.as_bytes()).unwrap_err();
        assert_eq!(err.code, Code::BadEvent);
        assert!(
            err.message.contains("duplicate key \"body\""),
            "{}",
            err.message
        );
    }

    #[test]
    fn refuses_body_over_32_kib() {
        let ok = "x".repeat(MESSAGE_BODY_BYTES_MAX);
        let v = signed_json(|m| {
            m.insert("content".into(), json!({ "body": ok }));
        });
        assert!(Event::from_value(v).is_ok());
        let long = "x".repeat(MESSAGE_BODY_BYTES_MAX + 1);
        assert!(message(&long).validate().is_err());
        assert_bad_event(
            signed_json(|m| {
                m.insert("content".into(), json!({ "body": long }));
            }),
            "content.body",
        );
    }

    #[test]
    fn refuses_event_over_64_kib_canonical() {
        let body = "x".repeat(30 * 1024);
        let pad = "y".repeat(EVENT_CANONICAL_BYTES_MAX - 30 * 1024);
        assert_bad_event(
            signed_json(|m| {
                m.insert("content".into(), json!({ "body": body, "pad": pad }));
            }),
            "canonical form",
        );
    }

    #[test]
    fn refuses_unknown_type() {
        assert_bad_event(
            signed_json(|m| {
                m.insert("type".into(), json!("sw.poll"));
            }),
            "sw.poll",
        );
    }

    #[test]
    fn refuses_long_or_empty_reaction_key() {
        let reaction = |k: &str| {
            let k = k.to_owned();
            signed_json(move |m| {
                m.insert("type".into(), json!("sw.reaction"));
                m.insert(
                    "content".into(),
                    json!({"target": EventId::generate().to_string(), "key": k, "action": "add"}),
                );
            })
        };
        assert!(Event::from_value(reaction(&"k".repeat(REACTION_KEY_BYTES_MAX))).is_ok());
        assert_bad_event(
            reaction(&"k".repeat(REACTION_KEY_BYTES_MAX + 1)),
            "content.key",
        );
        assert_bad_event(reaction(""), "content.key is empty");
    }

    #[test]
    fn refuses_invite_without_expiry() {
        let invite = |with_expiry: bool| {
            signed_json(move |m| {
                m.insert("type".into(), json!("sw.member"));
                let mut c = json!({
                    "membership": "invite",
                    "target": "@bob:b.example.com",
                    "room": {"name": "Ops", "room_type": "group"},
                });
                if with_expiry {
                    c["expires_at_ms"] = json!(TS + 60_000);
                }
                m.insert("content".into(), c);
            })
        };
        assert!(Event::from_value(invite(true)).is_ok());
        assert_bad_event(invite(false), "expires_at_ms");
    }

    #[test]
    fn protocol_v2_is_a_protocol_version_error() {
        let e = refused(signed_json(|m| {
            m.insert("protocol".into(), json!("v2"));
            // Even with fields v1 does not know.
            m.insert("depth".into(), json!(1));
        }));
        assert_eq!(e.code, Code::ProtocolVersion);
        assert_eq!(e.code.as_str(), "SW_FED_PROTOCOL_VERSION");
    }

    #[test]
    fn refuses_malformed_signatures_and_unsigned() {
        assert_bad_event(
            signed_json(|m| {
                m.insert("signatures".into(), json!({}));
            }),
            "no signature by its origin",
        );
        assert_bad_event(
            signed_json(|m| {
                m.insert(
                    "signatures".into(),
                    json!({"a.example.com": {"ed25519:AAAAAAAA": "not base64"}}),
                );
            }),
            "64-byte",
        );
        assert_bad_event(
            signed_json(|m| {
                m.insert("unsigned".into(), json!({"seq": -1}));
            }),
            "unsigned.seq",
        );
        assert_bad_event(
            signed_json(|m| {
                m.remove("room_id");
            }),
            "room_id is missing",
        );
    }

    #[test]
    fn presence_edu_parses_and_round_trips() {
        let v = json!({
            "type": "sw.presence",
            "sender": "@bob:b.example.com",
            "ts": TS,
            "content": {"status": "dnd", "status_msg": "in a meeting"},
        });
        let edu = PresenceEdu::from_value(&v).unwrap();
        assert_eq!(edu.sender.as_str(), "@bob:b.example.com");
        assert_eq!(edu.ts_ms, TS);
        assert_eq!(edu.presence.status, PresenceStatus::Dnd);
        assert_eq!(edu.presence.status_msg.as_deref(), Some("in a meeting"));
        assert_eq!(edu.to_value(), v);
        assert_eq!(serde_json::to_value(&edu.presence).unwrap(), v["content"]);
        let bare = json!({
            "type": "sw.presence",
            "sender": "@bob:b.example.com",
            "ts": 1,
            "content": {"status": "online"},
        });
        let edu = PresenceEdu::from_value(&bare).unwrap();
        assert_eq!(edu.presence.status_msg, None);
        assert_eq!(edu.to_value(), bare);
    }

    #[test]
    fn stored_types_survive_bincode() {
        // storage::codec keeps these with bincode 2 (standard config).
        fn round_trip<T>(v: T)
        where
            T: Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
        {
            let cfg = bincode::config::standard();
            let bytes = bincode::serde::encode_to_vec(&v, cfg).unwrap();
            let (back, _): (T, usize) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
            assert_eq!(back, v);
        }
        for status_msg in [None, Some("lunch".to_string())] {
            round_trip(Presence {
                status: PresenceStatus::Idle,
                status_msg,
            });
        }
        round_trip(Membership::Kick);
        round_trip(RoomSummary {
            name: "Ops".into(),
            room_type: "group".into(),
        });
        let p: Presence = serde_json::from_value(json!({"status": "offline"})).unwrap();
        assert_eq!(p.status_msg, None);
    }

    #[test]
    fn presence_edu_refuses_bad_status() {
        let mut v = json!({
            "type": "sw.presence",
            "sender": "@bob:b.example.com",
            "ts": 1,
            "content": {"status": "away"},
        });
        let e = PresenceEdu::from_value(&v).unwrap_err();
        assert_eq!(e.code, Code::BadEvent);
        assert!(e.message.contains("\"away\""), "{}", e.message);
        v["content"]["status"] = json!("online");
        v["type"] = json!("sw.typing");
        assert!(PresenceEdu::from_value(&v).is_err());
    }
}

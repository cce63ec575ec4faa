//! What participants read: a room's messages (with reactions), their
//! invitations, and the delivery state of their pending events.

use serde::Serialize;

use crate::clock::rfc3339;
use crate::error::Result;
use crate::ids::RoomId;
use crate::protocol::event::{Content, Event, RoomSummary};
use crate::rooms::Rooms;
use crate::rooms::{fqid_of, joined_room};
use crate::storage::{self, keys, DeliveryState, Participant, StoredEvent, T};

#[derive(Debug, Serialize)]
pub struct MessageView {
    pub event_id: String,
    pub seq: Option<u64>,
    pub sender: String,
    pub body: String,
    pub thread_root: Option<String>,
    pub reply_to: Option<String>,
    pub mentions: Vec<String>,
    pub origin_ts: i64,
    pub state: &'static str,
    pub reactions: std::collections::BTreeMap<String, Vec<String>>,
}

pub(crate) fn message_view(stored: &StoredEvent, seq: Option<u64>) -> Option<MessageView> {
    let (event, _) = Event::parse(&stored.json).ok()?;
    let Content::Message {
        body,
        thread_root,
        reply_to,
        mentions,
    } = &event.content
    else {
        return None;
    };
    Some(MessageView {
        event_id: event.event_id.to_string(),
        seq,
        sender: event.sender.to_string(),
        body: body.clone(),
        thread_root: thread_root.map(|t| t.to_string()),
        reply_to: reply_to.map(|t| t.to_string()),
        mentions: mentions.iter().map(|m| m.to_string()).collect(),
        origin_ts: event.origin_ts_ms,
        state: stored.state.as_str(),
        reactions: Default::default(),
    })
}

/// Messages in host order after `after_seq`, then our not-yet-sequenced
/// ones, at most `limit`, each with its reactions. The page reads its own
/// rows only: the room's events from `after_seq` until `limit` messages
/// are found, and each message's reaction rows (`T::Reactions`).
pub fn messages(
    rooms: &Rooms,
    p: &Participant,
    room_id: &RoomId,
    after_seq: u64,
    limit: usize,
) -> Result<Vec<MessageView>> {
    joined_room(rooms, room_id, &fqid_of(rooms, p))?;
    let from = keys::event(room_id.as_str(), after_seq.saturating_add(1));
    let to = keys::event(room_id.as_str(), u64::MAX);
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    rooms
        .store
        .range_while::<StoredEvent>(T::Events, &from, &to, |k, stored| {
            if !stored.rejected {
                if let Some(v) = message_view(&stored, Some(keys::trailing_u64(k))) {
                    out.push(v);
                }
            }
            out.len() < limit
        })?;
    if out.len() < limit {
        for (_, stored) in rooms
            .store
            .scan::<StoredEvent>(T::Pending, &storage::prefix(room_id.as_str()))?
        {
            if out.len() >= limit {
                break;
            }
            if let Some(v) = message_view(&stored, None) {
                out.push(v);
            }
        }
    }
    for m in &mut out {
        let rows = rooms.store.scan::<storage::ReactionRow>(
            T::Reactions,
            &keys::reactions_of(room_id.as_str(), &m.event_id),
        )?;
        for (_, r) in rows {
            let who = m.reactions.entry(r.key.clone()).or_default();
            who.retain(|s| *s != r.sender);
            if r.add {
                who.push(r.sender);
            }
            if who.is_empty() {
                m.reactions.remove(&r.key);
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Serialize)]
pub struct InvitationView {
    pub invite_id: String,
    pub room_id: String,
    pub room: RoomSummary,
    pub inviter: String,
    pub expires_at: String,
}

pub fn invitations(rooms: &Rooms, p: &Participant) -> Result<Vec<InvitationView>> {
    let me = fqid_of(rooms, p).to_string();
    let now = rooms.clock.now_ms();
    Ok(rooms
        .store
        .invitations_of(&me)?
        .into_iter()
        .filter(|i| i.expires_at_ms > now)
        .map(|i| InvitationView {
            invite_id: i.invite_id,
            room_id: i.room_id,
            room: i.room,
            inviter: i.inviter,
            expires_at: rfc3339(i.expires_at_ms),
        })
        .collect())
}

/// Our pending events' delivery state, for tests and the message list.
pub fn pending_state(
    rooms: &Rooms,
    room_id: &RoomId,
    event_id: &str,
) -> Result<Option<DeliveryState>> {
    Ok(rooms
        .store
        .get::<StoredEvent>(T::Pending, &keys::pending(room_id.as_str(), event_id))?
        .map(|s| s.state))
}

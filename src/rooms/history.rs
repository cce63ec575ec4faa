//! A replica's history from its host: the member list and backfill after
//! a join, backfill on an admin's request, and gap fills (SPEC §6), each
//! event verified before it is stored.

use futures_util::StreamExt;
use serde_json::Value;

use crate::error::Result;
use crate::federation::auth::verify_event;
use crate::federation::peer_api;
use crate::ids::{Fqid, RoomId};
use crate::limits::{BACKFILL_EVENTS_MAX, MEMBERS_ANSWER_ENTRIES_MAX, SHORT_TEXT_BYTES_MAX};
use crate::limits::{GAP_FILL_DELAY_MS, KEY_FETCHES_AT_ONCE_MAX};
use crate::protocol::event::{Event, Membership};
use crate::protocol::wire::MembersAnswer;
use crate::rooms::Rooms;
use crate::storage::{self, keys, DeliveryState, Member, StoredEvent, T};
use std::sync::Arc;

use crate::rooms::{GapFill, GapFills};

/// After our join at `join_seq`: the member list, and history before it.
pub(crate) async fn sync_after_join(rooms: &Rooms, room_id: &RoomId, join_seq: u64) -> Result<()> {
    if let Some(answer) = peer_api::members(&rooms.fed, room_id).await? {
        store_members(rooms, room_id, &answer).await?;
    }
    backfill(rooms, room_id, Some(join_seq), BACKFILL_EVENTS_MAX).await?;
    Ok(())
}

/// Take the host's member list after our join. It is the host's word, so
/// it is bounded ([`MEMBERS_ANSWER_ENTRIES_MAX`] entries, names of at most
/// [`SHORT_TEXT_BYTES_MAX`] bytes) and never touches our own participants,
/// whose membership only their own events decide.
async fn store_members(rooms: &Rooms, room_id: &RoomId, answer: &MembersAnswer) -> Result<()> {
    let _guard = rooms.locks.lock_all([room_id.clone()]).await;
    let mut w = storage::WriteSet::default();
    if answer.members.len() > MEMBERS_ANSWER_ENTRIES_MAX {
        tracing::warn!(room_id = %room_id, listed = answer.members.len(), "the host listed more members than we take; keeping the first {MEMBERS_ANSWER_ENTRIES_MAX}");
    }
    for m in answer.members.iter().take(MEMBERS_ANSWER_ENTRIES_MAX) {
        let Some(membership) = Membership::parse(&m.membership) else {
            continue;
        };
        let Ok(f) = Fqid::parse(&m.fqid) else {
            continue;
        };
        if rooms.is_local(&f) {
            continue;
        }
        let k = keys::member(room_id.as_str(), f.as_str());
        let prev = rooms.store.member(room_id.as_str(), f.as_str())?;
        let mut member = prev.unwrap_or(Member {
            fqid: f.to_string(),
            membership,
            display_name: None,
            invite_expires_at_ms: None,
        });
        member.membership = membership;
        crate::rooms::set_user_room(
            rooms,
            &f,
            room_id.as_str(),
            membership == Membership::Join,
            &mut w,
        )?;
        if let Some(name) = &m.display_name {
            // Truncated rather than dropped: the start of a long name still
            // tells members apart, and no name at all shows a bare FQID.
            member.display_name = Some(truncate_at_char_boundary(name, SHORT_TEXT_BYTES_MAX));
        }
        w.put(T::Members, k, &member)?;
    }
    rooms.store.commit(&w)?;
    Ok(())
}

/// The longest prefix of `text` of at most `bytes_max` bytes that ends
/// on a character boundary.
fn truncate_at_char_boundary(text: &str, bytes_max: usize) -> String {
    let mut end = text.len().min(bytes_max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// What one backfill came to (SPEC §9 `federation/backfill` answers it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Backfilled {
    /// Events the host sent.
    pub fetched: u64,
    /// Events we lacked and stored, each verified.
    pub stored: u64,
    /// Events that failed verification (or named another room), not stored.
    pub rejected: u64,
}

/// One event of a backfill answer once checked: the host's tombstone of a
/// refused seq, a verified event of the room with its seq, or one refused.
enum Checked {
    Tombstone(u64),
    Event(Box<Event>, u64),
    Refused,
}

/// Parse and verify a backfill answer's events, without any lock: the
/// first event of each origin fetches that origin's key, up to
/// [`KEY_FETCHES_AT_ONCE_MAX`] origins at once, and the rest then find
/// their keys cached. Verified one by one under the room's lock, the k-th
/// server to join a room fetched the keys of the k - 1 before it in turn.
async fn check_backfilled(rooms: &Rooms, room_id: &RoomId, events: Vec<Value>) -> Vec<Checked> {
    let parsed: Vec<Checked> = events
        .into_iter()
        .filter_map(|value| {
            if value.get("rejected").and_then(Value::as_bool) == Some(true) {
                // A tombstone without a seq says nothing.
                return value
                    .get("seq")
                    .and_then(Value::as_u64)
                    .map(Checked::Tombstone);
            }
            match Event::from_value(value) {
                Ok((event, Some(seq))) if event.room_id == *room_id => {
                    Some(Checked::Event(Box::new(event), seq))
                }
                _ => Some(Checked::Refused),
            }
        })
        .collect();
    // The first event of each origin, and the rest, with their places.
    let mut origins = std::collections::BTreeSet::new();
    let (mut first, mut rest) = (Vec::new(), Vec::new());
    for (i, c) in parsed.iter().enumerate() {
        if let Checked::Event(e, _) = c {
            if origins.insert(&e.origin) {
                first.push((i, &**e));
            } else {
                rest.push((i, &**e));
            }
        }
    }
    let fed = &rooms.fed;
    let mut ok = vec![false; parsed.len()];
    // Built before they are streamed: a stream of a closure's futures
    // borrowing `parsed` is not provably Send for the server's tasks.
    let fetches: Vec<_> = first.iter().map(|(_, e)| verify_event(fed, e)).collect();
    let firsts: Vec<Result<()>> = futures_util::stream::iter(fetches)
        .buffered(KEY_FETCHES_AT_ONCE_MAX)
        .collect()
        .await;
    for ((i, _), verified) in first.iter().zip(firsts) {
        ok[*i] = verified.is_ok();
    }
    for (i, e) in rest {
        ok[i] = verify_event(fed, e).await.is_ok();
    }
    parsed
        .into_iter()
        .zip(ok)
        .map(|(c, ok)| match c {
            Checked::Event(..) if !ok => Checked::Refused,
            c => c,
        })
        .collect()
}

/// Fetch history before `before_seq` from the host, verify every event, and
/// store those we lack.
pub async fn backfill(
    rooms: &Rooms,
    room_id: &RoomId,
    before_seq: Option<u64>,
    limit: u64,
) -> Result<Backfilled> {
    let answer = peer_api::backfill(&rooms.fed, room_id, before_seq, limit).await?;
    let fetched = answer.events.len() as u64;
    let checked = check_backfilled(rooms, room_id, answer.events).await;
    let (mut stored, mut rejected) = (0, 0);
    let mut w = storage::WriteSet::default();
    let mut postings = crate::rooms::search::Postings::default();
    let _guard = rooms.locks.lock_all([room_id.clone()]).await;
    let mut top = 0;
    for c in checked {
        let (event, seq) = match c {
            Checked::Tombstone(seq) => {
                // The host's tombstone: the gap at this seq is real.
                let k = keys::event(room_id.as_str(), seq);
                if rooms.store.get::<StoredEvent>(T::Events, &k)?.is_none() {
                    w.put(
                        T::Events,
                        k,
                        &StoredEvent {
                            json: Vec::new(),
                            state: DeliveryState::Sent,
                            rejected: true,
                        },
                    )?;
                    top = top.max(seq.saturating_add(1));
                }
                continue;
            }
            Checked::Refused => {
                rejected += 1;
                continue;
            }
            Checked::Event(event, seq) => (event, seq),
        };
        let k = keys::event(room_id.as_str(), seq);
        if rooms.store.get::<StoredEvent>(T::Events, &k)?.is_some() {
            continue;
        }
        crate::rooms::write_event(&mut w, &event, seq, event.content_hash())?;
        postings.add(&event, seq);
        top = top.max(seq.saturating_add(1));
        stored += 1;
    }
    postings.write(&rooms.store, &mut w)?;
    rooms.store.commit(&w)?;
    // What was filled moves the replica's contiguous mark on, and next_seq
    // past everything stored (the replica relies on nothing being stored
    // at or above it).
    if let Some(mut plan) = crate::rooms::Plan::load(rooms, room_id)? {
        plan.room.next_seq = plan.room.next_seq.max(top);
        plan.advance_contiguous(rooms, &std::collections::BTreeSet::new())?;
        let mut room_write = storage::WriteSet::default();
        room_write.put(T::Rooms, room_id.as_str().as_bytes().to_vec(), &plan.room)?;
        rooms.store.commit(&room_write)?;
    }
    rooms.store.flush().await?;
    Ok(Backfilled {
        fetched,
        stored,
        rejected,
    })
}

/// Fill the seqs in `[lo, hi)` of `room_id` that are still missing after a
/// short wait, from the host's backfill endpoint (SPEC §6).
pub(crate) async fn fill_gap(rooms: &Rooms, room_id: &RoomId, lo: u64, hi: u64) -> Result<u64> {
    tokio::time::sleep(std::time::Duration::from_millis(GAP_FILL_DELAY_MS)).await;
    let hi = hi.min(lo.saturating_add(BACKFILL_EVENTS_MAX));
    let mut missing = Vec::new();
    for seq in lo..hi {
        if !rooms
            .store
            .contains(T::Events, &keys::event(room_id.as_str(), seq))?
        {
            missing.push(seq);
        }
    }
    let (Some(first), Some(last)) = (missing.first(), missing.last()) else {
        return Ok(0);
    };
    tracing::info!(room_id = %room_id, from = first, to = last, "filling a gap in the room's history from its host");
    let Backfilled { stored, .. } = backfill(
        rooms,
        room_id,
        Some(last.saturating_add(1)),
        last - first + 1,
    )
    .await?;
    Ok(stored)
}

/// Run every claimed gap fill, each in its own task on `tasks`, until
/// `shutdown`. A fill runs again when a batch saw a gap of its own while
/// it ran, and releases its room's claim when it is done.
pub(crate) async fn fill_gaps(
    rooms: Arc<Rooms>,
    mut fills: GapFills,
    tasks: tokio_util::task::TaskTracker,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        let fill = tokio::select! {
            f = fills.recv() => match f { Some(f) => f, None => return },
            _ = shutdown.cancelled() => return,
        };
        let (rooms, shutdown) = (rooms.clone(), shutdown.clone());
        tasks.spawn(async move {
            let GapFill {
                room_id,
                mut from,
                mut to,
            } = fill;
            loop {
                let fill = fill_gap(&rooms, &room_id, from, to);
                tokio::select! {
                    r = fill => if let Err(e) = r {
                        tracing::warn!(room_id = %room_id, error = %e, "could not fill a gap yet");
                    },
                    _ = shutdown.cancelled() => {}
                }
                if !rooms.locks.end_gap_fill(&room_id) {
                    break;
                }
                // A later batch saw a gap while this fill ran: look again.
                match current_gap(&rooms, &room_id) {
                    Some(gap) if !shutdown.is_cancelled() => (from, to) = gap,
                    _ => {
                        rooms.locks.end_gap_fill(&room_id);
                        break;
                    }
                }
            }
        });
    }
}

/// The seqs `[from, to)` between a replica room's contiguous mark and the
/// newest it has seen, if any are missing there.
fn current_gap(rooms: &Rooms, room_id: &RoomId) -> Option<(u64, u64)> {
    let room = rooms.store.room(room_id).ok()??;
    let mark = room.contiguous_seq?;
    let from = mark.checked_add(1)?;
    (from < room.next_seq).then_some((from, room.next_seq))
}

//! Search (`GET /v1/search?q=`): an inverted index of message bodies in a
//! sled tree, written with the event (replicas write a batch of postings
//! just before the batch's commit, see [`super::replica`]), so foreign
//! messages are found like local ones. A query intersects the postings of
//! its words within the caller's rooms; it never scans all events.

use std::collections::BTreeSet;

use crate::error::{Error, Result};
use crate::ids::{Fqid, RoomId};
use crate::limits::{POSTINGS_SCAN_MAX, RESULTS_MAX, TOKENS_PER_MESSAGE_MAX, TOKEN_CHARS_MAX};
use crate::protocol::event::{Content, Event};
use crate::rooms::views::{message_view, MessageView};
use crate::rooms::Rooms;
use crate::storage::{self, keys, StoredEvent, WriteSet, T};

/// Lower-cased words of letters and digits, each once.
pub fn tokens(text: &str) -> Vec<String> {
    let mut seen = BTreeSet::new();
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| {
            w.to_lowercase()
                .chars()
                .take(TOKEN_CHARS_MAX)
                .collect::<String>()
        })
        .filter(|w| seen.insert(w.clone()))
        .take(TOKENS_PER_MESSAGE_MAX)
        .collect()
}

/// Index a message stored at `seq` (part of the event's write set).
pub fn index(w: &mut WriteSet, event: &Event, seq: u64) -> Result<()> {
    for k in postings(event, seq) {
        w.put(T::Search, k, &())?;
    }
    Ok(())
}

/// The posting keys of a message stored at `seq` (none for other events).
pub fn postings(event: &Event, seq: u64) -> Vec<Vec<u8>> {
    match &event.content {
        Content::Message { body, .. } => tokens(body)
            .iter()
            .map(|t| keys::search(t, event.room_id.as_str(), seq))
            .collect(),
        _ => Vec::new(),
    }
}

/// Messages in `me`'s rooms holding every word of `q`, newest first.
pub fn search(rooms: &Rooms, me: &Fqid, q: &str) -> Result<Vec<(String, MessageView)>> {
    let words = tokens(q);
    let Some((first, rest)) = words.split_first() else {
        return Err(Error::bad_request("`q` must contain at least one word"));
    };
    let mine: BTreeSet<String> = rooms
        .store
        .rooms_of(me)?
        .into_iter()
        .map(|r| r.to_string())
        .collect();
    let postings =
        rooms
            .store
            .scan_limit::<()>(T::Search, &storage::prefix(first), POSTINGS_SCAN_MAX)?;
    let mut hits = Vec::new();
    for (k, ()) in postings.into_iter().rev() {
        let tail = &k[first.len() + 1..];
        if tail.len() < 9 {
            continue;
        }
        let room = String::from_utf8_lossy(&tail[..tail.len() - 9]).into_owned();
        let seq = keys::trailing_u64(&k);
        if !mine.contains(&room) {
            continue;
        }
        let mut all = true;
        for w in rest {
            all &= rooms
                .store
                .contains(T::Search, &keys::search(w, &room, seq))?;
        }
        if !all {
            continue;
        }
        let room_id = RoomId::parse(&room)?;
        if let Some(stored) = rooms
            .store
            .get::<StoredEvent>(T::Events, &keys::event(room_id.as_str(), seq))?
        {
            // A posting can outlive a commit that never happened (replicas
            // write postings first): the message itself must hold the words.
            if let Some(view) = message_view(&stored, Some(seq)) {
                let held: BTreeSet<String> = tokens(&view.body).into_iter().collect();
                if words.iter().all(|w| held.contains(w)) {
                    hits.push((room, view));
                }
            }
        }
        if hits.len() >= RESULTS_MAX {
            break;
        }
    }
    Ok(hits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer() {
        assert_eq!(
            tokens("Hello, hello WORLD! Ça va? 42x"),
            ["hello", "world", "ça", "va", "42x"]
        );
        assert!(tokens("  ,,, ").is_empty());
    }
}

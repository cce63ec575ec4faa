//! Search (`GET /v1/search?q=`): an inverted index of message bodies in a
//! sled tree, written with the event (replicas write a batch of postings
//! just before the batch's commit, see [`super::replica`]), so foreign
//! messages are found like local ones. A query intersects the postings of
//! its words within each of the caller's rooms, newest first, and reads
//! only as far as its answer needs; it never scans all events, nor every
//! posting of a common word.

use std::collections::{BTreeSet, BinaryHeap};

use crate::error::{Error, Result};
use crate::ids::{Fqid, RoomId};
use crate::limits::{POSTING_SEEKS_MAX, RESULTS_MAX, TOKENS_PER_MESSAGE_MAX, TOKEN_CHARS_MAX};
use crate::protocol::event::{Content, Event};
use crate::rooms::views::{message_view, MessageView};
use crate::rooms::Rooms;
use crate::storage::{keys, StoredEvent, WriteSet, T};

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

/// Messages in `me`'s rooms holding every word of `q`, newest first (by
/// their origin time), at most [`RESULTS_MAX`].
pub fn search(rooms: &Rooms, me: &Fqid, q: &str) -> Result<Vec<(String, MessageView)>> {
    search_within(rooms, me, q, POSTING_SEEKS_MAX)
}

/// [`search`] with a budget of posting seeks: past it the answer holds
/// what was found so far, so a query costs at most `budget` seeks however
/// common its words and however many rooms the caller is in.
fn search_within(
    rooms: &Rooms,
    me: &Fqid,
    q: &str,
    mut budget: usize,
) -> Result<Vec<(String, MessageView)>> {
    let words = tokens(q);
    if words.is_empty() {
        return Err(Error::bad_request("`q` must contain at least one word"));
    }
    let mut cursors: Vec<RoomHits> = rooms
        .store
        .rooms_of(me)?
        .into_iter()
        .map(|room| RoomHits::new(room, &words))
        .collect();
    // Each room yields its hits newest first; a heap of every room's next
    // hit merges them, so a room is read only as far as the answer needs.
    let mut heads = BinaryHeap::new();
    for (i, cursor) in cursors.iter_mut().enumerate() {
        if let Some(view) = cursor.next(rooms, &words, &mut budget)? {
            heads.push(Head { view, room: i });
        }
    }
    let mut hits = Vec::new();
    while hits.len() < RESULTS_MAX {
        let Some(Head { view, room }) = heads.pop() else {
            break;
        };
        hits.push((cursors[room].room.to_string(), view));
        if let Some(view) = cursors[room].next(rooms, &words, &mut budget)? {
            heads.push(Head { view, room });
        }
    }
    Ok(hits)
}

/// A room's messages holding every query word, newest first: a leapfrog
/// over the words' postings, each step one seek to the newest posting at
/// or before the current candidate, so the work follows the rarest word.
struct RoomHits {
    room: RoomId,
    /// Per word, the key prefix of the room's postings of that word.
    prefixes: Vec<Vec<u8>>,
    /// Every hit newer than this has been yielded; `None` when done.
    upper: Option<u64>,
}

impl RoomHits {
    fn new(room: RoomId, words: &[String]) -> RoomHits {
        let prefixes = words
            .iter()
            .map(|w| keys::postings_of(w, room.as_str()))
            .collect();
        RoomHits {
            room,
            prefixes,
            upper: Some(u64::MAX),
        }
    }

    /// The next hit's view, or `None` when the room (or the budget) is done.
    fn next(
        &mut self,
        rooms: &Rooms,
        words: &[String],
        budget: &mut usize,
    ) -> Result<Option<MessageView>> {
        while let Some(seq) = self.next_seq(rooms, budget)? {
            let Some(stored) = rooms
                .store
                .get::<StoredEvent>(T::Events, &keys::event(self.room.as_str(), seq))?
            else {
                continue;
            };
            // A posting can outlive a commit that never happened (replicas
            // write postings first): the message itself must hold the words.
            if let Some(view) = message_view(&stored, Some(seq)) {
                let held: BTreeSet<String> = tokens(&view.body).into_iter().collect();
                if words.iter().all(|w| held.contains(w)) {
                    return Ok(Some(view));
                }
            }
        }
        Ok(None)
    }

    fn next_seq(&mut self, rooms: &Rooms, budget: &mut usize) -> Result<Option<u64>> {
        let Some(mut candidate) = self.upper else {
            return Ok(None);
        };
        let mut agreed = 0;
        for prefix in self.prefixes.iter().cycle() {
            if *budget == 0 {
                break;
            }
            *budget -= 1;
            let mut to = prefix.clone();
            to.extend_from_slice(&candidate.to_be_bytes());
            let Some(k) = rooms.store.last_key_in(T::Search, prefix, &to)? else {
                break;
            };
            let seq = keys::trailing_u64(&k);
            if seq == candidate {
                agreed += 1;
            } else {
                candidate = seq;
                agreed = 1;
            }
            if agreed == self.prefixes.len() {
                self.upper = candidate.checked_sub(1);
                return Ok(Some(candidate));
            }
        }
        self.upper = None;
        Ok(None)
    }
}

/// A room's newest unreturned hit, ordered by origin time (then sequence).
struct Head {
    view: MessageView,
    room: usize,
}

impl Head {
    fn order(&self) -> (i64, Option<u64>) {
        (self.view.origin_ts, self.view.seq)
    }
}

impl PartialEq for Head {
    fn eq(&self, other: &Head) -> bool {
        self.order() == other.order()
    }
}
impl Eq for Head {}
impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Head) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Head {
    fn cmp(&self, other: &Head) -> std::cmp::Ordering {
        self.order().cmp(&other.order())
    }
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

    use std::sync::Arc;
    use std::time::Duration;

    use crate::clock::Clock;
    use crate::config::Config;
    use crate::federation::Federation;
    use crate::ids::LocalId;
    use crate::rooms::commands;
    use crate::storage::{PowerLevel, Store};

    /// A server with one participant in two rooms; `bodies` are posted in
    /// order, alternating rooms, a second apart.
    async fn rooms_with(bodies: &[&str]) -> (tempfile::TempDir, Rooms, Fqid, [RoomId; 2]) {
        crate::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let clock = Clock::starting_at(1_000_000);
        let (fed, _) = Federation::open(&Config::default_embedded(), store, clock.clone()).unwrap();
        fed.keys.generate(clock.now_ms()).unwrap();
        let (rooms, _fills) = Rooms::new(Arc::new(fed), None);
        let local = LocalId::parse("ana").unwrap();
        rooms
            .create_participant(&local, "Ana", PowerLevel::Member)
            .unwrap();
        let ana = rooms.store.participant(&local).unwrap().unwrap();
        let mut ids = Vec::new();
        for name in ["one", "two"] {
            let room = commands::create_room(&rooms, &ana, name, "standard")
                .await
                .unwrap();
            ids.push(RoomId::parse(&room.room_id).unwrap());
        }
        for (i, body) in bodies.iter().enumerate() {
            clock.advance(Duration::from_secs(1));
            let content = Content::Message {
                body: body.to_string(),
                thread_root: None,
                reply_to: None,
                mentions: vec![],
            };
            commands::post(&rooms, &ana, &ids[i % 2], content)
                .await
                .unwrap();
        }
        let me = rooms.fqid(&local);
        (dir, rooms, me, [ids[0].clone(), ids[1].clone()])
    }

    fn bodies(hits: &[(String, MessageView)]) -> Vec<&str> {
        hits.iter().map(|(_, v)| v.body.as_str()).collect()
    }

    #[tokio::test]
    async fn hits_hold_every_word_and_come_newest_first_across_rooms() {
        let (_dir, rooms, me, [one, two]) = rooms_with(&[
            "red fox",      // one
            "red",          // two
            "fox red hen",  // one
            "blue fox",     // two
            "the red fox",  // one
            "red fox runs", // two
        ])
        .await;
        let hits = search(&rooms, &me, "fox RED").unwrap();
        assert_eq!(
            bodies(&hits),
            ["red fox runs", "the red fox", "fox red hen", "red fox"]
        );
        let in_rooms: Vec<&str> = hits.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(
            in_rooms,
            [two.as_str(), one.as_str(), one.as_str(), one.as_str()]
        );
        assert_eq!(bodies(&search(&rooms, &me, "blue").unwrap()), ["blue fox"]);
        assert!(search(&rooms, &me, "red hen blue").unwrap().is_empty());
        assert!(search(&rooms, &me, "absent").unwrap().is_empty());
        assert_eq!(
            search(&rooms, &me, " ,, ").unwrap_err().code,
            crate::error::Code::BadRequest
        );
    }

    #[tokio::test]
    async fn a_search_stops_at_its_budget_of_seeks_and_answers_what_it_found() {
        // "a" and "b" never meet: each leapfrog step skips one message.
        let many: Vec<String> = (0..40)
            .map(|i| if i % 4 < 2 { "a x" } else { "b x" }.to_string())
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let (_dir, rooms, me, _) = rooms_with(&refs).await;
        assert!(search(&rooms, &me, "a b").unwrap().is_empty());
        assert_eq!(search(&rooms, &me, "x").unwrap().len(), 40);
        // A budget of n seeks finds at most n one-word hits.
        assert_eq!(search_within(&rooms, &me, "x", 7).unwrap().len(), 7);
        assert!(search_within(&rooms, &me, "x", 0).unwrap().is_empty());
    }
}

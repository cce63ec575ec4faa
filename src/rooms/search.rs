//! Search (`GET /v1/search?q=`): an inverted index of message bodies in a
//! sled tree, written with the event (replicas write a batch's postings
//! just before the batch's commit, see [`super::replica`]), so foreign
//! messages are found like local ones. A word's postings in a room are
//! kept in blocks of up to [`POSTINGS_PER_BLOCK_MAX`] seqs, one row each,
//! that a commit appends to: one row per word of a commit, not one per
//! posting. A query intersects the postings of its words within each of
//! the caller's rooms, newest first, reading a block per seek, and only as
//! far as its answer needs; it never scans all events, nor every posting
//! of a common word.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use crate::error::{Error, Result};
use crate::ids::{Fqid, RoomId};
use crate::limits::{
    POSTINGS_PER_BLOCK_MAX, POSTING_PROBES_MAX, POSTING_SEEKS_MAX, RESULTS_MAX,
    TOKENS_PER_MESSAGE_MAX, TOKEN_CHARS_MAX,
};
use crate::protocol::event::{Content, Event};
use crate::rooms::views::{message_view, MessageView};
use crate::rooms::Rooms;
use crate::storage::{keys, PostingBlock, Store, StoredEvent, WriteSet, T};

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

/// The postings of one commit, by word and room, merged into the stored
/// blocks by [`Postings::rows`] while the rooms' locks are held: a block
/// is read, then rewritten, so no other commit of its room may run between.
#[derive(Debug, Default)]
pub struct Postings {
    new: BTreeMap<Vec<u8>, BTreeSet<u64>>,
}

impl Postings {
    /// Index a message stored at `seq` (other events have no postings).
    pub fn add(&mut self, event: &Event, seq: u64) {
        let Content::Message { body, .. } = &event.content else {
            return;
        };
        for t in tokens(body) {
            self.new
                .entry(keys::postings_of(&t, event.room_id.as_str()))
                .or_default()
                .insert(seq);
        }
    }

    /// The block rows that hold these postings beside the stored ones.
    /// Per word and room, one seek finds the newest block, which takes
    /// every newer seq (a full one is followed by a new block). A seq older
    /// than that block's first (a gap filled late) costs one more seek and
    /// goes into the block covering it, split in two once it is over
    /// [`POSTINGS_PER_BLOCK_MAX`]. Blocks never overlap: each holds the
    /// seqs from its first up to the next block's first, which is what lets
    /// a search find the newest posting at or before a seq in one seek.
    pub fn rows(self, store: &Store) -> Result<Vec<(Vec<u8>, PostingBlock)>> {
        let mut rows = Vec::new();
        for (prefix, seqs) in self.new {
            // The blocks read or made for this word and room, by first seq,
            // and those this commit changed: only those are written.
            let mut blocks: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
            let mut changed = BTreeSet::new();
            let newest = store.posting_block(&prefix, u64::MAX)?;
            let newest_first = newest.as_ref().map(|b| b[0]);
            if let Some(b) = newest {
                blocks.insert(b[0], b);
            }
            for seq in seqs {
                if newest_first.is_some_and(|first| seq < first) {
                    if let Some(b) = store.posting_block(&prefix, seq)? {
                        blocks.entry(b[0]).or_insert(b);
                    }
                }
                changed.extend(insert(&mut blocks, seq));
            }
            for first in changed {
                let block = PostingBlock::of(&blocks[&first]);
                rows.push((keys::posting_block(&prefix, first), block));
            }
        }
        Ok(rows)
    }

    /// [`Postings::rows`] into `w`.
    pub fn write(self, store: &Store, w: &mut WriteSet) -> Result<()> {
        for (k, block) in self.rows(store)? {
            w.put(T::Search, k, &block)?;
        }
        Ok(())
    }
}

/// Put `seq` into the block of `blocks` that covers it (the one with the
/// greatest first seq at or before it), or a new block. Answers the first
/// seqs of the blocks that changed: none for a seq already held.
fn insert(blocks: &mut BTreeMap<u64, Vec<u64>>, seq: u64) -> Vec<u64> {
    let Some((&first, block)) = blocks.range_mut(..=seq).next_back() else {
        blocks.insert(seq, vec![seq]);
        return vec![seq];
    };
    let newest = block.last().is_some_and(|last| seq > *last);
    if newest && block.len() >= POSTINGS_PER_BLOCK_MAX {
        blocks.insert(seq, vec![seq]);
        return vec![seq];
    }
    match block.binary_search(&seq) {
        Ok(_) => return Vec::new(),
        Err(i) => block.insert(i, seq),
    }
    if block.len() <= POSTINGS_PER_BLOCK_MAX {
        return vec![first];
    }
    let upper = block.split_off(block.len() / 2);
    let upper_first = upper[0];
    blocks.insert(upper_first, upper);
    vec![first, upper_first]
}

/// Messages in `me`'s rooms holding every word of `q`, newest first (by
/// their origin time), at most [`RESULTS_MAX`].
pub fn search(rooms: &Rooms, me: &Fqid, q: &str) -> Result<Vec<(String, MessageView)>> {
    let budget = Budget {
        seeks: POSTING_SEEKS_MAX,
        probes: POSTING_PROBES_MAX,
    };
    search_within(rooms, me, q, budget)
}

/// What one search may still read: blocks from the store, and postings
/// stepped through in blocks already read.
#[derive(Debug, Clone, Copy)]
struct Budget {
    seeks: usize,
    probes: usize,
}

/// [`search`] within `budget`: once it is spent the answer holds what was
/// found so far, so a query costs at most that much however common its
/// words and however many rooms the caller is in.
fn search_within(
    rooms: &Rooms,
    me: &Fqid,
    q: &str,
    mut budget: Budget,
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
/// over the words' postings, each step the newest posting at or before the
/// current candidate, so the work follows the rarest word.
struct RoomHits {
    room: RoomId,
    words: Vec<WordPostings>,
    /// Every hit newer than this has been yielded; `None` when done.
    upper: Option<u64>,
}

/// One query word's postings in one room, and the block last read.
struct WordPostings {
    /// The key prefix of the word's blocks in the room.
    prefix: Vec<u8>,
    /// The block last read, ascending (empty before the first read).
    block: Vec<u64>,
}

impl WordPostings {
    /// The newest posting at or before `seq`, or `None` when there is none
    /// or the budget is spent. Candidates only go down, so the block in
    /// hand still covers `seq` while its first seq is at or before it
    /// (blocks never overlap): a store read happens once per block.
    fn at_or_before(
        &mut self,
        rooms: &Rooms,
        seq: u64,
        budget: &mut Budget,
    ) -> Result<Option<u64>> {
        if self.block.first().is_none_or(|first| *first > seq) {
            if budget.seeks == 0 {
                return Ok(None);
            }
            budget.seeks -= 1;
            match rooms.store.posting_block(&self.prefix, seq)? {
                Some(block) => self.block = block,
                None => return Ok(None),
            }
        }
        if budget.probes == 0 {
            return Ok(None);
        }
        budget.probes -= 1;
        let after = self.block.partition_point(|s| *s <= seq);
        Ok(after.checked_sub(1).map(|i| self.block[i]))
    }
}

impl RoomHits {
    fn new(room: RoomId, words: &[String]) -> RoomHits {
        let words = words
            .iter()
            .map(|w| WordPostings {
                prefix: keys::postings_of(w, room.as_str()),
                block: Vec::new(),
            })
            .collect();
        RoomHits {
            room,
            words,
            upper: Some(u64::MAX),
        }
    }

    /// The next hit's view, or `None` when the room (or the budget) is done.
    fn next(
        &mut self,
        rooms: &Rooms,
        words: &[String],
        budget: &mut Budget,
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

    fn next_seq(&mut self, rooms: &Rooms, budget: &mut Budget) -> Result<Option<u64>> {
        let Some(mut candidate) = self.upper else {
            return Ok(None);
        };
        let n = self.words.len();
        let mut agreed = 0;
        for w in (0..n).cycle() {
            let Some(seq) = self.words[w].at_or_before(rooms, candidate, budget)? else {
                break;
            };
            if seq == candidate {
                agreed += 1;
            } else {
                candidate = seq;
                agreed = 1;
            }
            if agreed == n {
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
    async fn a_search_stops_at_its_budget_and_answers_what_it_found() {
        // "a" and "b" never meet: each leapfrog step skips one message.
        let many: Vec<String> = (0..40)
            .map(|i| if i % 4 < 2 { "a x" } else { "b x" }.to_string())
            .collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let (_dir, rooms, me, _) = rooms_with(&refs).await;
        assert!(search(&rooms, &me, "a b").unwrap().is_empty());
        assert_eq!(search(&rooms, &me, "x").unwrap().len(), 40);
        let within =
            |seeks, probes| search_within(&rooms, &me, "x", Budget { seeks, probes }).unwrap();
        // A budget of n probes finds at most n one-word hits.
        assert_eq!(within(100, 7).len(), 7);
        assert!(within(100, 0).is_empty());
        // Each room's "x" is one block: one seek reads one room's 20 hits.
        let one_seek = within(1, 100);
        assert_eq!(one_seek.len(), 20);
        assert!(one_seek.iter().all(|(r, _)| *r == one_seek[0].0));
        assert!(within(0, 100).is_empty());
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    /// Add `seqs` of one word as one commit, then every stored block.
    fn commit(store: &Store, seqs: impl IntoIterator<Item = u64>) -> Vec<Vec<u64>> {
        let prefix = keys::postings_of("w", "!r:a.test");
        let postings = Postings {
            new: BTreeMap::from([(prefix.clone(), seqs.into_iter().collect())]),
        };
        let mut w = WriteSet::default();
        postings.write(store, &mut w).unwrap();
        store.commit(&w).unwrap();
        // Every block, newest first: each is found below the one after it.
        let mut blocks = Vec::new();
        let mut at = Some(u64::MAX);
        while let Some(b) = at.and_then(|seq| store.posting_block(&prefix, seq).unwrap()) {
            at = b[0].checked_sub(1);
            blocks.push(b);
        }
        blocks.reverse();
        blocks
    }

    #[test]
    fn postings_append_to_the_newest_block_until_it_is_full() {
        let (_dir, store) = store();
        let max = POSTINGS_PER_BLOCK_MAX as u64;
        assert_eq!(commit(&store, [3, 5]), [vec![3, 5]]);
        // A later commit appends to the same row.
        let blocks = commit(&store, 6..max + 4);
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].len(), POSTINGS_PER_BLOCK_MAX);
        // A full block is followed by a new one.
        let blocks = commit(&store, [max + 10, max + 11]);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[1], [max + 10, max + 11]);
    }

    #[test]
    fn a_late_posting_goes_into_the_block_that_covers_it_and_splits_it_when_full() {
        let (_dir, store) = store();
        let max = POSTINGS_PER_BLOCK_MAX as u64;
        // One full block of even seqs from 100, and a newer one.
        commit(&store, (0..max).map(|i| 100 + 2 * i));
        let newest = 100 + 2 * max + 50;
        commit(&store, [newest]);
        // Older than every block: a block of its own.
        assert_eq!(commit(&store, [7])[0], [7]);
        // Inside the full block: it takes the seq and splits in two.
        let blocks = commit(&store, [101]);
        assert_eq!(blocks.len(), 4, "{blocks:?}");
        let all: Vec<u64> = blocks.concat();
        let mut sorted = all.clone();
        sorted.sort_unstable();
        assert_eq!(all, sorted, "blocks never overlap");
        assert!(all.contains(&101) && all.contains(&newest));
        assert_eq!(all.len(), POSTINGS_PER_BLOCK_MAX + 3);
        assert!(blocks.iter().all(|b| b.len() <= POSTINGS_PER_BLOCK_MAX));
        // A posting already stored changes nothing, and writes no row.
        let held = Postings {
            new: BTreeMap::from([(
                keys::postings_of("w", "!r:a.test"),
                BTreeSet::from([101, newest]),
            )]),
        };
        assert!(held.rows(&store).unwrap().is_empty());
        assert_eq!(commit(&store, [101, newest]), blocks);
    }

    #[test]
    fn a_schema_3_posting_reads_as_a_block_of_one_and_takes_new_seqs() {
        let (_dir, store) = store();
        let prefix = keys::postings_of("w", "!r:a.test");
        store
            .put(T::Search, &keys::posting_block(&prefix, 4), &())
            .unwrap();
        assert_eq!(store.posting_block(&prefix, 9).unwrap(), Some(vec![4]));
        assert_eq!(store.posting_block(&prefix, 3).unwrap(), None);
        assert_eq!(commit(&store, [9]), [vec![4, 9]]);
    }
}

//! What is stored: one record type per sled tree. These are storage types,
//! separate from the wire types of `federation::` and `api::`; ids are kept
//! as their validated string forms.

use serde::{Deserialize, Serialize};

use crate::protocol::event::{Membership, Presence, RoomSummary};

/// One Ed25519 key of ours. The seed never leaves this record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeyRecord {
    pub seed: [u8; 32],
    pub key_id: String,
    pub created_at_ms: i64,
    pub rotated_at_ms: Option<i64>,
    pub expires_at_ms: Option<i64>,
}

/// The current key and the rotated ones (SPEC §3).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct KeyRing {
    pub current: Option<KeyRecord>,
    pub old: Vec<KeyRecord>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum PowerLevel {
    Member,
    Admin,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Participant {
    pub local_id: String,
    pub display_name: String,
    pub power_level: PowerLevel,
    pub presence: Presence,
    pub created_at_ms: i64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum RoomType {
    Standard,
    Dm,
    Incognito,
    Bridge,
    Sidekick,
}

impl RoomType {
    pub fn parse(s: &str) -> Option<RoomType> {
        Some(match s {
            "standard" => RoomType::Standard,
            "dm" => RoomType::Dm,
            "incognito" => RoomType::Incognito,
            "bridge" => RoomType::Bridge,
            "sidekick" => RoomType::Sidekick,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RoomType::Standard => "standard",
            RoomType::Dm => "dm",
            RoomType::Incognito => "incognito",
            RoomType::Bridge => "bridge",
            RoomType::Sidekick => "sidekick",
        }
    }

    /// SPEC §6: these room types never federate.
    pub fn federable(self) -> bool {
        matches!(self, RoomType::Standard | RoomType::Dm)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Room {
    pub room_id: String,
    pub name: String,
    pub room_type: RoomType,
    /// This side's per-room federate flag (SPEC §6).
    pub federate: bool,
    pub created_at_ms: i64,
    /// Host: the next seq to assign. Replica: one past the highest seq seen.
    pub next_seq: u64,
    /// Replica: the seq of our first join (gap detection starts there).
    pub joined_seq: Option<u64>,
    /// Replica: every seq from `joined_seq` up to this one is stored (or
    /// tombstoned); anything between it and `next_seq` is a gap.
    pub contiguous_seq: Option<u64>,
    /// For DMs made by `/v1/me/federated-dms`: the two FQIDs, sorted.
    pub dm_pair: Option<(String, String)>,
    /// Who created the room (hosted rooms): a room admin, who may kick.
    pub creator: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Member {
    pub fqid: String,
    pub membership: Membership,
    pub display_name: Option<String>,
    /// For `Invite`: when the invitation lapses (the host's own clock).
    pub invite_expires_at_ms: Option<i64>,
}

impl Member {
    /// In the room now: joined, or invited with the invitation still open.
    pub fn is_present(&self, now_ms: i64) -> bool {
        match self.membership {
            Membership::Join => true,
            Membership::Invite => self.invite_expires_at_ms.is_none_or(|e| now_ms < e),
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum DeliveryState {
    /// Sequenced by the host (or hosted here).
    Sent,
    /// Queued for the host, no seq yet.
    Pending,
    /// Given up or refused by the host.
    Failed,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Sent => "sent",
            DeliveryState::Pending => "pending",
            DeliveryState::Failed => "failed",
        }
    }
}

/// A room event as stored: the signed JSON (without `unsigned`) kept byte
/// for byte, or a tombstone for a seq whose event was rejected.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredEvent {
    pub json: Vec<u8>,
    pub state: DeliveryState,
    pub rejected: bool,
}

/// One reaction event, kept under the message it targets (`T::Reactions`),
/// applied in seq order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReactionRow {
    pub key: String,
    pub sender: String,
    pub add: bool,
}

/// One block of a word's postings in one room (`T::Search`, key
/// `word ‖ room ‖ first seq`): the seqs after the key's own, each as its
/// distance from the one before (bincode varints: one byte for most).
/// Schema 3 stored one key per posting with an empty value, which
/// [`crate::storage::Store::posting_block`] reads as a block of one, so
/// old databases need no migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PostingBlock {
    pub gaps: Vec<u64>,
}

impl PostingBlock {
    /// The block of `seqs` (ascending, distinct), stored under a key that
    /// holds the first of them.
    pub fn of(seqs: &[u64]) -> PostingBlock {
        let gaps = seqs.windows(2).map(|w| w[1] - w[0]).collect();
        PostingBlock { gaps }
    }

    /// Every seq of the block whose key holds `first`, ascending.
    pub fn seqs(&self, first: u64) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.gaps.len() + 1);
        out.push(first);
        let mut at = first;
        for gap in &self.gaps {
            at = at.saturating_add(*gap);
            out.push(at);
        }
        out
    }
}

/// Where an (origin, event_id) lives, and what its content hash was.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventRef {
    pub room_id: String,
    pub seq: Option<u64>,
    pub hash: [u8; 32],
}

/// One queued delivery to a peer (SPEC §11).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutboxItem {
    pub queued_at_ms: i64,
    pub kind: OutboxKind,
}

impl OutboxItem {
    pub fn wire_len(&self) -> usize {
        match &self.kind {
            OutboxKind::Event { wire, .. } => wire.len(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum OutboxKind {
    /// A room event in wire form (with `unsigned.seq` when we host it).
    Event {
        room_id: String,
        event_id: String,
        origin: String,
        wire: Vec<u8>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerError {
    pub code: String,
    pub message: String,
    pub at_ms: i64,
}

/// Rolling 24 h counter in hourly buckets.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RollingCount {
    pub hour: i64,
    pub buckets: [u64; 24],
}

impl RollingCount {
    const HOUR_MS: i64 = 3_600_000;

    fn roll(&mut self, now_ms: i64) {
        let hour = now_ms.div_euclid(Self::HOUR_MS);
        let gap = hour - self.hour;
        if !(0..24).contains(&gap) {
            self.buckets = [0; 24];
        } else {
            for h in (self.hour + 1)..=hour {
                self.buckets[h.rem_euclid(24) as usize] = 0;
            }
        }
        self.hour = hour;
    }

    pub fn add(&mut self, now_ms: i64, n: u64) {
        self.roll(now_ms);
        self.buckets[self.hour.rem_euclid(24) as usize] += n;
    }

    pub fn total(&self, now_ms: i64) -> u64 {
        let mut copy = self.clone();
        copy.roll(now_ms);
        copy.buckets.iter().sum()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PeerRecord {
    pub last_seen_ms: Option<i64>,
    pub last_error: Option<PeerError>,
    pub protocol_versions: Vec<String>,
    pub sent: RollingCount,
    pub received: RollingCount,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditRow {
    pub at_ms: i64,
    pub action: String,
    pub peer: Option<String>,
    pub event_id: Option<String>,
    pub room_id: Option<String>,
    pub code: Option<String>,
    pub detail: String,
    /// True when `peer` is only what an unsigned or unverified request
    /// claimed, not an authenticated origin.
    pub unverified: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Invitation {
    pub invite_id: String,
    pub room_id: String,
    pub room: RoomSummary,
    pub inviter: String,
    pub target: String,
    pub expires_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TxnRecord {
    pub at_ms: i64,
    pub answer: Vec<u8>,
}

/// The last presence a participant's own server told us.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ForeignPresence {
    pub ts_ms: i64,
    pub presence: Presence,
}

//! Every limit of the server, named, in one place, with what it costs.

/// SPEC §2: server names are at most 255 bytes.
pub const SERVER_NAME_BYTES_MAX: usize = 255;
/// SPEC §2: local ids are 1-64 characters.
pub const LOCAL_ID_BYTES_MAX: usize = 64;
/// SPEC §10: request bodies above this are refused before they are buffered,
/// so one peer cannot make us hold more than this per request.
pub const BODY_BYTES_MAX: u64 = 8 * 1024 * 1024;
/// Local API bodies are small JSON documents.
pub const LOCAL_BODY_BYTES_MAX: u64 = 256 * 1024;
/// Request bodies held in memory at once, over all requests: each request
/// reserves its declared length (or the route's maximum) before reading,
/// so many concurrent senders wait instead of exhausting memory. 32 largest
/// `/send` bodies, or thousands of ordinary ones.
pub const BODY_BUFFER_BYTES_MAX: usize = 256 * 1024 * 1024;
/// SPEC §12: concurrent HTTP/2 streams per connection.
pub const HTTP2_STREAMS_PER_CONNECTION_MAX: u32 = 100;
/// SPEC §12: request headers of one HTTP/2 request.
pub const HTTP2_HEADER_LIST_BYTES_MAX: u32 = 16 * 1024;
/// HTTP/1.1 read buffer: a request head larger than this is refused (the
/// HTTP/1.1 counterpart of the HTTP/2 header limit; bodies stream through).
pub const HTTP1_BUFFER_BYTES_MAX: usize = 64 * 1024;
/// A TLS handshake that takes longer than this is dropped.
pub const TLS_HANDSHAKE_TIMEOUT_SECS: u64 = 10;
/// SPEC §8: events per `/send` transaction (also what a sender batches).
pub const EVENTS_PER_TRANSACTION_MAX: usize = 100;
/// A `/send` of at most this many events is parsed and verified on the
/// executor thread that serves it: one event's JCS and Ed25519 take
/// about 60 µs, less than handing them to the blocking pool and waking
/// the request again (which cost single-event senders more CPU than the
/// work, and latency under load). Bigger batches go to the pool.
pub const ON_EXECUTOR_EVENTS_MAX: usize = 2;
/// SPEC §8: EDUs per `/send` transaction.
pub const EDUS_PER_TRANSACTION_MAX: usize = 100;
/// SPEC §5: a canonical event above this is refused.
pub const EVENT_CANONICAL_BYTES_MAX: usize = 64 * 1024;
/// SPEC §5: `sw.message` body.
pub const MESSAGE_BODY_BYTES_MAX: usize = 32 * 1024;
/// SPEC §5: `sw.reaction` key.
pub const REACTION_KEY_BYTES_MAX: usize = 64;
/// Bound on short free-text fields (names, display names, status messages).
pub const SHORT_TEXT_BYTES_MAX: usize = 256;
/// Bound on the mentions list of one message.
pub const MENTIONS_MAX: usize = 100;
/// SPEC §5: JSON integers must be exactly representable in an IEEE double.
pub const JSON_INTEGER_ABS_MAX: i64 = (1 << 53) - 1;
/// SPEC §3: descriptor fetches read at most this much.
pub const DESCRIPTOR_BYTES_MAX: usize = 64 * 1024;
/// SPEC §3: descriptor fetch timeout, seconds.
pub const DESCRIPTOR_FETCH_TIMEOUT_SECS: u64 = 10;
/// SPEC §3: a cached descriptor lives at most this long, seconds.
pub const DESCRIPTOR_CACHE_SECS_MAX: u64 = 24 * 3600;
/// SPEC §3: at most one forced re-fetch per peer per this many seconds.
pub const DESCRIPTOR_REFETCH_INTERVAL_SECS: u64 = 60;
/// SPEC §3: failed fetches are remembered this long, seconds.
pub const DESCRIPTOR_NEGATIVE_CACHE_SECS: u64 = 300;
/// SPEC §3: fetches of never-seen origins per second.
pub const NEW_ORIGIN_FETCHES_PER_SEC_MAX: u32 = 10;
/// SPEC §6: a replica's join is sent to the host synchronously within this.
pub const SYNC_S2S_TIMEOUT_SECS: u64 = 10;
/// Outbound S2S request timeout for queued deliveries.
pub const DELIVERY_TIMEOUT_SECS: u64 = 30;
/// Outbound TCP connect and TLS handshake, each.
pub const OUTBOUND_CONNECT_TIMEOUT_SECS: u64 = 10;
/// Pooled outbound connections idle this long are closed: below a peer's
/// default `limits.idle_timeout` (60 s), so a peer never closes one under
/// a request we are sending.
pub const OUTBOUND_POOL_IDLE_SECS: u64 = 50;
/// Answers to S2S requests whose answer is small (a `/send` result list,
/// a profile, a probe) are read up to this much.
pub const S2S_REPLY_BYTES_MAX: usize = 1024 * 1024;
/// A host's members list is read up to this much.
pub const MEMBERS_REPLY_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Room for a wire event beyond its canonical bytes (signatures, `unsigned`).
const WIRE_EVENT_OVERHEAD_BYTES: usize = 1024;

/// A backfill answer of `limit` events is read up to this much: a legal
/// answer of `limit` events of the largest size fits, nothing much larger
/// is held in memory.
pub const fn backfill_reply_bytes_max(limit: u64) -> usize {
    let events = if limit > BACKFILL_EVENTS_MAX {
        BACKFILL_EVENTS_MAX
    } else {
        limit
    } as usize;
    events * (EVENT_CANONICAL_BYTES_MAX + WIRE_EVENT_OVERHEAD_BYTES) + 64 * 1024
}
/// SPEC §8: a repeated (origin, txn_id) within this window gets the cached answer.
pub const TXN_CACHE_SECS: u64 = 24 * 3600;
/// Upper bound on `/v1/rooms/{id}/messages` page size.
pub const MESSAGES_PAGE_MAX: usize = 1000;
/// SPEC §9: backfill pulls at most this many events.
pub const BACKFILL_EVENTS_MAX: u64 = 1000;
/// Audit rows returned by one query.
pub const AUDIT_PAGE_MAX: usize = 1000;
/// An audit row's detail is cut to this: it often quotes what a peer sent
/// (a 60 KB `Signature-Input` made 60 KB rows, kept for 90 days).
pub const AUDIT_DETAIL_BYTES_MAX: usize = 1024;
/// Audit rows of one millisecond stored in one record (a `/send` audits
/// each of its ≤ 100 events at once): bounds a record to this many rows
/// of at most `AUDIT_DETAIL_BYTES_MAX` detail each.
pub const AUDIT_ROWS_PER_RECORD_MAX: usize = 128;
/// Audit rows a second for requests whose origin is only claimed: anyone
/// can send those, so at 1 KiB a row this bounds them to ~0.8 GiB over the
/// default 90-day retention even under a constant flood.
pub const AUDIT_UNVERIFIED_PER_SEC_MAX: u32 = 10;
/// How long graceful shutdown waits for in-flight requests, seconds.
pub const SHUTDOWN_GRACE_SECS: u64 = 10;

// Rooms and storage bounds (issue 9).

/// Entries a replica takes from one host's `members` answer: each is a
/// member row written under the room lock (about 100 bytes and one sled
/// insert), so a lying host could otherwise fill our store in one answer.
/// Far above any room a replica shares (the foreign limit is 50 by default).
pub const MEMBERS_ANSWER_ENTRIES_MAX: usize = 10_000;
/// How far past the newest seq it has seen a replica takes a host's event
/// while it tracks the room's history. A seq beyond it would open a gap no
/// backfill closes (each fill pulls at most `BACKFILL_EVENTS_MAX`), kept
/// open for ever. Delivery keeps at most 8 transactions of 100 events in
/// flight, far below it; a replica left further behind catches up with an
/// admin backfill, which starts from the newest events.
pub const SEQ_AHEAD_MAX: u64 = 10_000;
/// Pending invitations one of our participants may hold: each is a row in
/// their notification panel, and any peer with a room can send them. An
/// invite past it is refused per event (`SW_FED_FOREIGN_LIMIT`) until the
/// participant answers some or they expire.
pub const INVITATIONS_PENDING_PER_PARTICIPANT_MAX: usize = 100;
/// Peers whose descriptor (or failure to fetch one) the verifier keeps in
/// memory, with their key bindings: a few KiB each. Names come from
/// unauthenticated requests (at most `NEW_ORIGIN_FETCHES_PER_SEC_MAX` new
/// ones a second), so past it the stale and failed entries go first,
/// then the least recently used.
pub const VERIFIER_PEERS_MAX: usize = 10_000;

/// How long opening the database waits for a lock a closing instance still
/// holds (sled's threads release it after the last handle is gone), before
/// it concludes another process owns the data dir.
pub const DB_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// SPEC §12: sled's page cache when `[storage] cache_capacity` is not set
/// (and for stores opened without a configuration, as unit tests do).
pub const CACHE_CAPACITY_BYTES_DEFAULT: u64 = 64 * 1024 * 1024;
/// sled counts its page cache by the pages' serialized size; resident, a
/// cached page takes about 1.7 times that (membench, 200 000 events: a
/// sled cache of 32 MiB instead of 1 MiB added 53 MiB of RSS). sled is
/// given `cache_capacity` divided by this, so the configured figure is
/// close to the memory the cache really holds.
pub const SLED_CACHE_RESIDENT_FACTOR: u64 = 2;
/// The data disk is low on space (`storage.low_space`, `admin federation
/// check`) below this share of it, in percent, or below
/// [`DISK_LOW_SPACE_BYTES`], whichever is more: on a big disk 5 % is days
/// of messages to react in; on a small one the floor keeps room for sled,
/// which rewrites whole segments and needs free space to do it.
pub const DISK_LOW_SPACE_PERCENT: u64 = 5;
/// See [`DISK_LOW_SPACE_PERCENT`].
pub const DISK_LOW_SPACE_BYTES: u64 = 512 * 1024 * 1024;
/// How often the server looks at the data disk's free space: one statvfs
/// call, cheap enough to catch a disk filling up well before it is full.
pub const DISK_CHECK_INTERVAL_SECS: u64 = 60;
/// Live events buffered per `GET /v1/events` stream before a slow reader
/// starts losing the oldest (it reads history to catch up).
pub const LIVE_EVENTS_BUFFERED: usize = 1024;

/// Transactions in flight at once to one peer, when the order of arrival
/// cannot matter (every event carries the `seq` we gave it as host).
/// Measured on 2 cores draining a backlog to one peer: 3 left the cores
/// idle between answers (8 400 events/s), 8 keeps them busy (9 500 – 11 000
/// in the same series); 12 was no faster, only each request slower.
pub const PIPELINE_DEPTH: usize = 8;

/// Bindings of keys a peer no longer lists, kept beyond the ones it does.
pub const DESCRIPTOR_OLD_KEYS_KEPT: usize = 64;

/// Upper bound an admin may set for foreign participants per room.
pub const FOREIGN_PARTICIPANTS_MAX: u64 = 100_000;
/// Peers listed in one allow/deny list.
pub const PEER_LIST_MAX: usize = 10_000;

/// Peers' keys one backfill fetches at once (one per origin of its events).
pub const KEY_FETCHES_AT_ONCE_MAX: usize = 16;
/// Words indexed per message; a longer message is indexed by its first ones.
pub const TOKENS_PER_MESSAGE_MAX: usize = 200;
/// Characters in one indexed word.
pub const TOKEN_CHARS_MAX: usize = 40;
/// Posting blocks one search may read from the store before it answers
/// with what it has found: the cost of the worst query (two common words
/// that never meet), at one seek per block.
pub const POSTING_SEEKS_MAX: usize = 20_000;
/// Postings one search may step through, in blocks already read, before
/// it answers with what it has found.
pub const POSTING_PROBES_MAX: usize = 200_000;
/// Postings of one word in one room kept in one stored block: a commit
/// appends to the room's newest block of each of its words (one seek and
/// one row per word, not per posting), and a search reads a block in one
/// seek. A block is at most a few hundred bytes (most gaps take a byte).
pub const POSTINGS_PER_BLOCK_MAX: usize = 256;
/// Results of one query.
pub const RESULTS_MAX: usize = 50;

/// How long a replica waits before filling a gap: with pipelined delivery
/// the missing events are usually already on their way.
pub const GAP_FILL_DELAY_MS: u64 = 2000;

/// How often rate-limiter state of idle keys is forgotten.
pub const RATE_STATE_SWEEP_SECS: u64 = 60;

/// How often the retention pass runs.
pub const RETENTION_INTERVAL_SECS: u64 = 3600;
/// A presence update older than this is not worth delivering any more
/// (presence EDUs wait in memory only, latest per sender).
pub const EDU_TTL_MS: i64 = 5 * 60 * 1000;
/// How long a call token (a LiveKit access token, SPEC §14) is valid: a
/// participant asks for a new one to join again later.
pub const CALL_TOKEN_SECS: i64 = 3600;
/// SPEC §16: distinct `peer` label values per tenant; later peers are
/// counted under `peer="other"`, so a flood of new origins cannot grow the
/// metrics (each series costs memory for the process's life).
pub const PEER_LABELS_MAX: usize = 1000;
/// Connections to the metrics listener served at once (a scrape is one
/// short request; others wait in the kernel's backlog).
pub const METRICS_CONNECTIONS_MAX: usize = 8;
/// A metrics connection is closed after this many seconds, answered or not.
pub const METRICS_CONNECTION_SECS_MAX: u64 = 10;
/// Tokio worker threads: one per core, at most this many. Each worker
/// keeps its own allocator arenas and task queues, so a 64-core host
/// would hold far more memory than the work needs; a single sled
/// database does not scale past a handful of writers anyway.
pub const RUNTIME_WORKERS_MAX: usize = 8;
/// Tokio's blocking pool (flushes, file reads, DNS): tokio's default is
/// 512 threads, each with its own stack, for work that waits on one disk.
pub const BLOCKING_THREADS_MAX: usize = 16;
/// SPEC §17 / issue 13: the whole admin console (page, script, style).
pub const CONSOLE_BYTES_MAX: usize = 200 * 1024;
/// The console's peers page refreshes this often (issue 13: ≤ 5 s).
pub const CONSOLE_PEERS_REFRESH_MS: u64 = 2000;
const _: () = assert!(CONSOLE_PEERS_REFRESH_MS <= 5000, "issue 13: at most 5 s");

//! Storage: sled trees behind typed functions. Only this module touches sled.
//!
//! # Layout (one tree per entity; big-endian integers so keys sort)
//! - `meta`: `schema_version`, `keys` (our [`KeyRing`]), `policy`.
//! - `participants`: local_id → [`Participant`]; `tokens`: SHA-256(token) → local_id.
//! - `rooms`: room_id → [`Room`]; `members`: room_id ‖ 0 ‖ fqid → [`Member`];
//!   `user_rooms`: fqid ‖ 0 ‖ room_id → (), one row per joined member of
//!   any server (a row exactly while its member row says `Join`): the rooms
//!   of one of ours, and whether a peer's participant is joined anywhere.
//! - `events`: room_id ‖ 0 ‖ seq → [`StoredEvent`]; `pending`: room_id ‖ 0 ‖
//!   event_id → [`StoredEvent`] (our events in replica rooms not yet sequenced).
//! - `event_index`: origin ‖ 0 ‖ event_id → [`EventRef`] (dedup).
//! - `outbox`: peer ‖ 0 ‖ id → [`OutboxItem`]: a range scan per peer is its
//!   FIFO queue; ids come from sled's monotonic `generate_id`.
//! - `peers`, `audit` (at_ms ‖ id), `txns` (origin ‖ 0 ‖ txn_id →
//!   [`TxnRecord`]), `txn_times` (at_ms ‖ the `txns` key → (), so answers
//!   past `TXN_CACHE_SECS` are pruned by a range).
//! - `invitations`: target ‖ 0 ‖ room_id ‖ 0 ‖ invite_id → [`Invitation`]
//!   (pending invitations of a local participant, at most one per room:
//!   a participant's list and a room's are prefix scans);
//!   `invite_times`: expires_at_ms ‖ the `invitations` key → (), so the
//!   retention pass deletes expired ones by a range.
//! - `presence`: foreign fqid → [`ForeignPresence`] (newest `ts` wins),
//!   only for a participant with a `user_rooms` row.
//! - `search`: token ‖ 0 ‖ room_id ‖ 0 ‖ seq → () (the inverted index of
//!   message bodies, written with the event).
//!
//! These are the first tenant's trees; another tenant of the instance has
//! the same ones under `tenant/<server_name>/`, and `tenants` lists them
//! (see [`tenants`]).
//!
//! **Invariant:** everything one request changes is planned into one
//! [`WriteSet`], applied by [`Store::commit`] as one transaction, then
//! [`Store::flush`]ed before the answer.

pub mod audit;
pub mod codec;
pub mod disk;
pub mod members;
pub mod migrate;
pub mod outbox;
pub mod participants;
pub mod peers;
pub mod records;
pub mod sync;
pub mod tenants;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{de::DeserializeOwned, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;

pub use records::*;

use crate::config::StorageSync;
use crate::error::{Error, Result};
use crate::limits::{CACHE_CAPACITY_BYTES_DEFAULT, DB_LOCK_WAIT, SLED_CACHE_RESIDENT_FACTOR};

pub use disk::FreeSpace;

/// Make `dir` and everything under it private to this user: 0700 for
/// directories, 0600 for files, whatever the umask was when they were made
/// (SPEC §12: the signing key and all history live here). `main` also sets
/// the umask to 0077, so files made later start private too.
pub(crate) fn make_private(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let set = |path: &Path, mode: u32| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|e| {
            Error::bad_request(format!(
                "cannot make {} private (mode {mode:o}): {e}",
                path.display()
            ))
        })
    };
    set(dir, 0o700)?;
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::bad_request(format!("cannot read {}: {e}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::internal("data dir", e))?;
        let kind = entry
            .file_type()
            .map_err(|e| Error::internal("data dir", e))?;
        if kind.is_dir() {
            make_private(&entry.path())?;
        } else if kind.is_file() {
            set(&entry.path(), 0o600)?;
        }
        // Sockets (the admin socket is made 0600 by its creator) and
        // symlinks are left as they are.
    }
    Ok(())
}

/// Bump when a stored format changes; `open` upgrades the versions
/// [`migrate`] knows and refuses any other.
pub const SCHEMA_VERSION: u32 = 3;

const SEP: u8 = 0;

/// The trees, in the order a transaction sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum T {
    Meta,
    Participants,
    Tokens,
    Rooms,
    Members,
    UserRooms,
    Events,
    Pending,
    EventIndex,
    Outbox,
    Peers,
    Audit,
    Invitations,
    Txns,
    Presence,
    Search,
    TxnTimes,
    InviteTimes,
    /// room ‖ target event_id ‖ seq → [`ReactionRow`]: a page of history
    /// reads the reactions of its own messages only.
    Reactions,
}

const TREE_NAMES: [&str; 19] = [
    "meta",
    "participants",
    "tokens",
    "rooms",
    "members",
    "user_rooms",
    "events",
    "pending",
    "event_index",
    "outbox",
    "peers",
    "audit",
    "invitations",
    "txns",
    "presence",
    "search",
    "txn_times",
    "invite_times",
    "reactions",
];

/// A key made of parts separated by a zero byte (ids never contain one).
pub fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(SEP);
        }
        k.extend_from_slice(p);
    }
    k
}

/// The prefix that a range scan over `owner ‖ 0 ‖ …` uses.
pub fn prefix(owner: &str) -> Vec<u8> {
    let mut k = owner.as_bytes().to_vec();
    k.push(SEP);
    k
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    commits: Arc<CommitCounts>,
    /// Where flush times go (SPEC §16), once a tenant labels its view.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The data dir and its full-disk episode, one per database.
    disk: Arc<disk::Disk>,
    /// The database's flushes, shared by every waiting writer, each with
    /// an `fdatasync` when `storage.sync = "fsync"` (SPEC §11).
    flusher: Arc<sync::GroupFlush>,
}

/// How [`Store::open_with`] opens a database.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// sled's page cache, in bytes (`[storage] cache_capacity`): what the
    /// database may hold in memory.
    pub cache_capacity: u64,
    /// The directory an operator configured (`data_dir`): what messages
    /// about a full disk tell them to free space in.
    pub data_dir: std::path::PathBuf,
    /// What a flush waits for (`[storage] sync`).
    pub sync: StorageSync,
}

/// What [`Store::reads_are_durable`] needs to know: a reader (the delivery
/// loop) can see a commit's rows before the committer's own flush made
/// them durable, and must not send them to a peer until then: a crash in
/// between would let the host give that seq to another event.
#[derive(Default)]
struct CommitCounts {
    /// Commits running now (counted before sled applies them).
    running: AtomicU64,
    /// Commits finished (counted after sled applied them).
    finished: AtomicU64,
    /// `finished` as read when the latest completed flush started: every
    /// one of those commits is durable.
    durable: AtomicU64,
}

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<Error>>;

/// Abort a transaction with a domain error.
#[cfg(test)]
fn abort<T>(e: Error) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

impl Store {
    /// Open (or create) the database in `dir` with the default page cache,
    /// refusing one written by an incompatible version.
    pub fn open(dir: &Path) -> Result<Store> {
        Store::open_with(
            dir,
            &StoreOptions {
                cache_capacity: CACHE_CAPACITY_BYTES_DEFAULT,
                data_dir: dir.to_path_buf(),
                sync: StorageSync::default(),
            },
        )
    }

    /// [`Store::open`] with the configured page cache, naming `data_dir`
    /// when the disk is full.
    pub fn open_with(dir: &Path, options: &StoreOptions) -> Result<Store> {
        let disk = Arc::new(disk::Disk::new(options.data_dir.clone()));
        let db = open_db(dir, options.cache_capacity).map_err(|e| match e {
            sled::Error::Io(ref io) if is_lock_error(io) => Error::bad_request(format!(
                "cannot open the database in {}: {e}; is another scaiwave process using it?",
                dir.display()
            )),
            sled::Error::Io(ref io) if disk::is_disk_full(io) => disk.refused(io),
            e => Error::bad_request(format!(
                "cannot open the database in {}: {e}",
                dir.display()
            )),
        })?;
        let fsync = options.sync == StorageSync::Fsync;
        let flusher = sync::GroupFlush::new(db.clone(), dir, fsync).map_err(|e| {
            Error::bad_request(format!(
                "cannot open {} to fdatasync it (storage.sync = \"fsync\"): {e}",
                dir.join(sync::LOG_FILE).display()
            ))
        })?;
        let mut store = Store {
            db,
            trees: Vec::new(),
            commits: Arc::default(),
            metrics: None,
            disk,
            flusher: Arc::new(flusher),
        };
        store.trees = TREE_NAMES
            .iter()
            .map(|n| store.db.open_tree(n))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| store.sled_err(e))?;
        let meta = store.tree(T::Meta);
        match meta.get(b"schema_version").map_err(|e| store.sled_err(e))? {
            None => {
                meta.insert(b"schema_version", &SCHEMA_VERSION.to_be_bytes())
                    .map_err(|e| store.sled_err(e))?;
            }
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .unwrap_or(0);
                if found == 1 || found == 2 {
                    if found == 1 {
                        migrate::v1_to_v2(&store)?;
                    }
                    migrate::v2_to_v3(&store)?;
                    for (name, _) in store.tenants()? {
                        migrate::v2_to_v3(&store.tenant(&name)?)?;
                    }
                    meta.insert(b"schema_version", &SCHEMA_VERSION.to_be_bytes())
                        .map_err(|e| store.sled_err(e))?;
                    store.flush_blocking()?;
                } else if found != SCHEMA_VERSION {
                    return Err(Error::bad_request(format!(
                        "the database in {} has schema version {found}, this binary reads version {SCHEMA_VERSION}; \
                         run the scaiwave release that wrote it, or restore a backup made for this one",
                        dir.display()
                    )));
                }
            }
        }
        Ok(store)
    }

    fn tree(&self, t: T) -> &sled::Tree {
        &self.trees[t as usize]
    }

    /// A sled failure as callers see it: a full disk (or quota) is
    /// [`Code::StorageFull`], naming the data dir and logged once per
    /// episode; anything else is an internal fault, logged with its cause.
    fn sled_err(&self, e: sled::Error) -> Error {
        match &e {
            sled::Error::Io(io) if disk::is_disk_full(io) => self.disk.refused(io),
            _ => Error::internal("storage", e),
        }
    }

    /// A failed flush: what was written may not be on the disk, so the
    /// write is not answered as accepted (peers retry).
    fn flush_err(&self, f: sync::Failure) -> Error {
        match f {
            sync::Failure::Sled(e) => self.sled_err(e),
            sync::Failure::Fdatasync(e) if disk::is_disk_full(&e) => self.disk.refused(&e),
            sync::Failure::Fdatasync(e) => Error::internal("fdatasync of the database", e),
        }
    }

    /// `fdatasync` calls completed (0 with `storage.sync = "flush"`).
    pub fn syncs(&self) -> u64 {
        self.flusher.fdatasyncs()
    }

    /// After a write failed for a full disk, a sled flush can wait forever
    /// (its log never becomes stable again: seen with sled 0.34 at
    /// shutdown), so none is started; the answer is the same refusal.
    fn refuse_if_full(&self) -> Result<()> {
        if self.disk.is_full() {
            return Err(self.disk.still_full());
        }
        Ok(())
    }

    /// Called once the server stops using the database. sled closes by
    /// flushing when the last handle drops, and after a write failed for a
    /// full disk that flush can wait forever, so the process would never
    /// exit; then this handle is left open (the process ends without sled's
    /// close, as after a crash, which sled recovers from). Nothing is lost:
    /// every accepted write was flushed before it was answered, and the
    /// writes sled could not make were refused.
    pub fn close(&self) {
        if self.disk.is_full() {
            tracing::warn!(
                data_dir = %self.disk.data_dir.display(),
                "the data disk was full: leaving the database without its closing flush (everything accepted is on disk already)"
            );
            std::mem::forget(self.db.clone());
        }
    }

    /// The data disk's room now (for `storage.low_space`, `check`, metrics).
    pub fn free_space(&self) -> std::io::Result<FreeSpace> {
        self.disk.free_space()
    }

    /// The data dir this database lives in, as configured.
    pub fn data_dir(&self) -> &Path {
        &self.disk.data_dir
    }

    /// Whether a write was refused for a full disk since the database was
    /// opened: sled then refuses every later write until a restart.
    pub fn is_full(&self) -> bool {
        self.disk.is_full()
    }

    /// Writes refused for a full disk since the database was opened.
    pub fn full_refusals(&self) -> u64 {
        self.disk.refusals()
    }

    /// Make every write so far durable (sled's flush: see docs/operations.md
    /// for what that means on power loss).
    pub async fn flush(&self) -> Result<()> {
        self.refuse_if_full()?;
        let covered = self.commits.finished.load(Ordering::SeqCst);
        let started = std::time::Instant::now();
        self.flusher.flush().await.map_err(|f| self.flush_err(f))?;
        self.flushed(covered, started);
        Ok(())
    }

    pub fn flush_blocking(&self) -> Result<()> {
        self.refuse_if_full()?;
        let covered = self.commits.finished.load(Ordering::SeqCst);
        let started = std::time::Instant::now();
        self.flusher
            .flush_blocking()
            .map_err(|f| self.flush_err(f))?;
        self.flushed(covered, started);
        Ok(())
    }

    fn flushed(&self, covered: u64, started: std::time::Instant) {
        self.commits.durable.fetch_max(covered, Ordering::SeqCst);
        if let Some(m) = &self.metrics {
            m.storage_flush(started.elapsed());
        }
    }

    /// This view, recording its flushes in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Store {
        self.metrics = Some(metrics);
        self
    }

    /// Whether everything a read made before this call could see is durable.
    /// A commit seen by the read either still runs (then no) or counted
    /// itself finished before it stopped running (then `durable` says).
    pub fn reads_are_durable(&self) -> bool {
        let c = &self.commits;
        c.running.load(Ordering::SeqCst) == 0
            && c.durable.load(Ordering::SeqCst) >= c.finished.load(Ordering::SeqCst)
    }

    /// Make everything reads before this call could see durable: nothing
    /// to do in the common case (every committer flushes right after its
    /// commit), one flush when a read raced a commit.
    pub async fn make_reads_durable(&self) -> Result<()> {
        if self.reads_are_durable() {
            return Ok(());
        }
        self.flush().await
    }

    /// Run `f` as one atomic transaction over every tree. sled may run the
    /// closure again on conflict, so it must only read and write through `tx`.
    fn transact<R>(&self, f: impl Fn(&Tx) -> TxResult<R>) -> Result<R> {
        let trees: Vec<&sled::Tree> = self.trees.iter().collect();
        let out = trees
            .as_slice()
            .transaction(|views: &Vec<TransactionalTree>| {
                let tx = Tx { views };
                f(&tx)
            });
        release_deferred_frees();
        match out {
            Ok(r) => Ok(r),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(self.sled_err(e)),
        }
    }

    pub fn get<V: DeserializeOwned>(&self, t: T, k: &[u8]) -> Result<Option<V>> {
        match self.tree(t).get(k).map_err(|e| self.sled_err(e))? {
            Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    pub fn contains(&self, t: T, k: &[u8]) -> Result<bool> {
        self.tree(t).contains_key(k).map_err(|e| self.sled_err(e))
    }

    /// `result` of one sled write, once the write's deferred frees are
    /// handed on (see [`release_deferred_frees`]).
    fn wrote<R>(&self, result: sled::Result<R>) -> Result<R> {
        release_deferred_frees();
        result.map_err(|e| self.sled_err(e))
    }

    pub fn put<V: Serialize>(&self, t: T, k: &[u8], v: &V) -> Result<()> {
        self.wrote(self.tree(t).insert(k, codec::encode(v)?))?;
        Ok(())
    }

    pub fn remove(&self, t: T, k: &[u8]) -> Result<()> {
        self.wrote(self.tree(t).remove(k))?;
        Ok(())
    }

    /// Every (key, value) under `prefix`, in key order.
    pub fn scan<V: DeserializeOwned>(&self, t: T, prefix: &[u8]) -> Result<Vec<(Vec<u8>, V)>> {
        self.scan_limit(t, prefix, usize::MAX)
    }

    pub fn scan_limit<V: DeserializeOwned>(
        &self,
        t: T,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, V)>> {
        self.decode_all(self.tree(t).scan_prefix(prefix), limit)
    }

    /// Entries under `prefix` with keys after `after`, ascending, at most
    /// `limit`: how a reader walks a queue past rows it already holds.
    pub fn scan_after<V: DeserializeOwned>(
        &self,
        t: T,
        prefix: &[u8],
        after: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, V)>> {
        use std::ops::Bound;
        let iter = self
            .tree(t)
            .range::<&[u8], _>((Bound::Excluded(after), Bound::Unbounded))
            .take_while(|item| item.as_ref().map_or(true, |(k, _)| k.starts_with(prefix)));
        self.decode_all(iter, limit)
    }

    /// Values with keys in `[from, to)`, ascending, at most `limit`.
    pub fn range<V: DeserializeOwned>(
        &self,
        t: T,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, V)>> {
        self.decode_all(self.tree(t).range(from.to_vec()..to.to_vec()), limit)
    }

    /// Entries with keys in `[from, to)`, ascending, for as long as `keep`
    /// says so: a reader that stops on what it found reads no further.
    pub fn range_while<V: DeserializeOwned>(
        &self,
        t: T,
        from: &[u8],
        to: &[u8],
        mut keep: impl FnMut(&[u8], V) -> bool,
    ) -> Result<()> {
        for item in self.tree(t).range(from.to_vec()..to.to_vec()) {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            if !keep(&k, codec::decode(&v)?) {
                break;
            }
        }
        Ok(())
    }

    /// Values with keys in `[from, to)`, descending, at most `limit`.
    pub fn range_rev<V: DeserializeOwned>(
        &self,
        t: T,
        from: &[u8],
        to: &[u8],
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, V)>> {
        self.decode_all(self.tree(t).range(from.to_vec()..to.to_vec()).rev(), limit)
    }

    /// The posting block under `prefix` (see [`keys::postings_of`]) whose
    /// first seq is the greatest at or before `seq`: its seqs, ascending.
    /// One seek.
    pub fn posting_block(&self, prefix: &[u8], seq: u64) -> Result<Option<Vec<u64>>> {
        let to = keys::posting_block(prefix, seq);
        let Some(item) = self
            .tree(T::Search)
            .range(prefix..=to.as_slice())
            .next_back()
        else {
            return Ok(None);
        };
        let (k, v) = item.map_err(|e| self.sled_err(e))?;
        // An empty value is a schema-3 posting: a block of its key's seq.
        let block = if v.is_empty() {
            PostingBlock::default()
        } else {
            codec::decode::<PostingBlock>(&v)?
        };
        Ok(Some(block.seqs(keys::trailing_u64(&k))))
    }

    pub fn count_prefix(&self, t: T, prefix: &[u8]) -> usize {
        self.tree(t).scan_prefix(prefix).count()
    }

    /// The oldest entry under `prefix` (FIFO head).
    pub fn first<V: DeserializeOwned>(&self, t: T, prefix: &[u8]) -> Result<Option<(Vec<u8>, V)>> {
        Ok(self.scan_limit(t, prefix, 1)?.into_iter().next())
    }

    /// Remove every key in the list, one at a time (see [`Store::put_many`]).
    pub fn remove_all(&self, t: T, keys: &[Vec<u8>]) -> Result<()> {
        let tree = self.tree(t);
        self.wrote(
            keys.iter()
                .try_for_each(|k| tree.remove(k.as_slice()).map(drop)),
        )
    }

    pub fn generate_id(&self) -> Result<u64> {
        self.db.generate_id().map_err(|e| self.sled_err(e))
    }

    /// Insert many values, one at a time: for rows that need no atomicity
    /// as a group (a replica's search postings). A sled batch would take
    /// sled's process-wide write lock, which waits for any running flush
    /// (disk time) while every other reader and writer waits behind it;
    /// single inserts share that lock with flushes.
    pub fn put_many<V: Serialize>(&self, t: T, items: &[(Vec<u8>, V)]) -> Result<()> {
        let tree = self.tree(t);
        let inserted = items.iter().try_for_each(|(k, v)| {
            tree.insert(k.as_slice(), codec::encode(v)?)
                .map(drop)
                .map_err(|e| self.sled_err(e))
        });
        release_deferred_frees();
        inserted
    }

    /// Remove every key in `[from, to)`; answers how many went.
    pub fn remove_range(&self, t: T, from: &[u8], to: &[u8]) -> Result<usize> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in self.tree(t).range(from.to_vec()..to.to_vec()).keys() {
            batch.remove(item.map_err(|e| self.sled_err(e))?);
            n += 1;
        }
        self.wrote(self.tree(t).apply_batch(batch))?;
        Ok(n)
    }

    /// Cache a `/send` answer, with its row in the time index that
    /// [`Store::prune_txns`] walks. The index row goes first: a crash in
    /// between leaves an index row without its answer (pruning skips it),
    /// never an answer that no pruning would find.
    pub fn put_txn(&self, origin: &str, txn_id: &str, record: &TxnRecord) -> Result<()> {
        let k = keys::txn(origin, txn_id);
        self.put(T::TxnTimes, &keys::time_prefixed(record.at_ms, &k), &())?;
        self.put(T::Txns, &k, record)
    }

    /// Drop cached `/send` answers made before `cutoff_ms`: a range of the
    /// time index, never a scan of the cache. Answers how many went.
    pub fn prune_txns(&self, cutoff_ms: i64) -> Result<usize> {
        // The same txn cached again later has a newer index row; an old one
        // must not take the new answer with it.
        self.prune_by_time(T::TxnTimes, T::Txns, cutoff_ms, |bytes| {
            Ok(codec::decode::<TxnRecord>(bytes)?.at_ms < cutoff_ms)
        })
    }

    /// Walk the time index `index` (ms ‖ key of `rows`) up to `before_ms`,
    /// removing every index row, and each row of `rows` that `due` says is
    /// still due (an index row can outlive its row, or precede a newer
    /// version of it). Answers how many rows went.
    fn prune_by_time(
        &self,
        index: T,
        rows: T,
        before_ms: i64,
        due: impl Fn(&[u8]) -> Result<bool>,
    ) -> Result<usize> {
        let end = keys::time_prefixed(before_ms, &[]);
        let mut n = 0;
        for item in self.tree(index).range(..end).keys() {
            let index_key = item.map_err(|e| self.sled_err(e))?;
            let row_key = &index_key[8..];
            if let Some(bytes) = self.tree(rows).get(row_key).map_err(|e| self.sled_err(e))? {
                if due(&bytes)? {
                    self.tree(rows)
                        .remove(row_key)
                        .map_err(|e| self.sled_err(e))?;
                    n += 1;
                }
            }
            self.tree(index)
                .remove(&index_key)
                .map_err(|e| self.sled_err(e))?;
        }
        Ok(n)
    }

    /// The stored invitations of `target` (expired ones too, until the
    /// retention pass deletes them): a prefix scan of theirs alone.
    pub fn invitations_of(&self, target: &str) -> Result<Vec<Invitation>> {
        Ok(self
            .scan::<Invitation>(T::Invitations, &prefix(target))?
            .into_iter()
            .map(|(_, i)| i)
            .collect())
    }

    /// The stored invitations of `target` to `room_id`.
    pub fn invitations_to_room(&self, target: &str, room_id: &str) -> Result<Vec<Invitation>> {
        Ok(self
            .scan::<Invitation>(T::Invitations, &keys::invitations_to_room(target, room_id))?
            .into_iter()
            .map(|(_, i)| i)
            .collect())
    }

    /// Remove one invitation outside a write set: the row first, then its
    /// index row, so a crash leaves at worst an index row pruning skips.
    pub fn remove_invitation(&self, inv: &Invitation) -> Result<()> {
        let k = keys::invitation(&inv.target, &inv.room_id, &inv.invite_id);
        self.remove(T::Invitations, &k)?;
        self.remove(T::InviteTimes, &keys::time_prefixed(inv.expires_at_ms, &k))
    }

    /// Delete invitations that expired at or before `now_ms`: a range of
    /// the expiry index, never a scan of the invitations. Answers how many
    /// went.
    pub fn prune_invitations(&self, now_ms: i64) -> Result<usize> {
        // An index row can outlive its invitation (answered, replaced, or a
        // crash between the two removals); only an expired one goes.
        self.prune_by_time(
            T::InviteTimes,
            T::Invitations,
            now_ms.saturating_add(1),
            |bytes| Ok(codec::decode::<Invitation>(bytes)?.expires_at_ms <= now_ms),
        )
    }

    /// Apply a planned [`WriteSet`] as one atomic transaction.
    pub fn commit(&self, writes: &WriteSet) -> Result<()> {
        if writes.ops.is_empty() {
            return Ok(());
        }
        let c = &self.commits;
        c.running.fetch_add(1, Ordering::SeqCst);
        let applied = self.transact(|tx| {
            for (t, k, v) in &writes.ops {
                match v {
                    Some(bytes) => {
                        tx.view(*t).insert(k.as_slice(), bytes.as_slice())?;
                    }
                    None => {
                        tx.view(*t).remove(k.as_slice())?;
                    }
                }
            }
            Ok(())
        });
        // Finished before no longer running: a reader that sees `running`
        // at zero sees this commit counted.
        c.finished.fetch_add(1, Ordering::SeqCst);
        c.running.fetch_sub(1, Ordering::SeqCst);
        applied
    }
}

/// Writes planned outside a transaction (under the room locks that make the
/// plan consistent) and applied together by [`Store::commit`]. Values are
/// encoded when added, so a sled retry re-applies bytes, not logic.
#[derive(Default, Debug)]
pub struct WriteSet {
    ops: Vec<(T, Vec<u8>, Option<Vec<u8>>)>,
}

impl WriteSet {
    /// Add every write of `other` after this set's own.
    pub fn append(&mut self, other: WriteSet) {
        self.ops.extend(other.ops);
    }

    pub fn put<V: Serialize>(&mut self, t: T, k: Vec<u8>, v: &V) -> Result<()> {
        self.ops.push((t, k, Some(codec::encode(v)?)));
        Ok(())
    }

    pub fn remove(&mut self, t: T, k: Vec<u8>) {
        self.ops.push((t, k, None));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// An invitation with its row in the expiry index.
    pub fn put_invitation(&mut self, inv: &Invitation) -> Result<()> {
        let k = keys::invitation(&inv.target, &inv.room_id, &inv.invite_id);
        self.put(
            T::InviteTimes,
            keys::time_prefixed(inv.expires_at_ms, &k),
            &(),
        )?;
        self.put(T::Invitations, k, inv)
    }

    pub fn remove_invitation(&mut self, inv: &Invitation) {
        let k = keys::invitation(&inv.target, &inv.room_id, &inv.invite_id);
        self.remove(T::InviteTimes, keys::time_prefixed(inv.expires_at_ms, &k));
        self.remove(T::Invitations, k);
    }
}

impl Store {
    /// Decode up to `limit` entries of a sled iterator.
    fn decode_all<V: DeserializeOwned>(
        &self,
        iter: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, V)>> {
        let mut out = Vec::new();
        for item in iter.take(limit) {
            let (k, v) = item.map_err(|e| self.sled_err(e))?;
            out.push((k.to_vec(), codec::decode(&v)?));
        }
        Ok(out)
    }
}

/// A view of every tree inside one transaction.
struct Tx<'a> {
    views: &'a Vec<TransactionalTree>,
}

impl Tx<'_> {
    fn view(&self, t: T) -> &TransactionalTree {
        &self.views[t as usize]
    }

    #[cfg(test)]
    fn put<V: Serialize>(&self, t: T, k: &[u8], v: &V) -> TxResult<()> {
        let bytes = match codec::encode(v) {
            Ok(b) => b,
            Err(e) => return abort(e),
        };
        self.view(t).insert(k, bytes)?;
        Ok(())
    }
}

// Typed keys, so the layout above is written down once.
pub mod keys {
    use super::key;

    pub fn member(room_id: &str, fqid: &str) -> Vec<u8> {
        key(&[room_id.as_bytes(), fqid.as_bytes()])
    }
    pub fn user_room(fqid: &str, room_id: &str) -> Vec<u8> {
        key(&[fqid.as_bytes(), room_id.as_bytes()])
    }
    pub fn event(room_id: &str, seq: u64) -> Vec<u8> {
        key(&[room_id.as_bytes(), &seq.to_be_bytes()])
    }
    pub fn pending(room_id: &str, event_id: &str) -> Vec<u8> {
        key(&[room_id.as_bytes(), event_id.as_bytes()])
    }
    pub fn reaction(room_id: &str, target: &str, seq: u64) -> Vec<u8> {
        key(&[room_id.as_bytes(), target.as_bytes(), &seq.to_be_bytes()])
    }
    /// Every reaction row of `target`, in seq order.
    pub fn reactions_of(room_id: &str, target: &str) -> Vec<u8> {
        let mut k = key(&[room_id.as_bytes(), target.as_bytes()]);
        k.push(super::SEP);
        k
    }
    pub fn event_index(origin: &str, event_id: &str) -> Vec<u8> {
        key(&[origin.as_bytes(), event_id.as_bytes()])
    }
    pub fn outbox(peer: &str, id: u64) -> Vec<u8> {
        key(&[peer.as_bytes(), &id.to_be_bytes()])
    }
    pub fn audit(at_ms: i64, id: u64) -> Vec<u8> {
        time_prefixed(at_ms, &id.to_be_bytes())
    }
    /// Every posting block of `token` in `room_id`, in seq order.
    pub fn postings_of(token: &str, room_id: &str) -> Vec<u8> {
        let mut k = key(&[token.as_bytes(), room_id.as_bytes()]);
        k.push(super::SEP);
        k
    }
    /// The block under `postings` (a [`postings_of`] prefix) whose first
    /// seq is `first`.
    pub fn posting_block(postings: &[u8], first: u64) -> Vec<u8> {
        let mut k = postings.to_vec();
        k.extend_from_slice(&first.to_be_bytes());
        k
    }
    /// The trailing big-endian u64 of an `events` or `outbox` key.
    pub fn trailing_u64(k: &[u8]) -> u64 {
        k.len()
            .checked_sub(8)
            .and_then(|i| <[u8; 8]>::try_from(&k[i..]).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0)
    }
    pub fn invitation(target: &str, room_id: &str, invite_id: &str) -> Vec<u8> {
        key(&[target.as_bytes(), room_id.as_bytes(), invite_id.as_bytes()])
    }
    /// Every invitation of `target` to `room_id` (at most one is kept).
    pub fn invitations_to_room(target: &str, room_id: &str) -> Vec<u8> {
        let mut k = key(&[target.as_bytes(), room_id.as_bytes()]);
        k.push(super::SEP);
        k
    }
    pub fn txn(origin: &str, txn_id: &str) -> Vec<u8> {
        key(&[origin.as_bytes(), txn_id.as_bytes()])
    }
    /// A time index row: ms (big-endian, so time sorts) ‖ `rest`, the key
    /// of the row it indexes: `invite_times` is expires_at_ms ‖ an
    /// `invitations` key, `txn_times` at_ms ‖ a `txns` key.
    pub fn time_prefixed(ms: i64, rest: &[u8]) -> Vec<u8> {
        let mut k = (ms.max(0) as u64).to_be_bytes().to_vec();
        k.extend_from_slice(rest);
        k
    }
}

/// Hands this thread's deferred frees to sled's collector and lets it
/// free what no reader can see any more.
///
/// sled 0.34 frees what it replaces (old versions of a node, and the
/// 512 KiB log buffer of each segment it fills) through crossbeam's epoch
/// collector, which keeps up to 64 deferred frees in a bag per thread and
/// hands a bag on only once it is full. Commits and flushes run on many
/// threads (tokio's workers and its blocking pool), each sitting on a bag
/// that pins up to 64 buffers: at 200 000 events ingested that was 200 MB
/// of the heap (heaptrack: `maybe_seal_and_write_iobuf`), at any count
/// about 32 MB per thread that ever wrote. Called after every write and
/// flush, the bags hold only what is in flight.
pub(crate) fn release_deferred_frees() {
    crossbeam_epoch::pin().flush();
}

/// Opens sled, waiting a moment for the lock of a database just closed:
/// sled's background threads release it some time after the last handle
/// drops, so a restart (a systemd `Restart=`, or a test reopening a store)
/// would otherwise find its own previous life still holding the file.
///
/// `cache_capacity` is what the operator means: resident memory. sled
/// counts its cache in serialized bytes, which take more once in memory,
/// so it is given the configured figure divided by that factor.
fn open_db(dir: &Path, cache_capacity: u64) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + DB_LOCK_WAIT;
    loop {
        remove_unfinished_snapshots(dir);
        match sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity / SLED_CACHE_RESIDENT_FACTOR)
            .open()
        {
            Err(sled::Error::Io(e))
                if is_lock_error(&e) && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// sled reports a held lock as an `Other` io error with this text.
fn is_lock_error(e: &std::io::Error) -> bool {
    e.to_string().starts_with("could not acquire lock")
}

/// sled 0.34 writes a snapshot to `snap.<lsn>.generating` and renames it
/// once complete, but its reader takes any `snap.*` file, so one whose
/// write failed (a full disk, at start or when the database closed) makes
/// every later open fail with "corruption" although no data is damaged.
/// Such a file says nothing the log and the complete snapshot beside it do
/// not, so it goes: only while we hold the database's lock (sled's own
/// `flock` of `<dir>/db`), so never under a running sled.
fn remove_unfinished_snapshots(dir: &Path) {
    use std::os::fd::AsRawFd;
    let Ok(lock) = std::fs::File::open(dir.join("db")) else {
        return; // no database yet, so no snapshot either
    };
    // SAFETY: a valid open descriptor; the lock goes with `lock`.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return; // held: sled's open will say so
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::warn!(
                    name: "storage.unfinished_snapshot",
                    path = %entry.path().display(),
                    "removed a snapshot file sled did not finish writing (the disk was full); its data is in the log"
                ),
                Err(e) => tracing::warn!(
                    path = %entry.path().display(),
                    error = %e,
                    "cannot remove an unfinished sled snapshot; opening the database may report corruption until it is removed"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_other_schema_versions() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .tree(T::Meta)
                .insert(b"schema_version", &99u32.to_be_bytes())
                .unwrap();
            store.flush_blocking().unwrap();
        }
        let err = Store::open(dir.path()).err().expect("must refuse");
        assert!(err.message.contains("schema version 99"), "{}", err.message);
    }

    #[test]
    fn a_database_in_use_is_refused_and_one_just_closed_opens() {
        let dir = tempfile::tempdir().unwrap();
        let held = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().expect("must refuse");
        assert!(
            err.message
                .contains("is another scaiwave process using it?"),
            "{}",
            err.message
        );
        drop(held);
        Store::open(dir.path()).expect("the lock is released after close");
    }

    fn opened(dir: &Path, sync: StorageSync) -> Store {
        Store::open_with(
            dir,
            &StoreOptions {
                cache_capacity: CACHE_CAPACITY_BYTES_DEFAULT,
                data_dir: dir.to_path_buf(),
                sync,
            },
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_sync_fsync_every_flush_waits_for_a_shared_fdatasync() {
        let dir = tempfile::tempdir().unwrap();
        let store = opened(dir.path(), StorageSync::Fsync);
        store
            .put(T::Peers, b"b.test", &PeerRecord::default())
            .unwrap();
        store.flush().await.unwrap();
        assert_eq!(store.syncs(), 1);
        store.flush_blocking().unwrap();
        assert_eq!(store.syncs(), 2);
        // Many writers flushing at once share syncs (group commit), and
        // every one of them waited for one.
        let before = store.syncs();
        let writers: Vec<_> = (0..32u32)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store
                        .put(T::Peers, format!("p{i}").as_bytes(), &PeerRecord::default())
                        .unwrap();
                    store.flush().await.unwrap();
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        let used = store.syncs() - before;
        assert!((1..32).contains(&used), "32 flushes took {used} syncs");
        // A tenant's view shares its database's syncs.
        let tenant = store
            .tenant(&crate::ids::ServerName::parse("t.test").unwrap())
            .unwrap();
        tenant.flush().await.unwrap();
        assert_eq!(store.syncs(), before + used + 1);
    }

    #[tokio::test]
    async fn with_sync_flush_no_fdatasync_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let store = opened(dir.path(), StorageSync::Flush);
        store
            .put(T::Peers, b"b.test", &PeerRecord::default())
            .unwrap();
        store.flush().await.unwrap();
        store.flush_blocking().unwrap();
        assert_eq!(store.syncs(), 0);
    }

    #[test]
    fn a_snapshot_left_unfinished_by_a_full_disk_does_not_block_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let held = Store::open(dir.path()).unwrap();
        held.put(T::Peers, b"b.test", &PeerRecord::default())
            .unwrap();
        held.flush_blocking().unwrap();
        // What a snapshot write that hit ENOSPC leaves: sled 0.34 reads it
        // as the newest snapshot and reports corruption.
        let unfinished = dir.path().join("snap.FFFFFFFFFFFFFFFF.generating");
        std::fs::write(&unfinished, b"").unwrap();
        // Never touched under a running database.
        assert!(Store::open(dir.path()).is_err());
        assert!(unfinished.exists(), "removed while the lock was held");
        drop(held);
        let store = Store::open(dir.path()).expect("opens once the file is gone");
        assert!(!unfinished.exists());
        assert!(store.contains(T::Peers, b"b.test").unwrap());
    }

    #[test]
    fn transaction_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let r: Result<()> = store.transact(|tx| {
            tx.put(T::Peers, b"a", &PeerRecord::default())?;
            abort(Error::bad_request("stop"))
        });
        assert!(r.is_err());
        assert!(store.get::<PeerRecord>(T::Peers, b"a").unwrap().is_none());
    }

    #[tokio::test]
    async fn a_commit_is_not_durable_to_readers_until_a_flush_covers_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.reads_are_durable(), "nothing committed yet");
        let mut w = WriteSet::default();
        w.put(T::Peers, b"a".to_vec(), &PeerRecord::default())
            .unwrap();
        store.commit(&w).unwrap();
        assert!(!store.reads_are_durable(), "committed, not flushed");
        store.make_reads_durable().await.unwrap();
        assert!(store.reads_are_durable());
        // A flush that started before a commit finished does not cover it.
        let covered = store.commits.finished.load(Ordering::SeqCst);
        store.commit(&w).unwrap();
        store.commits.durable.fetch_max(covered, Ordering::SeqCst);
        assert!(!store.reads_are_durable());
        store.flush_blocking().unwrap();
        assert!(store.reads_are_durable());
    }

    #[test]
    fn old_txn_answers_are_pruned_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let at = |at_ms| TxnRecord {
            at_ms,
            answer: b"{}".to_vec(),
        };
        store.put_txn("b.test", "old", &at(1_000)).unwrap();
        store.put_txn("b.test", "new", &at(5_000)).unwrap();
        // Cached again later: its first index row must not prune it.
        store.put_txn("b.test", "again", &at(1_500)).unwrap();
        store.put_txn("b.test", "again", &at(6_000)).unwrap();
        assert_eq!(store.prune_txns(2_000).unwrap(), 1);
        let has = |id| store.contains(T::Txns, &keys::txn("b.test", id)).unwrap();
        assert!(!has("old") && has("new") && has("again"));
        assert_eq!(store.count_prefix(T::TxnTimes, b""), 2);
    }

    #[test]
    fn event_keys_sort_by_seq() {
        assert!(keys::event("!r", 2) < keys::event("!r", 10));
        assert!(keys::outbox("p", 255) < keys::outbox("p", 256));
    }
}

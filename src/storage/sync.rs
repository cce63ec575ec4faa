//! What "accepted" waits for (SPEC §11): one flush of the database,
//! shared by every request waiting for one (group commit).
//!
//! A flush is sled's flush (on Linux `sync_file_range`: the data reaches
//! the device, but neither the drive's cache nor the file's metadata is
//! flushed: it survives a crash of the process) and, with
//! `storage.sync = "fsync"`, an `fdatasync` of sled's log file after it,
//! which survives a power cut.
//!
//! A request waits for a flush that *began after its commit finished*.
//! Flushes run one at a time on tokio's blocking pool; every request that
//! committed while one ran shares the next, so N requests waiting together
//! cost one flush, not N. (This also keeps sled's own `flush_async` out:
//! with 32 of those at once, all of sled's I/O threads waited for a
//! stability that only those threads could bring, and nothing moved.)

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The file sled writes its log to, inside the database directory.
pub const LOG_FILE: &str = "db";
/// Where sled writes a page too large for its log, one file per page
/// (named by its log sequence number), without syncing it. Its snapshots
/// and config it writes with `sync_all` itself.
pub const BLOB_DIR: &str = "blobs";

/// Why a flush failed.
pub enum Failure {
    Sled(sled::Error),
    Fdatasync(std::io::Error),
}

pub struct GroupFlush {
    db: sled::Db,
    /// What an `fdatasync` covers, with `storage.sync = "fsync"`.
    files: Option<Arc<Files>>,
    shared: Arc<Shared>,
}

/// What waiters and the running flush share. The flush holds its own
/// reference: it ends (and wakes the waiters) even when the caller that
/// started it is gone.
#[derive(Default)]
struct Shared {
    state: std::sync::Mutex<State>,
    /// Woken when a flush ends.
    done: tokio::sync::Notify,
    fdatasyncs: AtomicU64,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Three integers, consistent after every statement.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The flush that runs, ended when this is dropped: after it ran, or when
/// it never could (a runtime shutting down drops a blocking job unrun, a
/// panic unwinds through it). A future is dropped at any `.await` (a
/// request whose client went away, a task cancelled at shutdown); were the
/// end of a flush left to the caller that started it, every later caller
/// would wait for a flush nobody runs, and shutdown's last flush with them.
struct Running {
    shared: Arc<Shared>,
    succeeded: bool,
    fsync: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut st = self.shared.state();
        st.running = false;
        if self.succeeded {
            st.finished = st.started;
            if self.fsync {
                self.shared.fdatasyncs.fetch_add(1, Ordering::SeqCst);
            }
        }
        drop(st);
        // A failed flush wakes the others too: one of them tries again.
        self.shared.done.notify_waiters();
    }
}

/// sled's log, and its blob files: those newer than `blobs_synced` are
/// synced (with their directory) after each flush.
struct Files {
    log: File,
    blob_dir: std::path::PathBuf,
    blobs_synced: std::sync::Mutex<u64>,
}

impl Files {
    fn sync(&self) -> std::io::Result<()> {
        self.log.sync_data()?;
        let mut synced = self.blobs_synced.lock().unwrap_or_else(|p| p.into_inner());
        let mut newest = *synced;
        let entries = match std::fs::read_dir(&self.blob_dir) {
            Ok(e) => e,
            // No blob was ever written.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if id > *synced {
                File::open(entry.path())?.sync_data()?;
                newest = newest.max(id);
            }
        }
        if newest > *synced {
            File::open(&self.blob_dir)?.sync_all()?;
            *synced = newest;
        }
        Ok(())
    }
}

/// Flushes are numbered in the order they begin; one runs at a time.
#[derive(Default)]
struct State {
    started: u64,
    finished: u64,
    running: bool,
}

impl GroupFlush {
    /// Flushes of `db`, in `dir`; with `fsync`, each followed by an
    /// `fdatasync` of its log file, whose directory entry is made durable
    /// here once (a power cut right after creating the database would
    /// otherwise lose the file itself).
    pub fn new(db: sled::Db, dir: &Path, fsync: bool) -> std::io::Result<GroupFlush> {
        let files = match fsync {
            false => None,
            true => {
                let log = File::open(dir.join(LOG_FILE))?;
                File::open(dir)?.sync_all()?;
                Some(Arc::new(Files {
                    log,
                    blob_dir: dir.join(BLOB_DIR),
                    blobs_synced: std::sync::Mutex::new(0),
                }))
            }
        };
        Ok(GroupFlush {
            db,
            files,
            shared: Arc::default(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state()
    }

    /// Return once a flush that began after this call has completed.
    pub async fn flush(&self) -> Result<(), Failure> {
        // Flushes numbered below `need` may have begun before the
        // caller's commit ended; that one cannot have.
        let need = self.state().started + 1;
        loop {
            let mut wait = std::pin::pin!(self.shared.done.notified());
            {
                let mut st = self.state();
                if st.finished >= need {
                    return Ok(());
                }
                if !st.running {
                    st.running = true;
                    st.started += 1;
                    break;
                }
                // Registered before the lock is released, so the wake-up
                // from the running flush cannot be missed.
                wait.as_mut().enable();
            }
            wait.await;
        }
        let running = Running {
            shared: self.shared.clone(),
            succeeded: false,
            fsync: self.files.is_some(),
        };
        let (db, files) = (self.db.clone(), self.files.clone());
        tokio::task::spawn_blocking(move || {
            // The whole guard moves in (a closure would capture only the
            // field it sets, and the guard would end with the caller).
            let mut running = running;
            let result = flush_once(&db, files.as_deref());
            running.succeeded = result.is_ok();
            result
        })
        .await
        .unwrap_or_else(|e| Err(Failure::Fdatasync(std::io::Error::other(e))))
    }

    /// A flush of its own, for callers outside async code (the CLI
    /// opening the database directly, shutdown); no async waiter counts
    /// on it.
    pub fn flush_blocking(&self) -> Result<(), Failure> {
        flush_once(&self.db, self.files.as_deref())?;
        if self.files.is_some() {
            self.shared.fdatasyncs.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// `fdatasync` calls completed: 0 with `storage.sync = "flush"`.
    pub fn fdatasyncs(&self) -> u64 {
        self.shared.fdatasyncs.load(Ordering::SeqCst)
    }
}

fn flush_once(db: &sled::Db, files: Option<&Files>) -> Result<(), Failure> {
    let flushed = db.flush();
    super::release_deferred_frees();
    flushed.map_err(Failure::Sled)?;
    if let Some(files) = files {
        files.sync().map_err(Failure::Fdatasync)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database(fsync: bool) -> (tempfile::TempDir, GroupFlush) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let group = GroupFlush::new(db, dir.path(), fsync).unwrap();
        (dir, group)
    }

    #[tokio::test]
    async fn a_flush_alone_is_one_fdatasync() {
        let (_dir, group) = database(true);
        assert!(group.flush().await.is_ok());
        assert!(group.flush().await.is_ok());
        assert_eq!(
            group.fdatasyncs(),
            2,
            "a later caller never rides an earlier flush"
        );
        assert!(group.flush_blocking().is_ok());
        assert_eq!(group.fdatasyncs(), 3);
    }

    #[tokio::test]
    async fn without_fsync_there_is_no_fdatasync() {
        let (_dir, group) = database(false);
        assert!(group.flush().await.is_ok());
        assert!(group.flush_blocking().is_ok());
        assert_eq!(group.fdatasyncs(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn callers_waiting_together_share_flushes() {
        let (_dir, group) = database(true);
        let group = Arc::new(group);
        let waiters: Vec<_> = (0..64)
            .map(|_| {
                let group = group.clone();
                tokio::spawn(async move { group.flush().await.is_ok() })
            })
            .collect();
        for w in waiters {
            assert!(w.await.unwrap());
        }
        let n = group.fdatasyncs();
        assert!(
            (1..64).contains(&n),
            "64 concurrent callers took {n} flushes"
        );
    }

    #[tokio::test]
    async fn a_flush_that_began_before_the_caller_does_not_count() {
        let (_dir, group) = database(true);
        // A flush is running (begun, not finished) when this caller
        // arrives: it waits for that one, then runs the next itself.
        {
            let mut st = group.state();
            st.started = 1;
            st.running = true;
        }
        let mut waiter = std::pin::pin!(group.flush());
        assert!(futures_util::poll!(waiter.as_mut()).is_pending());
        {
            let mut st = group.state();
            st.running = false;
            st.finished = 1;
        }
        group.shared.done.notify_waiters();
        assert!(waiter.await.is_ok());
        assert_eq!(group.state().finished, 2, "it ran a flush of its own");
        assert_eq!(group.fdatasyncs(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_gone_mid_flush_leaves_nobody_waiting() {
        let (_dir, group) = database(true);
        // This caller starts the flush, then is dropped at its `.await`,
        // as a request is when its client goes away.
        {
            let mut first = std::pin::pin!(group.flush());
            assert!(futures_util::poll!(first.as_mut()).is_pending());
            assert!(group.state().running);
        }
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), group.flush());
        assert!(
            matches!(next.await, Ok(Ok(()))),
            "a later caller waited for a flush nobody ran"
        );
        assert!(!group.state().running);
        assert_eq!(group.fdatasyncs(), 2, "the orphaned flush still ran");
    }

    #[tokio::test]
    async fn a_page_too_big_for_the_log_is_synced_as_its_blob_file() {
        let (dir, group) = database(true);
        // One value larger than a log buffer (segment size / items):
        // sled writes it to blobs/<lsn>.
        group.db.insert(b"big", vec![7u8; 300 * 1024]).unwrap();
        assert!(group.flush().await.is_ok());
        let blobs: Vec<_> = std::fs::read_dir(dir.path().join(BLOB_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            !blobs.is_empty(),
            "sled wrote no blob: the test proves nothing"
        );
        let files = group.files.as_ref().unwrap();
        let synced = *files.blobs_synced.lock().unwrap();
        let newest = blobs
            .iter()
            .filter_map(|n| n.to_str()?.parse::<u64>().ok())
            .max()
            .unwrap();
        assert_eq!(synced, newest, "every blob up to the newest was synced");
    }

    #[test]
    fn fsync_needs_the_log_file() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        assert!(GroupFlush::new(db, dir.path(), true).is_err());
    }
}

//! The data disk: how much room is left on it, and what a full one looks
//! like to the rest of the server.
//!
//! sled reports a full disk as `sled::Error::Io` of kind `StorageFull`
//! (ENOSPC; a quota gives EDQUOT, `QuotaExceeded`), but it wraps the
//! operating system's error in one of its own, so the raw errno is often
//! gone and only the kind survives. After the first failed write sled
//! keeps that error for good: every later write and flush of the same
//! process fails with it, even once space is free again; reads still
//! work. Writes resume only when the database is opened again (a restart),
//! and everything flushed before the failure is still there then. So a
//! full disk is an episode that starts with the first refused write and
//! ends with the process: [`Disk`] logs it once (`storage.full`) and counts
//! the refusals, and every refused write answers [`Code::StorageFull`].

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::{Code, Error};
use crate::limits::{DISK_LOW_SPACE_BYTES, DISK_LOW_SPACE_PERCENT};

/// Room on the filesystem that holds the data dir, as an unprivileged
/// process sees it (`f_bavail`: blocks reserved for root are not ours).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreeSpace {
    pub available_bytes: u64,
    pub total_bytes: u64,
}

impl FreeSpace {
    /// Below [`DISK_LOW_SPACE_PERCENT`] of the disk or below
    /// [`DISK_LOW_SPACE_BYTES`], whichever is more: the percentage gives a
    /// big disk's operator days to react, the floor keeps room for sled's
    /// segment rewrites on a small one.
    pub fn is_low(&self) -> bool {
        let percent = self.total_bytes / 100 * DISK_LOW_SPACE_PERCENT
            + self.total_bytes % 100 * DISK_LOW_SPACE_PERCENT / 100;
        self.available_bytes < percent.max(DISK_LOW_SPACE_BYTES)
    }
}

/// The room left on the filesystem holding `dir`.
pub fn free_space(dir: &Path) -> io::Result<FreeSpace> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `path` is a NUL-terminated string that outlives the call, and
    // `stat` is a plain struct statvfs fills in.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let block = stat.f_frsize as u64;
    Ok(FreeSpace {
        available_bytes: (stat.f_bavail as u64).saturating_mul(block),
        total_bytes: (stat.f_blocks as u64).saturating_mul(block),
    })
}

/// Whether an io error means the disk (or the user's quota) is full, in
/// the form the OS gives it or the form sled re-wraps it in.
pub fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// The message of every [`Code::StorageFull`] answer.
pub fn full_message(data_dir: &Path) -> String {
    format!(
        "the data disk is full; free space in {} (writes resume after scaiwave restarts)",
        data_dir.display()
    )
}

/// The data dir of one database and its full-disk episode, shared by every
/// tenant's view of it.
#[derive(Debug)]
pub struct Disk {
    /// The directory operators configured (`data_dir`), named in messages.
    pub data_dir: PathBuf,
    full: AtomicBool,
    refusals: AtomicU64,
}

impl Disk {
    pub fn new(data_dir: PathBuf) -> Disk {
        Disk {
            data_dir,
            full: AtomicBool::new(false),
            refusals: AtomicU64::new(0),
        }
    }

    /// A write refused because the disk is full: logged once per episode
    /// (one line, however many requests follow), counted every time.
    pub fn refused(&self, cause: &io::Error) -> Error {
        self.refusals.fetch_add(1, Ordering::Relaxed);
        if !self.full.swap(true, Ordering::SeqCst) {
            tracing::error!(
                name: "storage.full",
                data_dir = %self.data_dir.display(),
                %cause,
                "storage.full: the data disk is full; writes are refused with SW_STORAGE_FULL \
                 until space is freed and scaiwave restarts (everything accepted before is kept)"
            );
        }
        Error::new(Code::StorageFull, full_message(&self.data_dir))
    }

    /// The refusal of a write not even tried because an earlier one was
    /// refused (counted; the episode is logged already).
    pub fn still_full(&self) -> Error {
        self.refusals.fetch_add(1, Ordering::Relaxed);
        Error::new(Code::StorageFull, full_message(&self.data_dir))
    }

    /// Whether a write has been refused for a full disk since this process
    /// opened the database (sled refuses every later one too).
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::SeqCst)
    }

    /// Writes refused for a full disk since start (for a metric).
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }

    pub fn free_space(&self) -> io::Result<FreeSpace> {
        free_space(&self.data_dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;
    const GIB: u64 = 1024 * MIB;

    #[test]
    fn enospc_and_edquot_are_full_in_every_form_sled_gives() {
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let os = io::Error::from_raw_os_error(errno);
            assert!(is_disk_full(&os), "{os}");
            // sled 0.34 re-wraps the flusher's error: kind kept, errno gone.
            let wrapped = io::Error::new(os.kind(), format!("{os:?}"));
            assert_eq!(wrapped.raw_os_error(), None);
            assert!(is_disk_full(&wrapped), "{wrapped:?}");
        }
        for other in [
            io::Error::from_raw_os_error(libc::EIO),
            io::Error::other("could not acquire lock on \"db\""),
            io::Error::from(io::ErrorKind::PermissionDenied),
        ] {
            assert!(!is_disk_full(&other), "{other}");
        }
    }

    #[test]
    fn a_refusal_names_the_data_dir_and_logs_once_per_episode() {
        let disk = Disk::new(PathBuf::from("/var/lib/scaiwave"));
        assert!(!disk.is_full());
        let cause = io::Error::from_raw_os_error(libc::ENOSPC);
        let e = disk.refused(&cause);
        assert_eq!(e.code, Code::StorageFull);
        assert_eq!(e.status(), 507);
        assert!(e.retryable());
        assert!(
            e.message
                .starts_with("the data disk is full; free space in /var/lib/scaiwave"),
            "{}",
            e.message
        );
        disk.refused(&cause);
        assert!(disk.is_full());
        assert_eq!(disk.refusals(), 2);
    }

    #[test]
    fn low_space_is_below_five_percent_or_512_mib_whichever_is_more() {
        let low = |available_bytes, total_bytes| {
            FreeSpace {
                available_bytes,
                total_bytes,
            }
            .is_low()
        };
        // A big disk: 5 % of 1 TiB is above the floor.
        assert!(low(50 * GIB, 1024 * GIB));
        assert!(!low(52 * GIB, 1024 * GIB));
        // A small disk: the floor.
        assert!(low(511 * MIB, 4 * GIB));
        assert!(!low(513 * MIB, 4 * GIB));
        // A disk smaller than the floor is always low.
        assert!(low(16 * MIB, 16 * MIB));
        // Huge numbers do not overflow.
        assert!(!low(u64::MAX, u64::MAX));
        assert!(low(0, u64::MAX));
    }

    #[test]
    fn free_space_of_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        let f = free_space(dir.path()).unwrap();
        assert!(
            f.total_bytes > 0 && f.available_bytes <= f.total_bytes,
            "{f:?}"
        );
        assert!(free_space(&dir.path().join("missing")).is_err());
    }
}

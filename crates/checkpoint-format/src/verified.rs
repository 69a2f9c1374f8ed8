//! Hashing a checkpoint's files once per change, not once per reader.
//!
//! A restore would read every file of a checkpoint twice before CRIU reads it a third time:
//! podsnapd's `RestorePod` verifies the checkpoint (all but the page images, which the shim
//! hashes while CRIU reads them), then the shim verifies each container's files again at
//! `StartContainer` (and N replicas of one checkpoint verify it N times). Like the kernel's IMA, which keeps a file's
//! appraisal until the inode changes, a reader may instead keep a [`Stamp`]: the digest it
//! verified and the file's [`Identity`] (device, inode, size, modification and change times)
//! when it did. A later reader re-hashes only a file whose identity is no longer the stamp's:
//! any write, truncation, rename over, `chmod` or `utimensat` moves its change time, which
//! nobody can set back.
//!
//! Two rules keep that sound:
//! - **Settled files only.** A change time has the kernel's coarse granularity (a clock tick),
//!   so a write within the same tick as the last one before hashing may leave it unchanged (git's
//!   "racy clean" problem). A file gets a stamp only if its change time is at least [`SETTLED`]
//!   older than the moment its hashing started, and it did not change while it was hashed.
//! - **Stamps come only from root-only places**: podsnapd's memory, and the restore grant it
//!   writes for the shim ([`crate::grant`]). Nothing in a checkpoint carries one.
//!
//! Only files of at least [`STAMPED_MIN`] bytes get stamps: hashing the small ones again costs
//! less than carrying their stamps, and it bounds a grant's size.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// How much older than the start of its hashing a file's change time must be for a stamp:
/// many clock ticks (a tick is at most 10 ms).
pub const SETTLED: Duration = Duration::from_millis(100);
/// Smallest file that gets a stamp.
pub const STAMPED_MIN: u64 = 1 << 20;

/// What identifies a file's content without reading it, while nobody changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Seconds and nanoseconds.
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Identity {
    /// The identity `meta` describes (of a path, or of an open file).
    pub fn of(meta: &fs::Metadata) -> Identity {
        Identity {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The identity of the file at `path` now (not following a symlink).
    pub fn at(path: &Path) -> std::io::Result<Identity> {
        fs::symlink_metadata(path).map(|m| Identity::of(&m))
    }

    /// Whether the file's last change lies at least [`SETTLED`] before `when`.
    fn settled_before(&self, when: SystemTime) -> bool {
        let Ok(secs) = u64::try_from(self.ctime.0) else {
            return false;
        };
        let changed = UNIX_EPOCH + Duration::new(secs, self.ctime.1.clamp(0, 999_999_999) as u32);
        changed + SETTLED <= when
    }
}

/// A file's digest as verified ([`crate::digest`]), and its identity when it was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// `sha256` in the restore grant, as before checkpoint format 2: a podsnapd and a shim of
    /// either side of that change read each other's grants during an upgrade.
    #[serde(rename = "sha256")]
    pub digest: String,
    pub identity: Identity,
}

/// Stamps by path (relative to a checkpoint, or absolute: the holder's choice).
pub type Stamps = BTreeMap<String, Stamp>;

/// A file hashed by [`hash`].
pub struct Hashed {
    pub digest: String,
    /// A stamp for the hash, when the file deserves one (settled, unchanged while hashed, at
    /// least [`STAMPED_MIN`] bytes).
    pub stamp: Option<Stamp>,
}

/// Hashes the regular file at `path` with `algorithm` (a symlink is refused: ELOOP).
pub fn hash(path: &Path, algorithm: crate::digest::Algorithm) -> std::io::Result<Hashed> {
    let started = SystemTime::now();
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let before = Identity::of(&file.metadata()?);
    let digest = crate::digest::of_reader(algorithm, &mut file)?;
    let after = Identity::of(&file.metadata()?);
    let stamp = (before == after && before.size >= STAMPED_MIN && before.settled_before(started))
        .then(|| Stamp {
            digest: digest.clone(),
            identity: before,
        });
    Ok(Hashed { digest, stamp })
}

/// The digest of the file at `path` if `stamp` still vouches for it (the file's identity is the
/// stamp's), without reading it.
pub fn vouched(path: &Path, stamp: &Stamp) -> Option<String> {
    (Identity::at(path).ok()? == stamp.identity).then(|| stamp.digest.clone())
}

/// Runs `work` on every item on up to `threads` threads (at least one), the largest items
/// (by `size`) first, and returns the results in the items' order. Used to hash a checkpoint's
/// files on every core.
pub fn on_all_cores<T: Sync, R: Send>(
    items: &[T],
    size: impl Fn(&T) -> u64 + Sync,
    work: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8)
        .min(items.len().max(1));
    if threads <= 1 {
        return items.iter().map(work).collect();
    }
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(size(&items[i])));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<R>>> =
        items.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&i) = order.get(k) else { break };
                    let r = work(&items[i]);
                    *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|r| {
            r.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every item was worked on")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn big_file(path: &Path) {
        let mut f = fs::File::create(path).unwrap();
        f.write_all(&vec![7u8; STAMPED_MIN as usize + 1]).unwrap();
    }

    fn age(path: &Path) {
        // The change time cannot be set back: wait until the file has settled.
        let changed = Identity::at(path).unwrap();
        while !changed.settled_before(SystemTime::now()) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_settled_file_gets_a_stamp_that_vouches_for_it_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages-1.img");
        big_file(&path);
        age(&path);
        let hashed = hash(&path, crate::digest::WRITTEN).unwrap();
        let stamp = hashed.stamp.expect("a settled big file gets a stamp");
        assert_eq!(stamp.digest, hashed.digest);
        assert_eq!(vouched(&path, &stamp), Some(hashed.digest.clone()));

        // Same size, same bytes count, another byte: the change time moves.
        let mut f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all(b"x").unwrap();
        drop(f);
        assert_eq!(vouched(&path, &stamp), None);
        // A file put in its place (another inode) is not vouched for either.
        fs::remove_file(&path).unwrap();
        big_file(&path);
        assert_eq!(vouched(&path, &stamp), None);
    }

    #[test]
    fn a_file_changed_moments_ago_or_a_small_one_gets_no_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let fresh = dir.path().join("fresh");
        big_file(&fresh);
        assert!(
            hash(&fresh, crate::digest::WRITTEN)
                .unwrap()
                .stamp
                .is_none(),
            "not settled yet"
        );
        let small = dir.path().join("small");
        fs::write(&small, b"core").unwrap();
        age(&small);
        assert!(
            hash(&small, crate::digest::WRITTEN)
                .unwrap()
                .stamp
                .is_none(),
            "below STAMPED_MIN"
        );
    }

    #[test]
    fn a_symlink_is_not_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(
            hash(&link, crate::digest::WRITTEN)
                .err()
                .and_then(|e| e.raw_os_error()),
            Some(libc::ELOOP)
        );
    }

    #[test]
    fn work_on_all_cores_keeps_the_items_order() {
        let items: Vec<u64> = (0..37).collect();
        let out = on_all_cores(&items, |&n| n % 5, |&n| n * 2);
        assert_eq!(out, items.iter().map(|n| n * 2).collect::<Vec<_>>());
        assert!(on_all_cores(&Vec::<u64>::new(), |_| 0, |&n| n).is_empty());
    }
}

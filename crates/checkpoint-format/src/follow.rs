//! Hashing CRIU's page images while CRIU writes them.
//!
//! A container's memory is almost all of a checkpoint's bytes, and CRIU writes it to
//! `pages-<n>.img` from start to end, never going back. So the digest a checkpoint is sealed
//! with ([`crate::container::seal_followed`]) need not wait for the dump: a [`Follower`] thread
//! reads each page image as it grows and hashes what is there, at the `SCHED_IDLE` policy so
//! that it only uses a core the dump leaves idle and never stretches the freeze. When the dump
//! has ended, [`Follower::finish`] raises it to the normal policy and hashes the rest. The
//! result is trusted for a file only if it is still the file that was read (device and inode)
//! with exactly the length hashed; any other file is hashed again by the sealer.
//!
//! How much it saves depends on the dump: CRIU first drains a process's pages into pipes and
//! writes them out at the end of its dump, and on a node with few cores the dump's writing
//! leaves little idle time, so the follower often catches only part of a big image before the
//! thaw (the shim logs how much).

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::digest::{self, Hasher};

/// How long the follower waits when CRIU has written nothing new.
const IDLE: Duration = Duration::from_millis(2);

/// What the follower hashed of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Followed {
    /// Its digest ([`digest::WRITTEN`]).
    pub digest: String,
    /// Bytes hashed: the whole file, if its length is still this.
    pub len: u64,
    pub dev: u64,
    pub ino: u64,
}

impl Followed {
    /// This file's hash, if the file at `path` is the one hashed, at the length hashed.
    pub fn of(&self, path: &Path) -> Option<&str> {
        let meta = fs::symlink_metadata(path).ok()?;
        (meta.is_file()
            && meta.dev() == self.dev
            && meta.ino() == self.ino
            && meta.len() == self.len)
            .then_some(self.digest.as_str())
    }
}

/// Whether a file of a container's images is one CRIU writes pages into.
pub fn is_page_image(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

/// A thread hashing the page images of one images directory as CRIU writes them.
pub struct Follower {
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    tid: Arc<AtomicI32>,
    hashed: Arc<AtomicU64>,
    thread: Option<JoinHandle<std::io::Result<BTreeMap<String, Followed>>>>,
}

struct Open {
    file: fs::File,
    hasher: Hasher,
    len: u64,
    dev: u64,
    ino: u64,
}

impl Follower {
    /// Starts following `dir` (which exists; CRIU has not started writing into it yet).
    pub fn start(dir: &Path) -> Follower {
        let stop = Arc::new(AtomicBool::new(false));
        let tid = Arc::new(AtomicI32::new(0));
        let hashed = Arc::new(AtomicU64::new(0));
        let thread = {
            let (dir, stop, tid, hashed) =
                (dir.to_path_buf(), stop.clone(), tid.clone(), hashed.clone());
            std::thread::Builder::new()
                .name("page-hasher".into())
                .spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
                    set_policy(0, libc::SCHED_IDLE);
                    // Told to stop before it could see this thread's id: the normal policy
                    // for the rest is this thread's to set.
                    if stop.load(Ordering::SeqCst) {
                        set_policy(0, libc::SCHED_OTHER);
                    }
                    follow(&dir, &stop, &hashed)
                })
                .ok()
        };
        Follower {
            dir: dir.to_path_buf(),
            stop,
            tid,
            hashed,
            thread,
        }
    }

    /// Tells the thread that CRIU is done, and lets it hash the rest at the normal policy.
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let tid = self.tid.load(Ordering::SeqCst);
        if tid != 0 {
            set_policy(tid, libc::SCHED_OTHER);
        }
    }

    /// Bytes hashed so far, over all page images.
    pub fn hashed(&self) -> u64 {
        self.hashed.load(Ordering::Relaxed)
    }

    /// Once CRIU is done writing: hashes the rest at the normal policy and returns what was
    /// hashed, by file name. On an error the sealer hashes every file itself.
    pub fn finish(mut self) -> std::io::Result<BTreeMap<String, Followed>> {
        self.stop();
        let thread = self.thread.take().ok_or_else(|| {
            std::io::Error::other(format!(
                "no thread hashed the page images of {}",
                self.dir.display()
            ))
        })?;
        thread.join().map_err(|_| {
            std::io::Error::other(format!(
                "the thread hashing the page images of {} panicked",
                self.dir.display()
            ))
        })?
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sets the scheduling policy of thread `tid` (0: the calling thread); best effort.
fn set_policy(tid: i32, policy: i32) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a valid sched_param for a non-real-time policy.
    unsafe {
        libc::sched_setscheduler(tid, policy, &param);
    }
}

fn follow(
    dir: &Path,
    stop: &AtomicBool,
    hashed: &AtomicU64,
) -> std::io::Result<BTreeMap<String, Followed>> {
    let mut open: BTreeMap<String, Open> = BTreeMap::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        // Read before the pass: once it is set, CRIU has ended, and this pass reads all.
        let last = stop.load(Ordering::SeqCst);
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if !is_page_image(&name) || open.contains_key(&name) {
                continue;
            }
            let file = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(entry.path())?;
            let meta = file.metadata()?;
            if !meta.is_file() {
                continue;
            }
            open.insert(
                name,
                Open {
                    file,
                    hasher: digest::WRITTEN.hasher(),
                    len: 0,
                    dev: meta.dev(),
                    ino: meta.ino(),
                },
            );
        }
        let mut progressed = false;
        for o in open.values_mut() {
            loop {
                let n = o.file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                o.hasher.update(&buf[..n]);
                o.len += n as u64;
                hashed.fetch_add(n as u64, Ordering::Relaxed);
                progressed = true;
            }
        }
        if last {
            break;
        }
        if !progressed {
            std::thread::sleep(IDLE);
        }
    }
    Ok(open
        .into_iter()
        .map(|(name, o)| {
            let followed = Followed {
                digest: o.hasher.finish(),
                len: o.len,
                dev: o.dev,
                ino: o.ino,
            };
            (name, followed)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn pages_written_while_followed_hash_as_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let follower = Follower::start(dir.path());
        let mut pages = fs::File::create(dir.path().join("pages-1.img")).unwrap();
        let mut other = fs::File::create(dir.path().join("pages-2.img")).unwrap();
        for i in 0..64u8 {
            pages.write_all(&[i; 4096]).unwrap();
            if i % 8 == 0 {
                other.write_all(&[i ^ 0x5a; 8192]).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        fs::write(dir.path().join("core-1.img"), b"not followed").unwrap();
        drop((pages, other));
        let followed = follower.finish().unwrap();
        assert_eq!(
            followed.keys().collect::<Vec<_>>(),
            ["pages-1.img", "pages-2.img"]
        );
        for (name, f) in &followed {
            let path = dir.path().join(name);
            assert_eq!(
                f.of(&path),
                Some(digest::of_file(digest::WRITTEN, &path).unwrap().as_str())
            );
        }
    }

    #[test]
    fn a_file_grown_or_replaced_after_it_was_hashed_is_not_vouched_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages-1.img");
        let follower = Follower::start(dir.path());
        fs::write(&path, [1u8; 4096]).unwrap();
        let followed = follower.finish().unwrap().remove("pages-1.img").unwrap();
        assert_eq!(followed.len, 4096);
        assert!(followed.of(&path).is_some());
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"more")
            .unwrap();
        assert_eq!(followed.of(&path), None);
        fs::remove_file(&path).unwrap();
        fs::write(&path, [1u8; 4096]).unwrap();
        // Same bytes and length, but another file: hashed again rather than trusted.
        let replaced = fs::symlink_metadata(&path).unwrap();
        if replaced.ino() != followed.ino {
            assert_eq!(followed.of(&path), None);
        }
    }

    #[test]
    fn a_follower_dropped_without_finishing_stops() {
        let dir = tempfile::tempdir().unwrap();
        let follower = Follower::start(dir.path());
        fs::write(dir.path().join("pages-1.img"), [0u8; 100]).unwrap();
        drop(follower);
    }
}

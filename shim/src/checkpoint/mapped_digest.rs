//! The digest of a page image read through a shared, read-only mapping of its pages in the page
//! cache, rather than through `read(2)`: the hash reads the cached pages in place instead of a
//! copy of them. On this VM one core hashed a cached gigabyte with BLAKE3 in 0.30 CPU-s mapped
//! and 0.37 CPU-s through `read`; while a pod's containers restore together, their CRIUs copying
//! pages beside it, the copy into the shim cost as much CPU as the hash (`perf`, 2026-12-05).
//!
//! A mapped file that shrinks under its mapping raises SIGBUS at the first access past its new
//! end, which would kill the shim, and the shim is the parent of the pod's containers. So every
//! mapping being hashed is registered in [`MAPPINGS`], and a handler installed once (the first
//! time a page image is hashed) catches a SIGBUS at an address inside one: it maps a page of
//! zeros over the faulting page and marks the mapping, whose hashing then stops with
//! [`Hashed::Shrank`] (the caller refuses that page image). A SIGBUS anywhere else is handed to
//! the handler that was there before (Rust's stack-overflow handler) or, where there was none,
//! the default action is restored and the faulting access repeats and kills as it always did.
//!
//! A page image that cannot be mapped (no free registration, `mmap` refused) is hashed through
//! `read` as before.

use std::ffi::c_void;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use podsnap_checkpoint_format::digest::{self, Algorithm};

/// What hashing a page image gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Hashed {
    /// Its digest, as the manifest lists one.
    Digest(String),
    /// It became shorter than when hashing began (a SIGBUS in its mapping).
    Shrank,
    /// The cancel flag was set first.
    Cancelled,
}

/// How much is hashed between two looks at the cancel flag and the mapping's SIGBUS mark.
const CHUNK: usize = 8 << 20;

/// How many page images may be hashed through mappings at once in this process (a pod's
/// containers restoring together hash theirs on a thread each); one more is read instead.
const REGISTRATIONS: usize = 64;

/// One mapping being hashed: `[start, end)`, and whether a SIGBUS hit it.
struct Registration {
    claimed: AtomicBool,
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

/// The mappings being hashed now, read by the SIGBUS handler (atomics only: nothing that could
/// take a lock or allocate).
static MAPPINGS: [Registration; REGISTRATIONS] = [const {
    Registration {
        claimed: AtomicBool::new(false),
        start: AtomicUsize::new(0),
        end: AtomicUsize::new(0),
        faulted: AtomicBool::new(false),
    }
}; REGISTRATIONS];

/// The SIGBUS disposition before [`install`], which a SIGBUS outside [`MAPPINGS`] goes to.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// The page size, set by [`install`] before the handler can run.
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(0);

/// The digest of the open page image `file` with `algorithm`, hashed through a mapping where it
/// can be, through `read` where not; [`Hashed::Cancelled`] once `cancel` is set. Only the bytes
/// the file has now are hashed: a file that grows meanwhile has another digest or another
/// identity, which the callers compare afterwards.
pub fn digest(file: &mut File, algorithm: Algorithm, cancel: &AtomicBool) -> io::Result<Hashed> {
    let len = usize::try_from(file.metadata()?.len())
        .map_err(|_| io::Error::other("the file is larger than this address space"))?;
    if len > 0
        && let Some(mapping) = Mapping::new(file, len)
    {
        return mapping.hash(algorithm, cancel, |_| {});
    }
    read_digest(file, algorithm, cancel)
}

/// The digest through `read` (an empty file, or one that could not be mapped).
fn read_digest(file: &mut File, algorithm: Algorithm, cancel: &AtomicBool) -> io::Result<Hashed> {
    struct Cancellable<'a> {
        file: &'a mut File,
        cancel: &'a AtomicBool,
    }
    impl Read for Cancellable<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(io::Error::other("cancelled"));
            }
            self.file.read(buf)
        }
    }
    match digest::of_reader(algorithm, &mut Cancellable { file, cancel }) {
        Ok(digest) => Ok(Hashed::Digest(digest)),
        Err(_) if cancel.load(Ordering::Relaxed) => Ok(Hashed::Cancelled),
        Err(e) => Err(e),
    }
}

/// A read-only shared mapping of a whole file, registered for the SIGBUS handler; unmapped and
/// unregistered when dropped.
struct Mapping {
    address: *mut c_void,
    len: usize,
    registration: &'static Registration,
}

impl Mapping {
    /// Maps `len` bytes of `file`; `None` when no registration is free or `mmap` refuses.
    fn new(file: &File, len: usize) -> Option<Mapping> {
        install()?;
        let registration = MAPPINGS.iter().find(|r| {
            r.claimed
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })?;
        // SAFETY: a new shared read-only mapping of an open file, at an address the kernel
        // chooses; nothing else refers to that range.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            registration.claimed.store(false, Ordering::Release);
            return None;
        }
        registration.faulted.store(false, Ordering::Release);
        let page = PAGE_SIZE.load(Ordering::Relaxed);
        registration.end.store(
            address as usize + len.div_ceil(page) * page,
            Ordering::Release,
        );
        registration
            .start
            .store(address as usize, Ordering::Release);
        Some(Mapping {
            address,
            len,
            registration,
        })
    }

    /// Hashes the mapping in [`CHUNK`]s, calling `before_chunk` with each one's offset first (the
    /// tests shrink the file there).
    fn hash(
        &self,
        algorithm: Algorithm,
        cancel: &AtomicBool,
        mut before_chunk: impl FnMut(usize),
    ) -> io::Result<Hashed> {
        let mut hasher = algorithm.hasher();
        let mut offset = 0;
        while offset < self.len {
            before_chunk(offset);
            if cancel.load(Ordering::Relaxed) {
                return Ok(Hashed::Cancelled);
            }
            let n = CHUNK.min(self.len - offset);
            // SAFETY: `offset + n <= len`, inside the mapping, which lives as long as `self`.
            // The bytes are only hashed; a write to the file meanwhile changes them under us
            // (a different digest, or an identity the callers find changed), a truncation
            // raises SIGBUS, which the handler answers with a page of zeros and the mark
            // checked below.
            let bytes =
                unsafe { std::slice::from_raw_parts((self.address as *const u8).add(offset), n) };
            hasher.update(bytes);
            if self.registration.faulted.load(Ordering::Acquire) {
                return Ok(Hashed::Shrank);
            }
            offset += n;
        }
        Ok(Hashed::Digest(hasher.finish()))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        self.registration.start.store(0, Ordering::Release);
        self.registration.end.store(0, Ordering::Release);
        // SAFETY: the mapping `new` made, unmapped once; no slice of it outlives `hash`.
        unsafe { libc::munmap(self.address, self.len) };
        self.registration.claimed.store(false, Ordering::Release);
    }
}

/// Installs [`on_sigbus`] once; `None` when that failed (page images are then read).
fn install() -> Option<()> {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    let installed = *INSTALLED.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page <= 0 {
            return false;
        }
        PAGE_SIZE.store(page as usize, Ordering::Relaxed);
        // SAFETY: zeroed is a valid sigaction (no handler, empty mask, no flags) that is then
        // filled in; sigaction reads `action` and writes the previous one into `previous`.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let mut previous: libc::sigaction = std::mem::zeroed();
            // PREVIOUS is set before the handler is: a SIGBUS outside our mappings between the
            // two would otherwise find no previous disposition.
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) != 0 {
                return false;
            }
            let _ = PREVIOUS.set(previous);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) == 0
        }
    });
    installed.then_some(())
}

/// The SIGBUS handler (async-signal-safe: atomics, `mmap`, `sigaction` and the previous
/// handler only).
extern "C" fn on_sigbus(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: the kernel hands an SA_SIGINFO handler a valid siginfo.
    let address = unsafe { (*info).si_addr() } as usize;
    let page = PAGE_SIZE.load(Ordering::Relaxed);
    for registration in &MAPPINGS {
        let start = registration.start.load(Ordering::Acquire);
        let end = registration.end.load(Ordering::Acquire);
        if start != 0 && start <= address && address < end {
            // SAFETY: replaces one page of a mapping this module owns (registered, so not yet
            // unmapped) with a private page of zeros; the faulting read then reads zeros.
            let zeros = unsafe {
                libc::mmap(
                    (address & !(page - 1)) as *mut c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if zeros != libc::MAP_FAILED {
                registration.faulted.store(true, Ordering::Release);
                return;
            }
        }
    }
    // Not ours: what would have happened without this module.
    match PREVIOUS.get() {
        Some(previous)
            if previous.sa_sigaction != libc::SIG_DFL && previous.sa_sigaction != libc::SIG_IGN =>
        {
            // SAFETY: the previous handler was installed for SIGBUS with these flags; it gets
            // the arguments the kernel gave this one.
            unsafe {
                if previous.sa_flags & libc::SA_SIGINFO != 0 {
                    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) =
                        std::mem::transmute(previous.sa_sigaction);
                    handler(signal, info, context);
                } else {
                    let handler: extern "C" fn(libc::c_int) =
                        std::mem::transmute(previous.sa_sigaction);
                    handler(signal);
                }
            }
        }
        _ => {
            // SAFETY: resets SIGBUS to its default action; the faulting access repeats when
            // this handler returns and the kernel ends the process as it would have.
            unsafe {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pages-1.img");
        fs_write(&path, bytes);
        (dir, path)
    }

    fn fs_write(path: &std::path::Path, bytes: &[u8]) {
        let mut f = File::create(path).unwrap();
        f.write_all(bytes).unwrap();
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn a_mapped_digest_is_the_digest_read_for_every_size_and_algorithm() {
        for len in [
            0,
            1,
            4095,
            4096,
            4097,
            CHUNK,
            CHUNK + 4096 + 3,
            2 * CHUNK + 1,
        ] {
            let bytes = pattern(len);
            let (_dir, path) = file_of(&bytes);
            for algorithm in [Algorithm::Blake3, Algorithm::Sha256] {
                let want = digest::of_reader(algorithm, &mut &bytes[..]).unwrap();
                let got = digest(
                    &mut File::open(&path).unwrap(),
                    algorithm,
                    &AtomicBool::new(false),
                )
                .unwrap();
                assert_eq!(got, Hashed::Digest(want), "{len} bytes, {algorithm}");
            }
        }
    }

    #[test]
    fn a_page_image_that_shrinks_while_mapped_is_reported_and_the_process_lives() {
        let len = 3 * CHUNK;
        let (_dir, path) = file_of(&pattern(len));
        let file = File::open(&path).unwrap();
        let mapping = Mapping::new(&file, len).expect("mapped");
        let hashed = mapping
            .hash(Algorithm::Blake3, &AtomicBool::new(false), |offset| {
                if offset == CHUNK {
                    // Truncated after the first chunk was hashed: the next read faults.
                    File::options()
                        .write(true)
                        .open(&path)
                        .unwrap()
                        .set_len(4096)
                        .unwrap();
                }
            })
            .unwrap();
        assert_eq!(hashed, Hashed::Shrank);
        drop(mapping);
        // The registration is free again and another file hashes normally.
        let bytes = pattern(5000);
        let (_dir2, other) = file_of(&bytes);
        assert_eq!(
            digest(
                &mut File::open(&other).unwrap(),
                Algorithm::Blake3,
                &AtomicBool::new(false)
            )
            .unwrap(),
            Hashed::Digest(digest::of_reader(Algorithm::Blake3, &mut &bytes[..]).unwrap())
        );
    }

    #[test]
    fn a_cancelled_digest_stops() {
        let (_dir, path) = file_of(&pattern(2 * CHUNK));
        let cancel = AtomicBool::new(true);
        assert_eq!(
            digest(&mut File::open(&path).unwrap(), Algorithm::Blake3, &cancel).unwrap(),
            Hashed::Cancelled
        );
        let (_dir, empty) = file_of(&[]);
        // An empty file is read, not mapped; cancelled all the same.
        assert_eq!(
            digest(&mut File::open(&empty).unwrap(), Algorithm::Blake3, &cancel).unwrap(),
            Hashed::Cancelled
        );
    }

    /// A SIGBUS outside the registered mappings still ends the process by SIGBUS: the test
    /// runs itself again in a child, which installs the handler, then faults on a mapping of
    /// its own past the end of its file.
    #[test]
    fn a_sigbus_elsewhere_still_kills_the_process() {
        const CHILD: &str = "PODSNAP_MAPPED_DIGEST_SIGBUS_CHILD";
        if let Some(path) = std::env::var_os(CHILD) {
            let (_dir, page) = file_of(&pattern(4096));
            digest(
                &mut File::open(&page).unwrap(),
                Algorithm::Blake3,
                &AtomicBool::new(false),
            )
            .unwrap();
            let file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .unwrap();
            file.set_len(8192).unwrap();
            // SAFETY: a mapping of two pages of a file then cut to none: reading it faults.
            unsafe {
                let address = libc::mmap(
                    std::ptr::null_mut(),
                    8192,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                );
                assert_ne!(address, libc::MAP_FAILED);
                file.set_len(0).unwrap();
                std::ptr::read_volatile(address as *const u8);
            }
            unreachable!("the read past the end did not fault");
        }
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "checkpoint::mapped_digest::tests::a_sigbus_elsewhere_still_kills_the_process",
                "--test-threads=1",
            ])
            .env(CHILD, dir.path().join("elsewhere"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
    }
}

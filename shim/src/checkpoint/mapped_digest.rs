//! The digest of a page image read through a shared, read-only mapping of its pages in the page
//! cache, rather than through `read(2)`: the hash reads the cached pages in place instead of a
//! copy of them. On this VM one core hashed a cached gigabyte with BLAKE3 in 0.30 CPU-s mapped
//! and 0.37 CPU-s through `read`; while a pod's containers restore together, their CRIUs copying
//! pages beside it, the copy into the shim cost as much CPU as the hash (`perf`, 2026-12-05).
//!
//! A mapped file that shrinks under its mapping raises SIGBUS at the first access past its new
//! end (so does a read error of a page not yet cached), which would kill the shim, and the shim
//! is the parent of the pod's containers. So every mapping being hashed is registered in
//! [`MAPPINGS`] with the thread hashing it, and a handler installed once (the first time a page
//! image is hashed) catches a fault of that thread inside it: it maps zeros over the rest of the
//! mapping and marks it, and the hashing stops. Then the file's size tells a shrink
//! ([`Hashed::Shrank`]: the caller refuses the page image) from a read error (an error). Any other
//! SIGBUS goes to the handler that was there before (Rust's stack-overflow handler) or, where
//! there was none, to the default action: a fault repeats and kills as it always did.
//!
//! A page image that cannot be mapped (no free registration, `mmap` refused) is hashed through
//! `read` as before.

use std::ffi::c_void;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

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

/// How much is hashed between two looks at the cancel flag and the mapping's SIGBUS mark; each
/// chunk's page table entries are dropped once it is hashed, so the shim maps no more than this
/// of a page image at a time (the page cache keeps the pages).
const CHUNK: usize = 8 << 20;

/// How many page images may be hashed through mappings at once in this process (a pod's
/// containers restoring together hash theirs on a thread each); one more is read instead.
const REGISTRATIONS: usize = 64;

/// One mapping being hashed: `[start, end)`, the thread hashing it (a fault is delivered to the
/// thread that faulted), and whether a SIGBUS hit it.
struct Registration {
    claimed: AtomicBool,
    thread: AtomicI32,
    start: AtomicUsize,
    end: AtomicUsize,
    faulted: AtomicBool,
}

/// The mappings being hashed now, read by the SIGBUS handler (atomics only: nothing that could
/// take a lock or allocate).
static MAPPINGS: [Registration; REGISTRATIONS] = [const {
    Registration {
        claimed: AtomicBool::new(false),
        thread: AtomicI32::new(0),
        start: AtomicUsize::new(0),
        end: AtomicUsize::new(0),
        faulted: AtomicBool::new(false),
    }
}; REGISTRATIONS];

/// The SIGBUS disposition before [`install`], which a SIGBUS outside [`MAPPINGS`] goes to.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// [`on_sigbus`]'s own disposition, put back after a SIGBUS sent by a process went to the
/// previous handler (Rust's resets the default action).
static OURS: OnceLock<libc::sigaction> = OnceLock::new();

/// `si_code` of a SIGBUS the kernel sends about a hardware memory error in memory nobody is
/// accessing (`BUS_MCEERR_AO`, asm-generic/siginfo.h): it does not repeat.
const BUS_MCEERR_AO: libc::c_int = 5;

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
        let hashed = mapping.hash(algorithm, cancel, |_| {})?;
        drop(mapping);
        if hashed == Hashed::Shrank && file.metadata()?.len() >= len as u64 {
            // A fault, yet the file is as long as it was: its pages could not be read (or it
            // shrank and grew back meanwhile; either way the restore fails, as a failed check
            // rather than a refused checkpoint).
            return Err(io::Error::other(
                "a page of it could not be read through its mapping",
            ));
        }
        return Ok(hashed);
    }
    read_digest(file, algorithm, cancel)
}

/// The digest through `read` from where the file's offset is (an empty file, or one that could
/// not be mapped, whose offset nobody moved).
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
    /// Maps `len` bytes of `file` for this thread to hash; `None` when no registration is free
    /// or `mmap` refuses.
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
        // SAFETY: gettid has no preconditions.
        registration
            .thread
            .store(unsafe { libc::gettid() }, Ordering::Release);
        registration
            .end
            .store(address as usize + rounded_up(len), Ordering::Release);
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
            // Strictly, Rust's aliasing rules want no change under a shared slice, and a write
            // to the file, or the SIGBUS handler's zeros, would be one; as with any mapped
            // file (memmap2 says the same), the bytes are only read once, by the hash, and such
            // a change ends in a digest or an identity the callers refuse. A truncation raises
            // SIGBUS, which the handler answers with zeros and the mark checked below.
            let bytes =
                unsafe { std::slice::from_raw_parts((self.address as *const u8).add(offset), n) };
            hasher.update(bytes);
            if self.registration.faulted.load(Ordering::Acquire) {
                return Ok(Hashed::Shrank);
            }
            // SAFETY: drops this chunk's page table entries (the page cache keeps its pages);
            // a later access would map them again. Page-aligned: CHUNK is a multiple of pages.
            unsafe {
                libc::madvise(
                    (self.address as *mut u8).add(offset).cast(),
                    rounded_up(n),
                    libc::MADV_DONTNEED,
                )
            };
            offset += n;
        }
        Ok(Hashed::Digest(hasher.finish()))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        self.registration.start.store(0, Ordering::Release);
        self.registration.end.store(0, Ordering::Release);
        self.registration.thread.store(0, Ordering::Release);
        // SAFETY: the mapping `new` made, unmapped once; no slice of it outlives `hash`.
        unsafe { libc::munmap(self.address, self.len) };
        self.registration.claimed.store(false, Ordering::Release);
    }
}

/// `len` rounded up to whole pages.
fn rounded_up(len: usize) -> usize {
    let page = PAGE_SIZE.load(Ordering::Relaxed);
    len.div_ceil(page) * page
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
            // PREVIOUS and OURS are set before the handler is, which reads them.
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) != 0 {
                return false;
            }
            let _ = PREVIOUS.set(previous);
            let _ = OURS.set(action);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) == 0
        }
    });
    installed.then_some(())
}

/// The SIGBUS handler: async-signal-safe on Linux (atomics, `gettid`, `mmap`, `sigaction`,
/// `raise`, errno saved and restored, and the previous handler).
extern "C" fn on_sigbus(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut c_void) {
    // SAFETY: errno is this thread's; the kernel hands an SA_SIGINFO handler a valid siginfo.
    let (errno, code, address) = unsafe {
        (
            *libc::__errno_location(),
            (*info).si_code,
            (*info).si_addr() as usize,
        )
    };
    // A fault (code > 0; a process's kill or tgkill has code <= 0) of this thread, inside the
    // mapping it is hashing.
    if code > 0 {
        // SAFETY: gettid has no preconditions.
        let thread = unsafe { libc::gettid() };
        for registration in &MAPPINGS {
            if registration.thread.load(Ordering::Acquire) != thread {
                continue;
            }
            let start = registration.start.load(Ordering::Acquire);
            let end = registration.end.load(Ordering::Acquire);
            if start != 0 && start <= address && address < end {
                let page = address & !(PAGE_SIZE.load(Ordering::Relaxed) - 1);
                // SAFETY: replaces the rest of a mapping this thread owns (registered, so not
                // yet unmapped) with private zeros: the faulting read, and the reads after it
                // up to the next look at the mark, read zeros.
                let zeros = unsafe {
                    libc::mmap(
                        page as *mut c_void,
                        end - page,
                        libc::PROT_READ,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    )
                };
                if zeros != libc::MAP_FAILED {
                    registration.faulted.store(true, Ordering::Release);
                    // SAFETY: as above.
                    unsafe { *libc::__errno_location() = errno };
                    return;
                }
            }
        }
    }
    // Not ours: what would have happened without this module.
    // SAFETY: the previous handler was installed for SIGBUS with these flags and gets the
    // arguments the kernel gave this one; the sigaction calls install dispositions `install`
    // made or read; raise sends this signal to this thread.
    unsafe {
        match PREVIOUS.get() {
            Some(previous)
                if previous.sa_sigaction != libc::SIG_DFL
                    && previous.sa_sigaction != libc::SIG_IGN =>
            {
                if previous.sa_flags & libc::SA_SIGINFO != 0 {
                    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) =
                        std::mem::transmute(previous.sa_sigaction);
                    handler(signal, info, context);
                } else {
                    let handler: extern "C" fn(libc::c_int) =
                        std::mem::transmute(previous.sa_sigaction);
                    handler(signal);
                }
                if (code <= 0 || code == BUS_MCEERR_AO)
                    && let Some(ours) = OURS.get()
                {
                    // A signal a process sent, or the kernel's note of a memory error nobody
                    // touched yet, does not repeat: this handler goes back (Rust's reset the
                    // default action), for the page images hashed later.
                    libc::sigaction(libc::SIGBUS, ours, std::ptr::null_mut());
                }
            }
            Some(previous) if previous.sa_sigaction == libc::SIG_IGN && code <= 0 => {}
            _ => {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
                if code <= 0 {
                    // A sent signal does not repeat: sent again (delivered when this handler
                    // returns), it has its default action, as it would have had.
                    libc::raise(libc::SIGBUS);
                }
                // A fault repeats when this handler returns and the kernel ends the process.
            }
        }
        *libc::__errno_location() = errno;
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

    /// This test binary run again for the test `name` of this module alone, with `variable`
    /// set to `value` (which makes that test do its child's part); its stderr is dropped.
    fn in_child(name: &str, variable: &str, value: &std::ffi::OsStr) -> std::process::Output {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                &format!("checkpoint::mapped_digest::tests::{name}"),
                "--test-threads=1",
            ])
            .env(variable, value)
            .stderr(std::process::Stdio::null())
            .output()
            .unwrap()
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
            // SAFETY: no core file for the SIGBUS to come (setrlimit reads the struct); a
            // mapping of two pages of a file then cut to none: reading it faults.
            unsafe {
                let no_core = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                assert_eq!(libc::setrlimit(libc::RLIMIT_CORE, &no_core), 0);
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
        let status = in_child(
            "a_sigbus_elsewhere_still_kills_the_process",
            CHILD,
            dir.path().join("elsewhere").as_os_str(),
        )
        .status;
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGBUS), "{status:?}");
    }

    /// A SIGBUS a process sends (no fault) goes to the previous handler, which does not end
    /// the shim, and leaves this module's handler in place: a page image that shrinks later is
    /// still caught. Run in a child, as the test above.
    #[test]
    fn a_sigbus_sent_by_a_process_leaves_the_handler_in_place() {
        const CHILD: &str = "PODSNAP_MAPPED_DIGEST_SENT_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let (_dir, page) = file_of(&pattern(4096));
            digest(
                &mut File::open(&page).unwrap(),
                Algorithm::Blake3,
                &AtomicBool::new(false),
            )
            .unwrap();
            // SAFETY: sends SIGBUS to this thread, as `kill -BUS` would to the shim.
            assert_eq!(unsafe { libc::raise(libc::SIGBUS) }, 0);
            a_page_image_that_shrinks_while_mapped_is_reported_and_the_process_lives();
            return;
        }
        let output = in_child(
            "a_sigbus_sent_by_a_process_leaves_the_handler_in_place",
            CHILD,
            "1".as_ref(),
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{:?}: {stdout}", output.status);
        // The child ran this very test (a renamed module would match no test and pass).
        assert!(stdout.contains("1 passed"), "{stdout}");
    }
}

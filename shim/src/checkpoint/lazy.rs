//! Lazy restore: the restored processes run while CRIU's lazy-pages daemon streams their memory
//! in through userfaultfd, instead of waiting for every page to be read first.
//!
//! A daemon that dies half way must never leave a silently corrupted process. When the last
//! holder of a userfaultfd closes it, the kernel unregisters the ranges and every page not yet
//! copied reads as zeros (a lazily restored memtest whose daemon was killed died of SIGSEGV at
//! address 0 on this machine; a program with less luck computes on zeros). So CRIU's restore
//! does not hand the userfaultfds to the daemon itself: it connects to a relay the shim listens
//! on (`lazy-pages.socket` in the restore's work directory), which keeps a duplicate of each
//! before passing it on to the daemon's own socket. While the shim holds them, a fault on a page
//! not yet copied waits, whatever happens to the daemon. The shim watches the daemon from the
//! moment it starts: if it dies, during the restore (CRIU's restorer itself reads lazy memory)
//! or after, every process of the container is killed ([`kill_all`]) before the userfaultfds are
//! released. When it exits successfully, [`LazySession::finish`] checks that every pages file is
//! still the one verified before the restore, then releases them.
//!
//! The page images themselves are not hashed before a lazy restore (that would cost what lazy
//! restore saves): podsnapd and the shim verify every other file first, and the session hashes
//! the page images ([`page_check`]), from the very files it opened before the daemon started,
//! while the processes run. A page image that is not the manifest's kills the container at once; the restore is
//! complete only when every page arrived and every page image was verified.
//!
//! The daemon starts beside the restore, not before it: the relay listens at once, and waits
//! for the daemon to listen only once CRIU has connected, so that the daemon's exec and its own
//! probe of the kernel (about 35 ms here) overlap the restore's. A task's userfaultfd that CRIU
//! sends meanwhile waits in the relay's socket, and a fault on its memory waits for the daemon.
//!
//! The relay speaks CRIU's protocol (`criu/uffd.c`): per restored task a native `i32` pid, then
//! for a live task (pid > 0) one byte carrying the userfaultfd as `SCM_RIGHTS`; at the end the
//! `u32` "restore finished" mark, then end of stream.

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use podsnap_checkpoint_format::verified::{Identity, Stamp};

use super::page_check::{self, DeferredPages, PageFile, content_changed, page_files};
use crate::cgroup::ContainerCgroup;

/// CRIU's name for the socket, relative to the work directory of whoever uses it.
const SOCKET: &str = "lazy-pages.socket";
/// CRIU's `LAZY_PAGES_RESTORE_FINISHED`.
const RESTORE_FINISHED: u32 = 0x5253_5446;
/// How long the daemon may take to listen.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The daemon's log, in its work directory.
const DAEMON_LOG: &str = "lazy-pages.log";
/// How long the killed processes of a container may take to be gone before the userfaultfds
/// are released (never released while one may still run).
const KILL_CONFIRM: Duration = Duration::from_secs(10);

/// The userfaultfds CRIU passed through the relay: the shim's copies, released only by
/// [`release`] (after the container's processes are gone, if they must die).
type Held = Arc<Mutex<Vec<OwnedFd>>>;

/// What a lazy restore is given: where to send the daemon's pid once it runs, the page images
/// left to verify while they stream in, and the container's cgroup (whose processes die if the
/// daemon or one of those images fails).
pub struct Start {
    /// The container's id, for the log.
    pub id: String,
    /// The daemon's pid and a pidfd of it, once it runs.
    pub daemon_started: tokio::sync::oneshot::Sender<(i32, OwnedFd)>,
    pub deferred: Vec<DeferredPages>,
    pub cgroup: ContainerCgroup,
}

/// The daemon and the relay, started before CRIU's restore.
pub struct LazyPages {
    id: String,
    cgroup: ContainerCgroup,
    daemon: Daemon,
    relay: JoinHandle<anyhow::Result<()>>,
    /// Whether the relay reached the daemon: sent once, when it connected or gave up.
    connected: mpsc::Receiver<Result<(), String>>,
    /// What `connected` said, once received.
    outcome: std::cell::OnceCell<Result<(), String>>,
    held: Held,
    /// A duplicate of the relay's listening socket: shutting it down wakes a relay that CRIU
    /// never reached.
    listener: OwnedFd,
    pages: Vec<PageFile>,
    daemon_dir: PathBuf,
}

/// The lazy-pages daemon, a child of the shim.
pub struct Daemon {
    pid: i32,
    pidfd: OwnedFd,
}

impl Daemon {
    /// Kills it (nothing if it already exited: a pidfd names only that process).
    pub fn kill(&self) {
        kill_daemon(&self.pidfd);
    }
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just returned to us and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Hashes the deferred page images (see [`page_check::first_modified`]); the first that is not
/// the manifest's kills the container's processes at once and is the error. Stops early (an
/// error) once `cancel` is set.
fn verify_deferred(
    pages: Vec<(PathBuf, fs::File, String, Option<Stamp>)>,
    cgroup: &ContainerCgroup,
    cancel: &AtomicBool,
) -> Result<(), String> {
    match page_check::first_modified(pages, cancel)? {
        None => Ok(()),
        Some(modified) => {
            kill_all(cgroup);
            Err(format!(
                "{} has {}, not the manifest's {}: the container was killed",
                modified.path.display(),
                modified.actual,
                modified.expected
            ))
        }
    }
}

impl LazyPages {
    /// Starts the daemon on `images` and the relay in `work` (CRIU's restore work directory):
    /// call before the restore, which must then ask for lazy pages.
    pub fn start(
        criu: &Path,
        images: &Path,
        work: &Path,
        start: Start,
    ) -> anyhow::Result<LazyPages> {
        let Start {
            id,
            daemon_started,
            deferred,
            cgroup,
        } = start;
        let pages = page_files(images, deferred)?;
        let daemon_dir = work.join("daemon");
        fs::create_dir(&daemon_dir).with_context(|| format!("create {}", daemon_dir.display()))?;
        // Close-on-exec: no other child of the shim may hold the write end; the daemon's
        // copy loses the flag between fork and exec, under its own number.
        let (ready_read, ready_write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("status pipe")?;
        let status_fd = ready_write.as_raw_fd();
        let mut command = Command::new(criu);
        command
            .arg("lazy-pages")
            .arg("--images-dir")
            .arg(images)
            .arg("--work-dir")
            .arg(&daemon_dir)
            .args(["--log-file", DAEMON_LOG, "-v2", "--status-fd"])
            .arg(status_fd.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::fcntl(status_fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("start {} lazy-pages", criu.display()))?;
        drop(ready_write);
        let pid = child.id() as i32;
        // Never waited on through `child`: the shim's reaper collects it.
        drop(child);
        let pidfd = match pidfd_open(pid) {
            Ok(pidfd) => pidfd,
            Err(e) => {
                // Gone already (reaped: ESRCH), or still our unreaped child: kill it by pid.
                if e.raw_os_error() != Some(libc::ESRCH) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                return Err(e).context("pidfd of the lazy-pages daemon");
            }
        };
        let daemon = Daemon { pid, pidfd };
        // The relay listens at once; it waits for the daemon only once CRIU connected, so the
        // daemon's start (its exec and its own kernel probe) runs beside the restore's.
        let socket = work.join(SOCKET);
        let listener = match UnixListener::bind(&socket) {
            Ok(l) => l,
            Err(e) => {
                daemon.kill();
                return Err(e).with_context(|| format!("listen on {}", socket.display()));
            }
        };
        let listener_dup = match listener.as_fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(e) => {
                daemon.kill();
                return Err(e).context("duplicate the relay's socket");
            }
        };
        let upstream = match daemon.pidfd.try_clone() {
            Ok(pidfd) => Upstream {
                ready: ready_read,
                socket: daemon_dir.join(SOCKET),
                log: daemon_dir.join(DAEMON_LOG),
                pidfd: Some(pidfd),
            },
            Err(e) => {
                daemon.kill();
                return Err(e).context("duplicate the daemon's pidfd");
            }
        };
        let held = Held::default();
        let relay_held = held.clone();
        let (connected_tx, connected) = mpsc::channel();
        let relay = match std::thread::Builder::new()
            .name("lazy-relay".into())
            .spawn(move || relay(listener, upstream, &relay_held, &connected_tx))
        {
            Ok(relay) => relay,
            Err(e) => {
                daemon.kill();
                return Err(e).context("start the lazy-pages relay");
            }
        };
        // From now on the daemon's exit is watched.
        match daemon.pidfd.try_clone() {
            Ok(pidfd) => {
                let _ = daemon_started.send((daemon.pid, pidfd));
            }
            Err(e) => {
                daemon.kill();
                let _ = nix::sys::socket::shutdown(
                    listener_dup.as_raw_fd(),
                    nix::sys::socket::Shutdown::Both,
                );
                let _ = relay.join();
                return Err(e).context("duplicate the daemon's pidfd");
            }
        }
        Ok(LazyPages {
            id,
            cgroup,
            daemon,
            relay,
            connected,
            outcome: std::cell::OnceCell::new(),
            held,
            listener: listener_dup,
            pages,
            daemon_dir,
        })
    }

    /// Waits until the relay reached the daemon, whose failure to listen must stop the
    /// restore before any task could fault on memory nobody serves; the error says why it
    /// could not. The answer is kept for later calls.
    pub fn wait_connected(&self) -> Result<(), String> {
        self.outcome
            .get_or_init(|| match self.connected.recv() {
                Ok(outcome) => outcome,
                Err(mpsc::RecvError) => {
                    Err("the lazy-pages relay ended before it reached the daemon".to_string())
                }
            })
            .clone()
    }

    /// Whether the daemon has exited (its pidfd is readable then).
    pub fn daemon_exited(&self) -> bool {
        let mut poll = [nix::poll::PollFd::new(
            self.daemon.pidfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        matches!(
            nix::poll::poll(&mut poll, nix::poll::PollTimeout::ZERO),
            Ok(n) if n > 0
        )
    }

    /// What the daemon's log ends with.
    pub fn daemon_log(&self) -> String {
        tail(&self.daemon_dir.join(DAEMON_LOG))
    }

    /// The restore failed: stops the daemon and the relay. CRIU may have failed after the
    /// processes resumed: any of them still there is killed before the userfaultfds go.
    /// Returns the relay's error, if it failed (e.g. the daemon never listened).
    pub fn abort(self) -> Option<String> {
        self.daemon.kill();
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let relayed = match self.relay.join() {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(_) => Some("the lazy-pages relay panicked".to_string()),
        };
        release(&self.held, Some(&self.cgroup));
        relayed
    }

    /// The restore succeeded: the processes run and the daemon streams their pages from the
    /// images; `work` (the restore's work directory, holding the daemon's) lives as long.
    pub fn running(self, work: tempfile::TempDir) -> LazySession {
        // The deferred page images are hashed while the processes run.
        let deferred: Vec<_> = self
            .pages
            .iter()
            .filter_map(|page| {
                let (digest, stamp) = page.deferred.clone()?;
                Some((page.path.clone(), page.file.try_clone(), digest, stamp))
            })
            .collect();
        let cgroup = self.cgroup.clone();
        let id = self.id.clone();
        let cancel = Arc::new(AtomicBool::new(false));
        let cancelled = cancel.clone();
        let verifier = std::thread::Builder::new()
            .name("lazy-verify".into())
            .spawn(move || {
                let mut pages = Vec::new();
                for (path, file, sha256, stamp) in deferred {
                    let file = file.map_err(|e| format!("{}: {e}", path.display()))?;
                    pages.push((path, file, sha256, stamp));
                }
                verify_deferred(pages, &cgroup, &cancelled).inspect_err(|e| {
                    log::error!("container {id}: lazy restore: {e}");
                })
            });
        LazySession {
            finished: false,
            cgroup: self.cgroup,
            cancel,
            verifier: Some(verifier),
            kept: vec![work],
            daemon: self.daemon,
            relay: Some(self.relay),
            held: self.held,
            listener: self.listener,
            pages: self.pages,
            daemon_dir: self.daemon_dir,
            started: Instant::now(),
        }
    }
}

fn wait_ready(ready: OwnedFd) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let mut poll = [nix::poll::PollFd::new(
            ready.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = nix::poll::PollTimeout::try_from(left.as_millis() as i32)
            .unwrap_or(nix::poll::PollTimeout::MAX);
        match nix::poll::poll(&mut poll, timeout) {
            Ok(0) => bail!("not ready after {} s", READY_TIMEOUT.as_secs()),
            Ok(_) => break,
            // The shim's SIGCHLD (any child's) interrupts the wait.
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("wait for the daemon"),
        }
    }
    let mut byte = [0u8; 1];
    let mut file = fs::File::from(ready);
    match file.read(&mut byte) {
        Ok(1) => Ok(()),
        Ok(_) => bail!("it exited before it listened"),
        Err(e) => Err(e).context("read its status"),
    }
}

/// The last lines of a log, for a message.
fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return format!("{} is empty", path.display());
    }
    let start = lines.len().saturating_sub(5);
    format!("{} says: {}", path.display(), lines[start..].join(" | "))
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` at a clean end of stream before the first.
fn read_exact_or_end(stream: &mut UnixStream, buf: &mut [u8]) -> anyhow::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => bail!("CRIU closed the lazy-pages socket mid-message"),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("read from CRIU"),
        }
    }
    Ok(true)
}

/// The daemon as the relay reaches it.
struct Upstream {
    /// The daemon's status pipe: one byte once it listens, end of file if it died first.
    ready: OwnedFd,
    /// Where it listens.
    socket: PathBuf,
    /// Its log, for the error if it never listens.
    log: PathBuf,
    /// Killed by the relay if anything fails (the watch on its exit then kills the container).
    pidfd: Option<OwnedFd>,
}

impl Upstream {
    /// Waits until the daemon listens and connects to it.
    fn connect(self) -> anyhow::Result<UnixStream> {
        wait_ready(self.ready)
            .and_then(|()| {
                UnixStream::connect(&self.socket)
                    .with_context(|| format!("connect to {}", self.socket.display()))
            })
            .map_err(|e| {
                e.context(format!(
                    "the lazy-pages daemon did not start: {}",
                    tail(&self.log)
                ))
            })
    }
}

/// Passes CRIU's messages on to the daemon, putting every userfaultfd into `held` before it
/// passes it on. CRIU connects early in its restore and sends a task's userfaultfd only once it
/// restored that task; the daemon is waited for in between (`connected` says when it was
/// reached, or why not). Whatever fails after CRIU connected (a daemon that never listens is
/// killed, and the watch on its exit kills the container), every userfaultfd CRIU sent is held
/// until it hangs up: one still queued in the socket would be released with it. Only
/// [`release`] releases them.
fn relay(
    listener: UnixListener,
    mut upstream: Upstream,
    held: &Held,
    connected: &mpsc::Sender<Result<(), String>>,
) -> anyhow::Result<()> {
    let (mut restore, _) = listener.accept().context("accept CRIU's restore")?;
    drop(listener);
    let daemon_pidfd = upstream.pidfd.take();
    let daemon = upstream.connect();
    let _ = connected.send(match &daemon {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{e:#}")),
    });
    let relayed = daemon.and_then(|daemon| forward(&mut restore, daemon, held));
    if relayed.is_err() {
        if let Some(pidfd) = &daemon_pidfd {
            kill_daemon(pidfd);
        }
        hold_until_end(&restore, held);
    }
    relayed
}

/// Passes CRIU's messages on to the daemon until CRIU's end of stream.
fn forward(restore: &mut UnixStream, mut daemon: UnixStream, held: &Held) -> anyhow::Result<()> {
    loop {
        let Some((pid, uffd)) = next_task(restore, held)? else {
            // End of stream: the daemon sees its hangup.
            return Ok(());
        };
        daemon
            .write_all(&pid.to_ne_bytes())
            .context("write to the daemon")?;
        let Some(uffd) = uffd else {
            continue;
        };
        let raw = [uffd];
        retry_eintr(|| {
            sendmsg::<()>(
                daemon.as_raw_fd(),
                &[std::io::IoSlice::new(&[0])],
                &[ControlMessage::ScmRights(&raw)],
                MsgFlags::empty(),
                None,
            )
        })
        .with_context(|| format!("pass task {pid}'s userfaultfd to the daemon"))?;
    }
}

/// Reads CRIU's next message: `None` at the end of the stream, else its word (a pid, or the
/// end mark) and, for a live task, its userfaultfd, put into `held` (which keeps it open until
/// [`release`]) before it is returned.
fn next_task(
    restore: &mut UnixStream,
    held: &Held,
) -> anyhow::Result<Option<(i32, Option<RawFd>)>> {
    let mut word = [0u8; 4];
    if !read_exact_or_end(restore, &mut word)? {
        return Ok(None);
    }
    let pid = i32::from_ne_bytes(word);
    if u32::from_ne_bytes(word) == RESTORE_FINISHED || pid <= 0 {
        return Ok(Some((pid, None)));
    }
    // A live task: its userfaultfd is held before anything goes to the daemon, whose death
    // must never release it.
    let mut byte = [0u8; 1];
    let (received, fds) = retry_eintr(|| receive_descriptors(restore.as_raw_fd(), &mut byte))
        .context("receive a userfaultfd from CRIU")?;
    let [uffd] = <[OwnedFd; 1]>::try_from(fds).map_err(|fds| {
        anyhow::anyhow!(
            "CRIU sent task {pid} with {} descriptors ({received} byte(s)), not one userfaultfd",
            fds.len()
        )
    })?;
    let raw = uffd.as_raw_fd();
    held.lock().unwrap_or_else(|p| p.into_inner()).push(uffd);
    Ok(Some((pid, Some(raw))))
}

/// Holds every userfaultfd CRIU still sends, until it hangs up, whatever the bytes around them
/// (after a relay error the stream may be out of step with CRIU's messages).
fn hold_until_end(restore: &UnixStream, held: &Held) {
    loop {
        let mut bytes = [0u8; 64];
        match retry_eintr(|| receive_descriptors(restore.as_raw_fd(), &mut bytes)) {
            Ok((received, fds)) => {
                held.lock().unwrap_or_else(|p| p.into_inner()).extend(fds);
                if received == 0 {
                    return;
                }
            }
            Err(e) => {
                log::warn!("lazy restore: read CRIU's lazy-pages socket to its end: {e}");
                return;
            }
        }
    }
}

/// Calls `f` again while a signal (the shim's SIGCHLD) interrupts it.
fn retry_eintr<T>(mut f: impl FnMut() -> nix::Result<T>) -> nix::Result<T> {
    loop {
        match f() {
            Err(nix::errno::Errno::EINTR) => {}
            other => return other,
        }
    }
}

/// Receives up to `buf.len()` bytes and the descriptors that came with them (`SCM_RIGHTS`,
/// close-on-exec; room for 8, CRIU sends one per message). A truncated message (`MSG_CTRUNC`)
/// returns none: nix cannot list its descriptors, which stay open, never released.
fn receive_descriptors(socket: RawFd, buf: &mut [u8]) -> nix::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; 8]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        socket,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().into_iter().flatten() {
        if let ControlMessageOwned::ScmRights(rights) = cmsg {
            // SAFETY: SCM_RIGHTS descriptors are new and ours.
            fds.extend(
                rights
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok((msg.bytes, fds))
}

/// A lazily restored container while its pages stream in.
pub struct LazySession {
    /// Set by [`LazySession::finish`]; a session dropped unfinished kills the container.
    finished: bool,
    cgroup: ContainerCgroup,
    /// Stops the verifier early (the container is being killed anyway).
    cancel: Arc<AtomicBool>,
    /// Hashes the page images verified only now (see [`verify_deferred`]).
    verifier: Option<std::io::Result<JoinHandle<Result<(), String>>>>,
    /// Directories the daemon reads or writes until it exits (removed after).
    kept: Vec<tempfile::TempDir>,
    daemon: Daemon,
    relay: Option<JoinHandle<anyhow::Result<()>>>,
    held: Held,
    /// The relay's listening socket, shut down to wake a relay CRIU never reached.
    listener: OwnedFd,
    pages: Vec<PageFile>,
    daemon_dir: PathBuf,
    started: Instant,
}

impl Drop for LazySession {
    /// Dropped unfinished (a failure after the restore, before the session was handed over):
    /// the daemon is stopped and the container killed before the userfaultfds go.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.cancel.store(true, Ordering::Relaxed);
        self.daemon.kill();
        let _ = self.stop_relay();
        release(&self.held, Some(&self.cgroup));
    }
}

/// How a lazy restore ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every page arrived, every page image is the manifest's and none changed meanwhile.
    Complete,
    /// The daemon failed (the container's processes were killed before any could read a page
    /// that never arrived), or a page image is not the manifest's or changed (they were killed
    /// as soon as that was found).
    Killed(String),
}

impl LazySession {
    /// The daemon's pid.
    pub fn daemon_pid(&self) -> i32 {
        self.daemon.pid
    }

    /// Keeps `dir` (e.g. expanded page images the daemon reads) until the session ends.
    pub fn keep(&mut self, dir: tempfile::TempDir) {
        self.kept.push(dir);
    }

    /// A handle that kills the daemon, for a container deleted before it finished.
    pub fn daemon_pidfd(&self) -> std::io::Result<OwnedFd> {
        self.daemon.pidfd.try_clone()
    }

    /// Decides once the daemon has exited with `exit_code` (as the reaper reports it: 128 +
    /// signal for a killed one): releases the held userfaultfds, after killing every process
    /// of `cgroup` unless the restore completed from unchanged files.
    pub fn finish(mut self, exit_code: i32) -> Outcome {
        self.finished = true;
        if exit_code != 0 {
            // The container dies anyway: no need to finish hashing its memory.
            self.cancel.store(true, Ordering::Relaxed);
        }
        let relayed = self.stop_relay();
        let verified = match self.verifier.take() {
            Some(Ok(handle)) => handle
                .join()
                .unwrap_or_else(|_| Err("the page verifier panicked".to_string())),
            Some(Err(e)) => Err(format!("start the page verifier: {e}")),
            None => Ok(()),
        };
        let verdict = if exit_code != 0 {
            Err(format!(
                "the lazy-pages daemon (pid {}) exited with {exit_code} before every page \
                 arrived; {}",
                self.daemon.pid,
                tail(&self.daemon_dir.join(DAEMON_LOG))
            ))
        } else if let Err(e) = relayed {
            Err(format!("the lazy-pages relay failed: {e}"))
        } else if let Err(e) = verified {
            Err(e)
        } else {
            self.changed_pages()
        };
        match verdict {
            Ok(()) => {
                release(&self.held, None);
                Outcome::Complete
            }
            Err(reason) => {
                // Only once the processes are gone may the kernel unregister the ranges.
                release(&self.held, Some(&self.cgroup));
                Outcome::Killed(reason)
            }
        }
    }

    /// Wakes a relay CRIU never reached and waits for it to end; its outcome.
    fn stop_relay(&mut self) -> Result<(), String> {
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        match self.relay.take().map(JoinHandle::join) {
            Some(Ok(Ok(()))) | None => Ok(()),
            Some(Ok(Err(e))) => Err(format!("{e:#}")),
            Some(Err(_)) => Err("the relay panicked".to_string()),
        }
    }

    /// Whether a pages file changed since the restore began (what the daemon served would not
    /// be what was verified).
    fn changed_pages(&self) -> Result<(), String> {
        for page in &self.pages {
            match page.file.metadata() {
                Ok(now) if !content_changed(&page.identity, &Identity::of(&now)) => {}
                Ok(_) => {
                    return Err(format!(
                        "{} changed while its pages were being served",
                        page.path.display()
                    ));
                }
                Err(e) => return Err(format!("{}: {e}", page.path.display())),
            }
        }
        Ok(())
    }

    /// Bytes of pages served, for the log.
    pub fn page_bytes(&self) -> u64 {
        self.pages.iter().map(|p| p.identity.size).sum()
    }

    /// Time since the processes resumed.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Freezes (`true`) or thaws the container's cgroup by writing its freezer file, only if the
/// cgroup is still there (libcgroups' freeze would create it again after a delete).
fn freeze_if_there(cgroup: &ContainerCgroup, frozen: bool) -> std::io::Result<()> {
    match cgroup.freezer_file() {
        Some(file) if file.path.parent().is_some_and(Path::is_dir) => {
            fs::write(&file.path, file.value(frozen))
        }
        _ => Ok(()),
    }
}

/// Kills every process of the container: freezes it (so that none runs on meanwhile), sends
/// each SIGKILL, thaws it (so that the kills land), and on cgroup v2 writes `cgroup.kill` too.
/// Each step is tried whatever the others did; failures are logged. A cgroup already removed
/// is left alone (nothing can run in it).
pub fn kill_all(cgroup: &ContainerCgroup) {
    if let Err(e) = freeze_if_there(cgroup, true) {
        log::warn!("lazy restore: freeze before the kill: {e}");
    }
    match cgroup.pids() {
        Ok(pids) => {
            for pid in pids {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
        Err(e) => log::warn!("lazy restore: list the processes to kill: {e:#}"),
    }
    if let Some(dir) = cgroup.v2_dir() {
        let kill = dir.join("cgroup.kill");
        if kill.exists()
            && let Err(e) = fs::write(&kill, "1")
        {
            log::warn!("lazy restore: write {}: {e}", kill.display());
        }
    }
    if let Err(e) = freeze_if_there(cgroup, false) {
        log::warn!("lazy restore: thaw after the kill: {e}");
    }
}

/// Whether the container has no process left, waiting up to [`KILL_CONFIRM`].
fn gone(cgroup: &ContainerCgroup) -> bool {
    let deadline = Instant::now() + KILL_CONFIRM;
    loop {
        match cgroup.pids() {
            Ok(pids) if pids.is_empty() => return true,
            // Its cgroup removed (the container deleted): nothing can be left in it.
            Err(_)
                if !cgroup.v2_dir().is_some_and(|dir| dir.is_dir())
                    && cgroup.v1_dir("freezer").is_none() =>
            {
                return true;
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Releases the held userfaultfds; with `kill`, only after every process of that cgroup is
/// killed and gone. If they cannot be confirmed gone, the descriptors are kept open for the
/// shim's lifetime (a leak) rather than let a survivor read zeros.
fn release(held: &Held, kill: Option<&ContainerCgroup>) {
    let fds = std::mem::take(&mut *held.lock().unwrap_or_else(|p| p.into_inner()));
    if fds.is_empty() {
        return;
    }
    if let Some(cgroup) = kill {
        kill_all(cgroup);
        if !gone(cgroup) {
            log::error!(
                "lazy restore: processes of {} outlived their kill: keeping {} userfaultfd(s) \
                 open so that none of them reads memory that never arrived",
                cgroup.path.display(),
                fds.len()
            );
            std::mem::forget(fds);
            return;
        }
    }
    drop(fds);
}

/// Kills the daemon behind `pidfd` (nothing if it already exited: a pidfd names only that
/// process), e.g. for a container deleted while its pages streamed in.
pub fn kill_daemon(pidfd: &OwnedFd) {
    // SAFETY: pidfd_send_signal with a valid pidfd, no siginfo.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay between a socket where CRIU connects and a daemon socket this test accepts on.
    struct Relay {
        _dir: tempfile::TempDir,
        upstream: UnixListener,
        held: Held,
        relay: JoinHandle<anyhow::Result<()>>,
        criu: UnixStream,
    }

    impl Relay {
        /// Starts the relay and connects to it as CRIU does; the daemon says it listens once
        /// CRIU connected.
        fn start() -> Relay {
            let (relay, ready) = Relay::starting();
            fs::File::from(ready).write_all(&[0]).unwrap();
            relay
        }

        /// The same, with the daemon's status pipe not written yet (returned).
        fn starting() -> (Relay, OwnedFd) {
            let dir = tempfile::tempdir().unwrap();
            let upstream_path = dir.path().join("daemon.socket");
            let upstream = UnixListener::bind(&upstream_path).unwrap();
            let listener = UnixListener::bind(dir.path().join(SOCKET)).unwrap();
            let (ready_read, ready_write) = nix::unistd::pipe().unwrap();
            let daemon = Upstream {
                ready: ready_read,
                socket: upstream_path,
                log: dir.path().join(DAEMON_LOG),
                pidfd: None,
            };
            let held = Held::default();
            let relay_held = held.clone();
            let (connected, _) = mpsc::channel();
            let relay =
                std::thread::spawn(move || relay(listener, daemon, &relay_held, &connected));
            let criu = UnixStream::connect(dir.path().join(SOCKET)).unwrap();
            let relay = Relay {
                _dir: dir,
                upstream,
                held,
                relay,
                criu,
            };
            (relay, ready_write)
        }
    }

    /// Sends a live task as CRIU does: its pid, then one byte carrying `uffd`.
    fn send_task(criu: &mut UnixStream, pid: i32, uffd: &OwnedFd) {
        criu.write_all(&pid.to_ne_bytes()).unwrap();
        sendmsg::<()>(
            criu.as_raw_fd(),
            &[std::io::IoSlice::new(&[0])],
            &[ControlMessage::ScmRights(&[uffd.as_raw_fd()])],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
    }

    #[test]
    fn the_relay_passes_pids_descriptors_and_the_end_mark_on_and_keeps_each_descriptor() {
        let Relay {
            _dir,
            upstream,
            held,
            relay,
            mut criu,
        } = Relay::start();
        let (mut daemon, _) = upstream.accept().unwrap();
        // A live task with a descriptor (a pipe stands in for a userfaultfd), a zombie, the end.
        let (pipe_read, pipe_write) = nix::unistd::pipe().unwrap();
        send_task(&mut criu, 42, &pipe_write);
        drop(pipe_write);
        criu.write_all(&(-7i32).to_ne_bytes()).unwrap();
        criu.write_all(&RESTORE_FINISHED.to_ne_bytes()).unwrap();
        drop(criu);

        let mut word = [0u8; 4];
        daemon.read_exact(&mut word).unwrap();
        assert_eq!(i32::from_ne_bytes(word), 42);
        let mut byte = [0u8; 1];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [std::io::IoSliceMut::new(&mut byte)];
        let msg = recvmsg::<()>(
            daemon.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .unwrap();
        let passed: Vec<RawFd> = msg
            .cmsgs()
            .unwrap()
            .flat_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => fds,
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(passed.len(), 1);
        daemon.read_exact(&mut word).unwrap();
        assert_eq!(i32::from_ne_bytes(word), -7);
        daemon.read_exact(&mut word).unwrap();
        assert_eq!(u32::from_ne_bytes(word), RESTORE_FINISHED);
        assert_eq!(
            daemon.read(&mut word).unwrap(),
            0,
            "end of stream passed on"
        );

        relay.join().unwrap().unwrap();
        let held = std::mem::take(&mut *held.lock().unwrap());
        assert_eq!(held.len(), 1);
        // The daemon's copy closed: the relay's still holds the pipe open.
        // SAFETY: the descriptor came with the message and is ours.
        drop(unsafe { OwnedFd::from_raw_fd(passed[0]) });
        let mut writer = fs::File::from(held.into_iter().next().unwrap());
        writer.write_all(b"x").unwrap();
        drop(writer);
        let mut got = String::new();
        fs::File::from(pipe_read).read_to_string(&mut got).unwrap();
        assert_eq!(got, "x");
    }

    #[test]
    fn a_descriptor_stays_held_when_the_daemon_is_gone() {
        let Relay {
            _dir,
            upstream,
            held,
            relay,
            mut criu,
        } = Relay::start();
        // The daemon accepts, then dies.
        drop(upstream.accept().unwrap());
        drop(upstream);
        // Two tasks, the second queued behind the first when passing the first on fails.
        let (_pipe_read, pipe_write) = nix::unistd::pipe().unwrap();
        send_task(&mut criu, 42, &pipe_write);
        let (_read_2, write_2) = nix::unistd::pipe().unwrap();
        send_task(&mut criu, 43, &write_2);
        criu.write_all(&RESTORE_FINISHED.to_ne_bytes()).unwrap();
        drop(criu);
        // Passing them on fails; every copy is held all the same, the queued one too.
        let err = relay.join().unwrap().unwrap_err();
        assert!(format!("{err:#}").contains("daemon"), "{err:#}");
        assert_eq!(held.lock().unwrap().len(), 2);
    }

    #[test]
    fn descriptors_sent_while_the_daemon_starts_are_passed_on_once_it_listens() {
        let (
            Relay {
                _dir,
                upstream,
                held,
                relay,
                mut criu,
            },
            ready,
        ) = Relay::starting();
        // CRIU restored a task before the daemon listens.
        let (_pipe_read, pipe_write) = nix::unistd::pipe().unwrap();
        send_task(&mut criu, 42, &pipe_write);
        criu.write_all(&RESTORE_FINISHED.to_ne_bytes()).unwrap();
        drop(criu);
        fs::File::from(ready).write_all(&[0]).unwrap();
        let (mut daemon, _) = upstream.accept().unwrap();
        let mut word = [0u8; 4];
        daemon.read_exact(&mut word).unwrap();
        assert_eq!(i32::from_ne_bytes(word), 42);
        let (_, passed) = receive_descriptors(daemon.as_raw_fd(), &mut [0]).unwrap();
        assert_eq!(passed.len(), 1);
        daemon.read_exact(&mut word).unwrap();
        assert_eq!(u32::from_ne_bytes(word), RESTORE_FINISHED);
        relay.join().unwrap().unwrap();
        assert_eq!(held.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_daemon_that_never_listens_fails_the_relay_which_holds_every_descriptor_sent() {
        let (
            Relay {
                _dir,
                upstream: _upstream,
                held,
                relay,
                mut criu,
            },
            ready,
        ) = Relay::starting();
        // Two tasks restored, one before and one after the daemon died (its status pipe
        // closed without a byte), then CRIU hangs up.
        let (_read_1, write_1) = nix::unistd::pipe().unwrap();
        send_task(&mut criu, 42, &write_1);
        drop(ready);
        let (_read_2, write_2) = nix::unistd::pipe().unwrap();
        send_task(&mut criu, 43, &write_2);
        drop(criu);
        let err = relay.join().unwrap().unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("the lazy-pages daemon did not start")
                && err.contains("exited before it listened"),
            "{err}"
        );
        assert_eq!(held.lock().unwrap().len(), 2, "both userfaultfds held");
    }

    /// A daemon that exits before it listens (a stand-in for `criu lazy-pages` that logs an
    /// error and exits) while CRIU's restore has connected and sent a task: the restore learns
    /// why, and the relay's error names the daemon's log.
    #[test]
    fn a_daemon_that_exits_before_it_listens_fails_the_restore_naming_its_log() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (images, work) = (dir.path().join("images"), dir.path().join("work"));
        fs::create_dir(&images).unwrap();
        fs::create_dir(&work).unwrap();
        // argv: lazy-pages --images-dir I --work-dir W --log-file L ...
        let criu = dir.path().join("criu");
        fs::write(
            &criu,
            "#!/bin/sh\necho 'Error (criu/uffd.c): no userfaultfd here' > \"$5/$7\"\nexit 1\n",
        )
        .unwrap();
        fs::set_permissions(&criu, fs::Permissions::from_mode(0o700)).unwrap();
        // A fork in another test thread may hold the script's write descriptor for a moment
        // (ETXTBSY): run it once first, until it runs.
        for attempt in 0.. {
            match Command::new(&criu).stderr(Stdio::null()).status() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < 50 => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                other => {
                    other.unwrap();
                    break;
                }
            }
        }
        let spec = oci_spec::runtime::SpecBuilder::default()
            .linux(
                oci_spec::runtime::LinuxBuilder::default()
                    .cgroups_path(format!("/podsnap-unit-absent-{}", std::process::id()))
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        let (daemon_started, daemon) = tokio::sync::oneshot::channel();
        let pages = LazyPages::start(
            &criu,
            &images,
            &work,
            Start {
                id: "c1".into(),
                daemon_started,
                deferred: Vec::new(),
                cgroup: ContainerCgroup::of(&spec, "c1"),
            },
        )
        .unwrap();
        assert!(daemon.blocking_recv().is_ok(), "the daemon's pid was sent");
        // CRIU's restore connects and sends a restored task.
        let mut restore = UnixStream::connect(work.join(SOCKET)).unwrap();
        let (_pipe_read, pipe_write) = nix::unistd::pipe().unwrap();
        send_task(&mut restore, 42, &pipe_write);
        let why = pages.wait_connected().unwrap_err();
        assert!(
            why.contains("the lazy-pages daemon did not start")
                && why.contains("exited before it listened")
                && why.contains("no userfaultfd here"),
            "{why}"
        );
        // CRIU hangs up; aborting returns the relay's error.
        drop(restore);
        let relayed = pages.abort().expect("the relay's error");
        assert!(relayed.contains("did not start"), "{relayed}");
    }

    #[test]
    fn a_task_message_without_its_descriptor_fails_the_relay() {
        let Relay {
            _dir,
            upstream,
            held,
            relay,
            mut criu,
        } = Relay::start();
        let _daemon = upstream.accept().unwrap();
        criu.write_all(&42i32.to_ne_bytes()).unwrap();
        criu.write_all(&[0]).unwrap();
        drop(criu);
        let err = relay.join().unwrap().unwrap_err();
        assert!(
            format!("{err:#}").contains("not one userfaultfd"),
            "{err:#}"
        );
        assert!(held.lock().unwrap().is_empty());
    }
}

//! The zygote: a single-threaded fork of the shim, made before the async runtime starts, that
//! performs every libcontainer operation which clones (a container's init, an exec process).
//!
//! Cloning from a multi-threaded process can deadlock on locks held by other threads at fork
//! time, so the shim never clones itself. It sends a [`Request`] (JSON) with the process's stdio
//! file descriptors (`SCM_RIGHTS`) over a `SOCK_SEQPACKET` pair and gets back the new pid. The
//! zygote creates containers as *siblings* (`CLONE_PARENT`), so every container process is a
//! child of the shim, which reaps it. The zygote dies with the shim (`PR_SET_PDEATHSIG`, and the
//! end of its socket). It does not own any state: the containers' state lives in
//! libcontainer's state directory.
//!
//! A zygote without work for 30 s is let go (the shim closes its socket and it exits), so that a
//! running pod costs one process; the next create or exec spawns one again — the shim's own
//! binary executed afresh with `--podsnap-zygote` (a fork is what a multi-threaded shim must
//! not do), serving the socket on its fd 3 — at the cost of a few milliseconds once.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use nix::unistd::{ForkResult, fork};
use serde::{Deserialize, Serialize};

/// Largest message either side sends.
const MAX_MESSAGE: usize = 64 * 1024;

/// What the shim asks the zygote to do.
#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Create a container's init process (libcontainer `as_init`), left waiting for `start`.
    CreateInit {
        id: String,
        bundle: PathBuf,
        state_root: PathBuf,
        console_socket: Option<PathBuf>,
        /// Which of stdin, stdout, stderr follow as file descriptors, in that order.
        stdio: [bool; 3],
    },
    /// Start an exec process in a running container (libcontainer `as_tenant`).
    Exec {
        id: String,
        state_root: PathBuf,
        /// An OCI `process` JSON file.
        process: PathBuf,
        console_socket: Option<PathBuf>,
        stdio: [bool; 3],
    },
}

/// The zygote's answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    Started { pid: i32 },
    Failed { kind: Failure, message: String },
}

/// What the zygote sends back: its answer, and what it logged while it worked on it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub response: Response,
    pub logs: Vec<LogLine>,
}

/// One log record of the zygote's (libcontainer's and libcgroups' `tracing` events arrive as
/// `log` records), for the shim to log: the zygote was forked before the shim's logger existed,
/// so everything reaches one logger, the shim's, which containerd collects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub level: String,
    pub target: String,
    pub message: String,
}

/// Most log lines one reply carries; the rest are counted, not sent.
const MAX_LOG_LINES: usize = 64;
/// Longest message a log line carries.
const MAX_LOG_MESSAGE: usize = 512;
/// Longest failure message a reply carries. With the log lines (escaped as JSON at worst six
/// bytes a byte: 64 x 512 x 6 = 192 KiB would not fit), a reply stays within [`MAX_MESSAGE`]
/// the lines are cut to [`MAX_LOG_BYTES`] in all.
const MAX_FAILURE_MESSAGE: usize = 4 * 1024;
/// Most bytes of log messages (and targets) one reply carries.
const MAX_LOG_BYTES: usize = 4 * 1024;

/// The zygote's logger: keeps Info and above until the reply takes them.
struct Collector {
    lines: Mutex<(Vec<LogLine>, usize)>,
}

impl Collector {
    const fn new() -> Self {
        Collector {
            lines: Mutex::new((Vec::new(), 0)),
        }
    }

    fn take(&self) -> Vec<LogLine> {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let (mut kept, dropped) = std::mem::take(&mut *lines);
        if dropped > 0 {
            kept.push(LogLine {
                level: log::Level::Warn.to_string(),
                target: "zygote".into(),
                message: format!("{dropped} more log lines left out"),
            });
        }
        kept
    }
}

impl log::Log for Collector {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let used: usize = lines
            .0
            .iter()
            .map(|l| l.message.len() + l.target.len())
            .sum();
        if lines.0.len() >= MAX_LOG_LINES || used >= MAX_LOG_BYTES {
            lines.1 += 1;
            return;
        }
        let message = truncated(record.args().to_string(), MAX_LOG_MESSAGE);
        lines.0.push(LogLine {
            level: record.level().to_string(),
            target: record.target().to_string(),
            message,
        });
    }

    fn flush(&self) {}
}

static COLLECTOR: Collector = Collector::new();

/// `text` cut to at most `max` bytes (on a character boundary), marked `...` when cut.
fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// Logs what the zygote logged, through the shim's logger, under target `zygote`.
fn relay(lines: &[LogLine]) {
    for line in lines {
        let level = line.level.parse().unwrap_or(log::Level::Info);
        log::log!(target: "zygote", level, "{}: {}", line.target, line.message);
    }
}

/// What kind of failure the zygote met, from libcontainer's error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Failure {
    /// The spec, id, process or request is invalid.
    InvalidArgument,
    /// The container exists already.
    AlreadyExists,
    /// The container (its state directory) does not exist.
    NotFound,
    /// The container is not in a state that allows it.
    FailedPrecondition,
    /// libcontainer failed to create or exec the process.
    Libcontainer,
}

impl Failure {
    /// The kind of a libcontainer error.
    fn of(error: &LibcontainerError) -> Failure {
        match error {
            LibcontainerError::Exist => Failure::AlreadyExists,
            LibcontainerError::NoDirectory => Failure::NotFound,
            LibcontainerError::IncorrectStatus(_) => Failure::FailedPrecondition,
            LibcontainerError::InvalidInput(_)
            | LibcontainerError::InvalidID(_)
            | LibcontainerError::MissingSpec(_)
            | LibcontainerError::InvalidSpec(_)
            | LibcontainerError::Spec(_) => Failure::InvalidArgument,
            _ => Failure::Libcontainer,
        }
    }
}

/// Why [`call`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    /// The zygote did not start, or this process is not the shim that forked it.
    #[error("the zygote is not running")]
    NotRunning,
    /// The socket to the zygote failed.
    #[error("{what} the zygote: {source}")]
    Channel {
        what: &'static str,
        source: nix::Error,
    },
    /// The zygote exited before it answered.
    #[error("the zygote exited")]
    Exited,
    /// A message could not be encoded or decoded.
    #[error("zygote message: {0}")]
    Message(#[from] serde_json::Error),
    /// The zygote answered that it failed.
    #[error("{message}")]
    Failed { kind: Failure, message: String },
}

impl From<ZygoteError> for crate::error::Error {
    fn from(error: ZygoteError) -> Self {
        use crate::error::Error;
        match error {
            ZygoteError::Failed { kind, message } => match kind {
                Failure::InvalidArgument => Error::InvalidArgument(message),
                Failure::AlreadyExists => Error::AlreadyExists(message),
                Failure::NotFound => Error::NotFound(message),
                Failure::FailedPrecondition => Error::FailedPrecondition(message),
                Failure::Libcontainer => Error::Libcontainer(message),
            },
            other => Error::Internal(other.into()),
        }
    }
}

/// The argument that makes the shim's binary a zygote (one the shim spawns again after an idle
/// one left), serving the socket on fd 3.
pub const ZYGOTE_ARG: &str = "--podsnap-zygote";

/// How long a zygote with nothing to do stays: then the shim closes its socket and it exits,
/// so that a running pod's shim holds no second process (the next create or exec spawns one
/// again, a few ms).
const IDLE: Duration = Duration::from_secs(30);

/// The shim's side of the zygote's socket; `None` once an idle zygote was let go.
struct Channel {
    sock: Option<OwnedFd>,
    last_used: Instant,
}

static CHANNEL: OnceLock<Mutex<Channel>> = OnceLock::new();

fn channel() -> Result<std::sync::MutexGuard<'static, Channel>, ZygoteError> {
    let channel = CHANNEL.get().ok_or(ZygoteError::NotRunning)?;
    Ok(channel.lock().unwrap_or_else(|e| e.into_inner()))
}

/// The shim's and the zygote's ends of a new socket, both close-on-exec.
fn socket_pair() -> nix::Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
}

/// Forks the zygote. Must be called while the process still has a single thread.
pub fn start() -> anyhow::Result<()> {
    let (shim_end, zygote_end) = socket_pair().context("socketpair for the zygote")?;
    // SAFETY: called from `main` before the tokio runtime or any other thread exists, so the
    // child is a faithful single-threaded copy.
    match unsafe { fork() }.context("fork the zygote")? {
        ForkResult::Child => {
            drop(shim_end);
            serve(zygote_end, true)
        }
        ForkResult::Parent { .. } => {
            drop(zygote_end);
            CHANNEL
                .set(Mutex::new(Channel {
                    sock: Some(shim_end),
                    last_used: Instant::now(),
                }))
                .map_err(|_| anyhow::anyhow!("zygote started twice"))?;
            std::thread::Builder::new()
                .name("zygote-idle".into())
                .spawn(let_idle_go)
                .context("start the zygote's idle watch")?;
            Ok(())
        }
    }
}

/// Closes the socket of a zygote idle for [`IDLE`]: it reads the end of it and exits.
fn let_idle_go() {
    loop {
        std::thread::sleep(IDLE / 6);
        let Ok(mut channel) = channel() else { return };
        if channel.sock.is_some() && channel.last_used.elapsed() >= IDLE {
            channel.sock = None;
            log::debug!("the zygote was idle for {IDLE:?}: let go");
        }
    }
}

/// Spawns a zygote again (the shim's binary with [`ZYGOTE_ARG`], then the shim's own
/// arguments, so that it is known as this pod's): spawned, not forked, since the shim has
/// threads by now. Its socket is its fd 3.
fn respawn() -> Result<OwnedFd, ZygoteError> {
    use std::os::unix::process::CommandExt;
    let failed = |what, source| ZygoteError::Channel { what, source };
    let (shim_end, zygote_end) = socket_pair().map_err(|e| failed("create a socket for", e))?;
    let fd = zygote_end.as_raw_fd();
    let mut command = std::process::Command::new("/proc/self/exe");
    // Named as the shim is (ps, leak checks), with the zygote's argument first.
    if let Some(arg0) = std::env::args_os().next() {
        command.arg0(arg0);
    }
    command
        .arg(ZYGOTE_ARG)
        .args(std::env::args_os().skip(1))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: dup2 is async-signal-safe; it gives the child the socket as fd 3, without
    // close-on-exec (other children of the shim never see it: the original is CLOEXEC).
    unsafe {
        command.pre_exec(move || {
            // dup2 onto itself would leave close-on-exec set: clear it then.
            let done = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if done < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // The child is reaped by the shim's reaper like any child of the shim.
    command.spawn().map_err(|e| {
        failed(
            "spawn",
            nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        )
    })?;
    drop(zygote_end);
    log::debug!("zygote spawned again");
    Ok(shim_end)
}

/// The zygote spawned by [`respawn`]: serves fd 3 until the shim closes it.
pub fn run_spawned() -> ! {
    // SAFETY: fd 3 is the socket `respawn` gave this process, and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(3) };
    // Close-on-exec again, so that no hook libcontainer runs from here inherits it.
    // SAFETY: a plain fcntl on a descriptor this process owns.
    if unsafe { libc::fcntl(sock.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
        std::process::exit(1);
    }
    serve(sock, false)
}

/// Sends `request` with `fds` to the zygote and waits for the pid it started. Blocking: call it
/// from a blocking thread.
pub fn call(request: &Request, fds: &[BorrowedFd<'_>]) -> Result<i32, ZygoteError> {
    let mut channel = channel()?;
    if channel.sock.is_none() {
        channel.sock = Some(respawn()?);
    }
    let sock = channel.sock.as_ref().expect("set above").as_raw_fd();
    let payload = serde_json::to_vec(request)?;
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let reply = send(sock, &payload, &raw)
        .map_err(|source| ZygoteError::Channel {
            what: "send to",
            source,
        })
        .and_then(|()| {
            recv(sock).map_err(|source| ZygoteError::Channel {
                what: "receive from",
                source,
            })
        });
    channel.last_used = Instant::now();
    let (reply, _fds) = match reply {
        Ok(Some(reply)) => reply,
        // A zygote that died is spawned again by the next call.
        Ok(None) => {
            channel.sock = None;
            return Err(ZygoteError::Exited);
        }
        Err(e) => {
            channel.sock = None;
            return Err(e);
        }
    };
    drop(channel);
    let reply: Reply = serde_json::from_slice(&reply)?;
    relay(&reply.logs);
    match reply.response {
        Response::Started { pid } => Ok(pid),
        Response::Failed { kind, message } => Err(ZygoteError::Failed { kind, message }),
    }
}

fn send(sock: RawFd, payload: &[u8], fds: &[RawFd]) -> nix::Result<()> {
    let iov = [IoSlice::new(payload)];
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsgs };
    sendmsg::<()>(sock, &iov, cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

fn recv(sock: RawFd) -> nix::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg_space = nix::cmsg_space!([RawFd; 3]);
    let (len, fds, truncated) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            sock,
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: the kernel just installed these descriptors in this process; nothing
                // else owns them.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        (msg.bytes, fds, truncated)
    };
    if truncated {
        // A message larger than either side sends: refuse it rather than decode a part.
        return Err(nix::errno::Errno::EMSGSIZE);
    }
    if len == 0 {
        return Ok(None);
    }
    buf.truncate(len);
    Ok(Some((buf, fds)))
}

/// Serves the zygote's socket until the shim closes it (or dies: its end closes with it).
/// `forked`: made by [`start`], from the shim's main thread, whose death it follows at once.
/// (A spawned one does not ask for that: the signal would come when the shim *thread* that
/// spawned it ends.)
fn serve(sock: OwnedFd, forked: bool) -> ! {
    // SAFETY: plain prctl calls on this (single-threaded) process.
    unsafe {
        if forked {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        }
        libc::prctl(libc::PR_SET_NAME, c"podsnap-zygote".as_ptr());
    }
    if nix::unistd::getppid() == nix::unistd::Pid::from_raw(1) {
        std::process::exit(0);
    }
    // The shim's stdout is how `start` learns the server is up: containerd waits for it to
    // close, so the zygote must not hold it (nor stdin/stderr).
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..=2 {
            let _ = nix::unistd::dup2(null.as_raw_fd(), fd);
        }
    }
    // Everything logged here goes back with the reply ([`Collector`]).
    if log::set_logger(&COLLECTOR).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    loop {
        let (payload, fds) = match recv(sock.as_raw_fd()) {
            Ok(Some(message)) => message,
            Ok(None) => std::process::exit(0),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => std::process::exit(1),
        };
        let response = match serde_json::from_slice::<Request>(&payload) {
            Ok(request) => match handle(request, fds) {
                Ok(pid) => Response::Started { pid },
                Err((kind, err)) => Response::Failed {
                    kind,
                    message: truncated(format!("{err:#}"), MAX_FAILURE_MESSAGE),
                },
            },
            Err(err) => Response::Failed {
                kind: Failure::InvalidArgument,
                message: format!("malformed zygote request: {err}"),
            },
        };
        let reply = Reply {
            response,
            logs: COLLECTOR.take(),
        };
        let reply = serde_json::to_vec(&reply).unwrap_or_default();
        if send(sock.as_raw_fd(), &reply, &[]).is_err() {
            std::process::exit(1);
        }
    }
}

/// Error chain of a libcontainer error, outermost first.
fn chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

fn with_stdio(
    mut builder: ContainerBuilder,
    stdio: [bool; 3],
    fds: Vec<OwnedFd>,
) -> anyhow::Result<ContainerBuilder> {
    let wanted = stdio.iter().filter(|s| **s).count();
    anyhow::ensure!(
        fds.len() == wanted,
        "expected {wanted} stdio descriptors, got {}",
        fds.len()
    );
    let mut fds = fds.into_iter();
    if stdio[0] {
        builder = builder.with_stdin(fds.next().expect("counted"));
    }
    if stdio[1] {
        builder = builder.with_stdout(fds.next().expect("counted"));
    }
    if stdio[2] {
        builder = builder.with_stderr(fds.next().expect("counted"));
    }
    Ok(builder)
}

/// A failure of [`handle`]: its kind and what failed.
type Failed = (Failure, anyhow::Error);

/// `context` and the chain of a libcontainer error, with its kind.
fn failed(context: String, error: &LibcontainerError) -> Failed {
    (
        Failure::of(error),
        anyhow::anyhow!("{context}: {}", chain(error)),
    )
}

fn handle(request: Request, fds: Vec<OwnedFd>) -> Result<i32, Failed> {
    match request {
        Request::CreateInit {
            id,
            bundle,
            state_root,
            console_socket,
            stdio,
        } => {
            let builder = ContainerBuilder::new(id.clone(), SyscallType::Linux)
                .with_root_path(&state_root)
                .map_err(|e| failed(format!("state root {}", state_root.display()), &e))?
                .with_console_socket(console_socket);
            let container = with_stdio(builder, stdio, fds)
                .map_err(|e| (Failure::Libcontainer, e))?
                .as_init(&bundle)
                .with_systemd(false)
                .with_detach(true)
                .as_sibling(true)
                .build()
                .map_err(|e| failed(format!("create container {id}"), &e))?;
            container.pid().map(|pid| pid.as_raw()).ok_or_else(|| {
                (
                    Failure::Libcontainer,
                    anyhow::anyhow!("container {id} has no init pid after create"),
                )
            })
        }
        Request::Exec {
            id,
            state_root,
            process,
            console_socket,
            stdio,
        } => {
            let builder = ContainerBuilder::new(id.clone(), SyscallType::Linux)
                .with_root_path(&state_root)
                .map_err(|e| failed(format!("state root {}", state_root.display()), &e))?
                .with_console_socket(console_socket);
            let pid = with_stdio(builder, stdio, fds)
                .map_err(|e| (Failure::Libcontainer, e))?
                .as_tenant()
                .with_process(Some(process))
                .with_detach(true)
                .as_sibling(true)
                .build()
                .map_err(|e| failed(format!("exec in container {id}"), &e))?;
            Ok(pid.as_raw())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::Log;

    fn record(collector: &Collector, level: log::Level, message: &str) {
        collector.log(
            &log::Record::builder()
                .level(level)
                .target("libcgroups::v1::manager")
                .args(format_args!("{message}"))
                .build(),
        );
    }

    #[test]
    fn the_zygote_keeps_info_and_above_bounded_and_hands_them_over_once() {
        let collector = Collector::new();
        record(&collector, log::Level::Debug, "not kept");
        record(
            &collector,
            log::Level::Warn,
            "cgroup hugetlb not supported on this system",
        );
        record(
            &collector,
            log::Level::Error,
            &"x".repeat(MAX_LOG_MESSAGE * 2),
        );
        let lines = collector.take();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(
            lines[0],
            LogLine {
                level: "WARN".into(),
                target: "libcgroups::v1::manager".into(),
                message: "cgroup hugetlb not supported on this system".into(),
            }
        );
        assert_eq!(lines[1].message.len(), MAX_LOG_MESSAGE + 3);
        assert!(collector.take().is_empty(), "handed over twice");
        for _ in 0..MAX_LOG_LINES + 5 {
            record(&collector, log::Level::Info, "busy");
        }
        let lines = collector.take();
        assert_eq!(lines.len(), MAX_LOG_LINES + 1);
        assert_eq!(lines.last().unwrap().message, "5 more log lines left out");
        // The worst reply still fits the zygote's message size: as many lines as fit, each of
        // control characters (six bytes each as JSON), and the longest failure message.
        let collector = Collector::new();
        for _ in 0..MAX_LOG_LINES {
            record(
                &collector,
                log::Level::Error,
                &"\u{1}".repeat(MAX_LOG_MESSAGE),
            );
        }
        let reply = Reply {
            response: Response::Failed {
                kind: Failure::Libcontainer,
                message: truncated("\u{1}".repeat(MAX_FAILURE_MESSAGE * 2), MAX_FAILURE_MESSAGE),
            },
            logs: collector.take(),
        };
        let size = serde_json::to_vec(&reply).unwrap().len();
        assert!(size < MAX_MESSAGE, "{size}");
    }
}

//! One `criu swrk` process and the SOCK_SEQPACKET socket to it.
//!
//! Owns spawning (`criu swrk <fd>` with the child's end of a socketpair, plus any fds the restored
//! tasks inherit), framing `criu_req`/`criu_resp` messages (one protobuf message per packet, fds as
//! `SCM_RIGHTS`), noticing that swrk died, and reaping it. It knows nothing of dump or restore
//! semantics. This is the crate's fd edge and the only place with `unsafe`.

use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, recv, recvmsg,
    send, socketpair,
};
use prost::Message;

use crate::rpc;

/// How long swrk gets to exit on its own after its last answer (or after closing the socket)
/// before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(10);

/// Most fds one message may carry; CRIU sends at most one.
const MAX_FDS: usize = 4;

/// Why receiving a message failed.
#[derive(Debug)]
pub(crate) enum RecvError {
    /// The socket reached EOF or broke: swrk is gone.
    Closed,
    /// Nothing arrived before the deadline.
    TimedOut,
    /// A socket error other than the peer going away.
    Io(io::Error),
    /// The packet is not a `criu_resp`.
    Decode(prost::DecodeError),
}

/// A message from swrk and the fd that came with it, if any.
pub(crate) struct Received {
    pub(crate) resp: rpc::CriuResp,
    pub(crate) fd: Option<OwnedFd>,
}

/// A running `criu swrk`; killed and reaped on drop if still running.
pub(crate) struct Swrk {
    child: Option<Child>,
    pid: u32,
    sock: OwnedFd,
}

impl Swrk {
    /// Starts `binary swrk <fd>`. `inherit` are fds the child must have open (at the same numbers)
    /// besides its socket; they must not be 0, 1 or 2, which become /dev/null and stderr.
    pub(crate) fn spawn(binary: &Path, inherit: &[RawFd]) -> io::Result<Swrk> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut keep: Vec<RawFd> = Vec::with_capacity(inherit.len() + 1);
        keep.push(theirs.as_raw_fd());
        keep.extend_from_slice(inherit);
        debug_assert!(keep.iter().all(|fd| *fd > 2));

        let mut cmd = Command::new(binary);
        cmd.arg("swrk")
            .arg(theirs.as_raw_fd().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: the closure runs in the forked child before exec. It only calls fcntl(2), which
        // is async-signal-safe, on fds this process holds open (the socketpair end is owned by
        // `theirs`; `inherit` fds are owned by the caller for the duration of this call), and it
        // allocates nothing: `keep` was built before the fork and is only read.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &keep {
                    fcntl(*fd, FcntlArg::F_SETFD(FdFlag::empty())).map_err(io::Error::from)?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        // Our copy of swrk's end must go, or EOF would never tell us that swrk died.
        drop(theirs);
        let pid = child.id();
        tracing::debug!(pid, binary = %binary.display(), "criu swrk started");
        Ok(Swrk {
            child: Some(child),
            pid,
            sock: ours,
        })
    }

    /// The swrk process id.
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends one request. A broken socket (swrk died) reads as [`io::ErrorKind::BrokenPipe`] or
    /// `ConnectionReset`; MSG_NOSIGNAL keeps SIGPIPE away from the caller.
    pub(crate) fn send(&self, req: &rpc::CriuReq) -> io::Result<()> {
        let bytes = req.encode_to_vec();
        loop {
            match send(self.sock.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL) {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("sent {n} of {} bytes of a seqpacket", bytes.len()),
                    ));
                }
                Err(Errno::EINTR) => continue,
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Receives one message, waiting at most until `deadline`.
    pub(crate) fn recv(&self, deadline: Option<Instant>) -> Result<Received, RecvError> {
        self.wait_readable(deadline)?;
        let fd = self.sock.as_raw_fd();
        // A seqpacket's size: MSG_TRUNC makes recv return the full length even into no buffer.
        let len = loop {
            match recv(fd, &mut [], MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC) {
                Ok(0) => return Err(RecvError::Closed),
                Ok(len) => break len,
                Err(Errno::EINTR) => continue,
                Err(Errno::ECONNRESET | Errno::EPIPE) => return Err(RecvError::Closed),
                Err(err) => return Err(RecvError::Io(err.into())),
            }
        };
        let mut buf = vec![0u8; len];
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let (bytes, fds, truncated) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<UnixAddr>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    let cmsgs = msg.cmsgs().map_err(|e| RecvError::Io(e.into()))?;
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(raw) = c {
                            // SAFETY: the kernel just installed these fds into this process for
                            // this message (SCM_RIGHTS); nothing else knows or owns them.
                            fds.extend(
                                raw.into_iter()
                                    .map(|raw| unsafe { OwnedFd::from_raw_fd(raw) }),
                            );
                        }
                    }
                    break (msg.bytes, fds, msg.flags.contains(MsgFlags::MSG_TRUNC));
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::ECONNRESET | Errno::EPIPE) => return Err(RecvError::Closed),
                Err(err) => return Err(RecvError::Io(err.into())),
            }
        };
        if bytes == 0 {
            return Err(RecvError::Closed);
        }
        if truncated || bytes != len {
            return Err(RecvError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("seqpacket of {len} bytes read as {bytes}"),
            )));
        }
        let resp = rpc::CriuResp::decode(&buf[..bytes]).map_err(RecvError::Decode)?;
        let mut fds = fds.into_iter();
        let first = fds.next();
        if fds.next().is_some() {
            tracing::warn!(
                pid = self.pid,
                "criu sent more than one fd with a message; extra fds closed"
            );
        }
        Ok(Received { resp, fd: first })
    }

    fn wait_readable(&self, deadline: Option<Instant>) -> Result<(), RecvError> {
        loop {
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(RecvError::TimedOut);
                    }
                    // Round up so a sub-millisecond remainder does not spin.
                    PollTimeout::try_from(left.as_millis().saturating_add(1))
                        .unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(0) => continue,      // the deadline check above ends the loop
                Ok(_) => return Ok(()), // readable, or HUP/ERR: recv tells which
                Err(Errno::EINTR) => continue,
                Err(err) => return Err(RecvError::Io(err.into())),
            }
        }
    }

    /// Closes the socket and waits for swrk to exit, killing it after `grace`. Returns how it
    /// ended, or `None` when it was already reaped elsewhere (e.g. SIGCHLD ignored).
    pub(crate) fn finish(mut self, grace: Duration) -> Option<ExitStatus> {
        self.reap(grace)
    }

    /// Kills swrk right away and reaps it.
    pub(crate) fn kill(mut self) -> Option<ExitStatus> {
        self.reap(Duration::ZERO)
    }

    /// How long [`finish`](Self::finish) waits by default.
    pub(crate) fn exit_grace() -> Duration {
        EXIT_GRACE
    }

    fn reap(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // Closing our end makes a swrk that still waits for a request see EOF and exit.
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let deadline = Instant::now() + grace;
        let mut pause = Duration::from_millis(1);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    tracing::debug!(pid = self.pid, %status, "criu swrk exited");
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Ok(None) => {
                    if !grace.is_zero() {
                        tracing::warn!(
                            pid = self.pid,
                            ?grace,
                            "criu swrk did not exit; killing it"
                        );
                    }
                    let _ = child.kill();
                    return child.wait().ok();
                }
                Err(err) => {
                    // ECHILD: someone else reaped it (SIGCHLD set to SIG_IGN, a reaper thread).
                    tracing::debug!(pid = self.pid, %err, "cannot wait for criu swrk");
                    return None;
                }
            }
        }
    }
}

impl Drop for Swrk {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.reap(Duration::ZERO);
        }
    }
}

/// Describes how a process ended, e.g. `exited with status 1`, `was killed by signal 9 (SIGKILL)`.
pub(crate) fn describe_exit(status: Option<ExitStatus>) -> String {
    let Some(status) = status else {
        return "exited (status unknown: already reaped)".to_owned();
    };
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    if let Some(sig) = status.signal() {
        let name = nix::sys::signal::Signal::try_from(sig)
            .map(|s| s.as_str())
            .unwrap_or("unknown signal");
        let core = if status.core_dumped() {
            ", core dumped"
        } else {
            ""
        };
        return format!("was killed by signal {sig} ({name}{core})");
    }
    format!("ended ({status})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_descriptions_name_status_and_signal() {
        assert_eq!(
            describe_exit(Some(ExitStatus::from_raw(1 << 8))),
            "exited with status 1"
        );
        assert_eq!(
            describe_exit(Some(ExitStatus::from_raw(9))),
            "was killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            describe_exit(Some(ExitStatus::from_raw(11 | 0x80))),
            "was killed by signal 11 (SIGSEGV, core dumped)"
        );
        assert!(describe_exit(None).contains("already reaped"));
    }

    /// A stand-in for criu: a shell that answers nothing and exits when its socket fd is gone.
    /// Proves that EOF on the socket reports `Closed` promptly and the child is reaped.
    #[test]
    fn swrk_exiting_without_answer_reads_as_closed() {
        let swrk = Swrk::spawn(Path::new("/bin/true"), &[]).unwrap();
        let started = Instant::now();
        let got = swrk.recv(Some(Instant::now() + Duration::from_secs(10)));
        assert!(matches!(got, Err(RecvError::Closed)), "got {:?}", got.err());
        assert!(started.elapsed() < Duration::from_secs(5));
        let status = swrk.finish(Duration::from_secs(5));
        assert_eq!(describe_exit(status), "exited with status 0");
    }

    /// A stand-in that never answers: the deadline fires and kill() reaps it.
    #[test]
    fn silent_swrk_times_out_and_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("fake-criu");
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 60\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let swrk = spawn_fresh_script(&fake);
        let got = swrk.recv(Some(Instant::now() + Duration::from_millis(200)));
        assert!(
            matches!(got, Err(RecvError::TimedOut)),
            "got {:?}",
            got.err()
        );
        assert_eq!(
            describe_exit(swrk.kill()),
            "was killed by signal 9 (SIGKILL)"
        );
    }

    /// Spawns a script written just now, retrying ETXTBSY: a fork in another test thread may
    /// still hold the script's write fd for a moment.
    fn spawn_fresh_script(path: &Path) -> Swrk {
        for _ in 0..50 {
            match Swrk::spawn(path, &[]) {
                Err(err) if err.raw_os_error() == Some(Errno::ETXTBSY as i32) => {
                    thread::sleep(Duration::from_millis(20))
                }
                other => return other.unwrap(),
            }
        }
        panic!("{} stayed busy", path.display());
    }

    /// Sending to a dead swrk gives an error instead of SIGPIPE killing the test process.
    #[test]
    fn send_to_dead_swrk_is_an_error_not_sigpipe() {
        let swrk = Swrk::spawn(Path::new("/bin/true"), &[]).unwrap();
        let _ = swrk.recv(Some(Instant::now() + Duration::from_secs(10)));
        let req = rpc::CriuReq {
            r#type: rpc::CriuReqType::Version as i32,
            ..Default::default()
        };
        let err = swrk.send(&req).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ),
            "{err:?}"
        );
    }
}

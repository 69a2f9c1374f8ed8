//! The zygote: a single-threaded fork of the shim, made before the async runtime starts, that
//! performs every libcontainer operation which clones (a container's init, an exec process).
//!
//! Cloning from a multi-threaded process can deadlock on locks held by other threads at fork
//! time, so the shim never clones itself. It sends a [`Request`] (JSON) with the process's stdio
//! file descriptors (`SCM_RIGHTS`) over a `SOCK_SEQPACKET` pair and gets back the new pid. The
//! zygote creates containers as *siblings* (`CLONE_PARENT`), so every container process is a
//! child of the shim, which reaps it. The zygote dies with the shim (`PR_SET_PDEATHSIG`).
//! It does not own any state: the containers' state lives in libcontainer's state directory.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use anyhow::Context;
use libcontainer::container::builder::ContainerBuilder;
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
    Failed { message: String },
}

static CHANNEL: OnceLock<Mutex<OwnedFd>> = OnceLock::new();

/// Forks the zygote. Must be called while the process still has a single thread.
pub fn start() -> anyhow::Result<()> {
    let (shim_end, zygote_end) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .context("socketpair for the zygote")?;
    // SAFETY: called from `main` before the tokio runtime or any other thread exists, so the
    // child is a faithful single-threaded copy.
    match unsafe { fork() }.context("fork the zygote")? {
        ForkResult::Child => {
            drop(shim_end);
            serve(zygote_end)
        }
        ForkResult::Parent { .. } => {
            drop(zygote_end);
            CHANNEL
                .set(Mutex::new(shim_end))
                .map_err(|_| anyhow::anyhow!("zygote started twice"))?;
            Ok(())
        }
    }
}

/// Sends `request` with `fds` to the zygote and waits for the pid it started. Blocking: call it
/// from a blocking thread.
pub fn call(request: &Request, fds: &[BorrowedFd<'_>]) -> Result<i32, String> {
    let channel = CHANNEL
        .get()
        .ok_or_else(|| "the zygote is not running".to_string())?;
    let channel = channel.lock().unwrap_or_else(|e| e.into_inner());
    let payload = serde_json::to_vec(request).map_err(|e| format!("encode request: {e}"))?;
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    send(channel.as_raw_fd(), &payload, &raw).map_err(|e| format!("send to the zygote: {e}"))?;
    let (reply, _fds) = recv(channel.as_raw_fd())
        .map_err(|e| format!("receive from the zygote: {e}"))?
        .ok_or_else(|| "the zygote exited".to_string())?;
    match serde_json::from_slice(&reply).map_err(|e| format!("decode zygote reply: {e}"))? {
        Response::Started { pid } => Ok(pid),
        Response::Failed { message } => Err(message),
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
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            sock,
            &mut iov,
            Some(&mut cmsg_space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
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
        (msg.bytes, fds)
    };
    if len == 0 {
        return Ok(None);
    }
    buf.truncate(len);
    Ok(Some((buf, fds)))
}

fn serve(sock: OwnedFd) -> ! {
    // SAFETY: plain prctl calls on this (single-threaded) process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
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
                Err(err) => Response::Failed {
                    message: format!("{err:#}"),
                },
            },
            Err(err) => Response::Failed {
                message: format!("malformed zygote request: {err}"),
            },
        };
        let reply = serde_json::to_vec(&response).unwrap_or_default();
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

fn handle(request: Request, fds: Vec<OwnedFd>) -> anyhow::Result<i32> {
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
                .map_err(|e| anyhow::anyhow!("state root {}: {}", state_root.display(), chain(&e)))?
                .with_console_socket(console_socket);
            let container = with_stdio(builder, stdio, fds)?
                .as_init(&bundle)
                .with_systemd(false)
                .with_detach(true)
                .as_sibling(true)
                .build()
                .map_err(|e| anyhow::anyhow!("create container {id}: {}", chain(&e)))?;
            container
                .pid()
                .map(|pid| pid.as_raw())
                .ok_or_else(|| anyhow::anyhow!("container {id} has no init pid after create"))
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
                .map_err(|e| anyhow::anyhow!("state root {}: {}", state_root.display(), chain(&e)))?
                .with_console_socket(console_socket);
            let pid = with_stdio(builder, stdio, fds)?
                .as_tenant()
                .with_process(Some(process))
                .with_detach(true)
                .as_sibling(true)
                .build()
                .map_err(|e| anyhow::anyhow!("exec in container {id}: {}", chain(&e)))?;
            Ok(pid.as_raw())
        }
    }
}

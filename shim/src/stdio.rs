//! A process's stdio: the pipes or terminal a container process writes to, and the copying
//! between them and the FIFOs (or `file://` log URIs) containerd passes.
//!
//! The shim owns one end of every pipe, as containerd's runc shim does, so that output keeps
//! flowing to containerd however the process was started (created, exec'd or restored by CRIU,
//! which re-attaches the same pipes with `inherit-fd`). This module does not know containers.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use nix::fcntl::OFlag;
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Where containerd wants a process's stdio to go.
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// The container's side of a process's stdio, to hand to the zygote (or to CRIU).
#[derive(Default)]
pub struct ContainerStdio {
    /// stdin, stdout, stderr; `None` leaves that descriptor to libcontainer's default.
    pub fds: [Option<OwnedFd>; 3],
    /// Set when the process has a terminal: libcontainer sends the pty master here.
    pub console: Option<ConsoleSocket>,
}

impl ContainerStdio {
    /// Which of the three descriptors are present, and the present ones in order.
    pub fn to_send(&self) -> ([bool; 3], Vec<BorrowedFd<'_>>) {
        let present = [
            self.fds[0].is_some(),
            self.fds[1].is_some(),
            self.fds[2].is_some(),
        ];
        let fds = self.fds.iter().flatten().map(|fd| fd.as_fd()).collect();
        (present, fds)
    }
}

/// The shim's side of a process's stdio, alive while the process may write.
#[derive(Default)]
pub struct ShimStdio {
    /// Copies stdin from containerd into the process; aborted by CloseIO.
    stdin: Option<JoinHandle<()>>,
    /// Finish when the process's output has been fully copied out.
    outputs: Vec<oneshot::Receiver<()>>,
    /// The terminal's master side, for resizing.
    console: Option<OwnedFd>,
    /// The shim's ends of the pipes, kept so CRIU can re-attach a restored process to them.
    pub pipe_inodes: Vec<(u8, u64)>,
}

impl ShimStdio {
    /// Stops feeding stdin: the process reads EOF.
    pub fn close_stdin(&mut self) {
        if let Some(task) = self.stdin.take() {
            task.abort();
        }
    }

    /// Waits (at most `limit`) until everything the process wrote reached containerd.
    pub async fn drain(&mut self, limit: Duration) {
        let outputs = std::mem::take(&mut self.outputs);
        let _ = tokio::time::timeout(limit, async {
            for done in outputs {
                let _ = done.await;
            }
        })
        .await;
    }

    /// Sets the terminal size, if the process has one.
    pub fn resize(&self, width: u32, height: u32) -> anyhow::Result<()> {
        let console = self
            .console
            .as_ref()
            .context("the process has no terminal")?;
        let size = libc::winsize {
            ws_row: height as u16,
            ws_col: width as u16,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a valid `winsize` from the pointer; the fd is owned here.
        let rc = unsafe { libc::ioctl(console.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error()).context("set terminal size");
        }
        Ok(())
    }
}

impl Drop for ShimStdio {
    fn drop(&mut self) {
        self.close_stdin();
    }
}

/// A unix socket libcontainer connects to, to send the terminal's master side.
pub struct ConsoleSocket {
    dir: tempfile::TempDir,
    listener: UnixListener,
}

impl ConsoleSocket {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("podsnap-console-")
            .tempdir()
            .context("create console socket directory")?;
        let listener = UnixListener::bind(dir.path().join("s")).context("bind console socket")?;
        Ok(Self { dir, listener })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("s")
    }

    /// Receives the pty master libcontainer sends; gives up after `limit`.
    pub fn receive_master(&self, limit: Duration) -> anyhow::Result<OwnedFd> {
        self.listener.set_nonblocking(true)?;
        let deadline = std::time::Instant::now() + limit;
        let stream = loop {
            match self.listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    anyhow::ensure!(
                        std::time::Instant::now() < deadline,
                        "no terminal received on the console socket"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e).context("accept on the console socket"),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(limit))?;
        let mut buf = [0u8; 4096];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("receive the terminal")?;
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = cmsg
                && let Some(fd) = fds.first()
            {
                // SAFETY: the kernel just installed this descriptor; nobody else owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
            }
        }
        anyhow::bail!("the console socket message carried no terminal")
    }
}

fn pipe_pair() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).context("create a stdio pipe")
}

fn dev_null(write: bool) -> anyhow::Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .open("/dev/null")
        .context("open /dev/null")?;
    Ok(file.into())
}

/// The inode of a pipe, as CRIU names it (`pipe:[inode]`).
pub fn inode(fd: BorrowedFd<'_>) -> u64 {
    nix::sys::stat::fstat(fd.as_raw_fd())
        .map(|st| st.st_ino)
        .unwrap_or_default()
}

/// Opens where a process's output goes: a FIFO (the usual case) or a `file://` URI.
async fn open_output(
    target: &str,
) -> anyhow::Result<Box<dyn tokio::io::AsyncWrite + Unpin + Send>> {
    if let Some(path) = target.strip_prefix("file://") {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .with_context(|| format!("open log file {path}"))?;
        return Ok(Box::new(file));
    }
    anyhow::ensure!(
        !target.contains("://"),
        "unsupported stdio URI {target}: only FIFOs and file:// are supported"
    );
    // Read-write so that opening never blocks waiting for containerd's reader.
    let sender = pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(target)
        .with_context(|| format!("open output FIFO {target}"))?;
    Ok(Box::new(sender))
}

/// Copies everything from `from` (the shim's end of a process's output pipe) to `target`.
fn copy_output(from: OwnedFd, target: String) -> anyhow::Result<oneshot::Receiver<()>> {
    let mut reader = pipe::Receiver::from_owned_fd(from).context("watch an output pipe")?;
    let (done_tx, done_rx) = oneshot::channel();
    tokio::spawn(async move {
        match open_output(&target).await {
            Ok(mut writer) => {
                if let Err(e) = tokio::io::copy(&mut reader, &mut writer).await {
                    log::warn!("copy output to {target}: {e}");
                }
                let _ = writer.flush().await;
            }
            Err(e) => log::error!("{e:#}"),
        }
        let _ = done_tx.send(());
    });
    Ok(done_rx)
}

/// Sets up stdio for a new process: pipes (or a console socket) for the container side, and the
/// copying on the shim's side. The copying starts at once; for a terminal it starts in
/// [`attach_console`] once the master arrives.
pub fn prepare(paths: &StdioPaths) -> anyhow::Result<(ContainerStdio, ShimStdio)> {
    let mut container = ContainerStdio::default();
    let mut shim = ShimStdio::default();
    if paths.terminal {
        container.console = Some(ConsoleSocket::new()?);
        return Ok((container, shim));
    }
    if paths.stdin.is_empty() {
        container.fds[0] = Some(dev_null(false)?);
    } else {
        let (read, write) = pipe_pair()?;
        shim.pipe_inodes.push((0, inode(read.as_fd())));
        let path = paths.stdin.clone();
        let mut writer = pipe::Sender::from_owned_fd(write).context("watch the stdin pipe")?;
        container.fds[0] = Some(read);
        shim.stdin = Some(tokio::spawn(async move {
            match pipe::OpenOptions::new()
                .read_write(true)
                .open_receiver(&path)
            {
                Ok(mut fifo) => {
                    let _ = tokio::io::copy(&mut fifo, &mut writer).await;
                }
                Err(e) => log::error!("open stdin FIFO {path}: {e}"),
            }
        }));
    }
    for (index, target) in [(1usize, &paths.stdout), (2, &paths.stderr)] {
        if target.is_empty() {
            container.fds[index] = Some(dev_null(true)?);
            continue;
        }
        let (read, write) = pipe_pair()?;
        shim.pipe_inodes.push((index as u8, inode(write.as_fd())));
        shim.outputs.push(copy_output(read, target.clone())?);
        container.fds[index] = Some(write);
    }
    Ok((container, shim))
}

/// Waits for the terminal's master side and copies between it and containerd's FIFOs.
pub fn attach_console(
    console: &ConsoleSocket,
    paths: &StdioPaths,
    shim: &mut ShimStdio,
) -> anyhow::Result<()> {
    let master = console.receive_master(Duration::from_secs(10))?;
    if !paths.stdin.is_empty() {
        let mut input = open_fifo_blocking(Path::new(&paths.stdin))?;
        let mut to_master = File::from(master.try_clone()?);
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = input.read(&mut buf) {
                if n == 0 || to_master.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
    let (done_tx, done_rx) = oneshot::channel();
    let mut from_master = File::from(master.try_clone()?);
    let mut output = if paths.stdout.is_empty() {
        None
    } else {
        Some(open_fifo_blocking(Path::new(&paths.stdout))?)
    };
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        // EIO once every process holding the terminal's slave side has exited.
        while let Ok(n) = from_master.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Some(out) = output.as_mut()
                && out.write_all(&buf[..n]).is_err()
            {
                break;
            }
        }
        let _ = done_tx.send(());
    });
    shim.outputs.push(done_rx);
    shim.console = Some(master);
    Ok(())
}

fn open_fifo_blocking(path: &Path) -> anyhow::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("open FIFO {}", path.display()))
}

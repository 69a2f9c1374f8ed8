//! A client for CRIU's RPC protocol.
//!
//! Each call spawns `criu swrk <fd>` with one end of a `SOCK_SEQPACKET` socketpair, sends one
//! `criu_req` (CRIU's `images/rpc.proto`, compiled with prost into [`rpc`]), answers CRIU's
//! notifications through a [`Notify`] callback, and returns once CRIU answered and swrk was reaped.
//! If swrk dies or crashes the call returns an error promptly; every error names the operation,
//! CRIU's `cr_errno` or the errno, and carries the tail of CRIU's log.
//!
//! This crate owns the protocol and the swrk process. It does not decide what to checkpoint:
//! mounts, namespaces, cgroups and fds of a container are the caller's to describe with
//! [`DumpOptions`] and [`RestoreOptions`].
//!
//! ```no_run
//! use criu_rpc::{Criu, DumpOptions, RestoreOptions};
//! # fn main() -> criu_rpc::Result<()> {
//! let criu = Criu::new();
//! println!("CRIU {}", criu.version()?);
//! criu.dump(&DumpOptions::new(1234, "/var/lib/ckpt").leave_running(true))?;
//! let restored = criu.restore(&RestoreOptions::new("/var/lib/ckpt").rst_sibling(true))?;
//! println!("restored as pid {}", restored.pid);
//! # Ok(()) }
//! ```
//!
//! Reaping: the `criu swrk` child is reaped by pid. A process that reaps every child
//! (`waitpid(-1)`, `SIGCHLD` ignored) races with that; the client then reports the exit status as
//! unknown but still works. With [`RestoreOptions::rst_sibling`] the restored task becomes the
//! caller's child and the caller must reap it.

#![warn(missing_docs)]

mod error;
mod log_tail;
mod notify;
mod options;
#[allow(missing_docs, clippy::all, clippy::pedantic)]
#[rustfmt::skip]
pub mod rpc;
mod swrk;

use std::env;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

pub use error::{Error, ErrorKind, NotifyError, Operation, Result};
pub use notify::{Notification, Notify, NotifyScript};
pub use options::{
    CgroupMode, DEFAULT_LOG_LEVEL, DumpOptions, NetworkLockMethod, PageServer, PreDumpMode,
    RestoreOptions,
};

use log_tail::{LogTail, TAIL_LINES};
use swrk::{RecvError, Swrk, describe_exit};

/// Environment variable naming the CRIU binary.
pub const CRIU_ENV: &str = "PODSNAP_CRIU";

/// Where `hack/install.sh` installs CRIU.
pub const PODSNAP_CRIU_PATH: &str = "/var/cache/podsnap/bin/criu";

/// CRIU's default CPU checks (`CPU_CAP_FPU | CPU_CAP_INS`): the FPU (xsave) layout and the
/// instruction set features the images record.
pub const CPU_CAP_DEFAULT: u32 = 1 | (1 << 2);

/// The file a dump with [`DumpOptions::cpu_check`] records the CPU's features in.
pub const CPUINFO_IMAGE: &str = "cpuinfo.img";

/// Called with the pid of each CRIU swrk this client starts, right after it starts.
pub type SpawnHook = Arc<dyn Fn(u32) + Send + Sync>;

/// A CRIU installation to send requests to.
#[derive(Clone)]
pub struct Criu {
    binary: PathBuf,
    timeout: Option<Duration>,
    deadline: Option<Instant>,
    on_spawn: Option<SpawnHook>,
}

impl fmt::Debug for Criu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Criu")
            .field("binary", &self.binary)
            .field("timeout", &self.timeout)
            .field("deadline", &self.deadline)
            .field("on_spawn", &self.on_spawn.is_some())
            .finish()
    }
}

impl Default for Criu {
    fn default() -> Self {
        Criu::new()
    }
}

/// CRIU's version, as `criu --version` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Major number (4 in 4.1.1).
    pub major: i32,
    /// Minor number (1 in 4.1.1).
    pub minor: i32,
    /// Sublevel (1 in 4.1.1); 0 when CRIU sent none.
    pub sublevel: i32,
    /// Extra number of development versions.
    pub extra: Option<i32>,
    /// Git commit id of a build from a git tree.
    pub gitid: Option<String>,
    /// Release name.
    pub name: Option<String>,
}

impl Version {
    /// True when this version is `major.minor.sublevel` or newer.
    pub fn at_least(&self, major: i32, minor: i32, sublevel: i32) -> bool {
        (self.major, self.minor, self.sublevel) >= (major, minor, sublevel)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.sublevel)?;
        if let Some(gitid) = &self.gitid {
            write!(f, " ({gitid})")?;
        }
        Ok(())
    }
}

/// Optional features CRIU and the kernel support together (`criu check --feature`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// Soft-dirty memory tracking: needed by [`Criu::pre_dump`] and [`DumpOptions::track_mem`].
    pub mem_track: bool,
    /// userfaultfd-based lazy restore ([`RestoreOptions::lazy_pages`]).
    pub lazy_pages: bool,
    /// pidfd store for pid-reuse detection across pre-dumps.
    pub pidfd_store: bool,
}

/// The outcome of a successful restore.
#[derive(Debug)]
pub struct RestoreResult {
    /// The restored root task's pid. With [`RestoreOptions::rst_sibling`] it is the caller's
    /// child, to be reaped by the caller.
    pub pid: i32,
    /// The pty master CRIU sent with `orphan-pts-master`, unless a callback took it.
    pub orphan_pts_master: Option<OwnedFd>,
}

/// Where CRIU writes this request's log.
struct LogSource<'a> {
    dir: BorrowedFd<'a>,
    shown_dir: &'a Path,
    file: String,
}

impl LogSource<'_> {
    fn tail(&self) -> LogTail {
        LogTail::read(self.dir, self.shown_dir, &self.file, TAIL_LINES)
    }
}

/// One request to send to a fresh swrk.
struct Exchange<'a> {
    op: Operation,
    req: rpc::CriuReq,
    answer: rpc::CriuReqType,
    inherit: &'a [RawFd],
    log: Option<LogSource<'a>>,
}

/// CRIU's answer, and what notifications left for the caller.
struct Answer {
    resp: rpc::CriuResp,
    orphan_pts_master: Option<OwnedFd>,
}

impl Criu {
    /// The CRIU from `$PODSNAP_CRIU`, else [`PODSNAP_CRIU_PATH`] if it exists, else `criu` on
    /// `PATH`.
    pub fn new() -> Self {
        let binary = match env::var_os(CRIU_ENV) {
            Some(path) if !path.is_empty() => PathBuf::from(path),
            _ if Path::new(PODSNAP_CRIU_PATH).exists() => PathBuf::from(PODSNAP_CRIU_PATH),
            _ => PathBuf::from("criu"),
        };
        Criu::with_binary(binary)
    }

    /// The CRIU binary at `path` (a bare name is looked up on `PATH`).
    pub fn with_binary(path: impl Into<PathBuf>) -> Self {
        Criu {
            binary: path.into(),
            timeout: None,
            deadline: None,
            on_spawn: None,
        }
    }

    /// Calls `hook` with the pid of every swrk started from now on, before any request is
    /// sent to it: for whoever must outlive this process and wait for a CRIU it leaves behind
    /// (a swrk dumping a process goes on when its client dies, and at the end puts the freezer
    /// cgroup back as it found it).
    pub fn on_spawn(mut self, hook: SpawnHook) -> Self {
        self.on_spawn = Some(hook);
        self
    }

    /// Give up when CRIU sends nothing for `timeout` (between two notifications or before its
    /// answer): swrk is killed and the call fails with [`ErrorKind::Timeout`]. Time spent in
    /// [`Notify`] callbacks does not count. Default: no limit. Dumps of large processes take
    /// seconds per GiB; choose accordingly.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Give up at `deadline` however often CRIU spoke before (a [`timeout`](Self::timeout)
    /// starts again with each notification): swrk is killed and the call fails with
    /// [`ErrorKind::Timeout`]. Time spent in [`Notify`] callbacks is not cut short.
    pub fn deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// The CRIU binary this client runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// CRIU's version.
    pub fn version(&self) -> Result<Version> {
        let req = rpc::CriuReq {
            r#type: rpc::CriuReqType::Version as i32,
            ..Default::default()
        };
        let exchange = Exchange {
            op: Operation::Version,
            req,
            answer: rpc::CriuReqType::Version,
            inherit: &[],
            log: None,
        };
        let answer = self.exchange(exchange, None)?;
        let v = answer.resp.version.ok_or_else(|| {
            Error::new(
                Operation::Version,
                ErrorKind::Protocol("VERSION answer without a version".into()),
            )
        })?;
        Ok(Version {
            major: v.major_number,
            minor: v.minor_number,
            sublevel: v.sublevel.unwrap_or(0),
            extra: v.extra,
            gitid: v.gitid,
            name: v.name,
        })
    }

    /// Checks that the kernel supports what CRIU needs (`criu check`). CRIU's log goes to a private
    /// temporary directory, removed afterwards; its tail is in the error.
    pub fn check(&self) -> Result<()> {
        self.logged_check(Operation::Check, rpc::CriuReqType::Check, None, None)
    }

    /// Whether this CPU has what the images in `images_dir` were dumped with
    /// ([`DumpOptions::cpu_check`]): its FPU and instruction features (`criu cpuinfo check
    /// --cpu-cap=fpu,ins`). Reads `cpuinfo.img` there and writes nothing there: CRIU's log goes
    /// to a private temporary directory, removed afterwards; its tail is in the error.
    pub fn cpuinfo_check(&self, images_dir: &Path) -> Result<()> {
        self.logged_check(
            Operation::CpuinfoCheck,
            rpc::CriuReqType::CpuinfoCheck,
            Some(images_dir),
            Some(CPU_CAP_DEFAULT),
        )
    }

    /// A request that only answers yes or no (`CHECK`, `CPUINFO_CHECK`), CRIU's log in a private
    /// temporary directory (also the images directory when `images_dir` is `None`), removed
    /// afterwards; the log's tail is in the error.
    fn logged_check(
        &self,
        op: Operation,
        kind: rpc::CriuReqType,
        images_dir: Option<&Path>,
        cpu_cap: Option<u32>,
    ) -> Result<()> {
        let stem = op.as_str().replace(' ', "-");
        let dir = PrivateDir::create(&stem).map_err(|source| {
            Error::new(
                op,
                ErrorKind::OpenDir {
                    what: "temporary",
                    path: env::temp_dir(),
                    source,
                },
            )
        })?;
        let work = open_dir(op, "temporary", &dir.path)?;
        let images = images_dir
            .map(|path| open_dir(op, "images", path))
            .transpose()?;
        let log_file = format!("{stem}.log");
        let opts = rpc::CriuOpts {
            images_dir_fd: images.as_ref().unwrap_or(&work).as_raw_fd(),
            work_dir_fd: Some(work.as_raw_fd()),
            log_file: Some(log_file.clone()),
            log_level: Some(DEFAULT_LOG_LEVEL),
            cpu_cap,
            ..Default::default()
        };
        let req = rpc::CriuReq {
            r#type: kind as i32,
            opts: Some(opts),
            ..Default::default()
        };
        let log = LogSource {
            dir: work.as_fd(),
            shown_dir: &dir.path,
            file: log_file,
        };
        let exchange = Exchange {
            op,
            req,
            answer: kind,
            inherit: &[],
            log: Some(log),
        };
        self.exchange(exchange, None).map(drop)
    }

    /// Which optional features work here (`criu check --feature`).
    pub fn features(&self) -> Result<Features> {
        let op = Operation::FeatureCheck;
        let asked = rpc::CriuFeatures {
            mem_track: Some(true),
            lazy_pages: Some(true),
            pidfd_store: Some(true),
        };
        let req = rpc::CriuReq {
            r#type: rpc::CriuReqType::FeatureCheck as i32,
            features: Some(asked),
            ..Default::default()
        };
        let exchange = Exchange {
            op,
            req,
            answer: rpc::CriuReqType::FeatureCheck,
            inherit: &[],
            log: None,
        };
        let answer = self.exchange(exchange, None)?;
        let got = answer.resp.features.ok_or_else(|| {
            Error::new(
                op,
                ErrorKind::Protocol("FEATURE_CHECK answer without features".into()),
            )
        })?;
        Ok(Features {
            mem_track: got.mem_track.unwrap_or(false),
            lazy_pages: got.lazy_pages.unwrap_or(false),
            pidfd_store: got.pidfd_store.unwrap_or(false),
        })
    }

    /// Dumps the process tree `opts` names into its images directory.
    pub fn dump(&self, opts: &DumpOptions) -> Result<()> {
        self.dump_inner(Operation::Dump, opts, None)
    }

    /// [`dump`](Self::dump), handing CRIU's notifications (`pre-dump`, `network-lock`,
    /// `post-dump`, ...) to `notify`.
    pub fn dump_with(&self, opts: &DumpOptions, notify: &mut dyn Notify) -> Result<()> {
        self.dump_inner(Operation::Dump, opts, Some(notify))
    }

    /// Pre-dumps memory for a later incremental [`dump`](Self::dump) with
    /// [`DumpOptions::parent_image`]; the tasks keep running. Needs soft-dirty tracking: where the
    /// kernel lacks it (see [`Criu::features`]) this fails with [`ErrorKind::Unsupported`]
    /// without touching the tasks.
    pub fn pre_dump(&self, opts: &DumpOptions) -> Result<()> {
        self.dump_inner(Operation::PreDump, opts, None)
    }

    fn dump_inner(
        &self,
        op: Operation,
        opts: &DumpOptions,
        notify: Option<&mut dyn Notify>,
    ) -> Result<()> {
        let (kind, log_name) = match op {
            Operation::PreDump => (rpc::CriuReqType::SinglePreDump, "pre-dump.log"),
            _ => (rpc::CriuReqType::Dump, "dump.log"),
        };
        opts.validate(log_name)
            .map_err(|kind| Error::new(op, kind))?;
        if op == Operation::PreDump || opts.needs_mem_track() {
            self.require_mem_track(op)?;
        }
        let images = open_dir(op, "images", opts.images_dir())?;
        let work = opts
            .work_dir_path()
            .map(|dir| open_dir(op, "work", dir))
            .transpose()?;
        let work_fd = work.as_ref().map(AsRawFd::as_raw_fd);
        let criu_opts = opts.to_criu_opts(images.as_raw_fd(), work_fd, log_name, notify.is_some());
        let req = rpc::CriuReq {
            r#type: kind as i32,
            opts: Some(criu_opts),
            ..Default::default()
        };
        let log = LogSource {
            dir: work.as_ref().unwrap_or(&images).as_fd(),
            shown_dir: opts.work_or_images_dir(),
            file: opts.log_file_or(log_name),
        };
        tracing::info!(%op, pid = opts.pid(), images = %opts.images_dir().display(), "criu dump starting");
        let exchange = Exchange {
            op,
            req,
            answer: kind,
            inherit: &[],
            log: Some(log),
        };
        self.exchange(exchange, notify).map(drop)
    }

    fn require_mem_track(&self, op: Operation) -> Result<()> {
        let features = self.features().map_err(|err| {
            let why = format!("cannot tell whether memory tracking works: {err}");
            Error::new(
                op,
                ErrorKind::Unsupported {
                    feature: "mem_track",
                    detail: why,
                },
            )
        })?;
        if features.mem_track {
            return Ok(());
        }
        Err(Error::new(
            op,
            ErrorKind::Unsupported {
                feature: "mem_track",
                detail: "the kernel has no soft-dirty page tracking (CONFIG_MEM_SOFT_DIRTY), which pre-dump and \
                         track_mem need; take a full dump instead"
                    .into(),
            },
        ))
    }

    /// Restores the process tree from the images directory `opts` names.
    pub fn restore(&self, opts: &RestoreOptions<'_>) -> Result<RestoreResult> {
        self.restore_inner(opts, None)
    }

    /// [`restore`](Self::restore), handing CRIU's notifications (`setup-namespaces`,
    /// `post-restore`, `pre-resume`, `orphan-pts-master`, ...) to `notify`.
    pub fn restore_with(
        &self,
        opts: &RestoreOptions<'_>,
        notify: &mut dyn Notify,
    ) -> Result<RestoreResult> {
        self.restore_inner(opts, Some(notify))
    }

    fn restore_inner(
        &self,
        opts: &RestoreOptions<'_>,
        notify: Option<&mut dyn Notify>,
    ) -> Result<RestoreResult> {
        let op = Operation::Restore;
        let log_name = "restore.log";
        opts.validate(log_name)
            .map_err(|kind| Error::new(op, kind))?;
        let images = open_dir(op, "images", opts.images_dir())?;
        let work = opts
            .work_dir_path()
            .map(|dir| open_dir(op, "work", dir))
            .transpose()?;
        // Duplicates at fd numbers >= 3 (never stdio), close-on-exec here; swrk::spawn makes
        // exactly these inheritable in the child.
        let inherited: Vec<OwnedFd> = opts
            .inherit_fds()
            .map(|i| {
                i.fd.try_clone_to_owned().map_err(|source| {
                    Error::new(
                        op,
                        ErrorKind::InvalidOptions(format!(
                            "cannot duplicate inherit_fd {}: {source}",
                            i.key
                        )),
                    )
                })
            })
            .collect::<Result<_>>()?;
        let inherited_raw: Vec<RawFd> = inherited.iter().map(AsRawFd::as_raw_fd).collect();
        let wants_notify = notify.is_some() || opts.wants_orphan_pts_master();
        let criu_opts = opts.to_criu_opts(
            images.as_raw_fd(),
            work.as_ref().map(AsRawFd::as_raw_fd),
            log_name,
            wants_notify,
            &inherited_raw,
        );
        let req = rpc::CriuReq {
            r#type: rpc::CriuReqType::Restore as i32,
            opts: Some(criu_opts),
            ..Default::default()
        };
        let log = LogSource {
            dir: work.as_ref().unwrap_or(&images).as_fd(),
            shown_dir: opts.work_or_images_dir(),
            file: opts.log_file_or(log_name),
        };
        tracing::info!(images = %opts.images_dir().display(), "criu restore starting");
        let exchange = Exchange {
            op,
            req,
            answer: rpc::CriuReqType::Restore,
            inherit: &inherited_raw,
            log: Some(log),
        };
        let mut no_callback =
            |_: &mut Notification| -> std::result::Result<(), NotifyError> { Ok(()) };
        let notify: Option<&mut dyn Notify> = match notify {
            Some(notify) => Some(notify),
            None if wants_notify => Some(&mut no_callback),
            None => None,
        };
        let answer = self.exchange(exchange, notify)?;
        drop(inherited);
        let pid = answer
            .resp
            .restore
            .as_ref()
            .map(|r| r.pid)
            .filter(|pid| *pid > 0)
            .ok_or_else(|| {
                Error::new(
                    op,
                    ErrorKind::Protocol("RESTORE answer without the restored pid".into()),
                )
            })?;
        tracing::info!(pid, "criu restore done");
        Ok(RestoreResult {
            pid,
            orphan_pts_master: answer.orphan_pts_master,
        })
    }

    /// Runs one request on a fresh swrk: send, answer notifications, read the answer, reap swrk.
    fn exchange(&self, ex: Exchange<'_>, mut notify: Option<&mut dyn Notify>) -> Result<Answer> {
        let Exchange {
            op,
            req,
            answer,
            inherit,
            log,
        } = ex;
        let tail = || log.as_ref().map(LogSource::tail).unwrap_or_default();
        let swrk = Swrk::spawn(&self.binary, inherit).map_err(|source| {
            Error::new(
                op,
                ErrorKind::Spawn {
                    binary: self.binary.clone(),
                    source,
                },
            )
        })?;
        let pid = swrk.pid();
        if let Some(hook) = &self.on_spawn {
            hook(pid);
        }
        let died = |swrk: Swrk| {
            let status = describe_exit(swrk.finish(Duration::from_secs(5)));
            tracing::warn!(%op, pid, %status, "criu swrk died");
            ErrorKind::SwrkExited { pid, status }
        };

        if let Err(err) = swrk.send(&req) {
            let kind = if is_disconnect(&err) {
                died(swrk)
            } else {
                swrk.kill();
                ErrorKind::Transport(err)
            };
            return Err(Error::new(op, kind).with_log(tail()));
        }

        let mut callback_failure: Option<(String, NotifyError)> = None;
        let mut orphan_pts_master = None;
        loop {
            let deadline = match (self.timeout.map(|t| Instant::now() + t), self.deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let msg = match swrk.recv(deadline) {
                Ok(msg) => msg,
                Err(err) => {
                    let kind = match err {
                        RecvError::Closed => match callback_failure.take() {
                            Some((script, source)) => {
                                swrk.finish(Duration::from_secs(5));
                                ErrorKind::Notify { script, source }
                            }
                            None => died(swrk),
                        },
                        RecvError::TimedOut => {
                            swrk.kill();
                            ErrorKind::Timeout(self.timeout.unwrap_or_default())
                        }
                        RecvError::Io(err) => {
                            swrk.kill();
                            ErrorKind::Transport(err)
                        }
                        RecvError::Decode(err) => {
                            swrk.kill();
                            ErrorKind::Protocol(format!("cannot decode criu_resp: {err}"))
                        }
                    };
                    return Err(Error::new(op, kind).with_log(tail()));
                }
            };

            if msg.resp.r#type == rpc::CriuReqType::Notify as i32 {
                let n = msg.resp.notify.unwrap_or_default();
                let script = NotifyScript::from(n.script.as_deref().unwrap_or(""));
                tracing::debug!(%op, %script, pid = ?n.pid, fd = msg.fd.is_some(), "criu notify");
                let mut notification = Notification::new(script.clone(), n.pid, msg.fd, pid);
                let outcome = match notify.as_deref_mut() {
                    Some(callback) => callback.notify(&mut notification),
                    None => Ok(()),
                };
                let (fd, external) = notification.into_parts();
                if script == NotifyScript::OrphanPtsMaster && fd.is_some() {
                    orphan_pts_master = fd;
                }
                let success = outcome.is_ok();
                if let Err(source) = outcome {
                    tracing::warn!(%op, %script, error = %source, "notify callback failed; criu aborts");
                    callback_failure.get_or_insert((script.to_string(), source));
                }
                let reply = rpc::CriuReq {
                    r#type: rpc::CriuReqType::Notify as i32,
                    notify_success: Some(success),
                    opts: (!external.is_empty()).then(|| rpc::CriuOpts {
                        external,
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                match swrk.send(&reply) {
                    Ok(()) => continue,
                    // swrk died (perhaps the callback killed it): the next recv sees EOF.
                    Err(err) if is_disconnect(&err) => continue,
                    Err(err) => {
                        swrk.kill();
                        return Err(Error::new(op, ErrorKind::Transport(err)).with_log(tail()));
                    }
                }
            }

            // The final answer: swrk exits after it. Reap first so the log is complete.
            let status = swrk.finish(Swrk::exit_grace());
            let resp = msg.resp;
            if let Some((script, source)) = callback_failure {
                return Err(Error::new(op, ErrorKind::Notify { script, source }).with_log(tail()));
            }
            if !resp.success {
                let log = tail();
                let kind = ErrorKind::Failed {
                    cr_errno: resp.cr_errno.filter(|e| *e != 0),
                    errmsg: resp.cr_errmsg,
                    last_error: log.last_error(),
                };
                tracing::warn!(%op, pid, status = %describe_exit(status), "criu failed");
                return Err(Error::new(op, kind).with_log(log));
            }
            if resp.r#type != answer as i32 {
                let got = rpc::CriuReqType::try_from(resp.r#type).map_or_else(
                    |_| format!("type {}", resp.r#type),
                    |t| t.as_str_name().to_owned(),
                );
                let kind = ErrorKind::Protocol(format!(
                    "expected a {} answer, got {got}",
                    answer.as_str_name()
                ));
                return Err(Error::new(op, kind).with_log(tail()));
            }
            if status.is_some_and(|s| !s.success()) {
                tracing::debug!(%op, pid, status = %describe_exit(status), "criu swrk answered, then exited uncleanly");
            }
            return Ok(Answer {
                resp,
                orphan_pts_master,
            });
        }
    }
}

fn is_disconnect(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
    )
}

/// Opens a directory to pass to CRIU as an fd (close-on-exec: CRIU reads it through
/// `/proc/<our pid>/fd/<n>`, so swrk need not inherit it).
fn open_dir(op: Operation, what: &'static str, path: &Path) -> Result<OwnedFd> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_DIRECTORY.bits())
        .open(path)
        .map(OwnedFd::from)
        .map_err(|source| {
            Error::new(
                op,
                ErrorKind::OpenDir {
                    what,
                    path: path.to_owned(),
                    source,
                },
            )
        })
}

/// A 0700 directory under the temporary directory, removed on drop.
struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    fn create(purpose: &str) -> std::io::Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let path =
            env::temp_dir().join(format!("criu-rpc-{purpose}.{}.{nanos}", std::process::id()));
        fs::DirBuilder::new().mode(0o700).create(&path)?;
        Ok(PrivateDir { path })
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        if let Err(err) = fs::remove_dir_all(&self.path) {
            tracing::debug!(path = %self.path.display(), %err, "cannot remove temporary directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_display_and_ordering() {
        let v = Version {
            major: 4,
            minor: 1,
            sublevel: 1,
            extra: None,
            gitid: None,
            name: None,
        };
        assert_eq!(v.to_string(), "4.1.1");
        assert!(v.at_least(4, 1, 1));
        assert!(v.at_least(3, 19, 0));
        assert!(!v.at_least(4, 2, 0));
        let git = Version {
            gitid: Some("abc123".into()),
            ..v
        };
        assert_eq!(git.to_string(), "4.1.1 (abc123)");
    }

    #[test]
    fn binary_comes_from_env_then_install_path_then_path() {
        assert_eq!(Criu::with_binary("/x/criu").binary(), Path::new("/x/criu"));
        let default = Criu::new();
        match env::var_os(CRIU_ENV) {
            Some(path) if !path.is_empty() => assert_eq!(default.binary(), Path::new(&path)),
            _ if Path::new(PODSNAP_CRIU_PATH).exists() => {
                assert_eq!(default.binary(), Path::new(PODSNAP_CRIU_PATH))
            }
            _ => assert_eq!(default.binary(), Path::new("criu")),
        }
    }

    #[test]
    fn the_spawn_hook_hears_each_swrk_pid_and_a_failed_spawn_is_not_reported() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let hook: SpawnHook = {
            let seen = seen.clone();
            Arc::new(move |pid| seen.lock().unwrap().push(pid))
        };
        // /bin/true starts and exits without an answer: one pid heard, the call fails.
        let err = Criu::with_binary("/bin/true")
            .on_spawn(hook.clone())
            .version()
            .unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::SwrkExited { .. }),
            "{err:?}"
        );
        let pids = seen.lock().unwrap().clone();
        assert_eq!(pids.len(), 1, "{pids:?}");
        assert!(pids[0] > 0);
        let _ = Criu::with_binary("/nonexistent/criu")
            .on_spawn(hook)
            .version()
            .unwrap_err();
        assert_eq!(
            seen.lock().unwrap().len(),
            1,
            "a swrk that never started was reported"
        );
        assert!(format!("{:?}", Criu::new()).contains("on_spawn: false"));
    }

    #[test]
    fn missing_binary_is_a_spawn_error_naming_it() {
        let err = Criu::with_binary("/nonexistent/criu")
            .version()
            .unwrap_err();
        assert_eq!(err.operation(), Operation::Version);
        assert!(matches!(err.kind(), ErrorKind::Spawn { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("/nonexistent/criu swrk"), "{text}");
        assert!(text.contains("No such file"), "{text}");
    }

    #[test]
    fn missing_images_dir_fails_before_criu_starts() {
        let err = Criu::with_binary("/nonexistent/criu")
            .dump(&DumpOptions::new(1, "/nonexistent/images"))
            .unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::OpenDir { what: "images", .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("/nonexistent/images"), "{err}");
    }

    #[test]
    fn dump_of_pid_zero_is_refused() {
        let err = Criu::with_binary("/nonexistent/criu")
            .dump(&DumpOptions::new(0, "/"))
            .unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::InvalidOptions(_)),
            "{err:?}"
        );
    }
}

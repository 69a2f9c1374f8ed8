//! One container of the pod and its processes (the init and any exec'd ones): their lifecycle
//! from create to delete, on top of libcontainer and the [`zygote`].
//!
//! This module owns the container's bundle mounts, its libcontainer state and its processes'
//! stdio. It does not publish events or know about ttrpc beyond returning errors with the right
//! code; the task service does that.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_shim::api::{CreateTaskRequest, StateResponse, Status};
use containerd_shim::protos::protobuf::EnumOrUnknown;
use containerd_shim::util::convert_to_timestamp;
use libcontainer::container::Container as LibContainer;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::cgroup::ContainerCgroup;
use crate::checkpoint;
use crate::error::{Error, Result};
use crate::mount_sources;
use crate::stdio::{self, ShimStdio, StdioPaths};
use crate::zygote;

/// Where libcontainer keeps container state, per containerd namespace.
pub const STATE_ROOT: &str = "/run/containerd/podsnap";

/// Annotation with which podsnapd's RestorePod marks a container to restore from a pod
/// checkpoint's container directory; honoured only with a restore grant
/// ([`podsnap_checkpoint_format::grant`]).
pub use podsnap_checkpoint_format::grant::RESTORE_ANNOTATION;
use podsnap_checkpoint_format::grant::{GRANT_ANNOTATION, GRANT_DIR, RestoreGrant};

/// The value of a spec annotation.
pub fn spec_annotation<'a>(spec: &'a Spec, key: &str) -> Option<&'a String> {
    spec.annotations().as_ref().and_then(|a| a.get(key))
}

/// How long a process's output may take to drain after it exits.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// The lifecycle state of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Created,
    Running,
    Paused,
    Stopped,
}

impl State {
    pub fn to_status(self) -> Status {
        match self {
            State::Created => Status::CREATED,
            State::Running => Status::RUNNING,
            State::Paused => Status::PAUSED,
            State::Stopped => Status::STOPPED,
        }
    }
}

/// How and when a process exited.
#[derive(Debug, Clone, Copy)]
pub struct ExitInfo {
    pub status: u32,
    pub at: OffsetDateTime,
}

/// A process of a container: its init (exec id "") or an exec'd one.
pub struct Process {
    pub exec_id: String,
    /// 0 until the process exists.
    pub pid: i32,
    pub state: State,
    pub exit: Option<ExitInfo>,
    pub paths: StdioPaths,
    pub stdio: ShimStdio,
    /// Holds the exit once it is published; `Wait` watches it.
    pub exited: watch::Sender<Option<ExitInfo>>,
    /// The OCI process of an exec, kept until it starts.
    pub spec: Option<oci_spec::runtime::Process>,
}

impl Process {
    pub fn new(exec_id: &str, paths: StdioPaths) -> Self {
        Self {
            exec_id: exec_id.to_string(),
            pid: 0,
            state: State::Created,
            exit: None,
            paths,
            stdio: ShimStdio::default(),
            exited: watch::channel(None).0,
            spec: None,
        }
    }

    pub fn set_exited(&mut self, status: i32, at: OffsetDateTime) {
        self.state = State::Stopped;
        self.exit = Some(ExitInfo {
            status: status as u32,
            at,
        });
    }

    pub fn state_response(&self, container: &Container) -> StateResponse {
        let mut resp = StateResponse::new();
        resp.id = container.id.clone();
        resp.bundle = container.bundle.display().to_string();
        resp.pid = self.pid.max(0) as u32;
        resp.status = EnumOrUnknown::new(self.state.to_status());
        resp.stdin = self.paths.stdin.clone();
        resp.stdout = self.paths.stdout.clone();
        resp.stderr = self.paths.stderr.clone();
        resp.terminal = self.paths.terminal;
        resp.exec_id = self.exec_id.clone();
        if let Some(exit) = self.exit {
            resp.exit_status = exit.status;
            resp.exited_at = Some(convert_to_timestamp(Some(exit.at))).into();
        }
        resp
    }
}

/// A container's init, restored, waiting to be recorded ([`Container::commit_restore`]).
pub struct Restored {
    pid: i32,
    stdio: ShimStdio,
    /// The lazy-pages daemon of a lazy restore, killed if the container goes first.
    lazy_daemon: Option<LazyDaemon>,
}

/// The lazy-pages daemon still serving a lazily restored container: killed (by its pidfd, so
/// never another process) when the container is dropped before the daemon finished.
pub struct LazyDaemon(std::os::fd::OwnedFd);

impl Drop for LazyDaemon {
    fn drop(&mut self) {
        checkpoint::lazy::kill_daemon(&self.0);
    }
}

/// Whether the spec asks for a lazy restore
/// ([`podsnap_checkpoint_format::grant::LAZY_RESTORE_ANNOTATION`]).
fn wants_lazy_restore(id: &str, spec: &Spec) -> Result<bool> {
    let key = podsnap_checkpoint_format::grant::LAZY_RESTORE_ANNOTATION;
    match spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
    {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(Error::InvalidArgument(format!(
            "container {id}: annotation {key}={other:?}: expected true or false"
        ))),
    }
}

/// One container of the pod.
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    /// libcontainer's state root for this namespace (the container's state is `<root>/<id>`).
    pub state_root: PathBuf,
    pub spec: Spec,
    pub cgroup: ContainerCgroup,
    pub init: Process,
    pub execs: HashMap<String, Process>,
    /// The checkpoint `start` restores from, when the task was created from one.
    pub checkpoint: Option<PathBuf>,
    /// What podsnapd's RestorePod granted, when it created this container: the pod
    /// checkpoint, this container's directory in it (`checkpoint/`, `rootfs-diff.tar`,
    /// `deleted.files`) and the manifest digest every file is verified against at start.
    pub restore_grant: Option<RestoreGrant>,
    /// The overlay upper directory: the container's writable layer.
    pub upperdir: Option<PathBuf>,
    /// Held for a lifecycle operation on this container (see `PodTask`'s locks).
    pub op: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The lazy-pages daemon of a lazy restore (see [`LazyDaemon`]).
    lazy_daemon: Option<LazyDaemon>,
    /// A restore into a user namespace: the spec with its bind sources staged where the
    /// namespace's root reaches them ([`mount_sources`]), which CRIU binds from.
    staged_spec: Option<Spec>,
    rootfs_mounted: bool,
}

impl Container {
    /// Mounts the rootfs, sets up stdio and creates the init process (left waiting for start).
    /// On error nothing is left behind: no mount, no libcontainer state, no process.
    pub async fn create(namespace: &str, req: &CreateTaskRequest) -> Result<Container> {
        let id = req.id.clone();
        validate_id(&id)?;
        let bundle = PathBuf::from(&req.bundle);
        let spec = load_spec(&id, &bundle)?;
        let state_root = Path::new(STATE_ROOT).join(namespace);
        std::fs::create_dir_all(&state_root).map_err(|e| {
            Error::internal(format!(
                "container {id}: create state root {}: {e}",
                state_root.display()
            ))
        })?;
        let paths = StdioPaths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let mut container = Container {
            cgroup: ContainerCgroup::of(&spec, &id),
            id: id.clone(),
            bundle,
            state_root,
            spec,
            init: Process::new("", paths),
            execs: HashMap::new(),
            checkpoint: (!req.checkpoint.is_empty()).then(|| PathBuf::from(&req.checkpoint)),
            restore_grant: None,
            upperdir: req.rootfs.iter().find_map(|m| {
                m.options
                    .iter()
                    .find_map(|o| o.strip_prefix("upperdir=").map(PathBuf::from))
            }),
            op: Default::default(),
            lazy_daemon: None,
            staged_spec: None,
            rootfs_mounted: false,
        };
        if let Some(dir) = spec_annotation(&container.spec, RESTORE_ANNOTATION) {
            let dir = PathBuf::from(dir);
            if !dir.is_absolute() || container.checkpoint.is_some() {
                return Err(Error::InvalidArgument(format!(
                    "container {id}: invalid {RESTORE_ANNOTATION} {}",
                    dir.display()
                )));
            }
            // Only podsnapd's RestorePod may ask for a restore: it leaves a grant for it.
            let token = spec_annotation(&container.spec, GRANT_ANNOTATION)
                .cloned()
                .unwrap_or_default();
            let grant = podsnap_checkpoint_format::grant::redeem(Path::new(GRANT_DIR), &token)
                .map_err(|e| {
                    Error::PermissionDenied(format!(
                        "container {id}: {RESTORE_ANNOTATION} refused: {e}"
                    ))
                })?;
            if grant.container_dir() != dir {
                return Err(Error::PermissionDenied(format!(
                    "container {id}: {RESTORE_ANNOTATION} {} is not what the restore grant allows ({})",
                    dir.display(),
                    grant.container_dir().display()
                )));
            }
            container.checkpoint = Some(dir.join("checkpoint"));
            container.restore_grant = Some(grant);
        }
        match container.create_init(req).await {
            Ok(()) => Ok(container),
            Err(err) => {
                container.destroy().await;
                Err(err)
            }
        }
    }

    async fn create_init(&mut self, req: &CreateTaskRequest) -> Result<()> {
        let id = self.id.clone();
        let rootfs = self.rootfs();
        for m in &req.rootfs {
            let (fs_type, source, options, target) = (
                m.type_.clone(),
                m.source.clone(),
                m.options.clone(),
                rootfs.clone(),
            );
            let scratch = self.bundle.join(".podsnap-idmapped");
            tokio::task::spawn_blocking(move || -> Result<(), String> {
                // A pod with a user namespace of its own: idmapped lower layers.
                match crate::idmap::split_options(&options) {
                    Ok(Some(_)) if fs_type == "overlay" => {
                        crate::idmap::mount_overlay(&source, &options, &target, &scratch)
                            .map_err(|e| format!("{e:#}"))
                    }
                    Ok(Some(_)) => Err(format!(
                        "an idmapped {fs_type} rootfs mount is not supported (only overlay)"
                    )),
                    Err(e) => Err(format!("{e:#}")),
                    Ok(None) => containerd_shim::mount::mount_rootfs(
                        Some(&fs_type),
                        Some(&source),
                        &options,
                        &target,
                    )
                    .map_err(|e| e.to_string()),
                }
            })
            .await
            .map_err(|e| Error::internal(format!("container {id}: mount task: {e}")))?
            .map_err(|e| {
                Error::internal(format!("container {id}: mount rootfs {}: {e}", m.type_))
            })?;
            self.rootfs_mounted = true;
        }
        if !rootfs.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "container {id}: rootfs {} does not exist or is not a directory",
                rootfs.display()
            )));
        }
        if let Some(checkpoint) = &self.checkpoint {
            // Restored at start; only check the path is absolute here.
            if !checkpoint.is_absolute() {
                return Err(Error::InvalidArgument(format!(
                    "container {id}: checkpoint path {} is not absolute",
                    checkpoint.display()
                )));
            }
            self.staged_spec = self.stage_mount_sources().await?;
            return Ok(());
        }
        self.stage_mount_sources().await?;
        let (container_stdio, mut shim_stdio) = stdio::prepare(&self.init.paths)
            .map_err(|e| Error::internal(format!("container {id}: stdio: {e:#}")))?;
        let request = zygote::Request::CreateInit {
            id: id.clone(),
            bundle: self.bundle.clone(),
            state_root: self.state_root.clone(),
            console_socket: container_stdio.console.as_ref().map(|c| c.path()),
            stdio: container_stdio.to_send().0,
        };
        let paths = self.init.paths.clone();
        let (pid, shim_stdio) = tokio::task::spawn_blocking(move || {
            let (_, fds) = container_stdio.to_send();
            let pid = zygote::call(&request, &fds)?;
            if let Some(console) = &container_stdio.console {
                stdio::attach_console(console, &paths, &mut shim_stdio)
                    .map_err(|e| Error::Internal(e.context("terminal")))?;
            }
            Ok::<_, Error>((pid, shim_stdio))
        })
        .await
        .map_err(|e| Error::internal(format!("container {id}: create task: {e}")))?
        .map_err(|e| e.within(format!("container {id}")))?;
        self.init.pid = pid;
        self.init.stdio = shim_stdio;
        Ok(())
    }

    /// For a container with a user namespace, makes its bind-mount sources reachable from
    /// inside it ([`mount_sources`]) and points the bundle's `config.json` at them; returns
    /// that spec.
    async fn stage_mount_sources(&self) -> Result<Option<Spec>> {
        let id = self.id.clone();
        let bundle = self.bundle.clone();
        let spec = self.spec.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Spec>> {
            use anyhow::Context;
            let Some(staged) = mount_sources::stage(&bundle, &spec)? else {
                return Ok(None);
            };
            let path = bundle.join("config.json");
            let next = bundle.join(".config.json.podsnap");
            let written = staged
                .save(&next)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .and_then(|()| std::fs::rename(&next, &path).map_err(Into::into))
                .with_context(|| format!("rewrite {}", path.display()));
            if written.is_err() {
                let _ = std::fs::remove_file(&next);
                mount_sources::release(&bundle);
            }
            written.map(|()| Some(staged))
        })
        .await
        .map_err(|e| Error::internal(format!("container {id}: stage mounts: {e}")))?
        .map_err(|e| {
            Error::internal(format!(
                "container {id}: bind-mount sources for its user namespace: {e:#}"
            ))
        })
    }

    pub fn rootfs(&self) -> PathBuf {
        let root = self
            .spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .unwrap_or_else(|| PathBuf::from("rootfs"));
        if root.is_absolute() {
            root
        } else {
            self.bundle.join(root)
        }
    }

    /// Whether the container has a PID namespace of its own (then its processes die with init).
    pub fn has_own_pid_namespace(&self) -> bool {
        self.spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .is_some_and(|namespaces| {
                namespaces
                    .iter()
                    .any(|ns| ns.typ() == LinuxNamespaceType::Pid && ns.path().is_none())
            })
    }

    /// Lets the created init process run (a container created from a checkpoint is restored
    /// with [`Container::restore_job`] instead).
    pub async fn start_init(&mut self) -> Result<i32> {
        if self.checkpoint.is_some() {
            return Err(Error::internal(format!(
                "container {} is restored from a checkpoint: restore_job, not start_init",
                self.id
            )));
        }
        let dir = self.state_root.join(&self.id);
        let id = self.id.clone();
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let mut container = LibContainer::load(dir).map_err(|e| e.to_string())?;
            container.start().map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| Error::internal(format!("container {id}: start task: {e}")))?
        .map_err(|e| Error::Libcontainer(format!("container {id}: start: {e}")))?;
        self.init.state = State::Running;
        Ok(self.init.pid)
    }

    /// The restore of the init from `checkpoint` into this (created) container, as a future
    /// that borrows nothing of it (run it without holding the pod's container map): verifies
    /// the checkpoint before creating anything, then lets CRIU recreate the process tree as a
    /// child of the shim, inside the container's cgroup, attached to fresh stdio pipes. Record
    /// its outcome with [`Container::commit_restore`].
    pub fn restore_job(
        &self,
    ) -> Result<impl std::future::Future<Output = Result<Restored>> + Send + 'static> {
        let id = self.id.clone();
        let checkpoint = self.checkpoint.clone().ok_or_else(|| {
            Error::FailedPrecondition(format!("container {id} is not restored from a checkpoint"))
        })?;
        let (container_stdio, shim_stdio) = stdio::prepare(&self.init.paths)
            .map_err(|e| Error::internal(format!("container {id}: stdio: {e:#}")))?;
        if container_stdio.console.is_some() {
            return Err(Error::Unimplemented(format!(
                "container {id}: restoring a container with a terminal is not supported"
            )));
        }
        let grant = self.restore_grant.clone();
        let spec = self.spec.clone();
        let staged_spec = self.staged_spec.clone();
        let lazy = wants_lazy_restore(&id, &spec)?;
        let rootfs = self.rootfs();
        let cgroup = self.cgroup.clone();
        let bundle = self.bundle.clone();
        let state_root = self.state_root.clone();
        Ok(async move {
            // A lazy restore's daemon is a child of the shim, reaped by its reaper: its exit is
            // watched from before it starts, through the restore and after.
            let (daemon_started, session_ready, restore_ended) = if lazy {
                let exits = containerd_shim::asynchronous::monitor::monitor_subscribe(
                    containerd_shim::monitor::Topic::Pid,
                )
                .await
                .map_err(|e| Error::internal(format!("container {id}: watch exits: {e}")))?;
                let (daemon_started, daemon) = tokio::sync::oneshot::channel();
                let (session_ready, session) = tokio::sync::oneshot::channel();
                // Never sent: dropped when the restore's thread ends, whatever becomes of this
                // future (a Start whose caller gave up drops it while CRIU still runs).
                let (restore_ended, ended) = tokio::sync::oneshot::channel::<()>();
                tokio::spawn(watch_lazy_restore(
                    id.clone(),
                    exits,
                    daemon,
                    ended,
                    session,
                    cgroup.clone(),
                ));
                (
                    Some(daemon_started),
                    Some(session_ready),
                    Some(restore_ended),
                )
            } else {
                (None, None, None)
            };
            // libcgroups' manager of the cgroup is made beside the checks (it only reads the
            // mount table), not after them on the way to CRIU.
            let warm = cgroup.clone();
            let warming = tokio::task::spawn_blocking(move || warm.warm());
            let (checked_id, checked_grant, checked_spec) =
                (id.clone(), grant.clone(), spec.clone());
            let log_id = id.clone();
            let error_id = id.clone();
            // Compressed pages are expanded into a private scratch directory first: CRIU reads
            // only plain images, and the checkpoint itself is never modified.
            let (scratch, images, metadata, descriptors, deferred, shift) =
                tokio::task::spawn_blocking(move || {
                    let grant = checked_grant;
                    // A container of a pod checkpoint: every file it will read is verified
                    // against the manifest podsnapd verified (pinned by digest in the grant),
                    // here, at start; a big file podsnapd hashed and that did not change since
                    // (the grant's stamps) is not read again.
                    // Plain page images are left to the restore, which hashes them while CRIU
                    // reads them (see checkpoint::page_check); compressed ones (`.img.zst`) are
                    // hashed here, before they are expanded.
                    let mut deferred = Vec::new();
                    if let Some(grant) = &grant {
                        let started = std::time::Instant::now();
                        let later = podsnap_checkpoint_format::is_page_image;
                        let manifest = podsnap_checkpoint_format::verify_container_deferring(
                            &grant.checkpoint,
                            &grant.manifest_sha256,
                            &grant.container,
                            &grant.stamps,
                            later,
                        )?;
                        deferred = manifest
                            .files
                            .iter()
                            .filter(|(relative, _)| {
                                later(relative)
                                    && podsnap_checkpoint_format::read_by(
                                        &manifest,
                                        &grant.container,
                                        relative,
                                    )
                            })
                            .map(|(relative, digest)| checkpoint::page_check::DeferredPages {
                                path: grant.checkpoint.join(relative),
                                digest: digest.clone(),
                                stamp: grant.stamps.get(relative).cloned(),
                            })
                            .collect();
                        log::info!(
                            "container {log_id}: checkpoint verified in {} ms ({} stamp(s) from \
                         podsnapd)",
                            started.elapsed().as_millis(),
                            grant.stamps.len()
                        );
                    }
                    let scratch = if podsnap_checkpoint_format::pages::is_compressed(&checkpoint) {
                        let dir = crate::scratch::create(Path::new(crate::scratch::ROOT))?;
                        podsnap_checkpoint_format::pages::expand_into(&checkpoint, dir.path())?;
                        Some(dir)
                    } else {
                        None
                    };
                    let images = scratch
                        .as_ref()
                        .map_or_else(|| checkpoint.clone(), |d| d.path().to_path_buf());
                    let (metadata, descriptors) = if grant.is_some() {
                        checkpoint::read_metadata(&images)?
                    } else {
                        checkpoint::verify(&images)?
                    };
                    // Nothing the images hold may grant more than the new spec: checked before
                    // any process or mount exists.
                    crate::restore_policy::check_metadata(&metadata)?;
                    let shift = checkpoint::userns::check(&checked_id, &metadata, &checked_spec)?;
                    checkpoint::userns::check_images(&checked_id, &metadata, &images)?;
                    let threads = podsnap_checkpoint_format::creds::thread_credentials(&images)?;
                    crate::restore_policy::check_credentials(&checked_spec, &threads)?;
                    crate::tmpfs_archives::check(&checked_spec, &images)?;
                    Ok::<_, anyhow::Error>((
                        scratch,
                        images,
                        metadata,
                        descriptors,
                        deferred,
                        shift,
                    ))
                })
                .await
                .map_err(|e| Error::internal(format!("container {error_id}: {e}")))?
                .map_err(|e| {
                    Error::FailedPrecondition(format!(
                        "container {error_id}: cannot restore: {e:#}"
                    ))
                })?;
            let _ = warming.await;
            let restored_id = id.clone();
            let restored = tokio::task::spawn_blocking(move || {
                let _ended = restore_ended;
                if let Some(grant) = &grant {
                    // A container of a pod checkpoint: the pod's emptyDir volumes first.
                    let started = std::time::Instant::now();
                    crate::volumes::restore(&grant.checkpoint, &spec)?;
                    crate::rootfs_diff::apply(&grant.container_dir(), &rootfs, shift.as_ref())?;
                    log::info!(
                        "container {restored_id}: volumes and writable layer restored in {} ms",
                        started.elapsed().as_millis()
                    );
                }
                cgroup.prepare(&spec)?;
                let [stdin, stdout, stderr] = &container_stdio.fds;
                let target = checkpoint::RestoreTarget {
                    id: &restored_id,
                    spec: &spec,
                    mounts: staged_spec.as_ref().unwrap_or(&spec),
                    rootfs: &rootfs,
                    cgroup: &cgroup,
                    stdio: [stdin.as_ref(), stdout.as_ref(), stderr.as_ref()],
                };
                let (pid, mut session) = checkpoint::restore(
                    &target,
                    &images,
                    &metadata,
                    &descriptors,
                    match daemon_started {
                        Some(started) => checkpoint::Pages::Lazy(checkpoint::lazy::Start {
                            id: restored_id.clone(),
                            daemon_started: started,
                            deferred,
                            cgroup: cgroup.clone(),
                        }),
                        None => checkpoint::Pages::Eager(deferred),
                    },
                )?;
                if let (Some(session), Some(scratch)) = (session.as_mut(), scratch) {
                    // The daemon reads the expanded pages until it exits.
                    session.keep(scratch);
                }
                // The spec's resources were applied by `prepare`, before CRIU: CRIU (soft mode)
                // leaves the properties of a cgroup it did not create alone.
                record_restored(&restored_id, pid, &spec, &bundle, &state_root)?;
                Ok::<_, anyhow::Error>((pid, session))
            })
            .await
            .map_err(|e| Error::internal(format!("container {id}: {e}")))?;
            let (pid, session) =
                restored.map_err(|e| Error::from(e).within(format!("container {id}")))?;
            let lazy_daemon = match (session, session_ready) {
                (Some(session), Some(ready)) => {
                    log::info!(
                        "container {id}: running; its {} MiB of pages stream in from the \
                         lazy-pages daemon (pid {})",
                        session.page_bytes() >> 20,
                        session.daemon_pid()
                    );
                    let daemon = session.daemon_pidfd().ok().map(LazyDaemon);
                    if let Err(session) = ready.send(session) {
                        // Nobody watches the daemon: never leave the container on it (a
                        // session dropped unfinished kills it).
                        log::error!("container {id}: the lazy-pages daemon is not watched");
                        tokio::task::spawn_blocking(move || drop(session));
                    }
                    daemon
                }
                _ => None,
            };
            Ok(Restored {
                pid,
                stdio: shim_stdio,
                lazy_daemon,
            })
        })
    }

    /// Records a restored init as this container's running init; returns its pid.
    pub fn commit_restore(&mut self, restored: Restored) -> i32 {
        self.init.pid = restored.pid;
        self.init.stdio = restored.stdio;
        self.lazy_daemon = restored.lazy_daemon;
        self.init.state = State::Running;
        restored.pid
    }

    /// Starts the exec'd process `exec_id` recorded earlier by `Exec`.
    pub async fn start_exec(&mut self, exec_id: &str) -> Result<i32> {
        let id = self.id.clone();
        if self.init.state != State::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is not running: cannot start exec {exec_id}"
            )));
        }
        let process = self
            .execs
            .get_mut(exec_id)
            .ok_or_else(|| Error::NotFound(format!("container {id}: exec {exec_id} not found")))?;
        if process.state != State::Created {
            return Err(Error::FailedPrecondition(format!(
                "container {id}: exec {exec_id} was already started"
            )));
        }
        let spec = process.spec.clone().unwrap_or_default();
        let file = tempfile::Builder::new()
            .prefix(".podsnap-exec-")
            .suffix(".json")
            .tempfile_in(&self.bundle)
            .map_err(|e| Error::internal(format!("container {id}: exec spec: {e}")))?;
        serde_json::to_writer(file.as_file(), &spec)
            .map_err(|e| Error::internal(format!("container {id}: exec spec: {e}")))?;
        let (container_stdio, mut shim_stdio) = stdio::prepare(&process.paths)
            .map_err(|e| Error::internal(format!("container {id}: exec {exec_id} stdio: {e:#}")))?;
        let request = zygote::Request::Exec {
            id: id.clone(),
            state_root: self.state_root.clone(),
            process: file.path().to_path_buf(),
            console_socket: container_stdio.console.as_ref().map(|c| c.path()),
            stdio: container_stdio.to_send().0,
        };
        let paths = process.paths.clone();
        let (pid, shim_stdio) = tokio::task::spawn_blocking(move || {
            let (_, fds) = container_stdio.to_send();
            let pid = zygote::call(&request, &fds)?;
            if let Some(console) = &container_stdio.console {
                stdio::attach_console(console, &paths, &mut shim_stdio)
                    .map_err(|e| Error::Internal(e.context("terminal")))?;
            }
            drop(file);
            Ok::<_, Error>((pid, shim_stdio))
        })
        .await
        .map_err(|e| Error::internal(format!("container {id}: exec task: {e}")))?
        .map_err(|e| e.within(format_args!("container {id}: exec {exec_id}")))?;
        process.pid = pid;
        process.state = State::Running;
        process.stdio = shim_stdio;
        Ok(pid)
    }

    /// The process `exec_id` ("" or `None` is the init).
    pub fn process(&self, exec_id: Option<&str>) -> Result<&Process> {
        match exec_id {
            None | Some("") => Ok(&self.init),
            Some(exec_id) => self.execs.get(exec_id).ok_or_else(|| {
                Error::NotFound(format!("container {}: exec {exec_id} not found", self.id))
            }),
        }
    }

    pub fn process_mut(&mut self, exec_id: Option<&str>) -> Result<&mut Process> {
        match exec_id {
            None | Some("") => Ok(&mut self.init),
            Some(exec_id) => {
                let id = self.id.clone();
                self.execs.get_mut(exec_id).ok_or_else(|| {
                    Error::NotFound(format!("container {id}: exec {exec_id} not found"))
                })
            }
        }
    }

    /// Sends `signal` to a process, or with `all` to every process of the container.
    pub async fn kill(&mut self, exec_id: Option<&str>, signal: u32, all: bool) -> Result<()> {
        let id = self.id.clone();
        let sig = Signal::try_from(signal as i32).map_err(|_| {
            Error::InvalidArgument(format!("container {id}: invalid signal {signal}"))
        })?;
        let paused = self.init.state == State::Paused;
        let process = self.process(exec_id)?;
        if all && process.exec_id.is_empty() {
            let cgroup = self.cgroup.clone();
            let pids = cgroup.pids().unwrap_or_default();
            for pid in pids {
                let _ = nix::sys::signal::kill(pid, sig);
            }
            if paused && sig == Signal::SIGKILL {
                let _ = cgroup.freeze(false);
            }
            return Ok(());
        }
        if process.state == State::Stopped || process.pid <= 0 {
            return Err(Error::NotFound(format!(
                "container {id}: process {} already finished",
                if process.exec_id.is_empty() {
                    "init"
                } else {
                    &process.exec_id
                }
            )));
        }
        nix::sys::signal::kill(Pid::from_raw(process.pid), sig).map_err(|e| {
            Error::NotFound(format!(
                "container {id}: signal {sig} to pid {}: {e}",
                process.pid
            ))
        })?;
        if paused && sig == Signal::SIGKILL {
            let _ = self.cgroup.freeze(false);
        }
        Ok(())
    }

    /// Kills what is left, removes libcontainer's state and cgroup and unmounts the rootfs.
    /// Safe to call more than once and on a half-created container.
    pub async fn destroy(&mut self) {
        let dir = self.state_root.join(&self.id);
        let cgroup = self.cgroup.clone();
        let rootfs = self.rootfs();
        let mounted = self.rootfs_mounted;
        let id = self.id.clone();
        let bundle = self.bundle.clone();
        let _ = tokio::task::spawn_blocking(move || {
            destroy_container(&id, &dir, &cgroup);
            if mounted {
                unmount_rootfs(&rootfs);
            }
            mount_sources::release(&bundle);
        })
        .await;
        self.rootfs_mounted = false;
    }
}

/// Writes libcontainer's state for a restored container, so that exec, kill and delete work on
/// it as on a created one.
fn record_restored(
    id: &str,
    pid: i32,
    spec: &Spec,
    bundle: &Path,
    state_root: &Path,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let dir = state_root.join(id);
    checkpoint::private_dir(&dir)?;
    let mut container = LibContainer::new(
        id,
        libcontainer::container::ContainerStatus::Running,
        Some(pid),
        bundle,
        &dir,
    )
    .map_err(|e| anyhow::anyhow!("libcontainer state for {id}: {e}"))?;
    container.set_systemd(false);
    container
        .save()
        .map_err(|e| anyhow::anyhow!("save libcontainer state for {id}: {e}"))?;
    libcontainer::config::YoukiConfig::from_spec(spec, id)
        .map_err(|e| anyhow::anyhow!("libcontainer config for {id}: {e}"))?
        .save(&dir)
        .map_err(|e| anyhow::anyhow!("save libcontainer config for {id}: {e}"))
        .context("record the restored container")
}

/// Kills the processes of a container and removes its libcontainer state and cgroup.
pub fn destroy_container(id: &str, state_dir: &Path, cgroup: &ContainerCgroup) {
    for pid in cgroup.pids().unwrap_or_default() {
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
    }
    let _ = cgroup.freeze(false);
    if state_dir.join("state.json").exists() {
        match LibContainer::load(state_dir.to_path_buf()) {
            Ok(mut container) => {
                if let Err(e) = container.delete(true) {
                    log::warn!("container {id}: libcontainer delete: {e}");
                }
            }
            Err(e) => log::warn!("container {id}: load libcontainer state: {e}"),
        }
    }
    if state_dir.exists() {
        let _ = std::fs::remove_dir_all(state_dir);
    }
    // Deleting a cgroup fails while processes are still exiting; retry briefly.
    for _ in 0..50 {
        if cgroup.pids().map(|p| p.is_empty()).unwrap_or(true) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    remove_cgroup_dirs(cgroup);
}

/// Removes the container's cgroup from every hierarchy (v1 controllers, named hierarchies
/// such as `name=systemd`, the unified one), retrying while exiting tasks still hold it.
fn remove_cgroup_dirs(cgroup: &ContainerCgroup) {
    let relative = cgroup.path.strip_prefix("/").unwrap_or(&cgroup.path);
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .map(|entries| entries.flatten().map(|e| e.path().join(relative)).collect())
        .unwrap_or_default();
    if let Some(dir) = cgroup.v2_dir() {
        dirs.push(dir);
    }
    for _ in 0..100 {
        dirs.retain(|dir| dir.is_dir() && std::fs::remove_dir(dir).is_err());
        if dirs.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for dir in dirs {
        log::warn!("cgroup {} is still in use and was left", dir.display());
    }
}

/// Unmounts everything at or under `rootfs`.
pub fn unmount_rootfs(rootfs: &Path) {
    if let Some(target) = rootfs.to_str()
        && let Err(e) = containerd_shim::mount::umount_recursive(Some(target), libc::MNT_DETACH)
    {
        log::warn!("unmount {target}: {e}");
    }
}

fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 1024
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid container id {id:?}"
        )))
    }
}

/// Reads and checks the bundle's `config.json`.
pub fn load_spec(id: &str, bundle: &Path) -> Result<Spec> {
    let path = bundle.join("config.json");
    let spec = Spec::load(&path).map_err(|e| {
        Error::InvalidArgument(format!(
            "container {id}: bundle config {}: {e}",
            path.display()
        ))
    })?;
    if spec.process().is_none() {
        return Err(Error::InvalidArgument(format!(
            "container {id}: bundle config {} has no process",
            path.display()
        )));
    }
    Ok(spec)
}

/// Whether the process behind `pidfd` has exited (the pidfd is readable then).
fn exited(pidfd: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsFd;
    let mut poll = [nix::poll::PollFd::new(
        pidfd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    matches!(
        nix::poll::poll(&mut poll, nix::poll::PollTimeout::ZERO),
        Ok(n) if n > 0
    )
}

/// How often a lazy restore whose daemon died kills the container's processes again while the
/// restore is still under way (CRIU may add tasks after a kill).
const LAZY_KILL_AGAIN: std::time::Duration = std::time::Duration::from_millis(50);

/// Watches a lazy restore's daemon from its start (`daemon` brings its pid; never, if the
/// restore failed first) to its exit. If it fails, during the restore or after, every process
/// of the container is killed before any can read a page that will never arrive; then the
/// session (`session`, once the restore succeeded) releases the container's memory.
async fn watch_lazy_restore(
    id: String,
    mut exits: containerd_shim::asynchronous::monitor::Subscription,
    daemon: tokio::sync::oneshot::Receiver<(i32, std::os::fd::OwnedFd)>,
    mut restore_ended: tokio::sync::oneshot::Receiver<()>,
    session: tokio::sync::oneshot::Receiver<checkpoint::lazy::LazySession>,
    cgroup: ContainerCgroup,
) {
    use containerd_shim::asynchronous::monitor::monitor_unsubscribe;
    let Ok((daemon, pidfd)) = daemon.await else {
        let _ = monitor_unsubscribe(exits.id).await;
        return;
    };
    let mut exit_code = None;
    while let Some(event) = exits.rx.recv().await {
        // The daemon's pid, and the daemon gone (its pidfd readable): not the exit of an
        // earlier process that had the same pid, queued before the daemon started.
        if matches!(event.subject, containerd_shim::monitor::Subject::Pid(pid) if pid == daemon)
            && exited(&pidfd)
        {
            exit_code = Some(event.exit_code);
            break;
        }
    }
    let _ = monitor_unsubscribe(exits.id).await;
    // A monitor that stopped sending never saw the daemon exit: treat it as a failure.
    let exit_code = exit_code.unwrap_or(-1);
    if exit_code != 0 {
        log::error!(
            "container {id}: its lazy-pages daemon (pid {daemon}) exited with {exit_code}: its \
             processes are killed"
        );
        // The restore may still be under way: its restorer waiting for a page, or CRIU still
        // making tasks, which would wait for pages forever (their userfaultfds are held) and
        // CRIU for them. So every process of the container is killed again until the restore's
        // thread ended, one way or the other.
        loop {
            let killed = cgroup.clone();
            let _ = tokio::task::spawn_blocking(move || checkpoint::lazy::kill_all(&killed)).await;
            if tokio::time::timeout(LAZY_KILL_AGAIN, &mut restore_ended)
                .await
                .is_ok()
            {
                break;
            }
        }
    }
    let Ok(session) = session.await else {
        log::warn!(
            "container {id}: its restore failed; its lazy-pages daemon (pid {daemon}) exited \
             with {exit_code}"
        );
        return;
    };
    log::info!(
        "container {id}: the lazy-pages daemon (pid {daemon}) exited with {exit_code} after \
         serving {} MiB of pages for {} ms",
        session.page_bytes() >> 20,
        session.elapsed().as_millis()
    );
    match tokio::task::spawn_blocking(move || session.finish(exit_code)).await {
        Ok(checkpoint::lazy::Outcome::Complete) => log::info!(
            "container {id}: lazy restore complete: every page arrived, and every page \
             image is the manifest's"
        ),
        Ok(checkpoint::lazy::Outcome::Killed(reason)) => {
            log::error!("container {id}: lazy restore failed, its processes were killed: {reason}")
        }
        Err(e) => log::error!("container {id}: lazy restore: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_with_path_characters_are_rejected() {
        assert!(validate_id("abc-123_x.y").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("../etc").is_err());
        assert!(validate_id("a/b").is_err());
        assert!(validate_id(".hidden").is_err());
    }

    #[test]
    fn malformed_config_json_is_invalid_argument_naming_the_container() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), b"{ not json").unwrap();
        let err = load_spec("web-1", dir.path()).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert!(err.to_string().contains("web-1"), "{err}");
    }

    #[test]
    fn missing_config_json_is_invalid_argument() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_spec("c1", dir.path()).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    }
}

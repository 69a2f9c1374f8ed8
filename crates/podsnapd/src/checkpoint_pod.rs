//! CRI `CheckpointPod`: validate the request against containerd's view of the pod, have the
//! pod's shim freeze and capture the selected containers as one cut, and lay the result out as a
//! podsnap pod checkpoint (per-container directories in the CRI-O/containerd/checkpointctl
//! layout plus a hashed manifest). On any error after writing started, everything written under
//! `output_path` is removed again (the directory itself, the caller's, stays).
//!
//! Before anything is frozen a call must be bounded and fit: it needs a deadline (a checkpoint
//! freezes the pod: one without an end is refused, InvalidArgument); it holds its pod sandbox
//! and its output directory for its whole length (a second call on either is refused at once,
//! FailedPrecondition, [`crate::in_flight`]); and the output directory's filesystem must have room
//! for what the checkpoint is expected to take — the selected containers' memory, their writable
//! layers and the pod's emptyDir volumes — plus a margin ([`check_space`]), or it is refused
//! with ResourceExhausted rather than filling the node's disk.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cri_api::RuntimeServiceClient;
use cri_api::v1::{
    CheckpointPodRequest, CheckpointPodResponse, ContainerFilter, ContainerState,
    ContainerStatsRequest, ContainerStatusRequest, ListContainersRequest, PodSandboxState,
    PodSandboxStatusRequest,
};
use podsnap_checkpoint_format::{ContainerEntry, FORMAT, Manifest, PodEntry, VERSION};
use podsnap_pod_api::{PodRequest, PodResponse};
use tonic::Status;
use tonic::transport::Channel;

use crate::in_flight::{InFlight, Operation, Resource};
use crate::pod_options::{CheckpointOptions, Compression};

/// The runtime handler whose pods podsnap checkpoints.
pub const HANDLER: &str = "podsnap";

/// Time left before `deadline`, or DeadlineExceeded.
pub fn remaining(deadline: Option<Instant>, what: &str) -> Result<Option<Duration>, Status> {
    match deadline {
        None => Ok(None),
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                Err(Status::deadline_exceeded(format!(
                    "deadline exceeded {what}"
                )))
            } else {
                Ok(Some(left))
            }
        }
    }
}

/// A CRI request carrying the caller's remaining time.
pub fn with_deadline<T>(
    message: T,
    deadline: Option<Instant>,
    what: &str,
) -> Result<tonic::Request<T>, Status> {
    let mut request = tonic::Request::new(message);
    if let Some(left) = remaining(deadline, what)? {
        request.set_timeout(left);
    }
    Ok(request)
}

/// The caller's deadline, which a CheckpointPod must have: the call freezes the pod, and a
/// freeze must end.
pub fn require_deadline(deadline: Option<Instant>) -> Result<Instant, Status> {
    deadline.ok_or_else(|| {
        Status::invalid_argument(
            "CheckpointPod needs a deadline (grpc-timeout): a checkpoint freezes the pod, so the \
             call must be bounded",
        )
    })
}

/// Checks that `output_path` is an absolute path (nothing on disk yet).
pub fn check_output_path(output_path: &str) -> Result<PathBuf, Status> {
    let path = PathBuf::from(output_path);
    if output_path.is_empty() || !path.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "output_path {output_path:?} must be an absolute path"
        )));
    }
    Ok(path)
}

/// Checks `output_path`: absolute, an existing directory (not a symlink), empty.
pub fn check_output_dir(output_path: &str) -> Result<PathBuf, Status> {
    let path = check_output_path(output_path)?;
    let meta = std::fs::symlink_metadata(&path)
        .map_err(|e| Status::invalid_argument(format!("output_path {output_path}: {e}")))?;
    if !meta.is_dir() {
        return Err(Status::invalid_argument(format!(
            "output_path {output_path} is not a directory"
        )));
    }
    let mut entries = std::fs::read_dir(&path)
        .map_err(|e| Status::invalid_argument(format!("output_path {output_path}: {e}")))?;
    if entries.next().is_some() {
        return Err(Status::invalid_argument(format!(
            "output_path {output_path} is not empty"
        )));
    }
    Ok(path)
}

/// Checks `container_ids`: non-empty, no duplicates.
pub fn check_container_ids(ids: &[String]) -> Result<(), Status> {
    if ids.is_empty() {
        return Err(Status::invalid_argument("container_ids is empty"));
    }
    let mut seen = HashSet::new();
    for id in ids {
        if id.is_empty() {
            return Err(Status::invalid_argument("container_ids has an empty id"));
        }
        if !seen.insert(id) {
            return Err(Status::invalid_argument(format!(
                "container {id} is listed twice in container_ids"
            )));
        }
    }
    Ok(())
}

/// The `config` (and `runtimeSpec`) containerd reports in a verbose status.
fn verbose_info(info: &std::collections::HashMap<String, String>) -> serde_json::Value {
    info.get("info")
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or(serde_json::Value::Null)
}

/// How long [`empty_dir`] keeps removing what a writer still adds.
const EMPTY_WITHIN: Duration = Duration::from_secs(30);

/// Removes everything under `dir` (not `dir` itself: the caller made it). A writer may still be
/// at work in it: a CRIU whose shim was killed goes on dumping into its images directory until it
/// ends, and a removal racing it fails (a directory not empty any more). It is tried again until
/// `dir` is empty, for up to [`EMPTY_WITHIN`]; blocking, so off the async workers.
pub fn empty_dir(dir: &Path) {
    empty_dir_within(dir, EMPTY_WITHIN);
}

fn empty_dir_within(dir: &Path, within: Duration) {
    let until = Instant::now() + within;
    loop {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                let _ = if path.is_dir() && !path.is_symlink() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
            }
        }
        let empty = std::fs::read_dir(dir).map_or(true, |mut e| e.next().is_none());
        if empty {
            return;
        }
        if Instant::now() >= until {
            tracing::warn!(dir = %dir.display(), "a failed checkpoint's output is still being written to; left behind");
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// [`empty_dir`] on a blocking thread, awaited: a failed checkpoint is answered once its output
/// is gone.
async fn discard(output: &Path) {
    let output = output.to_path_buf();
    if let Err(e) = tokio::task::spawn_blocking(move || empty_dir(&output)).await {
        tracing::warn!(error = %e, "emptying a failed checkpoint's output");
    }
}

struct Selected {
    id: String,
    name: String,
    image: String,
    image_ref: String,
    config: serde_json::Value,
    spec: serde_json::Value,
    created_at: i64,
}

/// CheckpointPod, as the CRI contract describes it.
pub async fn checkpoint_pod(
    mut cri: RuntimeServiceClient<Channel>,
    req: CheckpointPodRequest,
    deadline: Option<Instant>,
) -> Result<CheckpointPodResponse, Status> {
    let started = Instant::now();
    let deadline = Some(require_deadline(deadline)?);
    // Keep some of the time (a fifth, at least 150 ms, at most 1 s, never more than half) to
    // stop CRIU, thaw, clean up and answer before the caller gives up: the caller should hear
    // DeadlineExceeded from us, not time out on its own.
    let deadline = deadline.map(|d| {
        let total = d.saturating_duration_since(started);
        let margin = (total / 5)
            .max(Duration::from_millis(150))
            .min(Duration::from_secs(1))
            .min(total / 2);
        d - margin
    });
    if req.pod_sandbox_id.is_empty() {
        return Err(Status::invalid_argument("pod_sandbox_id is empty"));
    }
    let options = CheckpointOptions::parse(&req.options)?;
    // The sandbox and the directory are this call's until it returns, however it returns.
    let _in_flight = InFlight::acquire(
        Operation::Checkpoint,
        [
            Resource::Sandbox(req.pod_sandbox_id.clone()),
            Resource::directory(&check_output_path(&req.output_path)?),
        ],
    )?;
    let output = check_output_dir(&req.output_path)?;
    check_container_ids(&req.container_ids)?;
    let sandbox = &req.pod_sandbox_id;

    let status = cri
        .pod_sandbox_status(with_deadline(
            PodSandboxStatusRequest {
                pod_sandbox_id: sandbox.clone(),
                verbose: true,
            },
            deadline,
            "looking up the pod",
        )?)
        .await
        .map_err(|e| Status::new(e.code(), format!("pod sandbox {sandbox}: {}", e.message())))?
        .into_inner();
    let pod = status
        .status
        .ok_or_else(|| Status::not_found(format!("pod sandbox {sandbox} not found")))?;
    if pod.runtime_handler != HANDLER {
        return Err(Status::failed_precondition(format!(
            "pod sandbox {sandbox} runs on runtime handler {:?}: only {HANDLER:?} pods can be checkpointed",
            pod.runtime_handler
        )));
    }
    if pod.state != PodSandboxState::SandboxReady as i32 {
        return Err(Status::failed_precondition(format!(
            "pod sandbox {sandbox} is not ready"
        )));
    }
    let sandbox_config = verbose_info(&status.info)["config"].clone();
    let ips = pod_ips(pod.network.as_ref());
    let listed = cri
        .list_containers(with_deadline(
            ListContainersRequest {
                filter: Some(ContainerFilter {
                    pod_sandbox_id: sandbox.clone(),
                    ..Default::default()
                }),
            },
            deadline,
            "listing the pod's containers",
        )?)
        .await?
        .into_inner()
        .containers;
    let mut selected = Vec::new();
    for id in &req.container_ids {
        let container = listed.iter().find(|c| &c.id == id).ok_or_else(|| {
            Status::not_found(format!(
                "container {id} is not a container of pod sandbox {sandbox}"
            ))
        })?;
        if container.state != ContainerState::ContainerRunning as i32 {
            return Err(Status::failed_precondition(format!(
                "container {id} is not running"
            )));
        }
        let detail = cri
            .container_status(with_deadline(
                ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: true,
                },
                deadline,
                "looking up a container",
            )?)
            .await?
            .into_inner();
        let info = verbose_info(&detail.info);
        let name = container
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        podsnap_checkpoint_format::contained(&name).map_err(|_| {
            Status::failed_precondition(format!("container {id} has an unusable name {name:?}"))
        })?;
        if name == podsnap_checkpoint_format::VOLUMES_DIR
            || name == podsnap_checkpoint_format::MANIFEST
        {
            return Err(Status::failed_precondition(format!(
                "container {id} is named {name:?}, which a pod checkpoint reserves for itself"
            )));
        }
        selected.push(Selected {
            id: id.clone(),
            name,
            image: container
                .image
                .as_ref()
                .map(|i| i.image.clone())
                .unwrap_or_default(),
            image_ref: container.image_ref.clone(),
            config: info["config"].clone(),
            spec: info["runtimeSpec"].clone(),
            created_at: container.created_at,
        });
    }
    let mut names = HashSet::new();
    if let Some(dup) = selected.iter().find(|s| !names.insert(s.name.clone())) {
        return Err(Status::failed_precondition(format!(
            "two selected containers are named {:?}",
            dup.name
        )));
    }

    // Room for it, before anything is frozen.
    let estimate = estimate_size(&mut cri, &selected, deadline).await?;
    let space = {
        let dir = output.clone();
        tokio::task::spawn_blocking(move || fs_space(&dir))
            .await
            .map_err(|e| Status::internal(format!("disk space task: {e}")))?
            .map_err(|e| {
                Status::internal(format!(
                    "free space of the filesystem of {}: {e}",
                    output.display()
                ))
            })?
    };
    check_space(&estimate, space, &output, sandbox)?;
    tracing::debug!(sandbox = %sandbox, ?estimate, ?space, "room for the checkpoint");

    let left = remaining(deadline, "before the capture")?;
    let request = PodRequest::CheckpointSandbox {
        container_ids: req.container_ids.clone(),
        output_dir: output.clone(),
        leave_running: options.leave_running,
        tcp_established: options.tcp_established,
        timeout_ms: left.map(|d| d.as_millis() as u64),
    };
    let sandbox_id = sandbox.clone();
    let wait = left.unwrap_or(Duration::from_secs(3600)) + Duration::from_secs(5);
    let answer =
        tokio::task::spawn_blocking(move || podsnap_pod_api::call(&sandbox_id, &request, wait))
            .await
            .map_err(|e| Status::internal(format!("pod socket task: {e}")))?;
    let captured = match answer {
        Ok(PodResponse::Checkpointed {
            containers,
            freeze_window_ms,
        }) => {
            tracing::info!(sandbox = %sandbox, freeze_window_ms, "pod captured");
            containers
        }
        Ok(PodResponse::Failed { code, message }) => {
            discard(&output).await;
            return Err(Status::new(
                grpc_code(code),
                format!("pod sandbox {sandbox}: {message}"),
            ));
        }
        Err(e) => {
            discard(&output).await;
            return Err(Status::unavailable(format!(
                "pod sandbox {sandbox}: the podsnap shim's pod service: {e}"
            )));
        }
    };

    let result = tokio::task::spawn_blocking({
        let output = output.clone();
        let sandbox = sandbox.clone();
        let runtime_handler = pod.runtime_handler.clone();
        let metadata = pod.metadata.clone().unwrap_or_default();
        move || -> Result<(), String> {
            let mut containers = Vec::new();
            for s in &selected {
                let capture = captured
                    .iter()
                    .find(|c| c.container_id == s.id)
                    .ok_or_else(|| format!("the shim did not capture container {}", s.id))?;
                let dir = output.join(&s.name);
                std::fs::rename(&capture.dir, &dir)
                    .map_err(|e| format!("rename {}: {e}", capture.dir.display()))?;
                write_container_files(&dir, s, &runtime_handler)
                    .map_err(|e| format!("container {}: {e}", s.id))?;
                if options.compression == Compression::Zstd {
                    podsnap_checkpoint_format::pages::compress_pages(&dir.join("checkpoint"))
                        .map_err(|e| format!("container {}: compress pages: {e}", s.id))?;
                }
                containers.push(ContainerEntry {
                    name: s.name.clone(),
                    id: s.id.clone(),
                    image: s.image.clone(),
                    image_ref: s.image_ref.clone(),
                    config: s.config.clone(),
                });
            }
            let mut manifest = Manifest {
                format: FORMAT.to_string(),
                version: VERSION,
                minor: podsnap_checkpoint_format::MINOR,
                created: podsnap_checkpoint_format::dumps::rfc3339_now(),
                pod: PodEntry {
                    sandbox_id: sandbox,
                    name: metadata.name,
                    namespace: metadata.namespace,
                    uid: metadata.uid,
                    runtime_handler,
                    config: sandbox_config,
                    ips,
                },
                containers,
                criu_version: criu_rpc::Criu::new()
                    .version()
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
                options: options.to_map(),
                files: Default::default(),
                machine: Some(podsnap_checkpoint_format::Machine::here()),
            };
            // The shim hashed each container's images already (`podsnap.sha256`); reuse those,
            // and keep one integrity list for the whole checkpoint: the manifest's.
            let mut known = std::collections::BTreeMap::new();
            for s in &selected {
                let images = output.join(&s.name).join("checkpoint");
                let sums = podsnap_checkpoint_format::container::take_sums(&images)
                    .map_err(|e| format!("container {}: {e}", s.name))?;
                for (file, hash) in sums {
                    known.insert(format!("{}/checkpoint/{file}", s.name), hash);
                }
            }
            podsnap_checkpoint_format::write_manifest_reusing(&output, &mut manifest, &known)
                .map_err(|e| e.to_string())?;
            // Pinned outside the checkpoint: a restore refuses it changed, hashes and all.
            let digest =
                podsnap_checkpoint_format::manifest_sha256(&output).map_err(|e| e.to_string())?;
            podsnap_checkpoint_format::pins::pin(
                std::path::Path::new(podsnap_checkpoint_format::pins::PIN_DIR),
                &output,
                &digest,
            )
            .map_err(|e| format!("pin the checkpoint's manifest: {e}"))
        }
    })
    .await
    .map_err(|e| Status::internal(format!("checkpoint layout task: {e}")))?;
    if let Err(e) = result {
        discard(&output).await;
        return Err(Status::internal(format!("pod sandbox {sandbox}: {e}")));
    }
    tracing::info!(sandbox = %sandbox, containers = req.container_ids.len(), elapsed_ms = started.elapsed().as_millis() as u64, output = %output.display(), "pod checkpointed");
    Ok(CheckpointPodResponse {})
}

/// What a pod checkpoint is expected to take on disk, by part (bytes).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SizeEstimate {
    /// The selected containers' memory, as their cgroups count it (see [`cgroup_memory`]).
    pub memory: u64,
    /// Their writable layers, as containerd's ContainerStats reports them.
    pub writable_layers: u64,
    /// The emptyDir volumes they mount (see [`tree_size`]).
    pub volumes: u64,
}

impl SizeEstimate {
    pub fn total(&self) -> u64 {
        self.memory
            .saturating_add(self.writable_layers)
            .saturating_add(self.volumes)
    }
}

/// A filesystem's space (bytes): what an unprivileged writer may still use, and its size as
/// such a writer sees it — used plus available, as `df` computes its `Use%`. Blocks reserved for
/// root (ext4's reserved blocks, often 5 %, sometimes far more) are in neither: a margin taken
/// of them would ask for space no checkpoint could ever use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsSpace {
    pub available: u64,
    pub size: u64,
}

/// The least space a checkpoint leaves free on its filesystem.
pub const MIN_SPACE_MARGIN: u64 = 256 << 20;

/// The space a checkpoint must leave free on a filesystem of `size` bytes: 5 % of it, at least
/// [`MIN_SPACE_MARGIN`] — the node's other writers (and its kubelet, which evicts pods under
/// disk pressure) need room too, and the estimate is only an estimate.
pub fn space_margin(size: u64) -> u64 {
    (size / 20).max(MIN_SPACE_MARGIN)
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", bytes.div_ceil(1 << 20))
}

/// Refuses (ResourceExhausted) a checkpoint of `sandbox` into `dir` expected to take `needed`
/// when `space` does not hold it plus [`space_margin`].
pub fn check_space(
    needed: &SizeEstimate,
    space: FsSpace,
    dir: &Path,
    sandbox: &str,
) -> Result<(), Status> {
    let margin = space_margin(space.size);
    if needed.total().saturating_add(margin) <= space.available {
        return Ok(());
    }
    Err(Status::resource_exhausted(format!(
        "not enough disk space for a checkpoint of pod sandbox {sandbox}: it is expected to take \
         about {} (memory {}, writable layers {}, emptyDir volumes {}) and must leave {} free, \
         but the filesystem of {} has {} available",
        mib(needed.total()),
        mib(needed.memory),
        mib(needed.writable_layers),
        mib(needed.volumes),
        mib(margin),
        dir.display(),
        mib(space.available),
    )))
}

/// The space of the filesystem that holds `path` (statvfs).
// statvfs's counts are `c_ulong`: u64 here, u32 on 32-bit targets.
#[allow(clippy::unnecessary_cast)]
pub fn fs_space(path: &Path) -> std::io::Result<FsSpace> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `path` is a NUL-terminated string and `stat` points to writable memory of the
    // struct's size; statvfs fills it in on success.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs succeeded, so it initialised the struct.
    let stat = unsafe { stat.assume_init() };
    let fragment = stat.f_frsize as u64;
    let used = (stat.f_blocks as u64).saturating_sub(stat.f_bfree as u64);
    Ok(FsSpace {
        available: (stat.f_bavail as u64).saturating_mul(fragment),
        size: used
            .saturating_add(stat.f_bavail as u64)
            .saturating_mul(fragment),
    })
}

/// Where cgroup filesystems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The memory a checkpoint of the container in cgroup `cgroups_path` (the runtime spec's
/// `linux.cgroupsPath`, as the podsnap shim uses it: a path under the cgroup mounts) is
/// expected to dump, read under `root`: anonymous plus shared memory (`anon` + `shmem` on cgroup
/// v2, `total_rss` + `total_shmem` on v1, from `memory.stat`) — page cache is not dumped, so
/// counting all of `memory.current`/`memory.usage_in_bytes` would refuse pods that merely read
/// big files; those are the fallback when `memory.stat` has neither. `None` when the cgroup
/// cannot be found (a systemd `slice:prefix:name` path, a container gone).
pub fn cgroup_memory(root: &Path, cgroups_path: &str) -> Option<u64> {
    if cgroups_path.is_empty() || cgroups_path.contains(':') {
        return None;
    }
    let relative = cgroups_path.trim_start_matches('/');
    if Path::new(relative)
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return None;
    }
    let (dir, keys, usage) = if root.join("cgroup.controllers").exists() {
        (root.join(relative), ["anon", "shmem"], "memory.current")
    } else {
        (
            root.join("memory").join(relative),
            ["total_rss", "total_shmem"],
            "memory.usage_in_bytes",
        )
    };
    if let Ok(stat) = std::fs::read_to_string(dir.join("memory.stat")) {
        let mut found = false;
        let mut sum = 0u64;
        for line in stat.lines() {
            if let Some((key, value)) = line.split_once(' ')
                && keys.contains(&key)
                && let Ok(value) = value.trim().parse::<u64>()
            {
                found = true;
                sum = sum.saturating_add(value);
            }
        }
        if found {
            return Some(sum);
        }
    }
    std::fs::read_to_string(dir.join(usage))
        .ok()
        .and_then(|text| text.trim().parse().ok())
}

/// The host paths of the kubelet emptyDir volumes a runtime spec mounts
/// (`<root-dir>/pods/<uid>/volumes/kubernetes.io~empty-dir/<name>`), as the shim archives them.
pub fn empty_dir_sources(spec: &serde_json::Value) -> Vec<PathBuf> {
    spec["mounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["source"].as_str())
        .filter(|source| {
            source
                .trim_end_matches('/')
                .rsplit_once("/volumes/kubernetes.io~empty-dir/")
                .is_some_and(|(_, name)| !name.is_empty() && !name.contains('/'))
        })
        .map(PathBuf::from)
        .collect()
}

/// At most this many entries of a volume are looked at by [`tree_size`].
const TREE_SIZE_ENTRIES: usize = 1_000_000;

/// The bytes an archive of the tree at `root` takes, about: each entry's length plus a header
/// (512 bytes, as tar's). Symbolic links are not followed, other filesystems not entered;
/// unreadable entries are skipped; at most `max_entries` entries are counted (so it is a lower
/// bound on a bigger tree).
pub fn tree_size(root: &Path, max_entries: usize) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(top) = std::fs::symlink_metadata(root) else {
        return 0;
    };
    let device = top.dev();
    let mut total = 0u64;
    let mut seen = 0usize;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            seen += 1;
            if seen > max_entries {
                return total;
            }
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            total = total.saturating_add(512);
            if meta.is_dir() {
                if meta.dev() == device {
                    pending.push(entry.path());
                }
            } else if meta.is_file() {
                total = total.saturating_add(meta.len());
            }
        }
    }
    total
}

/// How long one ContainerStats call may take while sizing a checkpoint.
const STATS_TIMEOUT: Duration = Duration::from_secs(5);

/// What checkpointing `selected` is expected to take: the memory of each container's cgroup,
/// its writable layer (containerd's ContainerStats; 0 when it has none to give), and the
/// emptyDir volumes they mount, each counted once.
async fn estimate_size(
    cri: &mut RuntimeServiceClient<Channel>,
    selected: &[Selected],
    deadline: Option<Instant>,
) -> Result<SizeEstimate, Status> {
    let mut writable_layers = 0u64;
    for s in selected {
        // Sizing must not eat the checkpoint's time: a few seconds each, at most.
        let soon = Instant::now() + STATS_TIMEOUT;
        let stats = cri
            .container_stats(with_deadline(
                ContainerStatsRequest {
                    container_id: s.id.clone(),
                },
                Some(deadline.map_or(soon, |d| d.min(soon))),
                "sizing the checkpoint",
            )?)
            .await;
        match stats {
            Ok(answer) => {
                writable_layers = writable_layers.saturating_add(
                    answer
                        .into_inner()
                        .stats
                        .and_then(|s| s.writable_layer)
                        .and_then(|w| w.used_bytes)
                        .map_or(0, |b| b.value),
                )
            }
            Err(e) => tracing::debug!(container = %s.id, error = %e, "no writable layer size"),
        }
    }
    let cgroups: Vec<String> = selected
        .iter()
        .map(|s| {
            s.spec["linux"]["cgroupsPath"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let mut volumes: Vec<PathBuf> = selected
        .iter()
        .flat_map(|s| empty_dir_sources(&s.spec))
        .collect();
    volumes.sort();
    volumes.dedup();
    let (memory, volumes) = tokio::task::spawn_blocking(move || {
        let root = Path::new(CGROUP_ROOT);
        let memory = cgroups
            .iter()
            .filter_map(|path| cgroup_memory(root, path))
            .fold(0u64, u64::saturating_add);
        let volumes = volumes
            .iter()
            .map(|v| tree_size(v, TREE_SIZE_ENTRIES))
            .fold(0u64, u64::saturating_add);
        (memory, volumes)
    })
    .await
    .map_err(|e| Status::internal(format!("checkpoint size task: {e}")))?;
    Ok(SizeEstimate {
        memory,
        writable_layers,
        volumes,
    })
}

/// The pod's addresses as CRI reports them, primary first; none for a pod without its own
/// network (host network) or one CRI reports none for.
pub fn pod_ips(network: Option<&cri_api::v1::PodSandboxNetworkStatus>) -> Vec<std::net::IpAddr> {
    let Some(network) = network else {
        return Vec::new();
    };
    std::iter::once(network.ip.as_str())
        .chain(network.additional_ips.iter().map(|ip| ip.ip.as_str()))
        .filter_map(|ip| ip.parse().ok())
        .collect()
}

/// The gRPC code of a pod service failure.
pub fn grpc_code(code: podsnap_pod_api::ErrorCode) -> tonic::Code {
    use podsnap_pod_api::ErrorCode;
    match code {
        ErrorCode::InvalidArgument => tonic::Code::InvalidArgument,
        ErrorCode::FailedPrecondition => tonic::Code::FailedPrecondition,
        ErrorCode::NotFound => tonic::Code::NotFound,
        ErrorCode::DeadlineExceeded => tonic::Code::DeadlineExceeded,
        ErrorCode::Internal => tonic::Code::Internal,
    }
}

/// `config.dump` (what checkpointctl reads), `spec.dump` and `stats-dump` of one container.
fn write_container_files(dir: &Path, s: &Selected, runtime: &str) -> std::io::Result<()> {
    use podsnap_checkpoint_format::dumps;
    let config = dumps::ConfigDump {
        id: s.id.clone(),
        name: s.name.clone(),
        rootfs_image: s.image.clone(),
        rootfs_image_ref: s.image_ref.clone(),
        rootfs_image_name: podsnap_checkpoint_format::image_name(&s.config, &s.image).to_string(),
        runtime: runtime.to_string(),
        created_time: dumps::rfc3339(s.created_at.div_euclid(1_000_000_000)),
        checkpointed_time: dumps::rfc3339_now(),
    };
    dumps::write(dir, &config, &s.spec)?;
    let stats = dir.join("checkpoint").join("stats-dump");
    if stats.exists() {
        std::fs::copy(&stats, dir.join("stats-dump"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_directory_still_written_to_is_emptied_once_its_writer_ends() {
        let root = tempfile::tempdir().unwrap();
        let images = root.path().join("container").join("checkpoint");
        std::fs::create_dir_all(&images).unwrap();
        // A writer that goes on adding files for a while, as a CRIU whose shim died does.
        let writer = {
            let images = images.clone();
            std::thread::spawn(move || {
                // Into the directory it has (a removed one takes no new files).
                for i in 0..20_000 {
                    if std::fs::write(images.join(format!("pages-{i}.img")), [0u8; 64]).is_err() {
                        break;
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_millis(20));
        empty_dir_within(root.path(), Duration::from_secs(20));
        writer.join().unwrap();
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
        assert!(root.path().is_dir(), "the directory itself stays");
    }

    use super::*;

    #[test]
    fn output_path_must_be_absolute_existing_and_empty() {
        assert_eq!(
            check_output_dir("relative/dir").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            check_output_dir("").unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert!(
            check_output_dir("/nonexistent/podsnap")
                .unwrap_err()
                .message()
                .contains("/nonexistent/podsnap")
        );
        let dir = tempfile::tempdir().unwrap();
        assert!(check_output_dir(dir.path().to_str().unwrap()).is_ok());
        std::fs::write(dir.path().join("x"), b"").unwrap();
        assert!(
            check_output_dir(dir.path().to_str().unwrap())
                .unwrap_err()
                .message()
                .contains("not empty")
        );
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/tmp", &link).unwrap();
        assert!(check_output_dir(link.to_str().unwrap()).is_err());
    }

    #[test]
    fn container_ids_must_be_non_empty_and_unique() {
        assert!(check_container_ids(&[]).is_err());
        let err = check_container_ids(&["a".into(), "a".into()]).unwrap_err();
        assert!(err.message().contains("twice"));
        assert!(check_container_ids(&["a".into(), "b".into()]).is_ok());
    }

    #[test]
    fn an_expired_deadline_is_deadline_exceeded() {
        let past = Instant::now() - Duration::from_millis(1);
        assert_eq!(
            remaining(Some(past), "x").unwrap_err().code(),
            tonic::Code::DeadlineExceeded
        );
        assert!(remaining(None, "x").unwrap().is_none());
    }

    /// A CRI client of a containerd that is not there: any call to it fails (Unavailable).
    fn no_containerd() -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(
            tonic::transport::Endpoint::from_static("http://127.0.0.1:1").connect_lazy(),
        )
    }

    fn request(sandbox: &str, output: &Path) -> CheckpointPodRequest {
        CheckpointPodRequest {
            pod_sandbox_id: sandbox.to_string(),
            output_path: output.to_str().unwrap().to_string(),
            container_ids: vec!["c1".into()],
            options: Default::default(),
        }
    }

    fn in_30s() -> Option<Instant> {
        Some(Instant::now() + Duration::from_secs(30))
    }

    #[tokio::test]
    async fn a_checkpoint_without_a_deadline_is_refused_before_anything_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let err = checkpoint_pod(no_containerd(), request("s-no-deadline", dir.path()), None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("needs a deadline"), "{err:?}");
        // With one it goes on (to containerd, absent here).
        let err = checkpoint_pod(
            no_containerd(),
            request("s-no-deadline", dir.path()),
            in_30s(),
        )
        .await
        .unwrap_err();
        assert_ne!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    }

    #[tokio::test]
    async fn a_second_checkpoint_of_a_busy_sandbox_or_into_a_busy_directory_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let sandbox = "s-busy-sandbox";
        let held = InFlight::acquire(
            Operation::Checkpoint,
            [
                Resource::Sandbox(sandbox.into()),
                Resource::directory(dir.path()),
            ],
        )
        .unwrap();
        let err = checkpoint_pod(no_containerd(), request(sandbox, other.path()), in_30s())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert_eq!(
            err.message(),
            "a checkpoint of pod sandbox s-busy-sandbox is already in progress"
        );
        // The same directory, spelt otherwise, for another pod.
        let spelt = dir.path().join(".");
        let err = checkpoint_pod(no_containerd(), request("s-busy-other", &spelt), in_30s())
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("already in progress"), "{err:?}");
        // Neither refused call kept anything.
        assert!(!crate::in_flight::Registry::global().is_held(&Resource::directory(other.path())));
        assert!(
            !crate::in_flight::Registry::global()
                .is_held(&Resource::Sandbox("s-busy-other".into()))
        );
        drop(held);
        // Once the first is done, a call gets past the guard (to containerd, absent here), and
        // releases it when it fails.
        let err = checkpoint_pod(no_containerd(), request(sandbox, dir.path()), in_30s())
            .await
            .unwrap_err();
        assert_ne!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(!crate::in_flight::Registry::global().is_held(&Resource::Sandbox(sandbox.into())));
        assert!(!crate::in_flight::Registry::global().is_held(&Resource::directory(dir.path())));
    }

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    #[test]
    fn the_margin_is_5_percent_of_the_filesystem_at_least_256_mib() {
        assert_eq!(space_margin(100 * GIB), 5 * GIB);
        assert_eq!(space_margin(GIB), 256 * MIB);
        assert_eq!(space_margin(0), 256 * MIB);
    }

    #[test]
    fn a_checkpoint_that_does_not_fit_with_the_margin_is_resource_exhausted() {
        let needed = SizeEstimate {
            memory: 3 * GIB,
            writable_layers: GIB,
            volumes: 2 * GIB,
        };
        assert_eq!(needed.total(), 6 * GIB);
        let dir = Path::new("/var/lib/kubelet/pod-checkpoints/checkpoint-x");
        // 100 GiB filesystem: a 5 GiB margin, so 11 GiB are needed.
        let fits = FsSpace {
            available: 11 * GIB,
            size: 100 * GIB,
        };
        assert!(check_space(&needed, fits, dir, "s1").is_ok());
        let short = FsSpace {
            available: 11 * GIB - 1,
            size: 100 * GIB,
        };
        let err = check_space(&needed, short, dir, "s1").unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        for part in [
            "pod sandbox s1",
            "about 6144 MiB (memory 3072 MiB, writable layers 1024 MiB, emptyDir volumes 2048 MiB)",
            "must leave 5120 MiB free",
            "/var/lib/kubelet/pod-checkpoints/checkpoint-x has 11264 MiB available",
        ] {
            assert!(err.message().contains(part), "{part:?} not in {err:?}");
        }
        // A small filesystem: the 256 MiB floor.
        let small = FsSpace {
            available: 300 * MIB,
            size: GIB,
        };
        let tiny = SizeEstimate {
            memory: 40 * MIB,
            ..Default::default()
        };
        assert!(check_space(&tiny, small, dir, "s1").is_ok());
        let more = SizeEstimate {
            memory: 50 * MIB,
            ..Default::default()
        };
        assert!(check_space(&more, small, dir, "s1").is_err());
        // Nothing known: only the margin.
        assert!(check_space(&SizeEstimate::default(), small, dir, "s1").is_ok());
        let full = FsSpace {
            available: 100 * MIB,
            size: GIB,
        };
        assert!(check_space(&SizeEstimate::default(), full, dir, "s1").is_err());
    }

    #[test]
    fn the_free_space_of_a_real_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let space = fs_space(dir.path()).unwrap();
        assert!(space.size > 0 && space.available <= space.size, "{space:?}");
        assert!(fs_space(&dir.path().join("missing")).is_err());
        // The size is df's used plus available (root's reserved blocks left out), give or take
        // what other writers did in between.
        let df = std::process::Command::new("df")
            .args(["-B1", "--output=used,avail"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(df.status.success(), "{df:?}");
        let text = String::from_utf8(df.stdout).unwrap();
        let figures: Vec<u64> = text
            .lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .map(|f| f.parse().unwrap())
            .collect();
        let df_size = figures[0] + figures[1];
        assert!(
            space.size.abs_diff(df_size) <= df_size / 100 + (64 << 20),
            "statvfs {space:?}, df used + avail {df_size}"
        );
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn container_memory_from_cgroup_v2() {
        let root = tempfile::tempdir().unwrap();
        write(&root.path().join("cgroup.controllers"), "memory pids\n");
        let cgroup = root.path().join("kubepods/pod1/c1");
        write(
            &cgroup.join("memory.stat"),
            "anon 1000\nfile 999999\nkernel 5\nshmem 24\n",
        );
        write(&cgroup.join("memory.current"), "1000028\n");
        assert_eq!(cgroup_memory(root.path(), "/kubepods/pod1/c1"), Some(1024));
        // No memory.stat: all it uses.
        std::fs::remove_file(cgroup.join("memory.stat")).unwrap();
        assert_eq!(
            cgroup_memory(root.path(), "/kubepods/pod1/c1"),
            Some(1000028)
        );
        assert_eq!(cgroup_memory(root.path(), "/kubepods/pod1/gone"), None);
    }

    #[test]
    fn container_memory_from_cgroup_v1() {
        let root = tempfile::tempdir().unwrap();
        let cgroup = root.path().join("memory/kubepods/pod1/c1");
        write(
            &cgroup.join("memory.stat"),
            "rss 1\nshmem 1\ncache 4096\ntotal_rss 2048\ntotal_shmem 2048\ntotal_cache 777\n",
        );
        assert_eq!(cgroup_memory(root.path(), "/kubepods/pod1/c1"), Some(4096));
        write(&cgroup.join("memory.stat"), "cache 4096\n");
        write(&cgroup.join("memory.usage_in_bytes"), "8192\n");
        assert_eq!(cgroup_memory(root.path(), "kubepods/pod1/c1"), Some(8192));
    }

    #[test]
    fn unusable_cgroup_paths_give_no_memory() {
        let root = tempfile::tempdir().unwrap();
        write(&root.path().join("memory.current"), "5\n");
        for path in [
            "",
            "/",
            "kubepods-pod1.slice:cri-containerd:c1",
            "/kubepods/../..",
        ] {
            assert_eq!(cgroup_memory(root.path(), path), None, "{path:?}");
        }
    }

    #[test]
    fn empty_dir_volumes_are_found_in_the_runtime_spec() {
        let spec = serde_json::json!({"mounts": [
            {"destination": "/data",
             "source": "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/data"},
            {"destination": "/cache",
             "source": "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/cache/"},
            {"destination": "/etc/config",
             "source": "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~configmap/config"},
            {"destination": "/sub",
             "source": "/var/lib/kubelet/pods/u1/volume-subpaths/x/kubernetes.io~empty-dir/a/b"},
            {"destination": "/proc", "type": "proc"},
        ]});
        assert_eq!(
            empty_dir_sources(&spec),
            [
                PathBuf::from("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/data"),
                PathBuf::from("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/cache/"),
            ]
        );
        assert!(empty_dir_sources(&serde_json::Value::Null).is_empty());
    }

    #[test]
    fn a_trees_size_counts_files_and_headers_and_follows_no_links() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("vol");
        write(&root.join("a"), &"x".repeat(1000));
        write(&root.join("sub/b"), &"y".repeat(24));
        let outside = dir.path().join("outside");
        write(&outside.join("big"), &"z".repeat(100_000));
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        // a, sub, sub/b, link: four headers.
        assert_eq!(tree_size(&root, 100), 1000 + 24 + 4 * 512);
        assert!(tree_size(&root, 1) < 1000 + 24 + 4 * 512);
        assert_eq!(tree_size(&dir.path().join("missing"), 100), 0);
    }
}

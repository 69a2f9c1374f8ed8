//! Container checkpoint and restore with CRIU, driven through [`criu_rpc`].
//!
//! A checkpoint is a directory of CRIU images plus three files of ours, in the layout runc's
//! shim produces (so containerd's CRI and `checkpointctl` read it):
//! - `descriptors.json`: what the init's stdin/stdout/stderr were (`pipe:[ino]`, `/dev/null`);
//! - `podsnap-checkpoint.json`: the external mounts and namespaces and the CRIU options a
//!   restore must repeat;
//! - `podsnap.sha256`: the sha256 of every other file, checked before a restore creates anything.
//!
//! Mounts CRIU cannot dump from inside the container (bind mounts from the host, cgroup v1
//! hierarchies, `/dev/null` masks) are declared external at dump and mapped to the new
//! container's sources at restore; namespaces joined from the pod sandbox (network, pid) are
//! external too. This module does not know the Task API or containerd's content store.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use criu_rpc::{CgroupMode, Criu, DumpOptions, RestoreOptions};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// File naming the init's stdio at dump time.
pub const DESCRIPTORS: &str = "descriptors.json";
/// Our metadata about the checkpoint.
pub const METADATA: &str = "podsnap-checkpoint.json";
/// The sha256 of every file of the checkpoint.
pub const CHECKSUMS: &str = "podsnap.sha256";

/// CRIU's log verbosity for dumps and restores: errors and warnings.
const CRIU_LOG_LEVEL: i32 = 2;

/// The options of containerd's runc `CheckpointOptions` that podsnap honours.
#[derive(Debug, Clone, Default)]
pub struct CheckpointOptions {
    pub exit: bool,
    pub open_tcp: bool,
    pub external_unix_sockets: bool,
    pub terminal: bool,
    pub file_locks: bool,
    pub image_path: Option<PathBuf>,
    pub work_path: Option<PathBuf>,
    /// Give up when CRIU is silent this long (it is then killed; the tasks survive).
    pub timeout: Option<std::time::Duration>,
}

/// How a mount the container has was handled at dump.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ExternalMount {
    /// A bind mount the spec declares at this destination: the new spec's source replaces it.
    Spec { destination: String },
    /// A cgroup v1 hierarchy bound from the host: the new container's cgroup replaces it.
    Cgroup {
        destination: String,
        controller: String,
        /// Whether the whole hierarchy was bound (rather than the container's cgroup).
        whole: bool,
    },
    /// A path masked with the host's /dev/null.
    DevNull { destination: String },
}

impl ExternalMount {
    pub fn destination(&self) -> &str {
        match self {
            ExternalMount::Spec { destination }
            | ExternalMount::Cgroup { destination, .. }
            | ExternalMount::DevNull { destination } => destination,
        }
    }
}

/// What a restore must know about how the checkpoint was taken.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Metadata {
    pub version: u32,
    pub external_mounts: Vec<ExternalMount>,
    /// Namespaces joined from outside the container (`network`, `pid`).
    pub external_namespaces: Vec<String>,
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub file_locks: bool,
    pub shell_job: bool,
}

/// One line of `/proc/<pid>/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub dev: String,
    pub root: String,
    pub mount_point: String,
    pub fs_type: String,
    pub super_options: String,
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            Some(MountInfo {
                dev: fields.get(2)?.to_string(),
                root: unescape(fields.get(3)?),
                mount_point: unescape(fields.get(4)?),
                fs_type: right.first()?.to_string(),
                super_options: right.get(2).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// File systems CRIU dumps and restores itself when the container has the whole of them.
const CRIU_FILESYSTEMS: [&str; 6] = ["proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup2"];

/// Decides which of the container's mounts are external, from its mountinfo and spec.
pub fn external_mounts(mounts: &[MountInfo], spec: &Spec) -> anyhow::Result<Vec<ExternalMount>> {
    let bind_destinations: Vec<String> = spec
        .mounts()
        .iter()
        .flatten()
        .filter(|m| {
            m.typ().as_deref() == Some("bind")
                || m.options()
                    .iter()
                    .flatten()
                    .any(|o| o == "bind" || o == "rbind")
        })
        .map(|m| m.destination().display().to_string())
        .collect();
    let whole: Vec<&MountInfo> = mounts.iter().filter(|m| m.root == "/").collect();
    let mut external = Vec::new();
    for m in mounts.iter().filter(|m| m.mount_point != "/") {
        if bind_destinations.contains(&m.mount_point) {
            external.push(ExternalMount::Spec {
                destination: m.mount_point.clone(),
            });
        } else if m.root == "/" && CRIU_FILESYSTEMS.contains(&m.fs_type.as_str()) {
            // CRIU dumps it.
        } else if whole
            .iter()
            .any(|w| w.dev == m.dev && w.mount_point != "/" && w.mount_point != m.mount_point)
        {
            // A bind of part of a file system the container mounts whole: CRIU resolves it.
        } else if m.fs_type == "cgroup" {
            let controller = m
                .super_options
                .split(',')
                .filter(|o| *o != "rw" && *o != "ro")
                .collect::<Vec<_>>()
                .join(",");
            external.push(ExternalMount::Cgroup {
                destination: m.mount_point.clone(),
                controller,
                whole: m.root == "/",
            });
        } else if m.fs_type == "devtmpfs" && m.root == "/null" {
            external.push(ExternalMount::DevNull {
                destination: m.mount_point.clone(),
            });
        } else {
            bail!(
                "mount {} ({} {}) comes from outside the container and is not in its spec: \
                 it cannot be checkpointed",
                m.mount_point,
                m.fs_type,
                m.root
            );
        }
    }
    Ok(external)
}

/// The cgroup v1 controllers of `pid` (from `/proc/<pid>/cgroup`), without named hierarchies.
fn v1_controllers(pid: i32) -> Vec<String> {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(':').nth(1).map(str::to_string))
        .flat_map(|list| list.split(',').map(str::to_string).collect::<Vec<_>>())
        .filter(|c| !c.is_empty() && !c.starts_with("name="))
        .collect()
}

/// The path of a namespace the spec joins, if it joins one of `typ`.
fn joined_namespace(spec: &Spec, typ: LinuxNamespaceType) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|ns| ns.typ() == typ)
        .and_then(|ns| ns.path().clone())
}

/// CRIU's key for an external namespace, as runc names them.
fn namespace_key(name: &str) -> &'static str {
    if name == "network" {
        "extRootNetNS"
    } else {
        "extRootPidNS"
    }
}

fn namespace_kind(name: &str) -> (LinuxNamespaceType, &'static str) {
    if name == "network" {
        (LinuxNamespaceType::Network, "net")
    } else {
        (LinuxNamespaceType::Pid, "pid")
    }
}

/// Creates `path` (its parent must exist: a directory removed meanwhile is not made again),
/// root-only (0700).
pub fn new_private_dir(path: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .with_context(|| format!("create {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod 0700 {}", path.display()))
}

/// Creates a directory readable by root only.
pub fn private_dir(path: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| format!("create {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod 0700 {}", path.display()))
}

/// Everything a dump needs to know about the container.
pub struct DumpTarget<'a> {
    pub id: &'a str,
    pub pid: i32,
    pub spec: &'a Spec,
    pub rootfs: &'a Path,
    /// The cgroup to freeze while dumping (the freezer hierarchy on v1).
    pub freezer: Option<PathBuf>,
}

/// Dumps the container into `images` (created 0700 if missing) and seals it (`podsnap.sha256`).
/// On error, files this call wrote are removed and the container keeps running.
pub fn dump(
    target: &DumpTarget<'_>,
    images: &Path,
    opts: &CheckpointOptions,
) -> anyhow::Result<()> {
    let created = !images.exists();
    dump_unsealed(target, images, opts)?;
    seal(images).inspect_err(|_| {
        if created {
            let _ = fs::remove_dir_all(images);
        } else {
            remove_written(images);
        }
    })
}

/// Writes `podsnap.sha256` for a dumped checkpoint. Needs no frozen container: a pod checkpoint
/// seals its containers' images after thawing them.
pub fn seal(images: &Path) -> anyhow::Result<()> {
    write_checksums(images).with_context(|| format!("seal checkpoint {}", images.display()))
}

/// Why a container with a user namespace is not checkpointed (`None` when it has none).
///
/// CRIU 4.1.1 dumps such a container, but it restores a user namespace only by creating a new
/// one from the dumped maps: the restored processes would not be in the new pod's user
/// namespace, and would hold no capability over the pod's network namespace, which that one
/// owns (`--join-ns user:` is documented as untested, and does not combine with a dumped user
/// namespace). Refused before anything is frozen or written, never half-restored later.
pub fn user_namespace_refusal(id: &str, spec: &Spec) -> Option<String> {
    crate::mount_sources::has_user_namespace(spec).then(|| {
        format!(
            "container {id} runs in a user namespace (hostUsers: false): podsnap cannot yet \
             restore a container into its pod's user namespace, so it is not checkpointed"
        )
    })
}

/// [`dump`] without [`seal`]: what must happen while the container is frozen.
pub fn dump_unsealed(
    target: &DumpTarget<'_>,
    images: &Path,
    opts: &CheckpointOptions,
) -> anyhow::Result<()> {
    let id = target.id;
    if let Some(refusal) = user_namespace_refusal(id, target.spec) {
        anyhow::bail!(refusal);
    }
    let created = !images.exists();
    if created {
        private_dir(images)?;
    } else {
        // Given by the caller (a pod checkpoint made it already): root-only all the same, but
        // not made again should it vanish meanwhile.
        fs::set_permissions(images, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 0700 {}", images.display()))?;
    }
    let work = match &opts.work_path {
        Some(dir) => {
            private_dir(dir)?;
            None
        }
        None => Some(
            tempfile::Builder::new()
                .prefix("podsnap-criu-work-")
                .tempdir()
                .context("create CRIU work directory")?,
        ),
    };
    let work_dir = opts
        .work_path
        .clone()
        .unwrap_or_else(|| work.as_ref().expect("made above").path().to_path_buf());
    let result = dump_into(target, images, &work_dir, opts);
    if result.is_err() {
        if created {
            let _ = fs::remove_dir_all(images);
        } else {
            remove_written(images);
        }
    }
    result.with_context(|| format!("checkpoint container {id}"))
}

/// Removes what a failed dump wrote into a directory the caller gave.
fn remove_written(images: &Path) {
    if let Ok(entries) = fs::read_dir(images) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".img")
                || [DESCRIPTORS, METADATA, CHECKSUMS, "stats-dump"].contains(&name.as_ref())
            {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

fn dump_into(
    target: &DumpTarget<'_>,
    images: &Path,
    work: &Path,
    opts: &CheckpointOptions,
) -> anyhow::Result<()> {
    let pid = target.pid;
    let mountinfo = fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .with_context(|| format!("read mounts of pid {pid}"))?;
    let mounts = external_mounts(&parse_mountinfo(&mountinfo), target.spec)?;
    let mut metadata = Metadata {
        version: 1,
        external_mounts: mounts.clone(),
        external_namespaces: Vec::new(),
        tcp_established: opts.open_tcp,
        ext_unix_sk: opts.external_unix_sockets,
        file_locks: opts.file_locks,
        shell_job: opts.terminal,
    };
    let mut criu_opts = DumpOptions::new(pid, images)
        .work_dir(work)
        .log_file("dump.log")
        .log_level(CRIU_LOG_LEVEL)
        .leave_running(!opts.exit)
        .tcp_established(opts.open_tcp)
        .ext_unix_sk(opts.external_unix_sockets)
        .shell_job(opts.terminal)
        .file_locks(opts.file_locks)
        .manage_cgroups(CgroupMode::Soft)
        .root(target.rootfs);
    if let Some(freezer) = &target.freezer {
        criu_opts = criu_opts.freeze_cgroup(freezer);
    }
    // Only the controllers the runtime manages: named hierarchies (name=systemd) and the
    // unified one of a hybrid host hold the tasks wherever the shim is, and restoring those
    // paths under the new container's root would nest cgroups ever deeper.
    for controller in v1_controllers(pid) {
        criu_opts = criu_opts.cgroup_dump_controller(controller);
    }
    for m in &mounts {
        criu_opts = criu_opts.ext_mount(m.destination(), m.destination());
    }
    for name in ["network", "pid"] {
        let (typ, proc_name) = namespace_kind(name);
        if joined_namespace(target.spec, typ).is_some() {
            let ino = fs::metadata(format!("/proc/{pid}/ns/{proc_name}"))
                .with_context(|| format!("stat {proc_name} namespace of pid {pid}"))?
                .ino();
            criu_opts = criu_opts.external(format!("{proc_name}[{ino}]:{}", namespace_key(name)));
            metadata.external_namespaces.push(name.to_string());
        }
    }
    let descriptors: Vec<String> = (0..3)
        .map(|fd| {
            fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "/dev/null".to_string())
        })
        .collect();
    let mut criu = Criu::new();
    if let Some(timeout) = opts.timeout {
        criu = criu.timeout(timeout);
    }
    criu.dump(&criu_opts)?;
    write_private(
        &images.join(DESCRIPTORS),
        &serde_json::to_vec(&descriptors)?,
    )?;
    write_private(
        &images.join(METADATA),
        &serde_json::to_vec_pretty(&metadata)?,
    )?;
    // CRIU writes its statistics next to its log; checkpointctl reads them from the images.
    let _ = fs::copy(work.join("stats-dump"), images.join("stats-dump"));
    // The images hold all of the container's memory, secrets included: root only.
    for entry in fs::read_dir(images)?.flatten() {
        fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", entry.path().display()))?;
    }
    Ok(())
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(data)
        .with_context(|| format!("write {}", path.display()))
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut file = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The regular files of a checkpoint directory (which has no subdirectories), by name.
fn checkpoint_files(dir: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let kind = entry.file_type()?;
        ensure!(
            kind.is_file(),
            "{} is not a regular file: a checkpoint holds only files",
            entry.path().display()
        );
        if name != CHECKSUMS {
            files.insert(name, entry.path());
        }
    }
    Ok(files)
}

fn write_checksums(dir: &Path) -> anyhow::Result<()> {
    let mut text = String::new();
    for (name, path) in checkpoint_files(dir)? {
        text.push_str(&format!("{}  {name}\n", sha256_file(&path)?));
    }
    write_private(&dir.join(CHECKSUMS), text.as_bytes())
}

/// Checks a checkpoint before anything is restored from it: every file is listed in
/// `podsnap.sha256` with the right hash, nothing else is there, and our metadata parses.
pub fn verify(dir: &Path) -> anyhow::Result<(Metadata, Vec<String>)> {
    ensure!(dir.is_dir(), "checkpoint {} does not exist", dir.display());
    let listed = fs::read_to_string(dir.join(CHECKSUMS)).with_context(|| {
        format!(
            "checkpoint {} has no {CHECKSUMS}: not a podsnap checkpoint, or truncated",
            dir.display()
        )
    })?;
    let mut expected = BTreeMap::new();
    for line in listed.lines() {
        let (hash, name) = line
            .split_once("  ")
            .with_context(|| format!("malformed line in {CHECKSUMS}: {line:?}"))?;
        ensure!(
            !name.contains('/') && name != ".." && name != ".",
            "{CHECKSUMS} names a path outside the checkpoint: {name:?}"
        );
        expected.insert(name.to_string(), hash.to_string());
    }
    let files = checkpoint_files(dir)?;
    for name in expected.keys() {
        ensure!(
            files.contains_key(name),
            "checkpoint {} is missing {name}",
            dir.display()
        );
    }
    for (name, path) in &files {
        let want = expected.get(name).with_context(|| {
            format!("checkpoint {} has an unexpected file {name}", dir.display())
        })?;
        let got = sha256_file(path)?;
        ensure!(
            &got == want,
            "checkpoint file {} was modified (sha256 {got}, expected {want})",
            path.display()
        );
    }
    read_metadata(dir)
}

/// Reads our metadata and the init's descriptors from a checkpoint whose files were verified
/// already (against `podsnap.sha256`, or a pod checkpoint's manifest).
pub fn read_metadata(dir: &Path) -> anyhow::Result<(Metadata, Vec<String>)> {
    let metadata: Metadata = serde_json::from_slice(
        &fs::read(dir.join(METADATA)).with_context(|| format!("read {METADATA}"))?,
    )
    .with_context(|| format!("parse {METADATA}"))?;
    ensure!(
        metadata.version == 1,
        "unsupported checkpoint version {}",
        metadata.version
    );
    let descriptors: Vec<String> = serde_json::from_slice(
        &fs::read(dir.join(DESCRIPTORS)).with_context(|| format!("read {DESCRIPTORS}"))?,
    )
    .with_context(|| format!("parse {DESCRIPTORS}"))?;
    ensure!(
        descriptors.len() == 3,
        "{DESCRIPTORS} must name 3 descriptors"
    );
    Ok((metadata, descriptors))
}

/// Everything a restore needs to know about the new container.
pub struct RestoreTarget<'a> {
    pub id: &'a str,
    pub spec: &'a Spec,
    pub rootfs: &'a Path,
    /// The new container's cgroup path (relative to each hierarchy).
    pub cgroup_path: &'a Path,
    /// The container side of the new stdio: stdin, stdout, stderr.
    pub stdio: [Option<&'a OwnedFd>; 3],
}

/// Whether any of the external mount sources lies on a mount with shared propagation in the
/// shim's mount namespace (then CRIU must restore mounts with its compat engine).
fn needs_compat_mounts(sources: &[(String, String)]) -> bool {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    sources
        .iter()
        .any(|(_, source)| on_shared_mount(Path::new(source), &mountinfo))
}

/// Whether `path` lies on a mount whose propagation is shared, per `mountinfo`: the mount with
/// the longest mount point containing it (the last such line, when mounts are stacked).
pub fn on_shared_mount(path: &Path, mountinfo: &str) -> bool {
    let mut best: Option<(usize, bool)> = None;
    for line in mountinfo.lines() {
        let Some((left, _)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let Some(mount_point) = fields.get(4).map(|m| unescape(m)) else {
            continue;
        };
        if !path.starts_with(&mount_point) {
            continue;
        }
        let shared = fields.iter().skip(6).any(|f| f.starts_with("shared:"));
        let depth = Path::new(&mount_point).components().count();
        if best.is_none_or(|(d, _)| depth >= d) {
            best = Some((depth, shared));
        }
    }
    best.is_some_and(|(_, shared)| shared)
}

/// Where each external mount of the checkpoint comes from in the new container.
pub fn mount_sources(
    metadata: &Metadata,
    spec: &Spec,
    cgroup_path: &Path,
) -> anyhow::Result<Vec<(String, String)>> {
    let relative = cgroup_path.strip_prefix("/").unwrap_or(cgroup_path);
    metadata
        .external_mounts
        .iter()
        .map(|m| {
            let source = match m {
                ExternalMount::Spec { destination } => spec
                    .mounts()
                    .iter()
                    .flatten()
                    .find(|s| s.destination() == Path::new(destination))
                    .and_then(|s| s.source().clone())
                    .with_context(|| {
                        format!("the checkpoint has a bind mount at {destination} that the new container's spec lacks")
                    })?,
                ExternalMount::Cgroup {
                    controller, whole, ..
                } => {
                    let hierarchy = controller
                        .split(',')
                        .find_map(|c| c.strip_prefix("name="))
                        .unwrap_or(controller);
                    let base = Path::new("/sys/fs/cgroup").join(hierarchy);
                    if *whole { base } else { base.join(relative) }
                }
                ExternalMount::DevNull { .. } => PathBuf::from("/dev/null"),
            };
            let source = source.display().to_string();
            ensure!(
                Path::new(&source).exists(),
                "source {source} of mount {} does not exist",
                m.destination()
            );
            Ok((m.destination().to_string(), source))
        })
        .collect()
}

/// Restores a container from `images` into the created (not yet started) container described
/// by `target`; returns the pid of its restored init, a child of this process.
pub fn restore(
    target: &RestoreTarget<'_>,
    images: &Path,
    metadata: &Metadata,
    descriptors: &[String],
) -> anyhow::Result<i32> {
    let id = target.id;
    // No checkpoint holds a user namespace (see `user_namespace_refusal`), and none is restored
    // into one: its processes would run outside the new container's mapping.
    anyhow::ensure!(
        !crate::mount_sources::has_user_namespace(target.spec),
        "container {id} has a user namespace (hostUsers: false): podsnap cannot yet restore \
         a checkpoint into one"
    );
    let sources = mount_sources(metadata, target.spec, target.cgroup_path)?;
    let mut namespace_fds = Vec::new();
    for name in &metadata.external_namespaces {
        let (typ, _) = namespace_kind(name);
        let path = joined_namespace(target.spec, typ).with_context(|| {
            format!(
                "the checkpoint joined the pod's {name} namespace but the new container has its own"
            )
        })?;
        let fd: OwnedFd = fs::File::open(&path)
            .with_context(|| format!("open {name} namespace {}", path.display()))?
            .into();
        namespace_fds.push((namespace_key(name), fd));
    }
    let work = tempfile::Builder::new()
        .prefix("podsnap-criu-work-")
        .tempdir()
        .context("create CRIU work directory")?;
    let cgroup = target.cgroup_path.display().to_string();
    let mut opts = RestoreOptions::new(images)
        .work_dir(work.path())
        .log_file("restore.log")
        .log_level(CRIU_LOG_LEVEL)
        .root(target.rootfs)
        .rst_sibling(true)
        .manage_cgroups(CgroupMode::Soft)
        .cgroup_root(None, cgroup)
        .tcp_established(metadata.tcp_established)
        .ext_unix_sk(metadata.ext_unix_sk)
        .file_locks(metadata.file_locks)
        .shell_job(metadata.shell_job)
        // CRIU's mount-v2 engine cannot restore the sharing of external bind mounts whose
        // sources lie on a shared mount, as the kubelet's root directory is
        // (/dev/termination-log, /etc/hosts: "Failed to copy sharing ... Invalid argument",
        // CRIU issue 2023): those need the compat engine. Everything else keeps mount-v2 (with
        // the compat engine a shared file was seen read back empty after a pod restore).
        .mntns_compat_mode(needs_compat_mounts(&sources));
    for (destination, source) in &sources {
        opts = opts.ext_mount(destination.as_str(), source.as_str());
    }
    for (key, fd) in &namespace_fds {
        opts = opts.inherit_fd(*key, fd.as_fd());
    }
    for (index, descriptor) in descriptors.iter().enumerate() {
        if descriptor.starts_with("pipe:") {
            let fd = target.stdio[index].with_context(|| {
                format!("the checkpoint's fd {index} was a pipe but the new container has none")
            })?;
            opts = opts.inherit_fd(descriptor.as_str(), fd.as_fd());
        } else if descriptor.starts_with("/dev/pts/") {
            bail!(
                "container {id} was checkpointed with a terminal: restoring terminals is not supported"
            );
        }
    }
    let restored = Criu::new()
        .restore(&opts)
        .with_context(|| format!("restore container {id}"))?;
    Ok(restored.pid)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
148 91 0:59 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
149 148 0:69 / /proc rw,nosuid - proc proc rw
150 148 0:70 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
151 150 0:71 / /dev/pts rw - devpts devpts rw,gid=5
153 148 0:64 / /sys ro - sysfs sysfs rw
154 153 0:72 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
155 154 0:29 /k8s.io/abc /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
163 154 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
164 148 254:0 /var/lib/sandboxes/x/hostname /etc/hostname rw - ext4 /dev/vda rw
167 150 0:56 / /dev/shm rw - tmpfs shm rw,size=65536k
170 149 0:69 /sys /proc/sys ro - proc proc rw
171 149 0:5 /null /proc/kcore rw - devtmpfs udev rw
";

    /// A spec with one bind mount per `(destination, source)`.
    pub(crate) fn spec_with_binds(binds: &[(&str, &str)]) -> Spec {
        let mut spec = Spec::default();
        let mounts = binds
            .iter()
            .map(|(destination, source)| {
                oci_spec::runtime::MountBuilder::default()
                    .destination(*destination)
                    .typ("bind")
                    .source(*source)
                    .options(vec!["rbind".to_string()])
                    .build()
                    .unwrap()
            })
            .collect();
        spec.set_mounts(Some(mounts));
        spec
    }

    #[test]
    fn a_source_on_a_shared_mount_is_told_apart() {
        let mountinfo = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
90 22 254:0 /var/lib/k /var/lib/k rw,relatime shared:301 - ext4 /dev/vda rw
91 90 0:55 / /var/lib/k/pods/u/volumes/x rw shared:302 - tmpfs tmpfs rw
92 22 0:56 / /tmp/priv rw - tmpfs tmpfs rw
";
        assert!(on_shared_mount(
            Path::new("/var/lib/k/pods/u/etc-hosts"),
            mountinfo
        ));
        assert!(on_shared_mount(
            Path::new("/var/lib/k/pods/u/volumes/x/file"),
            mountinfo
        ));
        assert!(!on_shared_mount(Path::new("/tmp/priv/data"), mountinfo));
        assert!(!on_shared_mount(Path::new("/var/lib/kx/file"), mountinfo));
        assert!(!on_shared_mount(Path::new("/srv"), mountinfo));
    }

    #[test]
    fn mountinfo_fields_are_parsed() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 12);
        assert_eq!(mounts[7].mount_point, "/sys/fs/cgroup/systemd");
        assert_eq!(mounts[7].super_options, "rw,name=systemd");
        assert_eq!(
            parse_mountinfo("1 2 0:1 /a\\040b /c - ext4 x rw")[0].root,
            "/a b"
        );
    }

    #[test]
    fn host_binds_cgroups_and_masks_are_external_the_rest_is_criu_s() {
        let spec = spec_with_binds(&[
            ("/etc/hostname", "/host/etc/hostname"),
            ("/dev/shm", "/host/dev/shm"),
        ]);
        let external = external_mounts(&parse_mountinfo(MOUNTINFO), &spec).unwrap();
        assert_eq!(
            external,
            vec![
                ExternalMount::Cgroup {
                    destination: "/sys/fs/cgroup/cpu".into(),
                    controller: "cpu".into(),
                    whole: false
                },
                ExternalMount::Cgroup {
                    destination: "/sys/fs/cgroup/systemd".into(),
                    controller: "name=systemd".into(),
                    whole: true
                },
                ExternalMount::Spec {
                    destination: "/etc/hostname".into()
                },
                ExternalMount::Spec {
                    destination: "/dev/shm".into()
                },
                ExternalMount::DevNull {
                    destination: "/proc/kcore".into()
                },
            ]
        );
    }

    #[test]
    fn a_host_mount_missing_from_the_spec_cannot_be_checkpointed() {
        let err = external_mounts(&parse_mountinfo(MOUNTINFO), &Spec::default()).unwrap_err();
        assert!(err.to_string().contains("/etc/hostname"), "{err}");
    }

    #[test]
    fn restore_needs_every_spec_mount_the_checkpoint_had() {
        let metadata = Metadata {
            version: 1,
            external_mounts: vec![ExternalMount::Spec {
                destination: "/data".into(),
            }],
            ..Default::default()
        };
        let err = mount_sources(&metadata, &Spec::default(), Path::new("/k8s.io/x")).unwrap_err();
        assert!(err.to_string().contains("/data"), "{err}");
    }

    fn sample_checkpoint() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("inventory.img"), b"images").unwrap();
        fs::write(
            dir.path().join(DESCRIPTORS),
            br#"["/dev/null","pipe:[1]","pipe:[2]"]"#,
        )
        .unwrap();
        fs::write(
            dir.path().join(METADATA),
            serde_json::to_vec(&Metadata {
                version: 1,
                ..Default::default()
            })
            .unwrap(),
        )
        .unwrap();
        write_checksums(dir.path()).unwrap();
        dir
    }

    #[test]
    fn an_intact_checkpoint_verifies() {
        let dir = sample_checkpoint();
        let (metadata, descriptors) = verify(dir.path()).unwrap();
        assert_eq!(metadata.version, 1);
        assert_eq!(descriptors[1], "pipe:[1]");
    }

    #[test]
    fn a_modified_file_is_refused_by_name() {
        let dir = sample_checkpoint();
        fs::write(dir.path().join("inventory.img"), b"tampered").unwrap();
        let err = verify(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("inventory.img was modified"),
            "{err}"
        );
    }

    #[test]
    fn a_truncated_checkpoint_is_refused() {
        let dir = sample_checkpoint();
        fs::remove_file(dir.path().join("inventory.img")).unwrap();
        let err = verify(dir.path()).unwrap_err();
        assert!(err.to_string().contains("missing inventory.img"), "{err}");
        let err = verify(Path::new("/nonexistent/ckpt")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn extra_files_and_symlinks_are_refused() {
        let dir = sample_checkpoint();
        std::os::unix::fs::symlink("/etc/shadow", dir.path().join("pages-1.img")).unwrap();
        let err = verify(dir.path()).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}

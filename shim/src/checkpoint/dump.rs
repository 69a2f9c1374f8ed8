//! Capturing a running container with CRIU into a checkpoint directory.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use criu_rpc::{
    CgroupMode, Criu, DumpOptions, NetworkLockMethod, Notification, NotifyError, NotifyScript,
};
use oci_spec::runtime::Spec;
use podsnap_checkpoint_format::container as format;
pub use podsnap_checkpoint_format::follow::Follower;

use crate::cgroup::ContainerCgroup;

use super::mounts::{external_mounts, parse_mountinfo, v1_controllers};
use super::{
    BeforeSeize, CRIU_LOG_LEVEL, CheckpointOptions, Metadata, joined_namespace, namespace_key,
    namespace_kind, private_dir,
};

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
    let follower = dump_unsealed(target, images, opts)?;
    seal(images, follower).inspect_err(|_| {
        if created {
            let _ = fs::remove_dir_all(images);
        } else {
            remove_written(images);
        }
    })
}

/// [`dump`] of a container on its own (a Task API checkpoint), with the freezer policy: CRIU
/// freezes the container through `cgroup` and leaves it as it found it, but not if CRIU died
/// half-way, and tasks a dump with `exit` killed only die once thawed. So the container is
/// thawed afterwards unless it was paused before the dump (then it stays paused), or always
/// when the dump killed it.
pub fn dump_frozen(
    target: &DumpTarget<'_>,
    cgroup: &ContainerCgroup,
    was_paused: bool,
    images: &Path,
    opts: &CheckpointOptions,
) -> anyhow::Result<()> {
    let result = dump(target, images, opts);
    if !was_paused || (result.is_ok() && opts.exit) {
        let _ = cgroup.freeze(false);
    }
    result
}

/// Writes `podsnap.sha256` for a dumped checkpoint, with the page images' hashes `follower`
/// computed while CRIU wrote them (what it could not vouch for is hashed here). Needs no
/// frozen container: a pod checkpoint seals its containers' images after thawing them.
pub fn seal(images: &Path, follower: Follower) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let early = follower.hashed();
    let followed = follower.finish().unwrap_or_else(|e| {
        log::warn!("{e}: hashing them after the dump");
        Default::default()
    });
    let caught_up = started.elapsed();
    format::seal_followed(images, &followed)
        .with_context(|| format!("seal checkpoint {}", images.display()))?;
    log::info!(
        "sealed {} in {} ms: {} page image(s), {} MiB, {} MiB of it hashed while CRIU wrote, \
         the rest in {} ms",
        images.display(),
        started.elapsed().as_millis(),
        followed.len(),
        followed.values().map(|f| f.len).sum::<u64>() >> 20,
        early >> 20,
        caught_up.as_millis(),
    );
    Ok(())
}

/// [`dump`] without [`seal`]: what must happen while the container is frozen. Returns the
/// follower that hashed the page images as CRIU wrote them, for [`seal`].
pub fn dump_unsealed(
    target: &DumpTarget<'_>,
    images: &Path,
    opts: &CheckpointOptions,
) -> anyhow::Result<Follower> {
    let id = target.id;
    if let Some(refusal) = super::userns::refusal(id, target.spec) {
        return Err(crate::error::Error::FailedPrecondition(refusal).into());
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
                || [
                    format::DESCRIPTORS,
                    format::METADATA,
                    format::CHECKSUMS,
                    "stats-dump",
                ]
                .contains(&name.as_ref())
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
) -> anyhow::Result<Follower> {
    let pid = target.pid;
    let mountinfo = fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .with_context(|| format!("read mounts of pid {pid}"))?;
    let mounts = external_mounts(&parse_mountinfo(&mountinfo), target.spec)?;
    let mut metadata = Metadata {
        external_mounts: mounts.clone(),
        external_namespaces: Vec::new(),
        tcp_established: opts.open_tcp,
        ext_unix_sk: opts.external_unix_sockets,
        file_locks: opts.file_locks,
        shell_job: opts.terminal,
        user_namespace: super::userns::recorded(target.spec),
        ..Metadata::current()
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
        // cpuinfo.img: what a restore elsewhere checks this node's CPU features against.
        .cpu_check(true)
        .root(target.rootfs);
    if let Some(freezer) = &target.freezer {
        criu_opts = criu_opts.freeze_cgroup(freezer);
    }
    if !opts.open_tcp && !opts.exit {
        criu_opts = without_network_lock(criu_opts);
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
        // The whole dump within it: waiting at a notification does not start it again.
        criu = criu
            .timeout(timeout)
            .deadline(std::time::Instant::now() + timeout);
    }
    if let Some(started) = &opts.criu_started {
        criu = criu.on_spawn(started.0.clone());
    }
    // The page images are hashed as CRIU writes them, on a core the dump leaves idle.
    let follower = Follower::start(images);
    match &opts.before_seize {
        Some(BeforeSeize(hook)) => {
            let mut notify = |n: &mut Notification| -> Result<(), NotifyError> {
                match n.script() {
                    NotifyScript::PreDump => hook().map_err(NotifyError::from),
                    _ => Ok(()),
                }
            };
            criu.dump_with(&criu_opts, &mut notify)?;
        }
        None => criu.dump(&criu_opts)?,
    }
    format::write_metadata(images, &metadata, &descriptors)?;
    // CRIU writes its statistics next to its log; checkpointctl reads them from the images.
    let _ = fs::copy(work.join("stats-dump"), images.join("stats-dump"));
    // The images hold all of the container's memory, secrets included: root only.
    for entry in fs::read_dir(images)?.flatten() {
        fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", entry.path().display()))?;
    }
    Ok(follower)
}

/// A dump that leaves its processes running and keeps no established TCP connection (it fails
/// on one) neither locks the network nor fails on a connection that a listening socket has not
/// accepted yet.
///
/// CRIU's default lock adds iptables rules to the container's network namespace, the pod's, and
/// removes them when the dump ends: about ten `iptables-restore` and `iptables` processes and
/// four `setns` calls per container, 80 ms of the freeze window here (65 of them in the unlock),
/// for a lock that guards only TCP repair. Without it, a connection that arrives while the pod
/// is frozen waits in the kernel's accept queue instead of having its packets dropped (a client
/// retries a dropped SYN only after a second); CRIU leaves it out of the images
/// (`--skip-in-flight`), and the pod, thawed, accepts it as if nothing had happened. With the
/// lock, the same connection failed the dump whenever it arrived before the lock did. The
/// images record the method, and a restore of them unlocks nothing either (CRIU takes the
/// method from the inventory, not from the restore's options).
///
/// A dump whose processes exit (`exit`: a suspend or a move) keeps CRIU's lock and fails on such
/// a connection, as before: left out of the images, it would be reset when they exit (CRIU does
/// not lift the lock after such a dump, so later SYNs are dropped and retried by their clients).
fn without_network_lock(opts: DumpOptions) -> DumpOptions {
    opts.network_lock(NetworkLockMethod::Skip)
        .tcp_skip_in_flight(true)
}

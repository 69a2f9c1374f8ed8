//! Bringing a container back from a checkpoint directory with CRIU, into a created container.

use std::fs;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, bail};
use criu_rpc::{CgroupMode, Criu, Notification, NotifyError, NotifyScript, RestoreOptions};
use oci_spec::runtime::Spec;

use super::lazy::{LazyPages, LazySession};
use super::mounts::{mount_sources, needs_compat_mounts};
use super::page_check::{DeferredPages, Unverified, Verifier};
use super::{CRIU_LOG_LEVEL, Metadata, joined_namespace, namespace_key, namespace_kind};

/// Everything a restore needs to know about the new container.
pub struct RestoreTarget<'a> {
    pub id: &'a str,
    pub spec: &'a Spec,
    /// The spec whose bind-mount sources CRIU binds: `spec`, or for a container in a user
    /// namespace `spec` with its sources staged where the namespace's root reaches them.
    pub mounts: &'a Spec,
    pub rootfs: &'a Path,
    /// The new container's cgroup (its `path` is relative to each hierarchy).
    pub cgroup: &'a crate::cgroup::ContainerCgroup,
    /// The container side of the new stdio: stdin, stdout, stderr.
    pub stdio: [Option<&'a OwnedFd>; 3],
}

/// How a restore reads the container's memory, and verifies the page images not verified yet.
pub enum Pages {
    /// Before the processes resume: the page images listed are hashed while CRIU reads them,
    /// and the restore goes on past CRIU's `post-restore` only if they are the manifest's
    /// ([`super::page_check`]).
    Eager(Vec<DeferredPages>),
    /// While they run ([`super::lazy`]).
    Lazy(super::lazy::Start),
}

/// Restores a container from `images` into the created (not yet started) container described
/// by `target`; returns the pid of its restored init, a child of this process. With
/// [`Pages::Lazy`], the processes resume before their memory is read: it streams in from CRIU's
/// lazy-pages daemon, whose pid goes to `daemon_started` as soon as it runs (for whoever
/// watches its exit), and the returned session must be finished when the daemon exits.
pub fn restore(
    target: &RestoreTarget<'_>,
    images: &Path,
    metadata: &Metadata,
    descriptors: &[String],
    pages: Pages,
) -> anyhow::Result<(i32, Option<LazySession>)> {
    let id = target.id;
    // Into the new pod's user namespace: the caller checked the checkpoint may go there
    // (`super::userns::check` and `check_images`, before any process or mount exists).
    let userns = joined_namespace(target.spec, oci_spec::runtime::LinuxNamespaceType::User);
    let sources = mount_sources(metadata, target.mounts, &target.cgroup.path)?;
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
    let cgroup = target.cgroup.path.display().to_string();
    // Inside a user namespace, CRIU's tasks read the images through a view they own.
    let view = match &userns {
        Some(_) => Some(super::userns::images_view(images, target.spec)?),
        None => None,
    };
    let criu_images = match &view {
        Some(fd) => std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
        None => images.to_path_buf(),
    };
    let mut opts = RestoreOptions::new(&criu_images)
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
        // A checkpoint that recorded its CPU's features (cpuinfo.img) is restored only on a CPU
        // that has them; older ones carry none to check.
        .cpu_check(images.join(criu_rpc::CPUINFO_IMAGE).exists())
        // CRIU's mount-v2 engine cannot restore the sharing of external bind mounts whose
        // sources lie on a shared mount, as the kubelet's root directory is
        // (/dev/termination-log, /etc/hosts: "Failed to copy sharing ... Invalid argument",
        // CRIU issue 2023): those need the compat engine. Everything else keeps mount-v2 (with
        // the compat engine a shared file was seen read back empty after a pod restore).
        .mntns_compat_mode(needs_compat_mounts(&sources));
    if let Some(path) = &userns {
        opts = opts.join_user_namespace(path);
    }
    for (destination, source) in &sources {
        opts = opts.ext_mount(destination.as_str(), source.as_str());
    }
    for (key, fd) in &namespace_fds {
        opts = opts.inherit_fd(*key, fd.as_fd());
    }
    for (index, descriptor) in descriptors.iter().enumerate() {
        if descriptor.starts_with("pipe:") {
            let fd = target
                .stdio
                .get(index)
                .copied()
                .flatten()
                .with_context(|| {
                    format!("the checkpoint's fd {index} was a pipe but the new container has none")
                })?;
            opts = opts.inherit_fd(descriptor.as_str(), fd.as_fd());
        } else if descriptor.starts_with("/dev/pts/") {
            bail!(
                "container {id} was checkpointed with a terminal: restoring terminals is not supported"
            );
        }
    }
    let criu = Criu::new();
    let (pages, verifier) = match pages {
        Pages::Lazy(start) => {
            opts = opts.lazy_pages(true);
            let pages = LazyPages::start(criu.binary(), images, work.path(), start)
                .with_context(|| format!("container {id}: lazy restore"))?;
            (Some(pages), None)
        }
        Pages::Eager(deferred) if deferred.is_empty() => (None, None),
        Pages::Eager(deferred) => {
            let verifier = Verifier::start(images, deferred)
                .with_context(|| format!("container {id}: verify its page images"))?;
            (None, Some(verifier))
        }
    };
    let restored = match verifier {
        None => {
            match &pages {
                None => criu.restore(&opts),
                // The daemon started beside CRIU: held at pre-restore (before any task exists)
                // until the relay reached it, so that no restored task faults on memory nobody
                // will serve; a failed notification makes CRIU give up.
                Some(pages) => criu.restore_with(&opts, &mut |notification: &mut Notification| {
                    match notification.script() {
                        NotifyScript::PreRestore => pages.wait_connected().map_err(Into::into),
                        _ => Ok(()),
                    }
                }),
            }
        }
        Some(mut verifier) => {
            // Held at post-restore (every page read, no process resumed) until the page images
            // are known to be the manifest's; a failed notification makes CRIU kill the tree.
            let (mut verified, mut refused) = (false, None);
            let mut gate = |notification: &mut Notification| -> Result<(), NotifyError> {
                if *notification.script() == NotifyScript::PostRestore {
                    let started = std::time::Instant::now();
                    if let Err(why) = verifier.wait() {
                        let message = why.to_string();
                        if let Unverified::Refused(_) = why {
                            refused = Some(message.clone());
                        }
                        return Err(message.into());
                    }
                    verified = true;
                    log::info!(
                        "container {id}: page images verified ({} ms after CRIU read them)",
                        started.elapsed().as_millis()
                    );
                }
                Ok(())
            };
            let restored = criu.restore_with(&opts, &mut gate);
            if let Some(why) = refused {
                // CRIU killed what it restored; the checkpoint, not CRIU, is at fault.
                return Err(crate::error::Error::FailedPrecondition(format!(
                    "container {id}: cannot restore: {why}"
                ))
                .into());
            }
            if restored.is_ok() && !verified {
                // Never the case with CRIU 4.x, which always notifies post-restore first. The
                // processes run already: none may go on with memory that was not verified.
                super::lazy::kill_all(target.cgroup);
                bail!(
                    "container {id}: CRIU resumed the restored processes without a post-restore \
                     notification: its page images were not verified, and its processes were killed"
                );
            }
            restored
        }
    };
    match restored {
        Ok(restored) => match pages {
            None => Ok((restored.pid, None)),
            // Known at pre-restore already (CRIU 4.x always notifies it), else waited for here:
            // the container is handed over only once its memory can be served.
            Some(pages) => match pages.wait_connected() {
                Ok(()) => Ok((restored.pid, Some(pages.running(work)))),
                Err(why) => {
                    // Every process is killed before the userfaultfds go.
                    pages.abort();
                    bail!("container {id}: lazy restore: {why}; its processes were killed")
                }
            },
        },
        Err(e) => {
            let mut e = anyhow::Error::from(e);
            if let Some(pages) = pages {
                let log = pages.daemon_exited().then(|| pages.daemon_log());
                let relayed = pages.abort();
                if let Some(log) = log {
                    // The relay's error says more when the daemon never listened.
                    let relayed = relayed.map(|r| format!(" (the relay: {r})"));
                    e = e.context(format!(
                        "the lazy-pages daemon died during the restore; {log}{}",
                        relayed.unwrap_or_default()
                    ));
                }
            }
            Err(e).with_context(|| format!("restore container {id}"))
        }
    }
}

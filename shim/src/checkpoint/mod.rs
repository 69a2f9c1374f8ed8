//! Container checkpoint and restore with CRIU, driven through [`criu_rpc`], split along the
//! operation as youki splits its own: `mounts` decides which of a container's mounts CRIU
//! must treat as external and where they come from again, `dump` captures a container and
//! `restore` brings one back. The directory they write and read (CRIU's images plus
//! `descriptors.json`, `podsnap-checkpoint.json` and `podsnap.sha256`) belongs to
//! [`podsnap_checkpoint_format::container`], which alone writes, seals and verifies it.
//!
//! Mounts CRIU cannot dump from inside the container (bind mounts from the host, cgroup v1
//! hierarchies, `/dev/null` masks) are declared external at dump and mapped to the new
//! container's sources at restore; namespaces joined from the pod sandbox (network, pid) are
//! external too, and a pod's user namespace is joined at restore ([`userns`]). This module does
//! not know the Task API or containerd's content store.

mod dump;
pub mod lazy;
mod mapped_digest;
mod mounts;
pub mod page_check;
mod restore;
pub mod userns;

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

pub use dump::{DumpTarget, Follower, dump_frozen, dump_unsealed, seal};
pub use podsnap_checkpoint_format::container::{ExternalMount, Metadata, read_metadata, verify};
pub use restore::{Pages, RestoreTarget, restore};

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
    /// Told the pid of each CRIU started for the dump (a pod checkpoint's thaw guard).
    pub criu_started: Option<CriuStarted>,
    /// Called when CRIU, started and set up, is about to seize the tasks (its `pre-dump`
    /// notification): a pod checkpoint freezes the pod there, so that CRIU's start-up is not
    /// part of the freeze window. An error makes CRIU give up before it touches any task.
    pub before_seize: Option<BeforeSeize>,
}

/// The hook of [`CheckpointOptions::before_seize`].
#[derive(Clone)]
pub struct BeforeSeize(pub std::sync::Arc<dyn Fn() -> Result<(), String> + Send + Sync>);

impl std::fmt::Debug for BeforeSeize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BeforeSeize")
    }
}

/// A [`criu_rpc::SpawnHook`] carried in [`CheckpointOptions`].
#[derive(Clone)]
pub struct CriuStarted(pub criu_rpc::SpawnHook);

impl std::fmt::Debug for CriuStarted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CriuStarted")
    }
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

#[cfg(test)]
pub(crate) mod tests {
    pub(crate) use super::mounts::tests::spec_with_binds;
}

//! What pod calls are working on now, process-wide: a pod sandbox being checkpointed, a
//! checkpoint directory being written or read, a pod being restored. A call takes an
//! [`InFlight`] guard over everything it will touch before it touches anything; a second call
//! that wants any of it is refused at once (FailedPrecondition, naming what is in progress)
//! instead of racing the first (two freezes of one pod, two checkpoints into one directory, a
//! restore from a directory still being written). The guard releases on every exit path: it is
//! dropped when the call returns, fails, or unwinds.
//!
//! ```ignore
//! let _busy = InFlight::acquire(
//!     Operation::Restore,
//!     [Resource::directory(&checkpoint_path), Resource::Pod { namespace, name, uid }],
//! )?; // Busy converts into a tonic::Status
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use tonic::Status;

/// What a call does with the resources it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Checkpoint,
    Restore,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Checkpoint => "checkpoint",
            Operation::Restore => "restore",
        })
    }
}

/// Something only one pod call at a time may work on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Resource {
    /// A pod sandbox, by its id.
    Sandbox(String),
    /// A checkpoint directory, written by CheckpointPod or read by RestorePod. Give it as
    /// [`Resource::directory`] makes it, so that two spellings of one directory are one resource.
    Directory(PathBuf),
    /// A pod, by its Kubernetes identity.
    Pod {
        namespace: String,
        name: String,
        uid: String,
    },
}

impl Resource {
    /// A directory by its canonical path (symbolic links and `..` resolved), or as given when it
    /// cannot be resolved (it does not exist: the call will refuse it anyway).
    pub fn directory(path: &Path) -> Self {
        Resource::Directory(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()))
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Sandbox(id) => write!(f, "pod sandbox {id}"),
            Resource::Directory(path) => write!(f, "directory {}", path.display()),
            Resource::Pod {
                namespace,
                name,
                uid,
            } => write!(f, "pod {namespace}/{name} (uid {uid})"),
        }
    }
}

/// Why a guard was refused: `resource` is held by a call doing `operation`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {operation} of {resource} is already in progress")]
pub struct Busy {
    pub operation: Operation,
    pub resource: Resource,
}

impl From<Busy> for Status {
    fn from(busy: Busy) -> Status {
        // FailedPrecondition: the kubelet answers it as 409 Conflict; retrying once the other
        // call is done can succeed.
        Status::failed_precondition(busy.to_string())
    }
}

/// A set of held resources. The process has one ([`Registry::global`]); tests may make their own.
#[derive(Debug, Default)]
pub struct Registry {
    held: Mutex<HashMap<Resource, Operation>>,
}

impl Registry {
    /// The process-wide registry.
    pub fn global() -> &'static Registry {
        static GLOBAL: OnceLock<Registry> = OnceLock::new();
        GLOBAL.get_or_init(Registry::default)
    }

    fn held(&self) -> MutexGuard<'_, HashMap<Resource, Operation>> {
        // A panic while holding the lock cannot leave the map half-changed: every change is one
        // insert or remove.
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes all of `resources` for `operation`, or none of them when one is held already.
    pub fn acquire(
        &self,
        operation: Operation,
        resources: impl IntoIterator<Item = Resource>,
    ) -> Result<InFlight<'_>, Busy> {
        let mut wanted: Vec<Resource> = Vec::new();
        for resource in resources {
            if !wanted.contains(&resource) {
                wanted.push(resource);
            }
        }
        let mut held = self.held();
        if let Some((resource, operation)) = wanted
            .iter()
            .find_map(|r| held.get(r).map(|op| (r.clone(), *op)))
        {
            return Err(Busy {
                operation,
                resource,
            });
        }
        for resource in &wanted {
            held.insert(resource.clone(), operation);
        }
        Ok(InFlight {
            registry: self,
            resources: wanted,
        })
    }

    /// Whether `resource` is held now.
    pub fn is_held(&self, resource: &Resource) -> bool {
        self.held().contains_key(resource)
    }
}

/// Resources held by one pod call, released when this is dropped.
#[derive(Debug)]
#[must_use = "the resources are released as soon as the guard is dropped"]
pub struct InFlight<'r> {
    registry: &'r Registry,
    resources: Vec<Resource>,
}

impl InFlight<'static> {
    /// Takes all of `resources` for `operation` in the process-wide registry, or none of them
    /// when one is held already.
    pub fn acquire(
        operation: Operation,
        resources: impl IntoIterator<Item = Resource>,
    ) -> Result<Self, Busy> {
        Registry::global().acquire(operation, resources)
    }
}

impl InFlight<'_> {
    /// What this guard holds.
    pub fn resources(&self) -> &[Resource] {
        &self.resources
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut held = self.registry.held();
        for resource in &self.resources {
            held.remove(resource);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(id: &str) -> Resource {
        Resource::Sandbox(id.to_string())
    }

    #[test]
    fn a_held_resource_is_refused_until_released() {
        let registry = Registry::default();
        let first = registry
            .acquire(Operation::Checkpoint, [sandbox("s1")])
            .unwrap();
        let busy = registry
            .acquire(Operation::Checkpoint, [sandbox("s1")])
            .unwrap_err();
        assert_eq!(
            busy.to_string(),
            "a checkpoint of pod sandbox s1 is already in progress"
        );
        let status = Status::from(busy);
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        // Others are free.
        drop(
            registry
                .acquire(Operation::Checkpoint, [sandbox("s2")])
                .unwrap(),
        );
        drop(first);
        assert!(!registry.is_held(&sandbox("s1")));
        drop(
            registry
                .acquire(Operation::Checkpoint, [sandbox("s1")])
                .unwrap(),
        );
    }

    #[test]
    fn all_or_nothing() {
        let registry = Registry::default();
        let dir = Resource::Directory("/checkpoints/a".into());
        let _writing = registry
            .acquire(Operation::Checkpoint, [dir.clone()])
            .unwrap();
        let busy = registry
            .acquire(Operation::Restore, [sandbox("s1"), dir.clone()])
            .unwrap_err();
        assert_eq!(busy.operation, Operation::Checkpoint);
        assert_eq!(busy.resource, dir);
        assert!(
            !registry.is_held(&sandbox("s1")),
            "a refused call kept part of what it asked for"
        );
        assert_eq!(
            busy.to_string(),
            "a checkpoint of directory /checkpoints/a is already in progress"
        );
    }

    #[test]
    fn released_when_the_holder_fails_or_panics() {
        let registry = Registry::default();
        let failing = || -> Result<(), Busy> {
            let _held = registry.acquire(Operation::Restore, [sandbox("s1")])?;
            Err(Busy {
                operation: Operation::Restore,
                resource: sandbox("elsewhere"),
            })
        };
        assert!(failing().is_err());
        assert!(!registry.is_held(&sandbox("s1")));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _held = registry.acquire(Operation::Checkpoint, [sandbox("s1")]);
            panic!("mid-call");
        }));
        assert!(panicked.is_err());
        assert!(!registry.is_held(&sandbox("s1")));
    }

    #[test]
    fn one_directory_under_two_spellings_is_one_resource() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("a"), &link).unwrap();
        assert_eq!(
            Resource::directory(&dir.path().join("a")),
            Resource::directory(&link)
        );
        assert_eq!(
            Resource::directory(&dir.path().join("a/../a")),
            Resource::directory(&dir.path().join("a"))
        );
        let registry = Registry::default();
        let _held = registry
            .acquire(Operation::Checkpoint, [Resource::directory(&link)])
            .unwrap();
        assert!(
            registry
                .acquire(
                    Operation::Restore,
                    [Resource::directory(&dir.path().join("a"))]
                )
                .is_err()
        );
    }

    #[test]
    fn the_global_registry_is_shared() {
        let id = "in-flight-test-global-sandbox";
        let held = InFlight::acquire(Operation::Checkpoint, [sandbox(id)]).unwrap();
        assert!(Registry::global().is_held(&sandbox(id)));
        assert!(InFlight::acquire(Operation::Restore, [sandbox(id)]).is_err());
        assert_eq!(held.resources(), [sandbox(id)]);
        drop(held);
        assert!(!Registry::global().is_held(&sandbox(id)));
    }
}

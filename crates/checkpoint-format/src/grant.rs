//! Restore grants: how podsnapd tells the shim that a container is to be restored from a
//! checkpoint, in a way nobody else can.
//!
//! A container config reaches the shim with its annotations; anyone who can create a container
//! through containerd's CRI could set `podsnap.io/restore-from` on one. So the annotation alone
//! is not honoured: podsnapd's `RestorePod`, after it verified the checkpoint, writes a grant
//! (root-only, under [`GRANT_DIR`]) naming the checkpoint, the container and the sha256 of the
//! manifest it verified, and sets [`GRANT_ANNOTATION`] to the grant's random token. The shim
//! redeems the grant once, when it creates the container ([`redeem`]), and verifies every file
//! it reads at start against the manifest of that digest
//! ([`crate::verify_container`]): a checkpoint changed after podsnapd's check, manifest and
//! hashes included, is refused. The grant also carries podsnapd's stamps of the big files it
//! hashed ([`crate::verified`]), so that the shim hashes only what changed since.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// The container annotation naming the container directory of a pod checkpoint to restore.
pub const RESTORE_ANNOTATION: &str = "podsnap.io/restore-from";
/// The container annotation carrying the grant's token.
pub const GRANT_ANNOTATION: &str = "podsnap.io/restore-grant";
/// The annotation asking for a lazy restore (`"true"` or `"false"`): set by podsnapd on every
/// container it creates in RestorePod, read by the shim (a container config can also carry it,
/// for a restore through containerd alone); on a pod, RestorePod's default.
pub const LAZY_RESTORE_ANNOTATION: &str = "podsnap.io/lazy-restore";
/// Where podsnapd writes grants and the shim redeems them (root-only, 0700).
pub const GRANT_DIR: &str = "/run/podsnap/restore-grants";
/// A grant not redeemed within this time is stale (its RestorePod was abandoned).
pub const GRANT_LIFETIME: Duration = Duration::from_secs(3600);
/// Largest grant file read.
const MAX_GRANT: u64 = 64 << 10;

/// Why a grant could not be issued or redeemed.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("restore grant token {0:?} is malformed")]
    BadToken(String),
    #[error(
        "no restore grant {0:?}: the restore annotation did not come from podsnapd's RestorePod, or was used already"
    )]
    Unknown(String),
    #[error("restore grant {path}: {reason}")]
    Untrusted { path: PathBuf, reason: String },
    #[error("restore grant {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("restore grant {path} is malformed: {source}")]
    Malformed {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// What podsnapd allowed: restoring `container` of the pod checkpoint at `checkpoint`, whose
/// manifest had the sha256 `manifest_sha256` when podsnapd verified it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RestoreGrant {
    /// The pod checkpoint's directory.
    pub checkpoint: PathBuf,
    /// The container's name in the manifest (its directory in the checkpoint).
    pub container: String,
    /// The hex sha256 of the manifest file podsnapd verified.
    pub manifest_sha256: String,
    /// Stamps of the container's big files as podsnapd verified them, by path relative to the
    /// checkpoint ([`crate::verified`]): the shim does not read a file again that one still
    /// vouches for. At most [`MAX_STAMPS`].
    #[serde(default)]
    pub stamps: crate::verified::Stamps,
}

/// Most stamps a grant carries (its file stays well under the size a redeemer reads).
pub const MAX_STAMPS: usize = 128;

impl RestoreGrant {
    /// The container's directory in the checkpoint: what the restore annotation names.
    pub fn container_dir(&self) -> PathBuf {
        self.checkpoint.join(&self.container)
    }
}

fn token_ok(token: &str) -> bool {
    token.len() == 32 && token.bytes().all(|b| b.is_ascii_hexdigit())
}

fn random_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes a grant into `dir` (created root-only if missing) and returns its token.
pub fn issue(dir: &Path, grant: &RestoreGrant) -> Result<String, GrantError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| GrantError::Io { path, source }
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    let token = random_token().map_err(io(Path::new("/dev/urandom")))?;
    let path = dir.join(&token);
    let data = serde_json::to_vec(grant).map_err(|source| GrantError::Malformed {
        path: path.clone(),
        source,
    })?;
    let mut file = crate::private_file(&path).map_err(io(&path))?;
    file.write_all(&data)
        .and_then(|()| file.sync_all())
        .map_err(io(&path))?;
    Ok(token)
}

/// Removes a grant that was issued but will not be redeemed (its RestorePod failed).
pub fn revoke(dir: &Path, token: &str) {
    if token_ok(token) {
        let _ = fs::remove_file(dir.join(token));
    }
}

/// Removes grants older than [`GRANT_LIFETIME`]: what an abandoned RestorePod left.
pub fn remove_stale(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > GRANT_LIFETIME);
        if old {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Reads and removes the grant `token` from `dir`: it must be a root-owned regular file,
/// readable by root only, younger than [`GRANT_LIFETIME`], in a root-owned directory nobody
/// else may write.
pub fn redeem(dir: &Path, token: &str) -> Result<RestoreGrant, GrantError> {
    if !token_ok(token) {
        return Err(GrantError::BadToken(token.to_string()));
    }
    let untrusted = |path: &Path, reason: &str| GrantError::Untrusted {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let dir_meta = fs::symlink_metadata(dir).map_err(|_| GrantError::Unknown(token.to_string()))?;
    if !dir_meta.is_dir() || dir_meta.uid() != 0 || dir_meta.mode() & 0o022 != 0 {
        return Err(untrusted(
            dir,
            "the grant directory is not a root-owned directory only root may write",
        ));
    }
    let path = dir.join(token);
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(GrantError::Unknown(token.to_string()));
        }
        Err(source) => return Err(GrantError::Io { path, source }),
    };
    let meta = file.metadata().map_err(|source| GrantError::Io {
        path: path.clone(),
        source,
    })?;
    // Consumed whatever happens next: a grant is good for one container.
    let _ = fs::remove_file(&path);
    if !meta.is_file() || meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return Err(untrusted(
            &path,
            "not a regular file owned by root and private to it",
        ));
    }
    let age = meta
        .modified()
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or_default();
    if age > GRANT_LIFETIME {
        return Err(untrusted(&path, "expired"));
    }
    let mut data = Vec::new();
    file.take(MAX_GRANT)
        .read_to_end(&mut data)
        .map_err(|source| GrantError::Io {
            path: path.clone(),
            source,
        })?;
    serde_json::from_slice(&data).map_err(|source| GrantError::Malformed { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> RestoreGrant {
        RestoreGrant {
            checkpoint: "/var/lib/kubelet/pod-checkpoints/checkpoint-x".into(),
            container: "web".into(),
            manifest_sha256: "ab".repeat(32),
            stamps: Default::default(),
        }
    }

    #[test]
    fn a_grant_is_redeemed_once() {
        let dir = tempfile::tempdir().unwrap();
        let grants = dir.path().join("grants");
        let token = issue(&grants, &grant()).unwrap();
        assert_eq!(
            fs::metadata(grants.join(&token)).unwrap().mode() & 0o777,
            0o600
        );
        assert_eq!(redeem(&grants, &token).unwrap(), grant());
        assert!(matches!(
            redeem(&grants, &token),
            Err(GrantError::Unknown(_))
        ));
    }

    #[test]
    fn forged_and_malformed_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let grants = dir.path().join("grants");
        issue(&grants, &grant()).unwrap();
        for token in ["../../etc/shadow", "", "x", &"g".repeat(32)] {
            assert!(
                matches!(redeem(&grants, token), Err(GrantError::BadToken(_))),
                "{token}"
            );
        }
        assert!(matches!(
            redeem(&grants, &"0".repeat(32)),
            Err(GrantError::Unknown(_))
        ));
        // A file someone else could have written is not a grant.
        let token = "1".repeat(32);
        fs::write(grants.join(&token), serde_json::to_vec(&grant()).unwrap()).unwrap();
        fs::set_permissions(grants.join(&token), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            redeem(&grants, &token),
            Err(GrantError::Untrusted { .. })
        ));
        // A symlink is not followed.
        let token = "2".repeat(32);
        std::os::unix::fs::symlink("/etc/hostname", grants.join(&token)).unwrap();
        assert!(matches!(
            redeem(&grants, &token),
            Err(GrantError::Io { .. })
        ));
    }

    #[test]
    fn a_world_writable_grant_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let grants = dir.path().join("grants");
        let token = issue(&grants, &grant()).unwrap();
        fs::set_permissions(&grants, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            redeem(&grants, &token),
            Err(GrantError::Untrusted { .. })
        ));
    }

    #[test]
    fn revoked_grants_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let token = issue(dir.path(), &grant()).unwrap();
        revoke(dir.path(), &token);
        assert!(matches!(
            redeem(dir.path(), &token),
            Err(GrantError::Unknown(_))
        ));
    }
}

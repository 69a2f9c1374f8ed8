//! Address grants: podsnapd's request that a pod it is restoring get the given addresses.
//!
//! One root-only file per pod, `<GRANT_DIR>/<pod UID>.json`, written by podsnapd before it
//! creates the sandbox ([`issue`], removed when the returned [`Issued`] drops) and read by
//! `podsnap-ipam` when the pod's network is set up ([`read`]). A grant that is not a root-owned
//! regular file private to root, in a directory only root may write, is refused.

use std::fs;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// Where podsnapd writes address grants and `podsnap-ipam` reads them (root-only, 0700).
pub const GRANT_DIR: &str = "/run/podsnap/ip-grants";
/// A grant older than this is stale: its RestorePod was abandoned (podsnapd died between
/// writing it and removing it). Stale grants are removed and never honoured.
pub const GRANT_LIFETIME: Duration = Duration::from_secs(600);
/// Largest grant file read.
const MAX_GRANT: u64 = 4 << 10;
/// Longest pod UID accepted (a Kubernetes UID is 36 characters).
const MAX_UID: usize = 128;

/// The addresses a pod is to get.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IpGrant {
    pub ips: Vec<IpAddr>,
}

/// Why a grant could not be issued or read.
#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error("pod UID {0:?} cannot name an address grant (letters, digits, '-', '_' only)")]
    BadUid(String),
    #[error("an address grant names no address")]
    Empty,
    #[error("address grant {path}: {reason}")]
    Untrusted { path: PathBuf, reason: String },
    #[error("address grant {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("address grant {path} is malformed: {source}")]
    Malformed {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// `uid` as a file name, or [`GrantError::BadUid`].
fn grant_path(dir: &Path, uid: &str) -> Result<PathBuf, GrantError> {
    let ok = !uid.is_empty()
        && uid.len() <= MAX_UID
        && uid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(dir.join(format!("{uid}.json")))
    } else {
        Err(GrantError::BadUid(uid.to_string()))
    }
}

/// An issued grant: removed from disk when dropped.
#[derive(Debug)]
#[must_use = "the grant is removed when this is dropped"]
pub struct Issued {
    path: PathBuf,
}

impl Issued {
    /// The grant's file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Issued {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Writes the grant for pod `uid` into `dir` (created root-only if missing). One for that pod
/// that is there already is a leftover of a podsnapd that died while it held it (podsnapd
/// restores a pod once at a time): it is replaced, so that the restore can be retried.
pub fn issue(dir: &Path, uid: &str, grant: &IpGrant) -> Result<Issued, GrantError> {
    let path = grant_path(dir, uid)?;
    if grant.ips.is_empty() {
        return Err(GrantError::Empty);
    }
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
    remove_stale(dir);
    let data = serde_json::to_vec(grant).map_err(|source| GrantError::Malformed {
        path: path.clone(),
        source,
    })?;
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(GrantError::Io { path, source: e });
        }
        _ => {}
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io(&path))?;
    let issued = Issued { path };
    file.write_all(&data)
        .and_then(|()| file.sync_all())
        .map_err(io(&issued.path))?;
    Ok(issued)
}

/// Removes grants older than [`GRANT_LIFETIME`].
pub fn remove_stale(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let stale = entry
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .is_some_and(|t| age(t) > GRANT_LIFETIME);
        if stale {
            let _ = fs::remove_file(entry.path());
        }
    }
}

fn age(time: SystemTime) -> Duration {
    SystemTime::now().duration_since(time).unwrap_or_default()
}

/// The grant for pod `uid` in `dir`, if there is one. A grant that is there but cannot be
/// trusted or read is an error, never ignored: the caller asked for an address and must not
/// silently get another.
pub fn read(dir: &Path, uid: &str) -> Result<Option<IpGrant>, GrantError> {
    let path = grant_path(dir, uid)?;
    let untrusted = |path: &Path, reason: &str| GrantError::Untrusted {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    // The directory is opened (not followed if a symlink) and checked, and the grant opened
    // in that very directory, so neither can be swapped between the check and the read.
    let dir_file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(GrantError::Io {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let dir_meta = dir_file.metadata().map_err(|source| GrantError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    if dir_meta.uid() != 0 || dir_meta.mode() & 0o022 != 0 {
        return Err(untrusted(
            dir,
            "the grant directory is not a root-owned directory only root may write",
        ));
    }
    let in_dir = Path::new("/proc/self/fd")
        .join(dir_file.as_raw_fd().to_string())
        .join(path.file_name().expect("a grant path has a file name"));
    let file = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&in_dir)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(GrantError::Io { path, source }),
    };
    let meta = file.metadata().map_err(|source| GrantError::Io {
        path: path.clone(),
        source,
    })?;
    if !meta.is_file() || meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return Err(untrusted(
            &path,
            "not a regular file owned by root and private to it",
        ));
    }
    if meta.modified().map(age).unwrap_or_default() > GRANT_LIFETIME {
        return Ok(None);
    }
    let mut data = Vec::new();
    file.take(MAX_GRANT)
        .read_to_end(&mut data)
        .map_err(|source| GrantError::Io {
            path: path.clone(),
            source,
        })?;
    let grant: IpGrant = serde_json::from_slice(&data).map_err(|source| GrantError::Malformed {
        path: path.clone(),
        source,
    })?;
    if grant.ips.is_empty() {
        return Err(GrantError::Empty);
    }
    Ok(Some(grant))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> IpGrant {
        IpGrant {
            ips: vec!["10.88.0.7".parse().unwrap(), "fd00::7".parse().unwrap()],
        }
    }

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn a_grant_is_private_read_back_and_removed_when_its_issuer_drops_it() {
        let dir = tempfile::tempdir().unwrap();
        let grants = dir.path().join("ip-grants");
        let issued = issue(&grants, "0b6c-41", &grant()).unwrap();
        let meta = fs::metadata(issued.path()).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&grants).unwrap().mode() & 0o777, 0o700);
        if root() {
            assert_eq!(read(&grants, "0b6c-41").unwrap(), Some(grant()));
        }
        assert_eq!(read(&grants, "another-pod").unwrap(), None);
        let path = issued.path().to_path_buf();
        drop(issued);
        assert!(!path.exists());
        assert_eq!(read(&grants, "0b6c-41").unwrap(), None);
    }

    #[test]
    fn a_leftover_grant_is_replaced_by_the_next_restore_of_its_pod() {
        let dir = tempfile::tempdir().unwrap();
        let leftover = issue(dir.path(), "pod-a", &grant()).unwrap();
        std::mem::forget(leftover);
        let other = IpGrant {
            ips: vec!["10.88.0.8".parse().unwrap()],
        };
        let again = issue(dir.path(), "pod-a", &other).unwrap();
        let data: IpGrant = serde_json::from_slice(&fs::read(again.path()).unwrap()).unwrap();
        assert_eq!(data, other);
        assert_eq!(fs::metadata(again.path()).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn uids_that_are_not_plain_names_and_empty_grants_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for uid in [
            "",
            "../etc/passwd",
            "a/b",
            ".hidden",
            "a b",
            &"x".repeat(129),
        ] {
            assert!(
                matches!(issue(dir.path(), uid, &grant()), Err(GrantError::BadUid(_))),
                "{uid:?}"
            );
            assert!(matches!(read(dir.path(), uid), Err(GrantError::BadUid(_))));
        }
        assert!(matches!(
            issue(dir.path(), "pod", &IpGrant { ips: vec![] }),
            Err(GrantError::Empty)
        ));
    }

    #[test]
    fn a_grant_that_is_a_symlink_or_readable_by_others_is_refused_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let grants = dir.path().join("g");
        fs::DirBuilder::new().mode(0o700).create(&grants).unwrap();
        let elsewhere = dir.path().join("elsewhere.json");
        fs::write(&elsewhere, serde_json::to_vec(&grant()).unwrap()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, grants.join("linked.json")).unwrap();
        assert!(matches!(
            read(&grants, "linked"),
            Err(GrantError::Io { .. })
        ));
        let open = grants.join("open.json");
        fs::write(&open, serde_json::to_vec(&grant()).unwrap()).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read(&grants, "open").unwrap_err();
        assert!(matches!(err, GrantError::Untrusted { .. }), "{err}");
    }

    #[test]
    fn a_grant_directory_that_is_a_symlink_or_writable_by_others_is_refused() {
        if !root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        let issued = issue(&real, "pod", &grant()).unwrap();
        let linked = dir.path().join("linked");
        std::os::unix::fs::symlink(&real, &linked).unwrap();
        assert!(matches!(read(&linked, "pod"), Err(GrantError::Io { .. })));
        assert_eq!(read(&real, "pod").unwrap(), Some(grant()));
        fs::set_permissions(&real, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            read(&real, "pod"),
            Err(GrantError::Untrusted { .. })
        ));
        drop(issued);
    }

    #[test]
    fn a_malformed_grant_is_an_error_naming_its_file() {
        if !root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let grants = dir.path().join("g");
        fs::DirBuilder::new().mode(0o700).create(&grants).unwrap();
        let path = grants.join("bad.json");
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap()
            .write_all(br#"{"ips": ["not-an-address"]}"#)
            .unwrap();
        let err = read(&grants, "bad").unwrap_err();
        assert!(err.to_string().contains("bad.json"), "{err}");
    }
}

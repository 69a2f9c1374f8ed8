//! One container's checkpoint directory: CRIU's images plus three files of podsnap's, in the
//! layout runc's shim produces (so containerd's CRI and `checkpointctl` read it).
//!
//! ```text
//! <images>/
//!   *.img, stats-dump          CRIU's images
//!   descriptors.json           what the init's stdin/stdout/stderr were (`pipe:[ino]`, ...)
//!   podsnap-checkpoint.json    [`Metadata`]: external mounts and namespaces, CRIU options
//!   podsnap.sha256             the digest of every other file (a container checkpoint only;
//!                              in a pod checkpoint the pod manifest lists them instead):
//!                              BLAKE3 (`blake3:<hex>`) since metadata minor 1, sha256 before;
//!                              the file keeps its name, which containerd's tools know
//! ```
//!
//! The shim writes these files through [`write_metadata`] and [`seal`] and reads them through
//! [`verify`] or [`read_metadata`]; podsnapd takes the shim's hashes with [`take_sums`]. Nobody
//! else parses them. What podsnap writes is synced by [`seal`], after the thaw, not while the
//! container is frozen.
//!
//! Versions: [`Metadata::version`] is the major version and [`Metadata::minor`] the minor one.
//! A minor version only adds optional fields, so a reader accepts every minor version of its
//! major; another major version is refused.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File naming the init's stdio at dump time.
pub const DESCRIPTORS: &str = "descriptors.json";
/// podsnap's metadata about the checkpoint.
pub const METADATA: &str = "podsnap-checkpoint.json";
/// The digest ([`crate::digest`]) of every file of a container checkpoint.
pub const CHECKSUMS: &str = "podsnap.sha256";
/// The major version of [`Metadata`] this build writes and reads.
pub const MAJOR: u32 = 1;
/// The minor version of [`Metadata`] this build writes. 1: `podsnap.sha256` lists BLAKE3
/// digests. This one breaks the rule above, knowingly: a reader older than it, or `sha256sum
/// -c`, takes each `blake3:` digest for a modified file and refuses the checkpoint. It fails
/// closed (it never trusts such a checkpoint), with a misleading message. 2: a container in a
/// user namespace ([`Metadata::user_namespace`], [`ExternalMount::Device`]); a reader older
/// than it ignores the first (it refuses to restore into a user namespace anyway, and the
/// images' own user namespace is checked against the field by this one), refuses the second
/// (an unknown mount kind), and reads the others as before.
pub const MINOR: u32 = 2;

/// Why a container checkpoint was refused or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("checkpoint {0} does not exist")]
    NotFound(PathBuf),
    #[error("checkpoint {0} has no {CHECKSUMS}: not a podsnap checkpoint, or truncated")]
    Unsealed(PathBuf),
    #[error("malformed line in {CHECKSUMS}: {0:?}")]
    MalformedLine(String),
    #[error("{CHECKSUMS} names a path outside the checkpoint: {0:?}")]
    Escapes(String),
    #[error("checkpoint {dir} is missing {name}")]
    Missing { dir: PathBuf, name: String },
    #[error("checkpoint {dir} has an unexpected file {name}")]
    Unexpected { dir: PathBuf, name: String },
    #[error("checkpoint file {path} was modified (it has {actual}, expected {expected})")]
    Modified {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{0} is not a regular file: a checkpoint holds only files")]
    NotAFile(PathBuf),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse {name}: {source}")]
    Malformed {
        name: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{DESCRIPTORS} lists {0} descriptors; a checkpoint has exactly 3 (stdin, stdout, stderr)"
    )]
    Descriptors(usize),
    #[error("unsupported checkpoint version {major}.{minor} (this build reads {MAJOR}.x)")]
    Version { major: u32, minor: u32 },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// How a mount the container had was handled at dump.
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
    /// A device node bound from the host's node of the same path, as a runtime does for a
    /// container in a user namespace (which cannot create device nodes): only one of the OCI
    /// default devices or a device the new spec lists is ever bound again.
    Device { destination: String },
}

impl ExternalMount {
    pub fn destination(&self) -> &str {
        match self {
            ExternalMount::Spec { destination }
            | ExternalMount::Cgroup { destination, .. }
            | ExternalMount::DevNull { destination }
            | ExternalMount::Device { destination } => destination,
        }
    }
}

/// What a restore must know about how the checkpoint was taken.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Metadata {
    /// The major version ([`MAJOR`]).
    pub version: u32,
    /// The minor version (absent in checkpoints written before it existed: 0).
    #[serde(default)]
    pub minor: u32,
    pub external_mounts: Vec<ExternalMount>,
    /// Namespaces joined from outside the container (`network`, `pid`).
    pub external_namespaces: Vec<String>,
    pub tcp_established: bool,
    pub ext_unix_sk: bool,
    pub file_locks: bool,
    pub shell_job: bool,
    /// The container ran in a user namespace of its own (a pod's with `hostUsers: false`):
    /// its id mappings. CRIU's images hold the ids inside the namespace, and the writable
    /// layer's archive the host ids of these mappings; so the checkpoint restores under any
    /// mapping that covers the same container-side ranges, wherever on the host they land.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_namespace: Option<UserNamespace>,
}

/// A user namespace's id mappings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct UserNamespace {
    pub uids: Vec<IdMapping>,
    pub gids: Vec<IdMapping>,
}

/// `length` ids from `container_id` inside a user namespace are `host_id`.. outside it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct IdMapping {
    pub container_id: u32,
    pub host_id: u32,
    pub length: u32,
}

impl Metadata {
    /// Empty metadata of the version this build writes.
    pub fn current() -> Self {
        Metadata {
            version: MAJOR,
            minor: MINOR,
            ..Default::default()
        }
    }
}

/// Creates (or replaces) a root-only (0600) file with `data`; not synced (see [`seal`]).
fn write_private(path: &Path, data: &[u8]) -> Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io("create", path))?;
    file.write_all(data).map_err(io("write", path))?;
    Ok(file)
}

/// Writes the init's descriptors and the metadata into `images`. Not synced here: this runs
/// while the container is frozen, and [`seal`] syncs them after the thaw.
pub fn write_metadata(images: &Path, metadata: &Metadata, descriptors: &[String]) -> Result<()> {
    write_private(
        &images.join(DESCRIPTORS),
        &to_json(descriptors, DESCRIPTORS)?,
    )?;
    write_private(&images.join(METADATA), &to_json(metadata, METADATA)?)?;
    Ok(())
}

fn to_json<T: Serialize + ?Sized>(value: &T, name: &'static str) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|source| Error::Malformed { name, source })
}

/// The regular files of a checkpoint directory (which has no subdirectories) but
/// `podsnap.sha256`, by name.
fn checkpoint_files(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(dir).map_err(io("read", dir))? {
        let entry = entry.map_err(io("read", dir))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let kind = entry.file_type().map_err(io("stat", &entry.path()))?;
        if !kind.is_file() {
            return Err(Error::NotAFile(entry.path()));
        }
        if name != CHECKSUMS {
            files.insert(name, entry.path());
        }
    }
    Ok(files)
}

/// Writes `podsnap.sha256` for a dumped checkpoint (every other file's digest), and syncs what
/// podsnap wrote into it (metadata, descriptors, `podsnap.sha256`) and the directory. Needs no
/// frozen container: a pod checkpoint seals its containers' images after thawing them.
pub fn seal(dir: &Path) -> Result<()> {
    seal_followed(dir, &BTreeMap::new())
}

/// [`seal`], taking a page image's hash from `followed` (a [`crate::follow::Follower`]'s, by
/// file name) when it is still the file that was hashed at the length hashed; every other file
/// is hashed here, on every core.
pub fn seal_followed(
    dir: &Path,
    followed: &BTreeMap<String, crate::follow::Followed>,
) -> Result<()> {
    let files: Vec<(String, PathBuf)> = checkpoint_files(dir)?.into_iter().collect();
    let size = |(_, path): &(String, PathBuf)| fs::symlink_metadata(path).map_or(0, |m| m.len());
    let sums = crate::verified::on_all_cores(&files, size, |(name, path)| {
        match followed.get(name).and_then(|f| f.of(path)) {
            Some(sum) => Ok(sum.to_string()),
            None => crate::digest::of_file(crate::digest::WRITTEN, path).map_err(io("hash", path)),
        }
    });
    let mut text = String::new();
    for ((name, _), sum) in files.iter().zip(sums) {
        text.push_str(&format!("{}  {name}\n", sum?));
    }
    for name in [DESCRIPTORS, METADATA] {
        let path = dir.join(name);
        fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io("sync", &path))?;
    }
    let sums = dir.join(CHECKSUMS);
    write_private(&sums, text.as_bytes())?
        .sync_all()
        .map_err(io("sync", &sums))?;
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", dir))
}

/// The hashes `podsnap.sha256` lists, by file name.
fn read_sums(dir: &Path) -> Result<BTreeMap<String, String>> {
    let path = dir.join(CHECKSUMS);
    let listed = fs::read_to_string(&path).map_err(|_| Error::Unsealed(dir.to_path_buf()))?;
    let mut sums = BTreeMap::new();
    for line in listed.lines() {
        let (hash, name) = line
            .split_once("  ")
            .ok_or_else(|| Error::MalformedLine(line.to_string()))?;
        if name.contains('/') || name == ".." || name == "." || name.is_empty() {
            return Err(Error::Escapes(name.to_string()));
        }
        sums.insert(name.to_string(), hash.to_string());
    }
    Ok(sums)
}

/// The hashes the shim wrote for a container checkpoint that becomes part of a pod checkpoint
/// (whose manifest lists every file instead), by file name; `podsnap.sha256` is removed. None
/// when there is no `podsnap.sha256`.
pub fn take_sums(dir: &Path) -> Result<BTreeMap<String, String>> {
    let path = dir.join(CHECKSUMS);
    if !path.exists() {
        return Ok(BTreeMap::new());
    }
    let sums = read_sums(dir)?;
    fs::remove_file(&path).map_err(io("remove", &path))?;
    Ok(sums)
}

/// Checks a container checkpoint before anything is restored from it: every file is listed in
/// `podsnap.sha256` with the right hash, nothing else is there, and the metadata parses and is
/// of a version this build reads.
pub fn verify(dir: &Path) -> Result<(Metadata, Vec<String>)> {
    if !dir.is_dir() {
        return Err(Error::NotFound(dir.to_path_buf()));
    }
    let expected = read_sums(dir)?;
    let files = checkpoint_files(dir)?;
    if let Some(name) = expected.keys().find(|name| !files.contains_key(*name)) {
        return Err(Error::Missing {
            dir: dir.to_path_buf(),
            name: name.clone(),
        });
    }
    for (name, path) in &files {
        let want = expected.get(name).ok_or_else(|| Error::Unexpected {
            dir: dir.to_path_buf(),
            name: name.clone(),
        })?;
        let algorithm =
            crate::digest::Algorithm::of(want).ok_or_else(|| Error::MalformedLine(want.clone()))?;
        let got = crate::digest::of_file(algorithm, path).map_err(io("hash", path))?;
        if &got != want {
            return Err(Error::Modified {
                path: path.clone(),
                expected: want.clone(),
                actual: got,
            });
        }
    }
    read_metadata(dir)
}

/// Reads the metadata and the init's descriptors from a checkpoint whose files were verified
/// already (against `podsnap.sha256`, or a pod checkpoint's manifest).
pub fn read_metadata(dir: &Path) -> Result<(Metadata, Vec<String>)> {
    /// Just the version, read first: another major version may have other fields.
    #[derive(Deserialize)]
    struct Version {
        version: u32,
        #[serde(default)]
        minor: u32,
    }
    let path = dir.join(METADATA);
    let data = fs::read(&path).map_err(io("read", &path))?;
    let malformed = |source| Error::Malformed {
        name: METADATA,
        source,
    };
    let version: Version = serde_json::from_slice(&data).map_err(malformed)?;
    if version.version != MAJOR {
        return Err(Error::Version {
            major: version.version,
            minor: version.minor,
        });
    }
    let metadata: Metadata = serde_json::from_slice(&data).map_err(malformed)?;
    let path = dir.join(DESCRIPTORS);
    let descriptors: Vec<String> =
        serde_json::from_slice(&fs::read(&path).map_err(io("read", &path))?).map_err(|source| {
            Error::Malformed {
                name: DESCRIPTORS,
                source,
            }
        })?;
    if descriptors.len() != 3 {
        return Err(Error::Descriptors(descriptors.len()));
    }
    Ok((metadata, descriptors))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_checkpoint() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("inventory.img"), b"images").unwrap();
        let descriptors = ["/dev/null", "pipe:[1]", "pipe:[2]"].map(String::from);
        write_metadata(dir.path(), &Metadata::current(), &descriptors).unwrap();
        seal(dir.path()).unwrap();
        dir
    }

    #[test]
    fn an_intact_checkpoint_verifies() {
        let dir = sample_checkpoint();
        let (metadata, descriptors) = verify(dir.path()).unwrap();
        assert_eq!((metadata.version, metadata.minor), (MAJOR, MINOR));
        assert_eq!(descriptors[1], "pipe:[1]");
        use std::os::unix::fs::PermissionsExt;
        for name in [CHECKSUMS, METADATA, DESCRIPTORS] {
            let mode = fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
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
        let dir = sample_checkpoint();
        fs::remove_file(dir.path().join(CHECKSUMS)).unwrap();
        let err = verify(dir.path()).unwrap_err();
        assert!(err.to_string().contains("has no podsnap.sha256"), "{err}");
    }

    #[test]
    fn extra_files_symlinks_and_escaping_names_are_refused() {
        let dir = sample_checkpoint();
        fs::write(dir.path().join("pages-9.img"), b"x").unwrap();
        let err = verify(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("unexpected file pages-9.img"),
            "{err}"
        );
        let dir = sample_checkpoint();
        std::os::unix::fs::symlink("/etc/shadow", dir.path().join("pages-1.img")).unwrap();
        let err = verify(dir.path()).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let dir = sample_checkpoint();
        fs::write(dir.path().join(CHECKSUMS), "abc  ../etc/shadow\n").unwrap();
        let err = verify(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Escapes(_)), "{err}");
    }

    #[test]
    fn a_newer_minor_version_is_read_and_another_major_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let newer = serde_json::json!({
            "version": MAJOR, "minor": MINOR + 3, "external_mounts": [], "external_namespaces": [],
            "tcp_established": false, "ext_unix_sk": false, "file_locks": false,
            "shell_job": false, "a_field_of_a_later_minor": true});
        fs::write(dir.path().join(METADATA), newer.to_string()).unwrap();
        fs::write(
            dir.path().join(DESCRIPTORS),
            r#"["/dev/null", "/dev/null", "/dev/null"]"#,
        )
        .unwrap();
        assert_eq!(read_metadata(dir.path()).unwrap().0.minor, MINOR + 3);
        // Written before the minor version existed: 1.0.
        let old = serde_json::json!({
            "version": 1, "external_mounts": [], "external_namespaces": [],
            "tcp_established": false, "ext_unix_sk": false, "file_locks": false,
            "shell_job": false});
        fs::write(dir.path().join(METADATA), old.to_string()).unwrap();
        assert_eq!(read_metadata(dir.path()).unwrap().0.minor, 0);
        let major = serde_json::json!({"version": MAJOR + 1, "minor": 0});
        fs::write(dir.path().join(METADATA), major.to_string()).unwrap();
        let err = read_metadata(dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains("unsupported checkpoint version 2.0"),
            "{err}"
        );
    }

    #[test]
    fn descriptors_other_than_stdin_stdout_and_stderr_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let four = ["/dev/null", "pipe:[1]", "pipe:[2]", "pipe:[3]"].map(String::from);
        write_metadata(dir.path(), &Metadata::current(), &four).unwrap();
        let err = read_metadata(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Descriptors(4)), "{err}");
        write_metadata(dir.path(), &Metadata::current(), &[]).unwrap();
        assert!(matches!(
            read_metadata(dir.path()).unwrap_err(),
            Error::Descriptors(0)
        ));
    }

    #[test]
    fn take_sums_hands_over_the_shim_s_hashes_and_removes_the_file() {
        let dir = sample_checkpoint();
        let sums = take_sums(dir.path()).unwrap();
        assert_eq!(
            sums.keys().collect::<Vec<_>>(),
            [DESCRIPTORS, "inventory.img", METADATA]
        );
        assert!(!dir.path().join(CHECKSUMS).exists());
        assert!(take_sums(dir.path()).unwrap().is_empty());
    }
}

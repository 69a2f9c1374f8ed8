//! The on-disk format of a podsnap pod checkpoint, and the checks a restore makes before it
//! trusts one.
//!
//! ```text
//! <checkpoint>/
//!   podsnap-manifest.json      versioned manifest: pod and container configs, image
//!                              references, CRIU and kernel versions, the digest of every
//!                              file ([`digest`]: BLAKE3 since version 2, sha256 before)
//!   <container name>/          one per container, in the layout CRI-O, containerd and
//!     checkpoint/              checkpointctl share: CRIU images (+ podsnap metadata)
//!     config.dump spec.dump    container metadata and OCI spec
//!     rootfs-diff.tar          writable-layer changes
//!     deleted.files            paths the container deleted
//!     stats-dump               CRIU's dump statistics
//! ```
//!
//! [`verify`] accepts a directory only if the manifest parses, has this format and version,
//! and lists exactly the regular files present with their digests; symlinks, devices, FIFOs,
//! sockets and paths that leave the directory are refused. This crate does not create
//! containers or talk to CRIU.
//!
//! It is the one owner of podsnap's on-disk format: the pod manifest (here), a container's
//! checkpoint directory ([`container`]: metadata, descriptors, `podsnap.sha256`),
//! `config.dump`/`spec.dump` ([`dumps`]), compressed pages ([`pages`]), the restore grant and
//! the restore annotation's name ([`grant`]), and what CRIU's images say about credentials
//! ([`creds`], [`criu_image`]), and the node's pins of checkpoint manifests ([`pins`], written by
//! podsnapd when it takes a checkpoint and by the node agent when it pulls one). The shim and
//! podsnapd read and write these only through it. It also owns how they are hashed: page images
//! while CRIU writes them ([`follow`]), and every file once per change rather than once per
//! reader ([`verified`]).

pub mod container;
pub mod creds;
pub mod criu_image;
pub mod digest;
pub mod dumps;
pub mod follow;
pub mod grant;
pub mod pages;
pub mod pins;
pub mod verified;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest's file name.
pub const MANIFEST: &str = "podsnap-manifest.json";
/// The manifest's `format` value.
pub const FORMAT: &str = "podsnap.io/pod-checkpoint";
/// The manifest's major version, which this build writes. Versions follow one rule, here and
/// in [`container::Metadata`]: a minor version only adds optional fields, so a reader accepts
/// every minor version of a major version it reads; another major version is refused.
/// Version 2 lists BLAKE3 digests (`blake3:<hex>`, see [`digest`]; minor 1: `pod.ips`);
/// version 1 (minor 1: `machine`) listed sha256, and is still read.
pub const VERSION: u32 = 2;
/// The oldest major version this build reads.
pub const OLDEST_READ: u32 = 1;
/// The manifest's minor version this build writes.
pub const MINOR: u32 = 1;
/// Largest manifest accepted.
const MAX_MANIFEST: u64 = 16 << 20;
/// The directory of a pod checkpoint that holds the pod's emptyDir volume archives
/// (`<volume name>.tar`). No container directory can clash with it: container names are
/// DNS-1123 labels (`[a-z0-9-]`), and [`verify`] refuses a manifest container of this name.
pub const VOLUMES_DIR: &str = "_volumes";

/// Why a checkpoint was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("checkpoint {0} does not exist or is not a directory")]
    NotADirectory(PathBuf),
    #[error("checkpoint manifest {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint manifest {path} is malformed: {source}")]
    Malformed {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("checkpoint manifest is too large ({0} bytes)")]
    TooLarge(u64),
    #[error("not a podsnap pod checkpoint (format {format:?}, version {version})")]
    Format { format: String, version: u32 },
    #[error("checkpoint path {0:?} escapes the checkpoint directory")]
    Escapes(String),
    #[error("{0} is a symlink: a checkpoint holds no symlinks")]
    Symlink(PathBuf),
    #[error("{0} is a device, FIFO or socket: a checkpoint holds only files and directories")]
    SpecialFile(PathBuf),
    #[error("checkpoint file {0} is not listed in the manifest")]
    Unlisted(String),
    #[error("checkpoint file {0} is missing (truncated checkpoint?)")]
    Missing(String),
    #[error("checkpoint file {path} was modified (it has {actual}, the manifest says {expected})")]
    Modified {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("the manifest's digest of {path} is neither sha256 nor blake3: {digest:?}")]
    BadDigest { path: String, digest: String },
    #[error("the manifest lists container {0:?} twice")]
    DuplicateContainer(String),
    #[error("container directory {0:?} is not a plain name")]
    BadContainerDir(String),
    #[error(
        "checkpoint manifest changed since it was verified (sha256 {actual}, pinned {expected})"
    )]
    ManifestChanged { expected: String, actual: String },
    #[error("the checkpoint holds no container {0:?}")]
    UnknownContainer(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The pod part of the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PodEntry {
    pub sandbox_id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub runtime_handler: String,
    /// The CRI `PodSandboxConfig` as containerd reported it (JSON).
    pub config: serde_json::Value,
    /// The pod's IP addresses, primary first (since version 2 minor 1; absent before, and for
    /// a pod without any): what a restore with `podsnap.io/keep-ip` asks for again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<std::net::IpAddr>,
}

/// One container of the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ContainerEntry {
    /// The CRI metadata name, unique in the pod; also the directory name.
    pub name: String,
    pub id: String,
    /// The image as the container config named it.
    pub image: String,
    /// The image's resolved reference (digest or id).
    pub image_ref: String,
    /// The CRI `ContainerConfig` as containerd reported it (JSON).
    pub config: serde_json::Value,
}

impl ContainerEntry {
    /// The image as the pod spec named it; see [`image_name`].
    pub fn image_name(&self) -> &str {
        image_name(&self.config, &self.image)
    }
}

/// The image as the user named it (`docker.io/library/busybox:1.37.0`): the CRI config's
/// `image.user_specified_image`, which the kubelet sets while `image.image` holds the resolved
/// image ID; `image` when the config names none.
pub fn image_name<'a>(config: &'a serde_json::Value, image: &'a str) -> &'a str {
    config["image"]["user_specified_image"]
        .as_str()
        .filter(|name| !name.is_empty())
        .unwrap_or(image)
}

/// The manifest of a pod checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: String,
    /// The major version ([`VERSION`]).
    pub version: u32,
    /// The minor version (absent in manifests written before it existed: 0).
    #[serde(default)]
    pub minor: u32,
    /// RFC 3339 time of the checkpoint.
    pub created: String,
    pub pod: PodEntry,
    pub containers: Vec<ContainerEntry>,
    pub criu_version: String,
    pub kernel: String,
    /// The `podsnap.io/...` options the checkpoint was taken with.
    pub options: BTreeMap<String, String>,
    /// The digest of every file ([`digest`]), by path relative to the checkpoint directory.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// The machine it was taken on (since version 1 minor 1; absent before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<Machine>,
}

/// What a restore on another machine depends on, beyond what CRIU checks itself: CRIU images
/// hold the processes' memory as pages of this size, for this instruction set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// The instruction set, as Rust names it (`x86_64`, `aarch64`).
    pub arch: String,
    /// The page size, in bytes.
    pub page_size: u64,
}

impl Machine {
    /// This machine.
    pub fn here() -> Machine {
        // SAFETY: sysconf reads a constant of the running system.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Machine {
            arch: std::env::consts::ARCH.to_string(),
            page_size: u64::try_from(page_size).unwrap_or(0),
        }
    }

    /// Whether a checkpoint taken on `self` can be restored `here`; the reason when not.
    pub fn restorable_on(&self, here: &Machine) -> std::result::Result<(), String> {
        if self.arch != here.arch {
            return Err(format!(
                "the checkpoint was taken on {}, this node is {}: CRIU restores on the same architecture only",
                self.arch, here.arch
            ));
        }
        if self.page_size != here.page_size {
            return Err(format!(
                "the checkpoint was taken with {}-byte pages, this node has {}-byte pages",
                self.page_size, here.page_size
            ));
        }
        Ok(())
    }
}

/// The leading `major.minor[.patch]` numbers of a version string (`4.1.1 (gitid)`,
/// `6.1.0-28-amd64`); `None` when it has none.
fn version_numbers(text: &str) -> Option<(u32, u32, u32)> {
    let head = text
        .trim()
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?;
    let mut parts = head.split('.').map(|p| p.parse::<u32>().ok());
    let major = parts.next()??;
    let minor = parts.next()??;
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// Whether the CRIU and kernel of this node (`criu`, `kernel`) can restore a checkpoint taken
/// with `taken_criu` on `taken_kernel`; the reason when not. CRIU reads the images of its own
/// and older versions, not necessarily newer ones; a kernel older than the one the checkpoint was
/// taken on may lack what its processes used. Versions that do not parse (an unknown CRIU) are
/// not held against a restore.
pub fn versions_restorable(
    taken_criu: &str,
    taken_kernel: &str,
    criu: &str,
    kernel: &str,
) -> std::result::Result<(), String> {
    if let (Some(taken), Some(here)) = (version_numbers(taken_criu), version_numbers(criu))
        && here < taken
    {
        return Err(format!(
            "the checkpoint was taken with CRIU {}, this node has CRIU {}: an older CRIU may not read newer images",
            taken_criu.trim(),
            criu.trim()
        ));
    }
    if let (Some(taken), Some(here)) = (version_numbers(taken_kernel), version_numbers(kernel))
        && (here.0, here.1) < (taken.0, taken.1)
    {
        return Err(format!(
            "the checkpoint was taken on kernel {}, this node runs {}: an older kernel may lack what its processes use",
            taken_kernel.trim(),
            kernel.trim()
        ));
    }
    Ok(())
}

/// Creates a new file readable by root only (0600); an existing file or symlink is an error.
pub(crate) fn private_file(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    sha256_reader(&mut fs::File::open(path)?)
}

/// Hex sha256 of everything `reader` yields, read in 1 MiB blocks.
pub fn sha256_reader(reader: &mut impl Read) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Every regular file under `root` except the manifest, by relative path; refuses symlinks
/// and special files.
pub fn files(root: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    collect(root, root, &mut out)?;
    out.remove(MANIFEST);
    Ok(out)
}

fn collect(root: &Path, dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io(&path))?;
        if kind.is_symlink() {
            return Err(Error::Symlink(path));
        } else if kind.is_dir() {
            collect(root, &path, out)?;
        } else if kind.is_file() {
            let relative = path
                .strip_prefix(root)
                .expect("walked from root")
                .to_string_lossy()
                .to_string();
            out.insert(relative, path);
        } else {
            return Err(Error::SpecialFile(path));
        }
    }
    Ok(())
}

/// A relative path inside the checkpoint, or [`Error::Escapes`].
pub fn contained(relative: &str) -> Result<PathBuf> {
    let path = Path::new(relative);
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            _ => return Err(Error::Escapes(relative.to_string())),
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(Error::Escapes(relative.to_string()));
    }
    Ok(clean)
}

/// Hashes every file under `root` into `manifest.files` and writes the manifest (0600).
pub fn write_manifest(root: &Path, manifest: &mut Manifest) -> Result<()> {
    write_manifest_reusing(root, manifest, &BTreeMap::new())
}

/// [`write_manifest`], taking the digest of a file from `known` (relative path → digest) when
/// the caller computed it already (the shim's `podsnap.sha256` of each container's images, moments
/// before): a checkpoint's gigabytes are hashed once, not twice.
pub fn write_manifest_reusing(
    root: &Path,
    manifest: &mut Manifest,
    known: &BTreeMap<String, String>,
) -> Result<()> {
    manifest.files.clear();
    for (relative, path) in files(root)? {
        let hash = match known.get(&relative) {
            Some(hash) => hash.clone(),
            None => digest::of_file(digest::WRITTEN, &path).map_err(io(&path))?,
        };
        manifest.files.insert(relative, hash);
    }
    let path = root.join(MANIFEST);
    let data = serde_json::to_vec_pretty(manifest).map_err(|source| Error::Malformed {
        path: path.clone(),
        source,
    })?;
    let mut file = private_file(&path).map_err(io(&path))?;
    file.write_all(&data).map_err(io(&path))?;
    file.sync_all().map_err(io(&path))?;
    // The checkpoint counts as written once its manifest is: make the directory entry durable.
    fs::File::open(root)
        .and_then(|dir| dir.sync_all())
        .map_err(io(root))
}

/// Reads and checks a pod checkpoint before anything is restored from it.
pub fn verify(root: &Path) -> Result<Manifest> {
    verify_with_digest(root).map(|(manifest, _)| manifest)
}

/// [`verify`], also returning the sha256 of the manifest file it read: what a restore pins
/// ([`grant::RestoreGrant::manifest_sha256`]).
pub fn verify_with_digest(root: &Path) -> Result<(Manifest, String)> {
    verify_stamped(root, &verified::Stamps::new()).map(|(manifest, digest, _)| (manifest, digest))
}

/// [`verify_with_digest`], not reading a file that one of `known` (stamps by relative path)
/// vouches for ([`verified`]); returns the stamps of the files it verified (reused or new).
/// Files are hashed on every core.
pub fn verify_stamped(
    root: &Path,
    known: &verified::Stamps,
) -> Result<(Manifest, String, verified::Stamps)> {
    verify_stamped_deferring(root, known, |_| false)
}

/// [`verify_stamped`], except that the files `deferred` selects (by relative path) are checked
/// for their place in the listing only, not hashed: for a reader that verifies them itself
/// while it uses them (a lazy restore hashes the page images while they stream in).
pub fn verify_stamped_deferring(
    root: &Path,
    known: &verified::Stamps,
    deferred: impl Fn(&str) -> bool + Sync,
) -> Result<(Manifest, String, verified::Stamps)> {
    let (manifest, digest) = read_manifest(root)?;
    check_containers(&manifest)?;
    let stamps = check_files(root, &manifest, |_| true, Some((known, &deferred)))?;
    Ok((manifest, digest, stamps))
}

/// Whether a checkpoint file (by relative path) is one of CRIU's page images,
/// `<container>/checkpoint/pages-<n>.img`: a container's memory.
pub fn is_page_image(relative: &str) -> bool {
    let mut parts = relative.split('/');
    let (Some(_), Some("checkpoint"), Some(name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    name.strip_prefix("pages-")
        .and_then(|n| n.strip_suffix(".img"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// [`verify_with_digest`] without hashing the files: the manifest and the checkpoint's file
/// list (every listed file there, a regular file, nothing unlisted). For a reader that hashes
/// every file as it reads it anyway and refuses one whose sha256 is not the manifest's (the
/// packer of `podsnap-checkpoint-image`), so that a checkpoint is read once, not twice.
pub fn verify_listing(root: &Path) -> Result<(Manifest, String)> {
    let (manifest, digest) = read_manifest(root)?;
    check_containers(&manifest)?;
    check_files(root, &manifest, |_| true, None)?;
    Ok((manifest, digest))
}

/// The hex sha256 of the checkpoint's manifest file: what a restore pins.
pub fn manifest_sha256(root: &Path) -> Result<String> {
    let path = root.join(MANIFEST);
    sha256_file(&path).map_err(io(&path))
}

/// Reads the manifest, refusing a symlink, an oversized file or another format; returns it
/// with its bytes' sha256.
fn read_manifest(root: &Path) -> Result<(Manifest, String)> {
    if !root.is_dir() {
        return Err(Error::NotADirectory(root.to_path_buf()));
    }
    let path = root.join(MANIFEST);
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) => Error::Symlink(path.clone()),
            _ => Error::Io {
                path: path.clone(),
                source,
            },
        })?;
    let len = file.metadata().map_err(io(&path))?.len();
    if len > MAX_MANIFEST {
        return Err(Error::TooLarge(len));
    }
    let mut data = Vec::new();
    file.take(MAX_MANIFEST + 1)
        .read_to_end(&mut data)
        .map_err(io(&path))?;
    if data.len() as u64 > MAX_MANIFEST {
        return Err(Error::TooLarge(data.len() as u64));
    }
    let digest = hex(&Sha256::digest(&data));
    let malformed = |source| Error::Malformed {
        path: path.clone(),
        source,
    };
    /// Format and major version, read first: another major version may have other fields.
    #[derive(Deserialize)]
    struct Version {
        #[serde(default)]
        format: String,
        #[serde(default)]
        version: u32,
    }
    let version: Version = serde_json::from_slice(&data).map_err(malformed)?;
    if version.format != FORMAT || !(OLDEST_READ..=VERSION).contains(&version.version) {
        return Err(Error::Format {
            format: version.format,
            version: version.version,
        });
    }
    let manifest: Manifest = serde_json::from_slice(&data).map_err(malformed)?;
    Ok((manifest, digest))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the shim checks when it restores one container of a pod checkpoint: the manifest is
/// byte for byte the one podsnapd verified (`manifest_sha256`, from the restore grant), names
/// `container`, and every file the container's restore reads (its own directory and the
/// pod-level files, such as volume archives; not its siblings' directories, which their own
/// restores check) has the manifest's sha256, none missing and none added. A file one of
/// `known` (the grant's stamps, by relative path) still vouches for is not read again.
pub fn verify_container(
    root: &Path,
    manifest_sha256: &str,
    container: &str,
    known: &verified::Stamps,
) -> Result<Manifest> {
    verify_container_deferring(root, manifest_sha256, container, known, |_| false)
}

/// [`verify_container`], the files `deferred` selects only checked for their place (see
/// [`verify_stamped_deferring`]).
pub fn verify_container_deferring(
    root: &Path,
    manifest_sha256: &str,
    container: &str,
    known: &verified::Stamps,
    deferred: impl Fn(&str) -> bool + Sync,
) -> Result<Manifest> {
    let (manifest, digest) = read_manifest(root)?;
    if digest != manifest_sha256 {
        return Err(Error::ManifestChanged {
            expected: manifest_sha256.to_string(),
            actual: digest,
        });
    }
    check_containers(&manifest)?;
    if !manifest.containers.iter().any(|c| c.name == container) {
        return Err(Error::UnknownContainer(container.to_string()));
    }
    check_files(
        root,
        &manifest,
        |relative| read_by(&manifest, container, relative),
        Some((known, &deferred)),
    )?;
    Ok(manifest)
}

/// Whether the restore of `container` reads the checkpoint file `relative`: its own directory
/// and the pod-level files, not its siblings' directories.
pub fn read_by(manifest: &Manifest, container: &str, relative: &str) -> bool {
    let first = relative.split('/').next().unwrap_or_default();
    first == container || !manifest.containers.iter().any(|c| c.name == first)
}

/// Selects files by relative path.
type Selector<'a> = &'a (dyn Fn(&str) -> bool + Sync);

/// Checks the files under `root` that `wanted` selects (by relative path) against the manifest:
/// every listed path stays inside the checkpoint, none is missing, none is unlisted, and (with
/// `hash`, the stamps that may vouch for files and which files to leave unhashed) each has its
/// sha256, hashed on every core unless a stamp vouches for it. Paths are checked before any
/// file is hashed. Returns the stamps of the files checked.
fn check_files(
    root: &Path,
    manifest: &Manifest,
    wanted: impl Fn(&str) -> bool,
    hash: Option<(&verified::Stamps, Selector<'_>)>,
) -> Result<verified::Stamps> {
    let listed: Vec<(&String, &String)> =
        manifest.files.iter().filter(|(r, _)| wanted(r)).collect();
    for (relative, _) in &listed {
        contained(relative)?;
    }
    let present = files(root)?;
    if let Some(relative) = present
        .keys()
        .find(|r| wanted(r) && !manifest.files.contains_key(*r))
    {
        return Err(Error::Unlisted(relative.clone()));
    }
    let mut jobs = Vec::new();
    for (relative, expected) in listed {
        let path = present
            .get(relative)
            .ok_or_else(|| Error::Missing(relative.clone()))?;
        jobs.push((relative, expected, path));
    }
    let Some((known, deferred)) = hash else {
        return Ok(verified::Stamps::new());
    };
    jobs.retain(|(relative, _, _)| !deferred(relative));
    let size = |(_, _, path): &(&String, &String, &PathBuf)| {
        fs::symlink_metadata(path).map_or(0, |m| m.len())
    };
    let checked = verified::on_all_cores(&jobs, size, |&(relative, expected, path)| {
        if let Some(stamp) = known.get(relative.as_str())
            && &stamp.digest == expected
            && verified::vouched(path, stamp).is_some()
        {
            return Ok(Some(stamp.clone()));
        }
        let algorithm = digest::Algorithm::of(expected).ok_or_else(|| Error::BadDigest {
            path: relative.clone(),
            digest: expected.clone(),
        })?;
        let hashed = verified::hash(path, algorithm).map_err(io(path))?;
        if &hashed.digest != expected {
            return Err(Error::Modified {
                path: relative.clone(),
                expected: expected.clone(),
                actual: hashed.digest,
            });
        }
        Ok(hashed.stamp)
    });
    let mut stamps = verified::Stamps::new();
    for ((relative, _, _), result) in jobs.iter().zip(checked) {
        if let Some(stamp) = result? {
            stamps.insert((*relative).clone(), stamp);
        }
    }
    Ok(stamps)
}

/// Container names must be unique plain names: each is a directory of the checkpoint.
fn check_containers(manifest: &Manifest) -> Result<()> {
    let mut names = std::collections::HashSet::new();
    for container in &manifest.containers {
        if !names.insert(container.name.as_str()) {
            return Err(Error::DuplicateContainer(container.name.clone()));
        }
        let dir = contained(&container.name)?;
        if dir.components().count() != 1 || container.name == VOLUMES_DIR {
            return Err(Error::BadContainerDir(container.name.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_older_criu_or_kernel_is_refused_newer_and_unknown_ones_are_not() {
        assert_eq!(
            versions_restorable("4.1.1", "6.1.0-28-amd64", "4.1.1 (abc)", "6.1.0-30-amd64"),
            Ok(())
        );
        assert_eq!(
            versions_restorable("4.0", "6.1.0", "4.1.1", "6.8.12"),
            Ok(())
        );
        let err = versions_restorable("4.1.1", "6.1.0", "4.0.0", "6.1.0").unwrap_err();
        assert!(
            err.contains("CRIU 4.1.1") && err.contains("CRIU 4.0.0"),
            "{err}"
        );
        let err = versions_restorable("4.1.1", "6.8.0-1", "4.1.1", "6.1.0-28-amd64").unwrap_err();
        assert!(
            err.contains("kernel 6.8.0-1") && err.contains("runs 6.1.0-28-amd64"),
            "{err}"
        );
        // A patch level of the kernel is not held against it; what does not parse is skipped.
        assert_eq!(
            versions_restorable("4.1.1", "6.1.99", "4.1.1", "6.1.0"),
            Ok(())
        );
        assert_eq!(versions_restorable("", "", "4.1.1", "6.1.0"), Ok(()));
        assert_eq!(versions_restorable("4.1.1", "6.1.0", "", "weird"), Ok(()));
    }

    #[test]
    fn the_image_name_is_the_users_when_the_config_has_it() {
        let id = "sha256:26f70ea3";
        let config =
            serde_json::json!({"image": {"image": id, "user_specified_image": "busybox:1.37.0"}});
        assert_eq!(image_name(&config, id), "busybox:1.37.0");
        let bare = serde_json::json!({"image": {"image": id, "user_specified_image": ""}});
        assert_eq!(image_name(&bare, id), id);
        assert_eq!(image_name(&serde_json::Value::Null, id), id);
    }
    use super::*;

    fn sample(root: &Path) -> Manifest {
        fs::create_dir_all(root.join("web/checkpoint")).unwrap();
        fs::write(root.join("web/checkpoint/pages-1.img"), b"pages").unwrap();
        fs::write(root.join("web/rootfs-diff.tar"), b"tar").unwrap();
        let mut manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            minor: MINOR,
            created: "2026-11-27T00:00:00Z".into(),
            pod: PodEntry {
                sandbox_id: "sb".into(),
                name: "pod".into(),
                namespace: "default".into(),
                uid: "u".into(),
                runtime_handler: "podsnap".into(),
                config: serde_json::json!({}),
                ips: Vec::new(),
            },
            containers: vec![ContainerEntry {
                name: "web".into(),
                id: "c1".into(),
                image: "busybox".into(),
                image_ref: "sha256:x".into(),
                config: serde_json::json!({}),
            }],
            criu_version: "4.1.1".into(),
            kernel: "6.18".into(),
            options: BTreeMap::new(),
            files: BTreeMap::new(),
            machine: None,
        };
        write_manifest(root, &mut manifest).unwrap();
        manifest
    }

    #[test]
    fn a_written_checkpoint_verifies_and_lists_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = sample(dir.path());
        assert_eq!(manifest.files.len(), 2);
        assert_eq!(verify(dir.path()).unwrap(), manifest);
    }

    #[test]
    fn a_checkpoint_restores_only_on_the_same_architecture_and_page_size() {
        let here = Machine::here();
        assert!(here.page_size >= 4096, "{here:?}");
        assert_eq!(here.restorable_on(&here), Ok(()));
        let arm = Machine {
            arch: "aarch64".into(),
            ..here.clone()
        };
        let x86 = Machine {
            arch: "x86_64".into(),
            ..here.clone()
        };
        let err = arm.restorable_on(&x86).unwrap_err();
        assert!(
            err.contains("taken on aarch64, this node is x86_64"),
            "{err}"
        );
        let big_pages = Machine {
            page_size: 65536,
            ..x86.clone()
        };
        let err = big_pages
            .restorable_on(&Machine {
                page_size: 4096,
                ..x86
            })
            .unwrap_err();
        assert!(
            err.contains("65536-byte pages, this node has 4096-byte"),
            "{err}"
        );
    }

    #[test]
    fn a_later_minor_version_is_read_and_another_major_version_is_refused() {
        let rewrite = |root: &Path, edit: &dyn Fn(&mut serde_json::Value)| {
            let path = root.join(MANIFEST);
            let mut value: serde_json::Value =
                serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
            edit(&mut value);
            fs::write(&path, serde_json::to_vec(&value).unwrap()).unwrap();
        };
        let dir = tempfile::tempdir().unwrap();
        sample(dir.path());
        rewrite(dir.path(), &|v| {
            v["minor"] = (MINOR + 2).into();
            v["a_field_of_a_later_minor"] = true.into();
        });
        assert_eq!(verify(dir.path()).unwrap().minor, MINOR + 2);
        // Written before the minor version existed.
        rewrite(dir.path(), &|v| {
            v.as_object_mut().unwrap().remove("minor");
        });
        assert_eq!(verify(dir.path()).unwrap().minor, 0);
        assert_eq!(verify(dir.path()).unwrap().machine, None);
        // Another major version is refused as such, even with fields this build lacks.
        rewrite(dir.path(), &|v| {
            *v = serde_json::json!({"format": FORMAT, "version": VERSION + 1, "pods": []});
        });
        let err = verify(dir.path()).unwrap_err();
        assert!(
            matches!(err, Error::Format { version, .. } if version == VERSION + 1),
            "{err}"
        );
    }

    #[test]
    fn a_modified_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        sample(dir.path());
        fs::write(dir.path().join("web/rootfs-diff.tar"), b"evil").unwrap();
        let err = verify(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Modified { .. }), "{err}");
        assert!(err.to_string().contains("web/rootfs-diff.tar"), "{err}");
    }

    #[test]
    fn missing_and_extra_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        sample(dir.path());
        fs::remove_file(dir.path().join("web/rootfs-diff.tar")).unwrap();
        assert!(matches!(verify(dir.path()).unwrap_err(), Error::Missing(_)));
        let dir = tempfile::tempdir().unwrap();
        sample(dir.path());
        fs::write(dir.path().join("web/extra"), b"x").unwrap();
        assert!(matches!(
            verify(dir.path()).unwrap_err(),
            Error::Unlisted(_)
        ));
    }

    #[test]
    fn symlinks_that_escape_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        sample(dir.path());
        std::os::unix::fs::symlink("/etc", dir.path().join("web/etc")).unwrap();
        assert!(matches!(verify(dir.path()).unwrap_err(), Error::Symlink(_)));
    }

    #[test]
    fn manifest_paths_and_names_that_escape_are_refused() {
        assert!(contained("../x").is_err());
        assert!(contained("/etc/passwd").is_err());
        assert!(contained("a/../../b").is_err());
        assert!(contained("a/b").is_ok());
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = sample(dir.path());
        manifest.containers[0].name = "../escape".into();
        fs::write(
            dir.path().join(MANIFEST),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        assert!(matches!(verify(dir.path()).unwrap_err(), Error::Escapes(_)));
    }

    #[test]
    fn a_device_node_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        sample(dir.path());
        let fifo = dir.path().join("web/fifo");
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(matches!(
            verify(dir.path()).unwrap_err(),
            Error::SpecialFile(_)
        ));
    }

    #[test]
    fn another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = sample(dir.path());
        manifest.version = 99;
        fs::write(
            dir.path().join(MANIFEST),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            verify(dir.path()).unwrap_err(),
            Error::Format { .. }
        ));
    }

    #[test]
    fn a_stamp_spares_reading_a_file_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = sample(dir.path());
        let pages = dir.path().join("web/checkpoint/pages-1.img");
        fs::write(&pages, vec![1u8; verified::STAMPED_MIN as usize]).unwrap();
        fs::remove_file(dir.path().join(MANIFEST)).unwrap();
        write_manifest(dir.path(), &mut manifest).unwrap();
        let pinned = manifest_sha256(dir.path()).unwrap();
        // Not settled yet: verified, but no stamp.
        let (_, _, stamps) = verify_stamped(dir.path(), &Default::default()).unwrap();
        assert!(stamps.is_empty(), "{stamps:?}");
        std::thread::sleep(verified::SETTLED * 2);
        let (_, _, stamps) = verify_stamped(dir.path(), &Default::default()).unwrap();
        assert_eq!(
            stamps.keys().collect::<Vec<_>>(),
            ["web/checkpoint/pages-1.img"]
        );
        // A stamp is believed without reading the file: one that vouches for other bytes than
        // the file's (as no podsnapd would write) shows it.
        let mut lying = stamps.clone();
        let stamp = lying.get_mut("web/checkpoint/pages-1.img").unwrap();
        fs::write(&pages, vec![2u8; verified::STAMPED_MIN as usize]).unwrap();
        stamp.identity = verified::Identity::at(&pages).unwrap();
        verify_container(dir.path(), &pinned, "web", &lying).unwrap();
        // The file the stamps were made for changed (same size): it is read, and refused.
        assert!(matches!(
            verify_container(dir.path(), &pinned, "web", &stamps),
            Err(Error::Modified { .. })
        ));
        // A stamp of another hash than the manifest's is not used either.
        lying.get_mut("web/checkpoint/pages-1.img").unwrap().digest = "00".repeat(32);
        assert!(matches!(
            verify_stamped(dir.path(), &lying),
            Err(Error::Modified { .. })
        ));
    }

    #[test]
    fn deferred_page_images_are_listed_and_present_but_not_hashed() {
        assert!(is_page_image("web/checkpoint/pages-1.img"));
        for not in [
            "web/checkpoint/pagemap-1.img",
            "web/checkpoint/pages-.img",
            "web/checkpoint/pages-1.img.x",
            "web/pages-1.img",
            "web/checkpoint/sub/pages-1.img",
            "pages-1.img",
        ] {
            assert!(!is_page_image(not), "{not}");
        }
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = sample(dir.path());
        let pages = dir.path().join("web/checkpoint/pages-1.img");
        fs::write(&pages, b"pages").unwrap();
        fs::remove_file(dir.path().join(MANIFEST)).unwrap();
        write_manifest(dir.path(), &mut manifest).unwrap();
        let pinned = manifest_sha256(dir.path()).unwrap();
        fs::write(&pages, b"other").unwrap();
        // Hashed: refused. Deferred: its reader checks it.
        assert!(matches!(
            verify_container(dir.path(), &pinned, "web", &Default::default()),
            Err(Error::Modified { .. })
        ));
        verify_container_deferring(
            dir.path(),
            &pinned,
            "web",
            &Default::default(),
            is_page_image,
        )
        .unwrap();
        let (_, _, stamps) =
            verify_stamped_deferring(dir.path(), &Default::default(), is_page_image).unwrap();
        assert!(!stamps.contains_key("web/checkpoint/pages-1.img"));
        // Still listed and present: a missing one is refused all the same.
        fs::remove_file(&pages).unwrap();
        assert!(matches!(
            verify_stamped_deferring(dir.path(), &Default::default(), is_page_image),
            Err(Error::Missing(_))
        ));
    }

    #[test]
    fn a_container_verifies_against_the_pinned_manifest_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut manifest = sample(dir.path());
        let pinned = manifest_sha256(dir.path()).unwrap();
        verify_container(dir.path(), &pinned, "web", &Default::default()).unwrap();
        assert!(matches!(
            verify_container(dir.path(), &pinned, "db", &Default::default()),
            Err(Error::UnknownContainer(_))
        ));
        // A changed file, with the manifest's hashes re-computed to match: the manifest is no
        // longer the one pinned.
        fs::write(dir.path().join("web/rootfs-diff.tar"), b"evil").unwrap();
        fs::remove_file(dir.path().join(MANIFEST)).unwrap();
        write_manifest(dir.path(), &mut manifest).unwrap();
        assert!(matches!(
            verify_container(dir.path(), &pinned, "web", &Default::default()),
            Err(Error::ManifestChanged { .. })
        ));
        // A changed file under the same manifest.
        let pinned = manifest_sha256(dir.path()).unwrap();
        fs::write(dir.path().join("web/rootfs-diff.tar"), b"worse").unwrap();
        assert!(matches!(
            verify_container(dir.path(), &pinned, "web", &Default::default()),
            Err(Error::Modified { .. })
        ));
        assert!(verify_with_digest(dir.path()).is_err());
    }
}

//! A podsnap pod checkpoint as an OCI artifact, the form in which it travels between nodes
//! through any OCI registry (docs/design/checkpoint-images.md):
//!
//! ```text
//! image manifest   application/vnd.oci.image.manifest.v1+json
//!   artifactType   application/vnd.podsnap.pod-checkpoint.v1
//!   config         the exact bytes of podsnap-manifest.json (its sha256 is what a restore pins)
//!   layers         one per container directory, one per volume archive (_volumes/<name>.tar),
//!                  each a deterministic tar (sorted, uid/gid 0, mode 0600, mtime 0) compressed
//!                  with zstd, annotated io.podsnap.checkpoint.path=<container | _volumes/x.tar>
//! ```
//!
//! Optionally ([`crypt`]) the config and every layer are sealed to age recipients: media types
//! `…+age`, annotation `io.podsnap.checkpoint.encryption=age`; digests are the ciphertext's.
//!
//! [`plan`] and [`write_layer`] pack a verified checkpoint directory; packing the same
//! checkpoint twice gives the same digests, so a registry that has a blob is not sent it again.
//! [`unpack`] is the only way back: it trusts nothing in the blobs. Every blob's sha256 and size
//! must be the descriptor's; the config must be a podsnap manifest; a layer may hold only
//! regular files, each listed in that manifest, under the layer's own path, once, within a
//! byte budget; the result is [`podsnap_checkpoint_format::verify`]ed (every file's digest)
//! before it is renamed into place. Any failure removes what was unpacked.
//!
//! This crate does no network I/O: readers and writers come from the caller (a registry
//! client streams blobs through them). [`auth`] reads registry credentials from a
//! `kubernetes.io/dockerconfigjson` Secret.

pub mod auth;
pub mod crypt;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use podsnap_checkpoint_format::{self as format, MANIFEST, Manifest, VOLUMES_DIR};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crypt::{Identities, Recipients};

/// The OCI image manifest's media type.
pub const IMAGE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The artifact type of a podsnap pod checkpoint.
pub const ARTIFACT_TYPE: &str = "application/vnd.podsnap.pod-checkpoint.v1";
/// The config: the checkpoint's `podsnap-manifest.json`, byte for byte.
pub const CONFIG: &str = "application/vnd.podsnap.pod-checkpoint.manifest.v1+json";
/// A container's checkpoint directory (`<container>/...`).
pub const CONTAINER_LAYER: &str = "application/vnd.podsnap.pod-checkpoint.container.v1.tar+zstd";
/// One volume archive (`_volumes/<volume>.tar`).
pub const VOLUME_LAYER: &str = "application/vnd.podsnap.pod-checkpoint.volume.v1.tar+zstd";
/// The annotation naming what a layer holds: a container name or `_volumes/<volume>.tar`.
pub const PATH_ANNOTATION: &str = "io.podsnap.checkpoint.path";
/// zstd level of the layers: 1, zstd's fastest. `podsnap-bench registry` (README) found levels
/// 1, 3 and 9 within noise of each other on its 1 GiB checkpoint, whose pages do not compress;
/// memory that does compress is still to be measured.
pub const DEFAULT_LEVEL: i32 = 1;
/// Largest config accepted: at most this much of a config blob is read.
pub const MAX_CONFIG: u64 = 16 << 20;
/// zstd window of the layers (4 MiB), written and the most a reader accepts: a layer cannot
/// make the decoder allocate more.
const WINDOW_LOG: u32 = 22;
/// What a tar adds beyond the files' bytes, per entry (header, GNU long name entry, padding)
/// and at its end: with the byte budget, the most a layer may decompress to.
const TAR_OVERHEAD_PER_FILE: u64 = 3 * 512;
const TAR_OVERHEAD: u64 = 10 * 512;

/// Why a checkpoint image could not be packed or unpacked.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Format(#[from] format::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "blob {what} is {actual} ({actual_size} bytes); its descriptor says {expected} ({expected_size} bytes)"
    )]
    Digest {
        what: String,
        expected: String,
        expected_size: u64,
        actual: String,
        actual_size: u64,
    },
    #[error("not a podsnap checkpoint image: {0}")]
    NotACheckpoint(String),
    #[error("layer {layer}: {reason}: refused")]
    BadEntry { layer: String, reason: String },
    #[error(
        "layer {layer}: the image unpacks to more than its budget of {max_bytes} bytes: refused"
    )]
    TooLarge { layer: String, max_bytes: u64 },
    #[error("the image has no layer for checkpoint files {0:?}")]
    Incomplete(Vec<String>),
    #[error("{0} exists: a checkpoint is never unpacked over another")]
    Exists(PathBuf),
    #[error("checkpoint file {path} changed since it was verified: {reason}")]
    Changed { path: String, reason: String },
    #[error("encryption: {0}")]
    Crypt(String),
}

pub type Result<T> = std::result::Result<T, Error>;

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI image manifest carrying a pod checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    pub media_type: String,
    pub artifact_type: String,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ImageManifest {
    /// The manifest of a checkpoint whose config and layers were written as `config` and
    /// `layers`, with the checkpoint's facts as annotations (`org.criu.checkpoint.*`, which
    /// checkpointctl and the runtimes read, where they mean the same).
    pub fn new(manifest: &Manifest, config: Descriptor, layers: Vec<Descriptor>) -> Self {
        let mut annotations = BTreeMap::from([
            (
                "org.criu.checkpoint.engine.name".to_string(),
                "podsnap".to_string(),
            ),
            (
                "org.criu.checkpoint.criu.version".to_string(),
                manifest.criu_version.clone(),
            ),
            (
                "io.podsnap.checkpoint.kernel".to_string(),
                manifest.kernel.clone(),
            ),
            (
                "io.podsnap.checkpoint.pod.name".to_string(),
                manifest.pod.name.clone(),
            ),
            (
                "io.podsnap.checkpoint.pod.namespace".to_string(),
                manifest.pod.namespace.clone(),
            ),
            (
                "org.opencontainers.image.created".to_string(),
                manifest.created.clone(),
            ),
        ]);
        // Where it can be restored: the architecture and page size it was taken with.
        if let Some(machine) = &manifest.machine {
            annotations.insert(
                "io.podsnap.checkpoint.arch".to_string(),
                machine.arch.clone(),
            );
            annotations.insert(
                "io.podsnap.checkpoint.page-size".to_string(),
                machine.page_size.to_string(),
            );
        }
        if config.media_type.ends_with(crypt::SUFFIX) {
            annotations.insert(crypt::ANNOTATION.to_string(), "age".to_string());
        }
        Self {
            schema_version: 2,
            media_type: IMAGE_MANIFEST.to_string(),
            artifact_type: ARTIFACT_TYPE.to_string(),
            config,
            layers,
            annotations,
        }
    }

    /// Parses a manifest pulled from a registry, refusing anything but a podsnap checkpoint.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let manifest: Self = serde_json::from_slice(bytes).map_err(|e| {
            Error::NotACheckpoint(format!("the image manifest does not parse: {e}"))
        })?;
        let config_type = manifest.config.media_type.as_str();
        if manifest.schema_version != 2
            || manifest.media_type != IMAGE_MANIFEST
            || manifest.artifact_type != ARTIFACT_TYPE
            || config_type
                .strip_suffix(crypt::SUFFIX)
                .unwrap_or(config_type)
                != CONFIG
        {
            return Err(Error::NotACheckpoint(format!(
                "artifact type {:?}, config {:?}",
                manifest.artifact_type, manifest.config.media_type
            )));
        }
        // Digests go into blob URLs and sizes into sums: both are checked before any is used.
        let mut total: u64 = 0;
        for descriptor in std::iter::once(&manifest.config).chain(&manifest.layers) {
            let hex = descriptor.digest.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64
                || !hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(Error::NotACheckpoint(format!(
                    "descriptor digest {:?} is not sha256:<64 lowercase hex digits>",
                    descriptor.digest
                )));
            }
            total = total
                .checked_add(descriptor.size)
                .ok_or_else(|| Error::NotACheckpoint("the blobs' sizes add up past 2^64".into()))?;
        }
        // All sealed or none: a plain layer in an encrypted image would be taken unopened.
        let sealed = manifest.encrypted();
        if let Some(odd) = manifest
            .layers
            .iter()
            .find(|l| l.media_type.ends_with(crypt::SUFFIX) != sealed)
        {
            return Err(Error::NotACheckpoint(format!(
                "layer {} is {}encrypted in an image whose config is {}",
                odd.digest,
                if sealed { "not " } else { "" },
                if sealed { "encrypted" } else { "not" }
            )));
        }
        if manifest.config.size > MAX_CONFIG {
            return Err(Error::NotACheckpoint(format!(
                "a config of {} bytes, more than {MAX_CONFIG}",
                manifest.config.size
            )));
        }
        Ok(manifest)
    }

    /// Whether its blobs are sealed ([`crypt`]): its config's media type says so.
    pub fn encrypted(&self) -> bool {
        self.config.media_type.ends_with(crypt::SUFFIX)
    }

    /// The total size of the image's blobs (config and layers); [`ImageManifest::parse`] has
    /// checked that it fits.
    pub fn size(&self) -> u64 {
        std::iter::once(&self.config)
            .chain(&self.layers)
            .fold(0u64, |sum, d| sum.saturating_add(d.size))
    }
}

/// One layer to be written: what it holds, from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub media_type: &'static str,
    /// A container name, or `_volumes/<volume>.tar`.
    pub path: String,
    /// Relative path in the checkpoint → the file and its digest in the verified manifest.
    pub files: BTreeMap<String, (PathBuf, String)>,
}

/// The layers of the checkpoint at `root`: one per container directory, one per volume
/// archive. Returns its manifest with them. The manifest and the file list are checked here
/// ([`format::verify_listing`]); every file's digest is checked by [`write_layer`] as it packs
/// it, so a checkpoint is read once.
pub fn plan(root: &Path) -> Result<(Manifest, Vec<Layer>)> {
    let (manifest, _) = format::verify_listing(root)?;
    let mut layers: BTreeMap<String, Layer> = BTreeMap::new();
    for (relative, sha256) in &manifest.files {
        let clean = format::contained(relative)?;
        let first = clean
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().to_string())
            .unwrap_or_default();
        let (media_type, path) = if first == VOLUMES_DIR {
            (VOLUME_LAYER, relative.clone())
        } else if manifest.containers.iter().any(|c| c.name == first)
            && clean.components().count() > 1
        {
            (CONTAINER_LAYER, first)
        } else {
            return Err(Error::NotACheckpoint(format!(
                "{relative} is neither in a container's directory nor a volume archive"
            )));
        };
        layers
            .entry(path.clone())
            .or_insert_with(|| Layer {
                media_type,
                path,
                files: BTreeMap::new(),
            })
            .files
            .insert(relative.clone(), (root.join(&clean), sha256.clone()));
    }
    Ok((manifest, layers.into_values().collect()))
}

/// The compressor and its version: packing is deterministic for one.
pub fn codec() -> String {
    format!("zstd {}", zstd::zstd_safe::version_number())
}

/// The config blob of the checkpoint at `root` (its manifest's bytes) and its descriptor.
pub fn config(root: &Path) -> Result<(Vec<u8>, Descriptor)> {
    let path = root.join(MANIFEST);
    let bytes = fs::read(&path).map_err(io_err(format!("reading {}", path.display())))?;
    let descriptor = Descriptor {
        media_type: CONFIG.to_string(),
        digest: format!("sha256:{}", hex(&Sha256::digest(&bytes))),
        size: bytes.len() as u64,
        annotations: BTreeMap::new(),
    };
    Ok((bytes, descriptor))
}

/// The config sealed to `recipients`: its bytes and descriptor (media type `…+age`).
pub fn seal_config(plain: &[u8], recipients: &Recipients) -> Result<(Vec<u8>, Descriptor)> {
    let bytes = recipients.seal(plain)?;
    let descriptor = Descriptor {
        media_type: format!("{CONFIG}{}", crypt::SUFFIX),
        digest: format!("sha256:{}", hex(&Sha256::digest(&bytes))),
        size: bytes.len() as u64,
        annotations: BTreeMap::new(),
    };
    Ok((bytes, descriptor))
}

/// Writes `layer` to `out` as deterministic tar+zstd at `level`; returns its descriptor. Each
/// file is hashed as it is read: one that no longer has its manifest's size and digest fails
/// the layer ([`Error::Changed`]), so a checkpoint never leaves other than it verified.
///
/// With `recipients`, the compressed stream is sealed to them as it is written (media type
/// `…+age`): not deterministic then (each age file has its own key), and the digest is the
/// ciphertext's.
pub fn write_layer(
    layer: &Layer,
    out: impl Write,
    level: i32,
    recipients: Option<&Recipients>,
) -> Result<Descriptor> {
    let context = || format!("packing layer {}", layer.path);
    let hashing = Hashing::new(out);
    let sealing = match recipients {
        Some(r) => crypt::Sealing::Age(r.sealing(hashing)?),
        None => crypt::Sealing::Plain(hashing),
    };
    let mut encoder = zstd::stream::Encoder::new(sealing, level).map_err(io_err(context()))?;
    encoder.window_log(WINDOW_LOG).map_err(io_err(context()))?;
    let mut builder = tar::Builder::new(encoder);
    builder.mode(tar::HeaderMode::Deterministic);
    for (relative, (path, expected)) in &layer.files {
        let algorithm = format::digest::Algorithm::of(expected).ok_or_else(|| Error::Changed {
            path: relative.clone(),
            reason: format!("its manifest digest {expected:?} is neither sha256 nor blake3"),
        })?;
        let file = fs::File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
        let size = file
            .metadata()
            .map_err(io_err(format!("reading {}", path.display())))?
            .len();
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(size);
        header.set_mode(0o600);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        // append_data sets the path (long names through GNU extensions) and the checksum.
        // Read in large pieces: page images are hundreds of MiB.
        let mut reading = format::digest::Reading::new(
            io::BufReader::with_capacity(1 << 20, file.take(size)),
            algorithm,
        );
        builder
            .append_data(&mut header, relative, &mut reading)
            .map_err(io_err(format!("packing {}", path.display())))?;
        let (actual, read) = reading.finish();
        if read != size {
            return Err(Error::Changed {
                path: relative.clone(),
                reason: format!("{read} of its {size} bytes could be read"),
            });
        }
        if &actual != expected {
            return Err(Error::Changed {
                path: relative.clone(),
                reason: format!("it has {actual}, the manifest {expected}"),
            });
        }
    }
    let encoder = builder.into_inner().map_err(io_err(context()))?;
    let sealing = encoder.finish().map_err(io_err(context()))?;
    let hashing = sealing.finish().map_err(io_err(context()))?;
    let (digest, size, mut out) = hashing.finish();
    out.flush().map_err(io_err(context()))?;
    let suffix = if recipients.is_some() {
        crypt::SUFFIX
    } else {
        ""
    };
    Ok(Descriptor {
        media_type: format!("{}{suffix}", layer.media_type),
        digest,
        size,
        annotations: BTreeMap::from([(PATH_ANNOTATION.to_string(), layer.path.clone())]),
    })
}

/// Unpacks a checkpoint image into `target` (which must not exist): the config from `config`
/// (the blob the image's config descriptor names; at most [`MAX_CONFIG`] bytes are read), then
/// each layer from its reader, in the image's order, into a staging directory of its own beside
/// `target` (0700) that becomes `target` only once the whole checkpoint verifies, and never
/// replaces anything there. At most `max_bytes` of files are written. On any error the staging
/// directory is removed and `target` is not created. An encrypted image is opened with
/// `identities` (none of them opening it is an error before anything is unpacked).
///
/// Returns the checkpoint's manifest and its file's sha256 (`sha256:<hex>`; the config's
/// digest when the image is not encrypted): what a restore pins.
pub fn unpack<R: Read>(
    image: &ImageManifest,
    config: impl Read,
    layers: impl IntoIterator<Item = R>,
    target: &Path,
    max_bytes: u64,
    identities: &Identities,
) -> Result<(Manifest, String)> {
    if target.symlink_metadata().is_ok() {
        return Err(Error::Exists(target.to_path_buf()));
    }
    let name = target
        .file_name()
        .ok_or_else(|| Error::Io {
            context: format!("unpacking into {}", target.display()),
            source: io::Error::new(io::ErrorKind::InvalidInput, "the target has no name"),
        })?
        .to_string_lossy();
    // Its own name: two pulls of one checkpoint never share a staging directory. A pull killed
    // half-way leaves `.<name>.partial-*`, for the checkpoint cache's collector.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let staging = target.with_file_name(format!(".{name}.partial-{}-{nanos}", std::process::id()));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(io_err(format!("creating {}", staging.display())))?;
    let result = unpack_into(image, config, layers, &staging, max_bytes, identities)
        .and_then(|manifest| rename_new(&staging, target).map(|()| manifest));
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

/// Renames `from` to `to` unless `to` exists (renameat2 RENAME_NOREPLACE), then makes the
/// rename durable.
pub fn rename_new(from: &Path, to: &Path) -> Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let context = || format!("renaming {} to {}", from.display(), to.display());
    let c_path = |p: &Path| {
        CString::new(p.as_os_str().as_bytes()).map_err(|e| Error::Io {
            context: context(),
            source: io::Error::new(io::ErrorKind::InvalidInput, e),
        })
    };
    let (from_c, to_c) = (c_path(from)?, c_path(to)?);
    // SAFETY: two valid NUL-terminated paths that outlive the call; renameat2 keeps no pointer.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::AlreadyExists {
            return Err(Error::Exists(to.to_path_buf()));
        }
        return Err(Error::Io {
            context: context(),
            source: err,
        });
    }
    if let Some(parent) = to.parent() {
        fs::File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(io_err(format!("syncing {}", parent.display())))?;
    }
    Ok(())
}

fn unpack_into<R: Read>(
    image: &ImageManifest,
    config: impl Read,
    layers: impl IntoIterator<Item = R>,
    staging: &Path,
    max_bytes: u64,
    identities: &Identities,
) -> Result<(Manifest, String)> {
    // The config first: it lists every file the layers may hold.
    if image.config.size > MAX_CONFIG {
        return Err(Error::NotACheckpoint(format!(
            "a config of {} bytes",
            image.config.size
        )));
    }
    let mut config_bytes = Vec::new();
    config
        .take(image.config.size + 1)
        .read_to_end(&mut config_bytes)
        .map_err(io_err("reading the config"))?;
    check_blob(
        "config",
        &image.config,
        &hex(&Sha256::digest(&config_bytes)),
        config_bytes.len() as u64,
    )?;
    // Sealed: the blob was the descriptor's; its plaintext is what the checkpoint lists.
    let config_bytes = if image.encrypted() {
        identities.open(&config_bytes, MAX_CONFIG)?
    } else {
        config_bytes
    };
    let listed: Manifest = serde_json::from_slice(&config_bytes)
        .map_err(|e| Error::NotACheckpoint(format!("the config is not a podsnap manifest: {e}")))?;
    write_new(&staging.join(MANIFEST), &mut &config_bytes[..], u64::MAX)?;
    let mut unpacking = Unpacking {
        identities,
        listed: &listed,
        staging,
        seen: HashSet::new(),
        budget: max_bytes,
        max_bytes,
    };
    let mut readers = layers.into_iter();
    for descriptor in &image.layers {
        let reader = readers.next().ok_or_else(|| {
            Error::NotACheckpoint(format!("no data for layer {}", descriptor.digest))
        })?;
        unpacking.layer(descriptor, reader)?;
    }
    let missing: Vec<String> = listed
        .files
        .keys()
        .filter(|f| !unpacking.seen.contains(*f))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(Error::Incomplete(missing));
    }
    // Every file against the manifest's sha256, and the manifest against the pinned config.
    let (manifest, digest) = format::verify_with_digest(staging)?;
    let written = hex(&Sha256::digest(&config_bytes));
    if digest != written {
        return Err(Error::Changed {
            path: MANIFEST.to_string(),
            reason: format!("it has sha256 {digest} on disk, {written} as unpacked"),
        });
    }
    Ok((manifest, format!("sha256:{digest}")))
}

/// The state of one [`unpack`]: what the config lists, what was written, the budget left.
struct Unpacking<'a> {
    identities: &'a Identities,
    listed: &'a Manifest,
    staging: &'a Path,
    seen: HashSet<String>,
    budget: u64,
    max_bytes: u64,
}

impl Unpacking<'_> {
    /// Unpacks one layer. A layer that fails to decode is also hashed to its end, so that a
    /// changed blob is reported as one ([`Error::Digest`]) rather than as the garbage it is.
    fn layer(&mut self, descriptor: &Descriptor, input: impl Read) -> Result<()> {
        let path = descriptor
            .annotations
            .get(PATH_ANNOTATION)
            .cloned()
            .unwrap_or_default();
        // One byte more than the descriptor says is enough to tell a longer blob.
        let mut hashing = Hashing::new(input.take(descriptor.size.saturating_add(1)));
        let entries = self.entries(descriptor, &path, &mut hashing);
        let drained = io::copy(&mut hashing, &mut io::sink());
        let (digest, size, _) = hashing.finish();
        let blob = check_blob(
            &path,
            descriptor,
            digest.trim_start_matches("sha256:"),
            size,
        );
        match (entries, blob) {
            (_, Err(digest)) => Err(digest),
            (Err(e), Ok(())) => Err(e),
            (Ok(()), Ok(())) => drained.map(|_| ()).map_err(io_err(format!("layer {path}"))),
        }
    }

    fn entries(&mut self, descriptor: &Descriptor, path: &str, input: impl Read) -> Result<()> {
        let bad = |reason: String| Error::BadEntry {
            layer: if path.is_empty() {
                descriptor.digest.clone()
            } else {
                path.to_string()
            },
            reason,
        };
        let media_type = descriptor.media_type.as_str();
        let sealed = media_type.ends_with(crypt::SUFFIX);
        let volume = match media_type.strip_suffix(crypt::SUFFIX).unwrap_or(media_type) {
            CONTAINER_LAYER => false,
            VOLUME_LAYER => true,
            other => {
                return Err(bad(format!(
                    "media type {other:?} is not a podsnap checkpoint layer"
                )));
            }
        };
        let names_a_part = if volume {
            path.strip_prefix(VOLUMES_DIR)
                .and_then(|rest| rest.strip_prefix('/'))
                .is_some_and(|file| !file.is_empty() && !file.contains('/'))
        } else {
            self.listed.containers.iter().any(|c| c.name == path)
        };
        if !names_a_part {
            return Err(bad(format!(
                "path annotation {path:?} names no container or volume archive of the checkpoint"
            )));
        }
        let context = || format!("layer {path}");
        let input = if sealed {
            crypt::Opening::Age(Box::new(self.identities.opening(input)?))
        } else {
            crypt::Opening::Plain(input)
        };
        let mut decoder = zstd::stream::read::Decoder::new(input).map_err(io_err(context()))?;
        decoder
            .window_log_max(WINDOW_LOG)
            .map_err(io_err(context()))?;
        // The most this layer may decompress to: the files it may hold within the budget, and
        // the tar's own headers. tar reads long names and PAX records into memory before they
        // can be checked: this bounds them too, and a zstd bomb ends here.
        let names: u64 = self.listed.files.keys().map(|k| k.len() as u64).sum();
        let cap = self
            .budget
            .saturating_add(TAR_OVERHEAD_PER_FILE.saturating_mul(self.listed.files.len() as u64))
            .saturating_add(names)
            .saturating_add(TAR_OVERHEAD);
        let mut archive = tar::Archive::new(decoder.take(cap));
        for entry in archive.entries().map_err(io_err(context()))? {
            let mut entry = entry.map_err(io_err(context()))?;
            let name = String::from_utf8(entry.path_bytes().into_owned())
                .map_err(|_| bad("a path that is not UTF-8".to_string()))?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                return Err(bad(format!(
                    "{name:?} is a {:?}, not a regular file",
                    entry.header().entry_type()
                )));
            }
            let clean = format::contained(&name)
                .map_err(|_| bad(format!("{name:?} leaves the checkpoint")))?;
            if clean.to_str() != Some(name.as_str()) {
                return Err(bad(format!(
                    "{name:?} is not a plain path (empty or `.` parts)"
                )));
            }
            let inside = if volume {
                name == path
            } else {
                name.strip_prefix(path)
                    .is_some_and(|rest| rest.starts_with('/'))
            };
            if !inside {
                return Err(bad(format!("{name:?} is outside the layer's path")));
            }
            if !self.listed.files.contains_key(&name) {
                return Err(bad(format!("{name:?} is not in the checkpoint's manifest")));
            }
            if !self.seen.insert(name.clone()) {
                return Err(bad(format!("{name:?} comes twice")));
            }
            let size = entry.size();
            if size > self.budget {
                return Err(Error::TooLarge {
                    layer: path.to_string(),
                    max_bytes: self.max_bytes,
                });
            }
            self.budget -= size;
            write_new(&self.staging.join(&clean), &mut entry, size)?;
        }
        Ok(())
    }
}

fn check_blob(
    what: &str,
    descriptor: &Descriptor,
    actual_hex: &str,
    actual_size: u64,
) -> Result<()> {
    let actual = format!("sha256:{actual_hex}");
    if descriptor.digest != actual || descriptor.size != actual_size {
        return Err(Error::Digest {
            what: what.to_string(),
            expected: descriptor.digest.clone(),
            expected_size: descriptor.size,
            actual,
            actual_size,
        });
    }
    Ok(())
}

/// Creates `path` (0600, parents 0700) and copies exactly `size` bytes into it (at most, for
/// `u64::MAX`, everything).
fn write_new(path: &Path, input: &mut impl Read, size: u64) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io_err(format!("creating {}", parent.display())))?;
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(format!("creating {}", path.display())))?;
    let copied = io::copy(&mut input.take(size), &mut file)
        .map_err(io_err(format!("writing {}", path.display())))?;
    if size != u64::MAX && copied != size {
        return Err(Error::Io {
            context: format!("writing {}", path.display()),
            source: io::Error::new(io::ErrorKind::UnexpectedEof, "the layer ended early"),
        });
    }
    file.sync_all()
        .map_err(io_err(format!("syncing {}", path.display())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A writer or a reader that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W> Hashing<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    /// `sha256:<hex>`, the byte count, and the inner writer or reader.
    fn finish(self) -> (String, u64, W) {
        (
            format!("sha256:{}", hex(&self.hasher.finalize())),
            self.size,
            self.inner,
        )
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests;

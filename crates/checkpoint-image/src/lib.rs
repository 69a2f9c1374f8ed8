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
//! [`plan`] and [`write_layer`] pack a verified checkpoint directory; packing the same
//! checkpoint twice gives the same digests, so a registry that has a blob is not sent it again.
//! [`unpack`] is the only way back: it trusts nothing in the blobs. Every blob's sha256 and size
//! must be the descriptor's; the config must be a podsnap manifest; a layer may hold only
//! regular files, each listed in that manifest, under the layer's own path, once, within a
//! byte budget; the result is [`podsnap_checkpoint_format::verify`]ed (every file's sha256)
//! before it is renamed into place. Any failure removes what was unpacked.
//!
//! This crate does no network I/O: readers and writers come from the caller (a registry
//! client streams blobs through them).

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use podsnap_checkpoint_format::{self as format, MANIFEST, Manifest, VOLUMES_DIR};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
/// zstd level of the layers. Measured with issue 12's benchmark before it is tuned.
pub const DEFAULT_LEVEL: i32 = 3;
/// Largest config accepted.
const MAX_CONFIG: u64 = 16 << 20;

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
        "blob {what} has sha256 {actual} and {actual_size} bytes; its descriptor says {expected} and {expected_size}"
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
    #[error("the image unpacks to more than {0} bytes: refused")]
    TooLarge(u64),
    #[error("the image has no layer for checkpoint files {0:?}")]
    Incomplete(Vec<String>),
    #[error("{0} exists: a checkpoint is never unpacked over another")]
    Exists(PathBuf),
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
        let annotations = BTreeMap::from([
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
        if manifest.schema_version != 2
            || manifest.media_type != IMAGE_MANIFEST
            || manifest.artifact_type != ARTIFACT_TYPE
            || manifest.config.media_type != CONFIG
        {
            return Err(Error::NotACheckpoint(format!(
                "artifact type {:?}, config {:?}",
                manifest.artifact_type, manifest.config.media_type
            )));
        }
        Ok(manifest)
    }
}

/// One layer to be written: what it holds, from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    pub media_type: &'static str,
    /// A container name, or `_volumes/<volume>.tar`.
    pub path: String,
    /// Relative path in the checkpoint → file, sorted.
    pub files: BTreeMap<String, PathBuf>,
}

/// The layers of the checkpoint at `root`, which must verify: one per container directory,
/// one per volume archive. Returns the verified manifest with them.
pub fn plan(root: &Path) -> Result<(Manifest, Vec<Layer>)> {
    let manifest = format::verify(root)?;
    let mut layers: BTreeMap<String, Layer> = BTreeMap::new();
    for relative in manifest.files.keys() {
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
            .insert(relative.clone(), root.join(&clean));
    }
    Ok((manifest, layers.into_values().collect()))
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

/// Writes `layer` to `out` as deterministic tar+zstd at `level`; returns its descriptor.
pub fn write_layer(layer: &Layer, out: impl Write, level: i32) -> Result<Descriptor> {
    let context = || format!("packing layer {}", layer.path);
    let hashing = Hashing::new(out);
    let encoder = zstd::stream::Encoder::new(hashing, level).map_err(io_err(context()))?;
    let mut builder = tar::Builder::new(encoder);
    builder.mode(tar::HeaderMode::Deterministic);
    for (relative, path) in &layer.files {
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
        builder
            .append_data(&mut header, relative, file.take(size))
            .map_err(io_err(context()))?;
    }
    let encoder = builder.into_inner().map_err(io_err(context()))?;
    let hashing = encoder.finish().map_err(io_err(context()))?;
    let (digest, size, mut out) = hashing.finish();
    out.flush().map_err(io_err(context()))?;
    Ok(Descriptor {
        media_type: layer.media_type.to_string(),
        digest,
        size,
        annotations: BTreeMap::from([(PATH_ANNOTATION.to_string(), layer.path.clone())]),
    })
}

/// Unpacks a checkpoint image into `target` (which must not exist): the config `config` (the
/// bytes the image's config descriptor names), then each layer from its reader, in the
/// image's order, into a staging directory beside `target` (0700) that becomes `target` only
/// once the whole checkpoint verifies. At most `max_bytes` of files are written. On any
/// error the staging directory is removed and `target` is not created.
pub fn unpack<R: Read>(
    image: &ImageManifest,
    config: &[u8],
    layers: impl IntoIterator<Item = R>,
    target: &Path,
    max_bytes: u64,
) -> Result<Manifest> {
    if target.exists() {
        return Err(Error::Exists(target.to_path_buf()));
    }
    let name = target
        .file_name()
        .ok_or_else(|| Error::Io {
            context: format!("unpacking into {}", target.display()),
            source: io::Error::new(io::ErrorKind::InvalidInput, "the target has no name"),
        })?
        .to_string_lossy();
    let staging = target.with_file_name(format!(".{name}.partial"));
    if staging.exists() {
        // A pull killed half-way: its leftovers are ours, by name.
        fs::remove_dir_all(&staging).map_err(io_err(format!("removing {}", staging.display())))?;
    }
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(io_err(format!("creating {}", staging.display())))?;
    let result = unpack_into(image, config, layers, &staging, max_bytes).and_then(|manifest| {
        fs::rename(&staging, target).map_err(io_err(format!(
            "renaming {} to {}",
            staging.display(),
            target.display()
        )))?;
        Ok(manifest)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

fn unpack_into<R: Read>(
    image: &ImageManifest,
    config: &[u8],
    layers: impl IntoIterator<Item = R>,
    staging: &Path,
    max_bytes: u64,
) -> Result<Manifest> {
    // The config first: it lists every file the layers may hold.
    if image.config.size > MAX_CONFIG {
        return Err(Error::NotACheckpoint(format!(
            "a config of {} bytes",
            image.config.size
        )));
    }
    check_blob(
        "config",
        &image.config,
        &hex(&Sha256::digest(config)),
        config.len() as u64,
    )?;
    let listed: Manifest = serde_json::from_slice(config)
        .map_err(|e| Error::NotACheckpoint(format!("the config is not a podsnap manifest: {e}")))?;
    write_new(&staging.join(MANIFEST), &mut &config[..], u64::MAX)?;
    let mut seen = HashSet::new();
    let mut budget = max_bytes;
    let mut readers = layers.into_iter();
    for descriptor in &image.layers {
        let reader = readers.next().ok_or_else(|| {
            Error::NotACheckpoint(format!("no data for layer {}", descriptor.digest))
        })?;
        unpack_layer(descriptor, reader, &listed, staging, &mut seen, &mut budget)?;
    }
    let missing: Vec<String> = listed
        .files
        .keys()
        .filter(|f| !seen.contains(*f))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(Error::Incomplete(missing));
    }
    let (manifest, digest) = format::verify_with_digest(staging)?;
    check_blob("config", &image.config, &digest, config.len() as u64)?;
    Ok(manifest)
}

fn unpack_layer(
    descriptor: &Descriptor,
    input: impl Read,
    listed: &Manifest,
    staging: &Path,
    seen: &mut HashSet<String>,
    budget: &mut u64,
) -> Result<()> {
    let path = descriptor
        .annotations
        .get(PATH_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    let bad = |reason: String| Error::BadEntry {
        layer: if path.is_empty() {
            descriptor.digest.clone()
        } else {
            path.clone()
        },
        reason,
    };
    let volume = match descriptor.media_type.as_str() {
        CONTAINER_LAYER => false,
        VOLUME_LAYER => true,
        other => {
            return Err(bad(format!(
                "media type {other:?} is not a podsnap checkpoint layer"
            )));
        }
    };
    format::contained(&path).map_err(|_| bad(format!("path annotation {path:?}")))?;
    // One byte more than the descriptor says is enough to tell a longer blob.
    let mut hashing = Hashing::new(input.take(descriptor.size.saturating_add(1)));
    {
        let decoder = zstd::stream::read::Decoder::new(&mut hashing)
            .map_err(io_err(format!("layer {path}")))?;
        let mut archive = tar::Archive::new(decoder);
        for entry in archive.entries().map_err(io_err(format!("layer {path}")))? {
            let mut entry = entry.map_err(io_err(format!("layer {path}")))?;
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
            let inside = if volume {
                name == path
            } else {
                clean.components().next().map(|c| c.as_os_str()) == Some(path.as_ref())
                    && clean.components().count() > 1
            };
            if !inside {
                return Err(bad(format!("{name:?} is outside the layer's path")));
            }
            if !listed.files.contains_key(&name) {
                return Err(bad(format!("{name:?} is not in the checkpoint's manifest")));
            }
            if !seen.insert(name.clone()) {
                return Err(bad(format!("{name:?} comes twice")));
            }
            let size = entry.size();
            if size > *budget {
                return Err(Error::TooLarge(*budget));
            }
            *budget -= size;
            write_new(&staging.join(&clean), &mut entry, size)?;
        }
        // The tar's end: whatever follows in the stream is hashed too.
    }
    io::copy(&mut hashing, &mut io::sink()).map_err(io_err(format!("layer {path}")))?;
    let (digest, size, _) = hashing.finish();
    check_blob(
        &path,
        descriptor,
        digest.trim_start_matches("sha256:"),
        size,
    )
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

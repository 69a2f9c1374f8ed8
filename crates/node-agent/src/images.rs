//! The node agent's registry side: pushing a checkpoint taken on this node whose PodCheckpoint
//! asks for storage type `Image`, and pulling a checkpoint image for a pod bound to this node
//! (annotated `checkpoint.k8s.io/restore-image`) into the kubelet's checkpoint directory.
//!
//! The chain of trust, end to end: podsnapd pins each checkpoint's manifest when it writes it
//! ([`pins`]); a push refuses a checkpoint whose manifest is not the pinned one, and sends it
//! with the kubelet's record as an annotation of the image manifest; the PodCheckpoint's status
//! names the image by digest; a pull verifies every blob against that digest, and pins what it
//! unpacked to the config digest it named, so podsnapd's restore refuses anything changed on
//! disk since.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use podsnap_checkpoint_api::KUBELET_RECORD_ANNOTATION;
use podsnap_checkpoint_format::pins;
use podsnap_checkpoint_image::{Identities, Recipients};
use podsnap_checkpoint_registry::{Access, PushOptions, Pushed, Registry, reference};

/// How the agent reaches registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    /// Registries (`host:port`) spoken to over plain HTTP.
    pub insecure: Vec<String>,
    /// A Docker config file (a `kubernetes.io/dockerconfigjson` Secret's payload) with
    /// credentials, per registry; anonymous where it has none, or when the file does not exist
    /// (an optional Secret not created).
    pub auth_file: Option<PathBuf>,
    /// PEM certificates of authorities trusted for HTTPS registries besides the system's (a
    /// ConfigMap's `ca.crt`); read for each client, none when it does not exist.
    pub ca_file: Option<PathBuf>,
    /// An age identity file with the keys that open encrypted checkpoint images; read at each
    /// pull (a Secret mounted later, or updated, is seen), none when it does not exist.
    pub identity_file: Option<PathBuf>,
}

impl RegistryConfig {
    /// A client for `registry` (host[:port]), with the credentials `copied` (a PodCheckpoint's,
    /// as the controller copied them) has for it, else those of the auth file, if any.
    pub fn client(&self, registry: &str, copied: Option<&[u8]>) -> Result<Registry, String> {
        let credentials = match (copied, &self.auth_file) {
            (Some(config), _) => podsnap_checkpoint_image::auth::credentials(config, registry)
                .map_err(|e| format!("the PodCheckpoint's registry credentials: {e}"))?,
            (None, Some(path)) => match std::fs::read(path) {
                Ok(bytes) => podsnap_checkpoint_image::auth::credentials(&bytes, registry)
                    .map_err(|e| format!("auth file {}: {e}", path.display()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(format!("reading the auth file {}: {e}", path.display())),
            },
            (None, None) => None,
        };
        let ca_certificates = match &self.ca_file {
            Some(path) => match std::fs::read(path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(format!("reading the CA file {}: {e}", path.display())),
            },
            None => Vec::new(),
        };
        Registry::new(&Access {
            insecure: self.insecure.clone(),
            credentials,
            retry: Default::default(),
            ca_certificates,
        })
        .map_err(|e| e.to_string())
    }

    /// The keys that open encrypted images here.
    fn identities(&self) -> Result<Identities, String> {
        match &self.identity_file {
            Some(path) => Identities::read(path).map_err(|e| e.to_string()),
            None => Ok(Identities::none()),
        }
    }
}

/// The kubelet's record beside a checkpoint directory.
pub fn record_path(checkpoint: &Path) -> PathBuf {
    let mut path = checkpoint.as_os_str().to_owned();
    path.push(crate::RECORD_SUFFIX);
    PathBuf::from(path)
}

/// The largest kubelet record read.
const MAX_RECORD: u64 = 1 << 20;

/// Checks that `name` is a checkpoint's name as the kubelet gives it (`checkpoint-…`, one path
/// component, not a record), and returns its directory under `dir`.
pub fn checkpoint_in(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let ok = name.starts_with("checkpoint-")
        && !name.contains('/')
        && !name.contains('\0')
        && !name.ends_with(crate::RECORD_SUFFIX)
        && !name.ends_with(PULLED_SUFFIX)
        && name.len() <= 255;
    if !ok {
        return Err(format!("{name:?} is not a pod checkpoint name"));
    }
    Ok(dir.join(name))
}

/// Pushes the checkpoint at `checkpoint` (in the kubelet's directory, taken by this node's
/// podsnapd) to `repository`, tagged `tag`. The manifest must be the one podsnapd pinned; the
/// kubelet's record goes along as an annotation. With `recipients`, the image (and the record)
/// is sealed to them.
pub async fn push(
    config: &RegistryConfig,
    pins_dir: &Path,
    checkpoint: &Path,
    repository: &str,
    tag: &str,
    recipients: Option<&[String]>,
    credentials: Option<&[u8]>,
) -> Result<Pushed, String> {
    let recipients = recipients
        .map(|keys| {
            Recipients::parse(keys).map_err(|e| format!("spec.storage.image.encryption: {e}"))
        })
        .transpose()?;
    let at = |e: String| format!("checkpoint {}: {e}", checkpoint.display());
    let digest =
        podsnap_checkpoint_format::manifest_sha256(checkpoint).map_err(|e| at(e.to_string()))?;
    match pins::lookup(pins_dir, checkpoint).map_err(|e| at(format!("its pin: {e}")))? {
        pins::Pin::Pinned(pinned) if pinned == digest => {}
        pins::Pin::Pinned(pinned) => {
            return Err(at(format!(
                "its manifest has sha256 {digest}, {pinned} when podsnapd wrote it: it was changed, and is not pushed"
            )));
        }
        pins::Pin::Unknown => {
            return Err(at(format!(
                "podsnapd has no pin of it in {}: only checkpoints this node's podsnapd took are pushed",
                pins_dir.display()
            )));
        }
    }
    let mut record = read_record(&record_path(checkpoint)).map_err(at)?;
    // The record is the pod's spec: sealed too, it is not in the clear in the registry.
    if let Some(recipients) = &recipients {
        record = recipients
            .seal_text(&record)
            .map_err(|e| at(e.to_string()))?;
    }
    let target = reference(&format!("{repository}:{tag}")).map_err(|e| e.to_string())?;
    let registry = config.client(target.resolve_registry(), credentials)?;
    let options = PushOptions {
        annotations: BTreeMap::from([(KUBELET_RECORD_ANNOTATION.to_string(), record)]),
        recipients,
        ..Default::default()
    };
    registry
        .push(checkpoint, &target, &options)
        .await
        .map_err(|e| format!("pushing {} to {repository}: {e}", checkpoint.display()))
}

/// Reads a kubelet record: a regular file (no link) of at most [`MAX_RECORD`] bytes holding a
/// JSON object.
fn read_record(path: &Path) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| format!("the kubelet's record {}: {e}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_RECORD + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("the kubelet's record {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_RECORD {
        return Err(format!(
            "the kubelet's record {} is larger than {MAX_RECORD} bytes",
            path.display()
        ));
    }
    check_record(&text).map_err(|e| format!("the kubelet's record {}: {e}", path.display()))?;
    Ok(text)
}

/// What a record must hold to be written beside a pulled checkpoint: a JSON object naming a
/// namespace; the kubelet checks the rest against the pod it restores.
fn check_record(text: &str) -> Result<serde_json::Value, String> {
    let record: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    if record["namespace"].as_str().is_none_or(str::is_empty) {
        return Err("it names no namespace".into());
    }
    Ok(record)
}

/// The marker beside a checkpoint this agent pulled (`<checkpoint>.pulled`): the image's digest.
/// Only checkpoints with one are garbage-collected by the agent; the kubelet's own stay with
/// their PodCheckpoints.
pub const PULLED_SUFFIX: &str = ".pulled";

fn pulled_marker(checkpoint: &Path) -> PathBuf {
    let mut path = checkpoint.as_os_str().to_owned();
    path.push(PULLED_SUFFIX);
    PathBuf::from(path)
}

/// What a pull did.
#[derive(Debug, PartialEq, Eq)]
pub enum PullOutcome {
    /// The checkpoint was pulled, verified, recorded and pinned.
    Pulled { size: u64 },
    /// It was here already: pulled before (same image), or taken on this node.
    Present,
}

/// Pulls checkpoint image `image` (by digest) into `<dir>/<name>` for a pod in `namespace`, as
/// the checkpoint of PodCheckpoint `uid` (the record in the image must say so): it is
/// unpacked beside (every blob verified against the digest), then the kubelet's record from the
/// image's annotation, the pulled marker and the pin (to the config digest the image named) are
/// written, and only then is the checkpoint renamed into place, never over anything. A failure
/// removes what this pull wrote and nothing else; an agent stopped half-way leaves a marker,
/// which the collection of pulled checkpoints ([`remove_pulled`], [`stale_pulls`]) clears.
#[allow(clippy::too_many_arguments)]
pub async fn pull(
    config: &RegistryConfig,
    pins_dir: &Path,
    dir: &Path,
    name: &str,
    image: &str,
    namespace: &str,
    uid: &str,
    max_bytes: u64,
    credentials: Option<&[u8]>,
) -> Result<PullOutcome, String> {
    let checkpoint = checkpoint_in(dir, name)?;
    let source = reference(image).map_err(|e| e.to_string())?;
    let Some(digest) = source.digest().map(str::to_string) else {
        return Err(format!(
            "{image} names no digest: a checkpoint image is restored by digest only"
        ));
    };
    let marker = pulled_marker(&checkpoint);
    let record_file = record_path(&checkpoint);
    if std::fs::symlink_metadata(&checkpoint).is_ok() {
        return match std::fs::read_to_string(&marker) {
            Ok(pulled) if pulled.trim() == digest => Ok(PullOutcome::Present),
            Ok(pulled) => Err(format!(
                "{} was pulled from another image ({}), not {digest}",
                checkpoint.display(),
                pulled.trim()
            )),
            // Taken here: the kubelet's own, which the restore uses as it is.
            Err(_) => Ok(PullOutcome::Present),
        };
    }
    if std::fs::symlink_metadata(&marker).is_ok() {
        // A pull that did not finish (the agent stopped before the rename): its files go.
        remove_pulled(dir, name)?;
    } else if std::fs::symlink_metadata(&record_file).is_ok() {
        return Err(format!(
            "{} has a kubelet record but no checkpoint: the kubelet is writing one of that name here",
            checkpoint.display()
        ));
    }
    let registry = config.client(source.resolve_registry(), credentials)?;
    let identities = std::sync::Arc::new(config.identities()?);
    let staging = dir.join(format!(".pull-{name}"));
    if std::fs::symlink_metadata(&staging).is_ok() {
        std::fs::remove_dir_all(&staging)
            .map_err(|e| format!("removing the stale {}: {e}", staging.display()))?;
    }
    let pulled = registry
        .pull(&source, &staging, max_bytes, &identities)
        .await
        .map_err(|e| format!("pulling {image}: {e}"))?;
    // What this pull wrote, removed again should it fail.
    let mut written: Vec<PathBuf> = Vec::new();
    let mut finish = || -> Result<u64, String> {
        let record = pulled
            .annotations
            .get(KUBELET_RECORD_ANNOTATION)
            .ok_or_else(|| {
                format!("{image} carries no kubelet record ({KUBELET_RECORD_ANNOTATION})")
            })?;
        // Sealed with the image (the unpack opened it with these keys); a sealed record in a
        // plain image, or the reverse, is refused.
        let encrypted = podsnap_checkpoint_image::crypt::is_sealed_text(record);
        if encrypted != pulled.encrypted {
            return Err(format!(
                "{image}: its kubelet record is {}encrypted, its checkpoint {}",
                if encrypted { "" } else { "not " },
                if encrypted { "not" } else { "is" }
            ));
        }
        let record = match encrypted {
            true => identities
                .open_text(record, MAX_RECORD)
                .map_err(|e| format!("{image}'s kubelet record: {e}"))?,
            false => record.clone(),
        };
        let record = &record;
        let parsed = check_record(record).map_err(|e| format!("{image}'s kubelet record: {e}"))?;
        if parsed["namespace"].as_str() != Some(namespace) {
            return Err(format!(
                "{image} is a checkpoint of namespace {:?}, the pod is in {namespace:?}: checkpoints do not cross namespaces",
                parsed["namespace"].as_str().unwrap_or_default()
            ));
        }
        if parsed["podCheckpointUID"].as_str() != Some(uid) {
            return Err(format!(
                "{image}'s kubelet record names PodCheckpoint {:?}, not {uid:?}, whose image it is said to be",
                parsed["podCheckpointUID"].as_str().unwrap_or_default()
            ));
        }
        // What the registry's digest covered is what podsnapd's restore will accept: the
        // manifest file, whose sha256 the config digest is.
        let pin = pulled
            .manifest_sha256
            .strip_prefix("sha256:")
            .ok_or_else(|| format!("{image}: manifest sha256 {}", pulled.manifest_sha256))?;
        let on_disk = podsnap_checkpoint_format::manifest_sha256(&staging)
            .map_err(|e| format!("{}: {e}", staging.display()))?;
        if on_disk != pin {
            return Err(format!(
                "{image}: the unpacked manifest has sha256 {on_disk}, the image's config {pin}"
            ));
        }
        written.push(marker.clone());
        write_root_only(&marker, format!("{digest}\n").as_bytes())?;
        written.push(record_file.clone());
        write_root_only(&record_file, record.as_bytes())?;
        // Keyed by the path podsnapd will see (the pin store canonicalises what exists).
        let canonical = std::fs::canonicalize(dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .join(name);
        pins::pin_only(pins_dir, &canonical, pin)
            .map_err(|e| format!("pinning {}: {e}", checkpoint.display()))?;
        podsnap_checkpoint_image::rename_new(&staging, &checkpoint).map_err(|e| e.to_string())?;
        Ok(pulled.size)
    };
    match finish() {
        Ok(size) => Ok(PullOutcome::Pulled { size }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            for path in &written {
                let _ = std::fs::remove_file(path);
            }
            Err(e)
        }
    }
}

/// Writes `bytes` to `path` (0600, synced) through `.<name>.tmp` beside it, renamed into place.
fn write_root_only(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{} names no file", path.display()))?;
    let temporary = path.with_file_name(format!(".{name}.tmp"));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&temporary);
        format!("writing {}: {e}", path.display())
    })
}

/// What pulls that did not finish left in `dir` (an agent stopped half-way): staging
/// directories `.pull-<name>` and the registry client's `..pull-<name>.partial-*`, and
/// temporary files `.<file>.tmp`, except those of the pulls named in `pulling`.
pub fn stale_pulls(dir: &Path, pulling: &std::collections::BTreeSet<String>) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let file = entry.file_name().to_str()?.to_string();
            let of = file
                .strip_prefix("..pull-")
                .and_then(|rest| rest.split_once(".partial-").map(|(n, _)| n))
                .or_else(|| file.strip_prefix(".pull-"))
                .or_else(|| {
                    file.strip_prefix('.')
                        .and_then(|rest| rest.strip_suffix(".tmp"))
                        .and_then(|rest| {
                            rest.strip_suffix(PULLED_SUFFIX)
                                .or_else(|| rest.strip_suffix(crate::RECORD_SUFFIX))
                        })
                })?;
            (of.starts_with("checkpoint-") && !pulling.contains(of)).then(|| entry.path())
        })
        .collect()
}

/// The checkpoints this agent pulled into `dir` (those with a `.pulled` marker), by name.
pub fn pulled_checkpoints(dir: &Path) -> Vec<(String, std::time::SystemTime)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry
                .file_name()
                .to_str()?
                .strip_suffix(PULLED_SUFFIX)?
                .to_string();
            let modified = entry.metadata().ok()?.modified().ok()?;
            name.starts_with("checkpoint-").then_some((name, modified))
        })
        .collect()
}

/// Removes a checkpoint this agent pulled: the directory, the kubelet's record and the marker.
pub fn remove_pulled(dir: &Path, name: &str) -> Result<(), String> {
    let checkpoint = checkpoint_in(dir, name)?;
    crate::remove_data(dir, &checkpoint)?;
    match std::fs::remove_file(pulled_marker(&checkpoint)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(format!(
            "remove {}: {e}",
            pulled_marker(&checkpoint).display()
        )),
        _ => Ok(()),
    }
}

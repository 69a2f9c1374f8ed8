//! CRI `RestorePod`: verify a podsnap pod checkpoint before creating anything, check that the
//! requested container configs match it, then create a new sandbox (its own network namespace
//! and a new IP, unless `podsnap.io/keep-ip` asks for the checkpointed pod's through
//! [`podsnap_cni`]) and its containers through containerd's CRI, each marked with
//! `podsnap.io/restore-from` so that the podsnap shim restores it from its checkpoint directory
//! on `StartContainer`. Everything created is removed again if any step fails.
//!
//! The restore runs within what the request grants or not at all: the security settings of
//! the requested configs must be the checkpointed ones ([`crate::security`]). Each container
//! gets a one-time restore grant ([`podsnap_checkpoint_format::grant`]) pinning the digest of
//! the manifest verified here; without it the shim refuses the annotation.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

use cri_api::RuntimeServiceClient;
use cri_api::v1::{
    ContainerConfig, CreateContainerRequest, NamespaceMode, PodSandboxConfig,
    PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest, RestorePodRequest,
    RestorePodResponse, RestoredContainer, RunPodSandboxRequest, StopPodSandboxRequest,
};
use podsnap_checkpoint_format::verified::{Stamp, Stamps};
use podsnap_checkpoint_format::{ContainerEntry, Manifest};
use tonic::Status;
use tonic::transport::Channel;

use crate::checkpoint_pod::{HANDLER, pod_ips, with_deadline};
use crate::in_flight::{InFlight, Operation, Registry, Resource};
use crate::pod_options::{KEEP_IP, LAZY_RESTORE, RestoreOptions};
use podsnap_cni::grant as ip_grant;

use podsnap_checkpoint_format::grant::{
    self, GRANT_ANNOTATION, GRANT_DIR, RESTORE_ANNOTATION, RestoreGrant,
};

/// A checkpoint opened by [`open_checkpoint`].
#[derive(Debug)]
pub struct Opened {
    pub root: PathBuf,
    pub manifest: Manifest,
    /// The sha256 of its manifest file.
    pub digest: String,
    /// Stamps of its big files as verified, by path relative to `root`.
    pub stamps: Stamps,
}

/// Stamps of the checkpoint files this podsnapd verified, by absolute path
/// ([`podsnap_checkpoint_format::verified`]): a checkpoint restored again (N replicas, a
/// second restore) is not hashed again unless a file changed. Bounded: emptied when full.
static VERIFIED: std::sync::Mutex<BTreeMap<PathBuf, Stamp>> =
    std::sync::Mutex::new(BTreeMap::new());
/// Most stamps [`VERIFIED`] holds.
const MAX_VERIFIED: usize = 4096;

fn remembered(root: &Path) -> Stamps {
    let cache = VERIFIED.lock().unwrap_or_else(|e| e.into_inner());
    cache
        .range(root.to_path_buf()..)
        .take_while(|(path, _)| path.starts_with(root))
        .filter_map(|(path, stamp)| {
            let relative = path.strip_prefix(root).ok()?.to_str()?.to_string();
            Some((relative, stamp.clone()))
        })
        .collect()
}

fn remember(root: &Path, stamps: &Stamps) {
    let mut cache = VERIFIED.lock().unwrap_or_else(|e| e.into_inner());
    // What was remembered under this checkpoint and is not vouched for any more goes.
    let stale: Vec<PathBuf> = cache
        .range(root.to_path_buf()..)
        .take_while(|(path, _)| path.starts_with(root))
        .map(|(path, _)| path.clone())
        .collect();
    for path in stale {
        cache.remove(&path);
    }
    if cache.len() + stamps.len() > MAX_VERIFIED {
        cache.clear();
    }
    for (relative, stamp) in stamps {
        cache.insert(root.join(relative), stamp.clone());
    }
}

/// RestorePod leaves the page images to the shim, which hashes them while CRIU restores from
/// them (an eager restore resumes no process until they are verified; a lazy one kills the
/// container when one is not the manifest's): hashing them here, before the sandbox exists,
/// cost as much as CRIU's whole restore.
const PAGES_IN_THE_SHIM: bool = true;

/// Checks `checkpoint_path` and verifies the checkpoint's manifest and every file's hash (a big
/// file this podsnapd verified before and that did not change since is not read again). With
/// `pages_later`, CRIU's page images are checked for their place in the listing but not hashed
/// (see [`PAGES_IN_THE_SHIM`]).
pub fn open_checkpoint(checkpoint_path: &str, pages_later: bool) -> Result<Opened, Status> {
    let path = PathBuf::from(checkpoint_path);
    if checkpoint_path.is_empty() || !path.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "checkpoint_path {checkpoint_path:?} must be an absolute path"
        )));
    }
    let (manifest, digest, stamps) = podsnap_checkpoint_format::verify_stamped_deferring(
        &path,
        &remembered(&path),
        |relative| pages_later && podsnap_checkpoint_format::is_page_image(relative),
    )
    .map_err(|e| match e {
        podsnap_checkpoint_format::Error::NotADirectory(_) => {
            Status::invalid_argument(e.to_string())
        }
        other => Status::failed_precondition(format!("checkpoint {checkpoint_path}: {other}")),
    })?;
    match podsnap_checkpoint_format::pins::lookup(
        Path::new(podsnap_checkpoint_format::pins::PIN_DIR),
        &path,
    ) {
        Ok(podsnap_checkpoint_format::pins::Pin::Pinned(pinned)) if pinned != digest => {
            return Err(Status::failed_precondition(format!(
                "checkpoint {checkpoint_path} was changed since this node took it: its manifest \
                 has sha256 {digest}, {pinned} when it was written"
            )));
        }
        Ok(_) => {}
        Err(e) => {
            return Err(Status::internal(format!(
                "checkpoint {checkpoint_path}: read its pin: {e}"
            )));
        }
    }
    if manifest.pod.runtime_handler != HANDLER {
        return Err(Status::failed_precondition(format!(
            "checkpoint {checkpoint_path} was taken on runtime handler {:?}",
            manifest.pod.runtime_handler
        )));
    }
    // Pre-flight, before anything is created: a checkpoint from another kind of machine.
    if let Some(taken_on) = &manifest.machine
        && let Err(why) = taken_on.restorable_on(&podsnap_checkpoint_format::Machine::here())
    {
        return Err(Status::failed_precondition(format!(
            "checkpoint {checkpoint_path} cannot be restored on this node: {why}"
        )));
    }
    let criu = criu_rpc::Criu::new().timeout(PREFLIGHT_TIMEOUT);
    let mut facts = CriuFacts::of(&criu);
    let here = Here {
        criu: facts.version(&criu),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default(),
    };
    let checked = preflight(&criu, &here, &path, &manifest, &mut facts);
    facts.keep();
    checked.map_err(|why| {
        Status::failed_precondition(format!(
            "checkpoint {checkpoint_path} cannot be restored on this node: {why}"
        ))
    })?;
    remember(&path, &stamps);
    Ok(Opened {
        root: path,
        manifest,
        digest,
        stamps,
    })
}

/// The longest the CPU check of one container may take.
const PREFLIGHT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// What this node's CRIU answered, kept while its binary stays the same file: its version, and
/// the CPU records (`cpuinfo.img`) it accepted. Each answer costs a CRIU run (about 20 ms here)
/// that every restore paid before; a record it refused, or an answer that failed, is asked
/// again next time. A restore works on a copy ([`CriuFacts::of`]) and keeps what it learnt
/// ([`CriuFacts::keep`]): no lock is held while CRIU runs.
#[derive(Default, Clone)]
struct CriuFacts {
    /// The binary the facts are about (device, inode, size, mtime); none is kept without one.
    binary: Option<(u64, u64, u64, i64, i64)>,
    version: Option<String>,
    cpus_accepted: HashSet<Vec<u8>>,
}

static CRIU_FACTS: LazyLock<Mutex<CriuFacts>> = LazyLock::new(Default::default);

impl CriuFacts {
    /// A copy of the facts about `criu`'s binary (forgotten if it is another file than last
    /// time).
    fn of(criu: &criu_rpc::Criu) -> CriuFacts {
        let binary = binary_identity(criu.binary());
        let mut known = CRIU_FACTS.lock().unwrap_or_else(|e| e.into_inner());
        if binary.is_none() || known.binary != binary {
            *known = CriuFacts {
                binary,
                ..Default::default()
            };
        }
        known.clone()
    }

    /// Keeps what this copy learnt, unless the binary changed meanwhile.
    fn keep(self) {
        let mut known = CRIU_FACTS.lock().unwrap_or_else(|e| e.into_inner());
        if self.binary.is_some() && known.binary == self.binary {
            if known.version.is_none() {
                known.version = self.version;
            }
            known.cpus_accepted.extend(self.cpus_accepted);
        }
    }

    fn version(&mut self, criu: &criu_rpc::Criu) -> String {
        if let Some(version) = &self.version {
            return version.clone();
        }
        match criu.version() {
            Ok(version) => {
                let version = version.to_string();
                if self.binary.is_some() {
                    self.version = Some(version.clone());
                }
                version
            }
            Err(_) => String::new(),
        }
    }

    fn cpu_accepted(&self, record: &[u8]) -> bool {
        self.cpus_accepted.contains(record)
    }

    fn accept_cpu(&mut self, record: Vec<u8>) {
        if self.binary.is_some() {
            self.cpus_accepted.insert(record);
        }
    }
}

/// The file a binary path names (a bare name looked up on `PATH`), as device, inode, size and
/// modification time: another file, or the same one rewritten, is another binary.
fn binary_identity(binary: &Path) -> Option<(u64, u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let path = if binary.components().count() > 1 || binary.is_absolute() {
        binary.to_path_buf()
    } else {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|dir| dir.join(binary))
            .find(|candidate| {
                use std::os::unix::fs::PermissionsExt;
                // The first executable file, as exec finds it.
                std::fs::metadata(candidate)
                    .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            })?
    };
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// The CRIU and kernel versions of this node.
struct Here {
    criu: String,
    kernel: String,
}

/// The versions and CPU this node restores with against those the checkpoint was taken with:
/// CRIU and kernel not older ([`podsnap_checkpoint_format::versions_restorable`]), and each
/// container's recorded CPU features (`cpuinfo.img`) present here (CRIU `CPUINFO_CHECK`).
fn preflight(
    criu: &criu_rpc::Criu,
    here: &Here,
    path: &Path,
    manifest: &Manifest,
    facts: &mut CriuFacts,
) -> Result<(), String> {
    podsnap_checkpoint_format::versions_restorable(
        &manifest.criu_version,
        &manifest.kernel,
        &here.criu,
        &here.kernel,
    )?;
    // Containers checkpointed on one machine carry the same CPU record: each distinct record
    // is checked once (a CRIU run each).
    let mut checked = std::collections::HashSet::new();
    for container in &manifest.containers {
        let images = path.join(&container.name).join("checkpoint");
        let record = images.join(criu_rpc::CPUINFO_IMAGE);
        if !record.is_file() {
            continue;
        }
        let bytes = std::fs::read(&record).ok();
        if let Some(bytes) = &bytes
            && (facts.cpu_accepted(bytes) || !checked.insert(bytes.clone()))
        {
            continue;
        }
        criu.cpuinfo_check(&images).map_err(|e| match e.kind() {
            // CRIU read the record and answered: this CPU is not that one.
            criu_rpc::ErrorKind::Failed { .. } => format!(
                "container {}: this node's CPU lacks features the checkpoint's CPU had (CRIU cpuinfo check: {e}; log: {})",
                container.name,
                e.log_tail().join(" | ")
            ),
            _ => format!(
                "container {}: the CPU check could not run: {e}",
                container.name
            ),
        })?;
        // Accepted as read before the check: a record that changed meanwhile is not trusted.
        if let Some(bytes) = bytes
            && std::fs::read(&record).is_ok_and(|now| now == bytes)
        {
            facts.accept_cpu(bytes);
        }
    }
    Ok(())
}

/// Refuses a request whose pod or container security settings differ from the checkpoint's.
pub fn check_security(
    config: &cri_api::v1::PodSandboxConfig,
    pairs: &[(&ContainerConfig, &ContainerEntry)],
    manifest: &Manifest,
) -> Result<(), Status> {
    let mut differences: Vec<String> =
        crate::security::sandbox_differences(&manifest.pod.config, config)
            .into_iter()
            .map(|d| format!("pod {d}"))
            .collect();
    for (requested, entry) in pairs {
        differences.extend(
            crate::security::container_differences(&entry.config, requested)
                .into_iter()
                .map(|d| format!("container {} {d}", entry.name)),
        );
    }
    if differences.is_empty() {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "the restored pod must run with exactly the security settings it was checkpointed with; \
             it differs in: {}",
            differences.join("; ")
        )))
    }
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Checks one requested container config against the checkpoint's: the image and, where the
/// request states them, command, args, working directory and environment must match.
pub fn check_container(config: &ContainerConfig, entry: &ContainerEntry) -> Result<(), Status> {
    let name = &entry.name;
    let image = config
        .image
        .as_ref()
        .map(|i| i.image.as_str())
        .unwrap_or_default();
    let checkpointed = &entry.config;
    let same_image = image == entry.image
        || image == entry.image_ref
        || checkpointed["image"]["image"].as_str() == Some(image);
    if !same_image {
        return Err(Status::invalid_argument(format!(
            "container {name}: image {image:?} does not match the checkpoint's {:?} ({})",
            entry.image, entry.image_ref
        )));
    }
    let compare = |field: &str, requested: Vec<String>, saved: Vec<String>| -> Result<(), Status> {
        if !requested.is_empty() && requested != saved {
            return Err(Status::invalid_argument(format!(
                "container {name}: {field} {requested:?} does not match the checkpoint's {saved:?}"
            )));
        }
        Ok(())
    };
    compare(
        "command",
        config.command.clone(),
        strings(&checkpointed["command"]),
    )?;
    compare("args", config.args.clone(), strings(&checkpointed["args"]))?;
    if !config.working_dir.is_empty()
        && checkpointed["working_dir"].as_str().unwrap_or_default() != config.working_dir
    {
        return Err(Status::invalid_argument(format!(
            "container {name}: working_dir {:?} does not match the checkpoint's {:?}",
            config.working_dir, checkpointed["working_dir"]
        )));
    }
    if !config.envs.is_empty() {
        let requested: BTreeSet<String> = config
            .envs
            .iter()
            .map(|e| format!("{}={}", e.key, String::from_utf8_lossy(&e.value)))
            .collect();
        let saved: BTreeSet<String> = checkpointed["envs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        format!(
                            "{}={}",
                            e["key"].as_str().unwrap_or_default(),
                            e["value"].as_str().unwrap_or_default()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if requested != saved {
            return Err(Status::invalid_argument(format!(
                "container {name}: environment does not match the checkpoint's"
            )));
        }
    }
    Ok(())
}

/// Matches the requested configs to the checkpoint's containers by metadata name.
pub fn match_containers<'a>(
    configs: &'a [ContainerConfig],
    manifest: &'a Manifest,
) -> Result<Vec<(&'a ContainerConfig, &'a ContainerEntry)>, Status> {
    if configs.is_empty() {
        return Err(Status::invalid_argument("container_configs is empty"));
    }
    let mut by_name: HashMap<&str, &ContainerConfig> = HashMap::new();
    for config in configs {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.as_str())
            .unwrap_or_default();
        if name.is_empty() {
            return Err(Status::invalid_argument(
                "a container config has no metadata name",
            ));
        }
        if by_name.insert(name, config).is_some() {
            return Err(Status::invalid_argument(format!(
                "container_configs names {name:?} twice"
            )));
        }
    }
    let requested: BTreeSet<&str> = by_name.keys().copied().collect();
    let saved: BTreeSet<&str> = manifest
        .containers
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    if requested != saved {
        return Err(Status::invalid_argument(format!(
            "container_configs name {requested:?}, the checkpoint holds {saved:?}"
        )));
    }
    manifest
        .containers
        .iter()
        .map(|entry| {
            let config = by_name[entry.name.as_str()];
            check_container(config, entry)?;
            Ok((config, entry))
        })
        .collect()
}

/// `ips` as a list for messages.
fn addresses(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The addresses a restore with [`KEEP_IP`] asks for: the checkpoint's, for a pod with a
/// network of its own.
pub fn kept_addresses(
    config: &PodSandboxConfig,
    manifest: &Manifest,
) -> Result<Vec<IpAddr>, Status> {
    let host_network = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .is_some_and(|n| n.network == NamespaceMode::Node as i32);
    if host_network {
        return Err(Status::invalid_argument(format!(
            "{KEEP_IP}: the pod uses the node's network: it has no address of its own to keep"
        )));
    }
    if manifest.pod.ips.is_empty() {
        return Err(Status::failed_precondition(format!(
            "{KEEP_IP}: the checkpoint records no pod address (a pod without a network of its \
             own, or a checkpoint taken before podsnap recorded addresses)"
        )));
    }
    Ok(manifest.pod.ips.clone())
}

/// The address grant for the new pod (its UID names it), which podsnap-ipam honours while the
/// sandbox's network is set up; removed when dropped.
fn issue_ip_grant(config: &PodSandboxConfig, ips: &[IpAddr]) -> Result<ip_grant::Issued, Status> {
    let uid = config
        .metadata
        .as_ref()
        .map(|m| m.uid.as_str())
        .unwrap_or_default();
    ip_grant::issue(
        Path::new(ip_grant::GRANT_DIR),
        uid,
        &ip_grant::IpGrant { ips: ips.to_vec() },
    )
    .map_err(|e| match e {
        ip_grant::GrantError::BadUid(_) => Status::invalid_argument(format!("{KEEP_IP}: {e}")),
        e => Status::internal(format!("{KEEP_IP}: {e}")),
    })
}

/// Checks that the network gave the new sandbox the addresses asked for: a network whose IPAM
/// plugin is not podsnap-ipam ignores the grant, and the pod must not come up elsewhere.
async fn check_kept_addresses(
    cri: &mut RuntimeServiceClient<Channel>,
    sandbox: &str,
    wanted: &[IpAddr],
    deadline: Option<Instant>,
) -> Result<(), Status> {
    let status = cri
        .pod_sandbox_status(with_deadline(
            PodSandboxStatusRequest {
                pod_sandbox_id: sandbox.to_string(),
                verbose: false,
            },
            deadline,
            "checking the restored pod's addresses",
        )?)
        .await
        .map_err(|e| {
            Status::new(
                e.code(),
                format!(
                    "status of the restored pod sandbox {sandbox}: {}",
                    e.message()
                ),
            )
        })?
        .into_inner();
    let got = pod_ips(status.status.as_ref().and_then(|s| s.network.as_ref()));
    if got.first() == wanted.first() && wanted.iter().all(|ip| got.contains(ip)) {
        Ok(())
    } else {
        Err(Status::failed_precondition(format!(
            "{KEEP_IP}: the pod network gave the restored pod {} instead of the checkpoint's \
             addresses {}: the network's IPAM plugin must be podsnap-ipam (see the README)",
            if got.is_empty() {
                "no address".to_string()
            } else {
                addresses(&got)
            },
            addresses(wanted)
        )))
    }
}

/// RestorePod, as the CRI contract describes it.
pub async fn restore_pod(
    mut cri: RuntimeServiceClient<Channel>,
    req: RestorePodRequest,
    deadline: Option<Instant>,
) -> Result<RestorePodResponse, Status> {
    if !req.runtime_handler.is_empty() && req.runtime_handler != HANDLER {
        return Err(Status::invalid_argument(format!(
            "runtime handler {:?} cannot restore a podsnap checkpoint: use {HANDLER:?}",
            req.runtime_handler
        )));
    }
    let config = req
        .config
        .clone()
        .ok_or_else(|| Status::invalid_argument("config (the pod sandbox config) is missing"))?;
    let options = RestoreOptions::parse(&req.options, &config.annotations)?;
    // One restore of a pod at a time; restores from one checkpoint may run side by side (N
    // replicas), but not while a checkpoint is still being written into its directory.
    let metadata = config.metadata.clone().unwrap_or_default();
    let _busy = InFlight::acquire(
        Operation::Restore,
        [Resource::Pod {
            namespace: metadata.namespace,
            name: metadata.name,
            uid: metadata.uid,
        }],
    )?;
    let directory = Resource::directory(Path::new(&req.checkpoint_path));
    if Registry::global().is_held(&directory) {
        return Err(Status::failed_precondition(format!(
            "{directory} is still being written by a checkpoint"
        )));
    }
    let checkpoint_path = req.checkpoint_path.clone();
    let Opened {
        root,
        manifest,
        digest,
        stamps,
    } = tokio::task::spawn_blocking(move || open_checkpoint(&checkpoint_path, PAGES_IN_THE_SHIM))
        .await
        .map_err(|e| Status::internal(format!("verify task: {e}")))??;
    let pairs = match_containers(&req.container_configs, &manifest)?;
    check_security(&config, &pairs, &manifest)?;
    grant::remove_stale(Path::new(GRANT_DIR));
    // The checkpointed pod's addresses, asked of the network (podsnap-ipam) while the sandbox
    // is created, and only then.
    let kept_ips = if options.keep_ip {
        Some(kept_addresses(&config, &manifest)?)
    } else {
        None
    };
    let ip_grant = match &kept_ips {
        Some(ips) => Some(issue_ip_grant(&config, ips)?),
        None => None,
    };

    let created_sandbox = cri
        .run_pod_sandbox(with_deadline(
            RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: HANDLER.to_string(),
            },
            deadline,
            "creating the pod sandbox",
        )?)
        .await;
    drop(ip_grant);
    let sandbox = created_sandbox
        .map_err(|e| {
            let asked = match &kept_ips {
                Some(ips) => format!(
                    " with the checkpoint's addresses {} ({KEEP_IP})",
                    addresses(ips)
                ),
                None => String::new(),
            };
            Status::new(
                e.code(),
                format!("create the restored pod sandbox{asked}: {}", e.message()),
            )
        })?
        .into_inner()
        .pod_sandbox_id;
    let mut created: Vec<RestoredContainer> = Vec::new();
    let mut tokens = Vec::new();
    let mut failure = None;
    if let Some(ips) = &kept_ips {
        failure = check_kept_addresses(&mut cri, &sandbox, ips, deadline)
            .await
            .err();
    }
    for (container, entry) in pairs {
        if failure.is_some() {
            break;
        }
        let mut container = container.clone();
        let dir: &Path = &root.join(&entry.name);
        container
            .annotations
            .insert(RESTORE_ANNOTATION.to_string(), dir.display().to_string());
        // The shim restores lazily only when told so, and no container config may tell it
        // otherwise than the call did.
        container
            .annotations
            .insert(LAZY_RESTORE.to_string(), options.lazy.to_string());
        let restore_grant = RestoreGrant {
            checkpoint: root.clone(),
            container: entry.name.clone(),
            manifest_sha256: digest.clone(),
            stamps: stamps
                .iter()
                .filter(|(relative, _)| {
                    podsnap_checkpoint_format::read_by(&manifest, &entry.name, relative)
                })
                .take(grant::MAX_STAMPS)
                .map(|(relative, stamp)| (relative.clone(), stamp.clone()))
                .collect(),
        };
        match grant::issue(Path::new(GRANT_DIR), &restore_grant) {
            Ok(token) => {
                container
                    .annotations
                    .insert(GRANT_ANNOTATION.to_string(), token.clone());
                tokens.push(token);
            }
            Err(e) => {
                failure = Some(Status::internal(format!(
                    "container {}: issue its restore grant: {e}",
                    entry.name
                )));
                break;
            }
        }
        let request = match with_deadline(
            CreateContainerRequest {
                pod_sandbox_id: sandbox.clone(),
                config: Some(container),
                sandbox_config: Some(config.clone()),
            },
            deadline,
            "creating the restored containers",
        ) {
            Ok(r) => r,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        match cri.create_container(request).await {
            Ok(resp) => created.push(RestoredContainer {
                name: entry.name.clone(),
                container_id: resp.into_inner().container_id,
            }),
            Err(e) => {
                failure = Some(Status::new(
                    e.code(),
                    format!("create restored container {}: {}", entry.name, e.message()),
                ));
                break;
            }
        }
    }
    if let Some(failure) = failure {
        for token in &tokens {
            grant::revoke(Path::new(GRANT_DIR), token);
        }
        // Remove everything this call created; the caller's deadline may have passed, so
        // these calls get a time of their own.
        for c in &created {
            let _ = cri
                .remove_container(RemoveContainerRequest {
                    container_id: c.container_id.clone(),
                })
                .await;
        }
        let _ = cri
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: sandbox.clone(),
            })
            .await;
        let _ = cri
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: sandbox.clone(),
            })
            .await;
        return Err(failure);
    }
    tracing::info!(sandbox = %sandbox, checkpoint = %req.checkpoint_path, containers = created.len(), "pod restored (created)");
    Ok(RestorePodResponse {
        pod_sandbox_id: sandbox,
        restored_containers: created,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cri_api::v1::{ContainerMetadata, ImageSpec, KeyValue};

    fn entry(name: &str) -> ContainerEntry {
        ContainerEntry {
            name: name.into(),
            id: format!("{name}-id"),
            image: "127.0.0.1:5000/podsnap/busybox:latest".into(),
            image_ref: "sha256:abc".into(),
            config: serde_json::json!({
                "command": ["sh", "-c", "count"],
                "envs": [{"key": "A", "value": "1"}],
            }),
        }
    }

    fn config(name: &str, image: &str) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn manifest(names: &[&str]) -> Manifest {
        Manifest {
            format: podsnap_checkpoint_format::FORMAT.into(),
            version: podsnap_checkpoint_format::VERSION,
            minor: podsnap_checkpoint_format::MINOR,
            created: String::new(),
            pod: podsnap_checkpoint_format::PodEntry {
                sandbox_id: "sb".into(),
                name: "p".into(),
                namespace: "n".into(),
                uid: "u".into(),
                runtime_handler: HANDLER.into(),
                config: serde_json::Value::Null,
                ips: Vec::new(),
            },
            containers: names.iter().map(|n| entry(n)).collect(),
            criu_version: String::new(),
            kernel: String::new(),
            options: Default::default(),
            files: Default::default(),
            machine: None,
        }
    }

    #[test]
    fn keeping_the_address_needs_one_recorded_and_a_pod_network() {
        let mut m = manifest(&["web"]);
        let pod = PodSandboxConfig::default();
        let err = kept_addresses(&pod, &m).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(
            err.message().contains("records no pod address"),
            "{}",
            err.message()
        );
        m.pod.ips = vec!["10.88.0.4".parse().unwrap(), "fd00::4".parse().unwrap()];
        assert_eq!(kept_addresses(&pod, &m).unwrap(), m.pod.ips);
        let host = PodSandboxConfig {
            linux: Some(cri_api::v1::LinuxPodSandboxConfig {
                security_context: Some(cri_api::v1::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri_api::v1::NamespaceOption {
                        network: NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = kept_addresses(&host, &m).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("node's network"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn names_must_be_exactly_the_checkpoint_s() {
        let m = manifest(&["web", "counter"]);
        let ok = [
            config("counter", "sha256:abc"),
            config("web", "127.0.0.1:5000/podsnap/busybox:latest"),
        ];
        assert_eq!(match_containers(&ok, &m).unwrap().len(), 2);
        let err = match_containers(&ok[..1], &m).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("web"), "{}", err.message());
        let dup = [config("web", "sha256:abc"), config("web", "sha256:abc")];
        assert!(
            match_containers(&dup, &m)
                .unwrap_err()
                .message()
                .contains("twice")
        );
        assert!(match_containers(&[], &m).is_err());
    }

    #[test]
    fn a_different_image_command_or_environment_is_refused() {
        let e = entry("web");
        let err = check_container(&config("web", "nginx"), &e).unwrap_err();
        assert!(err.message().contains("image"), "{}", err.message());
        let mut c = config("web", "sha256:abc");
        c.command = vec!["sleep".into()];
        assert!(
            check_container(&c, &e)
                .unwrap_err()
                .message()
                .contains("command")
        );
        let mut c = config("web", "sha256:abc");
        c.envs = vec![KeyValue {
            key: "A".into(),
            value: "2".into(),
        }];
        assert!(
            check_container(&c, &e)
                .unwrap_err()
                .message()
                .contains("environment")
        );
        let mut c = config("web", "sha256:abc");
        c.command = vec!["sh".into(), "-c".into(), "count".into()];
        c.envs = vec![KeyValue {
            key: "A".into(),
            value: "1".into(),
        }];
        assert!(check_container(&c, &e).is_ok());
    }

    #[test]
    fn relative_or_missing_checkpoints_are_refused_before_anything_is_created() {
        assert_eq!(
            open_checkpoint("rel/dir", false).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            open_checkpoint("/nonexistent/ckpt", false)
                .unwrap_err()
                .code(),
            tonic::Code::InvalidArgument
        );
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            open_checkpoint(dir.path().to_str().unwrap(), false)
                .unwrap_err()
                .code(),
            tonic::Code::FailedPrecondition
        );
    }

    #[test]
    fn a_checkpoint_opened_again_is_not_hashed_again_unless_a_file_changed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("web/checkpoint")).unwrap();
        let pages = dir.path().join("web/checkpoint/pages-1.img");
        let big = podsnap_checkpoint_format::verified::STAMPED_MIN as usize;
        std::fs::write(&pages, vec![3u8; big]).unwrap();
        let mut m = manifest(&["web"]);
        m.machine = Some(podsnap_checkpoint_format::Machine::here());
        podsnap_checkpoint_format::write_manifest(dir.path(), &mut m).unwrap();
        std::thread::sleep(podsnap_checkpoint_format::verified::SETTLED * 2);
        let path = dir.path().to_str().unwrap();
        let first = open_checkpoint(path, false).unwrap();
        assert_eq!(
            first.stamps.keys().collect::<Vec<_>>(),
            ["web/checkpoint/pages-1.img"]
        );
        assert_eq!(remembered(dir.path()), first.stamps);
        // Opened again: the stamps are the remembered ones (the file was not read).
        assert_eq!(open_checkpoint(path, false).unwrap().stamps, first.stamps);
        // A file changed since (same size): read again, and refused.
        std::fs::write(&pages, vec![4u8; big]).unwrap();
        let err = open_checkpoint(path, false).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("pages-1.img"), "{err:?}");
    }

    #[test]
    fn a_checkpoint_of_another_architecture_is_refused_before_anything_is_created() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("web")).unwrap();
        std::fs::write(dir.path().join("web/rootfs-diff.tar"), b"tar").unwrap();
        let mut other = manifest(&["web"]);
        let here = podsnap_checkpoint_format::Machine::here();
        other.machine = Some(podsnap_checkpoint_format::Machine {
            arch: if here.arch == "riscv64" {
                "s390x"
            } else {
                "riscv64"
            }
            .into(),
            page_size: here.page_size,
        });
        podsnap_checkpoint_format::write_manifest(dir.path(), &mut other).unwrap();
        let err = open_checkpoint(dir.path().to_str().unwrap(), false).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
        assert!(
            err.message().contains("cannot be restored on this node")
                && err.message().contains("same architecture only"),
            "{err:?}"
        );
        // The same checkpoint from this kind of machine opens.
        std::fs::remove_file(dir.path().join(podsnap_checkpoint_format::MANIFEST)).unwrap();
        let mut same = manifest(&["web"]);
        same.machine = Some(here);
        same.files.clear();
        podsnap_checkpoint_format::write_manifest(dir.path(), &mut same).unwrap();
        open_checkpoint(dir.path().to_str().unwrap(), false).unwrap();
    }

    #[test]
    fn a_checkpoint_from_a_newer_criu_or_kernel_is_refused_before_anything_is_created() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("web/checkpoint")).unwrap();
        std::fs::write(dir.path().join("web/rootfs-diff.tar"), b"tar").unwrap();
        let mut taken = manifest(&["web"]);
        taken.criu_version = "4.1.1".into();
        taken.kernel = "6.8.0-1".into();
        podsnap_checkpoint_format::write_manifest(dir.path(), &mut taken).unwrap();
        let criu = criu_rpc::Criu::new();
        let preflight_with = |criu_version: &str, kernel: &str| {
            let here = Here {
                criu: criu_version.into(),
                kernel: kernel.into(),
            };
            preflight(&criu, &here, dir.path(), &taken, &mut CriuFacts::default())
        };
        let err = preflight_with("4.0.0", "6.8.0").unwrap_err();
        assert!(
            err.contains("CRIU 4.1.1") && err.contains("CRIU 4.0.0"),
            "{err}"
        );
        let err = preflight_with("4.1.1", "6.1.0-28").unwrap_err();
        assert!(err.contains("kernel 6.8.0-1"), "{err}");
        // No cpuinfo.img (a checkpoint from before it was recorded): not checked.
        preflight_with("4.1.1", "6.8.12").unwrap();
    }

    #[test]
    fn criu_facts_are_about_one_binary_file() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("criu");
        std::fs::write(&binary, b"one").unwrap();
        let first = binary_identity(&binary).expect("a file has an identity");
        std::fs::write(&binary, b"another").unwrap();
        assert_ne!(
            binary_identity(&binary),
            Some(first),
            "rewritten: another binary"
        );
        assert!(binary_identity(&dir.path().join("missing")).is_none());
        // A bare name is the file PATH finds.
        assert!(binary_identity(Path::new("sh")).is_some());

        let mut facts = CriuFacts::default();
        facts.accept_cpu(b"cpu".to_vec());
        assert!(
            !facts.cpu_accepted(b"cpu"),
            "nothing is kept without a binary"
        );
        facts.binary = Some(first);
        facts.accept_cpu(b"cpu".to_vec());
        assert!(facts.cpu_accepted(b"cpu"));
        assert!(!facts.cpu_accepted(b"another cpu"));
    }
}

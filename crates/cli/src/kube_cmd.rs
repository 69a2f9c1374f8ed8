//! The Kubernetes commands: `checkpoint`, `restore`, `list`, `inspect` and `delete` work on
//! `PodCheckpoint` / `PodRestore` objects (checkpoint.k8s.io/v1alpha1) through the API server,
//! with the kubeconfig kubectl would use; podsnap-controller does the work. `checkpoint` and
//! `restore` wait for the outcome, print progress on stderr, and fail with the object's reason.

use std::cell::RefCell;
use std::time::Duration;

use anyhow::{Context, bail};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::{wait, wait::await_condition, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use podsnap_checkpoint_api::{
    CheckpointStorage, DeletionPolicy, ImageEncryption, ImageStorage, PodCheckpoint,
    PodCheckpointSpec, PodRestore, PodRestoreSpec, PodTemplate, StorageType, TemplateMetadata,
};
use serde::de::DeserializeOwned;

/// Where the commands act.
pub struct Target {
    pub client: Client,
    pub namespace: String,
}

impl Target {
    pub async fn new(namespace: Option<String>) -> anyhow::Result<Self> {
        let config = kube::Config::infer()
            .await
            .context("no Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster)")?;
        let namespace = namespace.unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).context("create a Kubernetes client")?;
        Ok(Target { client, namespace })
    }

    fn checkpoints(&self) -> Api<PodCheckpoint> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn restores(&self) -> Api<PodRestore> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }
}

fn stamp() -> String {
    jiff::Timestamp::now().strftime("%Y%m%d-%H%M%S").to_string()
}

/// What `podsnap checkpoint` puts in the PodCheckpoint besides its pod.
#[derive(Debug, Default)]
pub struct CheckpointOptions {
    pub name: Option<String>,
    pub timeout_seconds: Option<i32>,
    pub deletion_policy: Option<String>,
    /// Storage type Image, to this repository.
    pub image: Option<String>,
    /// age public keys the image is sealed to (none: not encrypted).
    pub encrypt_to: Vec<String>,
    /// A `kubernetes.io/dockerconfigjson` Secret of the namespace with the registry's
    /// credentials (`spec.storage.image.secretName`).
    pub registry_secret: Option<String>,
    /// The UID the source pod must have (`spec.sourcePodUID`): a pod of that name created
    /// again meanwhile is not checkpointed.
    pub source_pod_uid: Option<String>,
}

/// `podsnap checkpoint POD`: creates a PodCheckpoint and waits until it is Ready or Failed;
/// prints `<name>\t<node>\t<location>[\t<image>]`.
pub async fn checkpoint(
    target: &Target,
    pod: &str,
    options: CheckpointOptions,
    wait: Duration,
) -> anyhow::Result<()> {
    let done = create_checkpoint(target, pod, options, wait).await?;
    let status = done.status.unwrap_or_default();
    println!(
        "{}\t{}\t{}{}",
        done.metadata.name.unwrap_or_default(),
        status.node_name.unwrap_or_default(),
        status
            .checkpoint_location
            .map(|l| l.to_string())
            .unwrap_or_default(),
        status
            .image
            .map(|i| format!("\t{}", i.reference))
            .unwrap_or_default()
    );
    Ok(())
}

/// Creates a PodCheckpoint and waits until it is Ready (returned) or Failed (an error).
pub async fn create_checkpoint(
    target: &Target,
    pod: &str,
    options: CheckpointOptions,
    wait: Duration,
) -> anyhow::Result<PodCheckpoint> {
    let CheckpointOptions {
        name,
        timeout_seconds,
        deletion_policy,
        image,
        encrypt_to,
        registry_secret,
        source_pod_uid,
    } = options;
    if !encrypt_to.is_empty() {
        podsnap_checkpoint_image::Recipients::parse(&encrypt_to)
            .map_err(|e| anyhow::anyhow!("--encrypt-to: {e}"))?;
    }
    let deletion_policy = deletion_policy
        .map(|policy| policy.parse::<DeletionPolicy>())
        .transpose()
        .map_err(|e| anyhow::anyhow!("--deletion-policy: {e}"))?;
    let name = name.unwrap_or_else(|| format!("{pod}-{}", stamp()));
    let object = PodCheckpoint::new(
        &name,
        PodCheckpointSpec {
            source_pod_name: pod.to_string(),
            source_pod_uid,
            restore_namespaces: Vec::new(),
            timeout_seconds,
            deletion_policy,
            storage: image.map(|repository| CheckpointStorage {
                type_: StorageType::Image,
                image: Some(ImageStorage {
                    repository,
                    secret_name: registry_secret,
                    encryption: (!encrypt_to.is_empty()).then(|| ImageEncryption {
                        recipients: encrypt_to.clone(),
                    }),
                }),
            }),
        },
    );
    let created = target
        .checkpoints()
        .create(&PostParams::default(), &object)
        .await
        .with_context(|| format!("create PodCheckpoint {}/{name}", target.namespace))?;
    // An API server whose CRD predates encryption drops the field without a word: the
    // checkpoint would go to the registry in the clear. Refused instead.
    if created.spec.image_recipients() != object.spec.image_recipients()
        || created.spec.image_secret_name() != object.spec.image_secret_name()
    {
        let _ = target
            .checkpoints()
            .delete(&name, &kube::api::DeleteParams::background())
            .await;
        anyhow::bail!(
            "PodCheckpoint {}/{name}: the API server dropped spec.storage.image.encryption or secretName (its PodCheckpoint CRD is older than this podsnap: apply deploy/crds/); deleted, nothing was checkpointed",
            target.namespace
        );
    }
    eprintln!(
        "PodCheckpoint {}/{name}: created for pod {pod}",
        target.namespace
    );
    await_phase(
        &target.checkpoints(),
        &target.namespace,
        &name,
        "Ready",
        wait,
        " (is podsnap-controller running?)",
    )
    .await
}

/// What `podsnap restore` puts in the PodRestore besides its checkpoint.
#[derive(Debug, Default)]
pub struct RestoreOptions {
    pub replicas: Option<i32>,
    pub pod_name: Option<String>,
    pub name: Option<String>,
    pub node: Option<String>,
    pub lazy: bool,
}

/// `podsnap restore CHECKPOINT`: creates a PodRestore and waits until it is Completed or Failed;
/// prints the restored pods' names.
pub async fn restore(
    target: &Target,
    checkpoint: &str,
    options: RestoreOptions,
    wait: Duration,
) -> anyhow::Result<()> {
    let done = create_restore(target, checkpoint, options, wait).await?;
    for pod in done.status.unwrap_or_default().restored_pod_names {
        println!("{pod}");
    }
    Ok(())
}

/// Creates a PodRestore and waits until it is Completed (returned) or Failed (an error).
pub async fn create_restore(
    target: &Target,
    checkpoint: &str,
    options: RestoreOptions,
    wait: Duration,
) -> anyhow::Result<PodRestore> {
    let RestoreOptions {
        replicas,
        pod_name,
        name,
        node,
        lazy,
    } = options;
    if pod_name.is_some() && replicas.is_some_and(|r| r != 1) {
        bail!("--pod-name names a single restored pod: it cannot go with --replicas above 1");
    }
    let name = name.unwrap_or_else(|| format!("{checkpoint}-restore-{}", stamp()));
    let object = PodRestore::new(
        &name,
        PodRestoreSpec {
            checkpoint_name: checkpoint.to_string(),
            checkpoint_namespace: None,
            replicas,
            pod_template: pod_name.map(|pod| PodTemplate {
                metadata: Some(TemplateMetadata {
                    name: Some(pod),
                    ..Default::default()
                }),
                spec: None,
            }),
            node_name: node,
            lazy: lazy.then_some(true),
        },
    );
    target
        .restores()
        .create(&PostParams::default(), &object)
        .await
        .with_context(|| format!("create PodRestore {}/{name}", target.namespace))?;
    eprintln!(
        "PodRestore {}/{name}: created from PodCheckpoint {checkpoint}",
        target.namespace
    );
    await_phase(
        &target.restores(),
        &target.namespace,
        &name,
        "Completed",
        wait,
        "",
    )
    .await
}

/// What an object's status says: phase (Pending until it has one), reason, message.
trait Outcome {
    fn outcome(&self) -> (String, String, String);
}

impl Outcome for PodCheckpoint {
    fn outcome(&self) -> (String, String, String) {
        let s = self.status.clone().unwrap_or_default();
        let phase = s
            .phase
            .unwrap_or(podsnap_checkpoint_api::PodCheckpointPhase::Pending)
            .to_string();
        (
            phase,
            s.reason.unwrap_or_default(),
            s.message.unwrap_or_default(),
        )
    }
}

impl Outcome for PodRestore {
    fn outcome(&self) -> (String, String, String) {
        let s = self.status.clone().unwrap_or_default();
        let phase = s
            .phase
            .unwrap_or(podsnap_checkpoint_api::PodRestorePhase::Pending)
            .to_string();
        (
            phase,
            s.reason.unwrap_or_default(),
            s.message.unwrap_or_default(),
        )
    }
}

/// Watches the object (kube-runtime's `await_condition`) until its phase is `done` (returns it) or
/// Failed (an error with its reason), printing each new phase on stderr; gives up after `wait`
/// (`hint` says what may be wrong). An object that is gone fails with the API server's answer to
/// a GET of it (NotFound); a watch that breaks after it started is watched again.
async fn await_phase<K>(
    api: &Api<K>,
    namespace: &str,
    name: &str,
    done: &str,
    wait: Duration,
    hint: &str,
) -> anyhow::Result<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static
        + Outcome,
{
    let kind = K::kind(&());
    let deadline = tokio::time::Instant::now() + wait;
    // The last phase printed.
    let last = RefCell::new(None::<String>);
    // Prints a new phase; true once the wait is over: the phase is `done` or Failed, or the
    // object is gone.
    let ended = |object: Option<&K>| {
        let Some(object) = object else {
            return true;
        };
        let (phase, _, _) = object.outcome();
        let mut last = last.borrow_mut();
        if last.as_deref() != Some(phase.as_str()) {
            eprintln!("{kind} {namespace}/{name}: {phase}");
            *last = Some(phase.clone());
        }
        phase == done || phase == "Failed"
    };
    let object = loop {
        let watched =
            tokio::time::timeout_at(deadline, await_condition(api.clone(), name, &ended)).await;
        let Ok(watched) = watched else {
            let phase = last.borrow().clone().unwrap_or_else(|| "Pending".into());
            bail!("{kind} {namespace}/{name} is still {phase} after {wait:?}{hint}");
        };
        match watched {
            Ok(Some(object)) => break object,
            // Gone: the GET fails as it would have without the watch (NotFound); an object that
            // is back (deleted and created again) is waited for.
            Ok(None) => {
                let object = api.get(name).await?;
                if ended(Some(&object)) {
                    break object;
                }
            }
            Err(wait::Error::ProbeFailed(error)) => match error {
                // The LIST or the start of the watch failed: the API server's error, as the GET
                // of the object would have.
                watcher::Error::InitialListFailed(error)
                | watcher::Error::WatchStartFailed(error) => return Err(error.into()),
                // A watch that broke (a dropped connection, an expired resource version) is
                // started again (LIST, WATCH).
                watcher::Error::WatchFailed(_) | watcher::Error::WatchError(_) => {
                    tokio::time::sleep(RETRY).await;
                }
                error @ watcher::Error::NoResourceVersion => return Err(error.into()),
            },
        }
    };
    let (phase, reason, message) = object.outcome();
    if phase == "Failed" {
        bail!("{kind} {namespace}/{name} failed: {reason}: {message}");
    }
    Ok(object)
}

/// The pause before watching again after a watch broke.
const RETRY: Duration = Duration::from_millis(250);

/// `podsnap list`: the PodCheckpoints of the namespace.
pub async fn list(target: &Target) -> anyhow::Result<()> {
    let list = target.checkpoints().list(&ListParams::default()).await?;
    println!("NAME\tSOURCE POD\tPHASE\tNODE\tCONTAINERS\tLOCATION");
    for c in list.items {
        let status = c.status.clone().unwrap_or_default();
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}",
            c.name_any(),
            c.spec.source_pod_name,
            status.phase.map(|p| p.as_str()).unwrap_or_default(),
            status.node_name.unwrap_or_default(),
            status.containers.join(","),
            status
                .checkpoint_location
                .map(|l| l.to_string())
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// `podsnap inspect CHECKPOINT`: the object's status and, when this machine is the checkpoint's
/// node, what the checkpoint holds (as `checkpointctl show` would): containers, images, sizes,
/// CRIU and kernel versions, from its manifest.
pub async fn inspect(
    target: &Target,
    name: &str,
    checkpoints_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let c = target
        .checkpoints()
        .get(name)
        .await
        .with_context(|| format!("get PodCheckpoint {}/{name}", target.namespace))?;
    let status = c.status.clone().unwrap_or_default();
    println!("PodCheckpoint:  {}/{name}", target.namespace);
    println!("Source pod:     {}", c.spec.source_pod_name);
    println!(
        "Phase:          {}",
        status.phase.map(|p| p.as_str()).unwrap_or_default()
    );
    if let Some(reason) = &status.reason {
        println!(
            "Reason:         {reason}: {}",
            status.message.clone().unwrap_or_default()
        );
    }
    println!(
        "Node:           {}",
        status.node_name.clone().unwrap_or_default()
    );
    // The data, where this machine is the checkpoint's node.
    let data = status
        .checkpoint_location
        .as_ref()
        .and_then(|l| l.dir_in(checkpoints_dir));
    match (&status.checkpoint_location, &data) {
        (Some(location), Some(dir)) => println!(
            "Location:       {location} ({} on node {})",
            dir.display(),
            status.node_name.clone().unwrap_or_default()
        ),
        (Some(location), None) => println!("Location:       {location}"),
        (None, _) => println!("Location:"),
    }
    println!(
        "Completed:      {}",
        status.completion_time.clone().unwrap_or_default()
    );
    if let Some(repository) = c.spec.image_repository() {
        let encryption = match c.spec.image_recipients() {
            Some(keys) => format!("encrypted to {} age key(s)", keys.len()),
            None => "not encrypted".to_string(),
        };
        match &status.image {
            Some(image) => println!(
                "Image:          {} ({}, {encryption})",
                image.reference,
                human(u64::try_from(image.size).unwrap_or(0))
            ),
            None => println!("Image:          to be pushed to {repository} ({encryption})"),
        }
        if !status.pull_nodes.is_empty() {
            println!("Pulled on:      {}", status.pull_nodes.join(", "));
        }
    }
    let Some(location) = data else {
        return Ok(());
    };
    let manifest_path = location.join(podsnap_checkpoint_format::MANIFEST);
    let manifest = match std::fs::read(&manifest_path) {
        Ok(data) => data,
        Err(e) => {
            println!(
                "Containers:     {} (the checkpoint's data is on node {}: run inspect there for sizes and versions; {e})",
                status.containers.join(", "),
                status.node_name.unwrap_or_default()
            );
            return Ok(());
        }
    };
    let manifest: podsnap_checkpoint_format::Manifest = serde_json::from_slice(&manifest)
        .with_context(|| format!("parse {}", manifest_path.display()))?;
    println!("CRIU:           {}", manifest.criu_version);
    println!("Kernel:         {}", manifest.kernel);
    // Each file's size, read once.
    let sizes: Vec<(&String, u64)> = manifest
        .files
        .keys()
        .map(|f| {
            let len = std::fs::metadata(location.join(f)).map_or(0, |m| m.len());
            (f, len)
        })
        .collect();
    let size_of = |prefix: &str| -> u64 {
        sizes
            .iter()
            .filter(|(f, _)| f.starts_with(prefix))
            .map(|(_, len)| len)
            .sum()
    };
    println!("Total size:     {}", human(size_of("")));
    println!("Containers:");
    for container in &manifest.containers {
        println!(
            "  {}\timage {}\t{}",
            container.name,
            container.image_name(),
            human(size_of(&format!("{}/", container.name)))
        );
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `podsnap delete CHECKPOINT`: deletes the PodCheckpoint (its deletion policy decides what
/// happens to the node-local data).
pub async fn delete(target: &Target, name: &str) -> anyhow::Result<()> {
    target
        .checkpoints()
        .delete(name, &DeleteParams::default())
        .await
        .with_context(|| format!("delete PodCheckpoint {}/{name}", target.namespace))?;
    eprintln!("PodCheckpoint {}/{name}: deleted", target.namespace);
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::fake_api::FakeApi;

    const HINT: &str = " (is podsnap-controller running?)";

    fn checkpoint(status: Value) -> Value {
        json!({"apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodCheckpoint",
               "metadata": {"name": "c", "namespace": "default", "resourceVersion": "1"},
               "spec": {"sourcePodName": "p"}, "status": status})
    }

    fn modified(object: Value) -> Value {
        json!({"type": "MODIFIED", "object": object})
    }

    async fn wait_checkpoint(fake: &FakeApi, wait: Duration) -> anyhow::Result<PodCheckpoint> {
        let api = Api::namespaced(fake.client(), "default");
        await_phase(&api, "default", "c", "Ready", wait, HINT).await
    }

    #[tokio::test]
    async fn a_checkpoint_is_watched_until_it_is_ready() {
        let fake = FakeApi::new("podcheckpoints", checkpoint(json!({})));
        fake.then_watch(vec![
            modified(checkpoint(json!({"phase": "Checkpointing"}))),
            modified(checkpoint(json!({"phase": "Ready", "nodeName": "n1"}))),
        ]);
        let ready = wait_checkpoint(&fake, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(ready.status.unwrap().node_name.as_deref(), Some("n1"));
        // One LIST and one WATCH, no polling.
        let seen = fake.seen();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen[0].starts_with(
            "GET /apis/checkpoint.k8s.io/v1alpha1/namespaces/default/podcheckpoints?"
        ));
        assert!(
            seen[0].contains("fieldSelector=metadata.name%3Dc"),
            "{seen:?}"
        );
        assert!(seen[1].contains("watch=true"), "{seen:?}");
    }

    #[tokio::test]
    async fn a_failed_checkpoint_fails_with_its_reason() {
        let fake = FakeApi::new("podcheckpoints", checkpoint(json!({"phase": "Pending"})));
        fake.then_watch(vec![modified(checkpoint(json!({"phase": "Failed",
            "reason": "SourcePodNotFound", "message": "pod default/p does not exist"})))]);
        let err = wait_checkpoint(&fake, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "PodCheckpoint default/c failed: SourcePodNotFound: pod default/p does not exist"
        );
    }

    #[tokio::test]
    async fn the_wait_gives_up_with_the_last_phase_and_the_hint() {
        let fake = FakeApi::new("podcheckpoints", checkpoint(json!({})));
        fake.then_watch(vec![modified(checkpoint(
            json!({"phase": "Checkpointing"}),
        ))]);
        let err = wait_checkpoint(&fake, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "PodCheckpoint default/c is still Checkpointing after 300ms (is podsnap-controller running?)"
        );
    }

    #[tokio::test]
    async fn a_deleted_object_fails_as_its_get_does() {
        let fake = FakeApi::new(
            "podcheckpoints",
            checkpoint(json!({"phase": "Checkpointing"})),
        );
        fake.then_watch(vec![json!({"type": "DELETED",
            "object": checkpoint(json!({"phase": "Checkpointing"}))})]);
        let err = wait_checkpoint(&fake, Duration::from_secs(30))
            .await
            .unwrap_err();
        match err.downcast_ref::<kube::Error>() {
            Some(kube::Error::Api(status)) => assert_eq!(status.code, 404, "{status:?}"),
            _ => panic!("not the GET's NotFound: {err:#}"),
        }
    }

    #[tokio::test]
    async fn a_broken_watch_is_watched_again_and_a_restore_ends_completed() {
        let restore = |status: Value| {
            json!({"apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodRestore",
                   "metadata": {"name": "r", "namespace": "default", "resourceVersion": "1"},
                   "spec": {"checkpointName": "c"}, "status": status})
        };
        let fake = FakeApi::new("podrestores", restore(json!({"phase": "Restoring"})));
        fake.then_watch(vec![json!({"type": "ERROR", "object": {
                "apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 410,
                "reason": "Expired", "message": "too old resource version"}})])
            .then_watch(vec![modified(restore(json!({"phase": "Completed",
                "restoredPodNames": ["r-0"]})))]);
        let api = Api::<PodRestore>::namespaced(fake.client(), "default");
        let done = await_phase(
            &api,
            "default",
            "r",
            "Completed",
            Duration::from_secs(30),
            "",
        )
        .await
        .unwrap();
        assert_eq!(done.status.unwrap().restored_pod_names, ["r-0"]);
        let watches = fake
            .seen()
            .iter()
            .filter(|s| s.contains("watch=true"))
            .count();
        assert_eq!(watches, 2, "{:?}", fake.seen());
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(512), "512.0 B");
        assert_eq!(human(3 * 1024 * 1024 / 2), "1.5 MiB");
    }
}

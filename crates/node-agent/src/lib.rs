//! podsnapd's node agent (`podsnapd node-agent`): runs on each node, beside the kubelet and
//! podsnapd's CRI server, and removes the node-local data of deleted PodCheckpoints whose
//! deletion policy is `Delete`: the checkpoint directory under the kubelet's `pod-checkpoints/`
//! and the kubelet's record beside it, then the `checkpoint.k8s.io/node-data` finalizer. It
//! removes nothing outside that directory, and only entries named as the kubelet names
//! checkpoints; a checkpoint still in use by a restore (`checkpoint.k8s.io/in-use`) waits.
//!
//! It also removes the checkpoints of PodCheckpoints that failed on its node: the kubelet
//! records the object's UID beside each checkpoint (`podCheckpointUID` in the record), and a
//! checkpoint recorded for a Failed object is one its controller never learned of (it stopped
//! between the kubelet's answer and its status write).
//!
//! It watches only the PodCheckpoints on its node (field selector `status.nodeName=<node>`, a
//! selectable field of the CRD) and needs nothing else: PodCheckpoints hold no pod spec (that is
//! in a PodTemplate beside each, which the agent's role cannot read).
//!
//! A PodCheckpoint deleted while it is still being taken keeps its node-data finalizer until the
//! controller has ended it (Ready, with its location; or Failed): the data the kubelet is writing
//! then is removed too, not left behind once the object is gone.
//!
//! Checkpoint images ([`images`]): a PodCheckpoint with storage type `Image` that the kubelet has
//! taken on this node (Checkpointing, reason `Pushing`, with its location) is pushed by this
//! node's agent to its repository, tagged with the object's UID, and ended Ready with the image
//! by digest in `status.image` (Failed, `PushFailed`, when the push fails). A Ready image
//! checkpoint whose `status.pullNodes` (written by the controller once a restored pod is bound)
//! lists this node is pulled into the kubelet's directory for the kubelet to restore from
//! ([`pulls`]); it is removed a while after its PodCheckpoint is gone or no longer lists the
//! node. The agent reads no pods.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};

use k8s_openapi::api::core::v1::Secret;
use podsnap_checkpoint_api::finalizers::{self, NODE_DATA};
use podsnap_checkpoint_api::{
    CheckpointImageStatus, Condition, PodCheckpoint, PodCheckpointPhase, PodCheckpointStatus,
    REGISTRY_CREDENTIALS_ERROR, ready_reasons, registry_credentials_name,
};

pub mod images;
pub mod pulls;

pub use images::RegistryConfig;
pub use podsnap_checkpoint_api::SYSTEM_NAMESPACE;

/// Why a reconcile failed (it is retried after a pause).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Data(String),
    #[error("the API server's configuration: {0}")]
    Config(String),
}

/// A client for the API server: from `kubeconfig`, else $KUBECONFIG or the in-cluster
/// configuration.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| Error::Config(format!("kubeconfig {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| Error::Config(format!("kubeconfig {}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| Error::Config(e.to_string()))?,
    };
    Ok(Client::try_from(config)?)
}

fn requeue_on_error(_: Arc<PodCheckpoint>, error: &Error, _: Arc<Agent>) -> Action {
    tracing::warn!(%error, "node agent reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// One node's agent.
pub struct Agent {
    pub client: Client,
    /// This node's name, as PodCheckpoints' `status.nodeName` gives it.
    pub node: String,
    /// The kubelet's pod checkpoint directory (`<root-dir>/pod-checkpoints`).
    pub checkpoints_dir: PathBuf,
    /// podsnapd's pins of checkpoint manifests ([`podsnap_checkpoint_format::pins::PIN_DIR`]).
    pub pins_dir: PathBuf,
    /// How registries are reached.
    pub registry: RegistryConfig,
    /// The most bytes one pulled checkpoint may unpack to.
    pub max_pull_bytes: u64,
    /// How long a pulled checkpoint no pod on this node names is kept.
    pub pulled_ttl: Duration,
    /// Where the controller keeps its copies of PodCheckpoints' registry credentials (its
    /// namespace and this agent's).
    pub credentials_namespace: String,
}

/// A PodCheckpoint's registry credentials, as the controller copied them for the agents from
/// the Secret it names (`spec.storage.image.secretName`).
#[derive(Debug, PartialEq, Eq)]
pub enum Copied {
    /// No copy, and it names no Secret: the agent's own credentials, if any.
    Own,
    /// The copy: a `.dockerconfigjson` with one entry.
    Credentials(Vec<u8>),
    /// It names a Secret the controller has not copied yet.
    NotYet(String),
    /// The Secret it names gives none: the controller's reason.
    Refused(String),
}

/// The registry credentials of PodCheckpoint `uid`, which names Secret `named` or none.
pub async fn copied_credentials(
    agent: &Agent,
    uid: &str,
    named: Option<&str>,
) -> Result<Copied, Error> {
    let copies: Api<Secret> = Api::namespaced(agent.client.clone(), &agent.credentials_namespace);
    let name = registry_credentials_name(uid);
    let Some(copy) = copies.get_opt(&name).await? else {
        return Ok(match named {
            Some(secret) => Copied::NotYet(format!(
                "the controller has not copied the registry credentials of Secret {secret} (to {}/{name}) yet",
                agent.credentials_namespace
            )),
            None => Copied::Own,
        });
    };
    if let Some(reason) = copy.annotations().get(REGISTRY_CREDENTIALS_ERROR) {
        return Ok(Copied::Refused(reason.clone()));
    }
    match copy.data.as_ref().and_then(|d| d.get(".dockerconfigjson")) {
        Some(config) => Ok(Copied::Credentials(config.0.clone())),
        None => Ok(Copied::Refused(format!(
            "Secret {}/{name} has no .dockerconfigjson",
            agent.credentials_namespace
        ))),
    }
}

/// Runs the agent until its watches end.
pub async fn run(agent: Agent) {
    let agent = Arc::new(agent);
    let on_this_node =
        watcher::Config::default().fields(&format!("status.nodeName={}", agent.node));
    let checkpoints = Controller::new(
        Api::<PodCheckpoint>::all(agent.client.clone()),
        on_this_node,
    )
    .run(reconcile, requeue_on_error, agent.clone())
    .for_each(|_| async {});
    futures::join!(checkpoints, pulls::run(agent));
}

async fn reconcile(object: Arc<PodCheckpoint>, agent: Arc<Agent>) -> Result<Action, Error> {
    let status = object.status.clone().unwrap_or_default();
    if status.node_name.as_deref() != Some(agent.node.as_str()) {
        return Ok(Action::await_change());
    }
    if object.meta().deletion_timestamp.is_none() {
        if status.is_pushing()
            && let Some(repository) = object.spec.image_repository()
        {
            return push(&object, &status, repository, &agent).await;
        }
        if status.phase == Some(PodCheckpointPhase::Failed)
            && let Some(uid) = object.uid()
        {
            for location in recorded_for(&agent.checkpoints_dir, &uid).map_err(Error::Data)? {
                remove_data(&agent.checkpoints_dir, &location).map_err(Error::Data)?;
                tracing::warn!(
                    checkpoint = %object.name_any(),
                    location = %location.display(),
                    "removed a checkpoint taken for a PodCheckpoint that failed"
                );
            }
        }
        return Ok(Action::await_change());
    }
    if !object.finalizers().iter().any(|f| f == NODE_DATA) {
        return Ok(Action::await_change());
    }
    if object.finalizers().iter().any(|f| f == finalizers::IN_USE) {
        // A restore still needs the data.
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    if !has_ended(&status) {
        // Still being taken: what the kubelet writes is known once the controller ends it.
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    if let Some(location) = &status.checkpoint_location {
        let dir = location.dir_in(&agent.checkpoints_dir).ok_or_else(|| {
            Error::Data(format!(
                "location {location:?} names no checkpoint directory"
            ))
        })?;
        remove_data(&agent.checkpoints_dir, &dir).map_err(Error::Data)?;
        tracing::info!(checkpoint = %object.name_any(), %location, "removed the checkpoint's data");
    }
    // A checkpoint the kubelet took for it that its status never named (Failed after the
    // kubelet answered).
    if let Some(uid) = object.uid() {
        for location in recorded_for(&agent.checkpoints_dir, &uid).map_err(Error::Data)? {
            remove_data(&agent.checkpoints_dir, &location).map_err(Error::Data)?;
            tracing::info!(checkpoint = %object.name_any(), location = %location.display(), "removed a checkpoint recorded for it");
        }
    }
    let api: Api<PodCheckpoint> = Api::namespaced(
        agent.client.clone(),
        &object.namespace().unwrap_or_else(|| "default".into()),
    );
    finalizers::remove(&api, &object, NODE_DATA).await?;
    Ok(Action::await_change())
}

/// Pushes a checkpoint taken on this node to its repository, then ends its PodCheckpoint: Ready
/// with the image by digest, or Failed (`PushFailed`; its data is then removed as any failed
/// checkpoint's). The status is written only over the version read (a merge patch that names
/// its resourceVersion): an object changed meanwhile (deleted and failed by the controller) is
/// left as it is.
async fn push(
    object: &PodCheckpoint,
    status: &PodCheckpointStatus,
    repository: &str,
    agent: &Agent,
) -> Result<Action, Error> {
    let name = object.name_any();
    let dir_name = status
        .checkpoint_location
        .as_ref()
        .and_then(|l| l.dir_name());
    let location = status
        .checkpoint_location
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let uid = object.uid().unwrap_or_default();
    let checkpoint = dir_name
        .ok_or_else(|| format!("location {location:?} names no checkpoint"))
        .and_then(|n| images::checkpoint_in(&agent.checkpoints_dir, n));
    let credentials = match copied_credentials(agent, &uid, object.spec.image_secret_name()).await?
    {
        Copied::NotYet(why) => {
            tracing::info!(checkpoint = %name, "waiting: {why}");
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
        Copied::Refused(why) => Err(format!("registry credentials: {why}")),
        Copied::Credentials(config) => Ok(Some(config)),
        Copied::Own => Ok(None),
    };
    tracing::info!(checkpoint = %name, %location, %repository, "pushing");
    let started = std::time::Instant::now();
    let api: Api<PodCheckpoint> = Api::namespaced(
        agent.client.clone(),
        &object.namespace().unwrap_or_else(|| "default".into()),
    );
    let result = match (checkpoint, credentials) {
        (Ok(checkpoint), Ok(credentials)) => {
            // A push stops when its PodCheckpoint is deleted (a cancelled migration, say): a
            // registry that hangs or a large image does not hold the deletion up.
            tokio::select! {
                pushed = images::push(
                    &agent.registry,
                    &agent.pins_dir,
                    &checkpoint,
                    repository,
                    &uid,
                    object.spec.image_recipients(),
                    credentials.as_deref(),
                ) => pushed,
                why = deleted_meanwhile(&api, &name, &uid) => {
                    tracing::warn!(checkpoint = %name, seconds = started.elapsed().as_secs_f64(), "push stopped: {why}");
                    Err(format!("push stopped: {why}"))
                }
            }
        }
        (Err(e), _) | (_, Err(e)) => Err(e),
    };
    let ended = match &result {
        Ok(pushed) => {
            tracing::info!(checkpoint = %name, reference = %pushed.reference, size = pushed.size, uploaded = pushed.uploaded, seconds = started.elapsed().as_secs_f64(), "pushed");
            serde_json::json!({
                "phase": "Ready",
                "reason": null,
                "message": null,
                "image": CheckpointImageStatus {
                    reference: pushed.reference.clone(),
                    size: i64::try_from(pushed.size).unwrap_or(i64::MAX),
                },
                "completionTime": podsnap_checkpoint_api::now(),
                "conditions": [Condition::new(
                    "Ready",
                    true,
                    ready_reasons::CHECKPOINT_COMPLETED,
                    &format!("checkpoint at {location} on {}, pushed as {}", agent.node, pushed.reference),
                )],
            })
        }
        Err(message) => {
            tracing::warn!(checkpoint = %name, %message, "push failed");
            serde_json::json!({
                "phase": "Failed",
                "reason": "PushFailed",
                "message": message,
                "conditions": [Condition::new("Ready", false, ready_reasons::CHECKPOINT_FAILED, message)],
            })
        }
    };
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": object.resource_version()},
        "status": ended,
    });
    match api
        .patch_status(
            &name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(Action::await_change()),
        // Changed meanwhile: its next version is reconciled on its own.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            tracing::info!(checkpoint = %name, "changed while it was pushed; its new version decides");
            Ok(Action::await_change())
        }
        Err(e) => Err(e.into()),
    }
}

/// How often a push looks whether its PodCheckpoint is being deleted.
const DELETION_POLL: Duration = Duration::from_secs(1);

/// Returns once PodCheckpoint `name` (UID `uid`) is being deleted, gone, or replaced by another
/// of that name: why. A failed read is tried again at the next poll.
async fn deleted_meanwhile(api: &Api<PodCheckpoint>, name: &str, uid: &str) -> String {
    loop {
        tokio::time::sleep(DELETION_POLL).await;
        match api.get_opt(name).await {
            Ok(None) => return "the PodCheckpoint is gone".to_string(),
            Ok(Some(o)) if o.uid().as_deref() != Some(uid) => {
                return "the PodCheckpoint was replaced".to_string();
            }
            Ok(Some(o)) if o.meta().deletion_timestamp.is_some() => {
                return "the PodCheckpoint is being deleted".to_string();
            }
            Ok(Some(_)) => {}
            Err(e) => {
                tracing::debug!(checkpoint = %name, error = %e, "reading the PodCheckpoint during its push")
            }
        }
    }
}

/// Whether the checkpoint has ended, Ready or Failed, or is taken and being pushed by this agent:
/// until then the kubelet may still be writing data that no status names yet.
pub fn has_ended(status: &PodCheckpointStatus) -> bool {
    matches!(
        status.phase,
        Some(PodCheckpointPhase::Ready | PodCheckpointPhase::Failed)
    ) || status.is_pushing()
}

/// The kubelet's record of a pod checkpoint: `<checkpoint>.kubelet.json`.
const RECORD_SUFFIX: &str = ".kubelet.json";

/// The checkpoints in `dir` whose kubelet record names PodCheckpoint `uid` (`podCheckpointUID`).
/// Only `checkpoint-*.kubelet.json` regular files directly in `dir` are read, up to 1 MiB each;
/// one that cannot be read or parsed is skipped.
pub fn recorded_for(dir: &Path, uid: &str) -> Result<Vec<PathBuf>, String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(checkpoint) = name
            .to_str()
            .filter(|n| n.starts_with("checkpoint-"))
            .and_then(|n| n.strip_suffix(RECORD_SUFFIX))
        else {
            continue;
        };
        let path = entry.path();
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() && meta.len() <= 1 << 20 => {}
            _ => continue,
        }
        let Ok(text) = std::fs::read(&path) else {
            continue;
        };
        let Ok(record) = serde_json::from_slice::<serde_json::Value>(&text) else {
            continue;
        };
        if record["podCheckpointUID"].as_str() == Some(uid) {
            found.push(dir.join(checkpoint));
        }
    }
    Ok(found)
}

/// Removes a checkpoint directory and the kubelet's record beside it; refuses any location that
/// is not a `checkpoint-*` entry directly inside `dir`.
pub fn remove_data(dir: &Path, location: &Path) -> Result<(), String> {
    let name = location
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| n.starts_with("checkpoint-") && !n.contains('/'))
        .ok_or_else(|| format!("{} is not a pod checkpoint name", location.display()))?;
    if location.parent() != Some(dir) {
        return Err(format!(
            "{} is not in the node's checkpoint directory {}",
            location.display(),
            dir.display()
        ));
    }
    let path = dir.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_dir() => {
            std::fs::remove_dir_all(&path).map_err(|e| format!("remove {}: {e}", path.display()))?
        }
        Ok(_) => return Err(format!("{} is not a directory", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    let record = dir.join(format!("{name}{RECORD_SUFFIX}"));
    match std::fs::remove_file(&record) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("remove {}: {e}", record.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_the_checkpoint_and_its_record_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let checkpoint = dir.path().join("checkpoint-p_ns-t");
        std::fs::create_dir_all(checkpoint.join("c/checkpoint")).unwrap();
        std::fs::write(checkpoint.join("c/checkpoint/pages-1.img"), b"x").unwrap();
        std::fs::write(dir.path().join("checkpoint-p_ns-t.kubelet.json"), b"{}").unwrap();
        std::fs::create_dir(dir.path().join("checkpoint-other")).unwrap();
        remove_data(dir.path(), &checkpoint).unwrap();
        assert!(!checkpoint.exists());
        assert!(!dir.path().join("checkpoint-p_ns-t.kubelet.json").exists());
        assert!(dir.path().join("checkpoint-other").exists());
        // Gone already: fine.
        remove_data(dir.path(), &checkpoint).unwrap();
    }

    #[test]
    fn finds_the_checkpoints_recorded_for_an_object() {
        let dir = tempfile::tempdir().unwrap();
        let record = |name: &str, body: &str| {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(format!("{name}.kubelet.json")), body).unwrap();
        };
        record(
            "checkpoint-a_ns-1",
            r#"{"name":"a","podCheckpointUID":"uid-1"}"#,
        );
        record(
            "checkpoint-a_ns-2",
            r#"{"name":"a","podCheckpointUID":"uid-2"}"#,
        );
        record("checkpoint-a_ns-3", r#"{"name":"a"}"#);
        record("checkpoint-a_ns-4", "not json");
        // Not a checkpoint record, though it names the object.
        std::fs::write(
            dir.path().join("other.kubelet.json"),
            r#"{"podCheckpointUID":"uid-1"}"#,
        )
        .unwrap();
        // A link is not followed.
        std::os::unix::fs::symlink(
            dir.path().join("checkpoint-a_ns-1.kubelet.json"),
            dir.path().join("checkpoint-link.kubelet.json"),
        )
        .unwrap();
        assert_eq!(
            recorded_for(dir.path(), "uid-1").unwrap(),
            vec![dir.path().join("checkpoint-a_ns-1")]
        );
        assert!(recorded_for(dir.path(), "uid-9").unwrap().is_empty());
        assert!(
            recorded_for(&dir.path().join("missing"), "uid-1")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn data_is_removed_only_once_the_checkpoint_has_ended() {
        let status = |phase| podsnap_checkpoint_api::PodCheckpointStatus {
            phase,
            node_name: Some("n1".into()),
            ..Default::default()
        };
        assert!(!has_ended(&status(Some(PodCheckpointPhase::Checkpointing))));
        assert!(!has_ended(&status(Some(PodCheckpointPhase::Pending))));
        assert!(!has_ended(&status(None)));
        assert!(has_ended(&status(Some(PodCheckpointPhase::Ready))));
        assert!(has_ended(&status(Some(PodCheckpointPhase::Failed))));
    }

    #[test]
    fn refuses_locations_outside_the_checkpoint_directory() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let outside = elsewhere.path().join("checkpoint-x");
        std::fs::create_dir(&outside).unwrap();
        for bad in [
            outside.clone(),
            dir.path().join("etc"),
            dir.path().join("checkpoint-a/../../x"),
            PathBuf::from("/"),
        ] {
            assert!(remove_data(dir.path(), &bad).is_err(), "{}", bad.display());
        }
        assert!(outside.exists());
        let link = dir.path().join("checkpoint-link");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        assert!(remove_data(dir.path(), &link).is_err());
        assert!(outside.exists());
    }
}

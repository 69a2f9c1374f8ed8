//! Reconciling a `PodCheckpoint`: the source pod must exist, run on the `podsnap` runtime class
//! and be running on a node; then the kubelet of that node checkpoints it
//! (`POST /api/v1/nodes/{node}/proxy/checkpointpod/{namespace}/{pod}`), and the status records
//! where the checkpoint is and its containers; the pod's spec, for restores, goes into a
//! `PodTemplate` owned by the PodCheckpoint, which the status names (`podTemplateRef`).
//!
//! With deletion policy `Delete` the first thing done to a new object is adding the
//! `checkpoint.k8s.io/node-data` finalizer, so that deleting it at any point later, mid-checkpoint
//! included, removes its data on the node. On deletion the controller releases that finalizer
//! itself only where no node can hold data (the object never reached one); otherwise podsnapd's
//! node agent does, once the checkpoint has ended.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, PodSpec, PodTemplate, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PostParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};

use crate::api::{
    CheckpointLocation, CheckpointedContainer, Condition, DeletionPolicy,
    POD_CHECKPOINT_ANNOTATION, PUSHING, PodCheckpoint, PodCheckpointPhase, PodCheckpointStatus,
    PodTemplateRef, RESTORE_FROM, RUNTIME_CLASS, checkpointed_pod_template_name, now,
    ready_reasons, restore_reference,
};
use crate::status::{self, publish};
use crate::{Context, Error, finalizers};

/// [`reconcile`], timed in `podcheckpoint_reconcile_duration_seconds`.
pub async fn reconcile_timed(
    object: Arc<PodCheckpoint>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile(object, ctx.clone()).await;
    ctx.metrics.reconciled(started.elapsed());
    result
}

/// Whether the object's deletion policy is `Delete`.
fn deletes_its_data(object: &PodCheckpoint) -> bool {
    object.spec.deletion_policy == Some(DeletionPolicy::Delete)
}

fn has_finalizer(object: &PodCheckpoint, finalizer: &str) -> bool {
    object.finalizers().iter().any(|f| f == finalizer)
}

/// Whether the node-data finalizer must go on before anything else is done with the object:
/// deletion policy Delete, not there yet, not being deleted, and the object may still have (or
/// get) data on a node — every phase but Failed before it reached one.
pub fn needs_node_data_finalizer(object: &PodCheckpoint) -> bool {
    let status = object.status.as_ref();
    let failed_nowhere = status.and_then(|s| s.phase) == Some(PodCheckpointPhase::Failed)
        && status.and_then(|s| s.node_name.as_deref()).is_none();
    deletes_its_data(object)
        && !has_finalizer(object, finalizers::NODE_DATA)
        && object.meta().deletion_timestamp.is_none()
        && !failed_nowhere
}

/// Who removes the node-data finalizer of a PodCheckpoint being deleted, by its status as the
/// API server has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeDataOnDeletion {
    /// It never reached a node (no `nodeName`): there is no data; the controller removes the
    /// finalizer.
    Nothing,
    /// It is Checkpointing, yet no reconcile of this controller runs it (reconciles of one object
    /// never overlap): a controller before this one stopped mid-checkpoint. It is failed
    /// (`ControllerRestarted`), and the node agent then removes what the kubelet recorded for it.
    Abandoned,
    /// Ready or Failed on a node, or taken and being pushed by the node's agent: that agent
    /// removes the data, then the finalizer.
    NodeAgent,
}

/// Checks a storage repository (`registry[:port]/path`, no tag, no digest) before anything is
/// taken: a name the agent could not push to fails the object now, not after the checkpoint.
pub fn check_repository(repository: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("storage.image.repository {repository:?}: {why}"));
    let Some((registry, path)) = repository.split_once('/') else {
        return bad("it names no registry (registry[:port]/repository)");
    };
    if !registry.contains('.') && !registry.contains(':') && registry != "localhost" {
        return bad("its first part is not a registry host (a dot, a port or localhost)");
    }
    if repository.contains('@') {
        return bad("a repository has no digest: the checkpoint is pushed by its own");
    }
    if path.contains(':') {
        return bad("a repository has no tag: the node agent tags it with the PodCheckpoint's UID");
    }
    let component_ok = |c: &str| {
        !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
    };
    if !path.split('/').all(component_ok) {
        return bad(
            "its path components are lowercase letters, digits and . _ -, each starting alphanumerically",
        );
    }
    let host_ok = registry
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    if !host_ok {
        return bad("its registry host has characters a host name does not");
    }
    Ok(())
}

pub fn node_data_on_deletion(status: Option<&PodCheckpointStatus>) -> NodeDataOnDeletion {
    let Some(status) = status.filter(|s| s.node_name.is_some()) else {
        return NodeDataOnDeletion::Nothing;
    };
    if status.phase == Some(PodCheckpointPhase::Checkpointing) && !status.is_pushing() {
        NodeDataOnDeletion::Abandoned
    } else {
        NodeDataOnDeletion::NodeAgent
    }
}

/// A PodCheckpoint being deleted: its in-use finalizer goes once no PodRestore of it is in
/// progress (also when such a restore was deleted half-way); its node-data finalizer as
/// [`node_data_on_deletion`] says. One finalizer change per reconcile: each is a
/// compare-and-swap on the object's version, and its watch event brings the next reconcile.
async fn reconcile_deletion(
    ctx: &Context,
    api: &Api<PodCheckpoint>,
    object: &PodCheckpoint,
) -> Result<Action, Error> {
    let namespace = object.namespace().unwrap_or_else(|| "default".into());
    let name = object.name_any();
    if has_finalizer(object, finalizers::IN_USE) {
        if status::restore_in_progress(ctx, &namespace, &name, None) {
            // Checked again shortly, on the store (the restore's watch event may reach this
            // controller before the store has it).
            return Ok(Action::requeue(std::time::Duration::from_secs(2)));
        }
        finalizers::remove(api, object, finalizers::IN_USE).await?;
        return Ok(Action::await_change());
    }
    if !has_finalizer(object, finalizers::NODE_DATA) {
        return Ok(Action::await_change());
    }
    // The cache can lag behind this controller's own status writes: decide on the API server's
    // view (a Ready write of the reconcile before this one may not be in the cache yet).
    let Some(fresh) = api.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    match node_data_on_deletion(fresh.status.as_ref()) {
        NodeDataOnDeletion::Nothing => {
            finalizers::remove(api, &fresh, finalizers::NODE_DATA).await?;
            Ok(Action::await_change())
        }
        NodeDataOnDeletion::Abandoned => {
            fail(
                ctx,
                &fresh,
                "ControllerRestarted",
                "the controller restarted during the checkpoint; create a new PodCheckpoint",
            )
            .await
        }
        NodeDataOnDeletion::NodeAgent => Ok(Action::await_change()),
    }
}

pub async fn reconcile(object: Arc<PodCheckpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = object.namespace().unwrap_or_else(|| "default".into());
    let name = object.name_any();
    let phase = object.status.as_ref().and_then(|s| s.phase);
    let api: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &namespace);
    if object.meta().deletion_timestamp.is_some() {
        return reconcile_deletion(&ctx, &api, &object).await;
    }
    if needs_node_data_finalizer(&object) {
        // First, before the kubelet is asked for anything: its data goes when it goes, whenever
        // that is. The finalizer's watch event reconciles the object again.
        finalizers::add(&api, &object, finalizers::NODE_DATA).await?;
        return Ok(Action::await_change());
    }
    if object.status.is_none() {
        // KEP-5823's first state: created, not begun. Its watch event reconciles it again.
        let pending = PodCheckpointStatus {
            phase: Some(PodCheckpointPhase::Pending),
            conditions: vec![Condition::new(
                "Ready",
                false,
                ready_reasons::PENDING,
                &format!("waiting to checkpoint pod {}", object.spec.source_pod_name),
            )],
            ..Default::default()
        };
        status::set(&ctx, object.as_ref(), &pending).await?;
        return Ok(Action::await_change());
    }
    match phase {
        Some(PodCheckpointPhase::Ready) => {
            if object.status.as_ref().is_some_and(|s| s.image.is_some()) {
                let nodes = referencing_nodes(&ctx, &object).await?;
                if !nodes.is_empty()
                    && !crate::restore::record_pull_nodes(&api, &name, &nodes).await?
                {
                    // Changed meanwhile: read again.
                    return Ok(Action::requeue(std::time::Duration::from_secs(1)));
                }
            }
            if ctx.keep_last > 0 {
                prune(&ctx, &api, &object).await?;
            }
            return Ok(Action::await_change());
        }
        Some(PodCheckpointPhase::Failed) => return Ok(Action::await_change()),
        Some(PodCheckpointPhase::Checkpointing) => {
            // The cache can lag behind this controller's own status writes (a reconcile queued
            // by the Checkpointing update runs after the one that wrote Ready): ask the API
            // server before concluding anything.
            let fresh = api.get_opt(&name).await?;
            let Some(status) = fresh
                .and_then(|o| o.status)
                .filter(|s| s.phase == Some(PodCheckpointPhase::Checkpointing))
            else {
                return Ok(Action::await_change());
            };
            if status.is_pushing() {
                // Taken; its node's agent pushes it and ends it.
                return Ok(Action::await_change());
            }
            // Found mid-checkpoint: this controller restarted while the kubelet worked. The
            // kubelet and the runtime thaw the pod and remove partial output on their own (a
            // caller that goes away cancels the checkpoint); the object fails cleanly rather
            // than guessing.
            return fail(
                &ctx,
                &object,
                "ControllerRestarted",
                "the controller restarted during the checkpoint; create a new PodCheckpoint",
            )
            .await;
        }
        _ => {}
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let source = &object.spec.source_pod_name;
    let Some(pod) = pods.get_opt(source).await? else {
        return fail(
            &ctx,
            &object,
            "SourcePodNotFound",
            &format!("pod {namespace}/{source} does not exist"),
        )
        .await;
    };
    let pod_uid = pod.uid().unwrap_or_default();
    if let Some(pinned) = &object.spec.source_pod_uid
        && *pinned != pod_uid
    {
        return fail(
            &ctx,
            &object,
            ready_reasons::SOURCE_POD_REPLACED,
            &format!(
                "pod {namespace}/{source} has UID {pod_uid}, not {pinned} (spec.sourcePodUID): it was replaced"
            ),
        )
        .await;
    }
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.runtime_class_name.as_deref() != Some(RUNTIME_CLASS) {
        return fail(
            &ctx,
            &object,
            "NotPodsnapPod",
            &format!(
                "pod {namespace}/{source} runs with runtime class {:?}: only {RUNTIME_CLASS:?} pods can be checkpointed",
                spec.runtime_class_name.as_deref().unwrap_or("")
            ),
        )
        .await;
    }
    if let Some(repository) = object.spec.image_repository()
        && let Err(message) = check_repository(repository)
    {
        return fail(&ctx, &object, "InvalidStorage", &message).await;
    }
    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    let Some(node) = spec.node_name.clone().filter(|_| running) else {
        return fail(
            &ctx,
            &object,
            "SourcePodNotRunning",
            &format!("pod {namespace}/{source} is not running on a node"),
        )
        .await;
    };

    let checkpointing = PodCheckpointStatus {
        phase: Some(PodCheckpointPhase::Checkpointing),
        node_name: Some(node.clone()),
        source_pod_uid: Some(pod_uid.clone()),
        conditions: vec![Condition::new(
            "Ready",
            false,
            ready_reasons::CHECKPOINT_IN_PROGRESS,
            &format!("checkpointing {source} on {node}"),
        )],
        ..Default::default()
    };
    status::set(&ctx, object.as_ref(), &checkpointing).await?;
    publish(
        &ctx,
        object.as_ref(),
        EventType::Normal,
        "CheckpointStarted",
        &format!("checkpointing pod {source} on node {node}"),
    )
    .await;
    // The kubelet records the object's UID beside the checkpoint: should this controller stop
    // before it writes the location, podsnapd's node agent finds the checkpoint by it.
    let query: Vec<String> = [
        object.uid().map(|uid| format!("podCheckpointUID={uid}")),
        object.spec.timeout_seconds.map(|t| format!("timeout={t}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{}", query.join("&"))
    };
    let path = format!("/api/v1/nodes/{node}/proxy/checkpointpod/{namespace}/{source}{query}");
    let request = http::Request::post(&path)
        .body(Vec::new())
        .map_err(|e| Error::Other(format!("build {path}: {e}")))?;
    tracing::info!(checkpoint = %name, pod = %source, %node, "checkpointing");
    let answer = match ctx.client.request_text(request).await {
        Ok(text) => text,
        Err(kube::Error::Api(status)) => {
            return fail(&ctx, &object, "CheckpointFailed", &status.message).await;
        }
        Err(e) => return fail(&ctx, &object, "CheckpointFailed", &e.to_string()).await,
    };
    let answer: serde_json::Value = match serde_json::from_str(&answer) {
        Ok(answer) => answer,
        Err(e) => {
            // Failed for good (the node agent removes what the kubelet may have recorded for it).
            let message = format!("the kubelet's answer {answer:?}: {e}");
            return fail(&ctx, &object, "CheckpointFailed", &message).await;
        }
    };
    // The kubelet answers with the directory's path; the status names it as KEP-5823 does,
    // relative to the kubelet's checkpoint root.
    let path = answer["items"][0].as_str().unwrap_or_default();
    let Some(location) = CheckpointLocation::Legacy(path.to_string())
        .dir_name()
        .map(CheckpointLocation::node_local)
    else {
        let message = format!("the kubelet's answer {answer} names no checkpoint directory");
        return fail(&ctx, &object, "CheckpointFailed", &message).await;
    };
    let containers: Vec<String> = answer["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str().map(str::to_string))
        .collect();
    // The pod's spec, for restores, in a PodTemplate only the controller reads (a failure here
    // fails the object, and the node agent removes what the kubelet recorded for it).
    let checkpointed_containers = checkpointed_containers(&pod, &containers);
    let template = match save_pod_spec(&ctx, &object, &spec).await {
        Ok(template) => template,
        Err(message) => {
            let message = format!("recording the checkpointed pod's spec: {message}");
            return fail(&ctx, &object, "CheckpointFailed", &message).await;
        }
    };
    let status = match object.spec.image_repository() {
        None => PodCheckpointStatus {
            phase: Some(PodCheckpointPhase::Ready),
            node_name: Some(node.clone()),
            checkpoint_location: Some(location.clone()),
            containers,
            checkpointed_containers,
            completion_time: Some(now()),
            pod_template_ref: Some(template),
            conditions: vec![Condition::new(
                "Ready",
                true,
                ready_reasons::CHECKPOINT_COMPLETED,
                &format!("checkpoint of {source} at {location} on {node}"),
            )],
            ..Default::default()
        },
        // Taken; the node's agent pushes it, then writes Ready with the image.
        Some(repository) => PodCheckpointStatus {
            phase: Some(PodCheckpointPhase::Checkpointing),
            reason: Some(PUSHING.into()),
            node_name: Some(node.clone()),
            checkpoint_location: Some(location.clone()),
            containers,
            checkpointed_containers,
            pod_template_ref: Some(template),
            conditions: vec![Condition::new(
                "Ready",
                false,
                PUSHING,
                &format!("checkpoint of {source} at {location} on {node}, pushing to {repository}"),
            )],
            ..Default::default()
        },
    };
    // The checkpoint exists now: recording it must not be lost to one failed write (a retried
    // reconcile would find the object Checkpointing and fail it).
    let mut attempt = 1;
    while let Err(e) = status::set(&ctx, object.as_ref(), &status).await {
        if attempt == 5 {
            return Err(e);
        }
        tracing::warn!(checkpoint = %name, error = %e, attempt, "recording the checkpoint failed; retrying");
        tokio::time::sleep(std::time::Duration::from_millis(200 << attempt)).await;
        attempt += 1;
    }
    publish(
        &ctx,
        object.as_ref(),
        EventType::Normal,
        "CheckpointSucceeded",
        &format!("pod {source} checkpointed on node {node}: {location}"),
    )
    .await;
    Ok(Action::await_change())
}

/// The nodes of the pods bound to restore from `object` by reference (their
/// `checkpoint.k8s.io/restore-from` names it), in its namespace and in those its
/// `spec.restoreNamespaces` lists, that have not ended: an image checkpoint is pulled there (the
/// node's agent pulls what `status.pullNodes` lists). Any such pod passed admission's `restore`
/// check on this checkpoint when it was created.
async fn referencing_nodes(ctx: &Context, object: &PodCheckpoint) -> Result<Vec<String>, Error> {
    let home = object.namespace().unwrap_or_else(|| "default".into());
    let name = object.name_any();
    let mut nodes = Vec::new();
    for namespace in std::iter::once(&home).chain(&object.spec.restore_namespaces) {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
        for pod in pods.list(&kube::api::ListParams::default()).await? {
            let referenced = pod
                .annotations()
                .get(RESTORE_FROM)
                .and_then(|v| restore_reference(v, namespace));
            let ended = matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            );
            if referenced.as_ref() == Some(&(home.clone(), name.clone()))
                && !ended
                && let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone())
                && !nodes.contains(&node)
            {
                nodes.push(node);
            }
        }
    }
    Ok(nodes)
}

/// The checkpointed containers `names` of `pod`, each with the image its node ran: by digest
/// (`repository@sha256:…`, the runtime's image reference) where the pod's status reports one,
/// else as the spec names it.
pub fn checkpointed_containers(pod: &Pod, names: &[String]) -> Vec<CheckpointedContainer> {
    let spec = pod.spec.as_ref();
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default();
    names
        .iter()
        .map(|name| {
            let by_digest = statuses
                .iter()
                .find(|s| &s.name == name)
                .map(|s| s.image_id.trim_start_matches("docker-pullable://"))
                .filter(|id| {
                    id.split_once("@sha256:").is_some_and(|(repository, hex)| {
                        !repository.is_empty()
                            && hex.len() == 64
                            && hex.bytes().all(|b| b.is_ascii_hexdigit())
                    })
                });
            let in_spec = spec
                .and_then(|s| s.containers.iter().find(|c| &c.name == name))
                .and_then(|c| c.image.as_deref());
            CheckpointedContainer {
                name: name.clone(),
                image: by_digest.or(in_spec).unwrap_or_default().to_string(),
            }
        })
        .collect()
}

/// The PodTemplate that keeps the checkpointed pod's `spec` for the PodCheckpoint `object`:
/// named by its UID, owned by it (the garbage collector removes it with the object). Ephemeral
/// containers are left out: no pod can be created with them, and a template may not hold them.
pub fn pod_template(object: &PodCheckpoint, spec: &PodSpec) -> Result<PodTemplate, String> {
    let uid = object
        .uid()
        .ok_or_else(|| format!("PodCheckpoint {} has no UID", object.name_any()))?;
    let mut spec = spec.clone();
    spec.ephemeral_containers = None;
    Ok(PodTemplate {
        metadata: ObjectMeta {
            name: Some(checkpointed_pod_template_name(&uid)),
            namespace: object.namespace(),
            annotations: Some(
                [(POD_CHECKPOINT_ANNOTATION.to_string(), object.name_any())]
                    .into_iter()
                    .collect(),
            ),
            owner_references: object.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        template: Some(PodTemplateSpec {
            metadata: None,
            spec: Some(spec),
        }),
    })
}

/// Whether `found`, a PodTemplate of the name `wanted` has, is one this controller wrote for the
/// same PodCheckpoint with the same spec: an earlier attempt's whose answer was lost. Anything
/// else is refused — someone else's template must not become the spec restores start from.
pub fn is_same_template(found: &PodTemplate, wanted: &PodTemplate) -> bool {
    let owner = |t: &PodTemplate| {
        t.metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))
            .map(|o| o.uid.clone())
    };
    let spec = |t: &PodTemplate| t.template.as_ref().and_then(|t| t.spec.clone());
    owner(found).is_some() && owner(found) == owner(wanted) && spec(found) == spec(wanted)
}

/// Creates the checkpoint's PodTemplate (see [`pod_template`]), retrying a failed call a few
/// times; returns what the status records of it.
async fn save_pod_spec(
    ctx: &Context,
    object: &PodCheckpoint,
    spec: &PodSpec,
) -> Result<PodTemplateRef, String> {
    let wanted = pod_template(object, spec)?;
    let name = wanted.name_any();
    let api: Api<PodTemplate> = Api::namespaced(
        ctx.client.clone(),
        &object.namespace().unwrap_or_else(|| "default".into()),
    );
    let mut attempt = 1;
    let saved = loop {
        let error = match api.create(&PostParams::default(), &wanted).await {
            Ok(saved) => break saved,
            Err(kube::Error::Api(status)) if status.code == 409 => match api.get(&name).await {
                Ok(found) if is_same_template(&found, &wanted) => break found,
                Ok(_) => {
                    return Err(format!(
                        "PodTemplate {name} exists and is not this checkpoint's"
                    ));
                }
                Err(e) => e,
            },
            Err(kube::Error::Api(status)) if status.code < 500 && status.code != 429 => {
                return Err(format!("create PodTemplate {name}: {}", status.message));
            }
            Err(e) => e,
        };
        if attempt == 5 {
            return Err(format!("create PodTemplate {name}: {error}"));
        }
        tracing::warn!(template = %name, error = %error, attempt, "saving the pod spec failed; retrying");
        tokio::time::sleep(std::time::Duration::from_millis(200 << attempt)).await;
        attempt += 1;
    };
    Ok(PodTemplateRef {
        name,
        uid: saved.uid().unwrap_or_default(),
        resource_version: saved.resource_version().unwrap_or_default(),
    })
}

/// Retention: deletes the oldest Ready checkpoints of the same source pod beyond `keep_last`
/// (each one's deletion policy and finalizers then apply as for any deletion).
async fn prune(
    ctx: &Context,
    api: &Api<PodCheckpoint>,
    object: &PodCheckpoint,
) -> Result<(), Error> {
    // The controller's own reflector store (no LIST per reconcile): the object was reconciled
    // Ready from it, so it is there as Ready.
    let namespace = object.namespace();
    let mut ready: Vec<Arc<PodCheckpoint>> = ctx
        .checkpoints
        .state()
        .into_iter()
        .filter(|c| {
            c.namespace() == namespace
                && c.spec.source_pod_name == object.spec.source_pod_name
                && c.meta().deletion_timestamp.is_none()
                && c.status.as_ref().and_then(|s| s.phase) == Some(PodCheckpointPhase::Ready)
        })
        .collect();
    if ready.len() <= ctx.keep_last {
        return Ok(());
    }
    // Oldest first: by completion time, then creation.
    ready.sort_by_key(|c| {
        (
            c.status
                .as_ref()
                .and_then(|s| s.completion_time.clone())
                .unwrap_or_default(),
            c.meta().creation_timestamp.clone().map(|t| t.0),
        )
    });
    let excess = ready.len() - ctx.keep_last;
    for old in ready.into_iter().take(excess) {
        let name = old.name_any();
        match api.delete(&name, &Default::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => continue,
            Err(e) => return Err(e.into()),
        }
        tracing::info!(checkpoint = %name, pod = %object.spec.source_pod_name, keep = ctx.keep_last, "pruned");
        publish(
            ctx,
            object,
            EventType::Normal,
            "Pruned",
            &format!(
                "deleted PodCheckpoint {name}: only the last {} checkpoints of pod {} are kept",
                ctx.keep_last, object.spec.source_pod_name
            ),
        )
        .await;
    }
    Ok(())
}

/// Fails the checkpoint (condition Ready False).
async fn fail(
    ctx: &Context,
    object: &PodCheckpoint,
    reason: &str,
    message: &str,
) -> Result<Action, Error> {
    status::fail(ctx, object, "Ready", reason, message).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpointed_containers_carry_their_images_by_digest_where_the_node_said_one() {
        let digest = "a".repeat(64);
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [
                {"name": "by-digest", "image": "busybox:1.37.0"},
                {"name": "local", "image": "localhost/built-here"},
                {"name": "not-running", "image": "alpine:3"}
            ]},
            "status": {"containerStatuses": [
                {"name": "by-digest", "image": "busybox:1.37.0", "imageID": format!("docker.io/library/busybox@sha256:{digest}"),
                 "ready": true, "restartCount": 0},
                {"name": "local", "image": "localhost/built-here", "imageID": "sha256:0123",
                 "ready": true, "restartCount": 0}
            ]}
        }))
        .unwrap();
        let names = ["by-digest", "local", "not-running"].map(String::from);
        let images: Vec<String> = checkpointed_containers(&pod, &names)
            .into_iter()
            .map(|c| c.image)
            .collect();
        assert_eq!(
            images,
            [
                format!("docker.io/library/busybox@sha256:{digest}"),
                "localhost/built-here".to_string(),
                "alpine:3".to_string()
            ]
        );
    }
    use crate::fake_api::{FakeApi, Seen, context, path_of};
    use serde_json::{Value, json};

    const GROUP: &str = "checkpoint.k8s.io/v1alpha1";

    fn checkpoint_path() -> String {
        path_of(GROUP, "podcheckpoints", "default", "c")
    }

    fn checkpoint(metadata: Value, spec: Value, status: Value) -> Value {
        let mut object = json!({
            "apiVersion": GROUP, "kind": "PodCheckpoint",
            "metadata": {"name": "c", "namespace": "default", "uid": "ckpt-uid",
                         "resourceVersion": "1"},
            "spec": spec,
        });
        crate::fake_api::merge(&mut object["metadata"], &metadata);
        if !status.is_null() {
            object["status"] = status;
        }
        object
    }

    fn parse(object: Value) -> PodCheckpoint {
        serde_json::from_value(object).unwrap()
    }

    fn running_pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "default", "uid": "pod-uid"},
            "spec": {"runtimeClassName": "podsnap", "nodeName": "n1",
                     "containers": [{"name": "counter", "image": "busybox"}],
                     "ephemeralContainers": [{"name": "debug", "image": "busybox"}]},
            "status": {"phase": "Running"},
        })
    }

    /// Reconciles the object as the API server has it now, as the controller does on each of its
    /// watch events.
    async fn reconcile_stored(fake: &FakeApi) -> Action {
        let object = parse(fake.get(&checkpoint_path()).unwrap());
        reconcile(Arc::new(object), context(fake)).await.unwrap()
    }

    fn position(seen: &[Seen], what: &str, wanted: impl Fn(&Seen) -> bool) -> usize {
        seen.iter().position(wanted).unwrap_or_else(|| {
            let lines: Vec<String> = seen.iter().map(Seen::line).collect();
            panic!("no {what} in {lines:#?}")
        })
    }

    #[tokio::test]
    async fn the_node_data_finalizer_goes_on_before_the_kubelet_is_asked_to_checkpoint() {
        let fake = FakeApi::default();
        fake.put(
            &checkpoint_path(),
            checkpoint(
                json!({}),
                json!({"sourcePodName": "p", "deletionPolicy": "Delete"}),
                Value::Null,
            ),
        );
        fake.put(&path_of("v1", "pods", "default", "p"), running_pod());
        fake.kubelet_answers(json!({
            "items": ["/var/lib/kubelet/pod-checkpoints/checkpoint-p_default-t"],
            "containers": ["counter"],
        }));

        // The first reconcile of the new object only adds the finalizer.
        reconcile_stored(&fake).await;
        let first: Vec<String> = fake.seen().iter().map(Seen::line).collect();
        assert_eq!(first, [format!("PATCH {}", checkpoint_path())]);
        let stored = fake.get(&checkpoint_path()).unwrap();
        assert_eq!(
            stored["metadata"]["finalizers"],
            json!([finalizers::NODE_DATA])
        );
        // The next one says it is Pending (KEP-5823), still without asking the kubelet.
        reconcile_stored(&fake).await;
        let pending = parse(fake.get(&checkpoint_path()).unwrap()).status.unwrap();
        assert_eq!(pending.phase, Some(PodCheckpointPhase::Pending));
        assert_eq!(
            pending.conditions[0].reason.as_deref(),
            Some(ready_reasons::PENDING)
        );
        assert_eq!(
            pending.conditions[0].status,
            crate::api::ConditionStatus::False
        );
        assert!(
            fake.seen()
                .iter()
                .all(|s| !s.path.contains("/proxy/checkpointpod/"))
        );
        // The next ones (its watch events) checkpoint it.
        for _ in 0..3 {
            reconcile_stored(&fake).await;
        }
        let seen = fake.seen();
        let finalizer = position(&seen, "node-data finalizer patch", |s| {
            s.method == "PATCH"
                && s.path == checkpoint_path()
                && s.body["metadata"]["finalizers"]
                    .to_string()
                    .contains(finalizers::NODE_DATA)
        });
        let kubelet = position(&seen, "kubelet checkpoint", |s| {
            s.method == "POST" && s.path.contains("/proxy/checkpointpod/default/p")
        });
        assert!(
            finalizer < kubelet,
            "finalizer at {finalizer}, kubelet at {kubelet}"
        );
        assert!(seen[kubelet].query.contains("podCheckpointUID=ckpt-uid"));

        let stored = parse(fake.get(&checkpoint_path()).unwrap());
        let status = stored.status.clone().unwrap();
        assert_eq!(status.phase, Some(PodCheckpointPhase::Ready));
        assert_eq!(stored.finalizers(), [finalizers::NODE_DATA]);
        // The location as KEP-5823 writes it: the directory relative to the checkpoint root.
        assert_eq!(
            fake.get(&checkpoint_path()).unwrap()["status"]["checkpointLocation"],
            json!({"type": "NodeLocal", "nodeLocal": {"path": "checkpoint-p_default-t"}})
        );
        // The pod spec is in the checkpoint's PodTemplate, not in the PodCheckpoint.
        assert_eq!(status.checkpointed_pod_spec, None);
        let reference = status.pod_template_ref.unwrap();
        assert_eq!(reference.name, "podcheckpoint-ckpt-uid");
        let template = fake
            .get(&path_of("v1", "podtemplates", "default", &reference.name))
            .unwrap();
        assert_eq!(template["metadata"]["uid"], json!(reference.uid));
        assert_eq!(
            template["metadata"]["resourceVersion"],
            json!(reference.resource_version)
        );
        assert_eq!(
            template["metadata"]["ownerReferences"][0]["uid"],
            "ckpt-uid"
        );
        assert_eq!(
            template["metadata"]["ownerReferences"][0]["controller"],
            true
        );
        assert_eq!(
            template["template"]["spec"]["containers"][0]["name"],
            "counter"
        );
        assert!(template["template"]["spec"]["ephemeralContainers"].is_null());
    }

    #[test]
    fn only_delete_policy_objects_that_may_hold_node_data_need_the_finalizer() {
        let with = |spec: Value, status: Value, metadata: Value| {
            needs_node_data_finalizer(&parse(checkpoint(metadata, spec, status)))
        };
        let delete = json!({"sourcePodName": "p", "deletionPolicy": "Delete"});
        let retain = json!({"sourcePodName": "p", "deletionPolicy": "Retain"});
        assert!(with(delete.clone(), Value::Null, json!({})));
        assert!(with(
            delete.clone(),
            json!({"phase": "Checkpointing", "nodeName": "n1"}),
            json!({})
        ));
        // A Ready one of an older controller, which added it only then.
        assert!(with(
            delete.clone(),
            json!({"phase": "Ready", "nodeName": "n1"}),
            json!({})
        ));
        assert!(!with(retain, Value::Null, json!({})));
        assert!(!with(json!({"sourcePodName": "p"}), Value::Null, json!({})));
        assert!(!with(
            delete.clone(),
            Value::Null,
            json!({"finalizers": [finalizers::NODE_DATA]})
        ));
        assert!(!with(
            delete.clone(),
            Value::Null,
            json!({"deletionTimestamp": "2026-01-01T00:00:00Z"})
        ));
        assert!(!with(
            delete,
            json!({"phase": "Failed", "reason": "SourcePodNotFound"}),
            json!({})
        ));
    }

    #[test]
    fn who_releases_node_data_on_deletion() {
        let of = |status: Value| {
            node_data_on_deletion(
                serde_json::from_value::<Option<PodCheckpointStatus>>(status)
                    .unwrap()
                    .as_ref(),
            )
        };
        assert_eq!(of(Value::Null), NodeDataOnDeletion::Nothing);
        assert_eq!(
            of(json!({"phase": "Failed", "reason": "SourcePodNotFound"})),
            NodeDataOnDeletion::Nothing
        );
        assert_eq!(
            of(json!({"phase": "Checkpointing", "nodeName": "n1"})),
            NodeDataOnDeletion::Abandoned
        );
        assert_eq!(
            of(json!({"phase": "Ready", "nodeName": "n1"})),
            NodeDataOnDeletion::NodeAgent
        );
        assert_eq!(
            of(json!({"phase": "Failed", "reason": "ControllerRestarted", "nodeName": "n1"})),
            NodeDataOnDeletion::NodeAgent
        );
    }

    /// Stores a Delete-policy checkpoint being deleted with `status`, reconciles it once.
    async fn reconcile_deleted(status: Value) -> FakeApi {
        let fake = FakeApi::default();
        fake.put(
            &checkpoint_path(),
            checkpoint(
                json!({"deletionTimestamp": "2026-01-01T00:00:00Z",
                       "finalizers": [finalizers::NODE_DATA]}),
                json!({"sourcePodName": "p", "deletionPolicy": "Delete"}),
                status,
            ),
        );
        reconcile_stored(&fake).await;
        fake
    }

    #[tokio::test]
    async fn a_deleted_checkpoint_that_never_reached_a_node_is_released_by_the_controller() {
        for status in [
            Value::Null,
            json!({"phase": "Failed", "reason": "NotPodsnapPod"}),
        ] {
            let fake = reconcile_deleted(status).await;
            let stored = parse(fake.get(&checkpoint_path()).unwrap());
            assert!(stored.finalizers().is_empty(), "{stored:?}");
        }
    }

    #[tokio::test]
    async fn a_deleted_checkpoint_found_mid_checkpoint_is_failed_and_left_to_the_node_agent() {
        let fake = reconcile_deleted(json!({"phase": "Checkpointing", "nodeName": "n1"})).await;
        let stored = parse(fake.get(&checkpoint_path()).unwrap());
        let status = stored.status.clone().unwrap();
        assert_eq!(status.phase, Some(PodCheckpointPhase::Failed));
        assert_eq!(status.reason.as_deref(), Some("ControllerRestarted"));
        assert_eq!(status.node_name.as_deref(), Some("n1"));
        assert_eq!(stored.finalizers(), [finalizers::NODE_DATA]);
    }

    #[tokio::test]
    async fn a_deleted_ready_checkpoint_is_left_to_the_node_agent() {
        let fake = reconcile_deleted(json!({"phase": "Ready", "nodeName": "n1",
                                             "checkpointLocation": "/x/checkpoint-p"}))
        .await;
        assert!(
            fake.seen().iter().all(|s| s.method == "GET"),
            "{:?}",
            fake.seen()
        );
        let stored = parse(fake.get(&checkpoint_path()).unwrap());
        assert_eq!(stored.finalizers(), [finalizers::NODE_DATA]);
    }

    #[test]
    fn storage_repositories_name_a_registry_and_no_tag_or_digest() {
        for good in [
            "registry.example/team/counter",
            "podsnap-registry:5000/e2e/counter",
            "localhost/x",
            "10.0.0.1:5000/a/b-c_d.e",
        ] {
            assert_eq!(check_repository(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("counter", "names no registry"),
            ("team/counter", "not a registry host"),
            ("registry.example/team/counter:v1", "no tag"),
            ("registry.example/team/counter@sha256:00", "no digest"),
            ("registry.example/Team/counter", "lowercase"),
            ("registry.example/team//counter", "lowercase"),
            ("registry.example/-x", "lowercase"),
            ("regi$try.example/x", "host name"),
        ] {
            let err = check_repository(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn a_checkpoint_being_pushed_is_left_to_its_node_agent() {
        // Found Checkpointing with a location (taken; its agent pushes): not failed as one a
        // restarted controller abandoned, neither when reconciled nor when deleted.
        let status = json!({"phase": "Checkpointing", "nodeName": "n1", "reason": "Pushing",
                            "checkpointLocation": "/var/lib/kubelet/pod-checkpoints/checkpoint-p_default-t"});
        let fake = FakeApi::default();
        fake.put(
            &checkpoint_path(),
            checkpoint(
                json!({"name": "c", "namespace": "default", "uid": "u1", "resourceVersion": "4"}),
                json!({"sourcePodName": "p",
                       "storage": {"type": "Image", "image": {"repository": "r.example/x"}}}),
                status.clone(),
            ),
        );
        reconcile_stored(&fake).await;
        let stored = fake.get(&checkpoint_path()).unwrap();
        assert_eq!(stored["status"], status);
        let parsed: PodCheckpointStatus = serde_json::from_value(status).unwrap();
        assert_eq!(
            node_data_on_deletion(Some(&parsed)),
            NodeDataOnDeletion::NodeAgent
        );
    }

    #[test]
    fn only_this_checkpoints_own_template_with_the_same_spec_is_taken_as_saved() {
        let object = parse(checkpoint(
            json!({}),
            json!({"sourcePodName": "p"}),
            Value::Null,
        ));
        let spec: PodSpec = serde_json::from_value(running_pod()["spec"].clone()).unwrap();
        let wanted = pod_template(&object, &spec).unwrap();
        assert_eq!(
            wanted.metadata.name.as_deref(),
            Some("podcheckpoint-ckpt-uid")
        );
        assert_eq!(
            wanted.metadata.annotations.as_ref().unwrap()[POD_CHECKPOINT_ANNOTATION],
            "c"
        );
        let mut found = wanted.clone();
        found.metadata.uid = Some("t".into());
        assert!(is_same_template(&found, &wanted));
        let mut other_spec = found.clone();
        other_spec
            .template
            .as_mut()
            .unwrap()
            .spec
            .as_mut()
            .unwrap()
            .host_network = Some(true);
        assert!(!is_same_template(&other_spec, &wanted));
        let mut not_owned = found.clone();
        not_owned.metadata.owner_references = None;
        assert!(!is_same_template(&not_owned, &wanted));
    }
}

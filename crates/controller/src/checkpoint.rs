//! Reconciling a `PodCheckpoint` beside the kubelet, which takes it (KEP-5823): the kubelet of
//! the source pod's node watches PodCheckpoints, checkpoints the pod through CRI CheckpointPod and
//! writes the status (Checkpointing, then Ready with the location and containers, or Failed). This
//! controller says `Pending` first, fails what no kubelet will take (the pod does not exist, runs
//! on another runtime class or on no node, a bad storage repository; `NotTaken` when no kubelet
//! took a valid one within [`TAKE_WITHIN`]), saves the pod's spec for PodRestores in a
//! `PodTemplate` owned by the PodCheckpoint (`status.podTemplateRef`), and keeps finalizers and
//! retention. It never reaches a kubelet itself. Each of its status writes before the kubelet's is
//! a compare-and-swap on the object's version, so that it never overwrites the kubelet's claim.
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
    Condition, DeletionPolicy, POD_CHECKPOINT_ANNOTATION, PodCheckpoint, PodCheckpointPhase,
    PodCheckpointStatus, PodTemplateRef, RESTORE_FROM, RUNTIME_CLASS,
    checkpointed_pod_template_name, ready_reasons, restore_reference,
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
    /// It reached a node: Ready or Failed there, being taken by its kubelet (which ends it, or
    /// fails it on its restart), or being pushed by the node's agent. That agent removes the
    /// data once it has ended, then the finalizer.
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
    if status.is_some_and(|s| s.node_name.is_some()) {
        NodeDataOnDeletion::NodeAgent
    } else {
        NodeDataOnDeletion::Nothing
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
    // No restore pulls it any more: the agents' copy of its registry credentials goes.
    crate::credentials::remove(ctx, object).await?;
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
        NodeDataOnDeletion::NodeAgent => Ok(Action::await_change()),
    }
}

/// How long a valid PodCheckpoint may wait, Pending, for the kubelet of its pod's node to take
/// it before it is failed (`NotTaken`): a kubelet without the PodLevelCheckpointRestore gate, or
/// whose role cannot watch PodCheckpoints, never does.
pub const TAKE_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);

pub async fn reconcile(object: Arc<PodCheckpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = object.namespace().unwrap_or_else(|| "default".into());
    let name = object.name_any();
    let phase = object.status.as_ref().and_then(|s| s.phase);
    let api: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &namespace);
    if object.meta().deletion_timestamp.is_some() {
        ctx.metrics.forget(&object.uid().unwrap_or_default());
        return reconcile_deletion(&ctx, &api, &object).await;
    }
    status::observe(&ctx, &object, object.status.as_ref());
    if needs_node_data_finalizer(&object) {
        // First, before anything is taken: its data goes when it goes, whenever that is. The
        // finalizer's watch event reconciles the object again.
        finalizers::add(&api, &object, finalizers::NODE_DATA).await?;
        return Ok(Action::await_change());
    }
    if object.status.is_none() {
        // KEP-5823's first state: created, not begun; only if the kubelet has not taken it
        // meanwhile. Its watch event reconciles it again.
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
        if !status::set_at_version(&ctx, object.as_ref(), &pending).await? {
            return Ok(Action::requeue(std::time::Duration::from_secs(1)));
        }
        return Ok(Action::await_change());
    }
    match phase {
        Some(PodCheckpointPhase::Ready) => {
            keep_pod_spec(&ctx, &object).await?;
            if object.status.as_ref().is_some_and(|s| s.image.is_some()) {
                let (nodes, pull_secrets) = referencing_nodes(&ctx, &object).await?;
                // Before the nodes are listed: their agents pull with it.
                crate::credentials::ensure_from_pull_secrets(&ctx, &object, &pull_secrets).await?;
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
            // The kubelet of its node takes it (KEP-5823) and ends it, or its node's agent
            // once pushed; the kubelet fails one it finds abandoned by its own restart. Taken
            // before this controller saw it Pending, its registry credentials are copied now:
            // a Secret that gives none is said by the copy, and the agent fails the push.
            crate::credentials::ensure(&ctx, &object).await?;
            keep_pod_spec(&ctx, &object).await?;
            return Ok(Action::await_change());
        }
        _ => {}
    }
    // Pending: what the kubelet cannot say, because no kubelet will take it, is said here. Every
    // failure is written only if the kubelet has not taken it meanwhile.
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
    if let Some(message) = crate::credentials::ensure(&ctx, &object).await? {
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
    let status = object.status.clone().unwrap_or_default();
    if status.pod_template_ref.is_none() {
        // The pod's spec, for PodRestores, in a PodTemplate only the controller reads, saved
        // now, while the pod is the one the kubelet is about to checkpoint.
        let template = match save_pod_spec(&ctx, &object, &spec).await {
            Ok(template) => template,
            Err(message) => {
                let message = format!("recording the pod's spec: {message}");
                return fail(&ctx, &object, ready_reasons::CHECKPOINT_FAILED, &message).await;
            }
        };
        let waiting = PodCheckpointStatus {
            pod_template_ref: Some(template),
            conditions: vec![Condition::new(
                "Ready",
                false,
                ready_reasons::PENDING,
                &format!("waiting for the kubelet of node {node} to checkpoint pod {source}"),
            )],
            ..Default::default()
        };
        if !status::set_at_version(&ctx, object.as_ref(), &waiting).await? {
            // Taken meanwhile: its next event says by whom; the spec is recorded then.
            return Ok(Action::requeue(std::time::Duration::from_secs(1)));
        }
        tracing::info!(checkpoint = %name, pod = %source, %node, "waiting for the kubelet");
        return Ok(Action::requeue(TAKE_WITHIN));
    }
    let waited = object
        .meta()
        .creation_timestamp
        .as_ref()
        .and_then(|t| {
            std::time::Duration::try_from(jiff::Timestamp::now().duration_since(t.0)).ok()
        })
        .unwrap_or_default();
    if waited < TAKE_WITHIN {
        return Ok(Action::requeue(TAKE_WITHIN - waited));
    }
    fail(
        &ctx,
        &object,
        "NotTaken",
        &format!(
            "the kubelet of node {node} did not take the checkpoint within {}s: its \
             PodLevelCheckpointRestore feature gate must be on and its role must grant list and \
             watch on podcheckpoints (deploy/rbac.yaml, podsnap-kubelet)",
            TAKE_WITHIN.as_secs()
        ),
    )
    .await
}

/// Records the checkpointed pod's spec (a PodTemplate, `status.podTemplateRef`) for a
/// PodCheckpoint the kubelet took before this controller could: from its source pod, if that is
/// still the pod the kubelet took (`status.sourcePodUID`). Without it the checkpoint is still
/// restored by reference (a pod naming it), not through a PodRestore.
async fn keep_pod_spec(ctx: &Context, object: &PodCheckpoint) -> Result<(), Error> {
    let Some(status) = object.status.as_ref() else {
        return Ok(());
    };
    if status.pod_template_ref.is_some() {
        return Ok(());
    }
    let namespace = object.namespace().unwrap_or_else(|| "default".into());
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let pod = pods.get_opt(&object.spec.source_pod_name).await?;
    let Some(spec) = pod
        .filter(|p| p.uid().is_some() && p.uid() == status.source_pod_uid)
        .and_then(|p| p.spec)
    else {
        tracing::warn!(checkpoint = %object.name_any(), "the checkpointed pod is gone: no PodTemplate, no PodRestore of it");
        return Ok(());
    };
    let template = save_pod_spec(ctx, object, &spec)
        .await
        .map_err(Error::Other)?;
    let recorded = PodCheckpointStatus {
        pod_template_ref: Some(template),
        ..Default::default()
    };
    status::set(ctx, object, &recorded).await
}

/// The nodes of the pods bound to restore from `object` by reference (their
/// `checkpoint.k8s.io/restore-from` names it), in its namespace and in those its
/// `spec.restoreNamespaces` lists, that have not ended: an image checkpoint is pulled there (the
/// node's agent pulls what `status.pullNodes` lists). Any such pod passed admission's `restore`
/// check on this checkpoint when it was created. Also the `imagePullSecrets` of those pods,
/// each with its pod's namespace, in order.
async fn referencing_nodes(
    ctx: &Context,
    object: &PodCheckpoint,
) -> Result<(Vec<String>, Vec<(String, String)>), Error> {
    let home = object.namespace().unwrap_or_else(|| "default".into());
    let name = object.name_any();
    let mut nodes = Vec::new();
    let mut pull_secrets = Vec::new();
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
            {
                for secret in pod
                    .spec
                    .iter()
                    .flat_map(|s| s.image_pull_secrets.iter().flatten())
                {
                    let entry = (namespace.clone(), secret.name.clone());
                    if !secret.name.is_empty() && !pull_secrets.contains(&entry) {
                        pull_secrets.push(entry);
                    }
                }
                if !nodes.contains(&node) {
                    nodes.push(node);
                }
            }
        }
    }
    Ok((nodes, pull_secrets))
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

/// Fails the checkpoint (condition Ready False), only if the kubelet has not taken it meanwhile
/// (the object is at the version this reconcile decided on).
async fn fail(
    ctx: &Context,
    object: &PodCheckpoint,
    reason: &str,
    message: &str,
) -> Result<Action, Error> {
    status::fail_at_version(ctx, object, "Ready", reason, message).await
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn the_finalizer_and_the_pod_spec_are_in_place_before_the_kubelet_takes_it() {
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

        // The first reconcile of the new object only adds the finalizer.
        reconcile_stored(&fake).await;
        let first: Vec<String> = fake.seen().iter().map(Seen::line).collect();
        assert_eq!(first, [format!("PATCH {}", checkpoint_path())]);
        let stored = fake.get(&checkpoint_path()).unwrap();
        assert_eq!(
            stored["metadata"]["finalizers"],
            json!([finalizers::NODE_DATA])
        );
        // The next one says it is Pending (KEP-5823), at the version it saw.
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
        // The next one validates the pod and saves its spec; the kubelet takes it from there.
        let action = reconcile_stored(&fake).await;
        assert_eq!(action, Action::requeue(TAKE_WITHIN));
        let seen = fake.seen();
        assert!(
            seen.iter().all(|s| !s.path.contains("/proxy/")),
            "the controller reaches no kubelet: {seen:?}"
        );
        for (i, s) in seen.iter().enumerate().filter(|(_, s)| s.method == "PATCH") {
            assert!(
                i == 0 || s.body["metadata"]["resourceVersion"].is_string(),
                "a status write before the kubelet's is a compare-and-swap: {}",
                s.body
            );
        }
        let stored = parse(fake.get(&checkpoint_path()).unwrap());
        let status = stored.status.clone().unwrap();
        assert_eq!(status.phase, Some(PodCheckpointPhase::Pending));
        assert!(
            status.conditions[0]
                .message
                .as_deref()
                .unwrap()
                .contains("kubelet of node n1")
        );
        assert_eq!(stored.finalizers(), [finalizers::NODE_DATA]);
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

        // Waiting for the kubelet, within TAKE_WITHIN of its creation, changes nothing.
        let before = fake.seen().len();
        reconcile_stored(&fake).await;
        assert!(fake.seen()[before..].iter().all(|s| s.method == "GET"));
    }

    #[tokio::test]
    async fn a_failure_never_overwrites_the_kubelets_claim() {
        // The controller decides on a Pending object of version 1 whose pod is gone; meanwhile
        // the kubelet took it (version 2): nothing is written, and it is looked at again.
        let fake = FakeApi::default();
        let seen_then = checkpoint(
            json!({"resourceVersion": "1"}),
            json!({"sourcePodName": "p"}),
            json!({"phase": "Pending"}),
        );
        let mut now = seen_then.clone();
        now["metadata"]["resourceVersion"] = json!("2");
        now["status"] = json!({"phase": "Checkpointing", "nodeName": "n1",
                               "sourcePodUID": "pod-uid"});
        fake.put(&checkpoint_path(), now.clone());
        let action = reconcile(Arc::new(parse(seen_then)), context(&fake))
            .await
            .unwrap();
        assert_eq!(action, Action::requeue(std::time::Duration::from_secs(1)));
        assert_eq!(
            fake.get(&checkpoint_path()).unwrap()["status"],
            now["status"]
        );
    }

    #[tokio::test]
    async fn a_checkpoint_the_kubelet_took_first_gets_its_pod_spec_from_that_pod_only() {
        for (pod_uid, saved) in [("pod-uid", true), ("another-pod", false)] {
            let fake = FakeApi::default();
            fake.put(
                &checkpoint_path(),
                checkpoint(
                    json!({}),
                    json!({"sourcePodName": "p"}),
                    json!({"phase": "Ready", "nodeName": "n1", "sourcePodUID": pod_uid,
                           "checkpointLocation": {"type": "NodeLocal",
                                                  "nodeLocal": {"path": "checkpoint-ckpt-uid"}}}),
                ),
            );
            fake.put(&path_of("v1", "pods", "default", "p"), running_pod());
            reconcile_stored(&fake).await;
            let status = parse(fake.get(&checkpoint_path()).unwrap()).status.unwrap();
            assert_eq!(status.phase, Some(PodCheckpointPhase::Ready));
            assert_eq!(status.pod_template_ref.is_some(), saved, "{pod_uid}");
        }
    }

    #[tokio::test]
    async fn a_valid_checkpoint_no_kubelet_takes_is_failed_in_time() {
        let fake = FakeApi::default();
        fake.put(
            &checkpoint_path(),
            checkpoint(
                json!({"creationTimestamp": "2026-01-01T00:00:00Z"}),
                json!({"sourcePodName": "p"}),
                json!({"phase": "Pending",
                       "podTemplateRef": {"name": "podcheckpoint-ckpt-uid", "uid": "t",
                                          "resourceVersion": "1"}}),
            ),
        );
        fake.put(&path_of("v1", "pods", "default", "p"), running_pod());
        reconcile_stored(&fake).await;
        let status = parse(fake.get(&checkpoint_path()).unwrap()).status.unwrap();
        assert_eq!(status.phase, Some(PodCheckpointPhase::Failed));
        assert_eq!(status.reason.as_deref(), Some("NotTaken"));
        assert!(
            status
                .message
                .unwrap()
                .contains("PodLevelCheckpointRestore")
        );
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
            NodeDataOnDeletion::NodeAgent
        );
        assert_eq!(
            of(json!({"phase": "Ready", "nodeName": "n1"})),
            NodeDataOnDeletion::NodeAgent
        );
        assert_eq!(
            of(json!({"phase": "Failed", "reason": "KubeletRestarted", "nodeName": "n1"})),
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
    async fn a_deleted_checkpoint_being_taken_is_left_to_its_kubelet_and_node_agent() {
        let status = json!({"phase": "Checkpointing", "nodeName": "n1"});
        let fake = reconcile_deleted(status.clone()).await;
        assert!(fake.seen().iter().all(|s| s.method == "GET"));
        let stored = parse(fake.get(&checkpoint_path()).unwrap());
        assert_eq!(fake.get(&checkpoint_path()).unwrap()["status"], status);
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
        // Found Checkpointing with a location (taken; its agent pushes): left as it is, both when
        // reconciled and when deleted.
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

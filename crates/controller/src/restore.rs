//! Reconciling a `PodRestore`: its PodCheckpoint must be Ready; then `replicas` pods are created
//! from the checkpointed pod's spec, pinned to the checkpoint's node (a required node affinity the
//! scheduler honours, as KEP-5823's admission injects it; no `nodeName`) and annotated
//! `checkpoint.k8s.io/restore-from: <the PodCheckpoint's name>`, with the template's labels and
//! annotations (and name, for a single pod). The kubelet restores them (a restore it cannot do
//! fails the pod with an event, never a fresh start); the PodRestore is Completed once all run,
//! Failed when one fails.
//!
//! The spec is the one the checkpoint's `PodTemplate` holds, as the controller wrote it (same
//! object, same resourceVersion). A pod of a wanted name that exists already counts only when this
//! PodRestore created it (its controller owner reference is this PodRestore's UID: a restarted
//! controller picks up where it was); one being deleted is waited for; any other pod of that
//! name fails the restore (`PodAlreadyExists`) rather than passing it off as restored.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ContainerStateTerminated, Event, Pod, PodStatus, PodTemplate};
use kube::api::{ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::api::{
    Condition, LAZY_RESTORE, PodCheckpoint, PodCheckpointPhase, PodCheckpointStatus, PodRestore,
    PodRestorePhase, PodRestoreStatus, PodTemplateRef, RESTORE_FROM, RESTORE_IMAGE,
};
use crate::status::{self, publish};
use crate::{Context, Error, finalizers};

/// Pins a restored pod's spec to `node` as KEP-5823's admission does: no `nodeName` (the
/// checkpointed pod's is dropped), a required node affinity term on the node's name
/// (`matchFields metadata.name In [node]`) added to every existing term (or alone), so the
/// scheduler places the pod there and honours everything else it asks for. `None` leaves the
/// placement to the scheduler.
fn pin(spec: &mut serde_json::Value, node: Option<&str>) {
    let Some(fields) = spec.as_object_mut() else {
        return;
    };
    fields.remove("nodeName");
    let Some(node) = node else {
        return;
    };
    let on_node = json!({"key": "metadata.name", "operator": "In", "values": [node]});
    let required =
        &mut spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
    let terms = required["nodeSelectorTerms"]
        .as_array_mut()
        .filter(|terms| !terms.is_empty());
    match terms {
        Some(terms) => {
            for term in terms {
                match term["matchFields"].as_array_mut() {
                    Some(fields) => fields.push(on_node.clone()),
                    None => term["matchFields"] = json!([on_node.clone()]),
                }
            }
        }
        None => required["nodeSelectorTerms"] = json!([{"matchFields": [on_node]}]),
    }
}

pub async fn reconcile(object: Arc<PodRestore>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = object.namespace().unwrap_or_else(|| "default".into());
    let name = object.name_any();
    let phase = object.status.as_ref().and_then(|s| s.phase);
    // Where the checkpoint is: this namespace, or the one spec.checkpointNamespace names.
    let (home, wanted) = object.checkpoint_key();
    let wanted = &wanted;
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &home);
    let ended = (namespace.as_str(), name.as_str());
    if matches!(
        phase,
        Some(PodRestorePhase::Completed | PodRestorePhase::Failed)
    ) {
        release(&ctx, &checkpoints, &home, wanted, ended).await?;
        return Ok(Action::await_change());
    }
    let Some(checkpoint) = checkpoints.get_opt(wanted).await? else {
        return fail(
            &ctx,
            &object,
            "CheckpointNotFound",
            &format!("PodCheckpoint {home}/{wanted} does not exist"),
        )
        .await;
    };
    // A checkpoint holds all of its pod's memory, secrets included: it crosses namespaces only
    // where whoever created it said so (the kubelet checks it again).
    if home != namespace && !checkpoint.spec.restore_namespaces.contains(&namespace) {
        return fail(
            &ctx,
            &object,
            "CheckpointNamespaceNotAllowed",
            &format!(
                "PodCheckpoint {home}/{wanted} may not be restored in namespace {namespace:?} \
                 (its spec.restoreNamespaces: {:?})",
                checkpoint.spec.restore_namespaces
            ),
        )
        .await;
    }
    let status = checkpoint.status.clone().unwrap_or_default();
    match status.phase {
        Some(PodCheckpointPhase::Ready) => {}
        Some(PodCheckpointPhase::Failed) => {
            return fail(
                &ctx,
                &object,
                "CheckpointFailed",
                &format!(
                    "PodCheckpoint {wanted} failed: {}",
                    status.message.as_deref().unwrap_or("")
                ),
            )
            .await;
        }
        // Its watch event (Controller::watches) reconciles this restore again.
        _ => return Ok(Action::await_change()),
    }
    let (Some(node), Some(location)) =
        (status.node_name.clone(), status.checkpoint_location.clone())
    else {
        return fail(
            &ctx,
            &object,
            "CheckpointIncomplete",
            &format!("PodCheckpoint {wanted} is Ready but names no node or location"),
        )
        .await;
    };
    if status.pod_template_ref.is_none()
        && status.checkpointed_pod_spec.is_none()
        && recently_completed(&status)
    {
        // Taken by the kubelet before the PodCheckpoint controller saw it: that controller
        // records the pod's spec shortly (its watch event, or this requeue, brings it here).
        return Ok(Action::requeue(std::time::Duration::from_secs(2)));
    }
    let spec = match &status.pod_template_ref {
        Some(reference) => {
            let templates: Api<PodTemplate> = Api::namespaced(ctx.client.clone(), &home);
            let found = templates.get_opt(&reference.name).await?;
            checkpointed_spec(wanted, reference, found.as_ref())
        }
        None => legacy_spec(wanted, &status).map_err(|e| {
            format!("{e}: its pod was gone before its spec was recorded; restore it by reference (a pod annotated {RESTORE_FROM}: {wanted})")
        }),
    };
    let spec = match spec {
        Ok(spec) => spec,
        Err(message) => return fail(&ctx, &object, "CheckpointIncomplete", &message).await,
    };
    let Some(checkpoint_dir) = location.dir_name().map(str::to_string) else {
        return fail(
            &ctx,
            &object,
            "CheckpointIncomplete",
            &format!(
                "PodCheckpoint {wanted}'s location {location:?} names no checkpoint directory"
            ),
        )
        .await;
    };
    // Where the pods go: a checkpoint kept on its node only can be restored there alone; one in
    // a registry anywhere, on the node asked for or where the scheduler puts them.
    let image = status.image.as_ref().map(|i| i.reference.clone());
    let target = match (&image, object.spec.node_name.as_deref()) {
        (None, Some(asked)) if asked != node => {
            return fail(
                &ctx,
                &object,
                "CheckpointOnAnotherNode",
                &format!(
                    "PodCheckpoint {wanted} is kept on node {node} only (storage NodeLocal): it \
                     cannot be restored on {asked}; checkpoint with storage type Image to move it"
                ),
            )
            .await;
        }
        (None, _) => Some(node.clone()),
        (Some(_), asked) => asked.map(str::to_string),
    };
    // The checkpoint is in use until this restore's pods run: it is not deleted meanwhile.
    let in_use = checkpoint
        .finalizers()
        .iter()
        .any(|f| f == finalizers::IN_USE);
    if checkpoint.meta().deletion_timestamp.is_some() && !in_use {
        return fail(
            &ctx,
            &object,
            "CheckpointDeleted",
            &format!("PodCheckpoint {wanted} is being deleted"),
        )
        .await;
    }
    finalizers::add(&checkpoints, &checkpoint, finalizers::IN_USE).await?;

    let replicas = object.spec.replicas.unwrap_or(1).max(1) as usize;
    let template = object
        .spec
        .pod_template
        .clone()
        .and_then(|t| t.metadata)
        .unwrap_or_default();
    let names: Vec<String> = match (&template.name, replicas) {
        (Some(fixed), 1) => vec![fixed.clone()],
        (_, 1) => vec![name.clone()],
        _ => (0..replicas).map(|i| format!("{name}-{i}")).collect(),
    };

    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let owner = object.controller_owner_ref(&()).map(|o| vec![o]);
    let uid = object.uid().unwrap_or_default();
    for pod_name in &names {
        if let Some(existing) = pods.get_opt(pod_name).await? {
            if created_by(&existing, &uid) {
                continue;
            }
            if existing.metadata.deletion_timestamp.is_some() {
                // Going away (a suspended pod deleted without waiting, say): the name is free
                // once it is gone.
                return Ok(Action::requeue(Duration::from_secs(2)));
            }
            return pod_exists(&ctx, &object, &namespace, pod_name).await;
        }
        let mut pod_spec = spec.clone();
        pin(&mut pod_spec, target.as_deref());
        let mut annotations = template.annotations.clone();
        // The PodCheckpoint by name (KEP-5823's spec.restoreFrom.name): the kubelet reads it and
        // restores only from a Ready checkpoint whose data on its node was taken for it.
        // <namespace>/<name> for one in another namespace.
        let reference = if home == namespace {
            wanted.clone()
        } else {
            format!("{home}/{wanted}")
        };
        annotations.insert(RESTORE_FROM.to_string(), reference);
        if object.spec.lazy == Some(true) {
            annotations.insert(LAZY_RESTORE.to_string(), "true".to_string());
        }
        if let Some(image) = &image {
            annotations.insert(RESTORE_IMAGE.to_string(), image.clone());
        }
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": namespace,
                "labels": template.labels,
                "annotations": annotations,
                "ownerReferences": owner,
            },
            "spec": pod_spec,
        }))
        .map_err(|e| Error::Other(format!("restored pod {pod_name}: {e}")))?;
        match pods.create(&PostParams::default(), &pod).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {
                // Created meanwhile: by this restore (an earlier attempt whose answer was lost)
                // or by someone else.
                match pods.get_opt(pod_name).await? {
                    Some(existing) if !created_by(&existing, &uid) => {
                        return pod_exists(&ctx, &object, &namespace, pod_name).await;
                    }
                    _ => continue,
                }
            }
            Err(kube::Error::Api(status)) => {
                return fail(&ctx, &object, "CreatePodFailed", &status.message).await;
            }
            Err(e) => return Err(e.into()),
        }
        publish(
            &ctx,
            object.as_ref(),
            EventType::Normal,
            "Restoring",
            &match (&image, &target) {
                (None, _) => {
                    format!("pod {pod_name} restoring from {checkpoint_dir} on node {node}")
                }
                (Some(image), Some(target)) => {
                    format!("pod {pod_name} restoring from {image} on node {target}")
                }
                (Some(image), None) => format!("pod {pod_name} restoring from {image}"),
            },
        )
        .await;
    }

    // Completed once every pod runs; Failed when one failed.
    let mut running = 0;
    let mut not_started = Vec::new();
    let mut bound = Vec::new();
    for pod_name in &names {
        let pod = pods.get_opt(pod_name).await?;
        if let Some(pod) = &pod
            && !created_by(pod, &uid)
        {
            // Deleted and created again by someone else since: not a restored pod.
            return pod_exists(&ctx, &object, &namespace, pod_name).await;
        }
        if let Some(node) = pod
            .as_ref()
            .and_then(|p| p.spec.as_ref())
            .and_then(|s| s.node_name.clone())
        {
            bound.push(node);
        }
        let status = pod.and_then(|p| p.status).unwrap_or_default();
        if let Some(why) = refused_starts(&status) {
            not_started.push(format!("{pod_name}: {why}"));
        }
        match status.phase.as_deref() {
            Some("Running" | "Succeeded") if every_container_restored(&status) => running += 1,
            Some("Failed") => {
                // Why, as the kubelet said (a node that refused it: NodeAffinity, OutOfcpu, ...).
                let why = [status.reason, status.message]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(": ");
                let message = if why.is_empty() {
                    format!("restored pod {pod_name} failed")
                } else {
                    format!("restored pod {pod_name} failed: {why}")
                };
                return fail(&ctx, &object, "RestoreFailed", &message).await;
            }
            _ => {}
        }
    }
    // An image checkpoint is pulled by the agents of the nodes its pods are bound to: they
    // learn of them from the checkpoint (they read no pods).
    if image.is_some() && !record_pull_nodes(&checkpoints, wanted, &bound).await? {
        // The checkpoint changed meanwhile: again, on its new version.
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let done = running == names.len();
    // A restored pod whose checkpoint image a node cannot pull waits (never starting fresh):
    // the agents say why on the PodCheckpoint; the PodRestore says it too.
    if !done && image.is_some() {
        let since = object.metadata.creation_timestamp.as_ref().map(|t| t.0);
        if let Some(why) = last_pull_failure(&ctx.client, &home, wanted, since).await {
            not_started.push(format!("checkpoint image not pulled: {why}"));
        }
    }
    let status = PodRestoreStatus {
        phase: Some(if done {
            PodRestorePhase::Completed
        } else {
            PodRestorePhase::Restoring
        }),
        restored_pod_name: Some(names[0].clone()),
        restored_pod_names: names.clone(),
        conditions: vec![Condition::new(
            "Restored",
            done,
            if done { "PodsRunning" } else { "PodsStarting" },
            &if not_started.is_empty() || done {
                format!("{running} of {} restored pods running", names.len())
            } else {
                format!(
                    "{running} of {} restored pods running; retried, never started fresh: {}",
                    names.len(),
                    not_started.join("; ")
                )
            },
        )],
        ..Default::default()
    };
    status::set(&ctx, object.as_ref(), &status).await?;
    if done {
        release(&ctx, &checkpoints, &home, wanted, ended).await?;
        publish(
            &ctx,
            object.as_ref(),
            EventType::Normal,
            "Restored",
            &format!(
                "{} pod(s) restored from {wanted}: {}",
                names.len(),
                names.join(", ")
            ),
        )
        .await;
        Ok(Action::await_change())
    } else if image.is_some() {
        // Its pods wait for the image, which changes nothing of them while a pull fails: look
        // at the agents' events again, besides the pods' watch events.
        Ok(Action::requeue(PULL_RECHECK))
    } else {
        // Its pods' watch events (Controller::owns) reconcile it again.
        Ok(Action::await_change())
    }
}

/// How often a restore whose pods wait for a checkpoint image looks for pull failures.
const PULL_RECHECK: Duration = Duration::from_secs(10);

/// Adds `nodes` to PodCheckpoint `name`'s `status.pullNodes` (a merge patch over the version
/// read, so that two restores of one checkpoint do not drop each other's nodes); false when the
/// object changed in between (try again).
pub(crate) async fn record_pull_nodes(
    checkpoints: &Api<PodCheckpoint>,
    name: &str,
    nodes: &[String],
) -> Result<bool, Error> {
    let Some(checkpoint) = checkpoints.get_opt(name).await? else {
        return Ok(true);
    };
    let mut listed = checkpoint
        .status
        .as_ref()
        .map(|s| s.pull_nodes.clone())
        .unwrap_or_default();
    let before = listed.len();
    for node in nodes {
        if !listed.contains(node) {
            listed.push(node.clone());
        }
    }
    if listed.len() == before {
        return Ok(true);
    }
    let patch = json!({
        "metadata": {"resourceVersion": checkpoint.resource_version()},
        "status": {"pullNodes": listed},
    });
    match checkpoints
        .patch_status(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Whether every container of a restored pod came back: it runs, or it ran since and ended
/// (a container that exits 0 under `restartPolicy: OnFailure`, one crash-looping after its
/// restore). The phase alone does not say it: a pod whose restored containers failed to start
/// is `Running` too, their `StartError` being a termination the kubelet restarts from, and
/// such a container never ran.
fn every_container_restored(status: &PodStatus) -> bool {
    let containers = status.container_statuses.as_deref().unwrap_or_default();
    let ran = |terminated: Option<&ContainerStateTerminated>| {
        terminated.is_some_and(|t| t.reason.as_deref() != Some(START_ERROR))
    };
    !containers.is_empty()
        && containers.iter().all(|c| {
            let state = c.state.as_ref();
            state.is_some_and(|s| s.running.is_some())
                || ran(state.and_then(|s| s.terminated.as_ref()))
                || ran(c.last_state.as_ref().and_then(|s| s.terminated.as_ref()))
        })
}

/// The newest `PullFailed` a node agent reported on PodCheckpoint `name` (its note: the node
/// and the reason), not older than `since`. Best effort: `None` when the events
/// cannot be listed.
async fn last_pull_failure(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    since: Option<jiff::Timestamp>,
) -> Option<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let selector = format!("involvedObject.name={name},reason=PullFailed");
    let listed = match events.list(&ListParams::default().fields(&selector)).await {
        Ok(listed) => listed,
        Err(e) => {
            tracing::debug!(checkpoint = name, "list its PullFailed events: {e}");
            return None;
        }
    };
    let when = |e: &Event| {
        e.series
            .as_ref()
            .and_then(|s| s.last_observed_time.as_ref())
            .map(|t| t.0)
            .or_else(|| e.last_timestamp.as_ref().map(|t| t.0))
            .or_else(|| e.event_time.as_ref().map(|t| t.0))
    };
    listed
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some("PullFailed")
                && e.involved_object.kind.as_deref() == Some("PodCheckpoint")
                && e.involved_object.name.as_deref() == Some(name)
        })
        .filter(|e| since.is_none_or(|since| when(e).is_some_and(|at| at >= since)))
        .max_by_key(when)
        .and_then(|e| e.message)
        .map(|m| m.chars().take(300).collect())
}

/// The kubelet's reason for a container that could not be started (for a restored one: its
/// restore was refused).
const START_ERROR: &str = "StartError";

/// Why the restored containers of a pod did not start, as the kubelet last said it: `None`
/// when none was refused.
fn refused_starts(status: &PodStatus) -> Option<String> {
    let refused: Vec<String> = status
        .container_statuses
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter_map(|c| {
            let t = c.last_state.as_ref()?.terminated.as_ref()?;
            (t.reason.as_deref() == Some(START_ERROR)).then(|| {
                let message: String = t
                    .message
                    .as_deref()
                    .unwrap_or("")
                    .chars()
                    .take(300)
                    .collect();
                format!("container {}: {message}", c.name)
            })
        })
        .collect();
    (!refused.is_empty()).then(|| refused.join("; "))
}

fn created_by(pod: &Pod, restore_uid: &str) -> bool {
    !restore_uid.is_empty()
        && pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true) && o.uid == restore_uid)
}

/// Fails the restore: a pod of a name it needs exists and is not one it created.
async fn pod_exists(
    ctx: &Context,
    object: &PodRestore,
    namespace: &str,
    pod_name: &str,
) -> Result<Action, Error> {
    fail(
        ctx,
        object,
        "PodAlreadyExists",
        &format!(
            "pod {namespace}/{pod_name} already exists and was not created by this PodRestore: \
             delete it, or restore under another name"
        ),
    )
    .await
}

/// The checkpointed pod's spec from the checkpoint's PodTemplate `found` (fetched by the name
/// `reference` gives): it must be the very object and version the controller wrote, or the spec
/// may not be the checkpointed pod's.
pub fn checkpointed_spec(
    checkpoint: &str,
    reference: &PodTemplateRef,
    found: Option<&PodTemplate>,
) -> Result<serde_json::Value, String> {
    let name = &reference.name;
    let Some(found) = found else {
        return Err(format!(
            "the pod spec of PodCheckpoint {checkpoint} (PodTemplate {name}) is gone"
        ));
    };
    if found.metadata.uid.as_deref() != Some(reference.uid.as_str())
        || found.metadata.resource_version.as_deref() != Some(reference.resource_version.as_str())
    {
        return Err(format!(
            "PodTemplate {name}, the pod spec of PodCheckpoint {checkpoint}, was replaced or \
             changed after the checkpoint; restores start only from the checkpointed spec"
        ));
    }
    found
        .template
        .as_ref()
        .and_then(|t| t.spec.as_ref())
        .map(|spec| serde_json::to_value(spec).unwrap_or_default())
        .ok_or_else(|| format!("PodTemplate {name} of PodCheckpoint {checkpoint} holds no spec"))
}

/// Whether the checkpoint was completed less than a minute ago (or says not when): long enough
/// for the PodCheckpoint controller to record the spec of a pod the kubelet took first.
fn recently_completed(status: &PodCheckpointStatus) -> bool {
    let Some(completed) = status.completion_time.as_deref() else {
        return true;
    };
    completed
        .parse::<jiff::Timestamp>()
        .map(|t| jiff::Timestamp::now().duration_since(t) < jiff::SignedDuration::from_secs(60))
        .unwrap_or(false)
}

/// The pod spec of a checkpoint an earlier controller took, which kept it in the status.
fn legacy_spec(
    checkpoint: &str,
    status: &PodCheckpointStatus,
) -> Result<serde_json::Value, String> {
    status
        .checkpointed_pod_spec
        .clone()
        .ok_or_else(|| format!("PodCheckpoint {checkpoint} is Ready but names no pod spec"))
}

/// Drops the checkpoint's in-use finalizer once no PodRestore of it is in progress; `ended` is
/// the PodRestore (Completed or Failed) that asks, which the store may not show ended yet.
async fn release(
    ctx: &Context,
    checkpoints: &Api<PodCheckpoint>,
    namespace: &str,
    checkpoint: &str,
    ended: (&str, &str),
) -> Result<(), Error> {
    let Some(object) = checkpoints.get_opt(checkpoint).await? else {
        return Ok(());
    };
    if !object.finalizers().iter().any(|f| f == finalizers::IN_USE) {
        return Ok(());
    }
    if !status::restore_in_progress(ctx, namespace, checkpoint, Some(ended)) {
        finalizers::remove(checkpoints, &object, finalizers::IN_USE).await?;
    }
    Ok(())
}

/// Fails the restore (condition Restored False).
async fn fail(
    ctx: &Context,
    object: &PodRestore,
    reason: &str,
    message: &str,
) -> Result<Action, Error> {
    status::fail(ctx, object, "Restored", reason, message).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_api::{FakeApi, context, path_of};
    use serde_json::Value;

    const GROUP: &str = "checkpoint.k8s.io/v1alpha1";
    const TEMPLATE: &str = "podcheckpoint-ckpt-uid";

    fn restore_path() -> String {
        path_of(GROUP, "podrestores", "default", "r")
    }

    fn pod_path(name: &str) -> String {
        path_of("v1", "pods", "default", name)
    }

    /// A Ready checkpoint `c` with its PodTemplate, and PodRestore `r` of it naming its one pod `x`.
    fn cluster() -> FakeApi {
        let fake = FakeApi::default();
        fake.put(
            &path_of(GROUP, "podcheckpoints", "default", "c"),
            json!({
                "apiVersion": GROUP, "kind": "PodCheckpoint",
                "metadata": {"name": "c", "namespace": "default", "uid": "ckpt-uid",
                             "resourceVersion": "3"},
                "spec": {"sourcePodName": "p"},
                "status": {"phase": "Ready", "nodeName": "n1",
                           "checkpointLocation": "/var/lib/kubelet/pod-checkpoints/checkpoint-p_default-t",
                           "podTemplateRef": {"name": TEMPLATE, "uid": "tmpl-uid",
                                              "resourceVersion": "7"}},
            }),
        );
        fake.put(
            &path_of("v1", "podtemplates", "default", TEMPLATE),
            json!({
                "apiVersion": "v1", "kind": "PodTemplate",
                "metadata": {"name": TEMPLATE, "namespace": "default", "uid": "tmpl-uid",
                             "resourceVersion": "7"},
                "template": {"spec": {"runtimeClassName": "podsnap", "nodeName": "n1",
                                      "containers": [{"name": "counter", "image": "busybox"}]}},
            }),
        );
        fake.put(
            &restore_path(),
            json!({
                "apiVersion": GROUP, "kind": "PodRestore",
                "metadata": {"name": "r", "namespace": "default", "uid": "restore-uid",
                             "resourceVersion": "5"},
                "spec": {"checkpointName": "c", "podTemplate": {"metadata": {"name": "x"}}},
            }),
        );
        fake
    }

    fn pod(owner_uid: Option<&str>, phase: &str) -> Value {
        let owners: Vec<Value> = owner_uid
            .map(|uid| {
                json!({"apiVersion": GROUP, "kind": "PodRestore", "name": "r", "uid": uid,
                       "controller": true})
            })
            .into_iter()
            .collect();
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "x", "namespace": "default", "uid": "x-uid",
                         "ownerReferences": owners},
            "spec": {"containers": [{"name": "counter", "image": "busybox"}]},
            "status": pod_status(phase),
        })
    }

    /// A pod status of `phase`; a `Running` one with its container running.
    fn pod_status(phase: &str) -> Value {
        if phase != "Running" {
            return json!({"phase": phase});
        }
        json!({"phase": phase, "containerStatuses": [{
            "name": "counter", "image": "busybox", "imageID": "", "ready": true,
            "restartCount": 0, "state": {"running": {}},
        }]})
    }

    /// Reconciles the PodRestore as the API server has it now; returns its status after.
    async fn reconcile_stored(fake: &FakeApi) -> StoredStatus {
        let object: PodRestore =
            serde_json::from_value(fake.get(&restore_path()).unwrap()).unwrap();
        reconcile(Arc::new(object), context(fake)).await.unwrap();
        let stored = fake.get(&restore_path()).unwrap();
        StoredStatus(stored["status"].clone())
    }

    /// The PodRestore's status as the fake API server has it after a reconcile.
    struct StoredStatus(Value);

    impl StoredStatus {
        fn phase(&self) -> &str {
            self.0["phase"].as_str().unwrap_or_default()
        }
    }

    /// The PodRestore `r` moved to namespace `b`, restoring checkpoint `default/c`.
    fn restore_in_b(fake: &FakeApi) -> PodRestore {
        let mut object = fake.get(&restore_path()).unwrap();
        object["metadata"]["namespace"] = json!("b");
        object["spec"]["checkpointNamespace"] = json!("default");
        fake.put(&path_of(GROUP, "podrestores", "b", "r"), object.clone());
        serde_json::from_value(object).unwrap()
    }

    #[tokio::test]
    async fn a_restore_in_another_namespace_needs_the_checkpoints_leave() {
        let fake = cluster();
        let object = restore_in_b(&fake);
        reconcile(Arc::new(object), context(&fake)).await.unwrap();
        let status = &fake.get(&path_of(GROUP, "podrestores", "b", "r")).unwrap()["status"];
        assert_eq!(
            status["reason"], "CheckpointNamespaceNotAllowed",
            "{status}"
        );
        assert!(fake.get(&path_of("v1", "pods", "b", "x")).is_none());

        let fake = cluster();
        let checkpoint = path_of(GROUP, "podcheckpoints", "default", "c");
        let mut c = fake.get(&checkpoint).unwrap();
        c["spec"]["restoreNamespaces"] = json!(["b"]);
        fake.put(&checkpoint, c);
        let object = restore_in_b(&fake);
        reconcile(Arc::new(object), context(&fake)).await.unwrap();
        // Its pod in b, from the checkpoint's template in default, naming it <namespace>/<name>.
        let pod = fake
            .get(&path_of("v1", "pods", "b", "x"))
            .expect("a pod in b");
        assert_eq!(pod["metadata"]["annotations"][RESTORE_FROM], "default/c");
        assert_eq!(pod["spec"]["containers"][0]["name"], "counter");
        let c = fake.get(&checkpoint).unwrap();
        assert_eq!(c["metadata"]["finalizers"], json!([finalizers::IN_USE]));
    }

    #[tokio::test]
    async fn a_pod_of_the_wanted_name_that_the_restore_did_not_create_fails_it() {
        let fake = cluster();
        fake.put(&pod_path("x"), pod(None, "Running"));
        let status = reconcile_stored(&fake).await;
        assert_eq!(status.phase(), "Failed", "{}", status.0);
        assert_eq!(status.0["reason"], "PodAlreadyExists");
        assert!(
            status.0["message"]
                .as_str()
                .unwrap()
                .contains("pod default/x already exists"),
            "{}",
            status.0
        );
        let seen = fake.seen();
        assert!(
            seen.iter()
                .all(|s| !(s.method == "POST" && s.path.ends_with("/pods"))),
            "a pod was created"
        );
        let event = seen
            .iter()
            .find(|s| s.method == "POST" && s.path.contains("/events"))
            .expect("an event");
        assert_eq!(event.body["reason"], "PodAlreadyExists", "{}", event.body);
        assert!(
            event.body["note"].as_str().unwrap().contains("default/x"),
            "{}",
            event.body
        );
        // Not touched.
        assert_eq!(fake.get(&pod_path("x")).unwrap(), pod(None, "Running"));
    }

    #[tokio::test]
    async fn a_pod_of_the_wanted_name_being_deleted_is_waited_for() {
        let fake = cluster();
        let mut going = pod(None, "Running");
        going["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        fake.put(&pod_path("x"), going.clone());
        let status = reconcile_stored(&fake).await;
        assert_eq!(status.phase(), "", "{}", status.0);
        assert_eq!(fake.get(&pod_path("x")).unwrap(), going);
        // Gone: the restore goes on.
        fake.remove(&pod_path("x"));
        assert_eq!(reconcile_stored(&fake).await.phase(), "Restoring");
    }

    #[tokio::test]
    async fn its_own_pod_found_again_counts_as_restored() {
        // A controller that restarted after creating the pod, or the next reconcile.
        let fake = cluster();
        fake.put(&pod_path("x"), pod(Some("restore-uid"), "Running"));
        let status = reconcile_stored(&fake).await;
        assert_eq!(status.phase(), "Completed", "{}", status.0);
        assert_eq!(status.0["restoredPodName"], "x");
    }

    #[tokio::test]
    async fn a_running_pod_whose_restored_container_failed_to_start_is_not_restored() {
        // The kubelet calls a pod Running once a container terminated and will be restarted,
        // and a restore refused at StartContainer is such a termination.
        let fake = cluster();
        let mut failing = pod(Some("restore-uid"), "Running");
        failing["status"]["containerStatuses"][0]["state"] =
            json!({"waiting": {"reason": "RunContainerError"}});
        failing["status"]["containerStatuses"][0]["lastState"] = json!({"terminated": {
            "exitCode": 128, "reason": "StartError", "startedAt": "1970-01-01T00:00:00Z",
            "message": "checkpoint file pages-1.img was modified",
        }});
        fake.put(&pod_path("x"), failing);
        let status = reconcile_stored(&fake).await;
        assert_eq!(status.phase(), "Restoring", "{}", status.0);
        let said = status.0["conditions"][0]["message"].as_str().unwrap_or("");
        assert!(
            said.contains("x: container counter: checkpoint file pages-1.img was modified"),
            "{said}"
        );
        // Its restore succeeds on a later try: now it is.
        fake.put(&pod_path("x"), pod(Some("restore-uid"), "Running"));
        assert_eq!(reconcile_stored(&fake).await.phase(), "Completed");
    }

    #[tokio::test]
    async fn a_restored_container_that_ran_and_ended_counts_as_restored() {
        // restartPolicy OnFailure, exit 0 after its restore: the pod Succeeded.
        let fake = cluster();
        let mut done = pod(Some("restore-uid"), "Running");
        done["status"]["phase"] = json!("Succeeded");
        done["status"]["containerStatuses"][0]["state"] = json!({"terminated": {
            "exitCode": 0, "reason": "Completed", "startedAt": "2026-12-03T00:00:00Z",
        }});
        fake.put(&pod_path("x"), done);
        assert_eq!(reconcile_stored(&fake).await.phase(), "Completed");
        // Crash-looping after its restore: it came back, then failed on its own.
        let fake = cluster();
        let mut looping = pod(Some("restore-uid"), "Running");
        looping["status"]["containerStatuses"][0]["state"] =
            json!({"waiting": {"reason": "CrashLoopBackOff"}});
        looping["status"]["containerStatuses"][0]["lastState"] = json!({"terminated": {
            "exitCode": 1, "reason": "Error", "startedAt": "2026-12-03T00:00:00Z",
        }});
        fake.put(&pod_path("x"), looping);
        assert_eq!(reconcile_stored(&fake).await.phase(), "Completed");
    }

    #[tokio::test]
    async fn a_missing_pod_is_created_owned_by_the_restore_from_the_checkpoints_template() {
        let fake = cluster();
        let status = reconcile_stored(&fake).await;
        assert_eq!(status.phase(), "Restoring", "{}", status.0);
        let created = fake.get(&pod_path("x")).expect("the pod was created");
        assert_eq!(
            created["metadata"]["ownerReferences"][0]["uid"],
            "restore-uid"
        );
        assert_eq!(created["metadata"]["annotations"][RESTORE_FROM], "c");
        assert!(created["spec"].get("nodeName").is_none(), "{created}");
        assert_eq!(pinned_to(&created), ["n1"], "{created}");
        assert_eq!(created["spec"]["containers"][0]["name"], "counter");
        assert!(
            created["metadata"]["annotations"]
                .get(LAZY_RESTORE)
                .is_none(),
            "{created}"
        );
        // Running now: the next reconcile finds its own pod and completes.
        let mut running = created.clone();
        running["status"] = pod_status("Running");
        fake.put(&pod_path("x"), running);
        assert_eq!(reconcile_stored(&fake).await.phase(), "Completed");
    }

    #[tokio::test]
    async fn a_lazy_restore_marks_its_pods_for_a_lazy_restore() {
        let fake = cluster();
        set(&fake, &restore_path(), "/spec/lazy", json!(true));
        reconcile_stored(&fake).await;
        let created = fake.get(&pod_path("x")).expect("the pod was created");
        assert_eq!(created["metadata"]["annotations"][LAZY_RESTORE], "true");
    }

    /// The nodes a pod's required node affinity pins it to, one per term.
    fn pinned_to(pod: &Value) -> Vec<String> {
        pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|t| t["matchFields"].as_array().cloned().unwrap_or_default())
            .filter(|f| f["key"] == "metadata.name" && f["operator"] == "In")
            .map(|f| f["values"][0].as_str().unwrap_or_default().to_string())
            .collect()
    }

    #[test]
    fn a_pin_is_added_to_every_term_of_the_pods_own_affinity() {
        let mut spec = json!({
            "nodeName": "old",
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                    {"matchFields": [{"key": "metadata.name", "operator": "NotIn", "values": ["x"]}]}
                ]}}}
        });
        pin(&mut spec, Some("n1"));
        let terms = &spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"];
        assert!(spec.get("nodeName").is_none());
        assert_eq!(terms[0]["matchExpressions"][0]["key"], "zone");
        assert_eq!(terms[0]["matchFields"][0]["values"][0], "n1");
        assert_eq!(terms[1]["matchFields"][0]["operator"], "NotIn");
        assert_eq!(terms[1]["matchFields"][1]["values"][0], "n1");
        let mut bare = json!({"nodeName": "old", "containers": []});
        pin(&mut bare, Some("n1"));
        assert_eq!(pinned_to(&json!({ "spec": bare })), ["n1"]);
        let mut free = json!({"nodeName": "old"});
        pin(&mut free, None);
        assert_eq!(free, json!({}));
    }

    /// Sets a field of the stored PodCheckpoint's status or the PodRestore's spec.
    fn set(fake: &FakeApi, path: &str, pointer: &str, value: Value) {
        let mut object = fake.get(path).unwrap();
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        object.pointer_mut(parent).unwrap()[key] = value;
        fake.put(path, object);
    }

    #[tokio::test]
    async fn a_checkpoint_in_a_registry_is_restored_where_the_scheduler_or_the_restore_says() {
        let image = "registry.example:5000/team/counter@sha256:".to_string() + &"a".repeat(64);
        let checkpoint = path_of(GROUP, "podcheckpoints", "default", "c");
        let mut stored = fake_checkpoint_with_image(&image);
        // Unpinned: no nodeName (the template's is dropped), the image beside restore-from.
        let status = reconcile_stored(&stored).await;
        assert_eq!(status.phase(), "Restoring", "{}", status.0);
        let created = stored.get(&pod_path("x")).unwrap();
        assert!(created["spec"].get("nodeName").is_none(), "{created}");
        assert_eq!(created["metadata"]["annotations"][RESTORE_FROM], "c");
        assert_eq!(created["metadata"]["annotations"][RESTORE_IMAGE], image);
        // A node asked for: there.
        stored = fake_checkpoint_with_image(&image);
        set(&stored, &restore_path(), "/spec/nodeName", json!("n2"));
        reconcile_stored(&stored).await;
        let created = stored.get(&pod_path("x")).unwrap();
        assert_eq!(pinned_to(&created), ["n2"], "{created}");
        // Bound there by the scheduler: the checkpoint lists the node, whose agent pulls the
        // image (the next restore bound to it adds nothing, another node is added).
        set(&stored, &pod_path("x"), "/spec/nodeName", json!("n2"));
        reconcile_stored(&stored).await;
        assert_eq!(
            stored.get(&checkpoint).unwrap()["status"]["pullNodes"],
            json!(["n2"])
        );
        reconcile_stored(&stored).await;
        assert_eq!(
            stored.get(&checkpoint).unwrap()["status"]["pullNodes"],
            json!(["n2"])
        );
        // A node-local checkpoint cannot go to another node...
        let fake = cluster();
        set(&fake, &restore_path(), "/spec/nodeName", json!("n2"));
        let status = reconcile_stored(&fake).await;
        assert_eq!(status.phase(), "Failed", "{}", status.0);
        assert_eq!(status.0["reason"], "CheckpointOnAnotherNode");
        assert!(fake.get(&pod_path("x")).is_none());
        // ...and asking for its own node is fine.
        let fake = cluster();
        set(&fake, &restore_path(), "/spec/nodeName", json!("n1"));
        assert_eq!(reconcile_stored(&fake).await.phase(), "Restoring");
        assert!(fake.get(&checkpoint).is_some());
    }

    #[tokio::test]
    async fn a_restored_pod_the_node_refused_fails_the_restore_with_the_nodes_reason() {
        let fake = cluster();
        let mut refused = pod(Some("restore-uid"), "Failed");
        refused["status"]["reason"] = json!("NodeAffinity");
        refused["status"]["message"] =
            json!("Pod was rejected: Predicate NodeAffinity failed: node(s) didn't match");
        fake.put(&pod_path("x"), refused);
        let status = reconcile_stored(&fake).await;
        assert_eq!(status.phase(), "Failed", "{}", status.0);
        assert_eq!(status.0["reason"], "RestoreFailed");
        assert_eq!(
            status.0["message"],
            "restored pod x failed: NodeAffinity: Pod was rejected: Predicate NodeAffinity failed: node(s) didn't match"
        );
    }

    fn fake_checkpoint_with_image(image: &str) -> FakeApi {
        let fake = cluster();
        let path = path_of(GROUP, "podcheckpoints", "default", "c");
        let mut checkpoint = fake.get(&path).unwrap();
        checkpoint["spec"]["storage"] =
            json!({"type": "Image", "image": {"repository": "registry.example:5000/team/counter"}});
        checkpoint["status"]["image"] = json!({"reference": image, "size": 1});
        fake.put(&path, checkpoint);
        fake
    }

    #[tokio::test]
    async fn a_pull_failure_on_its_checkpoint_is_said_in_the_restores_condition() {
        let image = format!(
            "registry.example:5000/team/counter@sha256:{}",
            "a".repeat(64)
        );
        let fake = fake_checkpoint_with_image(&image);
        let event = |name: &str, kind: &str, reason: &str, message: &str, at: &str| {
            json!({"apiVersion": "v1", "kind": "Event",
                   "metadata": {"name": name, "namespace": "default"},
                   "involvedObject": {"kind": kind, "name": "c", "namespace": "default"},
                   "reason": reason, "message": message, "lastTimestamp": at})
        };
        let events = |name: &str| path_of("v1", "events", "default", name);
        fake.put(
            &events("e1"),
            event(
                "e1",
                "PodCheckpoint",
                "PullFailed",
                "node n1: old reason",
                "2026-12-03T10:00:00Z",
            ),
        );
        fake.put(
            &events("e2"),
            event(
                "e2",
                "PodCheckpoint",
                "PullFailed",
                "node n1: no decryption key",
                "2026-12-03T11:00:00Z",
            ),
        );
        fake.put(
            &events("e3"),
            event(
                "e3",
                "Pod",
                "PullFailed",
                "someone else's",
                "2026-12-03T12:00:00Z",
            ),
        );
        let status = reconcile_stored(&fake).await;
        assert_eq!(status.phase(), "Restoring", "{}", status.0);
        let said = status.0["conditions"][0]["message"].as_str().unwrap_or("");
        assert!(
            said.contains("checkpoint image not pulled: node n1: no decryption key"),
            "{said}"
        );
    }

    #[tokio::test]
    async fn a_pod_template_changed_after_the_checkpoint_fails_the_restore() {
        let fake = cluster();
        let path = path_of("v1", "podtemplates", "default", TEMPLATE);
        let mut template = fake.get(&path).unwrap();
        template["metadata"]["resourceVersion"] = json!("8");
        template["template"]["spec"]["hostNetwork"] = json!(true);
        fake.put(&path, template);
        let status = reconcile_stored(&fake).await;
        assert_eq!(status.phase(), "Failed", "{}", status.0);
        assert_eq!(status.0["reason"], "CheckpointIncomplete");
        assert!(fake.get(&pod_path("x")).is_none(), "a pod was created");
    }

    #[test]
    fn the_checkpointed_spec_is_the_template_as_written_or_nothing() {
        let reference = PodTemplateRef {
            name: TEMPLATE.into(),
            uid: "tmpl-uid".into(),
            resource_version: "7".into(),
        };
        let template: PodTemplate = serde_json::from_value(json!({
            "metadata": {"name": TEMPLATE, "uid": "tmpl-uid", "resourceVersion": "7"},
            "template": {"spec": {"containers": [{"name": "counter", "image": "busybox"}]}},
        }))
        .unwrap();
        let spec = checkpointed_spec("c", &reference, Some(&template)).unwrap();
        assert_eq!(spec["containers"][0]["name"], "counter");
        assert!(
            checkpointed_spec("c", &reference, None)
                .unwrap_err()
                .contains("is gone")
        );
        let mut replaced = template.clone();
        replaced.metadata.uid = Some("other".into());
        assert!(checkpointed_spec("c", &reference, Some(&replaced)).is_err());
        let mut changed = template;
        changed.metadata.resource_version = Some("8".into());
        assert!(checkpointed_spec("c", &reference, Some(&changed)).is_err());
    }

    #[test]
    fn a_pod_is_the_restores_only_by_its_controller_owner_reference() {
        let parse = |v: Value| serde_json::from_value::<Pod>(v).unwrap();
        assert!(created_by(
            &parse(pod(Some("restore-uid"), "Running")),
            "restore-uid"
        ));
        assert!(!created_by(
            &parse(pod(Some("other-uid"), "Running")),
            "restore-uid"
        ));
        assert!(!created_by(&parse(pod(None, "Running")), "restore-uid"));
        assert!(!created_by(&parse(pod(None, "Running")), ""));
        let mut not_controller = pod(Some("restore-uid"), "Running");
        not_controller["metadata"]["ownerReferences"][0]["controller"] = json!(false);
        assert!(!created_by(&parse(not_controller), "restore-uid"));
    }
}

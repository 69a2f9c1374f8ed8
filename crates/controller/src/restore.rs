//! Reconciling a `PodRestore`: its PodCheckpoint must be Ready; then `replicas` pods are created
//! from the checkpointed pod's spec, pinned to the checkpoint's node and annotated
//! `checkpoint.k8s.io/restore-from`, with the template's labels and annotations (and name, for a
//! single pod). The kubelet restores them (a restore it cannot do fails the pod with an event,
//! never a fresh start); the PodRestore is Completed once all run, Failed when one fails.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::api::{Condition, PodCheckpoint, PodRestore, RESTORE_FROM};
use crate::status::{self, publish};
use crate::{Context, Error, finalizers};

pub async fn reconcile(object: Arc<PodRestore>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = object.namespace().unwrap_or_else(|| "default".into());
    let name = object.name_any();
    let phase = object.status.as_ref().and_then(|s| s.phase.clone());
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &namespace);
    let wanted = &object.spec.checkpoint_name;
    if matches!(phase.as_deref(), Some("Completed" | "Failed")) {
        release(&ctx, &checkpoints, &namespace, wanted).await?;
        return Ok(Action::await_change());
    }
    let Some(checkpoint) = checkpoints.get_opt(wanted).await? else {
        return fail(
            &ctx,
            &object,
            "CheckpointNotFound",
            &format!("PodCheckpoint {namespace}/{wanted} does not exist"),
        )
        .await;
    };
    let status = checkpoint.status.clone().unwrap_or_default();
    match status.phase.as_deref() {
        Some("Ready") => {}
        Some("Failed") => {
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
        _ => return Ok(Action::requeue(Duration::from_secs(2))),
    }
    let (Some(node), Some(location), Some(spec)) = (
        status.node_name.clone(),
        status.checkpoint_location.clone(),
        status.checkpointed_pod_spec.clone(),
    ) else {
        return fail(
            &ctx,
            &object,
            "CheckpointIncomplete",
            &format!("PodCheckpoint {wanted} is Ready but names no node, location or pod spec"),
        )
        .await;
    };
    let checkpoint_dir = location.rsplit('/').next().unwrap_or_default().to_string();
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
    for pod_name in &names {
        if pods.get_opt(pod_name).await?.is_some() {
            continue;
        }
        let mut pod_spec = spec.clone();
        pod_spec["nodeName"] = json!(node);
        let mut annotations = template.annotations.clone();
        annotations.insert(RESTORE_FROM.to_string(), checkpoint_dir.clone());
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
            Err(kube::Error::Api(status)) if status.code == 409 => {}
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
            &format!("pod {pod_name} restoring from {checkpoint_dir} on node {node}"),
        )
        .await;
    }

    // Completed once every pod runs; Failed when one failed.
    let mut running = 0;
    for pod_name in &names {
        let phase = pods
            .get_opt(pod_name)
            .await?
            .and_then(|p| p.status.and_then(|s| s.phase));
        match phase.as_deref() {
            Some("Running") => running += 1,
            Some("Failed") => {
                return fail(
                    &ctx,
                    &object,
                    "RestoreFailed",
                    &format!("restored pod {pod_name} failed"),
                )
                .await;
            }
            _ => {}
        }
    }
    let done = running == names.len();
    status::set(
        &ctx,
        object.as_ref(),
        json!({
            "phase": if done { "Completed" } else { "Restoring" },
            "restoredPodName": names[0],
            "restoredPodNames": names,
            "conditions": [Condition::new(
                "Restored", done,
                if done { "PodsRunning" } else { "PodsStarting" },
                &format!("{running} of {} restored pods running", names.len()),
            )],
        }),
    )
    .await?;
    if done {
        release(&ctx, &checkpoints, &namespace, wanted).await?;
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
    } else {
        Ok(Action::requeue(Duration::from_secs(2)))
    }
}

/// Drops the checkpoint's in-use finalizer once no PodRestore of it is in progress.
async fn release(
    ctx: &Context,
    checkpoints: &Api<PodCheckpoint>,
    namespace: &str,
    checkpoint: &str,
) -> Result<(), Error> {
    let Some(object) = checkpoints.get_opt(checkpoint).await? else {
        return Ok(());
    };
    if !object.finalizers().iter().any(|f| f == finalizers::IN_USE) {
        return Ok(());
    }
    if !status::restore_in_progress(ctx, namespace, checkpoint).await? {
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

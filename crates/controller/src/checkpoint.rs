//! Reconciling a `PodCheckpoint`: the source pod must exist, run on the `podsnap` runtime class
//! and be running on a node; then the kubelet of that node checkpoints it
//! (`POST /api/v1/nodes/{node}/proxy/checkpointpod/{namespace}/{pod}`), and the status records
//! where the checkpoint is, its containers, and the pod's spec for restores.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::api::{Condition, PodCheckpoint, PodCheckpointStatus, RUNTIME_CLASS, now};
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

pub async fn reconcile(object: Arc<PodCheckpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = object.namespace().unwrap_or_else(|| "default".into());
    let name = object.name_any();
    let phase = object.status.as_ref().and_then(|s| s.phase.clone());
    if object.meta().deletion_timestamp.is_some() {
        // Being deleted: podsnapd's node agent clears node-data; the in-use finalizer goes once no
        // PodRestore of it is in progress (also when such a restore was deleted half-way).
        if object.finalizers().iter().any(|f| f == finalizers::IN_USE) {
            if status::restore_in_progress(&ctx, &namespace, &name).await? {
                return Ok(Action::requeue(std::time::Duration::from_secs(2)));
            }
            let api: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &namespace);
            finalizers::remove(&api, &object, finalizers::IN_USE).await?;
        }
        return Ok(Action::await_change());
    }
    match phase.as_deref() {
        Some("Ready") => {
            let api: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &namespace);
            if object.spec.deletion_policy.as_deref() == Some("Delete") {
                // Its data goes when it goes: podsnapd's node agent removes it, then this finalizer.
                finalizers::add(&api, &object, finalizers::NODE_DATA).await?;
            }
            if ctx.keep_last > 0 {
                prune(&ctx, &api, &object).await?;
            }
            return Ok(Action::await_change());
        }
        Some("Failed") => return Ok(Action::await_change()),
        Some("Checkpointing") => {
            // The cache can lag behind this controller's own status writes (a reconcile queued
            // by the Checkpointing update runs after the one that wrote Ready): ask the API
            // server before concluding anything.
            let api: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &namespace);
            let fresh = api.get_opt(&name).await?;
            if fresh
                .and_then(|o| o.status)
                .and_then(|s| s.phase)
                .as_deref()
                != Some("Checkpointing")
            {
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

    status::set(
        &ctx,
        object.as_ref(),
        json!({
            "phase": "Checkpointing", "nodeName": node, "reason": null, "message": null,
            "conditions": [Condition::new(
                "Ready",
                false,
                "CheckpointInProgress",
                &format!("checkpointing {source} on {node}"),
            )],
        }),
    )
    .await?;
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
    let location = answer["items"][0].as_str().unwrap_or_default().to_string();
    let containers: Vec<String> = answer["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c.as_str().map(str::to_string))
        .collect();
    let status = PodCheckpointStatus {
        phase: Some("Ready".into()),
        node_name: Some(node.clone()),
        checkpoint_location: Some(location.clone()),
        containers,
        completion_time: Some(now()),
        checkpointed_pod_spec: Some(serde_json::to_value(&spec).unwrap_or_default()),
        conditions: vec![Condition::new(
            "Ready",
            true,
            "Checkpointed",
            &format!("checkpoint of {source} at {location} on {node}"),
        )],
        ..Default::default()
    };
    // The checkpoint exists now: recording it must not be lost to one failed write (a retried
    // reconcile would find the object Checkpointing and fail it).
    let status = serde_json::to_value(&status).unwrap_or_default();
    let mut attempt = 1;
    while let Err(e) = status::set(&ctx, object.as_ref(), status.clone()).await {
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
        "Checkpointed",
        &format!("pod {source} checkpointed on node {node}: {location}"),
    )
    .await;
    Ok(Action::await_change())
}

/// Retention: deletes the oldest Ready checkpoints of the same source pod beyond `keep_last`
/// (each one's deletion policy and finalizers then apply as for any deletion).
async fn prune(
    ctx: &Context,
    api: &Api<PodCheckpoint>,
    object: &PodCheckpoint,
) -> Result<(), Error> {
    let mut ready: Vec<PodCheckpoint> = api
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|c| {
            c.spec.source_pod_name == object.spec.source_pod_name
                && c.meta().deletion_timestamp.is_none()
                && c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Ready")
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

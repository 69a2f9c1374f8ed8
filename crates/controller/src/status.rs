//! What both reconcilers do to the objects they own: patch their status, fail them with a
//! reason (status, condition and a Warning event, once), publish events; and the question both
//! ask about a checkpoint: is a restore of it still in progress.

use kube::api::{Patch, PatchParams};
use kube::core::NamespaceResourceScope;
use kube::core::object::HasStatus;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Resource, ResourceExt};
use std::any::Any;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{
    Condition, PodCheckpoint, PodCheckpointPhase, PodCheckpointStatus, PodRestore, PodRestorePhase,
    PodRestoreStatus,
};
use crate::{Context, Error};

/// An object of ours: a namespaced checkpoint.k8s.io kind with a typed status.
pub trait Owned:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + HasStatus<Status: Serialize + std::fmt::Debug + 'static>
    + Clone
    + DeserializeOwned
    + std::fmt::Debug
    + 'static
{
    /// What [`fail`] merges into the status: phase Failed, `reason`, `message` and `condition`
    /// (False).
    fn failed(condition: Condition, reason: &str, message: &str) -> Self::Status;
}

impl Owned for PodCheckpoint {
    fn failed(condition: Condition, reason: &str, message: &str) -> PodCheckpointStatus {
        PodCheckpointStatus {
            phase: Some(PodCheckpointPhase::Failed.to_string()),
            reason: Some(reason.into()),
            message: Some(message.into()),
            conditions: vec![condition],
            ..Default::default()
        }
    }
}

impl Owned for PodRestore {
    fn failed(condition: Condition, reason: &str, message: &str) -> PodRestoreStatus {
        PodRestoreStatus {
            phase: Some(PodRestorePhase::Failed),
            reason: Some(reason.into()),
            message: Some(message.into()),
            conditions: vec![condition],
            ..Default::default()
        }
    }
}

/// A JSON merge patch of an object's status subresource: `{"status": ...}`. Fields the typed
/// status leaves unset (`None`, empty lists) are not in it, and the object keeps what it has
/// there (a Failed checkpoint keeps its node and location).
#[derive(Serialize, Debug)]
struct StatusPatch<'a, S> {
    status: &'a S,
}

/// Merges `status` into the object's status.
pub async fn set<K: Owned>(ctx: &Context, object: &K, status: &K::Status) -> Result<(), Error> {
    let api: Api<K> = Api::namespaced(
        ctx.client.clone(),
        &object.namespace().unwrap_or_else(|| "default".into()),
    );
    api.patch_status(
        &object.name_any(),
        &PatchParams::default(),
        &Patch::Merge(StatusPatch { status }),
    )
    .await?;
    if let (Some(checkpoint), Some(status)) = (
        (object as &dyn Any).downcast_ref::<PodCheckpoint>(),
        (status as &dyn Any).downcast_ref::<PodCheckpointStatus>(),
    ) {
        count_transitions(ctx, checkpoint, status);
    }
    Ok(())
}

/// Counts a PodCheckpoint's phase and Ready condition transitions (from its status before,
/// to the status `after` just merged into it) in the metrics.
fn count_transitions(ctx: &Context, object: &PodCheckpoint, after: &PodCheckpointStatus) {
    let before = object.status.as_ref();
    if let Some(phase) = after.phase() {
        ctx.metrics
            .phase_transition(before.and_then(PodCheckpointStatus::phase), phase);
    }
    let ready = |s: &PodCheckpointStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| (c.status, c.reason.clone().unwrap_or_default()))
    };
    if let Some(now) = ready(after)
        && before.and_then(ready) != Some(now.clone())
    {
        ctx.metrics.ready_condition(now.0.as_str(), &now.1);
    }
}

/// Fails the object for good: phase Failed with `reason` and `message`, condition
/// `condition` False, one Warning event. It is not retried.
pub async fn fail<K: Owned>(
    ctx: &Context,
    object: &K,
    condition: &str,
    reason: &str,
    message: &str,
) -> Result<Action, Error> {
    tracing::warn!(kind = %K::kind(&()), object = %object.name_any(), reason, message, "failed");
    let condition = Condition::new(condition, false, reason, message);
    set(ctx, object, &K::failed(condition, reason, message)).await?;
    publish(ctx, object, EventType::Warning, reason, message).await;
    Ok(Action::await_change())
}

/// Publishes an event about the object (a failure to publish is only logged).
pub async fn publish<K>(ctx: &Context, object: &K, type_: EventType, reason: &str, note: &str)
where
    K: Resource<DynamicType = ()>,
{
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &object.object_ref(&())).await {
        tracing::warn!(error = %e, "publish event");
    }
}

/// Whether a PodRestore of checkpoint `checkpoint` in `namespace` is neither Completed nor Failed.
pub async fn restore_in_progress(
    ctx: &Context,
    namespace: &str,
    checkpoint: &str,
) -> Result<bool, Error> {
    let restores: Api<PodRestore> = Api::namespaced(ctx.client.clone(), namespace);
    Ok(restores
        .list(&Default::default())
        .await?
        .items
        .iter()
        .any(|r| {
            r.spec.checkpoint_name == checkpoint
                && !matches!(
                    r.status.as_ref().and_then(|s| s.phase),
                    Some(PodRestorePhase::Completed | PodRestorePhase::Failed)
                )
        }))
}

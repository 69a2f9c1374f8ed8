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
#[cfg(test)]
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{
    Condition, PodCheckpoint, PodCheckpointPhase, PodCheckpointStatus, PodRestore, PodRestorePhase,
    PodRestoreStatus, ready_reasons,
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
    /// The Ready condition's reason is KEP-5823's (`CheckpointFailed`, or `SourcePodReplaced`);
    /// podsnap's detail (`SourcePodNotFound`, ...) is `status.reason`.
    fn failed(mut condition: Condition, reason: &str, message: &str) -> PodCheckpointStatus {
        if condition.type_ == "Ready" && reason != ready_reasons::SOURCE_POD_REPLACED {
            condition.reason = Some(ready_reasons::CHECKPOINT_FAILED.into());
        }
        PodCheckpointStatus {
            phase: Some(PodCheckpointPhase::Failed),
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
/// there (a Failed checkpoint keeps its node and location). With `metadata.resourceVersion` the
/// API server applies it only to that version of the object (a compare-and-swap).
#[derive(Serialize, Debug)]
struct StatusPatch<'a, S> {
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Version<'a>>,
    status: &'a S,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Version<'a> {
    resource_version: &'a str,
}

/// Merges `status` into the object's status, at `version` only when given, and counts a
/// PodCheckpoint's transitions in the metrics.
async fn merge_status<K: Owned>(
    ctx: &Context,
    object: &K,
    status: &K::Status,
    version: Option<&str>,
) -> Result<(), kube::Error> {
    let api: Api<K> = Api::namespaced(
        ctx.client.clone(),
        &object.namespace().unwrap_or_else(|| "default".into()),
    );
    let patch = StatusPatch {
        metadata: version.map(|resource_version| Version { resource_version }),
        status,
    };
    api.patch_status(
        &object.name_any(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await?;
    if let (Some(checkpoint), Some(status)) = (
        (object as &dyn Any).downcast_ref::<PodCheckpoint>(),
        (status as &dyn Any).downcast_ref::<PodCheckpointStatus>(),
    ) {
        observe(ctx, checkpoint, Some(status));
    }
    Ok(())
}

/// Merges `status` into the object's status.
pub async fn set<K: Owned>(ctx: &Context, object: &K, status: &K::Status) -> Result<(), Error> {
    Ok(merge_status(ctx, object, status, None).await?)
}

/// Merges `status` into the object's status if the object is still at the version the caller
/// decided on (`object`'s `resourceVersion`): `Ok(false)` when it has changed meanwhile (the
/// kubelet took the PodCheckpoint, say), and nothing was written.
pub async fn set_at_version<K: Owned>(
    ctx: &Context,
    object: &K,
    status: &K::Status,
) -> Result<bool, Error> {
    let Some(resource_version) = object.resource_version() else {
        return Err(Error::Other(format!(
            "{} has no resourceVersion",
            object.name_any()
        )));
    };
    match merge_status(ctx, object, status, Some(&resource_version)).await {
        Ok(()) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Tells the metrics the PodCheckpoint's status as seen now (`object`'s) or as just written.
pub fn observe(ctx: &Context, object: &PodCheckpoint, status: Option<&PodCheckpointStatus>) {
    let Some(uid) = object.uid() else {
        return;
    };
    let ready = status.and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| (c.status.to_string(), c.reason.clone().unwrap_or_default()))
    });
    ctx.metrics
        .observe(&uid, status.and_then(|s| s.phase), ready);
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

/// [`fail`], only if the object is still at the version the caller decided on: when it has
/// changed meanwhile nothing is written and the object is reconciled again shortly.
pub async fn fail_at_version<K: Owned>(
    ctx: &Context,
    object: &K,
    condition: &str,
    reason: &str,
    message: &str,
) -> Result<Action, Error> {
    let condition = Condition::new(condition, false, reason, message);
    if !set_at_version(ctx, object, &K::failed(condition, reason, message)).await? {
        return Ok(Action::requeue(std::time::Duration::from_secs(1)));
    }
    tracing::warn!(kind = %K::kind(&()), object = %object.name_any(), reason, message, "failed");
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

/// Whether a PodRestore of checkpoint `checkpoint` in `namespace` (from any namespace), other
/// than `except` (one the caller knows has ended: its namespace and name), is neither Completed
/// nor Failed: from the PodRestore controller's reflector store (no LIST per reconcile).
pub fn restore_in_progress(
    ctx: &Context,
    namespace: &str,
    checkpoint: &str,
    except: Option<(&str, &str)>,
) -> bool {
    ctx.restores.state().iter().any(|r| {
        let (of_namespace, of_name) = r.checkpoint_key();
        let this = (
            r.namespace().unwrap_or_else(|| "default".into()),
            r.name_any(),
        );
        of_namespace == namespace
            && of_name == checkpoint
            && except != Some((this.0.as_str(), this.1.as_str()))
            && !matches!(
                r.status.as_ref().and_then(|s| s.phase),
                Some(PodRestorePhase::Completed | PodRestorePhase::Failed)
            )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher;

    #[tokio::test]
    async fn a_restore_in_progress_is_one_of_the_checkpoint_in_its_namespace_not_ended() {
        let fake = crate::fake_api::FakeApi::default();
        let mut context = crate::fake_api::context(&fake);
        let mut writer = Writer::<PodRestore>::default();
        for (namespace, name, checkpoint, phase) in [
            ("default", "ended", "c", Some("Completed")),
            ("default", "running", "c", Some("Restoring")),
            ("other", "elsewhere", "d", None),
        ] {
            let restore: PodRestore = serde_json::from_value(serde_json::json!({
                "apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodRestore",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"checkpointName": checkpoint},
                "status": {"phase": phase},
            }))
            .unwrap();
            writer.apply_watcher_event(&watcher::Event::Apply(restore));
        }
        Arc::get_mut(&mut context).unwrap().restores = writer.as_reader();
        assert!(restore_in_progress(&context, "default", "c", None));
        assert!(!restore_in_progress(
            &context,
            "default",
            "c",
            Some(("default", "running"))
        ));
        assert!(restore_in_progress(
            &context,
            "default",
            "c",
            Some(("other", "running"))
        ));
        assert!(restore_in_progress(&context, "other", "d", None));
        assert!(!restore_in_progress(&context, "default", "d", None));
    }
}

//! The finalizers on a `PodCheckpoint`:
//!
//! - `checkpoint.k8s.io/in-use`: while a PodRestore of the checkpoint is in progress (its pods
//!   not all running yet), so the checkpoint is not deleted under a restore;
//! - `checkpoint.k8s.io/node-data`: on a checkpoint whose deletion policy is `Delete`, put there
//!   by the controller before anything else happens to the object (before the kubelet is asked to
//!   checkpoint), so that a deletion at any point, mid-checkpoint included, waits for the data's
//!   removal: podsnapd's node agent on the checkpoint's node (`podsnapd node-agent`) removes the
//!   data there and then the finalizer, once the checkpoint has ended (Ready or Failed); the
//!   controller removes it itself from a checkpoint that never reached a node (no data anywhere).

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::PodCheckpoint;

pub const IN_USE: &str = "checkpoint.k8s.io/in-use";
pub const NODE_DATA: &str = "checkpoint.k8s.io/node-data";

/// Adds `finalizer` to the checkpoint unless it is there (or the object is being deleted).
pub async fn add(
    api: &Api<PodCheckpoint>,
    object: &PodCheckpoint,
    finalizer: &str,
) -> kube::Result<()> {
    if object.finalizers().iter().any(|f| f == finalizer)
        || object.meta().deletion_timestamp.is_some()
    {
        return Ok(());
    }
    let mut finalizers = object.finalizers().to_vec();
    finalizers.push(finalizer.to_string());
    set(api, object, finalizers).await
}

/// Removes `finalizer` from the checkpoint if it is there.
pub async fn remove(
    api: &Api<PodCheckpoint>,
    object: &PodCheckpoint,
    finalizer: &str,
) -> kube::Result<()> {
    if !object.finalizers().iter().any(|f| f == finalizer) {
        return Ok(());
    }
    let finalizers: Vec<String> = object
        .finalizers()
        .iter()
        .filter(|f| *f != finalizer)
        .cloned()
        .collect();
    set(api, object, finalizers).await
}

async fn set(
    api: &Api<PodCheckpoint>,
    object: &PodCheckpoint,
    finalizers: Vec<String>,
) -> kube::Result<()> {
    // The resourceVersion makes this a compare-and-swap: a concurrent change fails it, and the
    // reconcile is retried with fresh state.
    let patch = json!({
        "metadata": {
            "finalizers": finalizers,
            "resourceVersion": object.resource_version(),
        }
    });
    api.patch(
        &object.name_any(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await
    .map(drop)
}

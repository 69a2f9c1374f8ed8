//! The `checkpoint.k8s.io/v1alpha1` API (KEP-5823) as Rust types: `PodCheckpoint` and
//! `PodRestore`. Their CustomResourceDefinitions, with validation and printer columns, are
//! written by hand in `deploy/crds/`; these types read and write the same fields. The finalizers
//! the controller and the node agent put on PodCheckpoints are in [`finalizers`].
//!
//! A checkpoint's pod spec is not in the PodCheckpoint: whoever may read PodCheckpoints (every
//! node's agent, cluster-wide) would read every namespace's pod specs. It is kept in a `PodTemplate`
//! beside it ([`checkpointed_pod_template_name`]), owned by the PodCheckpoint (garbage-collected
//! with it), which only the controller reads; the status names it ([`PodTemplateRef`]).

pub mod finalizers;

use std::collections::BTreeMap;

use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// The annotation that makes the (patched) kubelet restore a pod from a checkpoint.
pub const RESTORE_FROM: &str = "checkpoint.k8s.io/restore-from";

/// The runtime class whose pods can be checkpointed.
pub const RUNTIME_CLASS: &str = "podsnap";

/// The annotation on the `PodTemplate` that holds a PodCheckpoint's pod spec: the PodCheckpoint's
/// name (an annotation: a PodCheckpoint's name may be longer than a label value).
pub const POD_CHECKPOINT_ANNOTATION: &str = "checkpoint.k8s.io/podcheckpoint";

/// The name of the `PodTemplate` (in the checkpoint's namespace) that holds the pod spec of the
/// PodCheckpoint with UID `uid`: named by the UID, so a PodCheckpoint deleted and created again
/// under the same name never finds its predecessor's.
pub fn checkpointed_pod_template_name(uid: &str) -> String {
    format!("podcheckpoint-{uid}")
}

/// What a PodCheckpoint's status says about the `PodTemplate` that holds its pod spec: which one
/// (name and UID) and the version the controller wrote. A restore refuses a template that is
/// another object or was changed since (its resourceVersion moved): the spec restored pods
/// start from is the one checkpointed, not one someone who may edit PodTemplates wrote later.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateRef {
    pub name: String,
    pub uid: String,
    pub resource_version: String,
}

/// A checkpoint of one running pod.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "checkpoint.k8s.io",
    version = "v1alpha1",
    kind = "PodCheckpoint",
    namespaced,
    status = "PodCheckpointStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct PodCheckpointSpec {
    pub source_pod_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_policy: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodCheckpointStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_location: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// The `PodTemplate` holding the source pod's spec when it was checkpointed: restored pods
    /// start from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template_ref: Option<PodTemplateRef>,
    /// Where controllers before `podTemplateRef` kept the pod spec: read by restores of their
    /// checkpoints, never written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpointed_pod_spec: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Pods restored from a PodCheckpoint.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "checkpoint.k8s.io",
    version = "v1alpha1",
    kind = "PodRestore",
    namespaced,
    status = "PodRestoreStatus",
    schema = "disabled"
)]
#[serde(rename_all = "camelCase")]
pub struct PodRestoreSpec {
    pub checkpoint_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodTemplate>,
}

/// What a PodRestore may say about its pods: labels, annotations, and a name for a single one.
/// The spec is the checkpointed pod's; a template's spec is ignored.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct PodTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TemplateMetadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct TemplateMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodRestoreStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restored_pod_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A status condition, as `metav1.Condition` has it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

impl Condition {
    pub fn new(type_: &str, ok: bool, reason: &str, message: &str) -> Self {
        Condition {
            type_: type_.to_string(),
            status: if ok { "True" } else { "False" }.to_string(),
            reason: Some(reason.to_string()),
            message: Some(message.to_string()),
            last_transition_time: Some(now()),
        }
    }
}

/// Now, as RFC 3339 in UTC with seconds.
pub fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .unwrap_or_else(|_| jiff::Timestamp::now())
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seed_talks_objects_parse() {
        let checkpoint: PodCheckpoint = serde_json::from_value(serde_json::json!({
            "apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodCheckpoint",
            "metadata": {"name": "my-checkpoint", "namespace": "default"},
            "spec": {"sourcePodName": "my-pod"},
            "status": {"phase": "Ready", "nodeName": "worker-1", "checkpointLocation": "foo-bar"}
        }))
        .unwrap();
        assert_eq!(checkpoint.spec.source_pod_name, "my-pod");
        assert_eq!(
            checkpoint.status.unwrap().node_name.as_deref(),
            Some("worker-1")
        );
        let restore: PodRestore = serde_json::from_value(serde_json::json!({
            "apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodRestore",
            "metadata": {"name": "restore-1", "namespace": "default"},
            "spec": {"checkpointName": "my-checkpoint", "podTemplate": {
                "metadata": {"labels": {"app": "restored"}},
                "spec": {"containers": [{"name": "app", "image": "ignored-on-restore"}]}}},
            "status": {"phase": "Completed", "restoredPodName": "restored-pod-xyz"}
        }))
        .unwrap();
        let labels = &restore.spec.pod_template.unwrap().metadata.unwrap().labels;
        assert_eq!(labels["app"], "restored");
    }

    #[test]
    fn the_pod_template_ref_round_trips_and_the_template_is_named_by_uid() {
        let status = PodCheckpointStatus {
            phase: Some("Ready".into()),
            pod_template_ref: Some(PodTemplateRef {
                name: checkpointed_pod_template_name("u-1"),
                uid: "t-1".into(),
                resource_version: "42".into(),
            }),
            ..Default::default()
        };
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"phase": "Ready", "podTemplateRef":
                {"name": "podcheckpoint-u-1", "uid": "t-1", "resourceVersion": "42"}})
        );
        assert_eq!(
            serde_json::from_value::<PodCheckpointStatus>(json).unwrap(),
            status
        );
    }
}

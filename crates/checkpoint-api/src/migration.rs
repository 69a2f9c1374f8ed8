//! `PodMigration`: one running pod moved to another node through a checkpoint image, as
//! `podsnap migrate` moves it, done by podsnap-controller from an object (the talk's node
//! migration tier; podsnap's own kind beside KEP-5823's two, in their group).
//!
//! The controller creates what a user would: a PodCheckpoint of the pod (storage `Image` in
//! `spec.image`, deletion policy `Delete`, the pod's UID pinned), owned by the PodMigration;
//! once it is Ready, a PodRestore of it on `spec.targetNodeName` (or where the scheduler puts
//! the pod); once the restored pod runs, it deletes the source pod (by UID), and the migration
//! has `Succeeded`. Any failure before that deletes the PodRestore and the PodCheckpoint, and
//! the source pod runs on (`Failed`, with the reason). The PodRestore stays after a success:
//! it owns the replacement pod.

use k8s_openapi::api::core::v1::PodSpec;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ImageStorage;

/// One pod moved to another node.
// `type_ = "string"` in several printcolumns is no duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "checkpoint.k8s.io",
    version = "v1alpha1",
    kind = "PodMigration",
    namespaced,
    status = "PodMigrationStatus",
    shortname = "pmig",
    doc = "One running pod moved to another node through a checkpoint image by podsnap-controller: a PodCheckpoint pushed while it runs, a PodRestore on the target, the source deleted once the replacement runs.",
    annotation(
        "api-approved.kubernetes.io",
        "https://github.com/kubernetes/enhancements/pull/5823"
    ),
    printcolumn(name = "Pod", type_ = "string", json_path = ".spec.podName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "From", type_ = "string", json_path = ".status.sourceNodeName"),
    printcolumn(name = "To", type_ = "string", json_path = ".status.targetNodeName"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self == oldSelf").message("spec is immutable"))]
#[serde(rename_all = "camelCase")]
pub struct PodMigrationSpec {
    /// The pod to move, in this namespace: running, of runtime class `podsnap`, without
    /// `hostPath` volumes or device resources (their state stays on its node).
    #[schemars(length(min = 1, max = 253))]
    pub pod_name: String,
    /// The node to move it to; unset, the scheduler places the replacement as the pod's spec
    /// says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub target_node_name: Option<String>,
    /// The registry repository the checkpoint goes through, with its credentials
    /// (`secretName`) and encryption, as a PodCheckpoint's `spec.storage.image`.
    pub image: ImageStorage,
    /// How long the migration may take, from its start to the replacement running: past it,
    /// it is undone (`DeadlineExceeded`) and the source runs on. 600 when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub deadline_seconds: Option<i64>,
}

/// How long a migration may take when its spec does not say.
pub const DEFAULT_DEADLINE_SECONDS: i64 = 600;

/// Where a PodMigration is.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PodMigrationPhase {
    /// Created, not begun.
    Pending,
    /// Its PodCheckpoint is being taken and pushed; the source runs on.
    Checkpointing,
    /// Its PodRestore is restoring the replacement; the source runs on.
    Restoring,
    /// The replacement runs and the source is deleted.
    Succeeded,
    /// Undone: the source runs on (`reason`, `message`).
    Failed,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodMigrationStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<PodMigrationPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The UID of the pod moved (the PodCheckpoint pins it).
    #[serde(
        default,
        rename = "sourcePodUID",
        skip_serializing_if = "Option::is_none"
    )]
    pub source_pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node_name: Option<String>,
    /// The PodCheckpoint and the PodRestore it created (both named as the PodMigration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_name: Option<String>,
    /// The replacement and where it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node_name: Option<String>,
    /// When it began, when the checkpoint was Ready (pushed), and when it ended (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpointed_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
}

/// The annotation on the PodCheckpoint and PodRestore a PodMigration created: its name (their
/// changes reconcile it).
pub const MIGRATION_ANNOTATION: &str = "podsnap.io/migration";

impl PodMigrationStatus {
    /// Whether the migration has ended, Succeeded or Failed.
    pub fn has_ended(&self) -> bool {
        matches!(
            self.phase,
            Some(PodMigrationPhase::Succeeded | PodMigrationPhase::Failed)
        )
    }
}

/// Why a pod cannot be moved to another node, if it cannot: a hostPath volume (its data is the
/// node's), or a device resource (GPU memory is not in a CRIU dump).
pub fn unmovable(spec: &PodSpec) -> Option<String> {
    if let Some(volume) = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.host_path.is_some())
    {
        return Some(format!(
            "volume {:?} is a hostPath: its data stays on the node",
            volume.name
        ));
    }
    for container in spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
    {
        let resources = container.resources.iter().flat_map(|r| {
            r.limits
                .iter()
                .flatten()
                .chain(r.requests.iter().flatten())
                .map(|(name, _)| name.as_str())
        });
        for name in resources {
            if name.contains('/') && !name.starts_with("hugepages-") {
                return Some(format!(
                    "container {:?} uses device resource {name}: a device's state is not in the checkpoint",
                    container.name
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(value: serde_json::Value) -> PodSpec {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn host_paths_and_devices_are_unmovable_the_rest_is_not() {
        let plain = spec(serde_json::json!({
            "containers": [{"name": "app", "resources": {"limits": {"cpu": "1", "memory": "1Gi", "hugepages-2Mi": "4Mi"}}}],
            "volumes": [{"name": "cache", "emptyDir": {}}]
        }));
        assert_eq!(unmovable(&plain), None);
        let host = spec(serde_json::json!({
            "containers": [{"name": "app"}],
            "volumes": [{"name": "data", "hostPath": {"path": "/srv"}}]
        }));
        assert!(unmovable(&host).unwrap().contains("\"data\" is a hostPath"));
        let gpu = spec(serde_json::json!({
            "containers": [{"name": "infer", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]
        }));
        assert!(unmovable(&gpu).unwrap().contains("nvidia.com/gpu"));
    }
}

//! The `checkpoint.k8s.io/v1alpha1` API (KEP-5823) as Rust types: `PodCheckpoint` and
//! `PodRestore`, and podsnap's `PodMigration` ([`migration`]). Their CustomResourceDefinitions, with validation (OpenAPI and CEL), printer
//! columns, subresources and short names, are generated from these types ([`crds`]) into
//! `deploy/crds/` by `cargo run -p podsnap-checkpoint-api --bin crdgen`; a unit test fails when
//! the files there differ from what the types generate. The finalizers the controller and the
//! node agent put on PodCheckpoints are in [`finalizers`].
//!
//! A checkpoint's pod spec is not in the PodCheckpoint: whoever may read PodCheckpoints (every
//! node's agent, cluster-wide) would read every namespace's pod specs. It is kept in a `PodTemplate`
//! beside it ([`checkpointed_pod_template_name`]), owned by the PodCheckpoint (garbage-collected
//! with it), which only the controller reads; the status names it ([`PodTemplateRef`]).

pub mod crds;
pub mod finalizers;
pub mod migration;

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crds::crds;
pub use migration::{
    MIGRATION_ANNOTATION, PodMigration, PodMigrationPhase, PodMigrationSpec, PodMigrationStatus,
    unmovable,
};

/// The annotation that makes the (patched) kubelet restore a pod from a checkpoint.
pub const RESTORE_FROM: &str = "checkpoint.k8s.io/restore-from";

/// The PodCheckpoint (namespace, name) a [`RESTORE_FROM`] value references, as the kubelet
/// (patches 0009, 0010) reads it: `<name>` in the pod's namespace, `<namespace>/<name>` in
/// another; `None` for a checkpoint directory's name or path (which contain `_` or start with
/// `/`), or anything that is no object name.
pub fn restore_reference(value: &str, pod_namespace: &str) -> Option<(String, String)> {
    let dns = |s: &str, dots: bool, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && s.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.')
            })
            && s.split('.').all(|l| {
                l.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && l.ends_with(|c: char| c.is_ascii_alphanumeric())
            })
    };
    let (namespace, name) = match value.split_once('/') {
        Some((namespace, name)) if dns(namespace, false, 63) => (namespace, name),
        Some(_) => return None,
        None => (pod_namespace, value),
    };
    dns(name, true, 253).then(|| (namespace.to_string(), name.to_string()))
}

/// The annotation, beside [`RESTORE_FROM`], that says which image (by digest) a restored pod's
/// checkpoint came from; the restoring node's agent pulls it into the kubelet's checkpoint
/// directory, under the name `restore-from` gives, because the PodCheckpoint lists the node in
/// `status.pullNodes`.
pub const RESTORE_IMAGE: &str = "checkpoint.k8s.io/restore-image";

/// The pod annotation that makes podsnap restore a pod lazily (`"true"`): podsnapd's
/// RestorePod reads it from the pod's sandbox config when the call's options do not say.
pub const LAZY_RESTORE: &str = "podsnap.io/lazy-restore";

/// The annotation of a checkpoint image's manifest that carries the kubelet's record of the
/// checkpoint (`<checkpoint>.kubelet.json`): the pod it was taken from, its namespace, runtime
/// handler and containers, which the restoring kubelet checks a pod against.
pub const KUBELET_RECORD_ANNOTATION: &str = "io.podsnap.kubelet.record";

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

/// The Secret, in the podsnap controller's and node agents' namespace, that holds the registry
/// credentials of the PodCheckpoint with UID `uid` for its node agents: one
/// `kubernetes.io/dockerconfigjson` entry, for the registry its image goes to, copied by the
/// controller from the Secret the PodCheckpoint or a pod restoring it names. Named by the UID,
/// as the PodTemplate is.
pub fn registry_credentials_name(uid: &str) -> String {
    format!("podsnap-registry-{uid}")
}

/// The label on a [`registry_credentials_name`] Secret: the UID of its PodCheckpoint (the
/// controller removes copies whose PodCheckpoint is gone).
pub const REGISTRY_CREDENTIALS_FOR: &str = "podsnap.io/registry-credentials-for";

/// The annotation on a [`registry_credentials_name`] Secret that says why it holds no
/// credentials (the named Secret is missing, of another type, or has no entry for the
/// registry): the node agent fails the push with it rather than pushing anonymously.
pub const REGISTRY_CREDENTIALS_ERROR: &str = "podsnap.io/registry-credentials-error";

/// The namespace podsnap's controller and node agents run in (`deploy/`), unless told another.
pub const SYSTEM_NAMESPACE: &str = "podsnap-system";

/// What a PodCheckpoint's status says about the `PodTemplate` that holds its pod spec: which one
/// (name and UID) and the version the controller wrote. A restore refuses a template that is
/// another object or was changed since (its resourceVersion moved): the spec restored pods
/// start from is the one checkpointed, not one someone who may edit PodTemplates wrote later.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplateRef {
    pub name: String,
    pub uid: String,
    pub resource_version: String,
}

/// A checkpoint of one running pod.
// `type_ = "string"` in several printcolumns is no duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "checkpoint.k8s.io",
    version = "v1alpha1",
    kind = "PodCheckpoint",
    namespaced,
    status = "PodCheckpointStatus",
    shortname = "pcp",
    doc = "A checkpoint of one running pod, taken by podsnap-controller through the kubelet's pod checkpoint API on the pod's node.",
    // A *.k8s.io group needs this; KEP-5823 is the API's review.
    annotation("api-approved.kubernetes.io", "https://github.com/kubernetes/enhancements/pull/5823"),
    // podsnapd's node agents watch only their own node's checkpoints
    // (fieldSelector=status.nodeName=<node>).
    selectable = ".status.nodeName",
    printcolumn(name = "Source Pod", type_ = "string", json_path = ".spec.sourcePodName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("has(self.sourcePodUID) == has(oldSelf.sourcePodUID)").message("sourcePodUID is immutable"))]
#[x_kube(validation = Rule::new("(has(self.restoreNamespaces) ? self.restoreNamespaces : []) == (has(oldSelf.restoreNamespaces) ? oldSelf.restoreNamespaces : [])").message("restoreNamespaces is immutable"))]
#[serde(rename_all = "camelCase")]
pub struct PodCheckpointSpec {
    /// The pod to checkpoint, in this namespace. Immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("sourcePodName is immutable"))]
    pub source_pod_name: String,
    /// The UID the source pod must have (KEP-5823): set, a pod of that name with another UID
    /// (deleted and created again) is not checkpointed, and the object fails with
    /// `SourcePodReplaced`. Immutable.
    #[serde(
        default,
        rename = "sourcePodUID",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("sourcePodUID is immutable"))]
    pub source_pod_uid: Option<String>,
    /// Other namespaces whose pods may be restored from this checkpoint (podsnap's namespace
    /// migration, the talk's P1 tier): such a pod names it `<this namespace>/<name>` in its
    /// `checkpoint.k8s.io/restore-from`, and its creator needs `restore` on it here. A
    /// checkpoint holds all of its pod's memory, secrets included: it goes nowhere else.
    /// Immutable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(
            length(min = 1, max = 63),
            regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
        )
    )]
    pub restore_namespaces: Vec<String>,
    /// How long the checkpoint may take; the runtime's default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: Option<i32>,
    /// What happens to the node-local checkpoint data when this object is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("default" = "Retain"))]
    pub deletion_policy: Option<DeletionPolicy>,
    /// Where the checkpoint is kept: on its node (the default), or also pushed as an OCI image
    /// to a registry, from which a pod can be restored on any node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<CheckpointStorage>,
}

/// Where a checkpoint is kept. Immutable.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("storage is immutable"))]
#[x_kube(validation = Rule::new("self.type == 'Image' ? has(self.image) : !has(self.image)").message("image is set exactly when type is Image"))]
pub struct CheckpointStorage {
    #[serde(rename = "type")]
    pub type_: StorageType,
    /// The registry repository the checkpoint is pushed to, with type `Image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageStorage>,
}

/// The kinds of checkpoint storage.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StorageType {
    // On the checkpoint's node only.
    #[default]
    NodeLocal,
    // On its node, and pushed to a registry as an OCI image by the node's agent.
    Image,
}

/// A checkpoint pushed to a registry.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageStorage {
    /// `registry/repository`, without tag or digest: the node agent pushes the checkpoint there
    /// tagged with the PodCheckpoint's UID and reports it by digest in `status.image`. The
    /// node agents reach registries as configured (insecure registries), with the credentials
    /// of `secretName` or their own.
    #[schemars(length(min = 1, max = 255))]
    pub repository: String,
    /// A Secret of type `kubernetes.io/dockerconfigjson` in this namespace with the registry's
    /// credentials: the node agent pushes (and pulls) with its entry for the repository's
    /// registry. The controller copies that one entry, and only it, for the agents; unset,
    /// they use their own (Secret `podsnap-registry-auth` in their namespace), or none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub secret_name: Option<String>,
    /// Seal the image's config and layers to these keys, so that the registry holds none of
    /// the pod's memory, files or environment in the clear; only nodes holding one of the
    /// private keys can restore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<ImageEncryption>,
}

/// Encryption of a checkpoint image with age (<https://age-encryption.org>).
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.recipients.all(r, r.matches('^age1[qpzry9x8gf2tvdw0s3jn54khce6mua7l]{58}$'))").message("each recipient is an age X25519 public key (age1 and 58 bech32 characters)"))]
pub struct ImageEncryption {
    /// age X25519 public keys (`age1…`, as `podsnap keygen` or `age-keygen` print them); the
    /// restoring node's agent holds a matching private key (Secret `podsnap-checkpoint-keys`).
    #[schemars(length(min = 1, max = 16), inner(length(max = 62)))]
    pub recipients: Vec<String>,
}

impl PodCheckpointSpec {
    /// The repository the checkpoint is pushed to, when it is stored as an image.
    pub fn image_repository(&self) -> Option<&str> {
        self.storage
            .as_ref()
            .filter(|s| s.type_ == StorageType::Image)
            .and_then(|s| s.image.as_ref())
            .map(|i| i.repository.as_str())
    }

    /// The Secret with the registry's credentials, when it is stored as an image and names one.
    pub fn image_secret_name(&self) -> Option<&str> {
        self.storage
            .as_ref()
            .filter(|s| s.type_ == StorageType::Image)
            .and_then(|s| s.image.as_ref())
            .and_then(|i| i.secret_name.as_deref())
    }

    /// The keys the image is sealed to, when it is stored as an encrypted image.
    pub fn image_recipients(&self) -> Option<&[String]> {
        self.storage
            .as_ref()
            .filter(|s| s.type_ == StorageType::Image)
            .and_then(|s| s.image.as_ref())
            .and_then(|i| i.encryption.as_ref())
            .map(|e| e.recipients.as_slice())
    }
}

/// The reason of a checkpoint taken and being pushed to a registry by its node's agent.
pub const PUSHING: &str = "Pushing";

impl PodCheckpointStatus {
    /// Whether the checkpoint is taken (the kubelet answered, its location is known) and its
    /// node's agent is pushing it to a registry: Checkpointing, reason `Pushing`, with a
    /// location. Neither a restarted controller nor a deletion fails it; the agent ends it,
    /// Ready or Failed.
    pub fn is_pushing(&self) -> bool {
        self.phase == Some(PodCheckpointPhase::Checkpointing)
            && self.reason.as_deref() == Some(PUSHING)
            && self.checkpoint_location.is_some()
    }
}

/// A checkpoint stored as an OCI image.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointImageStatus {
    /// `registry/repository@sha256:…`: the image, by digest.
    pub reference: String,
    /// The sum of its blobs' sizes.
    #[serde(default)]
    pub size: i64,
}

/// What happens to a checkpoint's node-local data when its PodCheckpoint is deleted.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DeletionPolicy {
    // (Variants without doc comments: documented ones would make the schema a oneOf, not an enum.)
    // The data stays on the node.
    #[default]
    Retain,
    // podsnapd's node agent removes the data (finalizer `checkpoint.k8s.io/node-data`).
    Delete,
}

/// Where a PodCheckpoint is.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PodCheckpointPhase {
    Pending,
    Checkpointing,
    Ready,
    Failed,
}

#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodCheckpointStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<PodCheckpointPhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Where the checkpoint's data is on `nodeName` (KEP-5823's `CheckpointSource`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crds::checkpoint_location")]
    pub checkpoint_location: Option<CheckpointLocation>,
    /// The checkpoint as an image in a registry (storage type `Image`), once its node's agent
    /// pushed it; the checkpoint is Ready only then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<CheckpointImageStatus>,
    /// The nodes a restore of this image checkpoint was placed on (written by the controller
    /// once each restored pod is bound): their node agents pull the image, and keep it while
    /// this object exists. A node agent reads them here, and never reads pods.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pull_nodes: Vec<String>,
    /// The UID of the pod that was checkpointed (KEP-5823), recorded when the checkpoint began.
    #[serde(
        default,
        rename = "sourcePodUID",
        skip_serializing_if = "Option::is_none"
    )]
    pub source_pod_uid: Option<String>,
    /// Deprecated: the checkpointed containers' names; see `checkpointedContainers`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<String>,
    /// The checkpointed containers (KEP-5823), each with its image pinned by digest
    /// (`repository@sha256:…`) as the node ran it, where the runtime reported one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub checkpointed_containers: Vec<CheckpointedContainer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub completion_time: Option<String>,
    /// The PodTemplate (in this namespace, owned by this PodCheckpoint) that holds the source
    /// pod's spec when it was checkpointed; restores start from it, and only from this object at
    /// this resourceVersion. It is not kept here: whoever may read PodCheckpoints (every node's
    /// agent) would read every namespace's pod specs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template_ref: Option<PodTemplateRef>,
    /// Deprecated: where controllers before podTemplateRef kept the source pod's spec. Read by
    /// restores of such checkpoints, no longer written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crds::preserved_object")]
    pub checkpointed_pod_spec: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Where a checkpoint's data is kept: KEP-5823's `CheckpointSource` union, `type: NodeLocal` (its
/// only type) with `nodeLocal.path`, the checkpoint directory relative to the kubelet's checkpoint
/// root (`<root-dir>/pod-checkpoints`). Objects written before podsnap followed the KEP here carry
/// the directory's absolute path as a string (the seed talk's YAML a bare name); both are read,
/// only the KEP's form is written.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum CheckpointLocation {
    Source(CheckpointSource),
    Legacy(String),
}

/// KEP-5823's `CheckpointSource`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSource {
    /// `NodeLocal`.
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_local: Option<NodeLocalSource>,
}

/// A checkpoint kept on its node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct NodeLocalSource {
    /// Relative to the kubelet's checkpoint root.
    pub path: String,
}

impl CheckpointLocation {
    /// The KEP's only location type.
    pub const NODE_LOCAL: &'static str = "NodeLocal";

    /// A checkpoint in directory `name` of its node's checkpoint root.
    pub fn node_local(name: &str) -> CheckpointLocation {
        CheckpointLocation::Source(CheckpointSource {
            type_: Self::NODE_LOCAL.into(),
            node_local: Some(NodeLocalSource { path: name.into() }),
        })
    }

    /// The path as written: relative to the checkpoint root, or (legacy) absolute.
    pub fn path(&self) -> &str {
        match self {
            CheckpointLocation::Source(source) => source
                .node_local
                .as_ref()
                .filter(|_| source.type_ == Self::NODE_LOCAL)
                .map_or("", |n| n.path.as_str()),
            CheckpointLocation::Legacy(path) => path,
        }
    }

    /// The checkpoint directory's name in its node's checkpoint root (the path's last part, as
    /// the kubelet resolves it); `None` when the location names none.
    pub fn dir_name(&self) -> Option<&str> {
        let name = self.path().trim_end_matches('/').rsplit('/').next()?;
        (!name.is_empty() && name != "." && name != "..").then_some(name)
    }

    /// The checkpoint directory under `root`, the node's checkpoint root.
    pub fn dir_in(&self, root: &std::path::Path) -> Option<std::path::PathBuf> {
        self.dir_name().map(|name| root.join(name))
    }
}

impl std::fmt::Display for CheckpointLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.path())
    }
}

/// A checkpointed container (KEP-5823's `PodCheckpointContainerStatus`).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
pub struct CheckpointedContainer {
    pub name: String,
    /// Its image, by digest where the runtime reported one.
    pub image: String,
}

/// The reasons of a PodCheckpoint's `Ready` condition, as KEP-5823 names them. The detail of a
/// failure (`SourcePodNotFound`, `NotPodsnapPod`, ...) is in `status.reason`.
pub mod ready_reasons {
    /// Not begun.
    pub const PENDING: &str = "Pending";
    /// Being taken.
    pub const CHECKPOINT_IN_PROGRESS: &str = "CheckpointInProgress";
    /// Taken: Ready.
    pub const CHECKPOINT_COMPLETED: &str = "CheckpointCompleted";
    /// Failed for good; `status.reason` and the message say why.
    pub const CHECKPOINT_FAILED: &str = "CheckpointFailed";
    /// The source pod is not the one `spec.sourcePodUID` names.
    pub const SOURCE_POD_REPLACED: &str = "SourcePodReplaced";
}

/// Pods restored from a PodCheckpoint.
// `type_ = "string"` in several printcolumns is no duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "checkpoint.k8s.io",
    version = "v1alpha1",
    kind = "PodRestore",
    namespaced,
    status = "PodRestoreStatus",
    shortname = "prs",
    doc = "One or more pods restored from a Ready PodCheckpoint, on the checkpoint's node, by podsnap-controller (the kubelet restores them: checkpoint.k8s.io/restore-from).",
    annotation(
        "api-approved.kubernetes.io",
        "https://github.com/kubernetes/enhancements/pull/5823"
    ),
    printcolumn(
        name = "Checkpoint",
        type_ = "string",
        json_path = ".spec.checkpointName"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Restored Pod",
        type_ = "string",
        json_path = ".status.restoredPodName"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "!has(self.podTemplate) || !has(self.podTemplate.metadata) || !has(self.podTemplate.metadata.name) || !has(self.replicas) || self.replicas == 1"
).message("podTemplate.metadata.name can only be set with one replica"))]
#[x_kube(validation = Rule::new(
    "has(self.checkpointNamespace) == has(oldSelf.checkpointNamespace)"
).message("checkpointNamespace is immutable"))]
#[serde(rename_all = "camelCase")]
pub struct PodRestoreSpec {
    /// The PodCheckpoint to restore, in `checkpointNamespace`. Immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("checkpointName is immutable"))]
    pub checkpoint_name: String,
    /// The namespace of the PodCheckpoint: this PodRestore's when unset. Another namespace only
    /// where the checkpoint's `spec.restoreNamespaces` lists this one, and its creator holds
    /// `restore` on the checkpoint there (the talk's P1 namespace migration). Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("checkpointNamespace is immutable"))]
    pub checkpoint_namespace: Option<String>,
    /// How many independent pods to restore from the checkpoint (warm start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100), extend("default" = 1))]
    pub replicas: Option<i32>,
    /// Labels, annotations and (with one replica) the name of the restored pods. Their spec is
    /// the checkpointed pod's: containers given here are ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<PodTemplate>,
    /// The node to restore on. A checkpoint kept on its node only can be restored there alone
    /// (its node is used when unset); one stored as an image can be restored on any node, and
    /// its pods are scheduled as the checkpointed pod's spec says when this is unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub node_name: Option<String>,
    /// Restore lazily: the pods run while their memory streams in from the checkpoint
    /// (CRIU's lazy pages; the pods get the annotation `podsnap.io/lazy-restore: "true"`).
    /// If the process serving the memory dies first, the pod is killed, never left running on
    /// memory that did not arrive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lazy: Option<bool>,
}

impl PodRestore {
    /// The PodCheckpoint it restores: (namespace, name), its own namespace unless
    /// `spec.checkpointNamespace` names another.
    pub fn checkpoint_key(&self) -> (String, String) {
        let namespace = self
            .spec
            .checkpoint_namespace
            .clone()
            .or_else(|| self.metadata.namespace.clone())
            .unwrap_or_else(|| "default".into());
        (namespace, self.spec.checkpoint_name.clone())
    }
}

/// What a PodRestore may say about its pods: labels, annotations, and a name for a single one.
/// The spec is the checkpointed pod's; a template's spec is ignored.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
pub struct PodTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TemplateMetadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crds::preserved_object")]
    pub spec: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
pub struct TemplateMetadata {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Where a PodRestore is.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PodRestorePhase {
    Pending,
    Restoring,
    Completed,
    Failed,
}

#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodRestoreStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<PodRestorePhase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restored_pod_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// A status condition, as `metav1.Condition` has it.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: Option<String>,
}

/// A condition's status.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ConditionStatus {
    True,
    False,
    #[default]
    Unknown,
}

impl Condition {
    pub fn new(type_: &str, ok: bool, reason: &str, message: &str) -> Self {
        Condition {
            type_: type_.to_string(),
            status: if ok {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            },
            reason: Some(reason.to_string()),
            message: Some(message.to_string()),
            last_transition_time: Some(now()),
        }
    }
}

/// `as_str` (the wire string), `Display` and `FromStr` (an error naming the values) for the
/// API's string enums.
macro_rules! wire_strings {
    ($($enum:ident { $($variant:ident),+ })+) => {$(
        impl $enum {
            /// Every value, in the schema's order.
            pub const ALL: &'static [$enum] = &[$($enum::$variant),+];

            /// The value as the API has it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($enum::$variant => stringify!($variant)),+
                }
            }
        }

        impl std::fmt::Display for $enum {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $enum {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                $enum::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| {
                        let all: Vec<&str> = $enum::ALL.iter().map(|v| v.as_str()).collect();
                        format!(
                            "{s:?} is not a {}: one of {}",
                            stringify!($enum),
                            all.join(", ")
                        )
                    })
            }
        }
    )+};
}

wire_strings! {
    DeletionPolicy { Retain, Delete }
    PodCheckpointPhase { Pending, Checkpointing, Ready, Failed }
    PodRestorePhase { Pending, Restoring, Completed, Failed }
    PodMigrationPhase { Pending, Checkpointing, Restoring, Succeeded, Failed }
    ConditionStatus { True, False, Unknown }
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
    #[test]
    fn restore_references_read_as_the_kubelet_reads_them() {
        let read = |v: &str| super::restore_reference(v, "pods");
        let some = |ns: &str, n: &str| Some((ns.to_string(), n.to_string()));
        assert_eq!(
            read("counter-checkpoint"),
            some("pods", "counter-checkpoint")
        );
        assert_eq!(read("a.b"), some("pods", "a.b"));
        assert_eq!(read("team-a/counter"), some("team-a", "counter"));
        for not in [
            "checkpoint-counter_default-2026-12-03T10:00:00Z",
            "/var/lib/kubelet/pod-checkpoints/checkpoint-a_b-t",
            "team.a/counter",
            "a/b/c",
            "team-a/",
            "..",
            "",
            "Counter",
            "-a",
        ] {
            assert_eq!(read(not), None, "{not}");
        }
    }

    use super::*;

    #[test]
    fn a_checkpoint_location_is_read_in_the_keps_form_and_the_legacy_one() {
        let kep: CheckpointLocation = serde_json::from_value(serde_json::json!(
            {"type": "NodeLocal", "nodeLocal": {"path": "checkpoint-0f3c"}}
        ))
        .unwrap();
        assert_eq!(kep, CheckpointLocation::node_local("checkpoint-0f3c"));
        assert_eq!(kep.dir_name(), Some("checkpoint-0f3c"));
        assert_eq!(
            serde_json::to_value(&kep).unwrap(),
            serde_json::json!({"type": "NodeLocal", "nodeLocal": {"path": "checkpoint-0f3c"}})
        );
        assert_eq!(
            kep.dir_in(std::path::Path::new("/var/lib/kubelet/pod-checkpoints")),
            Some("/var/lib/kubelet/pod-checkpoints/checkpoint-0f3c".into())
        );
        let legacy: CheckpointLocation = serde_json::from_value(serde_json::json!(
            "/var/lib/kubelet/pod-checkpoints/checkpoint-p_default-t/"
        ))
        .unwrap();
        assert_eq!(legacy.dir_name(), Some("checkpoint-p_default-t"));
        assert_eq!(
            legacy.to_string(),
            "/var/lib/kubelet/pod-checkpoints/checkpoint-p_default-t/"
        );
        // Nothing to resolve: no directory is named.
        for nothing in [
            serde_json::json!(""),
            serde_json::json!("/"),
            serde_json::json!(".."),
            serde_json::json!({"type": "NodeLocal"}),
            serde_json::json!({"type": "Elsewhere", "nodeLocal": {"path": "checkpoint-x"}}),
        ] {
            let location: CheckpointLocation = serde_json::from_value(nothing.clone()).unwrap();
            assert_eq!(location.dir_name(), None, "{nothing}");
        }
    }

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
    fn enums_keep_their_wire_strings() {
        let status: PodRestoreStatus = serde_json::from_value(serde_json::json!({
            "phase": "Completed",
            "conditions": [{"type": "Restored", "status": "True"}],
        }))
        .unwrap();
        assert_eq!(status.phase, Some(PodRestorePhase::Completed));
        assert_eq!(status.conditions[0].status, ConditionStatus::True);
        assert_eq!(
            serde_json::to_value(&status).unwrap(),
            serde_json::json!({"phase": "Completed",
                               "conditions": [{"type": "Restored", "status": "True"}]})
        );
        let spec: PodCheckpointSpec = serde_json::from_value(
            serde_json::json!({"sourcePodName": "p", "deletionPolicy": "Delete"}),
        )
        .unwrap();
        assert_eq!(spec.deletion_policy, Some(DeletionPolicy::Delete));
        for phase in PodCheckpointPhase::ALL {
            assert_eq!(
                serde_json::to_value(phase).unwrap(),
                serde_json::json!(phase.as_str())
            );
            assert_eq!(phase.as_str().parse::<PodCheckpointPhase>(), Ok(*phase));
        }
        assert!(
            "Shred"
                .parse::<DeletionPolicy>()
                .unwrap_err()
                .contains("one of Retain, Delete")
        );
        let checkpoint: PodCheckpointStatus =
            serde_json::from_value(serde_json::json!({"phase": "Ready"})).unwrap();
        assert_eq!(checkpoint.phase, Some(PodCheckpointPhase::Ready));
        assert_eq!(
            serde_json::to_value(&checkpoint).unwrap(),
            serde_json::json!({"phase": "Ready"})
        );
    }

    #[test]
    fn the_pod_template_ref_round_trips_and_the_template_is_named_by_uid() {
        let status = PodCheckpointStatus {
            phase: Some(PodCheckpointPhase::Ready),
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

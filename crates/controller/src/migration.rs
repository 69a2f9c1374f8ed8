//! Reconciling a `PodMigration` ([`crate::api::migration`]): the objects `podsnap migrate`
//! creates, created by the controller and followed to the end. Pending: the pod is checked (it
//! runs, on runtime class podsnap, and can move: [`unmovable`]) and a PodCheckpoint of it is
//! created (storage Image, deletion policy Delete, the pod's UID pinned, owned by the
//! migration). Checkpointing: once it is Ready, a PodRestore of it on the target node.
//! Restoring: once that is Completed (every restored container runs), the source pod is deleted
//! (by its UID) and the migration has Succeeded. A failure at any step deletes the PodRestore and
//! the PodCheckpoint, and the source runs on.
//!
//! Whoever creates a PodMigration has the controller checkpoint, restore and delete a pod for
//! them: the ValidatingAdmissionPolicy podsnap-migrate (deploy/rbac.yaml) asks the authorizer
//! whether they may do each themselves.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};

use crate::api::{
    CheckpointStorage, Condition, DeletionPolicy, MIGRATION_ANNOTATION, PodCheckpoint,
    PodCheckpointPhase, PodCheckpointSpec, PodMigration, PodMigrationPhase, PodMigrationStatus,
    PodRestore, PodRestorePhase, PodRestoreSpec, RUNTIME_CLASS, StorageType, unmovable,
};
use crate::status::{self, Owned, publish};
use crate::{Context, Error};

impl Owned for PodMigration {
    fn failed(condition: Condition, reason: &str, message: &str) -> PodMigrationStatus {
        let _ = condition;
        PodMigrationStatus {
            phase: Some(PodMigrationPhase::Failed),
            reason: Some(reason.into()),
            message: Some(message.into()),
            completion_time: Some(crate::api::now()),
            ..Default::default()
        }
    }
}

/// How often a migration in progress is looked at besides its objects' watch events.
const POLL: Duration = Duration::from_secs(5);

pub async fn reconcile(object: Arc<PodMigration>, ctx: Arc<Context>) -> Result<Action, Error> {
    if object.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let status = object.status.clone().unwrap_or_default();
    match status.phase {
        None | Some(PodMigrationPhase::Pending) => begin(&ctx, &object).await,
        Some(PodMigrationPhase::Checkpointing) => checkpointing(&ctx, &object, &status).await,
        Some(PodMigrationPhase::Restoring) => restoring(&ctx, &object, &status).await,
        Some(PodMigrationPhase::Failed) => {
            // What an undo could not delete when it failed the migration.
            clean_up(&ctx, &object).await?;
            Ok(Action::await_change())
        }
        Some(PodMigrationPhase::Succeeded) => Ok(Action::await_change()),
    }
}

/// Why a migration in progress (Checkpointing or Restoring) is past its deadline, if it is:
/// a replacement that never schedules, a push that never ends.
fn overdue(
    object: &PodMigration,
    status: &PodMigrationStatus,
    now: jiff::Timestamp,
) -> Option<String> {
    if !matches!(
        status.phase,
        Some(PodMigrationPhase::Checkpointing | PodMigrationPhase::Restoring)
    ) {
        return None;
    }
    let started: jiff::Timestamp = status.start_time.as_deref()?.parse().ok()?;
    let deadline = object
        .spec
        .deadline_seconds
        .unwrap_or(crate::api::migration::DEFAULT_DEADLINE_SECONDS);
    let taken = now.duration_since(started).as_secs();
    (taken > deadline).then(|| {
        format!(
            "not done {taken}s after it began ({} at the time), past its deadline of {deadline}s",
            status.phase.map(|p| p.as_str()).unwrap_or_default()
        )
    })
}

/// A step still under way: looked at again shortly, or undone once past the deadline. Only
/// here: a step that has ended (a Completed PodRestore) goes on whatever the time.
async fn wait_or_undo(
    ctx: &Context,
    object: &PodMigration,
    status: &PodMigrationStatus,
) -> Result<Action, Error> {
    match overdue(object, status, jiff::Timestamp::now()) {
        Some(why) => undo(ctx, object, "DeadlineExceeded", &why).await,
        None => Ok(Action::requeue(POLL)),
    }
}

fn namespace_of(object: &PodMigration) -> String {
    object.namespace().unwrap_or_else(|| "default".into())
}

/// The annotations of what a migration creates: its name.
fn annotations(object: &PodMigration) -> std::collections::BTreeMap<String, String> {
    [(MIGRATION_ANNOTATION.to_string(), object.name_any())].into()
}

/// Whether `meta` (of a PodCheckpoint or PodRestore found under the migration's name) names the
/// migration as its controlling owner. Anyone may write an annotation; the spec is compared too
/// ([`checkpoint_ours`], [`restore_ours`]).
fn owned_by(meta: &ObjectMeta, object: &PodMigration) -> bool {
    let uid = object.uid();
    uid.is_some()
        && meta.owner_references.iter().flatten().any(|o| {
            o.controller == Some(true) && Some(&o.uid) == uid.as_ref() && o.kind == "PodMigration"
        })
}

/// The PodCheckpoint the migration creates for the pod of UID `pod_uid`.
fn checkpoint_spec(object: &PodMigration, pod_uid: &str) -> PodCheckpointSpec {
    PodCheckpointSpec {
        source_pod_name: object.spec.pod_name.clone(),
        source_pod_uid: Some(pod_uid.to_string()),
        restore_namespaces: Vec::new(),
        timeout_seconds: None,
        deletion_policy: Some(DeletionPolicy::Delete),
        storage: Some(CheckpointStorage {
            type_: StorageType::Image,
            image: Some(object.spec.image.clone()),
        }),
    }
}

/// The PodRestore the migration creates.
fn restore_spec(object: &PodMigration) -> PodRestoreSpec {
    PodRestoreSpec {
        checkpoint_name: object.name_any(),
        checkpoint_namespace: None,
        replicas: Some(1),
        pod_template: None,
        node_name: object.spec.target_node_name.clone(),
        lazy: None,
    }
}

/// Whether `checkpoint` is the one this migration created: owned by it, and of the spec it
/// gives (the same pod, by UID, to the same repository). One that someone else made under its
/// name is never taken for it (it would be restored, and a pod deleted, on its say).
fn checkpoint_ours(checkpoint: &PodCheckpoint, object: &PodMigration, pod_uid: &str) -> bool {
    owned_by(checkpoint.meta(), object) && checkpoint.spec == checkpoint_spec(object, pod_uid)
}

/// Whether `restore` is the one this migration created (owned by it until the migration has
/// succeeded, and of the spec it gives).
fn restore_ours(restore: &PodRestore, object: &PodMigration) -> bool {
    let annotated = restore
        .annotations()
        .get(MIGRATION_ANNOTATION)
        .is_some_and(|m| *m == object.name_any());
    // Released (ownerReferences removed) on success: the annotation and the spec remain. A
    // PodRestore of that spec restores this migration's own checkpoint, whoever made it.
    restore.spec == restore_spec(object) && (owned_by(restore.meta(), object) || annotated)
}

/// Fails the migration (before anything was created, or after [`undo`]).
async fn fail(
    ctx: &Context,
    object: &PodMigration,
    reason: &str,
    message: &str,
) -> Result<Action, Error> {
    status::fail_at_version(ctx, object, "Succeeded", reason, message).await
}

/// Fails the migration, then deletes what it created (the PodRestore first: its pods go with
/// it): the source runs on. The failure is written first, so that its reason is the one kept;
/// a deletion that does not happen now is done by the reconcile of the Failed migration.
async fn undo(
    ctx: &Context,
    object: &PodMigration,
    reason: &str,
    message: &str,
) -> Result<Action, Error> {
    let failed = fail(
        ctx,
        object,
        reason,
        &format!("{message}; the source pod runs on"),
    )
    .await?;
    clean_up(ctx, object).await?;
    Ok(failed)
}

/// Deletes the PodRestore and the PodCheckpoint the migration created, if any are left.
async fn clean_up(ctx: &Context, object: &PodMigration) -> Result<(), Error> {
    let namespace = namespace_of(object);
    let name = object.name_any();
    let restores: Api<PodRestore> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Some(restore) = restores.get_opt(&name).await?
        && restore_ours(&restore, object)
    {
        crate::delete_ignoring_absent(restores.delete(&name, &DeleteParams::background()).await)?;
    }
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Some(checkpoint) = checkpoints.get_opt(&name).await?
        && owned_by(checkpoint.meta(), object)
    {
        crate::delete_ignoring_absent(
            checkpoints.delete(&name, &DeleteParams::background()).await,
        )?;
    }
    Ok(())
}

/// Pending: checks the pod and creates the PodCheckpoint.
async fn begin(ctx: &Context, object: &PodMigration) -> Result<Action, Error> {
    let namespace = namespace_of(object);
    let name = object.name_any();
    let pod_name = &object.spec.pod_name;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(pod) = pods.get_opt(pod_name).await? else {
        return fail(
            ctx,
            object,
            "SourcePodNotFound",
            &format!("pod {namespace}/{pod_name} does not exist"),
        )
        .await;
    };
    let spec = pod.spec.clone().unwrap_or_default();
    if spec.runtime_class_name.as_deref() != Some(RUNTIME_CLASS) {
        return fail(
            ctx,
            object,
            "NotPodsnapPod",
            &format!("pod {namespace}/{pod_name} runs with runtime class {:?}: only {RUNTIME_CLASS:?} pods can be migrated", spec.runtime_class_name.as_deref().unwrap_or("")),
        )
        .await;
    }
    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    let Some(source_node) = spec.node_name.clone().filter(|_| running) else {
        return fail(
            ctx,
            object,
            "SourcePodNotRunning",
            &format!("pod {namespace}/{pod_name} is not running on a node"),
        )
        .await;
    };
    if let Some(why) = unmovable(&spec) {
        return fail(
            ctx,
            object,
            "Unmovable",
            &format!("pod {namespace}/{pod_name} cannot move: {why}"),
        )
        .await;
    }
    if object.spec.target_node_name.as_deref() == Some(source_node.as_str()) {
        return fail(
            ctx,
            object,
            "SameNode",
            &format!("pod {namespace}/{pod_name} already runs on {source_node}"),
        )
        .await;
    }
    if let Err(message) = crate::checkpoint::check_repository(&object.spec.image.repository) {
        return fail(
            ctx,
            object,
            "InvalidStorage",
            &message.replace("storage.image", "spec.image"),
        )
        .await;
    }
    let source_uid = pod.uid().unwrap_or_default();
    let mut checkpoint = PodCheckpoint::new(&name, checkpoint_spec(object, &source_uid));
    checkpoint.metadata.namespace = Some(namespace.clone());
    checkpoint.metadata.annotations = Some(annotations(object));
    checkpoint.metadata.owner_references = object.controller_owner_ref(&()).map(|o| vec![o]);
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &namespace);
    match checkpoints
        .create(&PostParams::default(), &checkpoint)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = checkpoints.get_opt(&name).await?;
            if !existing.is_some_and(|c| checkpoint_ours(&c, object, &source_uid)) {
                return fail(ctx, object, "NameTaken", &format!("a PodCheckpoint {namespace}/{name} exists that this migration did not create")).await;
            }
        }
        Err(e) => return Err(e.into()),
    }
    let checkpointing = PodMigrationStatus {
        phase: Some(PodMigrationPhase::Checkpointing),
        source_pod_uid: Some(source_uid),
        source_node_name: Some(source_node.clone()),
        checkpoint_name: Some(name.clone()),
        start_time: Some(crate::api::now()),
        ..Default::default()
    };
    if !status::set_at_version(ctx, object, &checkpointing).await? {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    publish(
        ctx,
        object,
        EventType::Normal,
        "Checkpointing",
        &format!(
            "checkpointing pod {pod_name} on {source_node} to {}",
            object.spec.image.repository
        ),
    )
    .await;
    Ok(Action::requeue(POLL))
}

/// Checkpointing: waits for the PodCheckpoint, then creates the PodRestore.
async fn checkpointing(
    ctx: &Context,
    object: &PodMigration,
    status: &PodMigrationStatus,
) -> Result<Action, Error> {
    let namespace = namespace_of(object);
    let name = object.name_any();
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(ctx.client.clone(), &namespace);
    let pod_uid = status.source_pod_uid.as_deref().unwrap_or_default();
    let checkpoint = match checkpoints.get_opt(&name).await? {
        Some(c) if checkpoint_ours(&c, object, pod_uid) => c,
        _ => {
            return undo(
                ctx,
                object,
                "CheckpointDeleted",
                &format!("PodCheckpoint {namespace}/{name} was deleted"),
            )
            .await;
        }
    };
    let checkpoint_status = checkpoint.status.clone().unwrap_or_default();
    match checkpoint_status.phase {
        Some(PodCheckpointPhase::Ready) => {}
        Some(PodCheckpointPhase::Failed) => {
            let why = format!(
                "PodCheckpoint {name} failed: {}: {}",
                checkpoint_status.reason.as_deref().unwrap_or("Failed"),
                checkpoint_status.message.as_deref().unwrap_or("")
            );
            return undo(ctx, object, "CheckpointFailed", &why).await;
        }
        _ => return wait_or_undo(ctx, object, status).await,
    }
    let mut restore = PodRestore::new(&name, restore_spec(object));
    restore.metadata.namespace = Some(namespace.clone());
    restore.metadata.annotations = Some(annotations(object));
    // Owned until the migration has succeeded: deleting the migration half-way deletes the
    // replacement with it (the source runs on); after, it owns the replacement alone.
    restore.metadata.owner_references = object.controller_owner_ref(&()).map(|o| vec![o]);
    let restores: Api<PodRestore> = Api::namespaced(ctx.client.clone(), &namespace);
    match restores.create(&PostParams::default(), &restore).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = restores.get_opt(&name).await?;
            if !existing.is_some_and(|r| restore_ours(&r, object)) {
                return undo(
                    ctx,
                    object,
                    "NameTaken",
                    &format!(
                        "a PodRestore {namespace}/{name} exists that this migration did not create"
                    ),
                )
                .await;
            }
        }
        // Refused (its admission, say): undone, said.
        Err(kube::Error::Api(e)) if (400..500).contains(&e.code) => {
            return undo(
                ctx,
                object,
                "RestoreRefused",
                &format!("creating PodRestore {namespace}/{name}: {}", e.message),
            )
            .await;
        }
        Err(e) => return Err(e.into()),
    }
    let restoring = PodMigrationStatus {
        phase: Some(PodMigrationPhase::Restoring),
        restore_name: Some(name.clone()),
        checkpointed_time: Some(crate::api::now()),
        ..Default::default()
    };
    if !status::set_at_version(ctx, object, &restoring).await? {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let image = checkpoint_status
        .image
        .map(|i| i.reference)
        .unwrap_or_default();
    let from = status.source_node_name.as_deref().unwrap_or("its node");
    publish(
        ctx,
        object,
        EventType::Normal,
        "Restoring",
        &format!(
            "pod {} checkpointed on {from} as {image}; restoring",
            object.spec.pod_name
        ),
    )
    .await;
    Ok(Action::requeue(POLL))
}

/// Restoring: waits for the PodRestore; once its pod runs, deletes the source.
async fn restoring(
    ctx: &Context,
    object: &PodMigration,
    status: &PodMigrationStatus,
) -> Result<Action, Error> {
    let namespace = namespace_of(object);
    let name = object.name_any();
    let restores: Api<PodRestore> = Api::namespaced(ctx.client.clone(), &namespace);
    let restore = match restores.get_opt(&name).await? {
        Some(r) if restore_ours(&r, object) => r,
        _ => {
            return undo(
                ctx,
                object,
                "RestoreDeleted",
                &format!("PodRestore {namespace}/{name} was deleted"),
            )
            .await;
        }
    };
    let restore_status = restore.status.clone().unwrap_or_default();
    match restore_status.phase {
        Some(PodRestorePhase::Completed) => {}
        Some(PodRestorePhase::Failed) => {
            let why = format!(
                "PodRestore {name} failed: {}: {}",
                restore_status.reason.as_deref().unwrap_or("Failed"),
                restore_status.message.as_deref().unwrap_or("")
            );
            return undo(ctx, object, "RestoreFailed", &why).await;
        }
        _ => return wait_or_undo(ctx, object, status).await,
    }
    let Some(restored) = restore_status.restored_pod_name.clone() else {
        return Ok(Action::requeue(POLL));
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let target = pods
        .get_opt(&restored)
        .await?
        .and_then(|p| p.spec)
        .and_then(|s| s.node_name)
        .unwrap_or_default();
    // The replacement runs: the PodRestore that owns it is no longer the migration's (deleting
    // the migration now leaves it), and the source goes, if it is still the pod checkpointed.
    let released = serde_json::json!({
        "metadata": {"ownerReferences": null, "resourceVersion": restore.resource_version()},
    });
    match restores
        .patch(&name, &PatchParams::default(), &Patch::Merge(&released))
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        Err(e) => return Err(e.into()),
    }
    let source = &object.spec.pod_name;
    let params = DeleteParams {
        preconditions: status.source_pod_uid.clone().map(|uid| Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..Default::default()
    };
    match pods.delete(source, &params).await {
        Ok(_) => {}
        // Gone already, or replaced by another pod of its name (not ours to delete).
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let succeeded = PodMigrationStatus {
        phase: Some(PodMigrationPhase::Succeeded),
        reason: Some("Migrated".into()),
        message: Some(format!(
            "pod {source} moved from {} to {target} as {restored}",
            status.source_node_name.as_deref().unwrap_or("its node")
        )),
        restored_pod_name: Some(restored.clone()),
        target_node_name: Some(target.clone()),
        completion_time: Some(crate::api::now()),
        ..Default::default()
    };
    if !status::set_at_version(ctx, object, &succeeded).await? {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    tracing::info!(migration = %name, pod = %source, %restored, %target, "migrated");
    publish(
        ctx,
        object,
        EventType::Normal,
        "Migrated",
        succeeded.message.as_deref().unwrap_or_default(),
    )
    .await;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::{Value, json};

    use crate::fake_api::{FakeApi, context, path_of};

    const GROUP: &str = "checkpoint.k8s.io/v1alpha1";

    fn migration(status: Value) -> Value {
        let mut object = json!({
            "apiVersion": GROUP, "kind": "PodMigration",
            "metadata": {"name": "m", "namespace": "default", "uid": "mig-uid",
                         "resourceVersion": "1", "creationTimestamp": "2026-12-04T10:00:00Z"},
            "spec": {"podName": "p", "targetNodeName": "n2",
                     "image": {"repository": "registry.example/team/p"}},
        });
        if !status.is_null() {
            object["status"] = status;
        }
        object
    }

    fn pod(volumes: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "default", "uid": "pod-uid"},
            "spec": {"runtimeClassName": "podsnap", "nodeName": "n1",
                     "containers": [{"name": "counter", "image": "busybox"}],
                     "volumes": volumes},
            "status": {"phase": "Running"},
        })
    }

    fn path(plural: &str) -> String {
        if plural == "pods" {
            path_of("v1", "pods", "default", "p")
        } else {
            path_of(GROUP, plural, "default", "m")
        }
    }

    /// A PodCheckpoint or PodRestore as the migration `m` creates it, with `status`.
    fn created(kind: &str, status: Value) -> Value {
        let spec = if kind == "PodCheckpoint" {
            json!({"sourcePodName": "p", "sourcePodUID": "pod-uid", "deletionPolicy": "Delete",
                   "storage": {"type": "Image", "image": {"repository": "registry.example/team/p"}}})
        } else {
            json!({"checkpointName": "m", "replicas": 1, "nodeName": "n2"})
        };
        json!({"apiVersion": GROUP, "kind": kind,
               "metadata": {"name": "m", "namespace": "default", "resourceVersion": "7",
                            "annotations": {MIGRATION_ANNOTATION: "m"},
                            "ownerReferences": [{"apiVersion": GROUP, "kind": "PodMigration",
                                                 "name": "m", "uid": "mig-uid", "controller": true}]},
               "spec": spec,
               "status": status})
    }

    #[tokio::test]
    async fn a_checkpoint_someone_else_made_under_its_name_is_not_taken_for_its_own() {
        for (field, value) in [
            (
                "/spec/storage/image/repository",
                json!("attacker.example/x"),
            ),
            ("/spec/sourcePodUID", json!("another-pod")),
            ("/metadata/ownerReferences", json!([])),
        ] {
            let fake = FakeApi::default();
            fake.put(&path("podmigrations"), migration(Value::Null));
            fake.put(&path("pods"), pod(json!([])));
            let mut planted = created("PodCheckpoint", json!({"phase": "Ready"}));
            *planted.pointer_mut(field).unwrap() = value;
            fake.put(&path("podcheckpoints"), planted.clone());
            reconcile_stored(&fake).await;
            let stored = fake.get(&path("podmigrations")).unwrap();
            assert_eq!(stored["status"]["reason"], "NameTaken", "{field}: {stored}");
            assert_eq!(
                fake.get(&path("podcheckpoints")).unwrap(),
                planted,
                "{field}: left as it is"
            );
            assert!(fake.get(&path("podrestores")).is_none());
            assert!(fake.get(&path("pods")).is_some());
        }
    }

    async fn reconcile_stored(fake: &FakeApi) -> Action {
        let object: PodMigration =
            serde_json::from_value(fake.get(&path("podmigrations")).unwrap()).unwrap();
        reconcile(Arc::new(object), context(fake)).await.unwrap()
    }

    #[tokio::test]
    async fn a_movable_pod_gets_a_pinned_image_checkpoint_owned_by_its_migration() {
        let fake = FakeApi::default();
        fake.put(&path("podmigrations"), migration(Value::Null));
        fake.put(
            &path("pods"),
            pod(json!([{"name": "cache", "emptyDir": {}}])),
        );
        reconcile_stored(&fake).await;
        let checkpoint = fake.get(&path("podcheckpoints")).expect("a PodCheckpoint");
        assert_eq!(checkpoint["spec"]["sourcePodName"], "p");
        assert_eq!(checkpoint["spec"]["sourcePodUID"], "pod-uid");
        assert_eq!(checkpoint["spec"]["deletionPolicy"], "Delete");
        assert_eq!(checkpoint["spec"]["storage"]["type"], "Image");
        assert_eq!(
            checkpoint["spec"]["storage"]["image"]["repository"],
            "registry.example/team/p"
        );
        assert_eq!(
            checkpoint["metadata"]["annotations"][MIGRATION_ANNOTATION],
            "m"
        );
        assert_eq!(
            checkpoint["metadata"]["ownerReferences"][0]["uid"],
            "mig-uid"
        );
        let stored = fake.get(&path("podmigrations")).unwrap();
        assert_eq!(stored["status"]["phase"], "Checkpointing", "{stored}");
        assert_eq!(stored["status"]["sourceNodeName"], "n1");
        assert_eq!(stored["status"]["sourcePodUID"], "pod-uid");
    }

    #[tokio::test]
    async fn a_pod_that_cannot_move_fails_the_migration_and_nothing_is_created() {
        for (volumes, target, reason) in [
            (
                json!([{"name": "data", "hostPath": {"path": "/srv"}}]),
                "n2",
                "Unmovable",
            ),
            (json!([]), "n1", "SameNode"),
        ] {
            let fake = FakeApi::default();
            let mut object = migration(Value::Null);
            object["spec"]["targetNodeName"] = json!(target);
            fake.put(&path("podmigrations"), object);
            fake.put(&path("pods"), pod(volumes));
            reconcile_stored(&fake).await;
            let stored = fake.get(&path("podmigrations")).unwrap();
            assert_eq!(stored["status"]["phase"], "Failed", "{stored}");
            assert_eq!(stored["status"]["reason"], reason, "{stored}");
            assert!(fake.get(&path("podcheckpoints")).is_none());
        }
    }

    #[tokio::test]
    async fn a_migration_past_its_deadline_is_undone_and_one_within_it_waits() {
        for (start, deadline, undone) in [
            ("2020-01-01T00:00:00Z", Value::Null, true),
            (&*crate::api::now(), json!(60), false),
        ] {
            let fake = FakeApi::default();
            let mut object = migration(json!({"phase": "Restoring", "sourcePodUID": "pod-uid",
                                              "sourceNodeName": "n1", "startTime": start}));
            if !deadline.is_null() {
                object["spec"]["deadlineSeconds"] = deadline;
            }
            fake.put(&path("podmigrations"), object);
            fake.put(&path("pods"), pod(json!([])));
            fake.put(
                &path("podcheckpoints"),
                created("PodCheckpoint", json!({"phase": "Ready"})),
            );
            fake.put(
                &path("podrestores"),
                created("PodRestore", json!({"phase": "Restoring"})),
            );
            reconcile_stored(&fake).await;
            let stored = fake.get(&path("podmigrations")).unwrap();
            if undone {
                assert_eq!(stored["status"]["reason"], "DeadlineExceeded", "{stored}");
                assert!(fake.get(&path("podrestores")).is_none());
                assert!(fake.get(&path("podcheckpoints")).is_none());
            } else {
                assert_eq!(stored["status"]["phase"], "Restoring", "{stored}");
                assert!(fake.get(&path("podrestores")).is_some());
            }
            assert!(fake.get(&path("pods")).is_some(), "the source runs on");
        }
    }

    #[tokio::test]
    async fn a_failed_restore_is_undone_and_the_source_runs_on() {
        let fake = FakeApi::default();
        fake.put(
            &path("podmigrations"),
            migration(
                json!({"phase": "Restoring", "sourcePodUID": "pod-uid", "sourceNodeName": "n1"}),
            ),
        );
        fake.put(&path("pods"), pod(json!([])));
        fake.put(
            &path("podcheckpoints"),
            created("PodCheckpoint", json!({"phase": "Ready"})),
        );
        fake.put(
            &path("podrestores"),
            created(
                "PodRestore",
                json!({"phase": "Failed", "reason": "RestoreFailed", "message": "no room"}),
            ),
        );
        reconcile_stored(&fake).await;
        assert!(fake.get(&path("podrestores")).is_none());
        assert!(fake.get(&path("podcheckpoints")).is_none());
        assert!(fake.get(&path("pods")).is_some(), "the source is left");
        let stored = fake.get(&path("podmigrations")).unwrap();
        assert_eq!(stored["status"]["phase"], "Failed", "{stored}");
        let message = stored["status"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("no room") && message.contains("the source pod runs on"),
            "{stored}"
        );
    }

    #[tokio::test]
    async fn a_completed_restore_deletes_the_source_and_the_migration_succeeds() {
        let fake = FakeApi::default();
        // Past its deadline: a restore that has ended goes on all the same.
        fake.put(
            &path("podmigrations"),
            migration(json!({"phase": "Restoring", "sourcePodUID": "pod-uid",
                             "sourceNodeName": "n1", "startTime": "2020-01-01T00:00:00Z"})),
        );
        fake.put(&path("pods"), pod(json!([])));
        fake.put(
            &path_of("v1", "pods", "default", "m"),
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": "m", "namespace": "default"},
                   "spec": {"nodeName": "n2", "containers": [{"name": "counter", "image": "busybox"}]}}),
        );
        fake.put(
            &path("podrestores"),
            created(
                "PodRestore",
                json!({"phase": "Completed", "restoredPodName": "m"}),
            ),
        );
        reconcile_stored(&fake).await;
        assert!(fake.get(&path("pods")).is_none(), "the source is deleted");
        let restore = fake.get(&path("podrestores")).unwrap();
        assert!(
            restore["metadata"]["ownerReferences"].is_null(),
            "released: {restore}"
        );
        let stored = fake.get(&path("podmigrations")).unwrap();
        assert_eq!(stored["status"]["phase"], "Succeeded", "{stored}");
        assert_eq!(stored["status"]["restoredPodName"], "m");
        assert_eq!(stored["status"]["targetNodeName"], "n2");
    }
}

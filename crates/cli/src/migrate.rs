//! `podsnap migrate POD --image REPO [--to NODE]` and `podsnap drain NODE --image REPO`: a pod
//! moved to another node through a checkpoint image, with the objects a user would create by
//! hand. A PodCheckpoint (storage type Image, deletion policy Delete) is taken and pushed by the
//! source node's agent while the pod runs on; a PodRestore brings it up on the target (the node
//! asked for, or where the scheduler puts it); the source pod is deleted only once the restored
//! pod runs. A failure before that deletes what the migration created (the PodRestore, whose pods
//! go with it, and the PodCheckpoint) and leaves the source pod running. The restored pod has a
//! new name (`<pod>-m-<time>`): two pods of one name cannot run at once, and the source runs
//! until its replacement does.
//!
//! `drain` cordons the node (as `kubectl drain` does, so the scheduler places the restored pods
//! elsewhere) and migrates every running podsnap pod on it, one after another; pods of other
//! runtime classes are left to `kubectl drain`.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};

use crate::kube_cmd::{self, CheckpointOptions, RestoreOptions, Target};
use podsnap_checkpoint_api::{PodCheckpoint, PodRestore, RUNTIME_CLASS};

/// What a migration needs besides its pod.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// The registry repository the checkpoint goes through.
    pub image: String,
    /// The target node; the scheduler's choice when unset.
    pub to: Option<String>,
    /// age public keys the checkpoint image is sealed to (none: not encrypted).
    pub encrypt_to: Vec<String>,
    /// How long each step (checkpoint and push, restore) may take.
    pub wait: Duration,
}

/// Where a migrated pod went.
#[derive(Debug)]
pub struct Migrated {
    pub pod: String,
    pub node: String,
    pub checkpoint: String,
}

/// Migrates `pod` in the target's namespace; prints `<restored pod>\t<node>\t<checkpoint>`.
pub async fn migrate(target: &Target, pod: &str, options: &MigrateOptions) -> anyhow::Result<()> {
    let moved = migrate_one(target, pod, options).await?;
    println!("{}\t{}\t{}", moved.pod, moved.node, moved.checkpoint);
    Ok(())
}

async fn migrate_one(
    target: &Target,
    pod: &str,
    options: &MigrateOptions,
) -> anyhow::Result<Migrated> {
    let namespace = &target.namespace;
    let pods: Api<Pod> = Api::namespaced(target.client.clone(), namespace);
    let source = pods
        .get(pod)
        .await
        .with_context(|| format!("pod {namespace}/{pod}"))?;
    let spec = source.spec.clone().unwrap_or_default();
    if spec.runtime_class_name.as_deref() != Some(RUNTIME_CLASS) {
        bail!(
            "pod {namespace}/{pod} does not run with runtime class {RUNTIME_CLASS:?}: it cannot be checkpointed"
        );
    }
    let running = source.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    let Some(from) = spec.node_name.filter(|_| running) else {
        bail!("pod {namespace}/{pod} is not running on a node");
    };
    if options.to.as_deref() == Some(from.as_str()) {
        bail!("pod {namespace}/{pod} runs on {from} already");
    }
    let stamp = jiff::Timestamp::now().strftime("%Y%m%d-%H%M%S").to_string();
    let checkpoint = format!("{pod}-m-{stamp}");
    let restore = checkpoint.clone();
    let checkpoints: Api<PodCheckpoint> = Api::namespaced(target.client.clone(), namespace);
    let restores: Api<PodRestore> = Api::namespaced(target.client.clone(), namespace);
    // Whatever this migration created, removed again when it fails: the source runs on.
    let undo = |what: anyhow::Error| {
        let (checkpoints, restores, checkpoint, restore) = (
            checkpoints.clone(),
            restores.clone(),
            checkpoint.clone(),
            restore.clone(),
        );
        async move {
            let background = DeleteParams::background();
            let _ = restores.delete(&restore, &background).await;
            let _ = checkpoints.delete(&checkpoint, &background).await;
            what.context(format!(
                "migrating pod {namespace}/{pod}: the source pod runs on; its PodCheckpoint and PodRestore {checkpoint} were deleted"
            ))
        }
    };

    let started = Instant::now();
    let checkpointed = kube_cmd::create_checkpoint(
        target,
        pod,
        CheckpointOptions {
            name: Some(checkpoint.clone()),
            timeout_seconds: None,
            deletion_policy: Some("Delete".into()),
            image: Some(options.image.clone()),
            encrypt_to: options.encrypt_to.clone(),
        },
        options.wait,
    )
    .await;
    if let Err(e) = checkpointed {
        return Err(undo(e).await);
    }
    let pushed_in = started.elapsed();
    let restored = kube_cmd::create_restore(
        target,
        &checkpoint,
        RestoreOptions {
            replicas: None,
            pod_name: None,
            name: Some(restore.clone()),
            node: options.to.clone(),
        },
        options.wait,
    )
    .await;
    let done = match restored {
        Ok(done) => done,
        Err(e) => return Err(undo(e).await),
    };
    let restored_in = started.elapsed() - pushed_in;
    let new_pod = done
        .status
        .and_then(|s| s.restored_pod_name)
        .unwrap_or_else(|| restore.clone());
    let node = pods
        .get(&new_pod)
        .await?
        .spec
        .and_then(|s| s.node_name)
        .unwrap_or_default();
    // The replacement runs: now the source goes.
    pods.delete(pod, &DeleteParams::default())
        .await
        .with_context(|| format!("deleting the source pod {namespace}/{pod}"))?;
    eprintln!(
        "pod {namespace}/{pod} on {from} -> {new_pod} on {node}: checkpoint and push {:.1}s, restore {:.1}s; PodCheckpoint {checkpoint} kept",
        pushed_in.as_secs_f64(),
        restored_in.as_secs_f64()
    );
    Ok(Migrated {
        pod: new_pod,
        node,
        checkpoint,
    })
}

/// `podsnap drain NODE`: cordons the node and migrates its running podsnap pods elsewhere, all
/// namespaces; fails (after trying every pod) when one could not be moved.
pub async fn drain(
    client: kube::Client,
    node: &str,
    options: &MigrateOptions,
) -> anyhow::Result<()> {
    if options.to.as_deref() == Some(node) {
        bail!("--to {node} is the node being drained");
    }
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"unschedulable": true}})),
        )
        .await
        .with_context(|| format!("cordoning node {node}"))?;
    eprintln!("node {node} cordoned");
    let pods: Api<Pod> = Api::all(client.clone());
    let on_node = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .with_context(|| format!("listing the pods on {node}"))?;
    let mut failed = Vec::new();
    for pod in on_node.items {
        let spec = pod.spec.clone().unwrap_or_default();
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        if spec.runtime_class_name.as_deref() != Some(RUNTIME_CLASS)
            || !running
            || pod.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let namespace = pod.namespace().unwrap_or_else(|| "default".into());
        let target = Target {
            client: client.clone(),
            namespace: namespace.clone(),
        };
        match migrate_one(&target, &pod.name_any(), options).await {
            Ok(moved) => println!(
                "{namespace}/{}\t{}\t{}\t{}",
                pod.name_any(),
                moved.pod,
                moved.node,
                moved.checkpoint
            ),
            Err(e) => {
                eprintln!("{e:#}");
                failed.push(format!("{namespace}/{}", pod.name_any()));
            }
        }
    }
    if !failed.is_empty() {
        bail!(
            "node {node} stays cordoned; these pods were not moved and run on: {}",
            failed.join(", ")
        );
    }
    Ok(())
}

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
//! A pod that cannot be moved is refused before anything is created: a `hostPath` volume (its
//! data stays on the source node) or a device resource (a GPU's memory is not in a CRIU dump).
//! Established TCP connections fail the checkpoint itself (CRIU refuses them without
//! tcp-established), which undoes the migration as any failure does.
//!
//! The downtime printed is from the source's last output before the checkpoint was asked for to
//! the replacement's first output (kubelet log timestamps), with where it went: checkpoint and
//! push, restore to running, first output.
//!
//! `drain` cordons the node (as `kubectl drain` does, so the scheduler places the restored pods
//! elsewhere) and migrates every running podsnap pod on it, one after another; pods of other
//! runtime classes are left to `kubectl drain`.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, ListParams, LogParams, Patch, PatchParams};
use kube::{Api, ResourceExt};

use crate::kube_cmd::{self, CheckpointOptions, RestoreOptions, Target};
use podsnap_checkpoint_api::{PodCheckpoint, PodRestore, RUNTIME_CLASS, unmovable};

/// What a migration needs besides its pod (the options `migrate` and `drain` share).
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateOptions {
    /// The registry repository the checkpoints go through (registry/path, no tag).
    #[arg(long, value_name = "REGISTRY/REPOSITORY")]
    pub image: String,
    /// The node to move the pods to (default: where the scheduler puts each).
    #[arg(long)]
    pub to: Option<String>,
    /// Encrypt the checkpoint images to this age public key (repeat for several).
    #[arg(long, value_name = "AGE_PUBLIC_KEY")]
    pub encrypt_to: Vec<String>,
    /// Push and pull with the credentials of this Secret (type kubernetes.io/dockerconfigjson)
    /// of each pod's namespace.
    #[arg(long, value_name = "SECRET")]
    pub registry_secret: Option<String>,
    /// How long each step (checkpoint and push; restore) of each pod's migration may take.
    #[arg(long, value_name = "DURATION", default_value = "300s", value_parser = crate::duration::parse_duration)]
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
    let Some(from) = spec.node_name.clone().filter(|_| running) else {
        bail!("pod {namespace}/{pod} is not running on a node");
    };
    if options.to.as_deref() == Some(from.as_str()) {
        bail!("pod {namespace}/{pod} runs on {from} already");
    }
    if let Some(why) = unmovable(&spec) {
        bail!("pod {namespace}/{pod} cannot be moved to another node: {why}");
    }
    let container = spec
        .containers
        .first()
        .map(|c| c.name.clone())
        .unwrap_or_default();
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
    let requested = jiff::Timestamp::now();
    let checkpointed = kube_cmd::create_checkpoint(
        target,
        pod,
        CheckpointOptions {
            name: Some(checkpoint.clone()),
            timeout_seconds: None,
            deletion_policy: Some("Delete".into()),
            image: Some(options.image.clone()),
            encrypt_to: options.encrypt_to.clone(),
            registry_secret: options.registry_secret.clone(),
            // This pod, which is deleted once restored: not one created again under its name.
            source_pod_uid: source.metadata.uid.clone(),
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
            lazy: false,
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
    let running_at = jiff::Timestamp::now();
    // The source's last output before the checkpoint was asked for, read before it goes.
    let since = i64::try_from(started.elapsed().as_secs()).unwrap_or(i64::MAX / 2) + 30;
    let last_output = match output_times(&pods, pod, &container, Some(since)).await {
        Ok(times) => times.into_iter().rev().find(|t| *t <= requested),
        Err(e) => {
            eprintln!("(downtime not measured: the source's log: {e:#})");
            None
        }
    };
    // The replacement runs: now the source goes.
    pods.delete(pod, &DeleteParams::default())
        .await
        .with_context(|| format!("deleting the source pod {namespace}/{pod}"))?;
    eprintln!(
        "pod {namespace}/{pod} on {from} -> {new_pod} on {node}: checkpoint and push {:.1}s, restore {:.1}s; PodCheckpoint {checkpoint} kept",
        pushed_in.as_secs_f64(),
        restored_in.as_secs_f64()
    );
    if let Some(last) = last_output {
        match first_output(
            &pods,
            &new_pod,
            &container,
            options.wait.min(Duration::from_secs(60)),
        )
        .await
        {
            Some(first) if first < last => eprintln!(
                "(downtime not measured: {new_pod}'s first output is stamped before the source's last; are the nodes' clocks apart?)"
            ),
            Some(first) => eprintln!(
                "downtime {:.2}s: the source's last output before the checkpoint to {new_pod}'s first (output to checkpoint asked {:.2}s, checkpoint and push {:.2}s, restore to running {:.2}s, running to first output {:.2}s)",
                seconds(last, first),
                seconds(last, requested),
                pushed_in.as_secs_f64(),
                restored_in.as_secs_f64(),
                seconds(running_at, first).max(0.0),
            ),
            None => eprintln!("(downtime not measured: {new_pod} wrote no output yet)"),
        }
    }
    Ok(Migrated {
        pod: new_pod,
        node,
        checkpoint,
    })
}

/// The kubelet's timestamps of a container's log lines (of the last `since` seconds).
async fn output_times(
    pods: &Api<Pod>,
    pod: &str,
    container: &str,
    since: Option<i64>,
) -> anyhow::Result<Vec<jiff::Timestamp>> {
    let params = LogParams {
        container: Some(container.to_string()),
        timestamps: true,
        since_seconds: since,
        ..Default::default()
    };
    let log = pods
        .logs(pod, &params)
        .await
        .with_context(|| format!("the log of {pod}/{container}"))?;
    Ok(log
        .lines()
        .filter_map(|line| line.split_once(' ')?.0.parse().ok())
        .collect())
}

/// When the container first wrote output, waiting up to `wait` for it to.
async fn first_output(
    pods: &Api<Pod>,
    pod: &str,
    container: &str,
    wait: Duration,
) -> Option<jiff::Timestamp> {
    let deadline = Instant::now() + wait;
    loop {
        if let Ok(times) = output_times(pods, pod, container, None).await
            && let Some(first) = times.first()
        {
            return Some(*first);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn seconds(from: jiff::Timestamp, to: jiff::Timestamp) -> f64 {
    (to.as_nanosecond() - from.as_nanosecond()) as f64 / 1e9
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

//! End-to-end tests of `PodCheckpoint` / `PodRestore` (checkpoint.k8s.io/v1alpha1) on the
//! cluster ([`Cluster::get`]: hack/cluster-up.sh's single node, where podsnap-controller runs
//! beside it with its own least-privilege identity, or kind with `PODSNAP_E2E_CLUSTER=kind`,
//! where it runs as deploy/ deploys it). Run one at a time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use podsnap_e2e::cluster::{
    COUNTER_SCRIPT, Cluster, Component, KubePod, Object, RESTORE_FROM, checkpoint_of, counter_pod,
    counts, metric,
};
use podsnap_e2e::wait_for;
use serde_json::{Value, json};

/// Waits until PodCheckpoint `name` (namespace default) no longer exists.
fn wait_gone(cluster: &Cluster, name: &str, timeout: Duration) {
    wait_for(format!("PodCheckpoint {name} to be gone"), timeout, || {
        let f = cluster.kubectl_try(["get", "podcheckpoint", name])?;
        if f.success() {
            Err(format!("{name} is still there"))
        } else {
            Ok(())
        }
    });
}

fn wait_counting(pod: &KubePod<'_>, n: usize) -> Vec<u64> {
    pod.wait_counting("counter", n)
}

/// The seed talk's two YAML documents apply verbatim; without a `my-pod` both end Failed with a
/// reason (no retries), and the printer columns are the talk's.
#[test]
fn seed_yaml_applies_unchanged_and_fails_cleanly_without_its_pod() {
    let cluster = Cluster::get();
    let checkpoint = Object::create(cluster, cluster.example("seed-podcheckpoint.yaml"));
    let restore = Object::create(cluster, cluster.example("seed-podrestore.yaml"));
    let failed = checkpoint.wait_phase(&["Failed", "Ready"]);
    assert_eq!(failed["status"]["phase"], "Failed", "{failed}");
    assert_eq!(failed["status"]["reason"], "SourcePodNotFound", "{failed}");
    assert!(
        failed["status"]["message"]
            .as_str()
            .unwrap()
            .contains("default/my-pod does not exist")
    );
    // The status in the YAML was not taken from the user.
    assert_ne!(failed["status"]["nodeName"], "worker-1");
    let restore_status = restore.wait_phase(&["Failed", "Completed"]);
    assert_eq!(
        restore_status["status"]["reason"], "CheckpointFailed",
        "{restore_status}"
    );

    let table = cluster.kubectl(["get", "podcheckpoints"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        &header[..5],
        ["NAME", "SOURCE", "POD", "PHASE", "NODE"],
        "{table}"
    );
    let events = cluster.events("default", "my-checkpoint");
    assert!(
        events.iter().any(|e| e.starts_with("SourcePodNotFound:")),
        "{events:#?}"
    );
    // No retry storm: one failure event, not a stream of them.
    std::thread::sleep(Duration::from_secs(3));
    let again = cluster.events("default", "my-checkpoint");
    assert_eq!(events.len(), again.len(), "{again:#?}");
}

/// Suspend and resume as one flow: checkpoint a counter, delete it, restore it under the same
/// name; it counts on from the checkpoint.
#[test]
fn suspend_and_resume_under_the_same_pod_name() {
    let cluster = Cluster::get();
    let (kubelet_before, controller_before) =
        (cluster.kubelet_metrics(), cluster.controller_metrics());
    let pod = cluster.create_pod(counter_pod("e2e-suspend"));
    pod.wait_ready();
    wait_counting(&pod, 3);
    let before = *counts(&pod.logs("counter")).last().unwrap();
    let checkpoint = Object::create(cluster, checkpoint_of("e2e-suspend-ckpt", "e2e-suspend"));
    let ready = checkpoint.wait_phase(&["Ready", "Failed"]);
    assert_eq!(ready["status"]["phase"], "Ready", "{ready}");
    assert_eq!(ready["status"]["nodeName"], cluster.node.as_str());
    assert_eq!(ready["status"]["containers"], json!(["counter"]));
    let location = &cluster.checkpoint_dir(&ready["status"]);
    assert!(
        cluster.node_test(&cluster.node, "-d", location),
        "{}",
        location.display()
    );
    // checkpointctl's config.dump names the image as the pod spec does.
    let dump: Value = serde_json::from_str(
        &cluster
            .node_read(&cluster.node, &location.join("counter/config.dump"))
            .expect("config.dump"),
    )
    .unwrap();
    assert_eq!(
        dump["rootfsImageName"],
        podsnap_e2e::cluster::COUNTER_IMAGE,
        "{dump}"
    );
    let after = *counts(&pod.logs("counter")).last().unwrap();
    drop(pod);

    let restore = Object::create(
        cluster,
        json!({
            "apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodRestore",
            "metadata": {"name": "e2e-resume", "namespace": "default"},
            "spec": {"checkpointName": "e2e-suspend-ckpt",
                     "podTemplate": {"metadata": {"name": "e2e-suspend", "labels": {"app": "resumed"}}}}
        }),
    );
    let done = restore.wait_phase(&["Completed", "Failed"]);
    assert_eq!(done["status"]["phase"], "Completed", "{done}");
    assert_eq!(done["status"]["restoredPodName"], "e2e-suspend");
    let resumed = cluster.existing_pod("default", "e2e-suspend");
    let seen = wait_counting(&resumed, 2);
    assert!(
        seen[0] > before && seen[0] <= after + 1,
        "the resumed pod began at {}, the counter was at {before}..{after} when checkpointed",
        seen[0]
    );
    let labels = resumed.get()["metadata"]["labels"].clone();
    assert_eq!(labels["app"], "resumed");

    // The checkpoint and the restore are counted, under KEP-5823's metric names.
    let (kubelet, controller) = (cluster.kubelet_metrics(), cluster.controller_metrics());
    let grew =
        |before: &str, after: &str, series: &str| metric(after, series) - metric(before, series);
    for series in [
        "kubelet_pod_checkpoint_operations_total{result=\"success\"}",
        "kubelet_pod_checkpoint_duration_seconds_count",
        "kubelet_pod_checkpoint_size_bytes_count",
        "kubelet_pod_restore_operations_total{result=\"success\"}",
        "kubelet_pod_restore_duration_seconds_count",
    ] {
        assert_eq!(
            grew(&kubelet_before, &kubelet, series),
            1.0,
            "{series} in\n{kubelet}"
        );
    }
    assert!(metric(&kubelet, "kubelet_pod_checkpoint_size_bytes_sum") > 0.0);
    for series in [
        // The kubelet writes the rest, and may take the object before the controller writes
        // Pending: the controller counts what it writes and sees.
        "podcheckpoint_phase_total{phase=\"Ready\"}",
        "podcheckpoint_ready_condition_total{status=\"True\",reason=\"CheckpointCompleted\"}",
    ] {
        assert_eq!(
            grew(&controller_before, &controller, series),
            1.0,
            "{series} in\n{controller}"
        );
    }
    assert!(
        grew(
            &controller_before,
            &controller,
            "podcheckpoint_reconcile_duration_seconds_count"
        ) >= 1.0
    );
}

/// The entries of the kubelet's pod checkpoint directory (on the suite's node).
fn checkpoint_entries(cluster: &Cluster) -> std::collections::BTreeSet<String> {
    cluster.node_entries(&cluster.node, &cluster.kubelet_root.join("pod-checkpoints"))
}

/// Whether `test <test> <path>` holds on the suite's node.
fn on_node(cluster: &Cluster, test: &str, path: &Path) -> bool {
    cluster.node_test(&cluster.node, test, path)
}

/// A checkpoint directory's kubelet record (`<directory>.kubelet.json`).
fn record_of(dir: &Path) -> PathBuf {
    PathBuf::from(format!("{}.kubelet.json", dir.display()))
}

/// The kubelet is killed while it checkpoints (a pod with 512 MiB in an emptyDir, which takes
/// seconds to archive) and started again: the pod is not left frozen, and no checkpoint data is
/// left without an object that points to it — the new kubelet finds the object Checkpointing on
/// its node and fails it (KubeletRestarted, its partial output removed), or it is Ready with its
/// data had the checkpoint ended first. The pod can be checkpointed again afterwards.
#[test]
fn a_kubelet_killed_mid_checkpoint_leaves_no_frozen_pod_and_no_orphaned_data() {
    let cluster = Cluster::get();
    let mut manifest = counter_pod("e2e-restart");
    manifest["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
    let container = &mut manifest["spec"]["containers"][0];
    container["volumeMounts"] = json!([{"name": "data", "mountPath": "/data"}]);
    container["command"] = json!([
        "sh",
        "-c",
        format!("head -c 536870912 /dev/urandom > /data/blob && {COUNTER_SCRIPT}")
    ]);
    let pod = cluster.create_pod(manifest);
    pod.wait_ready();
    wait_counting(&pod, 2);
    let before = checkpoint_entries(cluster);

    let checkpoint = Object::create(cluster, checkpoint_of("e2e-restart-ckpt", "e2e-restart"));
    let seen = checkpoint.wait_phase(&["Checkpointing", "Ready", "Failed"]);
    assert_eq!(
        seen["status"]["phase"], "Checkpointing",
        "the checkpoint ended before the kubelet could be killed: {seen}"
    );
    cluster.kill_kubelet(&cluster.node);
    cluster.start_kubelet(&cluster.node);

    let ended = checkpoint.wait_phase(&["Ready", "Failed"]);
    let status = &ended["status"];
    let expected = match status["phase"].as_str() {
        Some("Failed") => {
            assert_eq!(status["reason"], "KubeletRestarted", "{ended}");
            assert_eq!(
                status["conditions"][0]["reason"], "CheckpointFailed",
                "{ended}"
            );
            before.clone()
        }
        _ => {
            let location = cluster.checkpoint_dir(status);
            let name = location.file_name().unwrap().to_string_lossy();
            let mut with = before.clone();
            with.insert(name.to_string());
            with.insert(format!("{name}.kubelet.json"));
            with
        }
    };
    // The kubelet and podsnapd finish (or give up) on their own: wait for what they leave.
    wait_for(
        "the pod checkpoint directory to hold only what an object points to",
        Duration::from_secs(120),
        || {
            let now = checkpoint_entries(cluster);
            if now == expected {
                Ok(())
            } else {
                Err(format!("{now:?}, want {expected:?}"))
            }
        },
    );
    // Not frozen: it counts on (its logs through the restarted kubelet, once it serves them).
    let last = wait_for("the pod's logs", Duration::from_secs(60), || {
        counts(&pod.try_logs("counter")?)
            .last()
            .copied()
            .ok_or_else(|| "no count yet".to_string())
    });
    wait_for("the pod to count on", Duration::from_secs(30), || {
        let now = *counts(&pod.try_logs("counter")?).last().unwrap();
        if now >= last + 2 {
            Ok(())
        } else {
            Err(format!("count {now}, was {last}"))
        }
    });
    // And it can be checkpointed again.
    let again = Object::create(cluster, checkpoint_of("e2e-restart-again", "e2e-restart"));
    let ready = again.wait_phase(&["Ready", "Failed"]);
    assert_eq!(ready["status"]["phase"], "Ready", "{ready}");
}

/// KEP-5823: the kubelet takes a PodCheckpoint itself. With podsnap-controller stopped, the
/// kubelet of the source pod's node checkpoints it into `checkpoint-<PodCheckpoint UID>` and
/// writes the status with the KEP's names (its own status writes, as `kubelet`), with events
/// CheckpointStarted and CheckpointSucceeded. Once the controller runs again it records the pod's
/// spec for PodRestores; the checkpoint restores by reference either way.
#[test]
fn the_kubelet_checkpoints_a_pod_with_no_controller_running() {
    let cluster = Cluster::get();
    let pod = cluster.create_pod(counter_pod("e2e-kubelet-takes"));
    pod.wait_ready();
    wait_counting(&pod, 2);
    let got = pod.get();
    let (pod_uid, node) = (
        got["metadata"]["uid"].as_str().unwrap().to_string(),
        got["spec"]["nodeName"].as_str().unwrap().to_string(),
    );
    let stopped = cluster.stop_controller();
    let checkpoint = Object::create(
        cluster,
        checkpoint_of("e2e-kubelet-ckpt", "e2e-kubelet-takes"),
    );
    let ready = checkpoint.wait_phase(&["Ready", "Failed"]);
    let status = &ready["status"];
    assert_eq!(status["phase"], "Ready", "{ready}");
    let condition = &status["conditions"][0];
    assert_eq!(
        (
            &condition["type"],
            &condition["status"],
            &condition["reason"]
        ),
        (
            &json!("Ready"),
            &json!("True"),
            &json!("CheckpointCompleted")
        ),
        "{ready}"
    );
    assert_eq!(status["nodeName"], node.as_str(), "{ready}");
    assert_eq!(status["sourcePodUID"], pod_uid.as_str(), "{ready}");
    let uid = ready["metadata"]["uid"].as_str().unwrap();
    assert_eq!(
        status["checkpointLocation"],
        json!({"type": "NodeLocal", "nodeLocal": {"path": format!("checkpoint-{uid}")}}),
        "{ready}"
    );
    assert!(status["completionTime"].is_string(), "{ready}");
    assert_eq!(status["checkpointedContainers"][0]["name"], "counter");
    assert!(
        status["checkpointedContainers"][0]["image"]
            .as_str()
            .unwrap()
            .contains("@sha256:"),
        "the image by digest: {ready}"
    );
    assert!(
        status["podTemplateRef"].is_null(),
        "no controller ran: {ready}"
    );
    // Written by the kubelet: the status's only writer is its field manager.
    let managed = cluster.kubectl([
        "get",
        "podcheckpoint",
        "e2e-kubelet-ckpt",
        "--show-managed-fields",
        "-o",
        "jsonpath={range .metadata.managedFields[*]}{.manager}/{.subresource} {end}",
    ]);
    assert_eq!(
        managed
            .split_whitespace()
            .filter(|m| m.ends_with("/status"))
            .collect::<Vec<_>>(),
        ["kubelet/status"],
        "{managed}"
    );
    let events = cluster.events("default", "e2e-kubelet-ckpt");
    for reason in ["CheckpointStarted:", "CheckpointSucceeded:"] {
        assert!(
            events.iter().any(|e| e.starts_with(reason)),
            "no {reason} in {events:#?}"
        );
    }
    let dir = cluster.checkpoint_dir(status);
    assert!(on_node(cluster, "-d", &dir), "{}", dir.display());
    assert!(on_node(cluster, "-f", &record_of(&dir)));

    // The controller, started again, records the pod's spec (the pod is the one taken).
    drop(stopped);
    wait_for(
        "the controller to record the pod's spec",
        Duration::from_secs(60),
        || {
            let now = checkpoint.get();
            if now["status"]["podTemplateRef"]["name"].is_string() {
                Ok(())
            } else {
                Err(now["status"].to_string())
            }
        },
    );
}

/// Warm start: three independent pods from one checkpoint, each with its own IP, each counting
/// on from the checkpoint.
#[test]
fn warm_start_of_three_replicas_from_one_checkpoint_lazily() {
    let cluster = Cluster::get();
    let pod = cluster.create_pod(counter_pod("e2e-warm-source"));
    pod.wait_ready();
    wait_counting(&pod, 3);
    let checkpoint = Object::create(cluster, checkpoint_of("e2e-warm-ckpt", "e2e-warm-source"));
    assert_eq!(
        checkpoint.wait_phase(&["Ready", "Failed"])["status"]["phase"],
        "Ready"
    );
    let restore = Object::create(
        cluster,
        json!({
            "apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodRestore",
            "metadata": {"name": "e2e-warm", "namespace": "default"},
            "spec": {"checkpointName": "e2e-warm-ckpt", "replicas": 3, "lazy": true}
        }),
    );
    let done = restore.wait_phase(&["Completed", "Failed"]);
    assert_eq!(done["status"]["phase"], "Completed", "{done}");
    let names: Vec<String> =
        serde_json::from_value(done["status"]["restoredPodNames"].clone()).unwrap();
    assert_eq!(names, ["e2e-warm-0", "e2e-warm-1", "e2e-warm-2"]);
    let replicas: Vec<KubePod<'_>> = names
        .iter()
        .map(|n| cluster.existing_pod("default", n))
        .collect();
    let mut ips = Vec::new();
    for replica in &replicas {
        let seen = wait_counting(replica, 2);
        assert!(seen[0] > 0, "{} started fresh: {seen:?}", replica.name);
        let got = replica.get();
        // The PodCheckpoint by name: the kubelet read it (KEP-5823's spec.restoreFrom.name).
        assert_eq!(
            got["metadata"]["annotations"]["checkpoint.k8s.io/restore-from"], "e2e-warm-ckpt",
            "{got}"
        );
        // Lazily (`lazy: true`): the kubelet's RestorePod read the pod's annotation, and the
        // shim ran the counter while its memory streamed in.
        assert_eq!(
            got["metadata"]["annotations"]["podsnap.io/lazy-restore"], "true",
            "{got}"
        );
        let container = got["status"]["containerStatuses"][0]["containerID"]
            .as_str()
            .and_then(|id| id.strip_prefix("containerd://"))
            .unwrap_or_else(|| panic!("no container id: {got}"))
            .to_owned();
        let log = cluster.node_log(&cluster.node, Component::Containerd);
        let about: Vec<&str> = log.lines().filter(|l| l.contains(&container)).collect();
        assert!(
            about
                .iter()
                .any(|l| l.contains("stream in from the lazy-pages daemon")),
            "{} was not restored lazily; containerd's log of {container}:\n{}",
            replica.name,
            about[about.len().saturating_sub(30)..].join("\n")
        );
        ips.push(got["status"]["podIP"].as_str().unwrap().to_owned());
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 3, "the replicas share IPs: {ips:?}");
    // The source was left running (leave-running checkpoint).
    let source_counts = counts(&pod.logs("counter"));
    assert!(source_counts.len() >= 3);
}

/// A pod that names a PodCheckpoint in its restore annotation (KEP-5823's `spec.restoreFrom.name`)
/// is restored by the kubelet, which reads that object: one that does not exist, or failed,
/// leaves the pod Pending with the KEP's `CheckpointNotReady`, and a pod that drifts from the
/// checkpointed one (command, image, a container's or the pod's security) with `PodSpecMismatch`
/// naming the difference (never started fresh); a Ready one kept on the pod's node restores a
/// pod with other labels, annotations and resources, counting on from the checkpoint.
#[test]
fn a_pod_that_references_a_podcheckpoint_by_name_is_restored_by_the_kubelet() {
    let cluster = Cluster::get();
    let source = cluster.create_pod(counter_pod("e2e-ref-source"));
    source.wait_ready();
    wait_counting(&source, 3);
    // Pinned to the source pod's UID; its status as KEP-5823 names it.
    let mut pinned = checkpoint_of("e2e-ref-ckpt", "e2e-ref-source");
    pinned["spec"]["sourcePodUID"] = json!(source.uid());
    let checkpoint = Object::create(cluster, pinned);
    let ready = checkpoint.wait_phase(&["Ready", "Failed"]);
    let status = &ready["status"];
    assert_eq!(status["phase"], "Ready", "{ready}");
    assert_eq!(status["sourcePodUID"], source.uid(), "{ready}");
    assert_eq!(status["conditions"][0]["type"], "Ready", "{ready}");
    assert_eq!(
        status["conditions"][0]["reason"], "CheckpointCompleted",
        "{ready}"
    );
    assert_eq!(
        status["checkpointedContainers"][0]["name"], "counter",
        "{ready}"
    );
    let image = status["checkpointedContainers"][0]["image"]
        .as_str()
        .unwrap_or_default();
    assert!(
        image.starts_with("docker.io/library/busybox@sha256:"),
        "not pinned by digest: {ready}"
    );
    let failed = Object::create(cluster, checkpoint_of("e2e-ref-failed", "e2e-ref-nobody"));
    let status = failed.wait_phase(&["Ready", "Failed"])["status"].clone();
    assert_eq!(status["phase"], "Failed", "{status}");
    assert_eq!(status["reason"], "SourcePodNotFound", "{status}");
    assert_eq!(
        status["conditions"][0]["reason"], "CheckpointFailed",
        "{status}"
    );
    // A pod of that name with another UID is not checkpointed.
    let mut replaced = checkpoint_of("e2e-ref-replaced", "e2e-ref-source");
    replaced["spec"]["sourcePodUID"] = json!("5c1d3a6e-0000-4000-8000-000000000000");
    let replaced = Object::create(cluster, replaced);
    let status = replaced.wait_phase(&["Ready", "Failed"])["status"].clone();
    assert_eq!(status["phase"], "Failed", "{status}");
    assert_eq!(
        status["conditions"][0]["reason"], "SourcePodReplaced",
        "{status}"
    );
    assert!(
        status["message"]
            .as_str()
            .is_some_and(|m| m.contains("it was replaced")),
        "{status}"
    );
    drop(replaced);
    let restored_from = |name: &str, checkpoint: &str| {
        let mut pod = counter_pod(name);
        pod["metadata"]["annotations"] = json!({ RESTORE_FROM: checkpoint });
        pod
    };
    // Pods that differ from the checkpointed one: another command, image, or security (a restore
    // runs with the checkpointed identity and privileges, so it may never differ).
    let mut drifted = restored_from("e2e-ref-drifted", "e2e-ref-ckpt");
    drifted["spec"]["containers"][0]["command"] = json!(["sh", "-c", "sleep 1000"]);
    let mut other_image = restored_from("e2e-ref-image", "e2e-ref-ckpt");
    other_image["spec"]["containers"][0]["image"] = json!("docker.io/library/busybox:1.0-other");
    let mut other_user = restored_from("e2e-ref-user", "e2e-ref-ckpt");
    other_user["spec"]["containers"][0]["securityContext"] =
        json!({"runAsUser": 65534, "runAsNonRoot": true});
    let mut other_pod_security = restored_from("e2e-ref-hostpid", "e2e-ref-ckpt");
    other_pod_security["spec"]["securityContext"] = json!({"runAsGroup": 1000});
    for (pod, reason, says) in [
        (
            restored_from("e2e-ref-missing", "e2e-ref-nothing"),
            "CheckpointNotReady",
            "PodCheckpoint default/e2e-ref-nothing not found",
        ),
        (
            restored_from("e2e-ref-unready", "e2e-ref-failed"),
            "CheckpointNotReady",
            "PodCheckpoint default/e2e-ref-failed is not Ready (phase Failed",
        ),
        (
            drifted,
            "PodSpecMismatch",
            "container \"counter\": checkpoint has command",
        ),
        (
            other_image,
            "PodSpecMismatch",
            "container \"counter\": checkpoint has image",
        ),
        (
            other_user,
            "PodSpecMismatch",
            "container \"counter\": checkpoint has securityContext {}, pod has {\"runAsUser\":65534",
        ),
        (
            other_pod_security,
            "PodSpecMismatch",
            "checkpoint has pod security {}, pod has {\"securityContext\":{\"runAsGroup\":1000}}",
        ),
    ] {
        let name = pod["metadata"]["name"].as_str().unwrap().to_owned();
        let pod = cluster.create_pod(pod);
        let events = wait_for(
            format!("{name}: a {reason} event"),
            Duration::from_secs(90),
            || {
                let events = pod.events();
                if events
                    .iter()
                    .any(|e| e.starts_with(&format!("{reason}:")) && e.contains(says))
                {
                    Ok(events)
                } else {
                    Err(format!("{events:#?}"))
                }
            },
        );
        assert!(
            !events
                .iter()
                .any(|e| e.starts_with("Started:") || e.starts_with("RestoreSucceeded:")),
            "{name} started: {events:#?}"
        );
        // The pod itself says why it waits: Restoring=False with the KEP's reason.
        let restoring = pod.wait_condition("Restoring", "False", reason);
        assert!(
            restoring["message"]
                .as_str()
                .is_some_and(|m| m.contains(says)),
            "{name}: {restoring}"
        );
        let got = pod.get();
        assert_eq!(got["status"]["phase"], "Pending", "{got}");
        assert!(
            got["status"]["containerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|c| c["state"]["running"].is_null()),
            "{got}"
        );
    }
    // What may differ (KEP-5823's allowed edits): labels, annotations, resources.
    let mut edited = restored_from("e2e-ref-restored", "e2e-ref-ckpt");
    edited["metadata"]["labels"] = json!({"app": "restored", "tier": "warm"});
    edited["metadata"]["annotations"]["example.com/note"] = json!("edited");
    edited["spec"]["containers"][0]["resources"] =
        json!({"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "256Mi"}});
    let restored = cluster.create_pod(edited);
    restored.wait_ready();
    let seen = restored.wait_counting("counter", 2);
    assert!(seen[0] > 0, "e2e-ref-restored started fresh: {seen:?}");
    let events = restored.events();
    assert!(
        events.iter().any(|e| e.starts_with("RestoreSucceeded:")),
        "{events:#?}"
    );
}

/// Deletes the workloads `(kind, name)` (and, with them, their pods) and the Role and RoleBinding
/// `grant` that the workload tests create in namespace default.
fn delete_workloads(cluster: &Cluster, workloads: &[(&str, &str)], grant: &str) {
    for (kind, name) in workloads {
        cluster.kubectl([
            "delete",
            kind,
            name,
            "-n",
            "default",
            "--ignore-not-found",
            "--cascade=foreground",
            "--wait=true",
            "--timeout=120s",
        ]);
    }
    for kind in ["rolebinding", "role"] {
        cluster.kubectl(["delete", kind, grant, "-n", "default", "--ignore-not-found"]);
    }
}

/// A counting pod `source` and its Ready PodCheckpoint `checkpoint`; with the
/// `kubernetes.io/hostname` label of the checkpoint's node, for workload templates to select it.
fn counter_checkpointed<'c>(
    cluster: &'c Cluster,
    source: &str,
    checkpoint: &str,
) -> (KubePod<'c>, Object<'c>, String) {
    let pod = cluster.create_pod(counter_pod(source));
    pod.wait_ready();
    wait_counting(&pod, 3);
    let object = Object::create(cluster, checkpoint_of(checkpoint, source));
    let ready = object.wait_phase(&["Ready", "Failed"]);
    assert_eq!(ready["status"]["phase"], "Ready", "{ready}");
    let node = ready["status"]["nodeName"].as_str().unwrap().to_owned();
    let hostname = cluster.kubectl([
        "get",
        "node",
        &node,
        "-o",
        r"jsonpath={.metadata.labels.kubernetes\.io/hostname}",
    ]);
    (pod, object, hostname.trim().to_owned())
}

/// Grants the `restore` verb on PodCheckpoint `checkpoint` (namespace default) to the
/// kube-system service accounts `controllers`, as Role and RoleBinding `grant`.
fn grant_restore(cluster: &Cluster, grant: &str, checkpoint: &str, controllers: &[&str]) {
    cluster.apply(&json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": grant, "namespace": "default"},
        "rules": [{"apiGroups": ["checkpoint.k8s.io"], "resources": ["podcheckpoints"],
                   "verbs": ["restore"], "resourceNames": [checkpoint]}]
    }));
    let subjects: Vec<Value> = controllers
        .iter()
        .map(|c| json!({"kind": "ServiceAccount", "name": c, "namespace": "kube-system"}))
        .collect();
    cluster.apply(&json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": grant, "namespace": "default"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": grant},
        "subjects": subjects
    }));
}

/// KEP-5823's P2 tier: a Deployment whose pod template references a PodCheckpoint warm-starts
/// every replica from it. Its ReplicaSet controller creates the pods, so that controller is the
/// one asked for `restore` on the checkpoint (podsnap-restore-pods): without a grant no replica
/// is created and the ReplicaSet says why; with one (a Role naming that checkpoint, bound to the
/// replicaset-controller's service account) three replicas are restored by their kubelet, and
/// again after a scale to zero and back.
#[test]
fn a_deployment_whose_template_references_a_checkpoint_warm_starts_every_replica() {
    let cluster = Cluster::get();
    let (deployment, grant) = ("e2e-deploy", "e2e-deploy-restore");
    let clean = || delete_workloads(cluster, &[("deployment", deployment)], grant);
    clean();
    // The checkpointed pod's containers, on the checkpoint's node (by its hostname label).
    let (_source, _checkpoint, hostname) =
        counter_checkpointed(cluster, "e2e-deploy-source", "e2e-deploy-ckpt");
    let mut template = json!({"spec": counter_pod("unused")["spec"].clone()});
    template["metadata"] = json!({
        "labels": {"app": deployment},
        "annotations": {RESTORE_FROM: "e2e-deploy-ckpt"}
    });
    template["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": hostname});
    cluster.apply(&json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": deployment, "namespace": "default"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": deployment}},
            "template": template
        }
    }));
    let replicas = || -> Vec<Value> {
        let out = cluster.kubectl([
            "get",
            "pods",
            "-n",
            "default",
            "-l",
            &format!("app={deployment}"),
            "-o",
            "json",
        ]);
        let list: Value = serde_json::from_str(&out).unwrap();
        list["items"].as_array().cloned().unwrap_or_default()
    };
    // No grant: the ReplicaSet controller may not restore that checkpoint.
    wait_for(
        "the ReplicaSet to say it may not restore",
        Duration::from_secs(90),
        || {
            let out = cluster.kubectl([
                "get",
                "events",
                "-n",
                "default",
                "--field-selector",
                "reason=FailedCreate",
                "-o",
                "json",
            ]);
            let list: Value = serde_json::from_str(&out).unwrap();
            let said = list["items"].as_array().into_iter().flatten().any(|e| {
                e["involvedObject"]["kind"] == "ReplicaSet"
                    && e["message"].as_str().is_some_and(|m| {
                        m.contains("podsnap-restore-pods")
                            && m.contains(
                                "system:serviceaccount:kube-system:replicaset-controller may not \
                                 restore PodCheckpoint e2e-deploy-ckpt",
                            )
                    })
            });
            if said { Ok(()) } else { Err(out) }
        },
    );
    assert!(replicas().is_empty(), "{:#?}", replicas());

    // The namespace's owner lets the ReplicaSet controller restore this checkpoint, and only it.
    grant_restore(
        cluster,
        grant,
        "e2e-deploy-ckpt",
        &["replicaset-controller"],
    );
    let restored_replicas = |round: &str| {
        wait_for(
            format!("{round}: three replicas running"),
            Duration::from_secs(180),
            || {
                // An update of the ReplicaSet makes its controller try again now, not after
                // its failure backoff.
                cluster.kubectl([
                    "annotate",
                    "replicasets",
                    "-n",
                    "default",
                    "-l",
                    &format!("app={deployment}"),
                    &format!("e2e.podsnap.io/poke={round}"),
                    "--overwrite",
                ]);
                let pods = replicas();
                let running = pods
                    .iter()
                    .filter(|p| p["status"]["phase"] == "Running" && is_ready(p))
                    .count();
                if pods.len() == 3 && running == 3 {
                    Ok(pods)
                } else {
                    Err(format!("{} pods, {running} running", pods.len()))
                }
            },
        );
        for pod in replicas() {
            let name = pod["metadata"]["name"].as_str().unwrap();
            let seen = counts(&cluster.kubectl(["logs", "-n", "default", name]));
            let seen = if seen.len() >= 2 {
                seen
            } else {
                std::thread::sleep(Duration::from_secs(3));
                counts(&cluster.kubectl(["logs", "-n", "default", name]))
            };
            assert!(
                seen.first().is_some_and(|&n| n > 0),
                "{round}: replica {name} started fresh: {seen:?}"
            );
            let events = cluster.events("default", name);
            assert!(
                events.iter().any(|e| e.starts_with("RestoreSucceeded:")),
                "{round}: {name}: {events:#?}"
            );
        }
    };
    restored_replicas("first");
    cluster.kubectl(["scale", "deployment", deployment, "--replicas=0"]);
    wait_for("no replicas", Duration::from_secs(120), || {
        let left = replicas().len();
        if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} left"))
        }
    });
    cluster.kubectl(["scale", "deployment", deployment, "--replicas=3"]);
    restored_replicas("after scaling to 0 and back");
    // A rolling restart (a new ReplicaSet, its template annotated restartedAt): every new
    // replica is restored from the checkpoint too, none started fresh.
    let before: std::collections::BTreeSet<String> = replicas()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    cluster.kubectl(["rollout", "restart", "deployment", deployment]);
    cluster.kubectl([
        "rollout",
        "status",
        "deployment",
        deployment,
        "--timeout=300s",
    ]);
    restored_replicas("after a rolling restart");
    let after: std::collections::BTreeSet<String> = replicas()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        before.is_disjoint(&after),
        "the rolling restart kept replicas: {before:?} then {after:?}"
    );
    clean();
}

/// The P2 tier for the other workload kinds: a Job's and a StatefulSet's pods, created by their
/// controllers from templates that reference a PodCheckpoint, are restored from it once the
/// namespace grants those controllers `restore` on it; so is the pod of the Job's retry (its
/// first pod deleted, the Job controller replaces it within its backoffLimit).
#[test]
fn a_job_and_a_statefulset_whose_templates_reference_a_checkpoint_restore_their_pods() {
    let cluster = Cluster::get();
    let grant = "e2e-workloads-restore";
    let clean = || {
        delete_workloads(
            cluster,
            &[("job", "e2e-job"), ("statefulset", "e2e-sts")],
            grant,
        )
    };
    clean();
    let (_source, _checkpoint, hostname) =
        counter_checkpointed(cluster, "e2e-workloads-source", "e2e-workloads-ckpt");
    grant_restore(
        cluster,
        grant,
        "e2e-workloads-ckpt",
        &["job-controller", "statefulset-controller"],
    );
    let template = |app: &str, restart_policy: &str| {
        let mut spec = counter_pod("unused")["spec"].clone();
        spec["restartPolicy"] = json!(restart_policy);
        spec["nodeSelector"] = json!({"kubernetes.io/hostname": hostname});
        json!({
            "metadata": {"labels": {"app": app},
                         "annotations": {RESTORE_FROM: "e2e-workloads-ckpt"}},
            "spec": spec
        })
    };
    cluster.apply(&json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "e2e-job", "namespace": "default"},
        "spec": {"backoffLimit": 1, "template": template("e2e-job", "Never")}
    }));
    cluster.apply(&json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "e2e-sts", "namespace": "default"},
        "spec": {
            "replicas": 1, "serviceName": "e2e-sts",
            "selector": {"matchLabels": {"app": "e2e-sts"}},
            "template": template("e2e-sts", "Always")
        }
    }));
    // The one pod of `app`, restored: running, counting on from the checkpoint, with the event.
    let restored_pod = |app: &str| -> String {
        let pod = wait_for(
            format!("the {app} pod running"),
            Duration::from_secs(180),
            || {
                let out = cluster.kubectl([
                    "get",
                    "pods",
                    "-n",
                    "default",
                    "-l",
                    &format!("app={app}"),
                    "-o",
                    "json",
                ]);
                let list: Value = serde_json::from_str(&out).unwrap();
                match list["items"].as_array().map(Vec::as_slice) {
                    Some([pod]) if pod["status"]["phase"] == "Running" && is_ready(pod) => {
                        Ok(pod["metadata"]["name"].as_str().unwrap().to_owned())
                    }
                    _ => Err(out),
                }
            },
        );
        // (Its controller owns it: deleting the workload deletes it.)
        let seen = wait_for(format!("{pod} counting"), Duration::from_secs(30), || {
            let seen = counts(&cluster.kubectl(["logs", "-n", "default", &pod]));
            if seen.len() >= 2 {
                Ok(seen)
            } else {
                Err(format!("{seen:?}"))
            }
        });
        assert!(seen[0] > 0, "the {app} pod {pod} started fresh: {seen:?}");
        let events = cluster.events("default", &pod);
        assert!(
            events.iter().any(|e| e.starts_with("RestoreSucceeded:")),
            "{pod}: {events:#?}"
        );
        pod
    };
    let first = restored_pod("e2e-job");
    restored_pod("e2e-sts");
    // A Job retry: its pod deleted, the Job controller creates another, restored as well.
    cluster.kubectl([
        "delete",
        "pod",
        "-n",
        "default",
        &first,
        "--wait=true",
        "--timeout=90s",
    ]);
    let retry = restored_pod("e2e-job");
    assert_ne!(retry, first, "the Job did not retry");
    clean();
}

/// Namespace migration (the talk's P1 tier): a PodCheckpoint whose `spec.restoreNamespaces`
/// lists a namespace is restored there by a pod naming it `<namespace>/<name>`; in a namespace it
/// does not list the pod stays Pending (`CheckpointNamespaceNotAllowed`); restoring takes
/// `restore` on the checkpoint in its own namespace, not in the pod's.
#[test]
fn a_checkpoint_is_restored_in_another_namespace_only_where_it_allows() {
    let cluster = Cluster::get();
    let (allowed_ns, other_ns) = ("e2e-nsmig-b", "e2e-nsmig-c");
    let clean = || {
        for namespace in [allowed_ns, other_ns] {
            cluster.kubectl([
                "delete",
                "namespace",
                namespace,
                "--ignore-not-found",
                "--wait=true",
                "--timeout=120s",
            ]);
        }
    };
    clean();
    for namespace in [allowed_ns, other_ns] {
        cluster.apply(
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        );
    }
    let source = cluster.create_pod(counter_pod("e2e-nsmig-source"));
    source.wait_ready();
    wait_counting(&source, 3);
    let mut manifest = checkpoint_of("e2e-nsmig-ckpt", "e2e-nsmig-source");
    manifest["spec"]["restoreNamespaces"] = json!([allowed_ns]);
    let checkpoint = Object::create(cluster, manifest);
    let ready = checkpoint.wait_phase(&["Ready", "Failed"]);
    assert_eq!(ready["status"]["phase"], "Ready", "{ready}");
    let changed = cluster
        .kubectl_try([
            "patch",
            "podcheckpoint",
            "e2e-nsmig-ckpt",
            "--type=merge",
            "-p",
            r#"{"spec":{"restoreNamespaces":["e2e-nsmig-b","e2e-nsmig-c"]}}"#,
        ])
        .unwrap();
    assert!(
        !changed.success() && changed.stderr.contains("restoreNamespaces is immutable"),
        "{}",
        changed.report()
    );
    let restored_in = |namespace: &str, name: &str| {
        let mut pod = counter_pod(name);
        pod["metadata"]["namespace"] = json!(namespace);
        pod["metadata"]["annotations"] = json!({ RESTORE_FROM: "default/e2e-nsmig-ckpt" });
        pod
    };
    // A user who may restore and create pods in the target namespace, but not restore the
    // checkpoint where it is, is refused.
    cluster.apply(&json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "e2e-erin", "namespace": allowed_ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "e2e-erin"}]
    }));
    cluster.apply(&json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "e2e-erin-restorer", "namespace": allowed_ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "podsnap-restorer"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "e2e-erin"}]
    }));
    let refused = wait_for(
        "e2e-erin's bindings to take effect",
        Duration::from_secs(30),
        || {
            let done = cluster
                .kubectl_command(["create", "--dry-run=server", "--as=e2e-erin", "-f", "-"])
                .input(restored_in(allowed_ns, "e2e-nsmig-erin").to_string())
                .run()
                .unwrap();
            if done.stderr.contains("ValidatingAdmissionPolicy") || done.success() {
                Ok(done)
            } else {
                Err(done.report())
            }
        },
    );
    assert!(
        !refused.success()
            && refused.stderr.contains(
                "e2e-erin may not restore PodCheckpoint e2e-nsmig-ckpt in namespace default"
            ),
        "{}",
        refused.report()
    );

    // Where it is allowed: restored, counting on.
    let moved = cluster.create_pod(restored_in(allowed_ns, "e2e-nsmig-moved"));
    moved.wait_ready();
    let seen = moved.wait_counting("counter", 2);
    assert!(seen[0] > 0, "restored in {allowed_ns} fresh: {seen:?}");
    // Where it is not: Pending, with the reason.
    let refused = cluster.create_pod(restored_in(other_ns, "e2e-nsmig-refused"));
    let events = wait_for(
        "a CheckpointNamespaceNotAllowed event",
        Duration::from_secs(90),
        || {
            let events = refused.events();
            if events.iter().any(|e| {
                e.starts_with("CheckpointNamespaceNotAllowed:")
                    && e.contains(&format!("may not be restored in namespace \"{other_ns}\""))
            }) {
                Ok(events)
            } else {
                Err(format!("{events:#?}"))
            }
        },
    );
    assert!(
        !events.iter().any(|e| e.starts_with("Started:")),
        "{events:#?}"
    );
    assert_eq!(refused.get()["status"]["phase"], "Pending");
    drop((moved, refused));

    // A PodRestore does the same with spec.checkpointNamespace: its pod goes in its namespace,
    // naming the checkpoint <namespace>/<name>.
    let pod_restore = |namespace: &str, name: &str| {
        json!({"apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodRestore",
               "metadata": {"name": name, "namespace": namespace},
               "spec": {"checkpointName": "e2e-nsmig-ckpt", "checkpointNamespace": "default"}})
    };
    let ended = |namespace: &str, name: &str| {
        wait_for(
            format!("PodRestore {namespace}/{name} to end"),
            Duration::from_secs(180),
            || {
                let object: Value = serde_json::from_str(&cluster.kubectl([
                    "-n",
                    namespace,
                    "get",
                    "podrestore",
                    name,
                    "-o",
                    "json",
                ]))
                .unwrap();
                match object["status"]["phase"].as_str() {
                    Some("Completed" | "Failed") => Ok(object),
                    _ => Err(object["status"].to_string()),
                }
            },
        )
    };
    // e2e-erin may restore in allowed_ns, not the checkpoint in default: refused at admission.
    let denied = cluster
        .kubectl_command(["create", "--dry-run=server", "--as=e2e-erin", "-f", "-"])
        .input(pod_restore(allowed_ns, "e2e-nsmig-erin").to_string())
        .run()
        .unwrap();
    assert!(
        !denied.success()
            && denied.stderr.contains(
                "e2e-erin may not restore PodCheckpoint e2e-nsmig-ckpt in namespace default"
            ),
        "{}",
        denied.report()
    );
    cluster.apply(&pod_restore(allowed_ns, "e2e-nsmig-restore"));
    let done = ended(allowed_ns, "e2e-nsmig-restore");
    assert_eq!(done["status"]["phase"], "Completed", "{done}");
    let by_restore = cluster.existing_pod(allowed_ns, "e2e-nsmig-restore");
    let seen = by_restore.wait_counting("counter", 2);
    assert!(
        seen[0] > 0,
        "restored by a PodRestore in {allowed_ns} fresh: {seen:?}"
    );
    assert_eq!(
        by_restore.get()["metadata"]["annotations"][RESTORE_FROM],
        "default/e2e-nsmig-ckpt"
    );
    cluster.apply(&pod_restore(other_ns, "e2e-nsmig-restore"));
    let failed = ended(other_ns, "e2e-nsmig-restore");
    assert_eq!(
        failed["status"]["reason"], "CheckpointNamespaceNotAllowed",
        "{failed}"
    );
    drop(by_restore);
    clean();
}

/// Invalid specs are refused at admission (CRD validation, CEL); objects that cannot succeed end
/// Failed with a reason.
#[test]
fn invalid_specs_are_refused_and_impossible_ones_fail_with_a_reason() {
    let cluster = Cluster::get();
    let refused = |manifest: Value, message: &str| {
        let f = cluster
            .kubectl_command(["apply", "-f", "-"])
            .input(manifest.to_string())
            .run()
            .unwrap();
        assert!(!f.success(), "accepted: {manifest}");
        assert!(
            f.stderr.contains(message),
            "want {message:?}: {}",
            f.report()
        );
    };
    refused(
        json!({"apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodRestore",
               "metadata": {"name": "e2e-bad", "namespace": "default"},
               "spec": {"checkpointName": "x", "replicas": 2, "podTemplate": {"metadata": {"name": "fixed"}}}}),
        "podTemplate.metadata.name can only be set with one replica",
    );
    refused(
        json!({"apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodRestore",
               "metadata": {"name": "e2e-bad", "namespace": "default"},
               "spec": {"checkpointName": "x", "replicas": 0}}),
        "should be greater than or equal to 1",
    );
    refused(
        json!({"apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodCheckpoint",
               "metadata": {"name": "e2e-bad", "namespace": "default"},
               "spec": {"sourcePodName": "p", "deletionPolicy": "Shred"}}),
        "Unsupported value",
    );
    // Immutable source pod.
    let checkpoint = Object::create(cluster, checkpoint_of("e2e-immutable", "nothere"));
    let f = cluster
        .kubectl_try([
            "patch",
            "podcheckpoint",
            "e2e-immutable",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"sourcePodName":"other"}}"#,
        ])
        .unwrap();
    assert!(
        !f.success() && f.stderr.contains("sourcePodName is immutable"),
        "{}",
        f.report()
    );
    drop(checkpoint);

    // A pod on another runtime class.
    cluster.apply(&json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "runc"}, "handler": "runc"}));
    let mut runc = counter_pod("e2e-ctl-runc");
    runc["spec"]["runtimeClassName"] = json!("runc");
    let runc = cluster.create_pod(runc);
    runc.wait_ready();
    let checkpoint = Object::create(cluster, checkpoint_of("e2e-runc-ckpt", "e2e-ctl-runc"));
    let failed = checkpoint.wait_phase(&["Failed", "Ready"]);
    // Refused by the controller, or, had the kubelet taken it first, by podsnapd.
    let message = failed["status"]["message"].as_str().unwrap_or_default();
    assert!(
        failed["status"]["reason"] == "NotPodsnapPod"
            || (failed["status"]["reason"] == "CheckpointFailed"
                && message.contains("only \"podsnap\" pods can be checkpointed")),
        "{failed}"
    );

    // A restore of a checkpoint that does not exist.
    let restore = Object::create(
        cluster,
        json!({"apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodRestore",
               "metadata": {"name": "e2e-orphan", "namespace": "default"},
               "spec": {"checkpointName": "nothere"}}),
    );
    let failed = restore.wait_phase(&["Failed", "Completed"]);
    assert_eq!(failed["status"]["reason"], "CheckpointNotFound", "{failed}");
}

/// Who may checkpoint and who may restore are separate: a user bound only to the checkpointer
/// role may create PodCheckpoints but not PodRestores.
#[test]
fn a_user_with_only_the_checkpoint_role_cannot_restore() {
    let cluster = Cluster::get();
    cluster.apply(&json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "e2e-alice-checkpointer", "namespace": "default"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "podsnap-checkpointer"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "e2e-alice"}]
    }));
    let try_create = |manifest: Value| {
        cluster
            .kubectl_command(["create", "--dry-run=server", "--as=e2e-alice", "-f", "-"])
            .input(manifest.to_string())
            .run()
            .unwrap()
    };
    let checkpoint = try_create(checkpoint_of("e2e-alice-ckpt", "anything"));
    assert!(checkpoint.success(), "{}", checkpoint.report());
    let restore = try_create(json!({
        "apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodRestore",
        "metadata": {"name": "e2e-alice-restore", "namespace": "default"},
        "spec": {"checkpointName": "e2e-alice-ckpt"}
    }));
    assert!(!restore.success(), "{}", restore.report());
    assert!(
        restore.stderr.contains("forbidden") && restore.stderr.contains("podrestores"),
        "{}",
        restore.report()
    );
    cluster.kubectl([
        "delete",
        "rolebinding",
        "e2e-alice-checkpointer",
        "-n",
        "default",
    ]);
}

/// Restoring is the `restore` verb on a PodCheckpoint (KEP-5823's PodRestoreAuthorization: the
/// policies podsnap-restore and podsnap-restore-pods of deploy/rbac.yaml), asked of whoever
/// creates a PodRestore naming it or a pod with the kubelet's restore annotation; a Role can
/// narrow it to some checkpoints; a user who may only create pods restores nothing; an existing
/// pod cannot gain the annotation by an update, a status update or a binding.
#[test]
fn restoring_takes_the_restore_verb_on_that_checkpoint() {
    let cluster = Cluster::get();
    let user = "e2e-carol";
    let mine = "e2e-carol-mine";
    let other = "e2e-carol-other";
    let pod_name = "e2e-carol-pod";
    let clean = || {
        for (kind, name) in [
            ("rolebinding", user),
            ("rolebinding", "e2e-carol-restorer"),
            ("rolebinding", "e2e-dave-restorer"),
            ("role", user),
            ("pod", pod_name),
        ] {
            cluster.kubectl(["delete", kind, name, "-n", "default", "--ignore-not-found"]);
        }
    };
    clean();
    cluster.apply(&json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": user, "namespace": "default"},
        "rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["create"]},
            {"apiGroups": ["checkpoint.k8s.io"], "resources": ["podrestores"], "verbs": ["create"]},
            {"apiGroups": ["checkpoint.k8s.io"], "resources": ["podcheckpoints"],
             "verbs": ["restore"], "resourceNames": [mine]}
        ]
    }));
    let binding = |name: &str, kind: &str, role: &str| {
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": "default"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
        })
    };
    cluster.apply(&binding(user, "Role", user));
    let create_as = |as_user: bool, manifest: &Value| {
        let mut args = vec!["create", "--dry-run=server", "-o", "name", "-f", "-"];
        if as_user {
            args.push("--as=e2e-carol");
        }
        cluster
            .kubectl_command(args)
            .input(manifest.to_string())
            .run()
            .unwrap()
    };
    let restore_of = |checkpoint: &str| {
        json!({
            "apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodRestore",
            "metadata": {"name": "e2e-carol-restore", "namespace": "default"},
            "spec": {"checkpointName": checkpoint}
        })
    };
    let pod_from = |checkpoint: Option<&str>| {
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": "default"},
            "spec": {
                "schedulingGates": [{"name": "podsnap.io/e2e-never"}],
                "containers": [{"name": "c", "image": "docker.io/library/busybox:1.37.0"}]
            }
        });
        if let Some(checkpoint) = checkpoint {
            pod["metadata"]["annotations"] = json!({"checkpoint.k8s.io/restore-from": checkpoint});
        }
        pod
    };
    // What she may do is allowed (RBAC may take a moment to see a new binding).
    let allowed = |what: &str, manifest: Value| {
        wait_for(what, Duration::from_secs(20), || {
            let done = create_as(true, &manifest);
            if done.success() {
                Ok(())
            } else {
                Err(done.report())
            }
        })
    };
    let refused_by = |what: &str, done: &podsnap_e2e::Finished, policy: &str, text: &str| {
        assert!(!done.success(), "{what} was allowed: {}", done.report());
        assert!(
            done.stderr
                .contains(&format!("ValidatingAdmissionPolicy '{policy}'"))
                && done.stderr.contains(text),
            "{what}: {}",
            done.report()
        );
    };
    let refused = |what: &str, manifest: Value| {
        let policy = match manifest["kind"].as_str() {
            Some("Pod") => "podsnap-restore-pods",
            _ => "podsnap-restore",
        };
        refused_by(
            what,
            &create_as(true, &manifest),
            policy,
            "e2e-carol may not restore PodCheckpoint",
        );
    };
    allowed(
        "a PodRestore of the checkpoint she may restore",
        restore_of(mine),
    );
    allowed("a pod of her own", pod_from(None));
    refused("a PodRestore of another checkpoint", restore_of(other));
    // A pod naming a PodCheckpoint (the kubelet reads that object) takes `restore` on it.
    allowed(
        "a pod restored from the PodCheckpoint she may restore",
        pod_from(Some(mine)),
    );
    refused(
        "a pod restored from another PodCheckpoint",
        pod_from(Some(other)),
    );
    // A pod naming a checkpoint directory takes `restore` on all of the namespace's
    // PodCheckpoints, which a grant for some does not give.
    let directory = "checkpoint-counter_default-2026-12-03T10:00:00Z";
    refused(
        "a pod restored from a checkpoint directory",
        pod_from(Some(directory)),
    );
    cluster.apply(&binding(
        "e2e-carol-restorer",
        "ClusterRole",
        "podsnap-restorer",
    ));
    allowed(
        "a pod restored from a checkpoint directory, as a podsnap-restorer",
        pod_from(Some(directory)),
    );
    allowed(
        "a PodRestore of another checkpoint, as a podsnap-restorer",
        restore_of(other),
    );

    // An existing pod cannot gain the annotation, even from a cluster admin: not by an update,
    // a status update, nor the annotations of a binding.
    cluster.apply(&pod_from(None));
    let annotation = format!(
        r#"{{"metadata":{{"annotations":{{"checkpoint.k8s.io/restore-from":"{directory}"}}}}}}"#
    );
    let patch = |extra: &[&str]| {
        cluster
            .kubectl_command([
                "patch",
                "--dry-run=server",
                "pod",
                pod_name,
                "-n",
                "default",
                "--type=merge",
                "-p",
                &annotation,
            ])
            .args(extra)
            .run()
            .unwrap()
    };
    let update = patch(&[]);
    let status_update = patch(&["--subresource=status"]);
    let bind = cluster
        .kubectl_command(["create", "--dry-run=server", "-f", "-"])
        .input(
            json!({
                "apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": pod_name, "namespace": "default",
                             "annotations": {"checkpoint.k8s.io/restore-from": directory}},
                "target": {"apiVersion": "v1", "kind": "Node", "name": cluster.node}
            })
            .to_string(),
        )
        .run()
        .unwrap();
    let changed = "cannot be added to, changed on or removed from an existing pod";
    refused_by(
        "an update adding the annotation",
        &update,
        "podsnap-restore-pods",
        changed,
    );
    refused_by(
        "a status update adding the annotation",
        &status_update,
        "podsnap-restore-pods",
        changed,
    );
    refused_by(
        "a binding carrying the annotation",
        &bind,
        "podsnap-restore-pods",
        "a binding cannot carry",
    );
    // A PodRestore's pods are created by the controller: only for someone who may create pods
    // there. A podsnap-restorer who may not is refused.
    cluster.apply(&json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "e2e-dave-restorer", "namespace": "default"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "podsnap-restorer"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "e2e-dave"}]
    }));
    let daves = wait_for(
        "the podsnap-restorer binding of e2e-dave",
        Duration::from_secs(20),
        || {
            let done = cluster
                .kubectl_command([
                    "create",
                    "--dry-run=server",
                    "--as=e2e-dave",
                    "-o",
                    "name",
                    "-f",
                    "-",
                ])
                .input(restore_of(mine).to_string())
                .run()
                .unwrap();
            if done.stderr.contains("ValidatingAdmissionPolicy") || done.success() {
                Ok(done)
            } else {
                Err(done.report())
            }
        },
    );
    refused_by(
        "a PodRestore by a restorer who may not create pods",
        &daves,
        "podsnap-restore",
        "e2e-dave may not create pods in namespace default, which a PodRestore creates",
    );
    // The cluster admin restores what they like.
    let mut admins = pod_from(Some(directory));
    admins["metadata"]["name"] = json!("e2e-carol-admins");
    let admin = create_as(false, &admins);
    assert!(admin.success(), "{}", admin.report());
    clean();
}

/// The `podsnap` CLI (also `kubectl podsnap`): checkpoint, list, inspect, restore and delete
/// through the API server, with progress, and a clear failure.
#[test]
fn cli_checkpoints_lists_inspects_restores_and_deletes() {
    let cluster = Cluster::get();
    let podsnap = |args: &[&str]| cluster.podsnap(args);
    let pod = cluster.create_pod(counter_pod("e2e-cli"));
    pod.wait_ready();
    let seen = wait_counting(&pod, 3);

    let made = podsnap(&["checkpoint", "e2e-cli", "--name", "e2e-cli-ckpt"]);
    let _checkpoint = ObjectName {
        cluster,
        kind: "podcheckpoint",
        name: "e2e-cli-ckpt",
    };
    assert!(made.success(), "{}", made.report());
    assert!(
        made.stderr
            .contains("PodCheckpoint default/e2e-cli-ckpt: Ready"),
        "{}",
        made.report()
    );
    assert!(
        made.stdout
            .starts_with(&format!("e2e-cli-ckpt\t{}\tcheckpoint-", cluster.node)),
        "{}",
        made.report()
    );

    let listed = podsnap(&["list"]);
    assert!(listed.success(), "{}", listed.report());
    assert!(
        listed.stdout.lines().any(|l| l.starts_with(&format!(
            "e2e-cli-ckpt\te2e-cli\tReady\t{}\tcounter\t",
            cluster.node
        ))),
        "{}",
        listed.report()
    );
    let shown = podsnap(&["inspect", "e2e-cli-ckpt"]);
    assert!(shown.success(), "{}", shown.report());
    // The checkpoint's data (its manifest: CRIU, kernel, each container's files) is read where
    // it is: on this machine for the single-node cluster; a kind node's is not, and inspect says
    // where it is instead, while the test reads the manifest on that node.
    let data_here = !cluster.kind;
    let mut needles = vec!["Phase:          Ready", "Containers:"];
    if data_here {
        needles.extend([
            "CRIU:           4.",
            "Kernel:",
            "  counter\timage docker.io/library/busybox:1.37.0\t",
        ]);
    } else {
        needles.push("the checkpoint's data is on node ");
        let ready: Value = serde_json::from_str(&cluster.kubectl([
            "get",
            "podcheckpoint",
            "e2e-cli-ckpt",
            "-o",
            "json",
        ]))
        .unwrap();
        let location = cluster
            .checkpoint_dir(&ready["status"])
            .join("podsnap-manifest.json");
        let manifest: Value = serde_json::from_str(
            &cluster
                .node_read(&cluster.node, &location)
                .unwrap_or_else(|| panic!("{} on {}", location.display(), cluster.node)),
        )
        .unwrap();
        assert!(
            manifest["criu_version"]
                .as_str()
                .is_some_and(|v| v.starts_with("4.")),
            "{manifest}"
        );
    }
    for needle in needles {
        assert!(
            shown.stdout.contains(needle),
            "no {needle:?} in:\n{}",
            shown.stdout
        );
    }
    drop(pod);

    let restored = podsnap(&[
        "restore",
        "e2e-cli-ckpt",
        "--pod-name",
        "e2e-cli",
        "--name",
        "e2e-cli-restore",
    ]);
    let _restore = ObjectName {
        cluster,
        kind: "podrestore",
        name: "e2e-cli-restore",
    };
    let resumed = cluster.existing_pod("default", "e2e-cli");
    assert!(restored.success(), "{}", restored.report());
    assert_eq!(restored.stdout.trim(), "e2e-cli");
    let counted = wait_counting(&resumed, 2);
    assert!(
        counted[0] > seen[0],
        "the restored pod started over: {counted:?}"
    );

    // Failures: a clear message and a non-zero exit.
    let missing = podsnap(&["checkpoint", "nothere", "--name", "e2e-cli-missing"]);
    let _missing = ObjectName {
        cluster,
        kind: "podcheckpoint",
        name: "e2e-cli-missing",
    };
    assert!(!missing.success());
    assert!(
        missing.stderr.contains("PodCheckpoint default/e2e-cli-missing failed: SourcePodNotFound: pod default/nothere does not exist"),
        "{}",
        missing.report()
    );
    let usage = podsnap(&[
        "restore",
        "e2e-cli-ckpt",
        "--pod-name",
        "x",
        "--replicas",
        "2",
    ]);
    assert!(
        !usage.success() && usage.stderr.contains("cannot go with --replicas"),
        "{}",
        usage.report()
    );

    let deleted = podsnap(&["delete", "e2e-cli-ckpt"]);
    assert!(deleted.success(), "{}", deleted.report());
    wait_gone(cluster, "e2e-cli-ckpt", Duration::from_secs(30));
}

/// Deletes a checkpoint.k8s.io object by name when dropped.
struct ObjectName<'c> {
    cluster: &'c Cluster,
    kind: &'static str,
    name: &'static str,
}

impl Drop for ObjectName<'_> {
    fn drop(&mut self) {
        let _ = self.cluster.kubectl_try([
            "delete",
            self.kind,
            self.name,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=60s",
        ]);
    }
}

/// A checkpoint in use by a restore is not deleted under it (finalizer `checkpoint.k8s.io/in-use`),
/// and once deleted, deletion policy Delete removes its node-local data (podsnapd's node agent and
/// finalizer `checkpoint.k8s.io/node-data`).
#[test]
fn a_checkpoint_in_use_waits_for_its_restore_and_delete_policy_removes_its_data() {
    let cluster = Cluster::get();
    let pod = cluster.create_pod(counter_pod("e2e-lifecycle"));
    pod.wait_ready();
    let mut manifest = checkpoint_of("e2e-lifecycle-ckpt", "e2e-lifecycle");
    manifest["spec"]["deletionPolicy"] = json!("Delete");
    let checkpoint = Object::create(cluster, manifest);
    let ready = checkpoint.wait_phase(&["Ready", "Failed"]);
    assert_eq!(ready["status"]["phase"], "Ready", "{ready}");
    let location = cluster.checkpoint_dir(&ready["status"]);
    let record = record_of(&location);
    assert!(on_node(cluster, "-d", &location) && on_node(cluster, "-f", &record));
    wait_for("the node-data finalizer", Duration::from_secs(30), || {
        let f = checkpoint.get()["metadata"]["finalizers"].clone();
        if f.to_string().contains("checkpoint.k8s.io/node-data") {
            Ok(())
        } else {
            Err(f.to_string())
        }
    });
    drop(pod);

    // A node agent may only remove node-data, and only from checkpoints on its own node (the
    // podsnap-node-agent admission policy; RBAC alone would let it patch any PodCheckpoint).
    let as_agent = |node: &str, patch: Value| {
        cluster
            .kubectl_try([
                "patch",
                "podcheckpoint",
                "e2e-lifecycle-ckpt",
                "--type=merge",
                "--dry-run=server",
                "-p",
                &patch.to_string(),
                &format!("--as=podsnap:node-agent:{node}"),
                "--as-group=podsnap:node-agents",
            ])
            .unwrap()
    };
    let release = json!({"metadata": {"finalizers": []}});
    for (node, patch, refusal) in [
        (
            "other-node",
            release.clone(),
            "only PodCheckpoints on its own node",
        ),
        (
            cluster.node.as_str(),
            json!({"spec": {"timeoutSeconds": 5}}),
            "may not change a PodCheckpoint's spec",
        ),
        (
            cluster.node.as_str(),
            json!({"metadata": {"finalizers": ["checkpoint.k8s.io/node-data", "example.com/keep"]}}),
            "may only remove the checkpoint.k8s.io/node-data finalizer",
        ),
    ] {
        let refused = as_agent(node, patch);
        assert!(
            !refused.success() && refused.stderr.contains(refusal),
            "{}",
            refused.report()
        );
    }
    let allowed = as_agent(&cluster.node, release);
    assert!(allowed.success(), "{}", allowed.report());

    // Make the kubelet's restore fail (a modified image): the restore stays in progress, its pod
    // never starts, and the checkpoint is in use meanwhile.
    let record_text = cluster.node_read(&cluster.node, &record).unwrap();
    cluster.tamper_with(&cluster.node, &location);
    let restore = Object::create(
        cluster,
        json!({"apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodRestore",
               "metadata": {"name": "e2e-lifecycle-restore", "namespace": "default"},
               "spec": {"checkpointName": "e2e-lifecycle-ckpt"}}),
    );
    let _restored_pod = cluster.existing_pod("default", "e2e-lifecycle-restore");
    restore.wait_phase(&["Restoring"]);
    wait_for("the in-use finalizer", Duration::from_secs(30), || {
        let f = checkpoint.get()["metadata"]["finalizers"].clone();
        if f.to_string().contains("checkpoint.k8s.io/in-use") {
            Ok(())
        } else {
            Err(f.to_string())
        }
    });

    // Deleting the checkpoint now only marks it: the restore still needs it, its data stays.
    cluster.kubectl([
        "delete",
        "podcheckpoint",
        "e2e-lifecycle-ckpt",
        "--wait=false",
    ]);
    std::thread::sleep(Duration::from_secs(4));
    let held = checkpoint.get();
    assert!(!held["metadata"]["deletionTimestamp"].is_null(), "{held}");
    assert!(
        on_node(cluster, "-d", &location),
        "the data went while a restore used it"
    );
    assert!(on_node(cluster, "-f", &record), "{record_text}");

    // The restore goes: the checkpoint is released, deleted, and its data removed on the node.
    drop(restore);
    wait_gone(cluster, "e2e-lifecycle-ckpt", Duration::from_secs(60));
    wait_for(
        "the checkpoint's data to be removed",
        Duration::from_secs(30),
        || {
            if on_node(cluster, "-e", &location) || on_node(cluster, "-e", &record) {
                Err(format!("{} still there", location.display()))
            } else {
                Ok(())
            }
        },
    );
    std::mem::forget(checkpoint);
}

/// Retention: the test cluster's controller keeps the last 3 Ready checkpoints per pod
/// (`--keep-last 3`, PODSNAP_KEEP_LAST); a fourth prunes the oldest.
#[test]
fn retention_keeps_the_last_three_checkpoints_of_a_pod() {
    let cluster = Cluster::get();
    let pod = cluster.create_pod(counter_pod("e2e-retained"));
    pod.wait_ready();
    let mut objects = Vec::new();
    for i in 0..4 {
        let object = Object::create(
            cluster,
            checkpoint_of(&format!("e2e-retained-{i}"), "e2e-retained"),
        );
        let ready = object.wait_phase(&["Ready", "Failed"]);
        assert_eq!(ready["status"]["phase"], "Ready", "{ready}");
        // Completion times have second resolution: keep them apart.
        std::thread::sleep(Duration::from_millis(1100));
        objects.push(object);
    }
    // The oldest is pruned.
    wait_gone(cluster, "e2e-retained-0", Duration::from_secs(30));
    for i in 1..4 {
        let name = format!("e2e-retained-{i}");
        let f = cluster
            .kubectl_try(["get", "podcheckpoint", &name])
            .unwrap();
        assert!(f.success(), "{name} was pruned too: {}", f.report());
    }
    let events: Vec<String> = (1..4)
        .flat_map(|i| cluster.events("default", &format!("e2e-retained-{i}")))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("Pruned:") && e.contains("e2e-retained-0")),
        "{events:#?}"
    );
}

/// A checkpoint the kubelet recorded for a PodCheckpoint that then failed (the kubelet's status
/// write lost, and the object failed as abandoned) is removed by podsnapd's node agent; a
/// checkpoint recorded for no object is left alone. The window itself cannot be hit on purpose:
/// the test takes the checkpoint through the kubelet API with the object's UID, as the kubelet
/// records it, and gives the failed object the node it would have had.
#[test]
fn a_checkpoint_recorded_for_a_failed_object_is_removed_on_its_node() {
    let cluster = Cluster::get();
    let pod = cluster.create_pod(counter_pod("e2e-orphan"));
    pod.wait_ready();
    let object = Object::create(cluster, checkpoint_of("e2e-orphan-ckpt", "e2e-orphan-gone"));
    let failed = object.wait_phase(&["Failed", "Ready"]);
    assert_eq!(failed["status"]["reason"], "SourcePodNotFound", "{failed}");
    let uid = failed["metadata"]["uid"].as_str().unwrap().to_owned();

    let orphan = cluster.checkpoint_pod(
        "default",
        "e2e-orphan",
        &format!("?podCheckpointUID={uid}"),
        None,
    );
    assert!(orphan.finished.success(), "{}", orphan.finished.report());
    let orphan = orphan.location.unwrap();
    // Checkpoint directories are named to the second.
    std::thread::sleep(Duration::from_millis(1100));
    let kept = cluster.checkpoint_pod("default", "e2e-orphan", "", None);
    assert!(kept.finished.success(), "{}", kept.finished.report());
    let kept = kept.location.unwrap();
    let recorded: Value = serde_json::from_str(
        &cluster
            .node_read(&cluster.node, &record_of(&orphan))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(recorded["podCheckpointUID"], uid.as_str(), "{recorded}");

    // The failed object on this node, as the controller leaves it when it failed mid-checkpoint.
    cluster.kubectl([
        "patch",
        "podcheckpoint",
        "e2e-orphan-ckpt",
        "--subresource=status",
        "--type=merge",
        "-p",
        &json!({"status": {"nodeName": cluster.node}}).to_string(),
    ]);
    wait_for(
        "the node agent to remove the orphan",
        Duration::from_secs(30),
        || {
            if on_node(cluster, "-e", &orphan) || on_node(cluster, "-e", &record_of(&orphan)) {
                Err(format!("{} still there", orphan.display()))
            } else {
                Ok(())
            }
        },
    );
    assert!(
        on_node(cluster, "-d", &kept) && on_node(cluster, "-f", &record_of(&kept)),
        "a checkpoint of no object went"
    );
    cluster.node_remove(&cluster.node, &kept);
    cluster.node_remove(&cluster.node, &record_of(&kept));
}

/// A counter pod with `mib` MiB of random data in an emptyDir volume: its checkpoint takes
/// seconds (the volume is archived), so it can be caught in progress.
fn slow_counter_pod(name: &str, mib: u64) -> Value {
    let mut manifest = counter_pod(name);
    manifest["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
    let container = &mut manifest["spec"]["containers"][0];
    container["volumeMounts"] = json!([{"name": "data", "mountPath": "/data"}]);
    container["command"] = json!([
        "sh",
        "-c",
        format!(
            "head -c {} /dev/urandom > /data/blob && {COUNTER_SCRIPT}",
            mib << 20
        )
    ]);
    manifest
}

/// A PodCheckpoint of `pod` with deletion policy Delete: its data goes with it.
fn removed_with_its_data(name: &str, pod: &str) -> Value {
    let mut manifest = checkpoint_of(name, pod);
    manifest["spec"]["deletionPolicy"] = json!("Delete");
    manifest
}

/// Whether the object's finalizers include `finalizer`.
fn has_finalizer(object: &Value, finalizer: &str) -> bool {
    object["metadata"]["finalizers"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|f| f == finalizer)
}

/// Deletion policy Delete holds from the start: a PodCheckpoint deleted while the kubelet is
/// still checkpointing carries the node-data finalizer already, is gone only once the checkpoint
/// has ended, and leaves no data on the node. The pod is not left frozen.
#[test]
fn a_checkpoint_deleted_mid_checkpoint_under_delete_policy_leaves_no_data() {
    let cluster = Cluster::get();
    let pod = cluster.create_pod(slow_counter_pod("e2e-delete-mid", 512));
    pod.wait_ready();
    wait_counting(&pod, 2);
    let before = checkpoint_entries(cluster);

    let checkpoint = Object::create(
        cluster,
        removed_with_its_data("e2e-delete-mid-ckpt", "e2e-delete-mid"),
    );
    let seen = checkpoint.wait_phase(&["Checkpointing", "Ready", "Failed"]);
    assert_eq!(
        seen["status"]["phase"], "Checkpointing",
        "the checkpoint ended before it could be deleted mid-way: {seen}"
    );
    assert!(
        has_finalizer(&seen, "checkpoint.k8s.io/node-data"),
        "no node-data finalizer while checkpointing: {seen}"
    );
    cluster.kubectl([
        "delete",
        "podcheckpoint",
        "e2e-delete-mid-ckpt",
        "--wait=false",
    ]);
    wait_gone(cluster, "e2e-delete-mid-ckpt", Duration::from_secs(180));
    wait_for(
        "the pod checkpoint directory to hold what it held before",
        Duration::from_secs(60),
        || {
            let now = checkpoint_entries(cluster);
            if now == before {
                Ok(())
            } else {
                Err(format!("{now:?}, want {before:?}"))
            }
        },
    );
    let last = *counts(&pod.logs("counter")).last().unwrap();
    wait_for("the pod to count on", Duration::from_secs(30), || {
        let now = *counts(&pod.logs("counter")).last().unwrap();
        if now >= last + 2 {
            Ok(())
        } else {
            Err(format!("count {now}, was {last}"))
        }
    });
}

/// A Delete-policy PodCheckpoint that failed before it reached a node (its finalizer went on
/// first) is deleted at once: the controller releases the finalizer, there is no data anywhere.
#[test]
fn a_delete_policy_checkpoint_that_never_reached_a_node_is_deleted_at_once() {
    let cluster = Cluster::get();
    let checkpoint = Object::create(
        cluster,
        removed_with_its_data("e2e-delete-nowhere", "e2e-delete-nowhere-pod"),
    );
    let failed = checkpoint.wait_phase(&["Failed", "Ready"]);
    assert_eq!(failed["status"]["reason"], "SourcePodNotFound", "{failed}");
    cluster.kubectl([
        "delete",
        "podcheckpoint",
        "e2e-delete-nowhere",
        "--wait=false",
    ]);
    wait_gone(cluster, "e2e-delete-nowhere", Duration::from_secs(30));
}

/// A PodRestore whose pod name is taken by a pod it did not create fails (PodAlreadyExists, with
/// an event naming the pod) instead of reporting that pod as restored; the pod is left alone.
#[test]
fn a_restore_onto_a_pod_it_did_not_create_fails_with_pod_already_exists() {
    let cluster = Cluster::get();
    let source = cluster.create_pod(counter_pod("e2e-taken-source"));
    source.wait_ready();
    wait_counting(&source, 2);
    let checkpoint = Object::create(
        cluster,
        removed_with_its_data("e2e-taken-ckpt", "e2e-taken-source"),
    );
    let ready = checkpoint.wait_phase(&["Ready", "Failed"]);
    assert_eq!(ready["status"]["phase"], "Ready", "{ready}");

    let squatter = cluster.create_pod(counter_pod("e2e-taken"));
    squatter.wait_ready();
    let uid = squatter.uid();
    let restore = Object::create(
        cluster,
        json!({
            "apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodRestore",
            "metadata": {"name": "e2e-taken-restore", "namespace": "default"},
            "spec": {"checkpointName": "e2e-taken-ckpt",
                     "podTemplate": {"metadata": {"name": "e2e-taken"}}}
        }),
    );
    let failed = restore.wait_phase(&["Failed", "Completed"]);
    assert_eq!(failed["status"]["phase"], "Failed", "{failed}");
    assert_eq!(failed["status"]["reason"], "PodAlreadyExists", "{failed}");
    assert!(
        failed["status"]["message"]
            .as_str()
            .unwrap()
            .contains("pod default/e2e-taken already exists"),
        "{failed}"
    );
    let events = cluster.events("default", "e2e-taken-restore");
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("PodAlreadyExists:") && e.contains("default/e2e-taken")),
        "{events:#?}"
    );
    // The pod is the one that was there, not restored and not annotated.
    let now = squatter.get();
    assert_eq!(now["metadata"]["uid"], uid.as_str(), "{now}");
    assert!(
        now["metadata"]["annotations"]["checkpoint.k8s.io/restore-from"].is_null(),
        "{now}"
    );
    assert!(now["metadata"]["ownerReferences"].is_null(), "{now}");
}

/// A controller restarted mid-restore takes up the pod its restore created (its owner reference)
/// as its own: the restore stays in progress, with the same pod, not failed as a name clash.
#[test]
fn a_restarted_controller_takes_up_the_pod_its_restore_created() {
    let cluster = Cluster::get();
    let source = cluster.create_pod(counter_pod("e2e-own-source"));
    source.wait_ready();
    let checkpoint = Object::create(
        cluster,
        removed_with_its_data("e2e-own-ckpt", "e2e-own-source"),
    );
    let ready = checkpoint.wait_phase(&["Ready", "Failed"]);
    assert_eq!(ready["status"]["phase"], "Ready", "{ready}");
    // The kubelet cannot restore a modified checkpoint: the restore stays in progress.
    cluster.tamper_with(&cluster.node, &cluster.checkpoint_dir(&ready["status"]));
    let restore = Object::create(
        cluster,
        json!({"apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodRestore",
               "metadata": {"name": "e2e-own-restore", "namespace": "default"},
               "spec": {"checkpointName": "e2e-own-ckpt"}}),
    );
    let restored = cluster.existing_pod("default", "e2e-own-restore");
    restore.wait_phase(&["Restoring"]);
    let uid = wait_for("the restored pod", Duration::from_secs(30), || {
        let pod = restored.get();
        match pod["metadata"]["uid"].as_str() {
            Some(uid) => Ok(uid.to_owned()),
            None => Err(pod.to_string()),
        }
    });
    assert_eq!(
        restored.get()["metadata"]["ownerReferences"][0]["uid"],
        restore.get()["metadata"]["uid"]
    );

    cluster.kill_controller();
    cluster.start_controller();
    // Several reconciles (every 2 s while in progress) by the new controller.
    std::thread::sleep(Duration::from_secs(8));
    let after = restore.get();
    assert_eq!(after["status"]["phase"], "Restoring", "{after}");
    assert_eq!(restored.uid(), uid);
}

/// The node agents cannot read pod specs: a PodCheckpoint holds none (the checkpointed pod's
/// spec is in a PodTemplate owned by it, removed with it), and the agents' role reaches no
/// podtemplates, pods or secrets. They list their own node's checkpoints by field selector.
#[test]
fn node_agents_cannot_read_checkpointed_pod_specs() {
    let cluster = Cluster::get();
    let pod = cluster.create_pod(counter_pod("e2e-agent-read"));
    pod.wait_ready();
    let checkpoint = Object::create(
        cluster,
        removed_with_its_data("e2e-agent-read-ckpt", "e2e-agent-read"),
    );
    let ready = checkpoint.wait_phase(&["Ready", "Failed"]);
    assert_eq!(ready["status"]["phase"], "Ready", "{ready}");
    let as_agent = |args: &[&str]| {
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.push(format!("--as=podsnap:node-agent:{}", cluster.node));
        args.push("--as-group=podsnap:node-agents".to_owned());
        cluster.kubectl_try(args).unwrap()
    };

    let read = as_agent(&["get", "podcheckpoint", "e2e-agent-read-ckpt", "-o", "json"]);
    assert!(read.success(), "{}", read.report());
    // The pod's command (COUNTER_SCRIPT, whose quotes JSON escapes) is nowhere in it.
    assert!(
        !read.stdout.contains("while true; do echo"),
        "a node agent reads the pod's spec: {}",
        read.stdout
    );
    let object: Value = serde_json::from_str(&read.stdout).unwrap();
    assert!(
        object["status"]["checkpointedPodSpec"].is_null(),
        "{object}"
    );
    let listed = as_agent(&[
        "get",
        "podcheckpoints",
        "-A",
        "--field-selector",
        &format!("status.nodeName={}", cluster.node),
        "-o",
        "name",
    ]);
    assert!(
        listed.success() && listed.stdout.contains("e2e-agent-read-ckpt"),
        "{}",
        listed.report()
    );
    for resource in ["podtemplates", "pods", "secrets"] {
        let refused = as_agent(&["get", resource, "-A"]);
        assert!(
            !refused.success() && refused.stderr.contains("forbidden"),
            "{resource}: {}",
            refused.report()
        );
    }
    // Secrets: by name in podsnap's namespace only (the controller's copies of registry
    // credentials), never listed, never in a user's namespace.
    for args in [
        &["-n", "default", "get", "secret", "any"][..],
        &["-n", "podsnap-system", "get", "secrets"][..],
    ] {
        let refused = as_agent(args);
        assert!(
            !refused.success() && refused.stderr.contains("forbidden"),
            "{args:?}: {}",
            refused.report()
        );
    }

    // Where the spec is: a PodTemplate the PodCheckpoint owns and names.
    let reference = &ready["status"]["podTemplateRef"];
    let name = reference["name"].as_str().expect("podTemplateRef.name");
    let template: Value =
        serde_json::from_str(&cluster.kubectl(["get", "podtemplate", name, "-o", "json"])).unwrap();
    assert_eq!(
        template["metadata"]["ownerReferences"][0]["uid"],
        ready["metadata"]["uid"]
    );
    assert_eq!(template["metadata"]["uid"], reference["uid"]);
    assert!(
        template.to_string().contains("while true; do echo"),
        "{template}"
    );
    drop(checkpoint);
    wait_for(
        "the PodTemplate to be removed with its PodCheckpoint",
        Duration::from_secs(60),
        || {
            let f = cluster.kubectl_try(["get", "podtemplate", name])?;
            if f.success() {
                Err(format!("{name} is still there"))
            } else {
                Ok(())
            }
        },
    );
}

/// podsnapd runs one checkpoint of a pod at a time: a second one while the first runs is refused
/// at once (FailedPrecondition, which the kubelet answers 409 Conflict) and leaves nothing; once
/// the first is done the pod can be checkpointed again. The kubelet's checkpoints carry a
/// deadline without `?timeout` too (podsnapd refuses a CheckpointPod without one).
#[test]
fn a_second_checkpoint_of_a_pod_being_checkpointed_is_refused_at_once() {
    let cluster = Cluster::get();
    // 3 GiB in an emptyDir: its capture outlasts the 1.1 s below (1 GiB no longer did, once
    // checkpoints were hashed with BLAKE3).
    let pod = cluster.create_pod(slow_counter_pod("e2e-twice", 3072));
    pod.wait_ready();
    wait_counting(&pod, 2);
    let before = checkpoint_entries(cluster);

    let (first, second, first_ended_at, second_started_at) = std::thread::scope(|scope| {
        let first = scope.spawn(|| {
            let answer = cluster.checkpoint_pod("default", "e2e-twice", "?timeout=300", None);
            (answer, std::time::Instant::now())
        });
        // Checkpoint directories are named to the second: the second call gets its own.
        std::thread::sleep(Duration::from_millis(1100));
        let second_started_at = std::time::Instant::now();
        let second = cluster.checkpoint_pod("default", "e2e-twice", "?timeout=300", None);
        let (first, first_ended_at) = first.join().unwrap();
        (first, second, first_ended_at, second_started_at)
    });
    assert!(
        first_ended_at > second_started_at,
        "the first checkpoint ended before the second began: {}",
        first.finished.report()
    );
    assert!(first.finished.success(), "{}", first.finished.report());
    assert!(!second.finished.success(), "{}", second.finished.report());
    assert!(
        second.finished.stderr.contains("Conflict")
            && second.finished.stderr.contains("already in progress"),
        "{}",
        second.finished.report()
    );
    let first = first.location.unwrap();
    let mut expected = before.clone();
    for entry in [&first, &record_of(&first)] {
        expected.insert(entry.file_name().unwrap().to_string_lossy().into_owned());
    }
    assert_eq!(checkpoint_entries(cluster), expected);

    // Released: again, and without `?timeout` (the kubelet's CRI client sets a deadline).
    std::thread::sleep(Duration::from_millis(1100));
    let again = cluster.checkpoint_pod("default", "e2e-twice", "", None);
    assert!(again.finished.success(), "{}", again.finished.report());
    for dir in [first, again.location.unwrap()] {
        cluster.node_remove(&cluster.node, &dir);
        cluster.node_remove(&cluster.node, &record_of(&dir));
    }
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

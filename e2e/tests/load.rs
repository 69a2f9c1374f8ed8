//! Load on the cluster ([`Cluster::get`]: the single node, or kind's first worker): ten
//! counter pods checkpointed at once (ten PodCheckpoint objects applied in one request), then
//! ten pods restored at once from one of those checkpoints (one PodRestore with `replicas: 10`).
//!
//! Every PodCheckpoint ends Ready (its data on the node) or Failed with a reason; every restored
//! pod runs, counting on from the checkpoint, or carries the kubelet's reason for not running;
//! no pod is left stuck (the sources count on) and no cgroup of the cluster is left frozen. How
//! long each took, and the totals, are printed (`--nocapture`), never asserted. Everything the
//! test makes carries the label [`LABEL`] and is deleted by it, checkpoint data included
//! (deletion policy Delete).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use podsnap_e2e::cluster::{Cluster, READY_TIMEOUT, counter_pod, counts};
use podsnap_e2e::wait_for;
use serde_json::{Value, json};

/// How many pods are checkpointed at once, and restored at once.
const N: usize = 10;

/// The label of every object and pod this test makes (value: `source`, `checkpoint`,
/// `restore`, `replica`).
const LABEL: &str = "podsnap-e2e/load";

/// How long the ten checkpoints, or the ten restores, may take in all (liveness only).
const ALL_DONE: Duration = Duration::from_secs(600);

/// Deletes everything labelled [`LABEL`] — PodRestores, then pods, then PodCheckpoints (whose
/// node data goes with them) — when dropped, and before the test (an earlier run's leftovers).
struct Labelled<'c> {
    cluster: &'c Cluster,
}

impl<'c> Labelled<'c> {
    fn new(cluster: &'c Cluster) -> Self {
        let this = Labelled { cluster };
        if let Err(e) = this.delete_all() {
            panic!("removing an earlier run's objects: {e}");
        }
        this
    }

    fn delete_all(&self) -> Result<(), String> {
        for kind in ["podrestores", "pods", "podcheckpoints"] {
            let out = self.cluster.kubectl_try([
                "delete",
                kind,
                "-n",
                "default",
                "-l",
                LABEL,
                "--ignore-not-found",
                "--wait=true",
                "--timeout=180s",
            ])?;
            if !out.success() {
                return Err(out.report());
            }
        }
        Ok(())
    }
}

impl Drop for Labelled<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.delete_all() {
            eprintln!("warning: cleaning up after the load test: {e}");
        }
    }
}

/// `kubectl get <kind> -l LABEL=<value> -o json`'s items, by name.
fn labelled(cluster: &Cluster, kind: &str, value: &str) -> BTreeMap<String, Value> {
    let out = cluster.kubectl([
        "get",
        kind,
        "-n",
        "default",
        "-l",
        &format!("{LABEL}={value}"),
        "-o",
        "json",
    ]);
    let list: Value = serde_json::from_str(&out).expect("kubectl get -o json");
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|item| {
            (
                item["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                item.clone(),
            )
        })
        .collect()
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// The reasons the kubelet gave for pods it could not restore: `FailedRestore` events, by pod.
fn failed_restores(cluster: &Cluster) -> BTreeMap<String, String> {
    let out = cluster.kubectl([
        "get",
        "events",
        "-n",
        "default",
        "--field-selector",
        "reason=FailedRestore",
        "-o",
        "json",
    ]);
    let list: Value = serde_json::from_str(&out).expect("kubectl get events -o json");
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["involvedObject"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                e["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// No cgroup of the cluster's pods on the suite's node is left frozen.
fn assert_nothing_frozen(cluster: &Cluster, when: &str) {
    wait_for(
        format!("no frozen cgroup {when}"),
        Duration::from_secs(60),
        || {
            let frozen = cluster.frozen_cgroups(&cluster.node);
            if frozen.is_empty() {
                Ok(())
            } else {
                Err(frozen.join("; "))
            }
        },
    );
}

/// The last `count: N` of each pod's counter.
fn last_counts(cluster: &Cluster, pods: &[String]) -> BTreeMap<String, u64> {
    pods.iter()
        .map(|pod| {
            let log = cluster
                .kubectl_try(["-n", "default", "logs", pod, "-c", "counter"])
                .map(|f| f.stdout)
                .unwrap_or_default();
            (pod.clone(), counts(&log).last().copied().unwrap_or(0))
        })
        .collect()
}

/// Waits until every pod of `pods` has counted at least twice past `since` (0 for any).
fn wait_counting_on(cluster: &Cluster, pods: &[String], since: &BTreeMap<String, u64>) {
    wait_for(
        format!("{} pods to count on", pods.len()),
        Duration::from_secs(60),
        || {
            let now = last_counts(cluster, pods);
            let behind: Vec<String> = now
                .iter()
                .filter(|(pod, n)| **n < since.get(*pod).copied().unwrap_or(0) + 2)
                .map(|(pod, n)| format!("{pod} at {n}"))
                .collect();
            if behind.is_empty() {
                Ok(())
            } else {
                Err(behind.join(", "))
            }
        },
    );
}

/// Prints one line per entry and the totals of a batch started at once.
fn print_times(what: &str, times: &BTreeMap<String, (Duration, String)>, wall: Duration) {
    for (name, (took, outcome)) in times {
        eprintln!(
            "load: {what} {name}: {outcome} after {:.2}s",
            took.as_secs_f64()
        );
    }
    let mut sorted: Vec<Duration> = times.values().map(|(d, _)| *d).collect();
    sorted.sort();
    if let (Some(first), Some(last)) = (sorted.first(), sorted.last()) {
        let sum: Duration = sorted.iter().sum();
        eprintln!(
            "load: {} {what}s: all done after {:.2}s; each {:.2}s min, {:.2}s median, {:.2}s max, {:.2}s mean",
            sorted.len(),
            wall.as_secs_f64(),
            first.as_secs_f64(),
            sorted[sorted.len() / 2].as_secs_f64(),
            last.as_secs_f64(),
            sum.as_secs_f64() / sorted.len() as f64
        );
    }
}

#[test]
fn ten_pods_checkpointed_at_once_then_ten_restored_at_once_from_one_checkpoint() {
    let cluster = Cluster::get();
    let objects = Labelled::new(cluster);

    // Ten counters.
    let sources: Vec<String> = (0..N).map(|i| format!("e2e-load-{i}")).collect();
    let items: Vec<Value> = sources
        .iter()
        .map(|name| {
            let mut pod = counter_pod(name);
            pod["metadata"]["labels"][LABEL] = json!("source");
            pod
        })
        .collect();
    cluster.apply(&json!({"apiVersion": "v1", "kind": "List", "items": items}));
    wait_for("the source pods to be Ready", READY_TIMEOUT, || {
        let pods = labelled(cluster, "pods", "source");
        let ready = pods.values().filter(|p| is_ready(p)).count();
        if ready == N {
            Ok(())
        } else {
            Err(format!("{ready} of {N} Ready"))
        }
    });
    wait_counting_on(cluster, &sources, &BTreeMap::new());

    // Ten PodCheckpoints in one request.
    let checkpoints: Vec<Value> = sources
        .iter()
        .map(|pod| {
            json!({
                "apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodCheckpoint",
                "metadata": {"name": format!("{pod}-ckpt"), "namespace": "default",
                             "labels": {LABEL: "checkpoint"}},
                "spec": {"sourcePodName": pod, "timeoutSeconds": 120, "deletionPolicy": "Delete"}
            })
        })
        .collect();
    let started = Instant::now();
    cluster.apply(&json!({"apiVersion": "v1", "kind": "List", "items": checkpoints}));
    let mut ended: BTreeMap<String, (Duration, String)> = BTreeMap::new();
    let mut last: BTreeMap<String, Value> = BTreeMap::new();
    wait_for("every PodCheckpoint to end", ALL_DONE, || {
        last = labelled(cluster, "podcheckpoints", "checkpoint");
        for (name, object) in &last {
            let phase = object["status"]["phase"].as_str().unwrap_or_default();
            if matches!(phase, "Ready" | "Failed") && !ended.contains_key(name) {
                let outcome = match phase {
                    "Ready" => "Ready".to_owned(),
                    _ => format!(
                        "Failed ({}: {})",
                        object["status"]["reason"].as_str().unwrap_or_default(),
                        object["status"]["message"].as_str().unwrap_or_default()
                    ),
                };
                ended.insert(name.clone(), (started.elapsed(), outcome));
            }
        }
        if ended.len() == N {
            Ok(())
        } else {
            let pending: Vec<String> = last
                .iter()
                .filter(|(n, _)| !ended.contains_key(*n))
                .map(|(n, o)| format!("{n} {}", o["status"]))
                .collect();
            Err(format!(
                "{} of {N} ended; {}",
                ended.len(),
                pending.join("; ")
            ))
        }
    });
    print_times("checkpoint", &ended, started.elapsed());
    let mut locations: Vec<PathBuf> = Vec::new();
    for (name, object) in &last {
        let status = &object["status"];
        match status["phase"].as_str() {
            Some("Ready") => {
                let location = cluster.checkpoint_dir(status);
                assert!(
                    cluster.node_test(&cluster.node, "-d", &location),
                    "{name}: {}",
                    location.display()
                );
                locations.push(location);
            }
            _ => {
                // Failed, with a reason and a message.
                for field in ["reason", "message"] {
                    assert!(
                        status[field].as_str().is_some_and(|s| !s.is_empty()),
                        "{name} failed without a {field}: {object}"
                    );
                }
            }
        }
    }
    eprintln!("load: {} of {N} checkpoints Ready", locations.len());
    assert!(!locations.is_empty(), "no checkpoint succeeded: {ended:?}");
    // Not stuck: no cgroup frozen, every source counts on.
    assert_nothing_frozen(cluster, "after the checkpoints");
    wait_counting_on(cluster, &sources, &last_counts(cluster, &sources));

    // Ten pods from one checkpoint, in one PodRestore.
    let from = last
        .iter()
        .find(|(_, o)| o["status"]["phase"] == "Ready")
        .map(|(n, _)| n.clone())
        .unwrap();
    let restore = "e2e-load-restore";
    let started = Instant::now();
    cluster.apply(&json!({
        "apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodRestore",
        "metadata": {"name": restore, "namespace": "default", "labels": {LABEL: "restore"}},
        "spec": {"checkpointName": from, "replicas": N,
                 "podTemplate": {"metadata": {"labels": {LABEL: "replica"}}}}
    }));
    let replicas: Vec<String> = (0..N).map(|i| format!("{restore}-{i}")).collect();
    let mut ended: BTreeMap<String, (Duration, String)> = BTreeMap::new();
    wait_for("every restored pod to run or fail", ALL_DONE, || {
        let pods = labelled(cluster, "pods", "replica");
        let failed = if pods.len() == N && pods.values().all(is_ready) {
            BTreeMap::new()
        } else {
            failed_restores(cluster)
        };
        for name in &replicas {
            if ended.contains_key(name) {
                continue;
            }
            let pod = pods.get(name);
            if pod.is_some_and(is_ready) {
                ended.insert(name.clone(), (started.elapsed(), "Ready".to_owned()));
            } else if pod.is_some_and(|p| p["status"]["phase"] == "Failed") {
                ended.insert(
                    name.clone(),
                    (
                        started.elapsed(),
                        format!("Failed ({})", pod.unwrap()["status"]),
                    ),
                );
            } else if let Some(why) = failed.get(name) {
                ended.insert(
                    name.clone(),
                    (started.elapsed(), format!("FailedRestore ({why})")),
                );
            }
        }
        if ended.len() == N {
            Ok(())
        } else {
            Err(format!(
                "{} of {N} ended; pods {:?}",
                ended.len(),
                pods.iter()
                    .map(|(n, p)| format!("{n} {}", p["status"]["phase"]))
                    .collect::<Vec<_>>()
            ))
        }
    });
    let restored: Vec<String> = ended
        .iter()
        .filter(|(_, (_, outcome))| outcome == "Ready")
        .map(|(n, _)| n.clone())
        .collect();
    print_times("restored pod", &ended, started.elapsed());
    eprintln!("load: {} of {N} restored pods Ready", restored.len());
    let get_restore = || -> Value {
        let out = cluster.kubectl(["get", "podrestore", restore, "-n", "default", "-o", "json"]);
        serde_json::from_str(&out).unwrap()
    };
    if restored.len() == N {
        // All run: the PodRestore completes.
        let done = wait_for(
            "the PodRestore to complete",
            Duration::from_secs(60),
            || {
                let object = get_restore();
                match object["status"]["phase"].as_str() {
                    Some("Completed" | "Failed") => Ok(object),
                    _ => Err(object["status"].to_string()),
                }
            },
        );
        eprintln!(
            "load: PodRestore {restore} {} after {:.2}s",
            done["status"]["phase"],
            started.elapsed().as_secs_f64()
        );
        assert_eq!(done["status"]["phase"], "Completed", "{done}");
    } else {
        eprintln!("load: PodRestore {restore}: {}", get_restore()["status"]);
    }
    // The restored pods count on from the checkpoint (not from 0: restored, not started fresh).
    wait_counting_on(cluster, &restored, &BTreeMap::new());
    for pod in &restored {
        let log = cluster.kubectl(["-n", "default", "logs", pod, "-c", "counter"]);
        let seen = counts(&log);
        assert!(seen[0] > 0, "{pod} started fresh: {seen:?}");
    }
    assert_nothing_frozen(cluster, "after the restores");

    // Everything goes, the checkpoints' node data with them.
    objects
        .delete_all()
        .unwrap_or_else(|e| panic!("cleaning up: {e}"));
    wait_for(
        "the checkpoints' data to be removed",
        Duration::from_secs(120),
        || {
            let left: Vec<String> = locations
                .iter()
                .filter(|l| cluster.node_test(&cluster.node, "-e", l))
                .map(|l| l.display().to_string())
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(left.join(", "))
            }
        },
    );
}

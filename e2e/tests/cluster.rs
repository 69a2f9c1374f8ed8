//! End-to-end tests on the cluster (hack/cluster-up.sh's single node, or kind's first worker
//! with `PODSNAP_E2E_CLUSTER=kind`, see [`Cluster::get`]): the patched kubelet checkpoints a pod through `POST /checkpointpod/{namespace}/{pod}` (reached through the
//! API server's node proxy, as a user would) and restores a pod annotated
//! `checkpoint.k8s.io/restore-from` through CRI RestorePod on podsnapd.
//!
//! Run them one at a time (`--test-threads=1`): they share the node.

use std::path::Path;
use std::time::Duration;

use podsnap_e2e::cluster::{
    self, COUNTER_IMAGE, Cluster, Component, KubePod, Object, RESTORE_FROM, checkpoint_of, counts,
};
use podsnap_e2e::{CommandLine, Finished, wait_for};
use serde_json::{Value, json};

/// The seed talk's counting pod; `restore_from` makes it a restore.
fn counter_pod(name: &str, restore_from: Option<&str>) -> Value {
    let mut pod = cluster::counter_pod(name);
    if let Some(checkpoint) = restore_from {
        pod["metadata"]["annotations"] = json!({ RESTORE_FROM: checkpoint });
    }
    pod
}

/// Waits until the pod's counter has logged at least `n` lines; returns the highest count.
fn wait_counting(pod: &KubePod<'_>, container: &str, n: usize) -> u64 {
    *pod.wait_counting(container, n).last().unwrap()
}

fn last_count(pod: &KubePod<'_>, container: &str) -> u64 {
    counts(&pod.logs(container)).last().copied().unwrap_or(0)
}

/// Checkpoints a running pod and returns its checkpoint directory, with the counter's range
/// around the checkpoint.
fn checkpoint(
    cluster: &Cluster,
    pod: &KubePod<'_>,
    container: &str,
) -> (std::path::PathBuf, u64, u64) {
    let before = last_count(pod, container);
    let answer = cluster.checkpoint_pod(&pod.namespace, &pod.name, "?timeout=120", None);
    assert!(answer.finished.success(), "{}", answer.finished.report());
    let location = answer.location.expect("the answer names the checkpoint");
    let after = last_count(pod, container);
    (location, before, after)
}

/// Checkpoints the counting `pod`, removes it, and creates the pod `manifest` makes for that
/// checkpoint; returns it once it is Ready and counting on from where the checkpoint left off.
fn suspend_and_resume<'c>(
    cluster: &'c Cluster,
    pod: KubePod<'c>,
    manifest: impl Fn(&str) -> Value,
) -> KubePod<'c> {
    let (location, before, _) = checkpoint(cluster, &pod, "counter");
    let name = location.file_name().unwrap().to_str().unwrap().to_owned();
    drop(pod);
    let resumed = cluster.create_pod(manifest(&name));
    resumed.wait_ready();
    wait_counting(&resumed, "counter", 2);
    let first = counts(&resumed.logs("counter"))[0];
    assert!(first > before, "counted from {first}, not on from {before}");
    resumed
}

/// Waits for an event whose text contains `needle` and returns all events.
fn wait_event(pod: &KubePod<'_>, needle: &str) -> Vec<String> {
    wait_for(
        format!("an event on {} saying {needle:?}", pod.name),
        Duration::from_secs(90),
        || {
            let events = pod.events();
            if events.iter().any(|e| e.contains(needle)) {
                Ok(events)
            } else {
                Err(format!("{events:#?}"))
            }
        },
    )
}

/// The pod never ran a container: no container status says it is or was running. (A restore
/// refused at StartContainer leaves a `StartError` termination of a container that never
/// started: that is no run.)
fn assert_never_started(pod: &KubePod<'_>) {
    let status = pod.get()["status"].clone();
    let never_started = |terminated: &Value| {
        terminated.is_null()
            || (terminated["reason"] == "StartError"
                && terminated["startedAt"]
                    .as_str()
                    .is_none_or(|at| at.starts_with("1970-01-01T00:00:00")))
    };
    for c in status["containerStatuses"].as_array().into_iter().flatten() {
        assert!(
            c["state"]["running"].is_null()
                && never_started(&c["state"]["terminated"])
                && c["lastState"]["running"].is_null()
                && never_started(&c["lastState"]["terminated"])
                && c["started"] != true,
            "a container of {} ran although its restore failed: {c}",
            pod.name
        );
    }
    // (Not the phase: the kubelet calls a pod whose container will be started again after a
    // `StartError` Running, though nothing of it ever ran.)
}

#[test]
fn seed_demo_counter_counts_on_after_restore() {
    let cluster = Cluster::get();
    let pod = cluster.create_pod(counter_pod("e2e-counter", None));
    pod.wait_ready();
    wait_counting(&pod, "counter", 4);
    let (location, before, after) = checkpoint(cluster, &pod, "counter");

    // The checkpoint is root's alone: a directory 0700, the kubelet's record 0600.
    let mode = cluster.node_mode(&cluster.node, &location);
    assert_eq!(mode, 0o700, "{}", location.display());
    let record = format!("{}.kubelet.json", location.display());
    let mode = cluster.node_mode(&cluster.node, Path::new(&record));
    assert_eq!(mode, 0o600, "{record}");
    assert_eq!(
        location.parent().unwrap(),
        cluster.kubelet_root.join("pod-checkpoints")
    );
    let name = location.file_name().unwrap().to_str().unwrap().to_owned();
    assert!(
        name.starts_with("checkpoint-e2e-counter_default-"),
        "{name}"
    );

    // Leave-running: the source keeps counting after its checkpoint.
    wait_for("the source to count on", Duration::from_secs(30), || {
        let now = last_count(&pod, "counter");
        if now > after {
            Ok(())
        } else {
            Err(format!("still at {now}"))
        }
    });
    // KEP-5823's event and condition on the checkpointed pod: CheckpointingPod, and
    // Checkpointing, False once done, naming the checkpoint.
    let checkpointing = pod.wait_condition("Checkpointing", "False", "CheckpointCompleted");
    assert!(
        checkpointing["message"]
            .as_str()
            .is_some_and(|m| m.contains(&name)),
        "{checkpointing}"
    );
    let events = pod.events();
    assert!(
        events.iter().any(|e| e.starts_with("CheckpointingPod:")),
        "{events:#?}"
    );
    let old_uid = pod.uid();
    drop(pod);

    let restored = cluster.create_pod(counter_pod("e2e-counter", Some(&name)));
    restored.wait_ready();
    assert_ne!(restored.uid(), old_uid);
    // And on the restored pod: Restoring, False once its containers run again.
    let restoring = restored.wait_condition("Restoring", "False", "RestoreSucceeded");
    assert!(
        restoring["message"]
            .as_str()
            .is_some_and(|m| m.contains(&name)),
        "{restoring}"
    );
    wait_counting(&restored, "counter", 2);
    let seen = counts(&restored.logs("counter"));
    let first = seen[0];
    assert!(
        first > before && first <= after + 1,
        "the restored pod's first count is {first}, but the counter was at {before}..{after} when checkpointed (log {seen:?})"
    );
    for pair in seen.windows(2) {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "the restored counter skipped: {seen:?}"
        );
    }
    let events = restored.events();
    assert!(
        events.iter().any(|e| e.starts_with("RestoreSucceeded:")),
        "no Restored event: {events:#?}"
    );
    assert!(
        !events.iter().any(|e| e.starts_with("FailedRestore:")),
        "{events:#?}"
    );
}

#[test]
fn two_container_pod_restores_both_with_their_shared_files() {
    let cluster = Cluster::get();
    // The counter also keeps a log file in the shared emptyDir open (fd 3) and appends to it.
    let script = "exec 3>>/data/log; i=0; while true; do echo \"count: $i\"; echo \"count: $i\" >&3; echo $i > /data/n.tmp && mv /data/n.tmp /data/n; i=$((i+1)); sleep 1; done";
    let manifest = |restore_from: Option<&str>| {
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "e2e-pair", "namespace": "default"},
            "spec": {
                "runtimeClassName": "podsnap",
                "terminationGracePeriodSeconds": 2,
                "volumes": [{"name": "data", "emptyDir": {}}],
                "containers": [
                    {"name": "count", "image": COUNTER_IMAGE, "command": ["sh", "-c", script],
                     "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                    {"name": "serve", "image": COUNTER_IMAGE, "command": ["sh", "-c", "mkdir -p /srv && exec httpd -f -p 8080 -h /srv"],
                     "volumeMounts": [{"name": "data", "mountPath": "/srv/shared"}]}
                ]
            }
        });
        if let Some(checkpoint) = restore_from {
            pod["metadata"]["annotations"] = json!({ RESTORE_FROM: checkpoint });
        }
        pod
    };
    let pod = cluster.create_pod(manifest(None));
    pod.wait_ready();
    wait_counting(&pod, "count", 3);
    // Files written before the checkpoint: one in the server's own writable layer, one in the
    // pod's emptyDir volume.
    pod.exec(
        "serve",
        &[
            "sh",
            "-c",
            "echo written-before > /srv/marker && echo shared-before > /srv/shared/marker",
        ],
    );
    let (location, before, after) = checkpoint(cluster, &pod, "count");
    let record = format!("{}.kubelet.json", location.display());
    let answer_containers = cluster
        .node_read(&cluster.node, Path::new(&record))
        .unwrap_or_else(|| panic!("{record} cannot be read"));
    assert!(
        answer_containers.contains("\"count\"") && answer_containers.contains("\"serve\""),
        "{answer_containers}"
    );
    drop(pod);

    let name = location.file_name().unwrap().to_str().unwrap().to_owned();
    let restored = cluster.create_pod(manifest(Some(&name)));
    restored.wait_ready();
    wait_counting(&restored, "count", 2);
    let first = counts(&restored.logs("count"))[0];
    assert!(
        first > before && first <= after + 1,
        "first count {first}, checkpointed at {before}..{after}"
    );
    // The server, restored too, serves over the restored pod's own network namespace the file
    // written into its layer and the one written into the emptyDir before the checkpoint.
    let get = |path: &str| {
        restored.exec(
            "count",
            &["wget", "-qO-", &format!("http://127.0.0.1:8080/{path}")],
        )
    };
    assert_eq!(get("marker").trim(), "written-before");
    assert_eq!(get("shared/marker").trim(), "shared-before");
    // The counter's log file in the volume, held open across the checkpoint: its lines before
    // the checkpoint are there, and the restored process appends to it with no gap.
    let logged = wait_for(
        "the restored counter to append to its log file in the volume",
        Duration::from_secs(30),
        || {
            let seen = counts(&restored.exec_try("count", &["cat", "/data/log"]));
            if seen.last().is_some_and(|last| *last > first) {
                Ok(seen)
            } else {
                Err(format!("{seen:?}"))
            }
        },
    );
    let expected: Vec<u64> = (0..logged.len() as u64).collect();
    assert_eq!(
        logged, expected,
        "the log file in the emptyDir has a gap or restarted (the restored counter began at {first})"
    );
    let n: u64 = get("shared/n")
        .trim()
        .parse()
        .expect("the shared counter file holds a number");
    assert!(
        n >= first,
        "the shared file says {n}, the restored counter started at {first}"
    );
}

#[test]
fn tampered_checkpoint_fails_the_restore_with_an_event_and_never_starts_fresh() {
    let cluster = Cluster::get();
    let pod = cluster.create_pod(counter_pod("e2e-tamper", None));
    pod.wait_ready();
    wait_counting(&pod, "counter", 2);
    let (location, _, _) = checkpoint(cluster, &pod, "counter");
    drop(pod);

    // Flip a byte of the largest file in the checkpoint (a memory image).
    let victim = cluster.tamper_with(&cluster.node, &location);
    let victim_name = victim.file_name().unwrap().to_str().unwrap().to_owned();

    let name = location.file_name().unwrap().to_str().unwrap().to_owned();
    let restored = cluster.create_pod(counter_pod("e2e-tamper", Some(&name)));
    let events = wait_event(&restored, "was modified");
    let failed = events
        .iter()
        .find(|e| e.starts_with("FailedRestore:") && e.contains("was modified"))
        .unwrap_or_else(|| panic!("no FailedRestore event naming the change: {events:#?}"));
    assert!(
        failed.contains(&victim_name),
        "the event does not name {victim_name}: {failed}"
    );
    assert_never_started(&restored);
    // The pod's Restoring condition says so too (the outcome of the last attempt).
    restored.wait_condition("Restoring", "False", "FailedRestore");
    // The kubelet retries with backoff, and still never starts the pod fresh. (The page
    // images are verified at StartContainer, whose error names the new container: each retry
    // may be an event of its own rather than a count on the first.)
    wait_for("a retried restore", Duration::from_secs(90), || {
        let failures: u64 = restored
            .events()
            .iter()
            .filter(|e| e.starts_with("FailedRestore:") && e.contains("was modified"))
            .map(|e| {
                e.rsplit_once("(x")
                    .and_then(|(_, n)| n.trim_end_matches(')').parse::<u64>().ok())
                    .unwrap_or(1)
            })
            .sum();
        if failures >= 2 {
            Ok(())
        } else {
            Err(format!("{:#?}", restored.events()))
        }
    });
    assert_never_started(&restored);
}

#[test]
fn restore_from_a_bad_reference_fails_clearly_and_never_starts_fresh() {
    let cluster = Cluster::get();
    // A checkpoint of the counter, to misuse.
    let source = cluster.create_pod(counter_pod("e2e-source", None));
    source.wait_ready();
    let (location, _, _) = checkpoint(cluster, &source, "counter");
    drop(source);
    let name = location.file_name().unwrap().to_str().unwrap().to_owned();

    // No such checkpoint.
    let missing = cluster.create_pod(counter_pod(
        "e2e-missing",
        Some("checkpoint-nothere_default-2026-01-01T00:00:00Z"),
    ));
    let events = wait_event(&missing, "pod checkpoint not found");
    assert!(
        events.iter().any(|e| e.starts_with("FailedRestore:")),
        "{events:#?}"
    );
    assert_never_started(&missing);
    drop(missing);

    // A path outside the kubelet's checkpoints.
    let outside = cluster.create_pod(counter_pod("e2e-outside", Some("/etc")));
    wait_event(&outside, "is not a checkpoint in");
    assert_never_started(&outside);
    drop(outside);

    // Another pod spec: a different command.
    let mut other = counter_pod("e2e-otherspec", Some(&name));
    other["spec"]["containers"][0]["command"] = json!(["sh", "-c", "sleep 1000"]);
    let other = cluster.create_pod(other);
    wait_event(&other, "checkpoint has command");
    assert_never_started(&other);
    drop(other);

    // Another namespace: a checkpoint holds its pod's memory; it stays in its namespace.
    cluster.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "podsnap-e2e-other"}}));
    wait_for(
        "the default service account of podsnap-e2e-other",
        Duration::from_secs(60),
        || {
            cluster
                .kubectl_try([
                    "-n",
                    "podsnap-e2e-other",
                    "get",
                    "serviceaccount",
                    "default",
                ])
                .and_then(|f| if f.success() { Ok(()) } else { Err(f.report()) })
        },
    );
    let mut foreign = counter_pod("e2e-foreign", Some(&name));
    foreign["metadata"]["namespace"] = json!("podsnap-e2e-other");
    let foreign = cluster.create_pod(foreign);
    wait_event(&foreign, "restoring across namespaces is not allowed");
    assert_never_started(&foreign);
}

#[test]
fn checkpoint_requests_that_cannot_succeed_get_a_4xx_and_change_nothing() {
    let cluster = Cluster::get();
    let checkpoints = cluster.kubelet_root.join("pod-checkpoints");
    let listing = || cluster.node_entries(&cluster.node, &checkpoints);

    let expect = |namespace: &str,
                  pod: &str,
                  query: &str,
                  user: Option<&str>,
                  status: &str,
                  message: &str| {
        let before = listing();
        let answer = cluster.checkpoint_pod(namespace, pod, query, user);
        assert!(
            !answer.finished.success(),
            "checkpoint of {namespace}/{pod} succeeded: {}",
            answer.finished.report()
        );
        let text = format!("{}{}", answer.finished.stdout, answer.finished.stderr);
        assert!(
            text.contains(status) && text.contains(message),
            "checkpoint of {namespace}/{pod}{query}: want {status} saying {message:?}, got:\n{text}"
        );
        assert_eq!(
            listing(),
            before,
            "a failed checkpoint left something in {}",
            checkpoints.display()
        );
    };

    // No such pod.
    expect(
        "default",
        "nothere",
        "",
        None,
        "NotFound",
        "pod default/nothere does not exist on this node",
    );

    let pod = cluster.create_pod(counter_pod("e2e-badinput", None));
    pod.wait_ready();
    // A timeout that is not a number of seconds.
    expect(
        "default",
        "e2e-badinput",
        "?timeout=soon",
        None,
        "BadRequest",
        "timeout must be a positive number of seconds",
    );
    // A PodCheckpoint UID that is not one.
    expect(
        "default",
        "e2e-badinput",
        "?podCheckpointUID=..%2F..%2Fetc",
        None,
        "BadRequest",
        "is not a UID",
    );
    // A caller without the permission: the API server refuses the node proxy.
    expect(
        "default",
        "e2e-badinput",
        "",
        Some("system:serviceaccount:default:intruder"),
        "Forbidden",
        "nodes/proxy",
    );
    drop(pod);

    // A pod whose containers have all exited.
    let mut done = counter_pod("e2e-done", None);
    done["spec"]["restartPolicy"] = json!("Never");
    done["spec"]["containers"][0]["command"] = json!(["true"]);
    let done = cluster.create_pod(done);
    wait_for("e2e-done to succeed", Duration::from_secs(120), || {
        let phase = done.get()["status"]["phase"].clone();
        if phase == "Succeeded" {
            Ok(())
        } else {
            Err(phase.to_string())
        }
    });
    expect(
        "default",
        "e2e-done",
        "",
        None,
        "Conflict",
        "pod is not running",
    );
    drop(done);

    // A pod on another runtime handler: podsnapd refuses it.
    cluster.apply(&json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "runc"}, "handler": "runc"}));
    let mut runc = counter_pod("e2e-runc", None);
    runc["spec"]["runtimeClassName"] = json!("runc");
    let runc = cluster.create_pod(runc);
    runc.wait_ready();
    expect("default", "e2e-runc", "", None, "Conflict", "runc");
    // It was not disturbed: it counts on.
    let at = last_count(&runc, "counter");
    wait_for("the runc pod to count on", Duration::from_secs(30), || {
        let now = last_count(&runc, "counter");
        if now > at {
            Ok(())
        } else {
            Err(format!("still at {now}"))
        }
    });
}

/// The kubelet authorises /checkpointpod itself (nodes/checkpoint), whoever reaches it: a client
/// with a certificate of the cluster's CA but no such permission is refused.
#[test]
fn kubelet_refuses_a_checkpoint_by_a_user_without_the_permission() {
    let cluster = Cluster::get();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("intruder.key");
    let csr = dir.path().join("intruder.csr");
    let crt = dir.path().join("intruder.crt");
    let openssl = |args: &[&str]| {
        let f = CommandLine::new("openssl").args(args).run().unwrap();
        assert!(f.success(), "{}", f.report());
    };
    openssl(&["genrsa", "-out", key.to_str().unwrap(), "2048"]);
    openssl(&[
        "req",
        "-new",
        "-key",
        key.to_str().unwrap(),
        "-subj",
        "/CN=intruder",
        "-out",
        csr.to_str().unwrap(),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        csr.to_str().unwrap(),
        "-CA",
        cluster.pki.join("ca.crt").to_str().unwrap(),
        "-CAkey",
        cluster.pki.join("ca.key").to_str().unwrap(),
        "-CAcreateserial",
        "-days",
        "1",
        "-out",
        crt.to_str().unwrap(),
    ]);
    let address = cluster.kubectl([
        "get",
        "node",
        &cluster.node,
        "-o",
        "jsonpath={.status.addresses[?(@.type==\"InternalIP\")].address}",
    ]);
    let url = format!(
        "https://{}:10250/checkpointpod/default/anything",
        address.trim()
    );
    let curl = |cert: &Path, key: &Path| {
        CommandLine::new("curl")
            .args(["-sS", "-k", "-X", "POST", "-w", "\n%{http_code}", "--cert"])
            .arg(cert)
            .arg("--key")
            .arg(key)
            .arg(&url)
            .run()
            .unwrap()
    };
    let refused = curl(&crt, &key);
    assert!(
        refused.stdout.trim_end().ends_with("403"),
        "{}",
        refused.report()
    );
    assert!(
        refused.stdout.contains("nodes/checkpoint") || refused.stdout.contains("Forbidden"),
        "{}",
        refused.report()
    );
    // The API server's own kubelet client may: the same request gets to the handler (404: no
    // such pod).
    let allowed = curl(
        &cluster.pki.join("apiserver-kubelet-client.crt"),
        &cluster.pki.join("apiserver-kubelet-client.key"),
    );
    assert!(
        allowed.stdout.trim_end().ends_with("404"),
        "{}",
        allowed.report()
    );
}

/// The controller never reaches a kubelet (KEP-5823: each kubelet takes the PodCheckpoints of its
/// own pods): neither of its identities holds `nodes/proxy`, which would reach /run and /exec of
/// every pod, and the API server refuses it the pod checkpoint endpoint too.
#[test]
fn the_controller_cannot_reach_any_kubelet() {
    let cluster = Cluster::get();
    let node = &cluster.node;
    for user in [
        "podsnap-controller",
        "system:serviceaccount:podsnap-system:podsnap-controller",
    ] {
        let can = cluster
            .kubectl_try(["auth", "can-i", "create", "nodes/proxy", "--as", user])
            .expect("kubectl runs");
        assert_eq!(can.stdout.trim(), "no", "{user}: {}", can.report());
        for path in [
            "run/default/anything/c?cmd=id",
            "checkpointpod/default/anything?timeout=5",
        ] {
            let refused = cluster
                .kubectl_try([
                    "--as",
                    user,
                    "create",
                    "--raw",
                    &format!("/api/v1/nodes/{node}/proxy/{path}"),
                    "-f",
                    "/dev/null",
                ])
                .expect("kubectl runs");
            let text = refused.stdout.clone() + &refused.stderr;
            assert!(
                !refused.success() && text.contains("Forbidden") && text.contains("nodes/proxy"),
                "{user} reached {path} through the node proxy: {}",
                refused.report()
            );
        }
    }
}

/// A kubelet writes the status of a PodCheckpoint only as the one that takes it on its own node
/// (policy podsnap-kubelet-podcheckpoint-status): the kubelet of another node may neither claim
/// one nor write one another node holds, nor change anything but the status.
#[test]
fn the_kubelet_of_another_node_cannot_write_a_checkpoints_status() {
    let cluster = Cluster::get();
    // A checkpoint that ends Failed at once (no such pod); no kubelet takes it.
    let checkpoint = Object::create(cluster, checkpoint_of("e2e-node-status", "e2e-nothere"));
    let failed = checkpoint.wait_phase(&["Failed", "Ready"]);
    assert_eq!(failed["status"]["reason"], "SourcePodNotFound", "{failed}");
    let as_node = |node: &str, patch: Value, subresource: Option<&str>| {
        let patch = patch.to_string();
        let mut args = vec![
            "--as".to_string(),
            format!("system:node:{node}"),
            "--as-group".into(),
            "system:nodes".into(),
            "--as-group".into(),
            "system:authenticated".into(),
            "patch".into(),
            "podcheckpoint".into(),
            "e2e-node-status".into(),
            "--type=merge".into(),
            "-p".into(),
            patch,
        ];
        if let Some(subresource) = subresource {
            args.push(format!("--subresource={subresource}"));
        }
        cluster.kubectl_try(args).expect("kubectl runs")
    };
    let refused = |f: &Finished, why: &str| {
        let text = f.stdout.clone() + &f.stderr;
        assert!(
            !f.success()
                && text.contains("podsnap-kubelet-podcheckpoint-status")
                && text.contains(why),
            "{}",
            f.report()
        );
    };
    let node = cluster.node.clone();
    // A status naming no node, or another node than the writer's: refused.
    refused(
        &as_node(
            "intruder",
            json!({"status": {"message": "x"}}),
            Some("status"),
        ),
        "on its own node",
    );
    refused(
        &as_node(
            "intruder",
            json!({"status": {"nodeName": node, "message": "x"}}),
            Some("status"),
        ),
        "on its own node",
    );
    // The object itself (spec, metadata): refused (RBAC grants kubelets its status only).
    let object = as_node(&node, json!({"metadata": {"labels": {"x": "y"}}}), None);
    assert!(
        !object.success() && object.stderr.contains("Forbidden"),
        "{}",
        object.report()
    );
    // The kubelet of the node names itself: let through (RBAC grants every kubelet the status).
    let own = as_node(&node, json!({"status": {"nodeName": node}}), Some("status"));
    assert!(own.success(), "{}", own.report());
    // Now the checkpoint names that node: no other kubelet may write it, even naming itself.
    refused(
        &as_node(
            "intruder",
            json!({"status": {"nodeName": "intruder"}}),
            Some("status"),
        ),
        "on its own node",
    );
}

/// The pod's containers on the node, as CRI reports them: (name, state) of every container of
/// the pod named `pod` (any sandbox).
fn cri_containers(cluster: &Cluster, pod: &str) -> Vec<(String, String)> {
    let out = cluster.node_crictl(&cluster.node, &["ps", "-a", "-o", "json"]);
    let listed: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    listed["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["labels"]["io.kubernetes.pod.name"] == pod)
        .map(|c| {
            (
                c["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                c["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// A kubelet that restarts after RestorePod created a pod's sandbox and containers, before it
/// started them all, restores the pod again (kubelet patch 0008): no container of a restored
/// sandbox is ever started fresh from its image. The first container's restore unpacks a
/// 512 MiB emptyDir, so the second waits CREATED for seconds: the kubelet is killed then.
#[test]
fn a_kubelet_restarted_mid_restore_restores_the_pod_again_and_never_starts_it_fresh() {
    let cluster = Cluster::get();
    let two = |restore_from: Option<&str>| {
        let mut manifest = counter_pod("e2e-interrupted", restore_from);
        manifest["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
        let script = format!(
            "head -c {} /dev/urandom > /data/blob && {}",
            512u64 << 20,
            cluster::COUNTER_SCRIPT
        );
        manifest["spec"]["containers"] = json!([
            {"name": "first", "image": COUNTER_IMAGE, "command": ["sh", "-c", script],
             "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
            {"name": "second", "image": COUNTER_IMAGE, "command": ["sh", "-c", cluster::COUNTER_SCRIPT]},
        ]);
        manifest
    };
    let pod = cluster.create_pod(two(None));
    pod.wait_ready();
    wait_counting(&pod, "first", 3);
    wait_counting(&pod, "second", 3);
    let (location, before, _) = checkpoint(cluster, &pod, "second");
    let name = location.file_name().unwrap().to_str().unwrap().to_owned();
    drop(pod);

    // How many restores from this checkpoint podsnapd has answered (it logs each, naming it).
    let answered = || {
        cluster
            .node_log(&cluster.node, Component::Podsnapd)
            .lines()
            .filter(|l| l.contains("pod restored (created)") && l.contains(name.as_str()))
            .count()
    };
    // The kubelet must be killed while `first`'s restore unpacks the volume and `second` waits
    // CREATED. That window is about a second: a try that misses it (the kill came after the
    // kubelet started `second`) proves nothing, and is made again with a new pod.
    let mut tries = Vec::new();
    let (restored, containers) = loop {
        let seen = answered();
        let restored = cluster.create_pod(two(Some(&name)));
        wait_for(
            "RestorePod to answer the kubelet",
            Duration::from_secs(120),
            || {
                if answered() > seen {
                    Ok(())
                } else {
                    Err("not yet".to_owned())
                }
            },
        );
        cluster.kill_kubelet(&cluster.node);
        let containers = cri_containers(cluster, "e2e-interrupted");
        cluster.start_kubelet(&cluster.node);
        if containers
            .iter()
            .any(|(n, s)| n == "second" && s == "CONTAINER_CREATED")
        {
            break (restored, containers);
        }
        tries.push(containers);
        assert!(
            tries.len() < 3,
            "the kubelet was not killed mid-restore in {} tries: {tries:?}",
            tries.len()
        );
        restored.wait_ready();
        drop(restored);
    };

    restored.wait_ready();
    wait_counting(&restored, "second", 2);
    let seen = counts(&restored.logs("second"));
    assert!(
        seen[0] > before,
        "`second` started fresh (first count {}, checkpointed at {before}; log {seen:?}); \
         containers when the kubelet was killed: {containers:?}",
        seen[0]
    );
    let events = restored.events();
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("FailedRestore:") && e.contains("interrupted")),
        "no event tells of the interrupted restore: {events:#?}"
    );
    drop(restored);
}

/// The talk's P1 "kept IP": a pod suspended (checkpointed, deleted) and resumed on the same
/// node with `podsnap.io/keep-ip` has its old address again (podsnap-ipam in front of
/// host-local), and counts on.
#[test]
fn a_pod_suspended_and_resumed_with_keep_ip_keeps_its_address() {
    let cluster = Cluster::get();
    let pod = cluster.create_pod(counter_pod("e2e-keep-ip", None));
    pod.wait_ready();
    wait_counting(&pod, "counter", 3);
    let ip = pod.get()["status"]["podIP"]
        .as_str()
        .expect("the pod has an address")
        .to_string();
    let resumed = suspend_and_resume(cluster, pod, |name| {
        let mut resumed = counter_pod("e2e-keep-ip", Some(name));
        resumed["metadata"]["annotations"]["podsnap.io/keep-ip"] = json!("true");
        resumed
    });
    assert_eq!(
        resumed.get()["status"]["podIP"].as_str(),
        Some(ip.as_str()),
        "the resumed pod did not keep its address"
    );
}

/// A pod with a user namespace of its own (`hostUsers: false`) is checkpointed through the
/// kubelet and restored into a new pod, which the kubelet gives its own user namespace and host
/// range: the restored counter counts on, inside the new pod's user namespace, as its root.
#[test]
fn a_pod_with_host_users_false_is_restored_into_its_new_user_namespace() {
    let cluster = Cluster::get();
    let without_host_users = |restore_from: Option<&str>| {
        let mut pod = counter_pod("e2e-userns", restore_from);
        pod["spec"]["hostUsers"] = json!(false);
        pod
    };
    let pod = cluster.create_pod(without_host_users(None));
    pod.wait_ready();
    wait_counting(&pod, "counter", 3);
    let uid_map = |pod: &KubePod<'_>| -> Vec<String> {
        pod.exec("counter", &["cat", "/proc/self/uid_map"])
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let source_map = uid_map(&pod);
    assert_eq!(source_map[0], "0", "{source_map:?}");
    assert_ne!(
        source_map[1], "0",
        "the pod runs in the host's user namespace"
    );
    let restored = suspend_and_resume(cluster, pod, |name| without_host_users(Some(name)));
    let restored_map = uid_map(&restored);
    eprintln!("uid_map: checkpointed {source_map:?}, restored {restored_map:?}");
    // The kubelet picks each pod's range at random: the owners did move.
    assert_ne!(
        restored_map[1], source_map[1],
        "restored under the checkpointed host range"
    );
    assert_eq!(restored_map[0], "0", "{restored_map:?}");
    assert_ne!(
        restored_map[1], "0",
        "restored into the host's user namespace"
    );
    assert_eq!(
        restored.exec("counter", &["id", "-u"]).trim(),
        "0",
        "the restored counter is not root inside its user namespace"
    );
}

/// A pod with a native sidecar (a restartable init container): its regular containers are
/// checkpointed and restored counting on; the sidecar is not part of the checkpoint and starts
/// afresh from its image in the restored pod, before them, as the kubelet starts sidecars.
#[test]
fn a_pod_with_a_native_sidecar_restores_its_containers_and_starts_the_sidecar_afresh() {
    let cluster = Cluster::get();
    let with_sidecar = |restore_from: Option<&str>| {
        let mut pod = counter_pod("e2e-sidecar", restore_from);
        pod["spec"]["initContainers"] = json!([{
            "name": "sidecar",
            "image": COUNTER_IMAGE,
            "restartPolicy": "Always",
            "command": ["sh", "-c", "i=0; while true; do echo \"side: $i\"; i=$((i+1)); sleep 1; done"],
        }]);
        pod
    };
    let pod = cluster.create_pod(with_sidecar(None));
    pod.wait_ready();
    wait_counting(&pod, "counter", 3);
    let restored = suspend_and_resume(cluster, pod, |name| with_sidecar(Some(name)));
    let side = restored.logs("sidecar");
    assert!(
        side.lines().next() == Some("side: 0"),
        "the sidecar did not start afresh: {side}"
    );
}

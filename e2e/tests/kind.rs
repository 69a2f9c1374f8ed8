//! End-to-end tests on the kind cluster (`hack/kind-up.sh`): nodes in podman containers from
//! podsnap's node image, podsnap deployed from `deploy/` (the controller as a Deployment,
//! podsnapd's node agent as a DaemonSet). The same flows as `controller.rs` asserts on the
//! single-node cluster — the seed's YAML, checkpoint and restore through PodCheckpoint and
//! PodRestore, warm start, the restore permission, failure cases — and what only more than one
//! node shows: a pod on each worker checkpoints and is restored on that worker. Run one at a time.

use std::time::Duration;

use podsnap_e2e::cluster::{
    COUNTER_IMAGE, Cluster, KubePod, Object, checkpoint_of, counter_pod, counts,
};
use podsnap_e2e::wait_for;
use serde_json::{Value, json};

/// A counting pod pinned to `node`.
fn counter_on(name: &str, node: &str) -> Value {
    let mut pod = counter_pod(name);
    pod["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": node});
    pod
}

/// The node a pod was scheduled to.
fn node_of(pod: &KubePod<'_>) -> String {
    pod.get()["spec"]["nodeName"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn restore_of(name: &str, checkpoint: &str, replicas: u32) -> Value {
    json!({
        "apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodRestore",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"checkpointName": checkpoint, "replicas": replicas}
    })
}

/// The pod a Completed single-replica PodRestore created (deleted when dropped).
fn restored_pod<'c>(cluster: &'c Cluster, restore: &Value) -> KubePod<'c> {
    let name = restore["status"]["restoredPodName"].as_str().unwrap();
    cluster.existing_pod("default", name)
}

/// Checkpoints `pod` (PodCheckpoint `name`), asserts it is Ready on `node`; returns the object.
fn checkpoint_on<'c>(cluster: &'c Cluster, name: &str, pod: &str, node: &str) -> Object<'c> {
    let checkpoint = Object::create(cluster, checkpoint_of(name, pod));
    let ready = checkpoint.wait_phase(&["Ready", "Failed"]);
    assert_eq!(ready["status"]["phase"], "Ready", "{ready}");
    assert_eq!(ready["status"]["nodeName"], node, "{ready}");
    checkpoint
}

/// The test needs two workers (hack/kind-up.sh's default of three nodes).
fn workers(cluster: &Cluster) -> Vec<String> {
    let workers = cluster.workers();
    assert!(
        workers.len() >= 2,
        "the kind cluster has {} workers, these tests want 2 (hack/kind-up.sh --nodes 3)",
        workers.len()
    );
    workers
}

/// podsnap runs as a user deploys it: the controller's Deployment is available and a node agent
/// runs on every node, from the images kind-up built; each node's kubelet talks CRI to podsnapd.
#[test]
fn podsnap_is_deployed_from_deploy_on_every_node() {
    let cluster = Cluster::kind();
    let nodes = cluster.nodes();
    let agents: Value = serde_json::from_str(&cluster.kubectl([
        "-n",
        "podsnap-system",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=podsnap-node-agent",
        "-o",
        "json",
    ]))
    .unwrap();
    let mut on: Vec<String> = agents["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["status"]["phase"] == "Running")
        .map(|p| p["spec"]["nodeName"].as_str().unwrap().to_owned())
        .collect();
    on.sort();
    let mut names: Vec<String> = nodes.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(on, names, "a running node agent on every node");
    for (node, _) in &nodes {
        let runtime = cluster.kubectl([
            "get",
            "node",
            node,
            "-o",
            "jsonpath={.status.nodeInfo.containerRuntimeVersion}",
        ]);
        assert!(runtime.starts_with("containerd://"), "{node}: {runtime}");
        let flags = cluster.node_exec(node, &["cat", "/var/lib/kubelet/kubeadm-flags.env"]);
        let config = cluster.node_exec(node, &["cat", "/var/lib/kubelet/config.yaml"]);
        assert!(
            config
                .stdout
                .contains("containerRuntimeEndpoint: unix:///run/podsnap-node/podsnapd.sock")
                || flags.stdout.contains("/run/podsnap-node/podsnapd.sock"),
            "{node}: the kubelet's CRI endpoint is not podsnapd:\n{}\n{}",
            flags.stdout,
            config.stdout
        );
    }
}

/// What a second node shows: a pod on each worker is checkpointed there (status.nodeName) and
/// restored there, counting on from where it was.
#[test]
fn a_pod_on_each_worker_checkpoints_and_restores_on_that_worker() {
    let cluster = Cluster::kind();
    for (i, worker) in workers(cluster).iter().enumerate() {
        let pod = cluster.create_pod(counter_on(&format!("e2e-kind-w{i}"), worker));
        pod.wait_ready();
        assert_eq!(&node_of(&pod), worker);
        pod.wait_counting("counter", 3);
        // The count the checkpoint holds lies between these two (the pod counts on meanwhile).
        let before = *counts(&pod.logs("counter")).last().unwrap();
        let _checkpoint = checkpoint_on(cluster, &format!("e2e-kind-w{i}-ckpt"), &pod.name, worker);
        let after = *counts(&pod.logs("counter")).last().unwrap();
        drop(pod);
        let restore = Object::create(
            cluster,
            restore_of(
                &format!("e2e-kind-w{i}-r"),
                &format!("e2e-kind-w{i}-ckpt"),
                1,
            ),
        );
        let done = restore.wait_phase(&["Completed", "Failed"]);
        assert_eq!(done["status"]["phase"], "Completed", "{done}");
        let restored = restored_pod(cluster, &done);
        restored.wait_ready();
        assert_eq!(&node_of(&restored), worker, "restored on another node");
        let seen = restored.wait_counting("counter", 2);
        assert!(
            seen[0] > before && seen[0] <= after + 1,
            "{worker}: the checkpoint was taken between counts {before} and {after}, the restored pod counts {seen:?}"
        );
    }
}

/// The registries the node agents reach over plain HTTP (the podsnap-node-agent ConfigMap's
/// `insecure-registries`, comma-separated).
fn insecure_registries(cluster: &Cluster) -> String {
    cluster.kubectl([
        "-n",
        "podsnap-system",
        "get",
        "configmap",
        "podsnap-node-agent",
        "-o",
        "jsonpath={.data.insecure-registries}",
    ])
}

/// The registry the node agents push to and pull from, as kind-up configured them (the
/// podsnap-node-agent ConfigMap's insecure registries).
fn agents_registry(cluster: &Cluster) -> String {
    let insecure = insecure_registries(cluster);
    let registry = insecure.split(',').next().unwrap_or_default().trim();
    assert!(
        !registry.is_empty(),
        "the node agents have no registry configured (hack/kind-up.sh sets one)"
    );
    registry.to_owned()
}

/// The private registry of the test bed (hack/kind-lib.sh, `KIND_PRIVATE_REGISTRY_NAME`):
/// HTTPS with a certificate of its own CA, which the node agents trust through the ConfigMap
/// podsnap-registry-ca, and only user `podsnap`. Not among the agents' plain-HTTP registries.
fn private_registry(cluster: &Cluster) -> String {
    let name = std::env::var("PODSNAP_KIND_CLUSTER").unwrap_or_else(|_| "podsnap".into());
    let registry = format!("{name}-private-registry:5000");
    let insecure = insecure_registries(cluster);
    assert!(
        !insecure.split(',').any(|r| r.trim() == registry),
        "{registry} is reached over plain HTTP ({insecure:?}): the test wants HTTPS"
    );
    let ca = cluster.kubectl([
        "-n",
        "podsnap-system",
        "get",
        "configmap",
        "podsnap-registry-ca",
        "-o",
        "jsonpath={.data.ca\\.crt}",
    ]);
    assert!(
        ca.contains("BEGIN CERTIFICATE"),
        "the ConfigMap podsnap-registry-ca has no CA certificate (hack/kind-up.sh makes it): {ca:?}"
    );
    registry
}

/// A counting pod `name` bound to `node` by name and its Ready PodCheckpoint `checkpoint`, stored
/// as an image in `repository` (deletion policy Delete). Bound by name, not by a node selector:
/// a pod restored from it keeps the checkpointed spec, and a selector for one worker would have
/// another refuse it (NodeAffinity). Returns the pod, its last count before the checkpoint was
/// asked for, the PodCheckpoint and the object once Ready.
fn counter_with_image_checkpoint<'c>(
    cluster: &'c Cluster,
    name: &str,
    checkpoint: &str,
    repository: &str,
    node: &str,
) -> (KubePod<'c>, u64, Object<'c>, Value) {
    let mut source = counter_pod(name);
    source["spec"]["nodeName"] = json!(node);
    let pod = cluster.create_pod(source);
    pod.wait_ready();
    pod.wait_counting("counter", 3);
    let before = *counts(&pod.logs("counter")).last().unwrap();
    let mut manifest = checkpoint_of(checkpoint, &pod.name);
    manifest["spec"]["storage"] = json!({"type": "Image", "image": {"repository": repository}});
    manifest["spec"]["deletionPolicy"] = json!("Delete");
    let object = Object::create(cluster, manifest);
    let ready = object.wait_phase(&["Ready", "Failed"]);
    assert_eq!(ready["status"]["phase"], "Ready", "{ready}");
    (pod, before, object, ready)
}

/// Ctrl-X on one worker, Ctrl-V on the other: a PodCheckpoint with storage type Image is pushed
/// by the source node's agent and Ready with the image by digest; a PodRestore naming the other
/// worker has that node's agent pull it (verified, recorded, pinned) and the kubelet there
/// restore it; the pod counts on from the checkpoint. The pulled copy is the target node's, marked
/// as pulled; deleting the PodCheckpoint (policy Delete) removes the source node's data.
#[test]
fn a_checkpoint_stored_as_an_image_moves_from_one_worker_to_the_other() {
    let cluster = Cluster::kind();
    let workers = workers(cluster);
    let (from, to) = (&workers[0], &workers[1]);
    let repository = format!("{}/e2e/move", agents_registry(cluster));
    let (pod, before, _checkpoint, ready) = counter_with_image_checkpoint(
        cluster,
        "e2e-kind-move",
        "e2e-kind-move-ckpt",
        &repository,
        from,
    );
    assert_eq!(ready["status"]["nodeName"].as_str(), Some(from.as_str()));
    let image = ready["status"]["image"]["reference"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        image.starts_with(&format!("{repository}@sha256:")),
        "{ready}"
    );
    assert!(
        ready["status"]["image"]["size"].as_i64().unwrap_or(0) > 0,
        "{ready}"
    );
    let location = cluster
        .checkpoint_dir(&ready["status"])
        .display()
        .to_string();
    let after = *counts(&pod.logs("counter")).last().unwrap();
    drop(pod);

    let exists = |node: &str, path: &str| cluster.node_exec(node, &["test", "-e", path]).success();
    assert!(
        !exists(to, &location),
        "{location} is on {to} before any restore"
    );
    let mut restore = restore_of("e2e-kind-move-r", "e2e-kind-move-ckpt", 1);
    restore["spec"]["nodeName"] = json!(to);
    let restore = Object::create(cluster, restore);
    let done = restore.wait_phase(&["Completed", "Failed"]);
    assert_eq!(done["status"]["phase"], "Completed", "{done}");
    let restored = restored_pod(cluster, &done);
    restored.wait_ready();
    assert_eq!(&node_of(&restored), to, "restored on another node");
    let seen = restored.wait_counting("counter", 2);
    assert!(
        seen[0] > before && seen[0] <= after + 1,
        "the checkpoint was taken between counts {before} and {after} on {from}, the pod restored on {to} counts {seen:?}"
    );
    // Pulled into the kubelet's directory on the target, with the kubelet's record, marked.
    for path in [
        location.clone(),
        format!("{location}.kubelet.json"),
        format!("{location}.pulled"),
    ] {
        assert!(exists(to, &path), "{path} is not on {to}");
    }
    let marker = cluster.node_exec(to, &["cat", &format!("{location}.pulled")]);
    assert!(
        image.ends_with(marker.stdout.trim()),
        "{to} pulled {} for {image}",
        marker.stdout
    );
    drop(restored);
    drop(restore);
    cluster.kubectl([
        "delete",
        "podcheckpoint",
        "e2e-kind-move-ckpt",
        "--wait=true",
        "--timeout=120s",
    ]);
    assert!(!exists(from, &location), "{location} is still on {from}");
}

/// Restore by reference on any node: a pod created directly (no PodRestore), naming an image
/// PodCheckpoint taken on one worker and bound to the other, is restored there. The controller
/// lists that node in the checkpoint's `pullNodes` once the pod is bound, its node agent pulls
/// the image, and the kubelet (which waited, `CheckpointDataMissing`) restores the pod from it.
#[test]
fn a_pod_naming_an_image_checkpoint_is_restored_on_another_worker() {
    let cluster = Cluster::kind();
    let workers = workers(cluster);
    let (from, to) = (&workers[0], &workers[1]);
    let repository = format!("{}/e2e/ref", agents_registry(cluster));
    let (pod, _, checkpoint, _) = counter_with_image_checkpoint(
        cluster,
        "e2e-kind-ref",
        "e2e-kind-ref-ckpt",
        &repository,
        from,
    );
    let after = *counts(&pod.logs("counter")).last().unwrap();
    drop(pod);

    let mut restored = counter_pod("e2e-kind-ref-restored");
    restored["spec"]["nodeName"] = json!(to);
    restored["metadata"]["annotations"] =
        json!({"checkpoint.k8s.io/restore-from": "e2e-kind-ref-ckpt"});
    let restored = cluster.create_pod(restored);
    restored.wait_ready();
    let seen = restored.wait_counting("counter", 2);
    assert!(
        seen[0] > 0 && seen[0] <= after + 1,
        "the checkpoint was taken by count {after} on {from}, the pod restored on {to} counts {seen:?}"
    );
    let pulled = checkpoint.get();
    assert!(
        pulled["status"]["pullNodes"]
            .as_array()
            .is_some_and(|nodes| nodes.iter().any(|n| n == to.as_str())),
        "{pulled}"
    );
    drop(restored);
}

/// An encrypted checkpoint image (spec.storage.image.encryption): the pod's environment — in its
/// memory, its CRI config and its spec — is in the checkpoint on its node and nowhere in the
/// registry's storage. A node without the key does not restore it: the restored pod waits, never
/// started fresh, and the PodCheckpoint says why (event PullFailed). With the key's Secret there
/// (the agent restarted to mount it), the pod is restored on the other worker and counts on.
#[test]
fn an_encrypted_checkpoint_image_leaves_nothing_in_the_clear_and_is_restored_only_with_its_key() {
    let cluster = Cluster::kind();
    let workers = workers(cluster);
    let (from, to) = (&workers[0], &workers[1]);
    let registry = agents_registry(cluster);
    let keys = ["-n", "podsnap-system"];
    let secret = ["secret", "podsnap-checkpoint-keys"];
    cluster.kubectl([&keys[..], &["delete"], &secret[..], &["--ignore-not-found"]].concat());
    let work = tempfile::tempdir().unwrap();
    let identity = work.path().join("identities");
    let keygen = cluster.podsnap(&["keygen", "-o", identity.to_str().unwrap()]);
    assert!(keygen.success(), "{}", keygen.report());
    let public = keygen
        .stderr
        .trim()
        .strip_prefix("Public key: ")
        .unwrap_or_else(|| panic!("podsnap keygen printed {:?}", keygen.stderr))
        .to_owned();

    let marker = "podsnap-e2e-sealed-8d41c7";
    let mut source = counter_pod("e2e-kind-sealed");
    source["spec"]["nodeName"] = json!(from);
    source["spec"]["containers"][0]["env"] = json!([{"name": "E2E_MARKER", "value": marker}]);
    let pod = cluster.create_pod(source);
    pod.wait_ready();
    pod.wait_counting("counter", 3);
    let before = *counts(&pod.logs("counter")).last().unwrap();
    let mut manifest = checkpoint_of("e2e-kind-sealed-ckpt", &pod.name);
    let repository = format!("{registry}/e2e/sealed");
    manifest["spec"]["storage"] = json!({
        "type": "Image",
        "image": {"repository": repository, "encryption": {"recipients": [public]}}
    });
    manifest["spec"]["deletionPolicy"] = json!("Delete");
    let checkpoint = Object::create(cluster, manifest);
    let ready = checkpoint.wait_phase(&["Ready", "Failed"]);
    assert_eq!(ready["status"]["phase"], "Ready", "{ready}");
    let location = cluster
        .checkpoint_dir(&ready["status"])
        .display()
        .to_string();
    let after = *counts(&pod.logs("counter")).last().unwrap();
    drop(pod);
    let shown = cluster.podsnap(&["inspect", "e2e-kind-sealed-ckpt"]);
    let image = ready["status"]["image"]["reference"]
        .as_str()
        .unwrap_or("?");
    assert!(
        shown.success()
            && shown.stdout.contains(image)
            && shown.stdout.contains("encrypted to 1 age key(s)"),
        "{}",
        shown.report()
    );

    // In the clear on its node (memory pages, CRI config, the kubelet's record) ...
    let on_node = cluster.node_exec(from, &["grep", "-rlF", marker, &location]);
    assert!(
        on_node.stdout.contains("pages-") && on_node.stdout.contains("podsnap-manifest.json"),
        "the marker is not where the test expects it in the checkpoint: {}",
        on_node.report()
    );
    // ... and nowhere in the registry's storage.
    // The registry's storage as hack/kind-lib.sh names it.
    let cache = std::env::var("PODSNAP_CACHE").unwrap_or("/var/cache/podsnap".into());
    let storage = match std::env::var("PODSNAP_KIND_CLUSTER").as_deref() {
        Ok(name) if name != "podsnap" => format!("{cache}/kind/registry-{name}"),
        _ => format!("{cache}/kind/registry"),
    };
    let grep = |needle: &str| {
        podsnap_e2e::CommandLine::new("grep")
            .args(["-rlF", needle, &storage])
            .timeout(Duration::from_secs(120))
            .run()
            .unwrap()
    };
    // Where this image is (its manifest names the encryption in the clear): the right storage.
    let control = grep("io.podsnap.checkpoint.encryption");
    assert!(
        control.code == Some(0) && !control.stdout.trim().is_empty(),
        "the image is not in {storage}: {}",
        control.report()
    );
    let in_registry = grep(marker);
    assert_eq!(
        in_registry.code,
        Some(1),
        "the marker is in the clear in the registry (or grep failed): {}",
        in_registry.report()
    );

    // No key on the target: the restored pod waits, and the PodCheckpoint says why.
    let mut restore = restore_of("e2e-kind-sealed-r", "e2e-kind-sealed-ckpt", 1);
    restore["spec"]["nodeName"] = json!(to);
    let restore = Object::create(cluster, restore);
    let refused = wait_for("a PullFailed event", Duration::from_secs(120), || {
        let events = cluster.events("default", "e2e-kind-sealed-ckpt");
        events
            .iter()
            .find(|e| e.starts_with("PullFailed") && e.contains("no decryption key"))
            .cloned()
            .ok_or_else(|| format!("{events:?}"))
    });
    assert!(refused.contains(to.as_str()), "{refused}");
    // ... and so does the PodRestore.
    wait_for(
        "the PodRestore to say why it waits",
        Duration::from_secs(60),
        || {
            let status = restore.get()["status"].clone();
            let said = status["conditions"][0]["message"].as_str().unwrap_or("");
            if status["phase"] == "Restoring"
                && said.contains("checkpoint image not pulled")
                && said.contains("no decryption key")
            {
                Ok(())
            } else {
                Err(status.to_string())
            }
        },
    );
    let waiting = restore.get();
    let name = waiting["status"]["restoredPodName"]
        .as_str()
        .unwrap_or_else(|| panic!("no restored pod named: {waiting}"))
        .to_owned();
    let restored = cluster.existing_pod("default", &name);
    let state = restored.get();
    assert_ne!(state["status"]["phase"], "Running", "{state}");
    let logs = cluster
        .kubectl_try(["logs", &name, "-c", "counter"])
        .unwrap();
    assert!(
        !logs.success() || logs.stdout.trim().is_empty(),
        "the pod started without its checkpoint: {state}\n{}",
        logs.report()
    );

    // The key's Secret, mounted by a restarted agent on the target: restored, counting on.
    let created = cluster.kubectl_try(
        [
            &keys[..],
            &["create", "secret", "generic", "podsnap-checkpoint-keys"],
            &[&format!("--from-file=identities={}", identity.display())],
        ]
        .concat(),
    );
    assert!(created.as_ref().is_ok_and(|f| f.success()), "{created:?}");
    let agent = cluster.kubectl([
        "-n",
        "podsnap-system",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=podsnap-node-agent",
        "--field-selector",
        &format!("spec.nodeName={to}"),
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    cluster.kubectl([
        "-n",
        "podsnap-system",
        "delete",
        "pod",
        agent.trim(),
        "--wait=true",
    ]);
    let done = restore.wait_phase(&["Completed", "Failed"]);
    assert_eq!(done["status"]["phase"], "Completed", "{done}");
    restored.wait_ready();
    let seen = restored.wait_counting("counter", 2);
    assert!(
        seen[0] > before && seen[0] <= after + 1,
        "checkpointed between counts {before} and {after}, restored counting {seen:?}"
    );
    let events = cluster.events("default", "e2e-kind-sealed-ckpt");
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("Pulled") && e.contains(to.as_str())),
        "{events:?}"
    );
    drop(restored);
    drop(restore);
    cluster.kubectl([&keys[..], &["delete"], &secret[..]].concat());
}

/// `podsnap migrate` (the CLI, as a user runs it): a counting pod moves to the other worker through
/// a checkpoint image, counts on from its checkpoint there, and the source pod is deleted once its
/// replacement runs. A migration that cannot push fails, deletes what it created, and leaves the
/// source running.
#[test]
fn podsnap_migrate_moves_a_pod_to_the_other_worker_and_only_then_removes_the_source() {
    let cluster = Cluster::kind();
    let workers = workers(cluster);
    let (from, to) = (&workers[0], &workers[1]);
    let registry = agents_registry(cluster);
    let podsnap = |args: &[&str]| cluster.podsnap(args);
    let mut source = counter_pod("e2e-kind-mig");
    source["spec"]["nodeName"] = json!(from);
    let pod = cluster.create_pod(source);
    pod.wait_ready();
    pod.wait_counting("counter", 3);

    // Through a registry nobody listens on: refused, undone, the source counts on.
    let failed = podsnap(&[
        "migrate",
        "e2e-kind-mig",
        "--image",
        "127.0.0.1:9/e2e/nothing",
        "--to",
        to,
    ]);
    assert!(!failed.success(), "{}", failed.report());
    assert!(
        failed.stderr.contains("the source pod runs on") && failed.stderr.contains("PushFailed"),
        "{}",
        failed.report()
    );
    let left = cluster.kubectl(["get", "podcheckpoints,podrestores", "-o", "name"]);
    assert!(!left.contains("e2e-kind-mig-m-"), "left behind: {left}");
    assert_eq!(pod.get()["status"]["phase"], "Running");

    // A pod with a hostPath volume: refused before anything is created, with the reason.
    let mut pinned = counter_pod("e2e-kind-mig-host");
    pinned["spec"]["nodeName"] = json!(from);
    pinned["spec"]["volumes"] = json!([{"name": "node-data", "hostPath": {"path": "/tmp"}}]);
    let pinned = cluster.create_pod(pinned);
    pinned.wait_ready();
    let refused = podsnap(&[
        "migrate",
        "e2e-kind-mig-host",
        "--image",
        &format!("{registry}/e2e/mig"),
    ]);
    assert!(
        !refused.success() && refused.stderr.contains("\"node-data\" is a hostPath"),
        "{}",
        refused.report()
    );
    let left = cluster.kubectl(["get", "podcheckpoints,podrestores", "-o", "name"]);
    assert!(!left.contains("e2e-kind-mig-host"), "created: {left}");
    drop(pinned);

    let before = *counts(&pod.logs("counter")).last().unwrap();
    let moved = podsnap(&[
        "migrate",
        "e2e-kind-mig",
        "--image",
        &format!("{registry}/e2e/mig"),
        "--to",
        to,
    ]);
    assert!(moved.success(), "{}", moved.report());
    let fields: Vec<&str> = moved.stdout.trim().split('\t').collect();
    assert_eq!(fields.len(), 3, "{}", moved.report());
    let (new_pod, node, checkpoint) = (fields[0], fields[1], fields[2].to_owned());
    assert_eq!(node, to, "{}", moved.report());
    // The downtime, from the source's last output to the replacement's first, and its parts.
    let downtime = moved
        .stderr
        .lines()
        .find(|l| l.starts_with("downtime "))
        .unwrap_or_else(|| panic!("no downtime printed: {}", moved.report()));
    assert!(
        downtime.contains("checkpoint and push") && downtime.contains("restore to running"),
        "{downtime}"
    );
    eprintln!("{downtime}");
    let restored = cluster.existing_pod("default", new_pod);
    assert_eq!(&node_of(&restored), to);
    let seen = restored.wait_counting("counter", 2);
    assert!(
        seen[0] > before,
        "the pod counted {before} before the migration, {seen:?} after: it started fresh"
    );
    wait_for(
        "the source pod to be gone",
        Duration::from_secs(120),
        || {
            let name = cluster.kubectl([
                "get",
                "pod",
                "e2e-kind-mig",
                "--ignore-not-found",
                "-o",
                "name",
            ]);
            if name.trim().is_empty() {
                Ok(())
            } else {
                Err(name)
            }
        },
    );
    drop(restored);
    cluster.kubectl([
        "delete",
        "podrestore,podcheckpoint",
        &checkpoint,
        "--wait=true",
        "--timeout=120s",
    ]);
}

/// `podsnap drain`: the worker is cordoned and its running podsnap pod moves to the other worker
/// (the scheduler's choice: the only schedulable worker left), counting on; a pod of another
/// runtime class is left where it is, for `kubectl drain`.
#[test]
fn podsnap_drain_cordons_a_worker_and_moves_its_podsnap_pods_off_it() {
    let cluster = Cluster::kind();
    let workers = workers(cluster);
    let (from, to) = (workers[0].clone(), workers[1].clone());
    let registry = agents_registry(cluster);
    let podsnap = |args: &[&str]| cluster.podsnap(args);
    // Whatever happens, the worker is schedulable again afterwards.
    struct Uncordon<'c>(&'c Cluster, String);
    impl Drop for Uncordon<'_> {
        fn drop(&mut self) {
            let _ = self.0.kubectl_try(["uncordon", self.1.as_str()]);
        }
    }
    let _uncordon = Uncordon(cluster, from.clone());
    // The control plane is tainted: the other worker is the only place left.
    let mut source = counter_pod("e2e-kind-drain");
    source["spec"]["nodeName"] = json!(from);
    let pod = cluster.create_pod(source);
    let mut plain = counter_pod("e2e-kind-drain-runc");
    plain["spec"]["nodeName"] = json!(from);
    plain["spec"]
        .as_object_mut()
        .unwrap()
        .remove("runtimeClassName");
    let other = cluster.create_pod(plain);
    pod.wait_ready();
    other.wait_ready();
    pod.wait_counting("counter", 3);
    let before = *counts(&pod.logs("counter")).last().unwrap();

    let drained = podsnap(&["drain", &from, "--image", &format!("{registry}/e2e/drain")]);
    assert!(drained.success(), "{}", drained.report());
    let unschedulable =
        cluster.kubectl(["get", "node", &from, "-o", "jsonpath={.spec.unschedulable}"]);
    assert_eq!(unschedulable.trim(), "true");
    let lines: Vec<&str> = drained.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{}", drained.report());
    let fields: Vec<&str> = lines[0].split('\t').collect();
    assert_eq!(fields[0], "default/e2e-kind-drain", "{}", drained.report());
    assert_eq!(fields[2], to, "{}", drained.report());
    let moved = cluster.existing_pod("default", fields[1]);
    let seen = moved.wait_counting("counter", 2);
    assert!(
        seen[0] > before,
        "started fresh: {before} before, {seen:?} after"
    );
    // The runc pod is still there, on the drained node.
    assert_eq!(node_of(&other), from);
    assert_eq!(other.get()["status"]["phase"], "Running");
    drop(moved);
    cluster.kubectl([
        "delete",
        "podrestore,podcheckpoint",
        fields[3],
        "--wait=true",
        "--timeout=120s",
    ]);
}

/// Registry credentials per PodCheckpoint (`spec.storage.image.secretName`), against a private
/// registry (HTTPS signed by its own CA, which the agents trust through the ConfigMap
/// podsnap-registry-ca) that takes only its one user: anonymous, the push is refused (the
/// registry does ask); naming
/// a Secret that does not exist fails the checkpoint, naming it; naming the user's Secret, the
/// controller copies its one entry for that registry (not the Secret's other entries) into
/// podsnap-system, the source node's agent pushes with it, the other worker's agent pulls with it,
/// and the pod counts on there. The copy goes with its PodCheckpoint.
#[test]
fn a_checkpoint_naming_a_registry_secret_is_pushed_and_pulled_with_its_credentials() {
    let cluster = Cluster::kind();
    let workers = workers(cluster);
    let (from, to) = (&workers[0], &workers[1]);
    let registry = private_registry(cluster);
    let repository = format!("{registry}/e2e/private");
    let mut source = counter_pod("e2e-kind-cred");
    source["spec"]["nodeName"] = json!(from);
    let pod = cluster.create_pod(source);
    pod.wait_ready();
    pod.wait_counting("counter", 2);
    let checkpoint_with = |name: &str, secret: Option<&str>| {
        let mut manifest = checkpoint_of(name, &pod.name);
        manifest["spec"]["storage"] = json!({"type": "Image", "image": {"repository": repository}});
        if let Some(secret) = secret {
            manifest["spec"]["storage"]["image"]["secretName"] = json!(secret);
        }
        manifest["spec"]["deletionPolicy"] = json!("Delete");
        Object::create(cluster, manifest)
    };

    // Anonymous: the registry refuses the push.
    let anonymous = checkpoint_with("e2e-kind-cred-anon", None);
    let failed = anonymous.wait_phase(&["Ready", "Failed"]);
    assert_eq!(failed["status"]["phase"], "Failed", "{failed}");
    assert_eq!(failed["status"]["reason"], "PushFailed", "{failed}");
    drop(anonymous);

    // A Secret that does not exist: failed, naming it (before the checkpoint if the controller
    // sees it first, else by the agent instead of pushing).
    let missing = checkpoint_with("e2e-kind-cred-missing", Some("e2e-no-such-secret"));
    let failed = missing.wait_phase(&["Ready", "Failed"]);
    assert_eq!(failed["status"]["phase"], "Failed", "{failed}");
    assert!(
        failed["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains(
                "Secret default/e2e-no-such-secret (spec.storage.image.secretName) does not exist"
            ),
        "{failed}"
    );
    drop(missing);

    // The user's Secret, with an entry for another registry too.
    let config = json!({"auths": {
        registry.clone(): {"username": "podsnap", "password": "s3cret:with-colon"},
        "elsewhere.example": {"username": "other", "password": "e2e-not-for-this-registry"},
    }});
    cluster.apply(&json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "e2e-kind-regcred", "namespace": "default"},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": config.to_string()},
    }));
    struct SecretGone<'c>(&'c Cluster);
    impl Drop for SecretGone<'_> {
        fn drop(&mut self) {
            let _ =
                self.0
                    .kubectl_try(["delete", "secret", "e2e-kind-regcred", "--ignore-not-found"]);
        }
    }
    let _secret = SecretGone(cluster);
    let checkpoint = checkpoint_with("e2e-kind-cred-ckpt", Some("e2e-kind-regcred"));
    let ready = checkpoint.wait_phase(&["Ready", "Failed"]);
    assert_eq!(ready["status"]["phase"], "Ready", "{ready}");
    let image = ready["status"]["image"]["reference"]
        .as_str()
        .unwrap_or_default();
    assert!(
        image.starts_with(&format!("{repository}@sha256:")),
        "{ready}"
    );
    let after = *counts(&pod.logs("counter")).last().unwrap();
    let copy_name = format!(
        "podsnap-registry-{}",
        ready["metadata"]["uid"].as_str().unwrap()
    );
    let copy: Value = serde_json::from_str(&cluster.kubectl([
        "-n",
        "podsnap-system",
        "get",
        "secret",
        &copy_name,
        "-o",
        "json",
    ]))
    .unwrap();
    let copied = copy["data"][".dockerconfigjson"]
        .as_str()
        .unwrap_or_default();
    let copied = String::from_utf8(
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, copied).unwrap(),
    )
    .unwrap();
    assert!(
        copied.contains(&registry) && !copied.contains("elsewhere"),
        "{copied}"
    );
    drop(pod);

    let mut restore = restore_of("e2e-kind-cred-r", "e2e-kind-cred-ckpt", 1);
    restore["spec"]["nodeName"] = json!(to);
    let restore = Object::create(cluster, restore);
    let done = restore.wait_phase(&["Completed", "Failed"]);
    assert_eq!(done["status"]["phase"], "Completed", "{done}");
    let restored = restored_pod(cluster, &done);
    restored.wait_ready();
    assert_eq!(&node_of(&restored), to);
    let seen = restored.wait_counting("counter", 2);
    assert!(
        seen[0] > 0 && seen[0] <= after + 1,
        "checkpointed by count {after}, restored on {to} counting {seen:?}"
    );
    drop(restored);
    drop(restore);
    drop(checkpoint);
    wait_for(
        "the copy of the registry credentials to go with its PodCheckpoint",
        Duration::from_secs(90),
        || {
            let left = cluster.kubectl([
                "-n",
                "podsnap-system",
                "get",
                "secret",
                &copy_name,
                "--ignore-not-found",
                "-o",
                "name",
            ]);
            if left.trim().is_empty() {
                Ok(())
            } else {
                Err(left)
            }
        },
    );
}

/// A PodMigration: the controller does what `podsnap migrate` does. Through a registry nobody
/// listens on it fails (the checkpoint's push failed), deletes what it created, and the source
/// runs on; a pod with a hostPath volume is refused before anything is created; through the
/// cluster's registry the pod moves to the other worker and counts on there, and the source is
/// deleted only then.
#[test]
fn a_pod_migration_moves_a_pod_to_the_other_worker_or_leaves_it_running() {
    let cluster = Cluster::kind();
    let workers = workers(cluster);
    let (from, to) = (&workers[0], &workers[1]);
    let registry = agents_registry(cluster);
    let mut source = counter_pod("e2e-kind-pmig");
    source["spec"]["nodeName"] = json!(from);
    let pod = cluster.create_pod(source);
    pod.wait_ready();
    pod.wait_counting("counter", 3);
    let migration = |name: &str, pod: &str, repository: &str| {
        json!({
            "apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodMigration",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"podName": pod, "targetNodeName": to, "image": {"repository": repository}}
        })
    };
    let left_of = |name: &str| {
        let all = cluster.kubectl(["get", "podcheckpoints,podrestores", "-o", "name"]);
        all.lines()
            .filter(|l| l.ends_with(&format!("/{name}")))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };

    // Through a registry nobody listens on: Failed, undone, the source counts on.
    let failing = Object::create(
        cluster,
        migration(
            "e2e-kind-pmig-fail",
            "e2e-kind-pmig",
            "127.0.0.1:9/e2e/nothing",
        ),
    );
    let failed = failing.wait_phase(&["Succeeded", "Failed"]);
    assert_eq!(failed["status"]["phase"], "Failed", "{failed}");
    assert_eq!(failed["status"]["reason"], "CheckpointFailed", "{failed}");
    let message = failed["status"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("PushFailed") && message.contains("the source pod runs on"),
        "{failed}"
    );
    wait_for(
        "the failed migration's PodCheckpoint to go",
        Duration::from_secs(60),
        || {
            let left = left_of("e2e-kind-pmig-fail");
            if left.is_empty() {
                Ok(())
            } else {
                Err(left.join(" "))
            }
        },
    );
    assert_eq!(pod.get()["status"]["phase"], "Running");
    drop(failing);

    // A pod with a hostPath volume: refused, nothing created.
    let mut pinned = counter_pod("e2e-kind-pmig-host");
    pinned["spec"]["nodeName"] = json!(from);
    pinned["spec"]["volumes"] = json!([{"name": "node-data", "hostPath": {"path": "/tmp"}}]);
    let pinned = cluster.create_pod(pinned);
    pinned.wait_ready();
    let refusing = Object::create(
        cluster,
        migration(
            "e2e-kind-pmig-host",
            "e2e-kind-pmig-host",
            &format!("{registry}/e2e/pmig"),
        ),
    );
    let refused = refusing.wait_phase(&["Succeeded", "Failed"]);
    assert_eq!(refused["status"]["reason"], "Unmovable", "{refused}");
    assert!(
        refused["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("\"node-data\" is a hostPath"),
        "{refused}"
    );
    assert!(left_of("e2e-kind-pmig-host").is_empty());
    drop(refusing);
    drop(pinned);

    // Moved.
    let before = *counts(&pod.logs("counter")).last().unwrap();
    let moving = Object::create(
        cluster,
        migration(
            "e2e-kind-pmig-move",
            "e2e-kind-pmig",
            &format!("{registry}/e2e/pmig"),
        ),
    );
    struct RestoreGone<'c>(&'c Cluster);
    impl Drop for RestoreGone<'_> {
        fn drop(&mut self) {
            let _ = self.0.kubectl_try([
                "delete",
                "podrestore",
                "e2e-kind-pmig-move",
                "--ignore-not-found",
            ]);
        }
    }
    let _restore = RestoreGone(cluster);
    let done = moving.wait_phase(&["Succeeded", "Failed"]);
    assert_eq!(done["status"]["phase"], "Succeeded", "{done}");
    assert_eq!(done["status"]["targetNodeName"], to.as_str(), "{done}");
    assert_eq!(done["status"]["sourceNodeName"], from.as_str(), "{done}");
    let restored_name = done["status"]["restoredPodName"]
        .as_str()
        .unwrap_or_default();
    let restored = cluster.existing_pod("default", restored_name);
    restored.wait_ready();
    assert_eq!(&node_of(&restored), to);
    let seen = restored.wait_counting("counter", 2);
    assert!(
        seen[0] > before,
        "checkpointed after count {before}, the moved pod counts {seen:?}"
    );
    wait_for(
        "the source pod to be deleted",
        Duration::from_secs(60),
        || {
            let there = cluster.kubectl([
                "get",
                "pod",
                "e2e-kind-pmig",
                "--ignore-not-found",
                "-o",
                "name",
            ]);
            if there.trim().is_empty() {
                Ok(())
            } else {
                Err(there)
            }
        },
    );
    drop(pod);
}

/// Who may name a registry Secret, and who may migrate: a checkpointer who may not read a
/// Secret cannot have a PodCheckpoint push with it (podsnap-registry-secret), and one who may
/// create PodMigrations but not restore, create pods or delete the pod cannot have the
/// controller do it for them (podsnap-migrate). Server-side dry runs: admission runs, nothing
/// is created.
#[test]
fn naming_a_registry_secret_and_migrating_take_the_rights_they_use() {
    let cluster = Cluster::kind();
    let user = "e2e-kind-mover";
    let bind = |role: &str| {
        cluster.apply(&json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": format!("e2e-kind-mover-{role}"), "namespace": "default"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
        }));
    };
    struct Unbind<'c>(&'c Cluster);
    impl Drop for Unbind<'_> {
        fn drop(&mut self) {
            for role in ["podsnap-checkpointer", "podsnap-migrator"] {
                let _ = self.0.kubectl_try([
                    "delete",
                    "rolebinding",
                    &format!("e2e-kind-mover-{role}"),
                    "--ignore-not-found",
                ]);
            }
        }
    }
    let _unbind = Unbind(cluster);
    bind("podsnap-checkpointer");
    bind("podsnap-migrator");
    let create_as_user = |manifest: Value| {
        cluster
            .kubectl_command([
                "create",
                "--dry-run=server",
                "-f",
                "-",
                &format!("--as={user}"),
            ])
            .input(manifest.to_string())
            .run()
            .unwrap()
    };
    let image = |secret: Option<&str>| {
        let mut image = json!({"repository": "registry.example/team/web"});
        if let Some(secret) = secret {
            image["secretName"] = json!(secret);
        }
        image
    };
    let mut plain = checkpoint_of("e2e-kind-mover-ckpt", "web");
    plain["spec"]["storage"] = json!({"type": "Image", "image": image(None)});
    let allowed = wait_for(
        "the checkpointer binding to take effect",
        Duration::from_secs(30),
        || {
            let f = create_as_user(plain.clone());
            if f.success() { Ok(f) } else { Err(f.report()) }
        },
    );
    assert!(allowed.success());
    let mut naming = plain.clone();
    naming["spec"]["storage"]["image"] = image(Some("regcred"));
    let refused = create_as_user(naming);
    assert!(
        !refused.success() && refused.stderr.contains("may not read Secret regcred"),
        "{}",
        refused.report()
    );
    let refused = create_as_user(json!({
        "apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodMigration",
        "metadata": {"name": "e2e-kind-mover-mig", "namespace": "default"},
        "spec": {"podName": "web", "image": image(None)}
    }));
    assert!(
        !refused.success()
            && refused
                .stderr
                .contains("may not restore PodCheckpoint e2e-kind-mover-mig"),
        "{}",
        refused.report()
    );
}

/// Cancelling a push: a PodCheckpoint deleted while its node's agent pushes to a registry that
/// never answers (a listener on the worker that reads and says nothing) is gone within seconds,
/// its data on the node removed, rather than after the registry client's timeouts and retries
/// (minutes); the source pod runs on.
#[test]
fn a_checkpoint_deleted_while_its_push_hangs_goes_at_once_and_leaves_nothing() {
    let cluster = Cluster::kind();
    let worker = workers(cluster).remove(0);
    let silent = cluster.create_pod(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "e2e-kind-silent-registry", "namespace": "default"},
        "spec": {
            "nodeName": worker, "hostNetwork": true, "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "listen", "image": COUNTER_IMAGE, "command": [
                // nc's input is a FIFO nobody writes: it neither answers nor closes.
                "sh", "-c", "mkfifo /tmp/f; exec 3<>/tmp/f; while true; do nc -l -p 5999 <&3 > /dev/null; done"
            ]}]
        }
    }));
    silent.wait_ready();
    let pod = cluster.create_pod(counter_on("e2e-kind-hang", &worker));
    pod.wait_ready();
    let mut manifest = checkpoint_of("e2e-kind-hang-ckpt", &pod.name);
    manifest["spec"]["storage"] =
        json!({"type": "Image", "image": {"repository": "127.0.0.1:5999/e2e/hang"}});
    manifest["spec"]["deletionPolicy"] = json!("Delete");
    let checkpoint = Object::create(cluster, manifest);
    let pushing = wait_for(
        "the checkpoint to be taken and pushed",
        Duration::from_secs(120),
        || {
            let object = checkpoint.get();
            if object["status"]["reason"] == "Pushing" {
                Ok(object)
            } else {
                Err(object["status"].to_string())
            }
        },
    );
    let location = cluster
        .checkpoint_dir(&pushing["status"])
        .display()
        .to_string();
    // The registry says nothing: the push hangs.
    std::thread::sleep(Duration::from_secs(3));
    let still = checkpoint.get();
    assert_eq!(still["status"]["reason"], "Pushing", "{still}");
    let started = std::time::Instant::now();
    let deleted = cluster
        .kubectl_try([
            "delete",
            "podcheckpoint",
            "e2e-kind-hang-ckpt",
            "--wait=true",
            "--timeout=45s",
        ])
        .unwrap();
    assert!(
        deleted.success() && started.elapsed() < Duration::from_secs(30),
        "deleting a PodCheckpoint whose push hangs took {:?}: {}",
        started.elapsed(),
        deleted.report()
    );
    let there = cluster
        .node_exec(&worker, &["test", "-e", &location])
        .success();
    assert!(!there, "{location} is still on {worker}");
    pod.wait_counting("counter", 2);
    drop(silent);
}

/// A PodCheckpoint whose image cannot be pushed (a registry nobody listens on) fails with the
/// push's reason, and its data on the node is removed: nothing Ready that cannot be restored
/// elsewhere, nothing left behind.
#[test]
fn a_checkpoint_that_cannot_be_pushed_fails_and_leaves_nothing_on_its_node() {
    let cluster = Cluster::kind();
    let worker = workers(cluster).remove(0);
    let pod = cluster.create_pod(counter_on("e2e-kind-nopush", &worker));
    pod.wait_ready();
    let mut manifest = checkpoint_of("e2e-kind-nopush-ckpt", &pod.name);
    // Port 9 (discard): nothing answers there.
    manifest["spec"]["storage"] =
        json!({"type": "Image", "image": {"repository": "127.0.0.1:9/e2e/nothing"}});
    let checkpoint = Object::create(cluster, manifest);
    let failed = checkpoint.wait_phase(&["Ready", "Failed"]);
    assert_eq!(failed["status"]["phase"], "Failed", "{failed}");
    assert_eq!(failed["status"]["reason"], "PushFailed", "{failed}");
    assert!(
        failed["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("127.0.0.1:9"),
        "{failed}"
    );
    let location = cluster
        .checkpoint_dir(&failed["status"])
        .display()
        .to_string();
    wait_for(
        "the failed checkpoint's data to be removed",
        Duration::from_secs(60),
        || {
            let there = cluster
                .node_exec(&worker, &["test", "-e", &location])
                .success();
            if there { Err(location.clone()) } else { Ok(()) }
        },
    );
    // The source pod ran on, untouched.
    pod.wait_counting("counter", 2);
}

/// The seed's two YAML documents, verbatim, with its `my-pod` running: the checkpoint is Ready,
/// the restored pod counts on.
#[test]
fn seed_demo_on_kind() {
    let cluster = Cluster::kind();
    let pod = cluster.create_pod(counter_pod("my-pod"));
    pod.wait_ready();
    pod.wait_counting("counter", 3);
    let checkpoint = Object::create(cluster, cluster.example("seed-podcheckpoint.yaml"));
    let ready = checkpoint.wait_phase(&["Ready", "Failed"]);
    assert_eq!(ready["status"]["phase"], "Ready", "{ready}");
    assert_eq!(
        ready["status"]["nodeName"].as_str(),
        Some(node_of(&pod).as_str())
    );
    let restore = Object::create(cluster, cluster.example("seed-podrestore.yaml"));
    let done = restore.wait_phase(&["Completed", "Failed"]);
    assert_eq!(done["status"]["phase"], "Completed", "{done}");
    let restored = restored_pod(cluster, &done);
    restored.wait_ready();
    // Containers come from the checkpoint (the template's `app` is ignored on restore).
    let seen = restored.wait_counting("counter", 2);
    assert!(seen[0] > 0, "the restored pod started fresh: {seen:?}");
}

/// Warm start: three replicas from one checkpoint, each counting on from the checkpoint, on the
/// checkpoint's node (a node-local checkpoint pins its restores there).
#[test]
fn warm_start_of_three_replicas_on_the_checkpoints_node() {
    let cluster = Cluster::kind();
    let worker = workers(cluster).pop().unwrap();
    let pod = cluster.create_pod(counter_on("e2e-kind-warm", &worker));
    pod.wait_ready();
    pod.wait_counting("counter", 3);
    let _checkpoint = checkpoint_on(cluster, "e2e-kind-warm-ckpt", &pod.name, &worker);
    let restore = Object::create(
        cluster,
        restore_of("e2e-kind-warm", "e2e-kind-warm-ckpt", 3),
    );
    let done = restore.wait_phase(&["Completed", "Failed"]);
    assert_eq!(done["status"]["phase"], "Completed", "{done}");
    let names: Vec<String> =
        serde_json::from_value(done["status"]["restoredPodNames"].clone()).unwrap();
    assert_eq!(names.len(), 3, "{done}");
    for name in &names {
        let replica = cluster.existing_pod("default", name);
        replica.wait_ready();
        assert_eq!(node_of(&replica), worker);
        let seen = replica.wait_counting("counter", 2);
        assert!(seen[0] > 0, "{name} started fresh: {seen:?}");
    }
}

/// Warm start from a checkpoint image: three replicas restored from one PodCheckpoint, scheduled
/// as the pod's spec says (here a topology spread over the workers), land on both workers, each
/// pulled there and counting on from the checkpoint.
#[test]
fn warm_start_of_three_replicas_from_an_image_spreads_over_both_workers() {
    let cluster = Cluster::kind();
    let workers = workers(cluster);
    let registry = agents_registry(cluster);
    let mut source = counter_pod("e2e-kind-spread");
    source["metadata"]["labels"] = json!({"app": "e2e-kind-spread"});
    source["spec"]["nodeName"] = json!(&workers[0]);
    source["spec"]["topologySpreadConstraints"] = json!([{
        "maxSkew": 1,
        "topologyKey": "kubernetes.io/hostname",
        "whenUnsatisfiable": "DoNotSchedule",
        "nodeTaintsPolicy": "Honor",
        "labelSelector": {"matchLabels": {"app": "e2e-kind-spread"}}
    }]);
    let pod = cluster.create_pod(source);
    pod.wait_ready();
    pod.wait_counting("counter", 3);
    let before = *counts(&pod.logs("counter")).last().unwrap();
    let mut manifest = checkpoint_of("e2e-kind-spread-ckpt", &pod.name);
    manifest["spec"]["storage"] =
        json!({"type": "Image", "image": {"repository": format!("{registry}/e2e/spread")}});
    manifest["spec"]["deletionPolicy"] = json!("Delete");
    let checkpoint = Object::create(cluster, manifest);
    let ready = checkpoint.wait_phase(&["Ready", "Failed"]);
    assert_eq!(ready["status"]["phase"], "Ready", "{ready}");
    drop(pod);
    let restore = Object::create(
        cluster,
        restore_of("e2e-kind-spread", "e2e-kind-spread-ckpt", 3),
    );
    let done = restore.wait_phase(&["Completed", "Failed"]);
    assert_eq!(done["status"]["phase"], "Completed", "{done}");
    let names: Vec<String> =
        serde_json::from_value(done["status"]["restoredPodNames"].clone()).unwrap();
    assert_eq!(names.len(), 3, "{done}");
    let mut nodes = std::collections::BTreeSet::new();
    for name in &names {
        let replica = cluster.existing_pod("default", name);
        replica.wait_ready();
        nodes.insert(node_of(&replica));
        let seen = replica.wait_counting("counter", 2);
        assert!(
            seen[0] > before,
            "{name} started fresh: it counts {seen:?}, the source counted {before} before its checkpoint"
        );
    }
    assert_eq!(
        nodes,
        workers.iter().cloned().collect(),
        "the replicas were not spread over the workers"
    );
    let pulled = checkpoint.get();
    let pull_nodes: std::collections::BTreeSet<String> =
        serde_json::from_value(pulled["status"]["pullNodes"].clone()).unwrap_or_default();
    assert!(pull_nodes.is_superset(&nodes), "{pulled}");
    drop(restore);
}

/// Who may checkpoint and who may restore are separate permissions, in the deployed RBAC.
#[test]
fn restoring_needs_the_restorer_role() {
    let cluster = Cluster::kind();
    let user = "e2e-kind-checkpointer";
    let binding = |name: &str, role: &str| {
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": "default"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
        })
    };
    let unbind = || {
        for name in [
            "e2e-kind-checkpointer",
            "e2e-kind-restorer",
            "e2e-kind-editor",
        ] {
            cluster.kubectl([
                "-n",
                "default",
                "delete",
                "rolebinding",
                name,
                "--ignore-not-found",
            ]);
        }
    };
    // A failed run may have left them.
    unbind();
    cluster.apply(&binding("e2e-kind-checkpointer", "podsnap-checkpointer"));
    let as_user = |args: &[&str]| {
        let mut all = args.to_vec();
        let who = format!("--as={user}");
        all.push(&who);
        cluster
            .kubectl_command(all)
            .input(restore_of("e2e-kind-rbac", "any", 1).to_string())
            .run()
            .unwrap()
    };
    let checkpoint = as_user(&["auth", "can-i", "create", "podcheckpoints"]);
    assert_eq!(checkpoint.stdout.trim(), "yes", "{}", checkpoint.report());
    let refused = as_user(&["create", "--dry-run=server", "-f", "-"]);
    assert!(
        !refused.success() && refused.stderr.contains("forbidden"),
        "a checkpointer created a PodRestore:\n{}",
        refused.report()
    );
    cluster.apply(&binding("e2e-kind-restorer", "podsnap-restorer"));
    // A PodRestore creates pods: its creator must be able to create them too.
    let no_pods = wait_for(
        "the restorer binding to take effect",
        Duration::from_secs(30),
        || {
            let f = as_user(&["create", "--dry-run=server", "-f", "-"]);
            if f.stderr.contains("may not create pods") {
                Ok(f)
            } else {
                Err(f.report())
            }
        },
    );
    assert!(!no_pods.success(), "{}", no_pods.report());
    cluster.apply(&binding("e2e-kind-editor", "edit"));
    let allowed = wait_for(
        "the edit binding to take effect",
        Duration::from_secs(30),
        || {
            let f = as_user(&["create", "--dry-run=server", "-f", "-"]);
            if f.success() { Ok(f) } else { Err(f.report()) }
        },
    );
    assert!(allowed.success());
    unbind();
}

/// The node agent (DaemonSet) removes a deleted checkpoint's data on its node, and only then
/// lets the PodCheckpoint go (deletion policy Delete).
#[test]
fn the_node_agent_removes_a_deleted_checkpoints_data_on_its_worker() {
    let cluster = Cluster::kind();
    let worker = workers(cluster).remove(0);
    let pod = cluster.create_pod(counter_on("e2e-kind-gc", &worker));
    pod.wait_ready();
    let mut manifest = checkpoint_of("e2e-kind-gc-ckpt", &pod.name);
    manifest["spec"]["deletionPolicy"] = json!("Delete");
    let checkpoint = Object::create(cluster, manifest);
    let ready = checkpoint.wait_phase(&["Ready", "Failed"]);
    assert_eq!(ready["status"]["phase"], "Ready", "{ready}");
    assert_eq!(ready["status"]["nodeName"].as_str(), Some(worker.as_str()));
    let location = cluster
        .checkpoint_dir(&ready["status"])
        .display()
        .to_string();
    let exists = |path: &str| cluster.node_exec(&worker, &["test", "-e", path]).success();
    let record = format!("{location}.kubelet.json");
    assert!(exists(&location), "{location} is not on {worker}");
    assert!(exists(&record), "{record} is not on {worker}");
    wait_for("the node-data finalizer", Duration::from_secs(30), || {
        let f = checkpoint.get()["metadata"]["finalizers"].to_string();
        if f.contains("checkpoint.k8s.io/node-data") {
            Ok(())
        } else {
            Err(f)
        }
    });
    cluster.kubectl([
        "delete",
        "podcheckpoint",
        "e2e-kind-gc-ckpt",
        "--wait=true",
        "--timeout=120s",
    ]);
    assert!(!exists(&location), "{location} is still on {worker}");
    assert!(!exists(&record), "{record} is still on {worker}");
}

/// A restore of a checkpoint that does not exist fails with a reason and creates no pod.
#[test]
fn a_restore_of_a_missing_checkpoint_fails_and_creates_no_pod() {
    let cluster = Cluster::kind();
    let restore = Object::create(
        cluster,
        restore_of("e2e-kind-missing", "e2e-kind-no-such-checkpoint", 1),
    );
    let failed = restore.wait_phase(&["Failed", "Completed"]);
    assert_eq!(failed["status"]["phase"], "Failed", "{failed}");
    assert_eq!(failed["status"]["reason"], "CheckpointNotFound", "{failed}");
    assert!(
        failed["status"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("e2e-kind-no-such-checkpoint"),
        "{failed}"
    );
    let pods = cluster.kubectl(["get", "pods", "-o", "name"]);
    assert!(!pods.contains("e2e-kind-missing"), "{pods}");
}

/// kind-up refuses what it cannot do with a clear error, before it builds or changes anything:
/// a cluster of the same name with another number of nodes, a number of nodes that is not one.
#[test]
fn kind_up_refuses_a_stale_cluster_and_bad_arguments_and_changes_nothing() {
    use podsnap_e2e::command::CommandLine;
    let cluster = Cluster::kind();
    let nodes = cluster.nodes();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/kind-up.sh");
    let kind_up = |args: &[&str]| {
        CommandLine::new("bash")
            .arg(&script)
            .args(args)
            .timeout(Duration::from_secs(300))
            .run()
            .unwrap()
    };
    let other = (nodes.len() + 1).to_string();
    for (args, error) in [
        (
            vec!["--nodes", other.as_str()],
            "exists but is not the one asked for",
        ),
        (vec!["--nodes", "zero"], "--nodes wants a number of nodes"),
        (vec!["--no-such-flag"], "usage: hack/kind-up.sh"),
    ] {
        let refused = kind_up(&args);
        assert!(
            !refused.success() && refused.stderr.contains(error),
            "kind-up {args:?}:\n{}",
            refused.report()
        );
    }
    assert_eq!(cluster.nodes(), nodes, "kind-up changed the cluster");
}

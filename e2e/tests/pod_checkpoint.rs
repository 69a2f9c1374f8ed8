//! Pod checkpoint and restore through podsnapd (CRI `CheckpointPod`/`RestorePod`) with the
//! `podsnap` CLI: a two-container pod checkpointed (leaving it serving) and restored three times
//! as independent replicas; a pod-wide consistent cut; every refused input; a deadline that
//! expires mid-dump; a pod resumed at its old address (`podsnap.io/keep-ip`); a pod with a user
//! namespace of its own restored into the new pod's (`hostUsers: false`); a connection not yet
//! accepted when the pod is checkpointed, kept by the pod and not failing its checkpoint; a
//! restored container in its own cgroup under the new config's memory limit. Run with
//! `cargo test -p podsnap-e2e -- --test-threads=1` against a node from `hack/node-up.sh` (which
//! starts podsnapd).

#![forbid(unsafe_code)]

use std::time::Duration;

use podsnap_e2e::cri_workspace::{
    Cri, HogPod, Stopped, Workspace, assert_refused, assert_status, container_named, file_in,
    freezer_state, node_run, pod_ids, podsnap, restore_configs, restore_created, restored_pod, sh,
    unique, wait_empty,
};
use podsnap_e2e::{BUSYBOX, CommandLine, Handler, Node, wait_for};
use serde_json::{Value, json};

const LIVENESS: Duration = Duration::from_secs(60);

fn pod_ip(pod: &str) -> String {
    Node::get().inspect_pod(pod)["status"]["network"]["ip"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn counts(node: &Node, container: &str) -> Vec<u64> {
    let out = node.crictl_try(["logs", container]);
    (out.stdout + &out.stderr)
        .lines()
        .filter_map(|l| l.strip_prefix("count=").and_then(|n| n.trim().parse().ok()))
        .collect()
}

fn http_get(ip: &str, path: &str) -> Result<String, String> {
    http_get_at(ip, 8080, path)
}

fn http_get_at(ip: &str, port: u16, path: &str) -> Result<String, String> {
    let out = CommandLine::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://{ip}:{port}/{path}"),
        ])
        .timeout(Duration::from_secs(15))
        .run()
        .map_err(|e| e.to_string())?;
    if out.success() {
        Ok(out.stdout)
    } else {
        Err(out.report())
    }
}

#[test]
fn podsnap_two_container_pod_is_checkpointed_serving_and_restored_as_three_independent_replicas() {
    let node = Node::get();
    let mut ws = Workspace::new("replicas");
    let data = ws.path("emptydir");
    std::fs::create_dir(&data).unwrap();
    let page = unique("page");
    let layer = unique("layer");
    let mounts = json!([{"container_path": "/data", "host_path": data}]);
    let counter = ws.container_config(
        "counter",
        sh(&format!(
            "echo {page} > /data/index.html; echo {layer} > /layer.txt; i=0; \
             while true; do i=$((i+1)); echo count=$i; sleep 0.2; done"
        )),
        mounts.clone(),
    );
    let web = ws.container_config("web", sh("exec httpd -f -p 8080 -h /data"), mounts);
    let source_config = ws.pod_config(&unique("source"));
    let source = ws.run_pod(Handler::Podsnap, &source_config);
    let counter_id = ws.run_container(&source, &counter, &source_config);
    let web_id = ws.run_container(&source, &web, &source_config);
    let source_ip = pod_ip(&source);
    wait_for("the source pod to serve and count", LIVENESS, || {
        let served = http_get(&source_ip, "index.html")?;
        let n = counts(node, &counter_id).last().copied().unwrap_or(0);
        if served.contains(&page) && n >= 5 {
            Ok(())
        } else {
            Err(format!("served {served:?}, count {n}"))
        }
    });

    let checkpoint = ws.checkpoint_dir("checkpoint");
    let before = counts(node, &counter_id).last().copied().unwrap();
    let out = podsnap(&["pod", "checkpoint", &source, checkpoint.to_str().unwrap()]);
    assert!(
        out.success(),
        "{}\n{}",
        out.report(),
        node.log_excerpt(&[&source])
    );
    // Leave-running (the default): the source goes on serving and counting.
    assert!(http_get(&source_ip, "index.html").unwrap().contains(&page));
    let after = counts(node, &counter_id).last().copied().unwrap();
    wait_for("the source to count on", LIVENESS, || {
        let n = counts(node, &counter_id).last().copied().unwrap_or(0);
        if n > after + 2 {
            Ok(())
        } else {
            Err(format!("count {n}"))
        }
    });
    assert!(checkpoint.join("podsnap-manifest.json").exists());
    for name in ["counter", "web"] {
        for file in [
            "checkpoint/inventory.img",
            "rootfs-diff.tar",
            "deleted.files",
            "config.dump",
            "spec.dump",
        ] {
            assert!(
                checkpoint.join(name).join(file).exists(),
                "{name}/{file} missing"
            );
        }
    }
    let _ = web_id;
    ws.remove_pod(&source);

    let mut ips = vec![source_ip];
    let mut replicas = Vec::new();
    for n in 0..3 {
        let config = ws.pod_config(&unique(&format!("replica{n}")));
        let pod = ws.restore_started(&checkpoint, &config, &[&counter, &web]);
        let ip = pod_ip(&pod);
        assert!(
            !ip.is_empty() && !ips.contains(&ip),
            "replica {n} IP {ip:?} is not its own: {ips:?}"
        );
        ips.push(ip.clone());
        let counter = container_named(node, &pod, "counter");
        wait_for(
            format_args!("replica {n} to serve and count on"),
            LIVENESS,
            || {
                let served = http_get(&ip, "index.html")?;
                let seen = counts(node, &counter);
                let first = seen.first().copied().unwrap_or(0);
                if served.contains(&page) && seen.len() >= 3 {
                    Ok(first)
                } else {
                    Err(format!("served {served:?}, counts {seen:?}"))
                }
            },
        );
        let first = counts(node, &counter)[0];
        assert!(
            first > before,
            "replica {n} counted from {first}, not on from {before}"
        );
        let exec = node.crictl(["exec", &counter, "cat", "/layer.txt"]);
        assert_eq!(
            exec.trim(),
            layer,
            "replica {n} lost the file written before the checkpoint"
        );
        replicas.push(pod);
    }
    for pod in replicas {
        ws.remove_pod(&pod);
    }
}

#[test]
fn podsnap_pod_checkpoint_is_one_cut_across_containers_so_a_shared_sequence_has_no_gap() {
    let node = Node::get();
    let mut ws = Workspace::new("cut");
    let data = ws.path("emptydir");
    std::fs::create_dir(&data).unwrap();
    let mounts = json!([{"container_path": "/data", "host_path": data}]);
    // Both containers append the next number of one sequence, taking turns through a lock.
    // The counter file is replaced atomically (write, then rename). With an in-place write
    // (`echo $n > seq`) one CI dry run saw the sequence restart at 1 right after the cut, i.e.
    // the restored pod read an empty counter file; that is recorded in the README's known issues.
    let writer = |who: &str| {
        format!(
            "while true; do \
               if mkdir /data/lock 2>/dev/null; then \
                 n=$(cat /data/seq 2>/dev/null || echo 0); n=$((n+1)); \
                 echo $n > /data/seq.new; mv /data/seq.new /data/seq; \
                 echo \"$n {who}\" >> /data/trace; rmdir /data/lock; \
               fi; \
             done"
        )
    };
    let a = ws.container_config("a", sh(&writer("a")), mounts.clone());
    let b = ws.container_config("b", sh(&writer("b")), mounts);
    let config = ws.pod_config(&unique("cut"));
    let pod = ws.run_pod(Handler::Podsnap, &config);
    ws.run_container(&pod, &a, &config);
    ws.run_container(&pod, &b, &config);
    wait_for("both writers to write", LIVENESS, || {
        let trace = std::fs::read_to_string(data.join("trace")).unwrap_or_default();
        if trace.contains(" a\n") && trace.contains(" b\n") && trace.lines().count() > 200 {
            Ok(())
        } else {
            Err(format!("{} lines", trace.lines().count()))
        }
    });
    let checkpoint = ws.checkpoint_dir("checkpoint");
    // Stop the pod with the checkpoint: nothing may touch the shared files between the cut
    // and the restore.
    let out = podsnap(&[
        "pod",
        "checkpoint",
        &pod,
        checkpoint.to_str().unwrap(),
        "--option",
        "podsnap.io/leave-running=false",
    ]);
    assert!(out.success(), "{}", out.report());
    wait_for("the checkpointed containers to stop", LIVENESS, || {
        let running = node.crictl(["ps", "-q", "--pod", &pod]);
        if running.trim().is_empty() {
            Ok(())
        } else {
            Err(running)
        }
    });
    let at_cut = std::fs::read_to_string(data.join("trace"))
        .unwrap()
        .lines()
        .count();
    ws.remove_pod(&pod);

    let replica_config = ws.pod_config(&unique("cut-restored"));
    let restored = ws.restore_started(&checkpoint, &replica_config, &[&a, &b]);
    wait_for("the restored writers to go on", LIVENESS, || {
        let n = std::fs::read_to_string(data.join("trace"))
            .unwrap_or_default()
            .lines()
            .count();
        if n > at_cut + 200 {
            Ok(())
        } else {
            Err(format!("{n} lines, {at_cut} at the cut"))
        }
    });
    ws.remove_pod(&restored);
    let trace = std::fs::read_to_string(data.join("trace")).unwrap();
    let numbers: Vec<u64> = trace
        .lines()
        .map(|l| {
            l.split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("torn line {l:?}"))
        })
        .collect();
    for (i, pair) in numbers.windows(2).enumerate() {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "the sequence breaks at line {} ({} then {})",
            i + 2,
            pair[0],
            pair[1]
        );
    }
    assert!(trace.lines().skip(at_cut).any(|l| l.ends_with(" a")));
    assert!(trace.lines().skip(at_cut).any(|l| l.ends_with(" b")));
}

#[test]
fn podsnap_bad_pod_checkpoint_and_restore_requests_are_refused_and_leave_nothing() {
    use tonic::Code;
    let node = Node::get();
    let cri = Cri::new();
    let mut ws = Workspace::new("bad");
    let counter = ws.container_config(
        "first",
        sh("i=0; while true; do i=$((i+1)); echo count=$i; sleep 0.2; done"),
        json!([]),
    );
    let config = ws.pod_config(&unique("bad"));
    let pod = ws.run_pod(Handler::Podsnap, &config);
    let c = ws.run_container(&pod, &counter, &config);
    let empty = ws.checkpoint_dir("empty");
    let empty_s = empty.to_str().unwrap();

    assert_status(
        cri.checkpoint(&pod, "relative/dir", &[&c], &[]),
        Code::InvalidArgument,
        "absolute",
    );
    assert_status(
        cri.checkpoint(&pod, "/nonexistent/podsnap-e2e", &[&c], &[]),
        Code::InvalidArgument,
        "/nonexistent/podsnap-e2e",
    );
    let full = ws.checkpoint_dir("full");
    std::fs::write(full.join("x"), b"x").unwrap();
    assert_status(
        cri.checkpoint(&pod, full.to_str().unwrap(), &[&c], &[]),
        Code::InvalidArgument,
        "not empty",
    );
    assert_status(
        cri.checkpoint(&pod, empty_s, &[], &[]),
        Code::InvalidArgument,
        "empty",
    );
    assert_status(
        cri.checkpoint(&pod, empty_s, &[&c, &c], &[]),
        Code::InvalidArgument,
        "twice",
    );
    assert_status(
        cri.checkpoint(&pod, empty_s, &["no-such-container"], &[]),
        Code::NotFound,
        "no-such-container",
    );
    assert_status(
        cri.checkpoint(&pod, empty_s, &[&c], &[("podsnap.io/turbo", "on")]),
        Code::InvalidArgument,
        "podsnap.io/turbo",
    );
    assert_status(
        cri.checkpoint(&pod, empty_s, &[&c], &[("podsnap.io/compression", "lz4")]),
        Code::InvalidArgument,
        "lz4",
    );
    assert_status(
        cri.checkpoint("no-such-sandbox", empty_s, &[&c], &[]),
        Code::NotFound,
        "no-such-sandbox",
    );
    let runc_config = ws.pod_config(&unique("bad-runc"));
    let runc_pod = ws.run_pod(Handler::Runc, &runc_config);
    let runc_c = ws.run_container(&runc_pod, &counter, &runc_config);
    assert_status(
        cri.checkpoint(&runc_pod, empty_s, &[&runc_c], &[]),
        Code::FailedPrecondition,
        "runc",
    );
    assert_status(
        cri.checkpoint(&pod, empty_s, &[&runc_c], &[]),
        Code::NotFound,
        &runc_c,
    );
    node.crictl(["stop", &c]);
    assert_status(
        cri.checkpoint(&pod, empty_s, &[&c], &[]),
        Code::FailedPrecondition,
        "not running",
    );
    assert_eq!(
        std::fs::read_dir(&empty).unwrap().count(),
        0,
        "a refused checkpoint wrote into {empty_s}"
    );

    // A good checkpoint of a second container, to restore from in the bad ways below.
    let good_config = ws.container_config(
        "counter",
        sh("i=0; while true; do i=$((i+1)); echo count=$i; sleep 0.2; done"),
        json!([]),
    );
    let good_c = ws.run_container(&pod, &good_config, &config);
    let checkpoint = ws.checkpoint_dir("good");
    cri.checkpoint(&pod, checkpoint.to_str().unwrap(), &[&good_c], &[])
        .expect("a good checkpoint");
    let pods_before = pod_ids(node);
    let ckpt = checkpoint.to_str().unwrap();
    let image = podsnap_e2e::BUSYBOX;
    let (pod_config, containers) = restore_configs(&unique("bad-replica"), image);
    let mut other = containers.clone();
    other[0].metadata.as_mut().unwrap().name = "other".into();
    assert_status(
        cri.restore(ckpt, "podsnap", pod_config.clone(), other),
        Code::InvalidArgument,
        "other",
    );
    let (_, wrong_image) = restore_configs("x", "registry.k8s.io/pause:3.10.2");
    assert_status(
        cri.restore(ckpt, "podsnap", pod_config.clone(), wrong_image),
        Code::InvalidArgument,
        "image",
    );
    assert_status(
        cri.restore(ckpt, "runc", pod_config.clone(), containers.clone()),
        Code::InvalidArgument,
        "runc",
    );
    assert_status(
        cri.restore(
            "relative/ckpt",
            "podsnap",
            pod_config.clone(),
            containers.clone(),
        ),
        Code::InvalidArgument,
        "absolute",
    );
    assert_status(
        cri.restore(ckpt, "podsnap", pod_config.clone(), vec![]),
        Code::InvalidArgument,
        "empty",
    );

    // Tampered copies of the good checkpoint.
    let copy = |name: &str| {
        let dir = ws.path(name);
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(&checkpoint)
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success());
        dir
    };
    let flip_first_byte = |path: &std::path::Path| {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[0] ^= 0xff;
        std::fs::write(path, bytes).unwrap();
    };
    // Every file but the page images is verified before anything is created.
    let modified = copy("modified");
    flip_first_byte(&modified.join("counter/checkpoint/inventory.img"));
    assert_status(
        cri.restore(
            modified.to_str().unwrap(),
            "podsnap",
            pod_config.clone(),
            containers.clone(),
        ),
        Code::FailedPrecondition,
        "modified",
    );
    let symlinked = copy("symlinked");
    std::os::unix::fs::symlink("/etc", symlinked.join("counter/etc")).unwrap();
    assert_status(
        cri.restore(
            symlinked.to_str().unwrap(),
            "podsnap",
            pod_config.clone(),
            containers.clone(),
        ),
        Code::FailedPrecondition,
        "symlink",
    );
    let escaping = copy("escaping");
    let manifest_path = escaping.join("podsnap-manifest.json");
    let mut manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    manifest["files"]["../../etc/shadow"] = json!("00");
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    assert_status(
        cri.restore(
            escaping.to_str().unwrap(),
            "podsnap",
            pod_config.clone(),
            containers.clone(),
        ),
        Code::FailedPrecondition,
        "escapes",
    );
    let with_device = copy("with-device");
    let fifo = with_device.join("counter/checkpoint/fifo.img");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    assert_status(
        cri.restore(
            with_device.to_str().unwrap(),
            "podsnap",
            pod_config.clone(),
            containers.clone(),
        ),
        Code::FailedPrecondition,
        "FIFO",
    );
    let truncated = copy("truncated");
    std::fs::remove_file(truncated.join("counter/rootfs-diff.tar")).unwrap();
    assert_status(
        cri.restore(
            truncated.to_str().unwrap(),
            "podsnap",
            pod_config,
            containers,
        ),
        Code::FailedPrecondition,
        "missing",
    );
    assert_eq!(
        pod_ids(node),
        pods_before,
        "a refused restore left a pod sandbox behind"
    );

    // The page images are hashed while CRIU reads them: a modified one fails the container's
    // start, and none of its processes ever runs.
    let modified_pages = copy("modified-pages");
    let pages = std::fs::read_dir(modified_pages.join("counter/checkpoint"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("pages-"))
        .unwrap()
        .path();
    flip_first_byte(&pages);
    let replica = ws.pod_config(&unique("modified-pages"));
    let restored = restored_pod(&restore_created(
        &modified_pages,
        &replica,
        &[good_config.as_path()],
    ));
    ws.pods.push(restored.clone());
    let counter = container_named(node, &restored, "counter");
    let started = node.crictl_try(["start", &counter]);
    assert!(!started.success(), "started: {}", started.report());
    let pages_name = pages.file_name().unwrap().to_str().unwrap();
    assert!(
        started.stderr.contains("was modified") && started.stderr.contains(pages_name),
        "the refusal does not name {pages_name} as modified: {}",
        started.report()
    );
    assert_ne!(node.container_state(&counter), "CONTAINER_RUNNING");
    let logs = node.crictl_try(["logs", &counter]);
    assert!(
        !logs.stdout.contains("count="),
        "a process restored from the modified pages ran: {}",
        logs.report()
    );
    ws.remove_pod(&restored);
}

#[test]
fn podsnap_pod_checkpoint_whose_deadline_expires_mid_dump_thaws_the_pod_and_leaves_no_checkpoint() {
    let node = Node::get();
    let mut ws = Workspace::new("deadline");
    // 1 GiB touched: its dump is long enough to be caught writing memory.
    let hog = ws.fixture_config("hog", podsnap_e2e::fixtures::memtest(), &["1024"]);
    let config = ws.pod_config(&unique("deadline"));
    let pod = ws.run_pod(Handler::Podsnap, &config);
    let c = ws.run_container(&pod, &hog, &config);
    wait_for(
        "the hog to hold its memory",
        Duration::from_secs(120),
        || file_in(node, &c, "/tmp/memtest.ready"),
    );
    let checkpoint = ws.checkpoint_dir("checkpoint");
    // The hog's CRIU is caught writing its memory and stopped there (SIGSTOP) until the call
    // answers, so that the deadline passes mid-dump however fast or slow the node is (a
    // deadline short enough to pass mid-dump left podsnapd too little time on a slow node).
    let call = {
        let (pod, target) = (pod.clone(), checkpoint.to_str().unwrap().to_string());
        std::thread::spawn(move || {
            podsnap(&["pod", "checkpoint", &pod, &target, "--timeout", "3s"])
        })
    };
    let shim = wait_for("the pod's shim", LIVENESS, || {
        podsnap_e2e::serving_shim(Handler::Podsnap, &pod).ok_or_else(|| "none".to_string())
    });
    let stopped = {
        let deadline = std::time::Instant::now() + LIVENESS;
        loop {
            assert!(
                !call.is_finished(),
                "the checkpoint ended before its CRIU wrote memory: {}",
                call.join().unwrap().report()
            );
            assert!(
                std::time::Instant::now() < deadline,
                "no CRIU writing memory after {LIVENESS:?}"
            );
            let criu = podsnap_e2e::leaks::host_processes().into_iter().find(|p| {
                p.ppid == shim.pid
                    && std::fs::read_to_string(format!("/proc/{}/comm", p.pid))
                        .is_ok_and(|comm| comm.trim() == "criu")
            });
            if let Some(criu) = criu.filter(|_| holds_page_images(&checkpoint, 3)) {
                break Stopped::pid(criu.pid, Some("criu"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let out = call.join().unwrap();
    drop(stopped);
    assert_refused(&out, "DeadlineExceeded", "no answer from criu");
    let freezer = format!("/sys/fs/cgroup/freezer/k8s.io/{c}/freezer.state");
    wait_for("the pod to be thawed", LIVENESS, || {
        let state = std::fs::read_to_string(&freezer).unwrap_or_default();
        if state.trim() == "THAWED" {
            Ok(())
        } else {
            Err(state)
        }
    });
    assert_eq!(node.container_state(&c), "CONTAINER_RUNNING");
    wait_empty(&checkpoint, LIVENESS);
    ws.remove_pod(&pod);
}

/// Whether `dir` holds one of CRIU's page images (`pages-*`), down to `depth` levels below.
fn holds_page_images(dir: &std::path::Path, depth: u32) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.file_name().to_string_lossy().starts_with("pages-")
                || (depth > 0
                    && e.file_type().is_ok_and(|t| t.is_dir())
                    && holds_page_images(&e.path(), depth - 1))
        })
    })
}

#[test]
fn podsnap_restore_never_grants_more_than_the_new_pod_spec() {
    use tonic::Code;
    let node = Node::get();
    let cri = Cri::new();
    let mut ws = Workspace::new("grants");
    let counter = ws.container_config(
        "counter",
        sh("i=0; while true; do i=$((i+1)); echo count=$i; sleep 0.2; done"),
        json!([]),
    );
    let config = ws.pod_config(&unique("grants"));
    let pod = ws.run_pod(Handler::Podsnap, &config);
    let c = ws.run_container(&pod, &counter, &config);
    let checkpoint = ws.checkpoint_dir("root");
    cri.checkpoint(&pod, checkpoint.to_str().unwrap(), &[&c], &[])
        .expect("a checkpoint of a root container");
    let ckpt = checkpoint.to_str().unwrap();
    let pods_before = pod_ids(node);

    // The same pod under Pod Security's "restricted" settings: uid 65534, no_new_privs, no
    // capabilities. CRIU would bring the processes back as root with capabilities.
    let (mut pod_config, mut containers) = restore_configs(&unique("restricted"), BUSYBOX);
    pod_config.linux = Some(cri_api::v1::LinuxPodSandboxConfig {
        security_context: Some(cri_api::v1::LinuxSandboxSecurityContext {
            namespace_options: Some(cri_api::v1::NamespaceOption {
                pid: 1,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let same = cri_api::v1::LinuxContainerSecurityContext {
        namespace_options: Some(cri_api::v1::NamespaceOption {
            pid: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    let restricted = cri_api::v1::LinuxContainerSecurityContext {
        run_as_user: Some(cri_api::v1::Int64Value { value: 65534 }),
        no_new_privs: true,
        capabilities: Some(cri_api::v1::Capability {
            drop_capabilities: vec!["ALL".into()],
            ..Default::default()
        }),
        ..same.clone()
    };
    containers[0].linux = Some(cri_api::v1::LinuxContainerConfig {
        security_context: Some(restricted),
        ..Default::default()
    });
    assert_status(
        cri.restore(ckpt, "podsnap", pod_config.clone(), containers.clone()),
        Code::PermissionDenied,
        "run_as_user: checkpoint null, requested 65534",
    );
    // A pod in the host's network namespace (hostNetwork) for a checkpoint that had its own.
    containers[0].linux = Some(cri_api::v1::LinuxContainerConfig {
        security_context: Some(same),
        ..Default::default()
    });
    let mut host_network = pod_config.clone();
    host_network
        .linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap()
        .namespace_options
        .as_mut()
        .unwrap()
        .network = 2;
    assert_status(
        cri.restore(ckpt, "podsnap", host_network, containers.clone()),
        Code::PermissionDenied,
        "namespace_options.network",
    );
    assert_eq!(
        pod_ids(node),
        pods_before,
        "a refused restore left a pod sandbox behind"
    );

    // The restore annotation alone, on a container created through containerd's CRI without
    // podsnapd's RestorePod, restores nothing: without a grant the shim refuses it.
    let forged = ws.write(
        "forged.json",
        &json!({
            "metadata": {"name": "forged"},
            "image": {"image": BUSYBOX},
            "command": ["sleep", "600"],
            "log_path": "forged.log",
            "annotations": {
                "podsnap.io/restore-from": checkpoint.join("counter"),
                "podsnap.io/restore-grant": "0123456789abcdef0123456789abcdef",
            },
            "linux": {"security_context": {"namespace_options": {"pid": 1}}},
        }),
    );
    // CRI creates the task (and the shim sees the annotation) at start.
    let forged_c = node
        .crictl([
            "create",
            &pod,
            forged.to_str().unwrap(),
            config.to_str().unwrap(),
        ])
        .trim()
        .to_string();
    let started = node.crictl_try(["start", &forged_c]);
    let text = started.stdout.clone() + &started.stderr;
    assert!(
        !started.success() && text.contains("restore-from refused") && text.contains("grant"),
        "a forged restore annotation was not refused: {}",
        started.report()
    );
    node.crictl(["rm", &forged_c]);

    // A checkpoint changed after RestorePod verified it, manifest and hashes re-computed to
    // match, is refused when the container starts: the shim checks the pinned manifest digest.
    let replica = ws.pod_config(&unique("grants-replica"));
    let out = restore_created(&checkpoint, &replica, &[&counter]);
    let restored = restored_pod(&out);
    ws.pods.push(restored.clone());
    let restored_c = container_named(node, &restored, "counter");
    let manifest_path = checkpoint.join(podsnap_checkpoint_format::MANIFEST);
    let mut manifest: podsnap_checkpoint_format::Manifest =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    std::fs::write(checkpoint.join("counter/deleted.files"), br#"["/bin"]"#).unwrap();
    std::fs::remove_file(&manifest_path).unwrap();
    podsnap_checkpoint_format::write_manifest(&checkpoint, &mut manifest).unwrap();
    let started = node.crictl_try(["start", &restored_c]);
    let text = started.stdout.clone() + &started.stderr;
    assert!(
        !started.success() && text.contains("manifest changed"),
        "a checkpoint changed after RestorePod was restored: {}",
        started.report()
    );
    // A new RestorePod of it is refused too: podsnapd pinned the manifest's digest when it
    // wrote the checkpoint.
    let (pod_config, containers) = restore_configs(&unique("grants-again"), BUSYBOX);
    assert_status(
        cri.restore(ckpt, "podsnap", pod_config, containers),
        Code::FailedPrecondition,
        "was changed since this node took it",
    );
    ws.remove_pod(&restored);
    ws.remove_pod(&pod);
}

/// Runs `script` with `sh -c`, as root on the node; panics naming it when it fails.
fn shell(script: &str) {
    let out = CommandLine::new("sh")
        .args(["-c", script])
        .run()
        .unwrap_or_else(|e| panic!("{script}: {e}"));
    assert!(out.success(), "{script}: {}", out.report());
}

#[test]
fn podsnap_restore_refuses_a_device_in_the_checkpoints_dev_that_the_new_spec_does_not_give() {
    // CRIU keeps a container's /dev (a tmpfs) as a tar that `tar --extract` unpacks as root at
    // restore: a checkpoint brought from elsewhere (not pinned by this node) whose /dev holds
    // the host's first disk, its manifest re-computed to match, must not restore.
    let node = Node::get();
    let mut ws = Workspace::new("dev-device");
    let counter = ws.container_config(
        "counter",
        sh("i=0; while true; do i=$((i+1)); echo count=$i; sleep 0.2; done"),
        json!([]),
    );
    let config = ws.pod_config(&unique("dev-device"));
    let pod = ws.run_pod(Handler::Podsnap, &config);
    let c = ws.run_container(&pod, &counter, &config);
    let taken = ws.checkpoint_dir("taken");
    Cri::new()
        .checkpoint(&pod, taken.to_str().unwrap(), &[&c], &[])
        .expect("a checkpoint of the counter");
    ws.remove_pod(&pod);

    let imported = ws.checkpoint_dir("imported");
    shell(&format!(
        "cp -a {}/. {}/",
        taken.display(),
        imported.display()
    ));
    let archives = CommandLine::new("find")
        .args([
            imported.to_str().unwrap(),
            "-name",
            "tmpfs-dev-*.tar.gz.img",
        ])
        .run()
        .unwrap()
        .stdout;
    let dev = archives
        .lines()
        .find(|archive| {
            let listing = CommandLine::new("tar")
                .args(["--list", "--gzip", "--file", archive])
                .run()
                .unwrap()
                .stdout;
            listing.lines().any(|l| l == "./null")
        })
        .unwrap_or_else(|| panic!("no tmpfs archive holding /dev/null among {archives:?}"))
        .to_string();
    let unpacked = ws.path("dev-unpacked");
    let unpacked = unpacked.display();
    shell(&format!(
        "mkdir {unpacked} && tar --extract --gzip --numeric-owner --file {dev} --directory {unpacked} \
         && mknod {unpacked}/sda b 8 0 \
         && tar --create --gzip --numeric-owner --file {dev} --directory {unpacked} ."
    ));
    let manifest_path = imported.join(podsnap_checkpoint_format::MANIFEST);
    let mut manifest: podsnap_checkpoint_format::Manifest =
        serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
    std::fs::remove_file(&manifest_path).unwrap();
    podsnap_checkpoint_format::write_manifest(&imported, &mut manifest).unwrap();

    let replica = ws.pod_config(&unique("dev-device-replica"));
    let out = restore_created(&imported, &replica, &[&counter]);
    let restored = restored_pod(&out);
    ws.pods.push(restored.clone());
    let restored_c = container_named(node, &restored, "counter");
    let started = node.crictl_try(["start", &restored_c]);
    let text = started.stdout.clone() + &started.stderr;
    assert!(
        !started.success()
            && text.contains("tmpfs archive tmpfs-dev-")
            && text
                .contains("./sda: block device 8:0, which the container's spec does not give it"),
        "a checkpoint whose /dev holds a disk was restored: {}\n{}",
        started.report(),
        node.log_excerpt(&[&restored_c])
    );
    let inspected: Value = serde_json::from_str(&node.crictl(["inspect", &restored_c])).unwrap();
    assert_ne!(
        inspected["status"]["state"], "CONTAINER_RUNNING",
        "the refused container runs"
    );
    ws.remove_pod(&restored);
}

#[test]
fn podsnap_shim_killed_between_freeze_and_thaw_leaves_no_frozen_pod() {
    let mut ws = Workspace::new("shim-killed");
    // 1 GiB touched: its dump takes long enough to kill the shim in the middle of it.
    let hogs = HogPod::start(&mut ws, "shim-killed", 1024);
    let (pod, c, side) = (hogs.pod.clone(), hogs.hog.clone(), hogs.sidecar.clone());
    let checkpoint = ws.checkpoint_dir("checkpoint");
    let target = checkpoint.clone();
    let pod_id = pod.clone();
    // Both containers are captured (the CLI takes every running one) and so frozen.
    let call = std::thread::spawn(move || {
        podsnap(&[
            "pod",
            "checkpoint",
            &pod_id,
            target.to_str().unwrap(),
            "--timeout",
            "120s",
        ])
    });
    let shim = podsnap_e2e::leaks::serving_shim(Handler::Podsnap, &pod)
        .expect("the pod's shim is running");
    // Between freeze and thaw: the shim starts the CRIUs, freezes every container of the pod
    // once they are ready, lets them seize and dump, and thaws all only after the last one
    // ended; so a CRIU under the shim while the sandbox's pause container (a bystander, which
    // no CRIU thaws) is frozen means the pod is in the middle of it. (The captured
    // containers' freezer state says less: CRIU thaws a captured container's cgroup once it
    // has seized its tasks, which stay stopped under ptrace.)
    wait_for("a CRIU of the pod's shim, mid-capture", LIVENESS, || {
        let criu = podsnap_e2e::leaks::host_processes().into_iter().find(|p| {
            p.ppid == shim.pid
                && std::fs::read_to_string(format!("/proc/{}/comm", p.pid))
                    .is_ok_and(|comm| comm.trim() == "criu")
        });
        let sandbox = freezer_state(&pod);
        match criu {
            Some(criu) if sandbox == "FROZEN" => Ok(criu),
            _ => Err(format!(
                "no CRIU at work yet; sandbox {sandbox}, hog {}, sidecar {}",
                freezer_state(&c),
                freezer_state(&side)
            )),
        }
    });
    // containerd stopped meanwhile (a node whose agents are restarting): its cleanup of the
    // dead shim would tear the pod down and hide a frozen pod; nothing but podsnap may thaw it.
    let containerd = Stopped::process(&node_run().join("containerd.pid"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = call.join().unwrap();
    assert!(!out.success(), "the checkpoint succeeded: {}", out.report());
    wait_for("the thaw guard to thaw the pod", LIVENESS, || {
        let (hog, side) = (freezer_state(&c), freezer_state(&side));
        if hog == "THAWED" && side == "THAWED" {
            Ok(())
        } else {
            Err(format!("hog {hog}, sidecar {side}"))
        }
    });
    wait_empty(&checkpoint, LIVENESS);
    drop(containerd);
    // The pod goes as containerd cleans up after a dead shim; Workspace's drop removes it.
}

#[test]
fn podsnap_pod_checkpoint_pushed_to_a_registry_and_pulled_back_restores_counting_on() {
    let node = Node::get();
    let mut ws = Workspace::new("registry");
    let counter = ws.container_config(
        "counter",
        sh("i=0; while true; do i=$((i+1)); echo count=$i; sleep 0.2; done"),
        json!([]),
    );
    let config = ws.pod_config(&unique("pushed"));
    let source = ws.run_pod(Handler::Podsnap, &config);
    let counter_id = ws.run_container(&source, &counter, &config);
    wait_for("the source pod to count", LIVENESS, || {
        let n = counts(node, &counter_id).last().copied().unwrap_or(0);
        if n >= 5 {
            Ok(())
        } else {
            Err(format!("count {n}"))
        }
    });
    let checkpoint = ws.checkpoint_dir("checkpoint");
    // Counted before the checkpoint: the restored pod goes on from there.
    let before = counts(node, &counter_id).last().copied().unwrap();
    let out = podsnap(&["pod", "checkpoint", &source, checkpoint.to_str().unwrap()]);
    assert!(out.success(), "{}", out.report());
    ws.remove_pod(&source);

    // A registry of the test's own (plain HTTP, storage in the workspace): nothing it pushes
    // stays behind.
    let own = ScratchRegistry::start(&ws.path("registry"));
    let registry = own.addr.as_str();
    // The node's (hack/node-up.sh's), which holds busybox: not a checkpoint.
    let node_registry = BUSYBOX.split('/').next().unwrap();
    let tag = format!("{registry}/podsnap-e2e/{}:1", unique("counter"));
    let out = podsnap(&[
        "pod",
        "push",
        checkpoint.to_str().unwrap(),
        &tag,
        "--insecure-registry",
        registry,
    ]);
    assert!(out.success(), "{}", out.report());
    let by_digest = out.stdout.trim().to_string();
    assert!(
        by_digest.contains("@sha256:") && by_digest.starts_with(registry),
        "push printed {by_digest:?}"
    );

    // Pulled by digest into a new directory, as another node's cache would be.
    let cache = ws.path("cache");
    std::fs::create_dir(&cache).unwrap();
    let pulled = cache.join("checkpoint-pulled");
    let pull = |reference: &str| {
        podsnap(&[
            "pod",
            "pull",
            reference,
            pulled.to_str().unwrap(),
            "--insecure-registry",
            registry,
            "--insecure-registry",
            node_registry,
        ])
    };
    // What is not there, or not a checkpoint, is refused and creates nothing.
    for bad in [
        format!("{registry}/podsnap-e2e/missing:1"),
        BUSYBOX.to_string(),
    ] {
        let out = pull(&bad);
        assert!(!out.success(), "pulled {bad}: {}", out.report());
        assert_eq!(
            std::fs::read_dir(&cache).unwrap().count(),
            0,
            "a refused pull of {bad} left something in the cache: {}",
            out.report()
        );
    }
    let out = pull(&by_digest);
    assert!(out.success(), "{}", out.report());
    assert_eq!(
        out.stdout.trim(),
        by_digest.split('@').nth(1).unwrap(),
        "pull printed another digest"
    );
    assert_eq!(
        std::fs::read(checkpoint.join("podsnap-manifest.json")).unwrap(),
        std::fs::read(pulled.join("podsnap-manifest.json")).unwrap(),
        "the pulled checkpoint's manifest is not the one pushed"
    );
    // A second pull never lands on the first.
    let again = pull(&by_digest);
    assert!(
        !again.success() && again.stderr.contains("exists"),
        "{}",
        again.report()
    );

    let replica_config = ws.pod_config(&unique("pulled"));
    let pod = ws.restore_started(&pulled, &replica_config, &[&counter]);
    let restored = container_named(node, &pod, "counter");
    let seen = wait_for("the pulled pod to count on", LIVENESS, || {
        let seen = counts(node, &restored);
        if seen.len() >= 3 {
            Ok(seen)
        } else {
            Err(format!("counts {seen:?}"))
        }
    });
    assert!(
        seen[0] > before,
        "the pulled pod counted from {}, not on from {before}",
        seen[0]
    );
    ws.remove_pod(&pod);
}

/// Debian's docker-registry (distribution 2.8) on a free loopback port, storage under `dir`;
/// stopped (by its pid) when dropped.
struct ScratchRegistry {
    child: std::process::Child,
    addr: String,
}

impl ScratchRegistry {
    fn start(dir: &std::path::Path) -> Self {
        let bin = "/usr/bin/docker-registry";
        assert!(
            std::path::Path::new(bin).exists(),
            "{bin} is missing: run hack/install.sh"
        );
        std::fs::create_dir_all(dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.join("storage").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = std::process::Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let registry = ScratchRegistry { child, addr };
        wait_for("the scratch registry to listen", LIVENESS, || {
            std::net::TcpStream::connect(&registry.addr)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        registry
    }
}

impl Drop for ScratchRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connection that a listening socket has not accepted yet when the pod is checkpointed (one
/// "in flight" to CRIU) neither fails the checkpoint nor is lost: the pod, thawed, accepts it and
/// reads what the client sent before the checkpoint; the restored copy listens at its own
/// address without it. (With CRIU's network lock, which a checkpoint without established TCP
/// connections no longer takes, this checkpoint failed: "In-flight connection".)
#[test]
fn podsnap_pod_checkpointed_with_a_connection_not_yet_accepted_keeps_it_and_restores_listening() {
    let node = Node::get();
    let mut ws = Workspace::new("in-flight");
    let config = ws.fixture_config("listener", podsnap_e2e::fixtures::listener(), &["9090"]);
    // Connects and sends `message`; the connection waits in the accept queue until
    // `take_one_connection` and stays open meanwhile.
    let connect = |ip: &str, message: &str| {
        use std::io::Write;
        let address: std::net::SocketAddr = format!("{ip}:9090").parse().unwrap();
        let mut stream = wait_for(format_args!("a connection to {address}"), LIVENESS, || {
            std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2))
                .map_err(|e| e.to_string())
        });
        stream.write_all(message.as_bytes()).unwrap();
        stream
    };
    let take_one_connection = |container: &str, message: &str| {
        node.crictl(["exec", container, "kill", "-USR1", "1"]);
        wait_for("the listener to accept and read", LIVENESS, || {
            let seen = file_in(node, container, "/tmp/listener.got")?;
            if seen == message {
                Ok(())
            } else {
                Err(format!("read {seen:?}"))
            }
        });
    };

    let source_config = ws.pod_config(&unique("source"));
    let source = ws.run_pod(Handler::Podsnap, &source_config);
    let id = ws.run_container(&source, &config, &source_config);
    wait_for("the listener to listen", LIVENESS, || {
        file_in(node, &id, "/tmp/listener.ready")
    });
    let message = unique("before-the-checkpoint");
    let client = connect(&pod_ip(&source), &message);

    let checkpoint = ws.checkpoint_dir("checkpoint");
    let out = podsnap(&["pod", "checkpoint", &source, checkpoint.to_str().unwrap()]);
    assert!(
        out.success(),
        "{}\n{}",
        out.report(),
        node.log_excerpt(&[&source])
    );
    // Thawed, the source accepts the connection that waited through the checkpoint.
    take_one_connection(&id, &message);
    drop(client);
    ws.remove_pod(&source);

    let replica_config = ws.pod_config(&unique("replica"));
    let replica = ws.restore_started(&checkpoint, &replica_config, &[&config]);
    let restored = container_named(node, &replica, "listener");
    let again = unique("after-the-restore");
    let client = connect(&pod_ip(&replica), &again);
    take_one_connection(&restored, &again);
    drop(client);
    ws.remove_pod(&replica);
}

/// A pod config like [`Workspace::pod_config`] that asks RestorePod to keep the checkpointed
/// pod's address (the pod annotation, as the kubelet passes it).
fn keep_ip_pod_config(ws: &Workspace, name: &str) -> std::path::PathBuf {
    let path = ws.pod_config(name);
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["annotations"] = json!({"podsnap.io/keep-ip": "true"});
    ws.write(&format!("{name}.pod.json"), &config)
}

#[test]
fn podsnap_pod_restored_with_keep_ip_gets_its_checkpointed_address_or_is_refused_leaving_nothing() {
    let node = Node::get();
    let mut ws = Workspace::new("keepip");
    let marker = unique("kept");
    let counter = ws.container_config(
        "counter",
        sh(&format!(
            "mkdir -p /www; echo {marker} > /www/index.html; httpd -p 8080 -h /www; \
             i=0; while true; do i=$((i+1)); echo count=$i; sleep 0.2; done"
        )),
        json!([]),
    );
    let source_config = ws.pod_config(&unique("keepip-source"));
    let source = ws.run_pod(Handler::Podsnap, &source_config);
    let counter_id = ws.run_container(&source, &counter, &source_config);
    let ip = pod_ip(&source);
    assert!(!ip.is_empty(), "the source pod has no address");
    wait_for("the source pod to serve and count", LIVENESS, || {
        let served = http_get(&ip, "index.html")?;
        let n = counts(node, &counter_id).last().copied().unwrap_or(0);
        if served.contains(&marker) && n >= 3 {
            Ok(())
        } else {
            Err(format!("served {served:?}, count {n}"))
        }
    });
    let checkpoint = ws.checkpoint_dir("checkpoint");
    let before = counts(node, &counter_id).last().copied().unwrap();
    let out = podsnap(&["pod", "checkpoint", &source, checkpoint.to_str().unwrap()]);
    assert!(out.success(), "{}", out.report());
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(checkpoint.join("podsnap-manifest.json")).unwrap())
            .unwrap();
    assert_eq!(
        manifest["pod"]["ips"][0].as_str(),
        Some(ip.as_str()),
        "the manifest does not record the pod's address: {}",
        manifest["pod"]
    );

    // The source still holds the address: the restore is refused naming it, and leaves no
    // sandbox and no address grant behind.
    let pods_before = pod_ids(node);
    let busy_name = unique("keepip-busy");
    let busy = keep_ip_pod_config(&ws, &busy_name);
    let out = restore_created(&checkpoint, &busy, &[&counter]);
    assert!(
        !out.success(),
        "restored onto a taken address: {}",
        out.report()
    );
    let text = out.stdout.clone() + &out.stderr;
    assert!(
        text.contains("podsnap.io/keep-ip")
            && text.contains(&format!("requested IP address {ip} is not available")),
        "the refusal does not say that the address {ip} is taken: {}",
        out.report()
    );
    assert_eq!(
        pod_ids(node),
        pods_before,
        "a refused restore left a sandbox"
    );
    let grant =
        std::path::Path::new(podsnap_cni::grant::GRANT_DIR).join(format!("{busy_name}-uid.json"));
    assert!(!grant.exists(), "{} was left behind", grant.display());
    assert!(
        http_get(&ip, "index.html").unwrap().contains(&marker),
        "the source stopped serving"
    );

    // Suspended (removed) and resumed: the restored pod has the source's address, serves there
    // and counts on.
    ws.remove_pod(&source);
    let resumed_config = keep_ip_pod_config(&ws, &unique("keepip-resumed"));
    let resumed = ws.restore_started(&checkpoint, &resumed_config, &[&counter]);
    assert_eq!(
        pod_ip(&resumed),
        ip,
        "the resumed pod did not keep its address"
    );
    let resumed_counter = container_named(node, &resumed, "counter");
    wait_for("the resumed pod to serve and count on", LIVENESS, || {
        let served = http_get(&ip, "index.html")?;
        let seen = counts(node, &resumed_counter);
        if served.contains(&marker) && seen.len() >= 2 {
            Ok(())
        } else {
            Err(format!("served {served:?}, counts {seen:?}"))
        }
    });
    let first = counts(node, &resumed_counter)[0];
    assert!(first > before, "counted from {first}, not on from {before}");
    ws.remove_pod(&resumed);
}

/// Pod and container configs in which the pod has a user namespace of its own (`hostUsers:
/// false`) mapping container ids `0..65536` to host ids from `host_id`; the container runs
/// `script`.
fn user_namespace_configs(
    ws: &Workspace,
    name: &str,
    host_id: u32,
    container_id: u32,
    script: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let mapping = json!([{"host_id": host_id, "container_id": container_id, "length": 65536}]);
    let namespaces =
        json!({"pid": 1, "userns_options": {"mode": 0, "uids": mapping, "gids": mapping}});
    let pod_path = ws.pod_config(name);
    let mut pod: Value = serde_json::from_slice(&std::fs::read(&pod_path).unwrap()).unwrap();
    pod["linux"]["security_context"]["namespace_options"] = namespaces.clone();
    let pod = ws.write(&format!("{name}.pod.json"), &pod);
    let container_path = ws.container_config(&format!("{name}-counter"), sh(script), json!([]));
    let mut container: Value =
        serde_json::from_slice(&std::fs::read(&container_path).unwrap()).unwrap();
    container["metadata"]["name"] = json!("counter");
    container["linux"]["security_context"]["namespace_options"] = namespaces;
    let container = ws.write(&format!("{name}-counter.json"), &container);
    (pod, container)
}

/// The user namespace of a process on this node, as `/proc/PID/ns/user` names it.
fn user_namespace_of(pid: u64) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/user"))
        .unwrap_or_else(|e| panic!("read the user namespace of pid {pid}: {e}"))
        .display()
        .to_string()
}

fn pid_in(info: &Value) -> u64 {
    info["info"]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid in {info}"))
}

/// A pod with a user namespace of its own (`hostUsers: false`) is checkpointed and restored
/// under the new pod's mapping (another host range, as the kubelet picks one per pod): the
/// restored processes are in the new sandbox's user namespace (so they hold its capabilities
/// over the pod's network namespace: a port below 1024 binds), run as the new host ids, see
/// the files they wrote as their own, and count on. A restore into a pod without a user
/// namespace, or whose mapping covers other container ids, is refused and leaves nothing.
#[test]
fn podsnap_user_namespace_pod_is_restored_into_the_new_pods_user_namespace_counting_on() {
    const SOURCE_HOST_ID: u32 = 65536 * 23;
    const RESTORED_HOST_ID: u32 = 65536 * 24;
    let node = Node::get();
    let mut ws = Workspace::new("userns");
    let marker = unique("userns");
    let script = format!(
        "echo written > /state; mkdir -p /www; echo {marker} > /www/index.html; \
         httpd -p 80 -h /www; i=0; while true; do i=$((i+1)); echo count=$i; sleep 0.2; done"
    );
    let (source_config, counter) =
        user_namespace_configs(&ws, &unique("userns-source"), SOURCE_HOST_ID, 0, &script);
    let source = ws.run_pod(Handler::Podsnap, &source_config);
    let counter_id = ws.run_container(&source, &counter, &source_config);
    let ip = pod_ip(&source);
    let serve = |port: u16| http_get_at(&ip, port, "");
    wait_for(
        "the source pod to serve on port 80 and count",
        LIVENESS,
        || {
            let served = serve(80)?;
            let n = counts(node, &counter_id).last().copied().unwrap_or(0);
            if served.contains(&marker) && n >= 3 {
                Ok(())
            } else {
                Err(format!("served {served:?}, count {n}"))
            }
        },
    );
    let checkpoint = ws.checkpoint_dir("checkpoint");
    let before = counts(node, &counter_id).last().copied().unwrap();
    let out = podsnap(&["pod", "checkpoint", &source, checkpoint.to_str().unwrap()]);
    assert!(out.success(), "{}", out.report());
    ws.remove_pod(&source);

    // Refused: a pod without a user namespace, and one whose mapping covers other container
    // ids (the checkpoint's processes and files hold ids the new mapping would not map alike).
    let pods_before = pod_ids(node);
    let host_users = ws.pod_config(&unique("userns-host"));
    let host_counter = ws.container_config("counter", sh(&script), json!([]));
    let out = restore_created(&checkpoint, &host_users, &[&host_counter]);
    assert!(!out.success(), "restored into the host's user namespace");
    assert!(
        (out.stdout.clone() + &out.stderr).contains("userns_options: checkpoint"),
        "the refusal does not name the user namespace: {}",
        out.report()
    );
    let (shifted, shifted_counter) =
        user_namespace_configs(&ws, &unique("userns-shifted"), RESTORED_HOST_ID, 1, &script);
    let out = restore_created(&checkpoint, &shifted, &[&shifted_counter]);
    assert!(!out.success(), "restored under other container ids");
    assert!(
        (out.stdout.clone() + &out.stderr).contains("userns_options"),
        "the refusal does not name the mapping: {}",
        out.report()
    );
    assert_eq!(
        pod_ids(node),
        pods_before,
        "a refused restore left a sandbox"
    );

    let (restored_config, restored_counter_config) = user_namespace_configs(
        &ws,
        &unique("userns-restored"),
        RESTORED_HOST_ID,
        0,
        &script,
    );
    let restored = ws.restore_started(&checkpoint, &restored_config, &[&restored_counter_config]);
    let restored_counter = container_named(node, &restored, "counter");
    let ip = pod_ip(&restored);
    let serve = |port: u16| http_get_at(&ip, port, "");
    wait_for("the restored pod to serve and count on", LIVENESS, || {
        let served = serve(80)?;
        let seen = counts(node, &restored_counter);
        if served.contains(&marker) && seen.len() >= 2 {
            Ok(())
        } else {
            Err(format!("served {served:?}, counts {seen:?}"))
        }
    });
    let first = counts(node, &restored_counter)[0];
    assert!(first > before, "counted from {first}, not on from {before}");

    // In the new sandbox's user namespace, under the new mapping.
    let sandbox_pid = pid_in(&node.inspect_pod(&restored));
    let counter_pid = pid_in(&node.inspect(&restored_counter));
    assert_eq!(
        user_namespace_of(counter_pid),
        user_namespace_of(sandbox_pid),
        "the restored counter is not in its pod's user namespace"
    );
    let status = std::fs::read_to_string(format!("/proc/{counter_pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid_line.split_whitespace().nth(1),
        Some(RESTORED_HOST_ID.to_string().as_str()),
        "the restored counter does not run as the new mapping's root: {uid_line}"
    );
    let run = |script: &str| {
        let out = node.crictl_try(["exec", &restored_counter, "sh", "-c", script]);
        assert!(out.success(), "{script}: {}", out.report());
        out.stdout.trim().to_string()
    };
    assert_eq!(
        run("cat /proc/self/uid_map")
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["0", &RESTORED_HOST_ID.to_string(), "65536"]
    );
    // Its writable layer came back with the ids it wrote it under, in the new mapping.
    assert_eq!(
        run("cat /state; stat -c %u:%g /state /www/index.html"),
        "written\n0:0\n0:0"
    );
    // Root in the pod's user namespace binds a port below 1024 in the pod's network namespace.
    run("httpd -p 81 -h /www");
    wait_for(
        "the restored container to serve on port 81",
        LIVENESS,
        || serve(81).and_then(|s| if s.contains(&marker) { Ok(()) } else { Err(s) }),
    );
    ws.remove_pod(&restored);
}

/// The cgroup v1 controllers youki's libcgroups moves a container's processes into.
const LIBCGROUPS_V1: [&str; 12] = [
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "hugetlb",
    "memory",
    "pids",
    "perf_event",
    "blkio",
    "net_cls",
    "net_prio",
    "freezer",
];

/// The cgroup paths of `pid` (`/proc/<pid>/cgroup`) whose hierarchy holds controllers: every
/// v1 controller hierarchy (not the named ones such as name=systemd), or the v2 one on a host
/// without v1 controllers; `None` when the process is gone.
fn controller_cgroups(pid: u64) -> Option<Vec<(String, String)>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let lines: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| {
            let mut fields = l.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            Some((controllers.to_string(), path.to_string()))
        })
        .collect();
    let v1: Vec<(String, String)> = lines
        .iter()
        .filter(|(c, _)| !c.is_empty() && !c.starts_with("name="))
        .cloned()
        .collect();
    Some(if v1.is_empty() {
        lines.into_iter().filter(|(c, _)| c.is_empty()).collect()
    } else {
        v1
    })
}

/// Asserts that `cgroups` (of `pid`, as [`controller_cgroups`] lists them) are some, and every
/// one of them `container`'s own.
fn assert_in_cgroups_of(container: &str, pid: u64, cgroups: &[(String, String)]) {
    assert!(!cgroups.is_empty(), "no controller cgroups for pid {pid}");
    for (controllers, path) in cgroups {
        assert!(
            path.ends_with(&format!("/{container}")),
            "pid {pid} is in {controllers} cgroup {path}, not its container's ({container})"
        );
    }
}

/// A restored container runs in its own cgroup, under the new container config's memory limit
/// rather than anything the checkpoint held: the restored init, and a process it forks after
/// the restore, are in the cgroup named after the new container in every controller hierarchy
/// (CRIU moves the restored tasks there itself), and that cgroup's memory limit is the one the
/// new config sets (the source had none). The source, started afresh, is in its own too.
#[test]
fn podsnap_restored_container_runs_in_its_own_cgroup_under_the_new_configs_memory_limit() {
    const LIMIT: u64 = 96 << 20;
    let node = Node::get();
    let mut ws = Workspace::new("cgroups");
    let script = "i=0; while true; do i=$((i+1)); echo count=$i; sleep 0.2; done";
    let counter = ws.container_config("counter", sh(script), json!([]));
    let config = ws.pod_config(&unique("cgroups"));
    let source = ws.run_pod(Handler::Podsnap, &config);
    let source_counter = ws.run_container(&source, &counter, &config);
    wait_for("the source to count", LIVENESS, || {
        match counts(node, &source_counter).last() {
            Some(n) if *n >= 3 => Ok(()),
            n => Err(format!("count {n:?}")),
        }
    });
    // A container started afresh joins its cgroup as libcgroups' manager moves it (its
    // intermediate process moves itself), in the hierarchies that manager knows (on v1 not
    // misc or rdma, which CRIU's restore below covers): the same check as for the restored one.
    let source_init = pid_in(&node.inspect(&source_counter));
    let managed: Vec<(String, String)> = controller_cgroups(source_init)
        .expect("the source runs")
        .into_iter()
        .filter(|(controllers, _)| {
            controllers.is_empty() || controllers.split(',').any(|c| LIBCGROUPS_V1.contains(&c))
        })
        .collect();
    assert_in_cgroups_of(&source_counter, source_init, &managed);
    let checkpoint = ws.checkpoint_dir("checkpoint");
    let before = counts(node, &source_counter).last().copied().unwrap();
    let out = podsnap(&["pod", "checkpoint", &source, checkpoint.to_str().unwrap()]);
    assert!(out.success(), "{}", out.report());
    ws.remove_pod(&source);

    let limited = ws.write(
        "limited.json",
        &json!({
            "metadata": {"name": "counter"},
            "image": {"image": BUSYBOX},
            "command": sh(script),
            "log_path": "limited.log",
            "linux": {
                "resources": {"memory_limit_in_bytes": LIMIT},
                "security_context": {"namespace_options": {"pid": 1}},
            },
        }),
    );
    let restored = ws.restore_started(
        &checkpoint,
        &ws.pod_config(&unique("cgroups-restored")),
        &[&limited],
    );
    let restored_counter = container_named(node, &restored, "counter");
    wait_for(
        "the restored counter to count on",
        LIVENESS,
        || match counts(node, &restored_counter).len() {
            n if n >= 2 => Ok(()),
            n => Err(format!("{n} counts")),
        },
    );
    // Restored, not started afresh: it counts on from where the checkpoint left it.
    let first = counts(node, &restored_counter)[0];
    assert!(first > before, "counted from {first}, not on from {before}");
    let init = pid_in(&node.inspect(&restored_counter));
    let cgroups = controller_cgroups(init).expect("the restored init runs");
    assert_in_cgroups_of(&restored_counter, init, &cgroups);
    // A child forked after the restore (the loop's `sleep`, alive 0.2 s) inherits that cgroup.
    let child_cgroups = wait_for("a child of the restored init", LIVENESS, || {
        let children = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
            .unwrap_or_default();
        children
            .split_whitespace()
            .filter_map(|p| controller_cgroups(p.parse().ok()?))
            .next()
            .ok_or_else(|| "no child".to_string())
    });
    assert_eq!(
        child_cgroups, cgroups,
        "a child of the restored init is not in its cgroup"
    );
    let memory_limit = cgroups
        .iter()
        .find(|(c, _)| c.split(',').any(|c| c == "memory"))
        .map(|(_, path)| format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"))
        .unwrap_or_else(|| format!("/sys/fs/cgroup{}/memory.max", cgroups[0].1));
    let limit = std::fs::read_to_string(&memory_limit)
        .unwrap_or_else(|e| panic!("read {memory_limit}: {e}"));
    assert_eq!(
        limit.trim(),
        LIMIT.to_string(),
        "{memory_limit} is not the new config's limit"
    );
    ws.remove_pod(&restored);
}

//! Pods on the real node through CRI (`crictl`) and containerd (`ctr`): lifecycle, networking,
//! exit codes, errors, OOM, pause/resume, stats, a killed shim, a bad bundle, runc parity and
//! terminals. Run with `cargo test -p podsnap-e2e -- --test-threads=1` against a node started
//! by `hack/node-up.sh`.

#![forbid(unsafe_code)]

use std::os::unix::fs::DirBuilderExt;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use podsnap_e2e::{
    CRI_NAMESPACE, CommandLine, ContainerConfig, CtrContainer, Handler, Node, Pod,
    assert_nothing_left, leaks, pod::exit_code_in, serving_shim, shim_processes, wait_for,
};

/// Liveness deadline for a container to reach a state or print something.
const LIVENESS: Duration = Duration::from_secs(30);

/// A token no other test (or earlier run) prints.
fn token(what: &str) -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("{what}-{}-{nanos}", std::process::id())
}

fn wait_for_state(node: &Node, container_id: &str, state: &str) -> serde_json::Value {
    wait_for(
        format_args!("container {container_id} to be {state}"),
        LIVENESS,
        || {
            let inspect = node.inspect(container_id);
            if inspect["status"]["state"] == state {
                Ok(inspect)
            } else {
                Err(format!("{}", inspect["status"]))
            }
        },
    )
}

fn wait_for_log(pod: &Pod, container_id: &str, needles: &[&str]) -> String {
    wait_for(
        format_args!("the log of {container_id} to show {needles:?}"),
        LIVENESS,
        || {
            let logs = pod.logs(container_id);
            if needles.iter().all(|n| logs.contains(n)) {
                Ok(logs)
            } else {
                Err(logs)
            }
        },
    )
}

/// runp, create, start, logs, exec, stop, rm, rmp on `handler`, then a leak check.
fn single_container_lifecycle(handler: Handler) {
    let node = Node::get();
    let mut pod = Pod::run(handler, "lifecycle");
    let out_token = token("stdout");
    let err_token = token("stderr");
    let c = pod.run_container(&ContainerConfig::shell(
        "main",
        &format!("echo {out_token}; echo {err_token} >&2; exec sleep 600"),
    ));
    wait_for_log(&pod, &c, &[&out_token, &err_token]);
    assert_eq!(node.container_state(&c), "CONTAINER_RUNNING");
    if handler == Handler::Podsnap {
        // One shim per pod: the container is served by the sandbox's shim, not one of its own.
        assert!(
            serving_shim(handler, &pod.id).is_some(),
            "no podsnap shim runs with -id {}",
            pod.id
        );
        assert_eq!(
            shim_processes(handler, &c),
            Vec::new(),
            "a shim of its own for {c}"
        );
    }

    // The leak checks must see a live pod, or their silence after removal proves nothing.
    let live = leaks::remains(node, &pod.footprint());
    for kind in [
        "shim process ",
        "process ",
        "cgroup ",
        "mount ",
        "runtime state ",
        "task bundle ",
    ] {
        assert!(
            live.iter().any(|l| l.starts_with(kind)),
            "the leak check does not see the live pod's {kind:?}; it sees:\n  {}",
            live.join("\n  ")
        );
    }

    let exec = pod.exec(&c, &["sh", "-c", "echo exec-$((6 * 7))"]);
    assert_eq!((exec.code, exec.stdout.trim()), (0, "exec-42"), "{exec:?}");
    let exec = pod.exec(&c, &["sh", "-c", "echo exec-err >&2; exit 4"]);
    assert_eq!(exec.code, 4, "{exec:?}");
    assert!(exec.stderr.contains("exec-err"), "{exec:?}");

    pod.stop(&c, 10);
    let inspect = wait_for_state(node, &c, "CONTAINER_EXITED");
    // sleep is not the pod's PID 1 (the PID namespace is the pod's): SIGTERM ends it.
    assert_eq!(
        inspect["status"]["exitCode"], 143,
        "exit code of a SIGTERMed container: {}",
        inspect["status"]
    );
    pod.remove_container(&c);
    assert_nothing_left(node, &pod.container_footprint(&c));

    let footprint = pod.remove();
    assert_nothing_left(node, &footprint);
}

#[test]
fn podsnap_single_container_pod_runs_logs_execs_stops_and_is_removed_without_leaks() {
    single_container_lifecycle(Handler::Podsnap);
}

#[test]
fn podsnap_pod_idle_past_its_zygote_still_creates_and_execs_and_is_removed_without_leaks() {
    let node = Node::get();
    let mut pod = Pod::run(Handler::Podsnap, "zygote-idle");
    let c = pod.run_container(&ContainerConfig::shell("main", "exec sleep 600"));
    wait_for_state(node, &c, "CONTAINER_RUNNING");
    let zygotes = || {
        shim_processes(Handler::Podsnap, &pod.id)
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{}/comm", p.pid))
                    .is_ok_and(|comm| comm.trim() == "podsnap-zygote")
            })
            .count()
    };
    assert_eq!(zygotes(), 1, "the shim forks its zygote at start");
    // Idle for 30 s, the zygote is let go: the pod's shim is one process.
    wait_for(
        "the idle zygote to exit",
        Duration::from_secs(90),
        || match zygotes() {
            0 => Ok(()),
            n => Err(format!("{n} zygote(s)")),
        },
    );
    assert_eq!(node.container_state(&c), "CONTAINER_RUNNING");
    // An exec and a new container need one: it is spawned again.
    let exec = pod.exec(&c, &["sh", "-c", "echo exec-$((6 * 7))"]);
    assert_eq!((exec.code, exec.stdout.trim()), (0, "exec-42"), "{exec:?}");
    assert_eq!(zygotes(), 1, "an exec spawns the zygote again");
    let token = token("second");
    let second = pod.run_container(&ContainerConfig::shell(
        "second",
        &format!("echo {token}; exec sleep 600"),
    ));
    wait_for_log(&pod, &second, &[&token]);
    let footprint = pod.remove();
    assert_nothing_left(node, &footprint);
}

#[test]
fn runc_single_container_pod_lifecycle_matches_podsnap() {
    single_container_lifecycle(Handler::Runc);
}

#[test]
fn podsnap_two_containers_of_a_pod_share_its_network_namespace_and_leave_nothing() {
    let node = Node::get();
    let mut pod = Pod::run(Handler::Podsnap, "two");
    let page = token("page");
    let web = pod.run_container(&ContainerConfig::shell(
        "web",
        &format!("mkdir -p /tmp/www && echo {page} > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"),
    ));
    let client = pod.run_container(&ContainerConfig::shell("client", "exec sleep 600"));
    for c in [&web, &client] {
        wait_for_state(node, c, "CONTAINER_RUNNING");
    }
    let listed = node.crictl(["ps", "-q", "--pod", &pod.id]);
    for c in [&web, &client] {
        assert!(
            listed.lines().any(|l| l.trim() == c),
            "{c} not in crictl ps:\n{listed}"
        );
    }

    // 127.0.0.1 is per network namespace: reaching web's server there proves they share one.
    let fetched = wait_for(
        "the client to fetch the web container's page from 127.0.0.1:8080",
        LIVENESS,
        || {
            let exec = pod.exec(
                &client,
                // No -T: Debian's static busybox wget crashes (SIGSEGV) with a timeout.
                &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/index.html"],
            );
            if exec.code == 0 {
                Ok(exec.stdout)
            } else {
                Err(format!("{exec:?}"))
            }
        },
    );
    assert_eq!(fetched.trim(), page);
    let netns = |c: &str| {
        let exec = pod.exec(c, &["readlink", "/proc/self/ns/net"]);
        assert_eq!(exec.code, 0, "{exec:?}");
        exec.stdout.trim().to_string()
    };
    assert_eq!(netns(&web), netns(&client));
    let host_netns = std::fs::read_link("/proc/self/ns/net").expect("read our netns");
    assert_ne!(
        netns(&web),
        host_netns.to_string_lossy(),
        "the pod runs in the host's netns"
    );

    let footprint = pod.remove();
    assert_nothing_left(node, &footprint);
}

#[test]
fn podsnap_container_exit_code_and_exec_exit_codes_are_reported() {
    let node = Node::get();
    let mut pod = Pod::run(Handler::Podsnap, "exit-codes");
    let exits = pod.run_container(&ContainerConfig::shell("exits", "echo bye; exit 3"));
    let inspect = wait_for_state(node, &exits, "CONTAINER_EXITED");
    assert_eq!(inspect["status"]["exitCode"], 3, "{}", inspect["status"]);
    assert_eq!(
        inspect["status"]["reason"], "Error",
        "{}",
        inspect["status"]
    );

    let runs = pod.run_container(&ContainerConfig::shell("runs", "exec sleep 600"));
    wait_for_state(node, &runs, "CONTAINER_RUNNING");
    let exec = pod.exec(&runs, &["sh", "-c", "exit 5"]);
    assert_eq!(exec.code, 5, "crictl exec: {exec:?}");
    // ctr exits with the exec'd process's code itself.
    let out = node.ctr_try(
        CRI_NAMESPACE,
        [
            "task",
            "exec",
            "--exec-id",
            "e2e-exit-6",
            &runs,
            "sh",
            "-c",
            "exit 6",
        ],
    );
    assert_eq!(out.code, Some(6), "{}", out.report());

    let footprint = pod.remove();
    assert_nothing_left(node, &footprint);
}

#[test]
fn podsnap_task_errors_name_the_container() {
    let node = Node::get();
    let task =
        CtrContainer::run_detached(Handler::Podsnap, "errors", &["sh", "-c", "exec sleep 600"]);
    wait_for("the ctr task to run", LIVENESS, || match task.status() {
        Some(s) if s == "RUNNING" => Ok(()),
        other => Err(format!("{other:?}")),
    });
    let fails_naming = |what: &str, out: podsnap_e2e::Finished, also: &str| {
        assert!(!out.success(), "{what} succeeded:\n{}", out.report());
        assert!(
            out.stderr.contains(&task.id) && out.stderr.contains(also),
            "{what}: the error does not name {} and {also:?}:\n{}",
            task.id,
            out.report()
        );
    };

    fails_naming(
        "kill of an unknown exec id",
        task.task("kill", &["--exec-id", "no-such-exec"], &[]),
        "no-such-exec",
    );

    let out = task.task("kill", &["--signal", "SIGKILL"], &[]);
    assert!(out.success(), "{}", out.report());
    wait_for("the killed task to stop", LIVENESS, || {
        match task.status() {
            Some(s) if s == "STOPPED" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    fails_naming("kill of an exited task", task.task("kill", &[], &[]), "");
    fails_naming(
        "exec in an exited task",
        task.task("exec", &["--exec-id", "late"], &["true"]),
        "",
    );
    fails_naming("pause of an exited task", task.task("pause", &[], &[]), "");

    let out = task.task("delete", &[], &[]);
    assert!(out.success(), "{}", out.report());
    assert_nothing_left(node, &task.footprint());
}

#[test]
fn podsnap_cri_calls_on_exited_or_removed_containers_name_the_container() {
    let node = Node::get();
    let mut pod = Pod::run(Handler::Podsnap, "cri-errors");
    let c = pod.run_container(&ContainerConfig::shell("short", "exit 0"));
    wait_for_state(node, &c, "CONTAINER_EXITED");
    let out = node.crictl_try(["exec", &c, "true"]);
    assert!(
        !out.success() && out.stderr.contains(&c),
        "exec in an exited container:\n{}",
        out.report()
    );
    pod.remove_container(&c);
    let out = node.crictl_try(["start", &c]);
    assert!(
        !out.success() && out.stderr.contains(&c),
        "start of a removed container:\n{}",
        out.report()
    );
    let footprint = pod.remove();
    assert_nothing_left(node, &footprint);
}

#[test]
fn podsnap_container_over_its_memory_limit_is_oom_killed() {
    let node = Node::get();
    let mut pod = Pod::run(Handler::Podsnap, "oom");
    // tail keeps a line in memory until it ends: 200 MiB without a newline, 32 MiB allowed.
    let c = pod.run_container(
        &ContainerConfig::shell("hog", "echo start; head -c 200m /dev/zero | tail")
            .memory_limit(32 << 20),
    );
    let inspect = wait_for_state(node, &c, "CONTAINER_EXITED");
    assert_eq!(
        inspect["status"]["reason"], "OOMKilled",
        "{}",
        inspect["status"]
    );
    assert_eq!(inspect["status"]["exitCode"], 137, "{}", inspect["status"]);
    assert!(pod.logs(&c).contains("start"));
    let footprint = pod.remove();
    assert_nothing_left(node, &footprint);
}

/// The last number a counting container logged.
fn last_count(pod: &Pod, name: &str) -> u64 {
    std::fs::read_to_string(pod.log_path(name))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .next_back()
        .unwrap_or(0)
}

#[test]
fn podsnap_ctr_pause_freezes_a_cri_container_and_resume_continues_it() {
    let node = Node::get();
    let mut pod = Pod::run(Handler::Podsnap, "pause");
    let c = pod.run_container(&ContainerConfig::shell(
        "counter",
        "i=0; while true; do i=$((i + 1)); echo $i; sleep 0.1; done",
    ));
    wait_for("the counter to count", LIVENESS, || {
        match last_count(&pod, "counter") {
            n if n >= 3 => Ok(n),
            n => Err(format!("count {n}")),
        }
    });
    let status = || node.task_status(CRI_NAMESPACE, &c);

    node.ctr(CRI_NAMESPACE, ["task", "pause", &c]);
    wait_for("the task to be PAUSED", LIVENESS, || match status() {
        Some(s) if s == "PAUSED" => Ok(()),
        other => Err(format!("{other:?}")),
    });
    let freezer = std::path::Path::new("/sys/fs/cgroup/freezer")
        .join(CRI_NAMESPACE)
        .join(&c)
        .join("freezer.state");
    if freezer.exists() {
        let state = std::fs::read_to_string(&freezer).expect("read freezer.state");
        assert_eq!(state.trim(), "FROZEN", "{}", freezer.display());
    }
    // Let output already on its way land (through the shim, containerd and the CRI log),
    // then the count must stand still. A counter that runs on never settles here either.
    let frozen_at = wait_for("the paused counter's output to settle", LIVENESS, || {
        let before = last_count(&pod, "counter");
        std::thread::sleep(Duration::from_millis(500));
        match last_count(&pod, "counter") {
            after if after == before => Ok(after),
            after => Err(format!("count went from {before} to {after}")),
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        last_count(&pod, "counter"),
        frozen_at,
        "the counter ran while paused"
    );

    node.ctr(CRI_NAMESPACE, ["task", "resume", &c]);
    wait_for("the task to be RUNNING again", LIVENESS, || {
        match status() {
            Some(s) if s == "RUNNING" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    wait_for("the counter to continue", LIVENESS, || {
        match last_count(&pod, "counter") {
            n if n > frozen_at => Ok(()),
            n => Err(format!("count {n}, paused at {frozen_at}")),
        }
    });
    let footprint = pod.remove();
    assert_nothing_left(node, &footprint);
}

#[test]
fn podsnap_crictl_stats_reports_memory_and_cpu_of_a_running_container() {
    let node = Node::get();
    let mut pod = Pod::run(Handler::Podsnap, "stats");
    let c = pod.run_container(&ContainerConfig::shell(
        "busy",
        "i=0; while [ $i -lt 20000 ]; do i=$((i + 1)); done; echo counted; exec sleep 600",
    ));
    wait_for_log(&pod, &c, &["counted"]);
    let value = |stats: &serde_json::Value, path: &[&str]| -> u64 {
        let mut v = stats;
        for key in path {
            v = &v[*key];
        }
        v["value"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .or_else(|| v["value"].as_u64())
            .unwrap_or(0)
    };
    wait_for("non-zero CPU and memory in crictl stats", LIVENESS, || {
        let stats = podsnap_e2e::node::json(&node.crictl(["stats", "-o", "json", "--id", &c]));
        let stats = &stats["stats"][0];
        let cpu = value(stats, &["cpu", "usageCoreNanoSeconds"]);
        let memory = value(stats, &["memory", "workingSetBytes"]);
        if stats["attributes"]["id"] == c.as_str() && cpu > 0 && memory > 0 {
            Ok(())
        } else {
            Err(format!("cpu {cpu} ns, working set {memory} B: {stats}"))
        }
    });
    let footprint = pod.remove();
    assert_nothing_left(node, &footprint);
}

/// Where a podsnap shim expands a compressed checkpoint's page images for a restore.
const SCRATCH_ROOT: &str = "/var/lib/podsnap/scratch";

/// SIGKILLs the shim serving `pod` and waits until it is gone.
fn kill_shim(handler: Handler, pod: &Pod) {
    let shim = serving_shim(handler, &pod.id)
        .unwrap_or_else(|| panic!("no {} shim runs with -id {}", handler.name(), pod.id));
    kill(Pid::from_raw(shim.pid), Signal::SIGKILL).expect("SIGKILL the shim");
    wait_for(
        format_args!("shim {} to die", shim.pid),
        LIVENESS,
        || match serving_shim(handler, &pod.id) {
            Some(p) if p.pid == shim.pid => Err(format!("{p}")),
            _ => Ok(()),
        },
    );
}

/// SIGKILLs the pod's shim while a container runs, then `crictl rmp -f` must clean up, a
/// podsnap shim's scratch directory of page images included.
fn pod_with_sigkilled_shim_is_removed_without_leaks(handler: Handler) {
    let node = Node::get();
    let mut pod = Pod::run(handler, "shim-killed");
    let c = pod.run_container(&ContainerConfig::shell("victim", "exec sleep 600"));
    wait_for_state(node, &c, "CONTAINER_RUNNING");
    // What a podsnap shim killed mid-restore leaves: its scratch directory of expanded page
    // images (the pod's memory), named by the shim (pid and start time).
    // One named by a process that runs (this test) must stay.
    let scratch = (handler == Handler::Podsnap).then(|| {
        let shim = serving_shim(handler, &pod.id).expect("the pod's shim");
        let root = std::path::Path::new(SCRATCH_ROOT);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)
            .unwrap();
        let plant = |pid: u32, what: &str| {
            let dir = root.join(format!("restore-{pid}-{}-e2e-{what}", start_time(pid)));
            std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
            std::fs::write(dir.join("pages-1.img"), b"the pod's memory").unwrap();
            dir
        };
        // One of the dead shim's that cannot be moved (immutable): the sweep in `delete` says
        // so, and containerd logs it.
        let stuck = Immutable::new(plant(shim.pid as u32, "stuck"));
        (
            plant(shim.pid as u32, "dead"),
            plant(std::process::id(), "live"),
            stuck,
        )
    });
    kill_shim(handler, &pod);
    let footprint = pod.force_remove();
    assert_nothing_left(node, &footprint);
    if let Some((dead, live, stuck)) = scratch {
        // containerd runs the shim binary's `delete` after a dead shim, which sweeps them.
        wait_for(
            format_args!("{} to be removed", dead.display()),
            LIVENESS,
            || {
                if dead.exists() {
                    Err(format!("{} is still there", dead.display()))
                } else {
                    Ok(())
                }
            },
        );
        // The sweep that removed it may not have looked at the live one yet: wait for every
        // `delete` of the shim binary to end first.
        wait_for("the shims' deletes to end", LIVENESS, || {
            let deleting = shim_deletes();
            if deleting.is_empty() {
                Ok(())
            } else {
                Err(format!("still running: {deleting:?}"))
            }
        });
        let kept = live.join("pages-1.img").exists();
        std::fs::remove_dir_all(&live).unwrap();
        assert!(kept, "{} of a running process was removed", live.display());
        // containerd logs a delete's stderr once it reaped it.
        wait_for(
            format_args!(
                "containerd to log the delete's warning about {}",
                stuck.0.display()
            ),
            LIVENESS,
            || {
                let warned = std::fs::read_to_string(&node.containerd_log)
                    .unwrap_or_default()
                    .lines()
                    .any(|l| {
                        l.contains("while cleaning up dead shim")
                            && l.contains(&*stuck.0.to_string_lossy())
                    });
                if warned {
                    Ok(())
                } else {
                    Err("no such line in containerd's log".to_string())
                }
            },
        );
    }
}

/// A directory made immutable (`chattr +i`: not even root may rename or remove it), made
/// mutable again and removed when dropped.
struct Immutable(std::path::PathBuf);

impl Immutable {
    /// Makes `dir` immutable, after removing what a test killed before its drop left of the
    /// same kind (an immutable directory named like it stays otherwise, whatever sweeps it).
    fn new(dir: std::path::PathBuf) -> Immutable {
        let suffix = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.rsplit_once("-e2e-"))
            .map(|(_, what)| format!("-e2e-{what}"))
            .expect("a planted directory's name");
        for entry in std::fs::read_dir(dir.parent().unwrap()).unwrap().flatten() {
            let path = entry.path();
            if path != dir && path.to_string_lossy().ends_with(&suffix) {
                drop(Immutable(path));
            }
        }
        let status = std::process::Command::new("chattr")
            .arg("+i")
            .arg(&dir)
            .status()
            .expect("run chattr");
        assert!(status.success(), "chattr +i {}: {status}", dir.display());
        Immutable(dir)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The processes running the podsnap shim binary's `delete`.
fn shim_deletes() -> Vec<String> {
    podsnap_e2e::leaks::host_processes()
        .into_iter()
        .filter(|p| {
            p.argv.first().is_some_and(|exe| {
                std::path::Path::new(exe)
                    .file_name()
                    .and_then(|n| n.to_str())
                    == Some(Handler::Podsnap.shim_binary())
            }) && p.argv.iter().any(|a| a == "delete")
        })
        .map(|p| p.to_string())
        .collect()
}

/// The start time of process `pid` (clock ticks since boot, field 22 of its stat).
fn start_time(pid: u32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .expect("a start time")
        .to_string()
}

#[test]
fn podsnap_pod_whose_shim_was_sigkilled_is_removed_by_rmp_force_without_leaks() {
    pod_with_sigkilled_shim_is_removed_without_leaks(Handler::Podsnap);
}

#[test]
fn runc_pod_whose_shim_was_sigkilled_is_removed_by_rmp_force_without_leaks() {
    pod_with_sigkilled_shim_is_removed_without_leaks(Handler::Runc);
}

#[test]
fn podsnap_ctr_run_with_missing_rootfs_or_malformed_bundle_fails_naming_the_container_and_leaves_nothing()
 {
    let node = Node::get();
    let missing = CtrContainer::unstarted(Handler::Podsnap, "no-rootfs");
    let rootfs = format!("/nonexistent/{}", missing.id);
    let out = missing.run(&["--rootfs", &rootfs], &["sh", "-c", "true"]);
    assert!(
        !out.success(),
        "ctr run with rootfs {rootfs} succeeded:\n{}",
        out.report()
    );
    assert!(
        out.stderr.contains(&missing.id) && out.stderr.contains("rootfs"),
        "the error does not name {} and its rootfs:\n{}",
        missing.id,
        out.report()
    );
    assert_nothing_left(node, &missing.footprint());

    // A rootfs without the program to run: the error comes from creating the container.
    let empty = tempfile::tempdir().expect("temporary rootfs");
    let no_program = CtrContainer::unstarted(Handler::Podsnap, "empty-rootfs");
    let out = no_program.run(
        &["--rootfs", &empty.path().to_string_lossy()],
        &["/bin/sh", "-c", "true"],
    );
    assert!(
        !out.success(),
        "ctr run on an empty rootfs succeeded:\n{}",
        out.report()
    );
    assert!(
        out.stderr.contains(&no_program.id),
        "the error does not name {}:\n{}",
        no_program.id,
        out.report()
    );
    assert_nothing_left(node, &no_program.footprint());

    // A malformed bundle: its config.json has no process to run.
    let spec_dir = tempfile::tempdir().expect("temporary spec directory");
    let spec = spec_dir.path().join("config.json");
    let spec_json = serde_json::json!({
        "ociVersion": "1.0.2",
        "root": { "path": empty.path() },
        "linux": { "namespaces": [{ "type": "mount" }] },
    });
    std::fs::write(&spec, spec_json.to_string()).expect("write the spec");
    let malformed = CtrContainer::unstarted(Handler::Podsnap, "no-process");
    let out = malformed.run(&["--config", &spec.to_string_lossy()], &[]);
    assert!(
        !out.success(),
        "ctr run of a spec without process succeeded:\n{}",
        out.report()
    );
    assert!(
        out.stderr.contains(&malformed.id) && out.stderr.contains("process"),
        "the error does not name {} and the missing process:\n{}",
        malformed.id,
        out.report()
    );
    assert_nothing_left(node, &malformed.footprint());
}

/// A container with a network namespace of its own (ctr's default, no CNI) must get its
/// loopback interface up, as runc brings it up: 127.0.0.1 is unreachable otherwise.
fn new_network_namespace_has_loopback_up(handler: Handler) {
    let node = Node::get();
    let container = CtrContainer::unstarted(handler, "loopback");
    container.pull_busybox();
    let out = container.run(&[podsnap_e2e::BUSYBOX], &["ip", "-o", "link", "show", "lo"]);
    assert!(out.success(), "{}", out.report());
    assert!(
        out.stdout.contains("<LOOPBACK,UP"),
        "lo is not up in {}'s new network namespace on {}:\n{}",
        container.id,
        handler.name(),
        out.report()
    );
    let out = container.task("delete", &[], &[]);
    assert!(
        out.success() || out.stderr.contains("not found"),
        "{}",
        out.report()
    );
    assert_nothing_left(node, &container.footprint());
}

#[test]
fn podsnap_ctr_container_in_a_new_network_namespace_has_loopback_up() {
    new_network_namespace_has_loopback_up(Handler::Podsnap);
}

#[test]
fn runc_ctr_container_in_a_new_network_namespace_has_loopback_up() {
    new_network_namespace_has_loopback_up(Handler::Runc);
}

#[test]
fn podsnap_tty_container_output_reaches_its_log_and_exec_gets_a_terminal() {
    let node = Node::get();
    let mut pod = Pod::run(Handler::Podsnap, "tty");
    let hello = token("tty");
    let c = pod.run_container(
        &ContainerConfig::shell("term", &format!("echo {hello}; tty; exec sleep 600")).tty(),
    );
    wait_for_log(&pod, &c, &[&hello, "/dev/pts/"]);

    // crictl exec -t needs -i and a terminal of ours: script(1) provides one, fed from a pipe
    // (this process may have no terminal and no stdin), under a deadline like every command.
    let crictl = node.crictl_command(["exec", "-it", &c, "sh"]).display();
    let session = CommandLine::new("script")
        .args(["-q", "-e", "-c", &crictl, "/dev/null"])
        .input("tty; echo tty-exec-$((40 + 2)); exit 7\n")
        .timeout(Duration::from_secs(60))
        .run()
        .unwrap_or_else(|e| panic!("{e}"));
    let output = session.stdout.replace('\r', "");
    assert!(
        output.lines().any(|l| l.starts_with("/dev/pts/")) && output.contains("tty-exec-42"),
        "the exec's terminal session:\n{}",
        session.report()
    );
    assert_eq!(
        exit_code_in(&output).or_else(|| exit_code_in(&session.stderr)),
        Some(7),
        "exit code of the terminal exec:\n{}",
        session.report()
    );
    let footprint = pod.remove();
    assert_nothing_left(node, &footprint);
}

#[test]
fn podsnap_exec_runs_under_the_container_seccomp_filter() {
    let c = CtrContainer::unstarted(Handler::Podsnap, "seccomp-exec");
    c.pull_busybox();
    let out = c.run(
        &["-d", "--seccomp", podsnap_e2e::BUSYBOX],
        &["sleep", "600"],
    );
    assert!(out.success(), "{}", out.report());
    let status = |exec_id: &str, pid: &str| {
        let out = c.task(
            "exec",
            &["--exec-id", exec_id],
            &["grep", "^Seccomp:", &format!("/proc/{pid}/status")],
        );
        assert!(out.success(), "{}", out.report());
        out.stdout
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .to_string()
    };
    // Mode 2 is "filter": the init has the default profile, and so must every exec.
    assert_eq!(
        status("init", "1"),
        "2",
        "the init runs without the seccomp filter"
    );
    assert_eq!(
        status("self", "self"),
        "2",
        "an exec escaped the container's seccomp filter"
    );
}

/// A container joining a pod PID namespace that has used many pids must start: libcontainer
/// once looked its own namespaced pid up in the host's /proc while mounting cgroups
/// (libcontainer-patches/0005) and failed with "failed to prepare rootfs".
#[test]
fn podsnap_container_joining_a_busy_shared_pid_namespace_starts() {
    let node = Node::get();
    // The harness's pods share one PID namespace among their containers (CRI's default).
    let mut pod = Pod::run(Handler::Podsnap, "busy-pidns");
    let busy = pod.run_container(&ContainerConfig::shell(
        "busy",
        "while true; do /bin/true; done",
    ));
    wait_for(
        "the busy container to use up a few thousand pids",
        // 5000 fork and exec beside the probes' crictl exec, on a slow node.
        Duration::from_secs(90),
        || {
            let out = pod.exec(&busy, &["sh", "-c", "/bin/true & echo $!"]);
            let pid: u32 = out.stdout.trim().parse().unwrap_or(0);
            if pid > 5000 {
                Ok(())
            } else {
                Err(format!("last pid {pid}"))
            }
        },
    );
    let second = pod.run_container(&ContainerConfig::shell("second", "exec sleep 600"));
    assert_eq!(node.container_state(&second), "CONTAINER_RUNNING");
    pod.remove();
}

/// A pod with a user namespace of its own mapping container ids 0..65536 to host ids from
/// `host_id`, and the security context its containers repeat it in (as the kubelet sends it).
fn user_namespace_pod_with(handler: Handler, name: &str, host_id: u32) -> (Pod, serde_json::Value) {
    let mapping = serde_json::json!([{"host_id": host_id, "container_id": 0, "length": 65536}]);
    let context = serde_json::json!({"namespace_options": {
        "userns_options": {"mode": 0, "uids": mapping, "gids": mapping}}});
    let pod = Pod::run_with(
        handler,
        name,
        serde_json::json!({"security_context": context}),
    );
    (pod, context)
}

/// A pod with a user namespace of its own (`hostUsers: false`), on `handler`: both containers
/// run as root inside it and as the mapped id outside, share it and the pod's network
/// namespace with the sandbox, see their image's files as root's (idmapped layers), read the
/// bind mounts containerd gives them (behind `0700` directories on the host) and write their
/// rootfs; removal leaves nothing. For podsnap this needs libcontainer fix 6
/// (libcontainer-patches/0006 and 0007), shim/src/idmap.rs and shim/src/mount_sources.rs.
fn user_namespace_pod(handler: Handler) {
    const HOST_ID: u32 = 65536 * 21;
    let node = Node::get();
    let (mut pod, context) = user_namespace_pod_with(handler, "userns", HOST_ID);
    let first = pod.run_container(
        // A loop, not one long sleep: a dump that leaves it running interrupts a sleep, and
        // busybox's sleep then ends early (with or without a user namespace).
        &ContainerConfig::shell(
            "first",
            "echo written > /written; while true; do sleep 1; done",
        )
        .security_context(context.clone()),
    );
    let second = pod.run_container(
        &ContainerConfig::shell("second", "exec sleep 600").security_context(context.clone()),
    );
    for c in [&first, &second] {
        wait_for_state(node, c, "CONTAINER_RUNNING");
    }
    let run = |c: &str, script: &str| {
        let exec = pod.exec(c, &["sh", "-c", script]);
        assert_eq!(exec.code, 0, "{script}: {exec:?}");
        exec.stdout.trim().to_string()
    };
    for c in [&first, &second] {
        let uid_map: Vec<String> = run(c, "cat /proc/self/uid_map")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        assert_eq!(uid_map, ["0", &HOST_ID.to_string(), "65536"], "{c}");
        assert_eq!(run(c, "id -u; id -g"), "0\n0", "{c}");
        // The image's files are root's inside: the layers are idmapped, not shown as nobody.
        assert_eq!(run(c, "stat -c %u:%g /bin/sh /etc"), "0:0\n0:0", "{c}");
        // containerd's bind mounts, staged by the shim: readable inside.
        assert!(!run(c, "cat /etc/hostname").is_empty(), "{c}");
        assert!(
            run(c, "cat /etc/resolv.conf; echo read").ends_with("read"),
            "{c}"
        );
    }
    assert_eq!(
        run(&first, "cat /written; stat -c %u /written"),
        "written\n0"
    );
    let ns = |c: &str, kind: &str| run(c, &format!("readlink /proc/self/ns/{kind}"));
    for kind in ["user", "net"] {
        assert_eq!(ns(&first, kind), ns(&second, kind), "{kind} namespace");
    }
    let host_userns = std::fs::read_link("/proc/self/ns/user").expect("read our user namespace");
    assert_ne!(ns(&first, "user"), host_userns.to_string_lossy());
    // Outside, the container's root is the mapped id.
    let pid = node.inspect(&first)["info"]["pid"]
        .as_u64()
        .expect("the first container's pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let uids = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .expect("a Uid line")
        .split_whitespace()
        .collect::<Vec<_>>();
    assert_eq!(uids, vec![HOST_ID.to_string(); 4], "{status}");

    if handler == Handler::Podsnap {
        // This pod shares one process namespace (CRI's default pid mode, POD) as well as its
        // user namespace: not checkpointed (the patched CRIU cannot join both at restore),
        // refused before anything is frozen or written, and the container runs on. (A pod
        // with a process namespace per container, the kubelet's default, is checkpointed and
        // restored: e2e pod_checkpoint.rs and cluster.rs.)
        let images = tempfile::tempdir().expect("a temporary directory");
        let images = images.path().join("images");
        let refused = node.ctr_try(
            podsnap_e2e::CRI_NAMESPACE,
            [
                "task",
                "checkpoint",
                "--image-path",
                images.to_str().unwrap(),
                first.as_str(),
            ],
        );
        assert_ne!(refused.code, Some(0), "{refused:?}");
        assert!(
            refused
                .stderr
                .contains("shares its pod's process namespace"),
            "{refused:?}"
        );
        assert!(
            !images.exists(),
            "a refused checkpoint wrote {}",
            images.display()
        );
        assert_eq!(
            node.task_status(podsnap_e2e::CRI_NAMESPACE, &first)
                .as_deref(),
            Some("RUNNING")
        );
        assert_eq!(run(&first, "echo alive"), "alive");
    }

    let footprint = pod.remove();
    assert_nothing_left(node, &footprint);
}

#[test]
fn podsnap_user_namespace_pod_runs_as_the_mapped_ids_and_leaves_nothing() {
    user_namespace_pod(Handler::Podsnap);
}

#[test]
fn runc_user_namespace_pod_matches_podsnap() {
    user_namespace_pod(Handler::Runc);
}

/// A user-namespace pod whose shim was SIGKILLed is removed without touching what it mounted:
/// the shim stages its bind sources inside the bundle (shim/src/mount_sources.rs), containerd
/// removes the bundle after the dead shim's cleanup, and that cleanup must detach them first,
/// or the removal would descend into them and delete a host directory's files.
#[test]
fn podsnap_user_namespace_pod_whose_shim_was_sigkilled_leaves_its_host_path_intact() {
    let node = Node::get();
    let host = tempfile::tempdir().expect("a host directory");
    std::fs::write(host.path().join("keep"), "kept").unwrap();
    let (mut pod, context) = user_namespace_pod_with(Handler::Podsnap, "userns-killed", 65536 * 22);
    let c = pod.run_container(
        &ContainerConfig::shell("victim", "exec sleep 600")
            .security_context(context.clone())
            .mount(host.path(), "/data"),
    );
    wait_for_state(node, &c, "CONTAINER_RUNNING");
    let exec = pod.exec(&c, &["cat", "/data/keep"]);
    assert_eq!((exec.code, exec.stdout.as_str()), (0, "kept"), "{exec:?}");
    kill_shim(Handler::Podsnap, &pod);
    let footprint = pod.force_remove();
    assert_nothing_left(node, &footprint);
    assert_eq!(
        std::fs::read_to_string(host.path().join("keep"))
            .ok()
            .as_deref(),
        Some("kept"),
        "the host directory lost its file"
    );
}

//! Fault injection into a pod checkpoint through podsnapd's CRI (`CheckpointPod`), on the node
//! from `hack/node-up.sh`: CRIU, podsnapd or containerd SIGKILLed while a pod with 1 GiB of
//! touched memory is being captured, and an output directory whose filesystem is too small.
//!
//! After each fault: no cgroup of the pod is left frozen, no CRIU of the pod's shim is left
//! running, the output directory holds no partial checkpoint, the pod's containers run on with
//! their memory intact (memtest checks every word), and the caller was told why. Each test first
//! checks that the fault really struck mid-capture (pod frozen, CRIU writing into the output
//! directory), so what it asserts afterwards is the handling of the fault, not its absence.
//! Killed node daemons are started again as `hack/node-up.sh` starts them, on failure too.
//!
//! Run with `cargo test -p podsnap-e2e --test faults -- --test-threads=1` (no cluster up: a
//! kubelet would remove the pods these tests create through CRI).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use podsnap_e2e::cri_workspace::{
    Cri, HogPod, Stopped, Workspace, assert_status, entries, freezer_state, node_run, wait_empty,
};
use podsnap_e2e::leaks::{HostProcess, host_processes};
use podsnap_e2e::{CommandLine, Handler, Node, serving_shim, wait_for};

/// How long a thaw, a cleanup or a container may take to show (liveness, not speed).
const LIVENESS: Duration = Duration::from_secs(60);

/// How long a capture podsnapd no longer waits for may take to end and clean up after itself
/// (a 1 GiB dump, then hashing it, in a debug build).
const CAPTURE_END: Duration = Duration::from_secs(300);

/// The memory the hog of a mid-capture test touches: its dump takes seconds.
const HOG_MIB: u32 = 1024;

/// The CRIU processes (`comm` criu) descended from the pod's serving shim: CRIU's swrk, which
/// the shim starts, and whatever it forked.
fn criu_of_shim(pod: &str) -> Vec<HostProcess> {
    let Some(shim) = serving_shim(Handler::Podsnap, pod) else {
        return Vec::new();
    };
    let processes = host_processes();
    let mut below = vec![shim.pid];
    let mut grew = true;
    while grew {
        grew = false;
        for p in &processes {
            if below.contains(&p.ppid) && !below.contains(&p.pid) {
                below.push(p.pid);
                grew = true;
            }
        }
    }
    processes
        .iter()
        .filter(|p| below.contains(&p.pid) && p.pid != shim.pid)
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{}/comm", p.pid))
                .is_ok_and(|comm| comm.trim() == "criu")
        })
        .cloned()
        .collect()
}

/// Whether CRIU has begun writing the container's memory into `dir`.
fn pages_written(dir: &Path, container: &str) -> bool {
    entries(&dir.join(container).join("checkpoint"))
        .iter()
        .any(|n| n.starts_with("pages-"))
}

/// A `CheckpointPod` of the hog alone (its sidecar frozen with it), run in a thread; yields the
/// answer and how long it took.
fn checkpoint_in_background(pod: &HogPod, dir: &Path) -> Option<Call> {
    let (sandbox, hog, dir) = (
        pod.pod.clone(),
        pod.hog.clone(),
        dir.to_str().unwrap().to_owned(),
    );
    Some(std::thread::spawn(move || {
        let started = Instant::now();
        let answer = Cri::new().checkpoint(&sandbox, &dir, &[&hog], &[]);
        (answer, started.elapsed())
    }))
}

/// A `CheckpointPod` under way in a thread: its answer, and how long it took.
type Call = JoinHandle<(Result<(), tonic::Status>, Duration)>;

/// The answer of a [`checkpoint_in_background`] call (waiting for it).
fn answer(call: Option<Call>) -> Result<(), tonic::Status> {
    let (answer, took) = call.expect("the call").join().unwrap();
    eprintln!("CheckpointPod answered after {took:?}: {answer:?}");
    answer
}

/// Waits until the capture is under way — the pod frozen, the hog's CRIU running under
/// the pod's shim and writing into `dir` (its memory pages, or for at most 1 s after it was
/// first seen) — and returns that CRIU's pid. Panics if the call ends first, with its answer:
/// then no fault can be injected mid-capture.
fn caught_mid_capture(pod: &HogPod, dir: &Path, call: &mut Option<Call>) -> i32 {
    let deadline = Instant::now() + LIVENESS;
    let mut first_seen: Option<Instant> = None;
    loop {
        if call.as_ref().is_some_and(JoinHandle::is_finished) {
            let answer = call.take().map(|c| c.join().unwrap());
            panic!(
                "the checkpoint ended before the fault could be injected mid-capture: {answer:?}"
            );
        }
        assert!(
            Instant::now() < deadline,
            "no capture under way after {LIVENESS:?}: hog {}, sidecar {}, criu {:?}, {} holds {:?}",
            freezer_state(&pod.hog),
            freezer_state(&pod.sidecar),
            criu_of_shim(&pod.pod),
            dir.display(),
            entries(dir)
        );
        // The sidecar stays frozen until the thaw; the hog's cgroup CRIU thaws once it has
        // seized its processes (they stay stopped under ptrace).
        let frozen = freezer_state(&pod.sidecar) == "FROZEN";
        // CRIU's swrk, the shim's child (not the helpers it forks).
        let shim = serving_shim(Handler::Podsnap, &pod.pod).map(|p| p.pid);
        let swrk = criu_of_shim(&pod.pod)
            .into_iter()
            .find(|p| Some(p.ppid) == shim);
        if let Some(swrk) = swrk.filter(|_| frozen && !entries(dir).is_empty()) {
            let seen = *first_seen.get_or_insert_with(Instant::now);
            let pages = pages_written(dir, &pod.hog);
            if pages || seen.elapsed() >= Duration::from_secs(1) {
                eprintln!(
                    "mid-capture: {swrk}; memory pages being written: {pages}; {} holds {:?}",
                    dir.display(),
                    entries(dir)
                );
                return swrk.pid;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILLs `pid` once `/proc/<pid>/comm` confirms it is `name`.
fn kill_named(pid: i32, name: &str) {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), name, "pid {pid} is not {name}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("kill {name} (pid {pid}): {e}"));
}

/// The pid in one of the node's pid files (`containerd.pid`, `podsnapd.pid`).
fn node_pid(file: &str) -> i32 {
    let path = node_run().join(file);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("pid in {}: {e}", path.display()))
}

/// Waits until `pid` has exited (gone, or a zombie not yet reaped).
fn wait_exited(pid: i32, what: &str) {
    wait_for(format!("{what} (pid {pid}) to exit"), LIVENESS, || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // `pid (comm) state ...`
        let state = stat.rsplit(')').next().unwrap_or_default().trim_start();
        if stat.is_empty() || state.starts_with('Z') {
            Ok(())
        } else {
            Err(format!("still there: {stat}"))
        }
    });
}

fn hack(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../hack")
        .join(script)
}

/// Runs bash with `args` (images skipped, should it be node-up); says why when it fails.
fn bash(what: &str, args: &[&str]) -> Result<(), String> {
    let started = Instant::now();
    let out = CommandLine::new("bash")
        .args(args)
        .env("PODSNAP_SKIP_IMAGES", "1")
        .timeout(Duration::from_secs(300))
        .run()
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.success() {
        return Err(format!("{what}: {}", out.report()));
    }
    eprintln!("{what}: done in {:?}", started.elapsed());
    Ok(())
}

/// `hack/node-up.sh` (images skipped): on a node whose containerd runs it starts podsnapd
/// again; on one whose containerd is gone it starts containerd, then podsnapd.
fn node_up() -> Result<(), String> {
    bash("hack/node-up.sh", &[hack("node-up.sh").to_str().unwrap()])
}

/// containerd started again as node-up starts it (`start_containerd` of `hack/node-lib.sh`),
/// and nothing else: podsnapd keeps running.
fn start_containerd() {
    let script = format!(
        ". {} && . {} && if ! containerd_answers; then rm -f \"$CONTAINERD_SOCK\" \"$CONTAINERD_SOCK.ttrpc\"; fi && start_containerd",
        podsnap_e2e::shell_quote(hack("lib.sh").to_str().unwrap()),
        podsnap_e2e::shell_quote(hack("node-lib.sh").to_str().unwrap()),
    );
    bash("start_containerd (hack/node-lib.sh)", &["-c", &script]).unwrap_or_else(|e| panic!("{e}"));
}

/// Runs [`node_up`] when dropped unless disarmed: a test that killed a node daemon leaves the
/// node whole for the next test, whether it passes or not.
struct RestartNodeOnDrop {
    armed: bool,
}

impl Drop for RestartNodeOnDrop {
    fn drop(&mut self) {
        if self.armed {
            eprintln!("restarting what this test killed (hack/node-up.sh)");
            if let Err(e) = node_up() {
                eprintln!("error: the node is not whole again: {e}");
            }
        }
    }
}

/// What must hold after any fault: both containers thawed, no CRIU of the pod's shim left,
/// `dir` empty, both containers running and the hog's memory intact.
fn assert_recovered(pod: &HogPod, dir: &Path, within: Duration) {
    let node = Node::get();
    wait_for("the pod to be thawed", within, || {
        let states: Vec<String> = pod.containers().iter().map(|c| freezer_state(c)).collect();
        if states.iter().all(|s| s == "THAWED") {
            Ok(())
        } else {
            Err(format!("hog {}, sidecar {}", states[0], states[1]))
        }
    });
    wait_for(
        "no CRIU of the pod's shim, or writing into the output",
        within,
        || {
            let mut left = criu_of_shim(&pod.pod);
            // One its shim no longer parents (orphaned) still names the directory it dumps into.
            let dir = dir.display().to_string();
            left.extend(host_processes().into_iter().filter(|p| {
                p.argv.iter().any(|a| a.contains(&dir))
                    && std::fs::read_to_string(format!("/proc/{}/comm", p.pid))
                        .is_ok_and(|comm| comm.trim() == "criu")
            }));
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?}"))
            }
        },
    );
    wait_empty(dir, within);
    for c in pod.containers() {
        assert_eq!(
            node.container_state(c),
            "CONTAINER_RUNNING",
            "container {c}\n{}",
            node.log_excerpt(&[&pod.pod, c])
        );
    }
    pod.assert_memory_intact();
}

/// The pod can be checkpointed again (the sidecar alone, the hog frozen with it): nothing of
/// the fault holds the pod, its shim or podsnapd.
fn assert_checkpointable(ws: &Workspace, pod: &HogPod, name: &str) {
    let again = ws.checkpoint_dir(name);
    Cri::new()
        .checkpoint(&pod.pod, again.to_str().unwrap(), &[&pod.sidecar], &[])
        .unwrap_or_else(|e| panic!("a checkpoint after the fault: {e:?}"));
    assert!(
        again.join(podsnap_checkpoint_format::MANIFEST).is_file(),
        "{:?}",
        entries(&again)
    );
    for c in pod.containers() {
        assert_eq!(freezer_state(c), "THAWED", "container {c}");
        assert_eq!(
            Node::get().container_state(c),
            "CONTAINER_RUNNING",
            "container {c}"
        );
    }
}

#[test]
fn podsnap_criu_killed_mid_pod_checkpoint_thaws_the_pod_and_leaves_no_checkpoint() {
    let mut ws = Workspace::new("fault-criu");
    let pod = HogPod::start(&mut ws, "fault-criu", HOG_MIB);
    let checkpoint = ws.checkpoint_dir("checkpoint");
    let mut call = checkpoint_in_background(&pod, &checkpoint);
    let criu = caught_mid_capture(&pod, &checkpoint, &mut call);
    kill_named(criu, "criu");
    let answer = answer(call);
    // CRIU's death is the reason given, naming the container. (Its exit status may be lost:
    // the shim, subreaper of its children, can reap swrk before the CRIU client does.)
    let status = answer.expect_err("the checkpoint succeeded although CRIU was killed");
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    for needle in [pod.hog.as_str(), "criu swrk", "before answering"] {
        assert!(
            status.message().contains(needle),
            "the error does not say CRIU died under {}: {status:?}",
            pod.hog
        );
    }
    assert_recovered(&pod, &checkpoint, LIVENESS);
    assert_checkpointable(&ws, &pod, "again");
    let pod_id = pod.pod.clone();
    ws.remove_pod(&pod_id);
}

#[test]
fn podsnap_podsnapd_killed_mid_pod_checkpoint_leaves_no_frozen_pod_and_no_checkpoint() {
    let mut ws = Workspace::new("fault-podsnapd");
    let pod = HogPod::start(&mut ws, "fault-podsnapd", HOG_MIB);
    let checkpoint = ws.checkpoint_dir("checkpoint");
    let mut call = checkpoint_in_background(&pod, &checkpoint);
    caught_mid_capture(&pod, &checkpoint, &mut call);
    let podsnapd = node_pid("podsnapd.pid");
    let mut restart = RestartNodeOnDrop { armed: true };
    kill_named(podsnapd, "podsnapd");
    let answer = answer(call);
    // The caller hears that its runtime went away: the connection broke mid-call (gRPC's
    // transport error, Unknown; Unavailable from another client stack).
    let status = answer.expect_err("the checkpoint succeeded although podsnapd was killed");
    assert!(
        matches!(
            status.code(),
            tonic::Code::Unknown | tonic::Code::Unavailable
        ) && format!("{status:?}").contains("transport"),
        "{status:?}"
    );
    wait_exited(podsnapd, "podsnapd");
    // The capture goes on in the shim with nobody to answer (what it writes is there, and
    // nobody but the shim is left to remove it); podsnapd comes back meanwhile.
    assert!(
        !entries(&checkpoint).is_empty(),
        "the capture was over before podsnapd's death could matter"
    );
    node_up().unwrap_or_else(|e| panic!("{e}"));
    restart.armed = false;
    // The shim finishes (or fails) the capture, cannot deliver it, and removes it.
    assert_recovered(&pod, &checkpoint, CAPTURE_END);
    assert_checkpointable(&ws, &pod, "again");
    let pod_id = pod.pod.clone();
    ws.remove_pod(&pod_id);
}

#[test]
fn podsnap_containerd_killed_mid_pod_checkpoint_leaves_the_pod_running_and_no_partial_checkpoint() {
    let mut ws = Workspace::new("fault-containerd");
    let pod = HogPod::start(&mut ws, "fault-containerd", HOG_MIB);
    let checkpoint = ws.checkpoint_dir("checkpoint");
    let mut call = checkpoint_in_background(&pod, &checkpoint);
    caught_mid_capture(&pod, &checkpoint, &mut call);
    let containerd = node_pid("containerd.pid");
    let mut restart = RestartNodeOnDrop { armed: true };
    kill_named(containerd, "containerd");
    wait_exited(containerd, "containerd");
    // Started again at once, as node-up starts it (a supervisor restarting a crashed daemon),
    // while the capture may still run.
    start_containerd();
    restart.armed = false;
    let answer = answer(call);
    match answer {
        Ok(()) => {
            // Whole: every file its manifest lists, hashes and all, the hog's capture among
            // them. (Removed then: what follows looks for a partial one.)
            let manifest = podsnap_checkpoint_format::verify(&checkpoint)
                .unwrap_or_else(|e| panic!("the checkpoint is not whole: {e:#}"));
            assert_eq!(manifest.containers.len(), 1, "{manifest:?}");
            assert_eq!(manifest.containers[0].id, pod.hog, "{manifest:?}");
            assert!(
                checkpoint.join("hog/checkpoint/inventory.img").is_file(),
                "{:?}",
                entries(&checkpoint.join("hog"))
            );
            for entry in entries(&checkpoint) {
                let path = checkpoint.join(entry);
                if path.is_dir() {
                    std::fs::remove_dir_all(&path).unwrap();
                } else {
                    std::fs::remove_file(&path).unwrap();
                }
            }
        }
        Err(status) => {
            eprintln!("the checkpoint failed cleanly: {status:?}");
            assert!(!status.message().is_empty(), "{status:?}");
        }
    }
    assert_recovered(&pod, &checkpoint, LIVENESS);
    assert_checkpointable(&ws, &pod, "again");
    let pod_id = pod.pod.clone();
    ws.remove_pod(&pod_id);
}

/// A filesystem mounted for one test, unmounted when dropped.
struct Mounted(PathBuf);

impl Mounted {
    fn tmpfs(at: &Path, size: &str) -> Mounted {
        std::fs::create_dir_all(at).unwrap();
        let out = CommandLine::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .timeout(Duration::from_secs(30))
            .run()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(out.success(), "{}", out.report());
        Mounted(at.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut cmd = CommandLine::new("umount");
            if lazy {
                cmd = cmd.arg("-l");
            }
            cmd.arg(&self.0)
                .timeout(Duration::from_secs(30))
                .run()
                .is_ok_and(|f| f.success())
        };
        if !umount(false) && !umount(true) {
            eprintln!("warning: cannot unmount {}", self.0.display());
        }
    }
}

/// The `memory N MiB` part of a refusal's size estimate.
fn estimated_memory_mib(message: &str) -> Option<u64> {
    let (_, after) = message.split_once("(memory ")?;
    after.split_whitespace().next()?.parse().ok()
}

#[test]
fn podsnap_pod_checkpoint_into_a_filesystem_too_small_is_refused_before_the_pod_is_frozen() {
    let mut ws = Workspace::new("fault-enospc");
    let pod = HogPod::start(&mut ws, "fault-enospc", 200);
    let small = Mounted::tmpfs(&ws.path("small"), "32m");
    let checkpoint = small.0.join("checkpoint");
    std::fs::create_dir(&checkpoint).unwrap();

    // Watch the freezer while the call runs: the pod must not be frozen even briefly.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let containers = pod.containers().map(str::to_owned);
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut samples = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                for c in &containers {
                    let state = freezer_state(c);
                    if (state == "FROZEN" || state == "FREEZING") && !seen.contains(&state) {
                        seen.push(state);
                    }
                }
                samples += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            (seen, samples)
        })
    };
    let started = Instant::now();
    let answer = Cri::new().checkpoint(&pod.pod, checkpoint.to_str().unwrap(), &[&pod.hog], &[]);
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (seen, samples) = watcher.join().unwrap();
    eprintln!("CheckpointPod answered after {took:?} ({samples} freezer samples): {answer:?}");
    let message = answer.as_ref().err().map(|s| s.message().to_owned());
    assert_status(
        answer,
        tonic::Code::ResourceExhausted,
        "not enough disk space",
    );
    let message = message.unwrap();
    // The estimate counted the hog's memory.
    assert!(
        estimated_memory_mib(&message).is_some_and(|mib| mib >= 200),
        "{message}"
    );
    assert!(seen.is_empty(), "the pod was frozen meanwhile: {seen:?}");
    assert!(
        entries(&small.0) == ["checkpoint"],
        "{:?}",
        entries(&small.0)
    );
    assert_recovered(&pod, &checkpoint, LIVENESS);
    // Where there is room, the same checkpoint is taken: the refusal held nothing.
    let roomy = ws.checkpoint_dir("roomy");
    Cri::new()
        .checkpoint(&pod.pod, roomy.to_str().unwrap(), &[&pod.hog], &[])
        .unwrap_or_else(|e| panic!("a checkpoint with room: {e:?}"));
    assert!(roomy.join(podsnap_checkpoint_format::MANIFEST).is_file());
    drop(small);
    let pod_id = pod.pod.clone();
    ws.remove_pod(&pod_id);
}

/// `ctr task ls` (containerd asks each shim for its tasks' state) while `criu` is stopped
/// (SIGSTOP, so what it does cannot end meanwhile); CRIU goes on before this returns.
fn task_list_while_stopped(criu: i32) -> podsnap_e2e::Finished {
    let stopped = Stopped::pid(criu, Some("criu"));
    let listed = Node::get()
        .ctr_command(podsnap_e2e::CRI_NAMESPACE, ["task", "ls"])
        .timeout(LIVENESS)
        .run();
    drop(stopped);
    let listed = listed.expect("ctr task ls");
    assert!(listed.success(), "{}", listed.report());
    listed
}

/// The shim never holds its container map across a dump: with the pod's CRIU stopped mid-capture
/// (SIGSTOP, so the capture cannot end meanwhile), containerd's task list, which asks the shim
/// for every container's state, still answers. Before, it hung until the dump was over.
#[test]
fn podsnap_a_pod_being_checkpointed_still_answers_state() {
    let mut ws = Workspace::new("fault-state");
    let pod = HogPod::start(&mut ws, "fault-state", HOG_MIB);
    let checkpoint = ws.checkpoint_dir("checkpoint");
    let mut call = checkpoint_in_background(&pod, &checkpoint);
    let criu = caught_mid_capture(&pod, &checkpoint, &mut call);
    let listed = task_list_while_stopped(criu);
    let still_dumping = !call.as_ref().expect("the call").is_finished();
    for container in [&pod.hog, &pod.sidecar] {
        assert!(
            listed
                .stdout
                .lines()
                .any(|l| l.starts_with(container.as_str())),
            "{container} missing from the task list:\n{}",
            listed.stdout
        );
    }
    assert!(
        still_dumping,
        "the checkpoint ended while its CRIU was stopped"
    );
    answer(call).expect("the checkpoint, once CRIU went on");
    let pod_id = pod.pod.clone();
    ws.remove_pod(&pod_id);
}

/// A hog pod, and a replica restored from its checkpoint whose hog is being started.
struct Restoring {
    pod: HogPod,
    restored: String,
    hog: String,
    /// `crictl start` of the replica's hog, on a thread of its own.
    start: std::thread::JoinHandle<podsnap_e2e::Finished>,
    /// The CRIU restoring it, caught as soon as the replica's shim ran it.
    criu: HostProcess,
}

/// A hog pod `fault-<name>` checkpointed, a replica restored from it (created), and its hog
/// started with `crictl <flags> start` on a thread, until the CRIU restoring it is seen.
fn restoring_replica(ws: &mut Workspace, name: &str, flags: &[&str]) -> Restoring {
    let pod = HogPod::start(ws, &format!("fault-{name}"), HOG_MIB);
    let checkpoint = ws.checkpoint_dir("checkpoint");
    Cri::new()
        .checkpoint(&pod.pod, checkpoint.to_str().unwrap(), &[&pod.hog], &[])
        .expect("the checkpoint");
    // The hog's config as HogPod wrote it (the same name writes the same file).
    let hog_config = ws.path("hog.json");
    let replica = ws.pod_config(&podsnap_e2e::cri_workspace::unique(name));
    let out = podsnap_e2e::cri_workspace::restore_created(&checkpoint, &replica, &[&hog_config]);
    let restored = podsnap_e2e::cri_workspace::restored_pod(&out);
    ws.pods.push(restored.clone());
    let hog = podsnap_e2e::cri_workspace::container_named(Node::get(), &restored, "hog");
    let start = {
        let args: Vec<String> = flags
            .iter()
            .map(|f| f.to_string())
            .chain(["start".to_string(), hog.clone()])
            .collect();
        std::thread::spawn(move || Node::get().crictl_try(args))
    };
    let shim = wait_for("the restored pod's shim", LIVENESS, || {
        serving_shim(Handler::Podsnap, &restored).ok_or_else(|| "not yet".to_string())
    });
    // Looked for without a pause: the CRIU lives about half a second.
    let deadline = Instant::now() + LIVENESS;
    let criu = loop {
        if let Some(criu) = criu_of_shim(&restored)
            .into_iter()
            .find(|p| p.ppid == shim.pid)
        {
            break criu;
        }
        assert!(
            !start.is_finished(),
            "the restore ended before its CRIU was seen"
        );
        assert!(
            Instant::now() < deadline,
            "no CRIU restoring the hog after {LIVENESS:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    Restoring {
        pod,
        restored,
        hog,
        start,
        criu,
    }
}

/// Nor across a restore: with the CRIU restoring a 1 GiB container stopped (SIGSTOP) in the
/// middle of its StartContainer, containerd's task list still answers for the restored pod.
#[test]
fn podsnap_a_pod_being_restored_still_answers_state() {
    let mut ws = Workspace::new("fault-restore-state");
    let Restoring {
        pod,
        restored,
        hog,
        start,
        criu,
    } = restoring_replica(&mut ws, "restore-state", &[]);
    let listed = task_list_while_stopped(criu.pid);
    let still_restoring = !start.is_finished();
    assert!(
        listed
            .stdout
            .lines()
            .any(|l| l.starts_with(restored.as_str())),
        "the restored pod's sandbox task missing from the task list:\n{}",
        listed.stdout
    );
    assert!(
        still_restoring,
        "the restore ended while its CRIU was stopped"
    );
    let started = start.join().unwrap();
    assert!(started.success(), "{}", started.report());
    let restored_hog = HogPod {
        pod: restored.clone(),
        hog,
        sidecar: String::new(),
        mib: HOG_MIB,
    };
    restored_hog.assert_memory_intact();
    ws.remove_pod(&restored);
    let pod_id = pod.pod.clone();
    ws.remove_pod(&pod_id);
}

/// A restore whose caller gives up: `crictl start` with a 10 s deadline while the restoring
/// CRIU is stopped (SIGSTOP, caught as soon as the shim runs it). containerd's deadline drops the
/// shim's Start and containerd, as after any failed start, deletes the task. The shim's restore
/// runs to its end regardless, holding the container's operation lock, so that delete waits for
/// CRIU (let go 5 s later) and for the kill of what it restored (nobody waits for it any more).
/// The replica ends EXITED, no process of it is left, then or a second later, and the pod's
/// removal finds none of its cgroups. Before, the delete ran while CRIU was stopped and CRIU,
/// let go, made the deleted container's cgroups again, left behind.
#[test]
fn podsnap_a_restore_whose_start_deadline_passes_leaves_no_process_behind() {
    let mut ws = Workspace::new("fault-restore-deadline");
    let Restoring {
        pod,
        restored,
        hog,
        start,
        criu,
    } = restoring_replica(&mut ws, "restore-deadline", &["--timeout", "10s"]);
    let node = Node::get();
    let stopped = Stopped::pid(criu.pid, Some("criu"));
    let started = start.join().unwrap();
    assert!(
        !started.success(),
        "the start succeeded with its CRIU stopped: {}",
        started.report()
    );
    assert!(
        started.stderr.contains("DeadlineExceeded") || started.stderr.contains("deadline"),
        "the start failed, but not by its deadline: {}",
        started.report()
    );
    // containerd's kill and delete of the failed task come now. Let them run while CRIU is
    // stopped (they answer in about a second when nothing holds them; the shim holds them
    // until the restore ended): CRIU goes on after 5 s, or once the container is EXITED.
    let held = Instant::now();
    while Instant::now() < held + Duration::from_secs(5)
        && node.container_state(&hog) != "CONTAINER_EXITED"
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(stopped);
    wait_exited(criu.pid, "the restoring CRIU");
    // containerd marks the container EXITED once it killed and deleted the task.
    wait_for("the replica to be EXITED", LIVENESS, || {
        let state = node.container_state(&hog);
        if state == "CONTAINER_EXITED" {
            Ok(())
        } else {
            Err(format!("state {state}"))
        }
    });
    wait_for("the replica's processes to be gone", LIVENESS, || {
        let left = processes_of_container(&hog);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("processes of {hog} still run: {left:?}"))
        }
    });
    // Nothing of it runs a second later either.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(processes_of_container(&hog), Vec::<i32>::new());
    ws.remove_pod(&restored);
    let pod_id = pod.pod.clone();
    ws.remove_pod(&pod_id);
}

/// The lazy-pages daemons serving `checkpoint` (their command line names its images).
fn lazy_daemons(checkpoint: &Path) -> Vec<HostProcess> {
    let prefix = checkpoint.display().to_string();
    host_processes()
        .into_iter()
        .filter(|p| {
            p.argv.iter().any(|a| a == "lazy-pages")
                && p.argv.iter().any(|a| a.starts_with(&prefix))
        })
        .collect()
}

/// The inodes of the sockets process `pid` holds (its `/proc/<pid>/fd` links `socket:[N]`).
fn socket_inodes(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    l.to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A unix socket as `/proc/net/unix` lists it (Num RefCount Protocol Flags Type St Inode
/// [Path]).
struct UnixSocket {
    /// Whether it listens (`__SO_ACCEPTCON`, flags `00010000`).
    listening: bool,
    inode: String,
    path: Option<String>,
}

/// The host's unix sockets, from `/proc/net/unix`.
fn unix_sockets() -> Vec<UnixSocket> {
    std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.len() >= 7).then(|| UnixSocket {
                listening: fields[3] == "00010000",
                inode: fields[6].to_string(),
                path: fields.get(7).map(|p| p.to_string()),
            })
        })
        .collect()
}

/// The listening socket of lazy-pages daemon `pid`, once it listens (CRIU binds it by a
/// relative name, so it is found by inode).
fn lazy_daemon_listener(pid: i32) -> Option<UnixSocket> {
    let inodes = socket_inodes(pid);
    unix_sockets()
        .into_iter()
        .find(|s| s.listening && inodes.contains(&s.inode))
}

/// Whether a lazy-pages daemon listens on its socket yet.
fn lazy_daemon_listens(daemon: &HostProcess) -> bool {
    lazy_daemon_listener(daemon.pid).is_some()
}

/// When [`kill_the_lazy_daemon`] SIGKILLs the daemon.
#[derive(Clone, Copy, Debug)]
enum DaemonKill {
    /// As soon as it listens: the shim's relay (most likely) has not connected yet.
    AsSoonAsItListens,
    /// Stopped as soon as it listens, killed once the relay's connection reached it:
    /// CRIU is (most likely) still making the tasks, which the shim kills as they appear.
    OnceTheRelayConnects,
    /// Stopped as soon as it listens, killed once a process of the container exists (a task
    /// CRIU restores, whose restorer waits for a page).
    OnceATaskWaits,
}

/// Restores a lazy replica named `name` from `checkpoint`, starts it and SIGKILLs its daemon
/// `when`: the start fails naming the daemon, or the replica is killed (137); either way it
/// never runs on, the shim says so, and no daemon is left.
fn kill_the_lazy_daemon(ws: &mut Workspace, checkpoint: &Path, name: &str, when: DaemonKill) {
    let node = Node::get();
    let restored = restore_lazily(ws, checkpoint, name, false);
    ws.pods.push(restored.clone());
    let hog = podsnap_e2e::cri_workspace::container_named(node, &restored, "hog");
    let watcher = {
        let checkpoint = checkpoint.to_path_buf();
        let hog = hog.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + LIVENESS;
            let mut seen = Vec::new();
            let daemon = loop {
                let daemons = lazy_daemons(&checkpoint);
                if let Some(daemon) = daemons.iter().find(|d| lazy_daemon_listens(d)) {
                    break daemon.pid;
                }
                for daemon in daemons {
                    if !seen.contains(&daemon.to_string()) {
                        seen.push(daemon.to_string());
                    }
                }
                if Instant::now() > deadline {
                    return Err(format!("daemons seen, none listening: {seen:?}"));
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            let stopped = match when {
                DaemonKill::AsSoonAsItListens => None,
                DaemonKill::OnceTheRelayConnects => {
                    let stopped = Stopped::pid(daemon, Some("criu"));
                    while !lazy_daemon_was_reached(daemon) {
                        if Instant::now() > deadline {
                            return Err("the shim's relay never connected".to_string());
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Some(stopped)
                }
                DaemonKill::OnceATaskWaits => {
                    let stopped = Stopped::pid(daemon, Some("criu"));
                    while processes_of_container(&hog).is_empty() {
                        if Instant::now() > deadline {
                            return Err("no restored task appeared".to_string());
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Some(stopped)
                }
            };
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(daemon),
                nix::sys::signal::Signal::SIGKILL,
            )
            .map_err(|e| format!("SIGKILL the lazy-pages daemon {daemon}: {e}"))?;
            drop(stopped);
            Ok(())
        })
    };
    let started = node.crictl_try(["start", &hog]);
    watcher
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{when:?}: {e}"));
    // Either the restore failed (the daemon died under its restorer) or the replica ran and
    // was killed: never a replica running on.
    wait_for("the replica to be stopped", LIVENESS, || {
        match node.container_state(&hog).as_str() {
            "CONTAINER_RUNNING" => Err("running".to_string()),
            _ => Ok(()),
        }
    });
    if started.success() {
        let inspect = node.crictl(["inspect", &hog]);
        let status: serde_json::Value =
            serde_json::from_str(&inspect).expect("crictl inspect JSON");
        assert_eq!(
            status["status"]["exitCode"], 137,
            "{when:?}: the replica was not killed: {}",
            status["status"]
        );
    } else {
        assert!(
            started.stderr.contains("lazy-pages daemon"),
            "{when:?}: the failed start does not name the daemon: {}\n{}",
            started.report(),
            node.log_excerpt(&[&hog])
        );
    }
    wait_for("the shim to report the daemon's death", LIVENESS, || {
        if log_lines(node, &hog, "exited with 137").is_empty() {
            Err(node.log_excerpt(&[&hog]))
        } else {
            Ok(())
        }
    });
    assert!(
        lazy_daemons(checkpoint).is_empty(),
        "{when:?}: a daemon was left"
    );
    assert!(
        processes_of_container(&hog).is_empty(),
        "{when:?}: a process of the replica was left"
    );
    ws.remove_pod(&restored);
}

/// The host's processes in a cgroup of the container `id` (its name is in their cgroup path).
fn processes_of_container(id: &str) -> Vec<i32> {
    host_processes()
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid))
                .is_ok_and(|cgroups| cgroups.contains(id))
        })
        .map(|p| p.pid)
        .collect()
}

/// Whether a connection reached the daemon's listening socket: an entry of `/proc/net/unix`
/// with the listener's name that is no listener (the kernel gives a connection's server end the
/// listener's name, in its queue and after it was accepted).
fn lazy_daemon_was_reached(daemon: i32) -> bool {
    let Some(listener) = lazy_daemon_listener(daemon).filter(|l| l.path.is_some()) else {
        return false;
    };
    unix_sockets()
        .iter()
        .any(|s| !s.listening && s.path == listener.path)
}

/// `podsnap pod restore` of the hog alone from `checkpoint`, lazily, started if `start`.
fn restore_lazily(ws: &Workspace, checkpoint: &Path, name: &str, start: bool) -> String {
    let replica = ws.pod_config(&podsnap_e2e::cri_workspace::unique(name));
    let hog_config = ws.path("hog.json");
    let mut args = vec![
        "pod",
        "restore",
        checkpoint.to_str().unwrap(),
        "--pod-config",
        replica.to_str().unwrap(),
        "--container-config",
        hog_config.to_str().unwrap(),
        "--option",
        "podsnap.io/lazy-restore=true",
    ];
    if start {
        args.push("--start");
    }
    podsnap_e2e::cri_workspace::restored_pod(&podsnap_e2e::cri_workspace::podsnap(&args))
}

/// The containerd log's lines about `container` that contain `needle`.
fn log_lines(node: &Node, container: &str, needle: &str) -> Vec<String> {
    std::fs::read_to_string(&node.containerd_log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(container) && l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Lazy restore (`podsnap.io/lazy-restore=true`): a replica of the 1 GiB hog runs while its
/// memory streams in from CRIU's lazy-pages daemon, and memtest finds every word intact. Two
/// replicas' daemons are SIGKILLed before they serve a page, one as soon as it listens, one
/// stopped until a restored task waits for its memory: the shim fails the restore or kills the
/// replica, which never runs on the zeros the kernel would hand out once nobody serves its
/// memory. A last replica, from a page image changed in place, is killed once its pages are
/// hashed. No daemon is left any time, and removing each pod leaves nothing behind.
#[test]
fn podsnap_lazy_restore_streams_every_page_and_a_killed_daemon_kills_the_pod_not_its_memory() {
    let node = Node::get();
    let mut ws = Workspace::new("lazy");
    let pod = HogPod::start(&mut ws, "lazy", HOG_MIB);
    let checkpoint = ws.checkpoint_dir("checkpoint");
    Cri::new()
        .checkpoint(&pod.pod, checkpoint.to_str().unwrap(), &[&pod.hog], &[])
        .expect("the checkpoint");
    let source = pod.pod.clone();
    ws.remove_pod(&source);

    let restored = restore_lazily(&ws, &checkpoint, "lazy-replica", true);
    ws.pods.push(restored.clone());
    let hog = podsnap_e2e::cri_workspace::container_named(node, &restored, "hog");
    // containerd copies the shim's log into its own a little after the Start answer.
    wait_for("the shim to say the replica streams in", LIVENESS, || {
        if log_lines(node, &hog, "stream in from the lazy-pages daemon").is_empty() {
            Err(format!(
                "the replica was not restored lazily:\n{}",
                node.log_excerpt(&[&hog])
            ))
        } else {
            Ok(())
        }
    });
    HogPod {
        pod: restored.clone(),
        hog: hog.clone(),
        sidecar: String::new(),
        mib: HOG_MIB,
    }
    .assert_memory_intact();
    wait_for("the lazy restore to complete", LIVENESS, || {
        if log_lines(node, &hog, "lazy restore complete").is_empty() {
            Err(node.log_excerpt(&[&hog]))
        } else {
            Ok(())
        }
    });
    assert!(lazy_daemons(&checkpoint).is_empty(), "a daemon was left");
    ws.remove_pod(&restored);

    // Three replicas whose daemons die before they serve a page: killed as soon as it listens
    // (before the shim's relay reaches it); stopped, and killed once the relay reached it
    // (while CRIU makes the tasks, which must not wait forever for memory nobody serves);
    // stopped, so that CRIU's restorer (which itself reads lazy memory) waits for it, and
    // killed once a restored task exists.
    for (name, when) in [
        ("lazy-killed", DaemonKill::AsSoonAsItListens),
        ("lazy-reached", DaemonKill::OnceTheRelayConnects),
        ("lazy-stopped", DaemonKill::OnceATaskWaits),
    ] {
        kill_the_lazy_daemon(&mut ws, &checkpoint, name, when);
    }

    // A last replica from a page image changed in place (one byte, same size): a lazy restore
    // hashes the page images only while they stream in, so the replica may start, but it is
    // killed once its page image is found not to be the manifest's.
    let pages: Vec<_> = std::fs::read_dir(checkpoint.join("hog/checkpoint"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("pages-"))
        })
        .collect();
    let page_image = pages.first().expect("a page image");
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(page_image)
            .unwrap();
        let at = file.metadata().unwrap().len() / 2;
        let mut byte = [0u8; 1];
        file.seek(SeekFrom::Start(at)).unwrap();
        file.read_exact(&mut byte).unwrap();
        file.seek(SeekFrom::Start(at)).unwrap();
        file.write_all(&[byte[0] ^ 0xff]).unwrap();
    }
    let restored = restore_lazily(&ws, &checkpoint, "lazy-tampered", false);
    ws.pods.push(restored.clone());
    let hog = podsnap_e2e::cri_workspace::container_named(node, &restored, "hog");
    let started = node.crictl_try(["start", &hog]);
    wait_for("the tampered replica to be killed", LIVENESS, || match node
        .container_state(&hog)
        .as_str()
    {
        "CONTAINER_RUNNING" => Err("running".to_string()),
        _ => Ok(()),
    });
    wait_for("the shim to say why", LIVENESS, || {
        if log_lines(node, &hog, "not the manifest's").is_empty() {
            Err(format!(
                "the changed page image went unnoticed (start: {}):\n{}",
                started.report(),
                node.log_excerpt(&[&hog])
            ))
        } else {
            Ok(())
        }
    });
    // The daemon exits on its own once its process is gone.
    wait_for("the tampered replica's daemon to exit", LIVENESS, || {
        let left = lazy_daemons(&checkpoint);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("a daemon was left: {left:?}"))
        }
    });
    ws.remove_pod(&restored);
}

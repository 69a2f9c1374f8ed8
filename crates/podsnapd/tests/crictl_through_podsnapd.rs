//! The built `podsnapd` in front of the test node's real containerd (`hack/node-up.sh`): crictl,
//! pointed at podsnapd as its runtime and image endpoint, runs a pod through its whole life;
//! `GetContainerEvents` streams through; and `CheckpointPod`/`RestorePod` are answered by
//! podsnapd, never by containerd.
//!
//! Without the node these tests fail when `CI=true` and otherwise skip with a loud notice.
//! Every external command runs with a deadline and no stdin. Environment: `PODSNAP_NODE_RUN`,
//! `PODSNAP_CACHE` (as `hack/lib.sh`), `CRICTL` (crictl binary), `PODSNAPD_TEST_HANDLER`
//! (runtime handler of the test pod, default `runc`).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cri_api::v1::{
    CheckpointPodRequest, ContainerEventType, GetEventsRequest, PodSandboxConfig,
    PodSandboxMetadata, RestorePodRequest,
};
use cri_api::{RuntimeServiceClient, unix_channel};
use tonic::Code;

/// The test image, pushed to the node's registry by `hack/images.sh`.
const BUSYBOX: &str = "127.0.0.1:5000/podsnap/busybox:latest";
/// Deadline of one crictl call (crictl's own is 30 s), and of each wait in these tests.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Pulling from the local registry.
const PULL_TIMEOUT: Duration = Duration::from_secs(180);
/// What the test container prints first.
const GREETING: &str = "podsnapd-proxy-test says hello";

fn env_path(name: &str, default: &str) -> PathBuf {
    std::env::var_os(name).map_or_else(|| PathBuf::from(default), PathBuf::from)
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|ci| ci.eq_ignore_ascii_case("true") || ci == "1")
}

/// The node's containerd socket and crictl, or `None` (after saying so) when the node is not up
/// and this is not CI. In CI a missing node fails the test.
fn node() -> Option<(PathBuf, PathBuf)> {
    let containerd =
        env_path("PODSNAP_NODE_RUN", "/run/podsnap-node").join("containerd/containerd.sock");
    let crictl = std::env::var_os("CRICTL").map_or_else(
        || env_path("PODSNAP_CACHE", "/var/cache/podsnap").join("bin/crictl"),
        PathBuf::from,
    );
    let missing = if !containerd.exists() {
        format!("containerd socket {} does not exist", containerd.display())
    } else if !crictl.is_file() {
        format!("crictl {} does not exist", crictl.display())
    } else {
        return Some((containerd, crictl));
    };
    let what = format!("{missing}: start the node with hack/node-up.sh (after hack/install.sh)");
    if in_ci() {
        panic!("CI=true and the podsnap test node is not up: {what}");
    }
    // Straight to stderr, not eprintln!: the test harness would capture that from a passing test.
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n{bar}\n!! SKIPPED: podsnapd-through-containerd test did not run\n!! {what}\n\
         !! (with CI=true this fails instead)\n{bar}\n",
        bar = "!".repeat(78)
    );
    None
}

/// What a finished command printed.
struct Output {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs `command` with no stdin, killing it after `timeout`.
fn run(command: &mut Command, timeout: Duration) -> Output {
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {shown}: {err}"));
    let stdout = drain(child.stdout.take().unwrap());
    let stderr = drain(child.stderr.take().unwrap());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{shown} did not finish in {timeout:?}; stderr so far:\n{}",
                stderr.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        success: status.success(),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}

/// crictl against one CRI endpoint.
struct Crictl {
    binary: PathBuf,
    config: PathBuf,
    endpoint: String,
}

impl Crictl {
    fn new(binary: &Path, dir: &Path, socket: &Path) -> Self {
        let endpoint = format!("unix://{}", socket.display());
        let config = dir.join(format!(
            "crictl-{}.yaml",
            socket.file_stem().unwrap().to_string_lossy()
        ));
        std::fs::write(
            &config,
            format!("runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\ntimeout: 30\n"),
        )
        .unwrap();
        Self {
            binary: binary.to_path_buf(),
            config,
            endpoint,
        }
    }

    fn try_run(&self, args: &[&str], timeout: Duration) -> Output {
        run(
            Command::new(&self.binary)
                .arg("--config")
                .arg(&self.config)
                .args(["--runtime-endpoint", &self.endpoint])
                .args(["--image-endpoint", &self.endpoint])
                .args(args),
            timeout,
        )
    }

    /// Runs crictl and returns its stdout, failing the test when it fails.
    fn ok(&self, args: &[&str]) -> String {
        self.ok_within(args, COMMAND_TIMEOUT)
    }

    fn ok_within(&self, args: &[&str], timeout: Duration) -> String {
        let out = self.try_run(args, timeout);
        assert!(
            out.success,
            "crictl {} via {} failed:\nstdout: {}\nstderr: {}",
            args.join(" "),
            self.endpoint,
            out.stdout,
            out.stderr
        );
        out.stdout
    }
}

/// The built podsnapd, serving on a socket of its own in front of the node's containerd;
/// stopped with SIGTERM (and its log shown) when dropped.
struct Podsnapd {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Podsnapd {
    fn start(dir: &Path, containerd: &Path) -> Self {
        let socket = dir.join("podsnapd.sock");
        let log = dir.join("podsnapd.log");
        let child = Command::new(env!("CARGO_BIN_EXE_podsnapd"))
            .arg("--listen")
            .arg(&socket)
            .arg("--containerd")
            .arg(containerd)
            .args(["--shutdown-grace", "5"])
            .env("RUST_LOG", "podsnapd=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let podsnapd = Self { child, socket, log };
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&podsnapd.socket).is_err() {
            assert!(
                started.elapsed() < COMMAND_TIMEOUT,
                "podsnapd did not listen on {}:\n{}",
                podsnapd.socket.display(),
                podsnapd.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        podsnapd
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait (podsnapd's grace is 5 s); true when it exited by itself, cleanly.
    fn stop(&mut self) -> bool {
        if self.child.try_wait().unwrap().is_some() {
            return false;
        }
        let pid = self.child.id().to_string();
        let term = run(Command::new("kill").args(["-TERM", &pid]), COMMAND_TIMEOUT);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if let Some(status) = self.child.try_wait().unwrap() {
                return term.success && status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Podsnapd {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- podsnapd log ---\n{}--- end of podsnapd log ---",
                self.log_text()
            );
        }
    }
}

/// A pod sandbox the test made; removed through containerd directly if the test did not.
struct SandboxGuard<'a> {
    containerd: &'a Crictl,
    id: String,
}

impl Drop for SandboxGuard<'_> {
    fn drop(&mut self) {
        let _ = self
            .containerd
            .try_run(&["stopp", &self.id], COMMAND_TIMEOUT);
        let _ = self
            .containerd
            .try_run(&["rmp", "-f", &self.id], COMMAND_TIMEOUT);
    }
}

/// Polls `check` until it returns true, failing with `what` after `COMMAND_TIMEOUT`.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < COMMAND_TIMEOUT,
            "timed out waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A CRI request with a 30 s deadline, as kubelet sets one.
fn with_deadline<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_secs(30));
    request
}

/// `call`, failing the test if it takes longer than `COMMAND_TIMEOUT`.
async fn within<F: std::future::Future>(call: F) -> F::Output {
    tokio::time::timeout(COMMAND_TIMEOUT, call)
        .await
        .expect("no answer in time")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn crictl_runs_a_pod_through_podsnapd_and_events_stream_through() {
    let Some((containerd_socket, crictl_binary)) = node() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let podsnapd = Podsnapd::start(dir.path(), &containerd_socket);
    let crictl = Crictl::new(&crictl_binary, dir.path(), &podsnapd.socket);
    let containerd = Crictl::new(&crictl_binary, dir.path(), &containerd_socket);
    let handler = std::env::var("PODSNAPD_TEST_HANDLER").unwrap_or_else(|_| "runc".into());

    // Runtime and image service basics.
    let version = crictl.ok(&["version"]);
    assert!(version.contains("RuntimeName:  containerd"), "{version}");
    let info: serde_json::Value = serde_json::from_str(&crictl.ok(&["info"])).unwrap();
    assert!(info["status"]["conditions"].is_array(), "{info}");
    crictl.ok_within(&["pull", BUSYBOX], PULL_TIMEOUT);
    let images = crictl.ok(&["images"]);
    assert!(
        images.contains("127.0.0.1:5000/podsnap/busybox"),
        "{images}"
    );

    // Container events, a server-streaming RPC, subscribed to through podsnapd.
    let rt = runtime();
    let _in_runtime = rt.enter();
    let (events_tx, events_rx) = std::sync::mpsc::channel();
    let mut events_client = RuntimeServiceClient::new(unix_channel(&podsnapd.socket));
    // Not awaited here: containerd sends the stream's headers with its first event, so on a
    // quiet node the call itself answers only once something happens (the sandbox below).
    rt.spawn(async move {
        let mut events = match events_client
            .get_container_events(GetEventsRequest {})
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) => {
                let _ = events_tx.send(Err(format!(
                    "GetContainerEvents through podsnapd: {status:?}"
                )));
                return;
            }
        };
        while let Ok(Some(event)) = events.message().await {
            if events_tx
                .send(Ok((event.container_id, event.container_event_type)))
                .is_err()
            {
                break;
            }
        }
    });
    let next_event = |left: Duration| -> Option<(String, i32)> {
        match events_rx.recv_timeout(left) {
            Ok(Ok(event)) => Some(event),
            Ok(Err(error)) => panic!("{error}"),
            Err(_) => None,
        }
    };

    // A pod's life.
    let name = format!("podsnapd-proxy-{}", std::process::id());
    let pod_config = dir.path().join("pod.json");
    let container_config = dir.path().join("container.json");
    std::fs::write(
        &pod_config,
        serde_json::json!({
            "metadata": {"name": name, "namespace": "podsnapd-test", "uid": format!("{name}-uid"), "attempt": 0},
            "log_directory": dir.path().join("logs"),
            "linux": {},
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        &container_config,
        serde_json::json!({
            "metadata": {"name": "greeter"},
            "image": {"image": BUSYBOX},
            "command": ["sh", "-c", format!("echo '{GREETING}'; exec sleep 3600")],
            "log_path": "greeter.log",
            "linux": {},
        })
        .to_string(),
    )
    .unwrap();
    let pod_config = pod_config.to_str().unwrap();
    let container_config = container_config.to_str().unwrap();

    let sandbox = crictl
        .ok(&["runp", "--runtime", &handler, pod_config])
        .trim()
        .to_string();
    assert!(!sandbox.is_empty());
    let guard = SandboxGuard {
        containerd: &containerd,
        id: sandbox.clone(),
    };
    // The sandbox's own events show the subscription is in place before the container exists.
    let mut seen = Vec::new();
    let started = Instant::now();
    while !seen.iter().any(|(id, _): &(String, i32)| *id == sandbox) {
        let left = COMMAND_TIMEOUT.saturating_sub(started.elapsed());
        match next_event(left) {
            Some(event) => seen.push(event),
            None => panic!("no event for sandbox {sandbox} through podsnapd; saw {seen:?}"),
        }
    }
    let container = crictl
        .ok(&["create", &sandbox, container_config, pod_config])
        .trim()
        .to_string();
    assert!(!container.is_empty());
    crictl.ok(&["start", &container]);

    let ps: serde_json::Value =
        serde_json::from_str(&crictl.ok(&["ps", "--pod", &sandbox, "-o", "json"])).unwrap();
    let listed = ps["containers"].as_array().expect("ps lists containers");
    assert_eq!(listed.len(), 1, "{ps}");
    assert_eq!(listed[0]["id"], container.as_str());
    assert_eq!(listed[0]["state"], "CONTAINER_RUNNING", "{ps}");

    eventually("the container's greeting is in its log", || {
        crictl.ok(&["logs", &container]).contains(GREETING)
    });
    let exec_sync = crictl.ok(&["exec", "--sync", &container, "echo", "exec-sync-ok"]);
    assert_eq!(exec_sync.trim(), "exec-sync-ok");
    // Streaming exec: the Exec RPC goes through podsnapd, the stream to containerd's server.
    let exec = crictl.ok(&["exec", &container, "sh", "-c", "echo exec-stream-ok"]);
    assert_eq!(exec.trim(), "exec-stream-ok");

    let started = Instant::now();
    while !seen.contains(&(
        container.clone(),
        ContainerEventType::ContainerStartedEvent as i32,
    )) {
        let left = COMMAND_TIMEOUT.saturating_sub(started.elapsed());
        match next_event(left) {
            Some(event) => seen.push(event),
            None => {
                panic!("no ContainerStartedEvent for {container} through podsnapd; saw {seen:?}")
            }
        }
    }
    assert!(
        seen.contains(&(
            container.clone(),
            ContainerEventType::ContainerCreatedEvent as i32
        )),
        "{seen:?}"
    );

    crictl.ok(&["stop", &container]);
    crictl.ok(&["rm", &container]);
    crictl.ok(&["stopp", &sandbox]);
    crictl.ok(&["rmp", &sandbox]);
    let left = crictl.ok(&["pods", "--id", &sandbox, "-q"]);
    assert!(left.trim().is_empty(), "sandbox still listed: {left}");
    drop(guard);

    let mut podsnapd = podsnapd;
    assert!(
        podsnapd.stop(),
        "podsnapd did not stop cleanly on SIGTERM:\n{}",
        podsnapd.log_text()
    );
    assert!(!podsnapd.socket.exists(), "podsnapd left its socket behind");
}

#[test]
fn checkpoint_pod_and_restore_pod_are_answered_by_podsnapd_not_containerd() {
    let Some((containerd_socket, _)) = node() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let podsnapd = Podsnapd::start(dir.path(), &containerd_socket);
    let rt = runtime();
    let _in_runtime = rt.enter();
    let mut through_podsnapd = RuntimeServiceClient::new(unix_channel(&podsnapd.socket));
    let mut containerd = RuntimeServiceClient::new(unix_channel(&containerd_socket));

    let checkpoint = CheckpointPodRequest {
        pod_sandbox_id: "no-such-sandbox".into(),
        output_path: "relative/checkpoint".into(),
        container_ids: vec!["no-such-container".into()],
        options: Default::default(),
    };
    let restore = RestorePodRequest {
        checkpoint_path: "relative/checkpoint".into(),
        config: Some(PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: "restored".into(),
                namespace: "podsnapd-test".into(),
                uid: "restored-uid".into(),
                attempt: 0,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let (ours, theirs, ours_restore, theirs_restore) = rt.block_on(async {
        (
            within(through_podsnapd.checkpoint_pod(with_deadline(checkpoint.clone())))
                .await
                .unwrap_err(),
            within(containerd.checkpoint_pod(with_deadline(checkpoint)))
                .await
                .unwrap_err(),
            within(through_podsnapd.restore_pod(with_deadline(restore.clone())))
                .await
                .unwrap_err(),
            within(containerd.restore_pod(with_deadline(restore)))
                .await
                .unwrap_err(),
        )
    });
    eprintln!("containerd's own answer: CheckpointPod {theirs:?}, RestorePod {theirs_restore:?}");
    for (rpc, ours, theirs) in [
        ("CheckpointPod", ours, theirs),
        ("RestorePod", ours_restore, theirs_restore),
    ] {
        // podsnapd rejects the relative path (InvalidArgument) once pod.rs implements the RPC;
        // until then its stub says Unimplemented in its own words.
        match ours.code() {
            Code::InvalidArgument => {}
            Code::Unimplemented => assert!(
                ours.message().starts_with("podsnapd: "),
                "{rpc} was not answered by podsnapd: {ours:?}"
            ),
            _ => panic!("{rpc}: unexpected answer through podsnapd: {ours:?}"),
        }
        assert_ne!(
            (ours.code(), ours.message()),
            (theirs.code(), theirs.message()),
            "{rpc}: podsnapd's answer is containerd's: forwarded?"
        );
    }
    let log = podsnapd.log_text();
    assert!(
        !log.contains("forwarding to containerd path=\"/runtime.v1.RuntimeService/CheckpointPod\""),
        "{log}"
    );
}

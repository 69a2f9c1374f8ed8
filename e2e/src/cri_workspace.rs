//! Driving the node through podsnapd's CRI endpoint, as the pod checkpoint tests do: a
//! [`Workspace`] per test (configs, logs, checkpoint directories, and the pods it runs, removed
//! when it drops), the `podsnap` CLI ([`podsnap`]) and a direct CRI client ([`Cri`]) for
//! `CheckpointPod`/`RestorePod`, what a refusal must say ([`assert_refused`], [`assert_status`]),
//! and what the tests look at on the host ([`freezer_state`], [`Stopped`]).
//!
//! Like the rest of this crate it starts no node: podsnapd must be listening on
//! [`podsnapd_socket`] (`hack/node-up.sh` starts it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::command::{CommandLine, Finished};
use crate::leaks::{Footprint, assert_nothing_left};
use crate::node::{BUSYBOX, CRI_NAMESPACE, Handler, Node};
use crate::poll::wait_for;

/// podsnapd's CRI socket (`hack/node-up.sh` starts podsnapd there).
pub fn podsnapd_socket() -> PathBuf {
    node_run().join("podsnapd.sock")
}

/// The `podsnap` CLI (built by the workspace build), talking to podsnapd.
pub fn podsnap(args: &[&str]) -> Finished {
    let socket = podsnapd_socket();
    assert!(
        socket.exists(),
        "podsnapd is not listening on {} (hack/node-up.sh starts it)",
        socket.display()
    );
    let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/podsnap");
    assert!(binary.exists(), "{} is not built", binary.display());
    CommandLine::new(binary)
        .arg("--runtime-endpoint")
        .arg(format!("unix://{}", socket.display()))
        .args(args)
        .timeout(Duration::from_secs(180))
        .run()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A name no other test run uses: `e2e-<name>-<pid>-<nanoseconds>`.
pub fn unique(name: &str) -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("e2e-{name}-{}-{nanos}", std::process::id())
}

/// A directory for one test: configs, logs, the emptyDir and checkpoints.
pub struct Workspace {
    dir: tempfile::TempDir,
    /// The pods this workspace removes when it drops (`crictl stopp`, `rmp -f`).
    pub pods: Vec<String>,
}

impl Workspace {
    pub fn new(name: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("podsnap-e2e-{name}-"))
            .tempdir()
            .unwrap();
        Workspace {
            dir,
            pods: Vec::new(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A 0700 empty directory for a checkpoint.
    pub fn checkpoint_dir(&self, name: &str) -> PathBuf {
        use std::os::unix::fs::DirBuilderExt;
        let path = self.path(name);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .unwrap();
        path
    }

    pub fn write(&self, name: &str, value: &Value) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, value.to_string()).unwrap();
        path
    }

    /// Writes a pod config named `name`; returns its path.
    pub fn pod_config(&self, name: &str) -> PathBuf {
        let logs = self.path(&format!("logs-{name}"));
        self.write(
            &format!("{name}.pod.json"),
            &json!({
                "metadata": {"name": name, "namespace": "podsnap-e2e", "uid": format!("{name}-uid")},
                "log_directory": logs,
                // A PID namespace per container, as kubelet gives by default.
                "linux": {"security_context": {"namespace_options": {"pid": 1}}},
            }),
        )
    }

    pub fn container_config(&self, name: &str, command: Value, mounts: Value) -> PathBuf {
        self.write(
            &format!("{name}.json"),
            &json!({
                "metadata": {"name": name},
                "image": {"image": BUSYBOX},
                "command": command,
                "log_path": format!("{name}.log"),
                "mounts": mounts,
                // containerd takes the PID namespace mode from each container's config.
                "linux": {"security_context": {"namespace_options": {"pid": 1}}},
            }),
        )
    }

    /// A container that runs `fixture` (a static test program from [`crate::fixtures`],
    /// mounted read-only at `/<its file name>`) with `args`.
    pub fn fixture_config(&self, name: &str, fixture: &Path, args: &[&str]) -> PathBuf {
        let program = format!("/{}", fixture.file_name().unwrap().to_string_lossy());
        let command: Vec<&str> = std::iter::once(program.as_str())
            .chain(args.iter().copied())
            .collect();
        self.container_config(
            name,
            json!(command),
            json!([{"container_path": program, "host_path": fixture, "readonly": true}]),
        )
    }

    /// `crictl runp` on handler podsnap.
    pub fn run_pod(&mut self, handler: Handler, config: &Path) -> String {
        let node = Node::get();
        let id = node
            .crictl([
                "runp",
                "--runtime",
                handler.name(),
                config.to_str().unwrap(),
            ])
            .trim()
            .to_string();
        self.pods.push(id.clone());
        id
    }

    pub fn run_container(&self, pod: &str, config: &Path, pod_config: &Path) -> String {
        let node = Node::get();
        node.ensure_image(BUSYBOX);
        let id = node
            .crictl([
                "create",
                pod,
                config.to_str().unwrap(),
                pod_config.to_str().unwrap(),
            ])
            .trim()
            .to_string();
        node.crictl(["start", &id]);
        id
    }

    /// `podsnap pod restore --start` of `checkpoint` with the given configs; the restored pod,
    /// removed with the workspace.
    pub fn restore_started(
        &mut self,
        checkpoint: &Path,
        pod: &Path,
        containers: &[&Path],
    ) -> String {
        let pod = restored_pod(&restore(checkpoint, pod, containers, true));
        self.pods.push(pod.clone());
        pod
    }

    /// Removes a pod and checks nothing of it is left.
    pub fn remove_pod(&mut self, pod: &str) {
        let node = Node::get();
        let containers: Vec<String> = node
            .crictl(["ps", "-a", "-q", "--pod", pod])
            .split_whitespace()
            .map(str::to_string)
            .collect();
        node.crictl(["stopp", pod]);
        node.crictl(["rmp", pod]);
        self.pods.retain(|p| p != pod);
        let footprint = Footprint {
            handler: Handler::Podsnap,
            namespace: CRI_NAMESPACE.to_string(),
            shim_id: Some(pod.to_string()),
            ids: std::iter::once(pod.to_string()).chain(containers).collect(),
        };
        assert_nothing_left(node, &footprint);
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let node = Node::get();
        for pod in &self.pods {
            let _ = node.crictl_command(["stopp", pod]).run();
            let _ = node.crictl_command(["rmp", "-f", pod]).run();
        }
    }
}

/// `sh -c script` as a CRI command.
pub fn sh(script: &str) -> Value {
    json!(["sh", "-c", script])
}

/// The only container of `pod` named `name`.
pub fn container_named(node: &Node, pod: &str, name: &str) -> String {
    node.crictl([
        "ps",
        "-a",
        "-q",
        "--pod",
        pod,
        "--name",
        &format!("^{name}$"),
    ])
    .trim()
    .to_string()
}

/// The pod id `podsnap pod restore` printed (its first line; then one `<id>\t<name>` line per
/// container).
pub fn restored_pod(out: &Finished) -> String {
    assert!(
        out.success(),
        "{}\n{}",
        out.report(),
        Node::get().log_excerpt(&[])
    );
    let pod = out
        .stdout
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(!pod.is_empty(), "no pod id in:\n{}", out.stdout);
    pod
}

/// Pods on the node, by id.
pub fn pod_ids(node: &Node) -> Vec<String> {
    node.crictl(["pods", "-q"])
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Asserts that a `podsnap` CLI call failed with gRPC `code`, its message naming `needle`.
pub fn assert_refused(out: &Finished, code: &str, needle: &str) {
    assert!(!out.success(), "accepted: {}", out.report());
    let text = out.stdout.clone() + &out.stderr;
    assert!(text.contains(code), "expected {code}: {}", out.report());
    assert!(
        text.contains(needle),
        "expected the message to name {needle:?}: {}",
        out.report()
    );
}

/// Calls podsnapd's CRI directly (no CLI in between), so the runtime's own checks are tested.
pub struct Cri {
    runtime: tokio::runtime::Runtime,
    client: cri_api::RuntimeServiceClient<tonic::transport::Channel>,
}

impl Default for Cri {
    fn default() -> Self {
        Self::new()
    }
}

impl Cri {
    pub fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = runtime.block_on(async {
            cri_api::RuntimeServiceClient::new(cri_api::unix_channel(podsnapd_socket()))
        });
        Cri { runtime, client }
    }

    pub fn checkpoint(
        &self,
        sandbox: &str,
        output: &str,
        containers: &[&str],
        options: &[(&str, &str)],
    ) -> Result<(), tonic::Status> {
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(cri_api::v1::CheckpointPodRequest {
            pod_sandbox_id: sandbox.to_string(),
            output_path: output.to_string(),
            container_ids: containers.iter().map(|c| c.to_string()).collect(),
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        });
        request.set_timeout(Duration::from_secs(120));
        self.runtime
            .block_on(client.checkpoint_pod(request))
            .map(drop)
    }

    pub fn restore(
        &self,
        checkpoint: &str,
        handler: &str,
        pod: cri_api::v1::PodSandboxConfig,
        containers: Vec<cri_api::v1::ContainerConfig>,
    ) -> Result<(), tonic::Status> {
        let mut client = self.client.clone();
        let mut request = tonic::Request::new(cri_api::v1::RestorePodRequest {
            checkpoint_path: checkpoint.to_string(),
            config: Some(pod),
            runtime_handler: handler.to_string(),
            options: Default::default(),
            container_configs: containers,
        });
        request.set_timeout(Duration::from_secs(120));
        self.runtime.block_on(client.restore_pod(request)).map(drop)
    }
}

/// Asserts that a CRI call failed with `code`, its message naming `needle`.
pub fn assert_status(result: Result<(), tonic::Status>, code: tonic::Code, needle: &str) {
    match result {
        Ok(()) => panic!("accepted; expected {code:?} naming {needle:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert!(
                status.message().contains(needle),
                "expected {needle:?} in {:?}",
                status.message()
            );
        }
    }
}

/// A pod sandbox config named `name` and one container `counter` of `image`, for RestorePod.
pub fn restore_configs(
    name: &str,
    image: &str,
) -> (
    cri_api::v1::PodSandboxConfig,
    Vec<cri_api::v1::ContainerConfig>,
) {
    use cri_api::v1::{
        ContainerConfig, ContainerMetadata, ImageSpec, PodSandboxConfig, PodSandboxMetadata,
    };
    let pod = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("{name}-uid"),
            namespace: "podsnap-e2e".to_string(),
            attempt: 0,
        }),
        ..Default::default()
    };
    let container = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "counter".to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    };
    (pod, vec![container])
}

/// `podsnap pod restore` of `checkpoint` with the given configs, not started; the restored pod
/// and `(container id, name)` pairs it printed.
pub fn restore_created(checkpoint: &Path, pod: &Path, containers: &[&Path]) -> Finished {
    restore(checkpoint, pod, containers, false)
}

/// `podsnap pod restore` of `checkpoint` with the given configs, started when `start`.
fn restore(checkpoint: &Path, pod: &Path, containers: &[&Path], start: bool) -> Finished {
    let mut args = vec![
        "pod".to_string(),
        "restore".to_string(),
        checkpoint.display().to_string(),
        "--pod-config".to_string(),
        pod.display().to_string(),
    ];
    for container in containers {
        args.push("--container-config".to_string());
        args.push(container.display().to_string());
    }
    if start {
        args.push("--start".to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    podsnap(&args)
}

/// The pod's container cgroups in the freezer hierarchy, and their states.
pub fn freezer_state(container: &str) -> String {
    std::fs::read_to_string(format!(
        "/sys/fs/cgroup/freezer/k8s.io/{container}/freezer.state"
    ))
    .unwrap_or_default()
    .trim()
    .to_string()
}

/// The node's runtime state directory (`PODSNAP_NODE_RUN`, as for the `hack/` scripts): its
/// sockets, pid files and logs.
pub fn node_run() -> PathBuf {
    PathBuf::from(std::env::var("PODSNAP_NODE_RUN").unwrap_or_else(|_| "/run/podsnap-node".into()))
}

/// A process stopped with SIGSTOP until this is dropped (SIGCONT), panics included.
pub struct Stopped(nix::unistd::Pid);

impl Stopped {
    /// Stops the process whose pid is in `pidfile`.
    pub fn process(pidfile: &Path) -> Self {
        let pid: i32 = std::fs::read_to_string(pidfile)
            .unwrap_or_else(|e| panic!("read {}: {e}", pidfile.display()))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("pid in {}: {e}", pidfile.display()));
        Stopped::pid(pid, None)
    }

    /// Stops process `pid`; with `name`, only once `/proc/<pid>/comm` confirms it is that.
    pub fn pid(pid: i32, name: Option<&str>) -> Self {
        if let Some(name) = name {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            assert_eq!(comm.trim(), name, "pid {pid} is not {name}");
        }
        let pid = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)
            .unwrap_or_else(|e| panic!("SIGSTOP {pid}: {e}"));
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

/// A podsnap pod of two containers: `hog` (the memtest fixture over some MiB, its memory
/// touched) and `sidecar` (sleeps in a loop; frozen with the pod, captured only when a test asks).
pub struct HogPod {
    pub pod: String,
    pub hog: String,
    pub sidecar: String,
    pub mib: u32,
}

impl HogPod {
    pub fn start(ws: &mut Workspace, name: &str, mib: u32) -> HogPod {
        let node = Node::get();
        let hog = ws.fixture_config("hog", crate::fixtures::memtest(), &[&mib.to_string()]);
        // Not a bare `sleep 3600`: a sleep CRIU interrupts (a leave-running dump, with runc
        // too) ends early, with status 0.
        let sidecar = ws.container_config(
            "sidecar",
            json!(["sh", "-c", "while true; do sleep 1; done"]),
            json!([]),
        );
        let config = ws.pod_config(&unique(name));
        let pod = ws.run_pod(Handler::Podsnap, &config);
        let hog = ws.run_container(&pod, &hog, &config);
        let sidecar = ws.run_container(&pod, &sidecar, &config);
        wait_for(
            "the hog to hold its memory",
            Duration::from_secs(120),
            || file_in(node, &hog, "/tmp/memtest.ready"),
        );
        HogPod {
            pod,
            hog,
            sidecar,
            mib,
        }
    }

    pub fn containers(&self) -> [&str; 2] {
        [&self.hog, &self.sidecar]
    }

    /// Has memtest check every word of its memory (SIGUSR1) and asserts none changed.
    pub fn assert_memory_intact(&self) {
        let node = Node::get();
        let _ = node.crictl_try(["exec", &self.hog, "rm", "-f", "/tmp/memtest.result"]);
        node.crictl(["exec", &self.hog, "kill", "-USR1", "1"]);
        let result = wait_for(
            "memtest to check its pages",
            Duration::from_secs(60),
            || file_in(node, &self.hog, "/tmp/memtest.result"),
        );
        let pages = (u64::from(self.mib) << 20) / 4096;
        assert_eq!(
            result.trim(),
            format!("checked {pages} pages, 0 bad words"),
            "the hog's memory changed"
        );
    }
}

/// What the file at `path` in `container` holds (`crictl exec cat`), or why it cannot be read.
pub fn file_in(node: &Node, container: &str, path: &str) -> Result<String, String> {
    let out = node.crictl_try(["exec", container, "cat", path]);
    if out.success() {
        Ok(out.stdout)
    } else {
        Err(out.report())
    }
}

/// The entries of a directory, by name (none when it cannot be read).
pub fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `dir` is empty (a failed checkpoint's partial output removed).
pub fn wait_empty(dir: &Path, within: Duration) {
    wait_for("no partial checkpoint", within, || {
        let left = entries(dir);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{} holds {left:?}", dir.display()))
        }
    });
}

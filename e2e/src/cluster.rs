//! The Kubernetes clusters the tests run on, seen from a test: the patched kubelet, the
//! apiserver, and `kubectl` with the administrator's kubeconfig. [`Cluster::get`] is the cluster
//! the cluster suite (`cluster.rs`, `controller.rs`, `load.rs`) runs on: the single-node cluster
//! `hack/cluster-up.sh` starts on this machine, or, with `PODSNAP_E2E_CLUSTER=kind`, the kind
//! cluster `hack/kind-up.sh` starts (nodes in podman containers, podsnap deployed from
//! `deploy/`), with every pod a test creates placed on its first worker ([`Cluster::node`]).
//! [`Cluster::kind`] is the kind cluster for the multi-node tests (`kind.rs`), which place their
//! pods themselves.
//!
//! A test reaches a node's files, logs and processes through the `node_*` methods, the same on
//! both: on this machine for the single-node cluster, by `podman exec` in a kind node.
//!
//! Like [`crate::node`], nothing here starts or builds anything: a missing cluster fails the
//! test with what to run. Paths follow `hack/cluster-lib.sh` (`PODSNAP_CLUSTER_RUN`,
//! `PODSNAP_CLUSTER_LIB`). Pods a test creates are deleted when their [`KubePod`] guard drops.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use crate::command::{CommandLine, Finished};
use crate::poll::wait_for;

/// The node's name (cluster-up's default).
pub const NODE_NAME: &str = "podsnap-node";

/// Which cluster [`Cluster::get`] is: `host` (default) or `kind`.
pub const CLUSTER_ENV: &str = "PODSNAP_E2E_CLUSTER";

/// A node's component whose log a test reads ([`Cluster::node_log`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Containerd,
    Podsnapd,
    Kubelet,
}

impl Component {
    /// Its systemd unit in a kind node.
    fn unit(self) -> &'static str {
        match self {
            Component::Containerd => "containerd",
            Component::Podsnapd => "podsnapd",
            Component::Kubelet => "kubelet",
        }
    }
}

/// The annotation that makes the patched kubelet restore a pod from a checkpoint.
pub const RESTORE_FROM: &str = "checkpoint.k8s.io/restore-from";

/// containerd's CRI socket in a kind node.
const KIND_CRI_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";

/// The namespace and label selector of podsnap-controller's pods in the kind cluster.
const CONTROLLER_NAMESPACE: &str = "podsnap-system";
const CONTROLLER_SELECTOR: &str = "app.kubernetes.io/name=podsnap-controller";

/// The image of the tests' pods (pushed to the local registry by `hack/images.sh`).
pub const COUNTER_IMAGE: &str = "docker.io/library/busybox:1.37.0";

/// The seed talk's counter: prints `count: N` every second.
pub const COUNTER_SCRIPT: &str =
    "i=0; while true; do echo \"count: $i\"; i=$((i+1)); sleep 1; done";

/// How long a pod may take to become ready (image pull from the local registry included).
pub const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// The running cluster.
#[derive(Debug)]
pub struct Cluster {
    pub kubectl: PathBuf,
    pub kubeconfig: PathBuf,
    /// The kubelet's root directory; pod checkpoints are in `pod-checkpoints/` under it.
    pub kubelet_root: PathBuf,
    /// The cluster's CA, whose key signs test users' client certificates.
    pub pki: PathBuf,
    pub kubelet_log: PathBuf,
    /// hack/cluster-lib.sh's (or kind-lib.sh's) run directory (pid files, logs).
    pub run: PathBuf,
    /// Whether this is the kind cluster (nodes are podman containers of these names).
    pub kind: bool,
    /// The node the suite's pods run on: cluster-up's node, or kind's first worker.
    pub node: String,
    /// Whether [`Cluster::apply`] places pods that name no node on [`Cluster::node`] (the
    /// cluster suite on kind; the kind tests place theirs).
    pin_pods: bool,
    /// Where the kubelet puts every pod's cgroups in the freezer hierarchy, on [`Cluster::node`].
    pub freezer_root: PathBuf,
}

/// podsnap-controller stopped ([`Cluster::stop_controller`]); dropped, it runs again.
pub struct ControllerStopped<'c> {
    cluster: &'c Cluster,
}

impl Drop for ControllerStopped<'_> {
    fn drop(&mut self) {
        let cluster = self.cluster;
        if !cluster.kind {
            cluster.start_controller();
            return;
        }
        cluster.kubectl([
            "-n",
            CONTROLLER_NAMESPACE,
            "scale",
            "deployment/podsnap-controller",
            "--replicas=1",
        ]);
        cluster.kubectl([
            "-n",
            CONTROLLER_NAMESPACE,
            "rollout",
            "status",
            "deployment/podsnap-controller",
            "--timeout=120s",
        ]);
    }
}

/// The outcome of `POST /checkpointpod/...` through the API server's node proxy.
#[derive(Debug)]
pub struct CheckpointAnswer {
    pub finished: Finished,
    /// The checkpoint directory, when the kubelet made one.
    pub location: Option<PathBuf>,
}

impl Cluster {
    /// The cluster suite's cluster, checked once per test binary: kubectl and the admin
    /// kubeconfig exist, the apiserver is ready and the node is Ready. That is the single-node
    /// cluster, or the kind cluster when `PODSNAP_E2E_CLUSTER=kind` (its pods then placed on its
    /// first worker). Panics with what to do otherwise (these tests never skip).
    pub fn get() -> &'static Cluster {
        static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
        let which = std::env::var(CLUSTER_ENV).unwrap_or_default();
        let (result, start) = match which.as_str() {
            "" | "host" => (CLUSTER.get_or_init(Cluster::check), "hack/cluster-up.sh"),
            "kind" => (
                CLUSTER.get_or_init(|| Cluster::check_kind(true)),
                "hack/kind-up.sh",
            ),
            other => panic!("{CLUSTER_ENV}={other:?}: want host or kind"),
        };
        match result {
            Ok(cluster) => cluster,
            Err(why) => panic!(
                "the podsnap test cluster is not usable: {why}\n\
                 (start it with {start}; these tests do not skip, CI={})",
                std::env::var("CI").unwrap_or_default()
            ),
        }
    }

    fn check() -> Result<Cluster, String> {
        let run = env_path("PODSNAP_CLUSTER_RUN", "/run/podsnap-cluster");
        let lib = env_path("PODSNAP_CLUSTER_LIB", "/var/lib/podsnap-cluster");
        let bin = std::fs::read_to_string(run.join("kube-bin"))
            .map_err(|e| format!("{}: {e}", run.join("kube-bin").display()))?;
        let cluster = Cluster {
            kubectl: Path::new(bin.trim()).join("kubectl"),
            kubeconfig: lib.join("admin.kubeconfig"),
            kubelet_root: lib.join("kubelet"),
            pki: lib.join("pki"),
            kubelet_log: run.join("kubelet.log"),
            run,
            kind: false,
            node: NODE_NAME.to_owned(),
            pin_pods: false,
            // KUBELET_CGROUP_ROOT of hack/cluster-lib.sh.
            freezer_root: PathBuf::from("/sys/fs/cgroup/freezer/podsnap-cluster"),
        };
        for file in [&cluster.kubectl, &cluster.kubeconfig] {
            if !file.exists() {
                return Err(format!("{} is missing", file.display()));
            }
        }
        let ready = cluster
            .kubectl_try(["get", "--raw", "/readyz"])
            .map_err(|e| format!("the apiserver is not ready: {e}"))?;
        if !ready.success() {
            return Err(format!("the apiserver is not ready:\n{}", ready.report()));
        }
        let node = cluster
            .kubectl_try([
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])
            .map_err(|e| e.to_string())?;
        if node.stdout.trim() != "True" {
            return Err(format!("node {NODE_NAME} is not Ready:\n{}", node.report()));
        }
        Ok(cluster)
    }

    /// The kind cluster (`hack/kind-up.sh`), checked once per test binary: its kubeconfig, every
    /// node Ready, podsnap-controller available. Panics with what to do otherwise.
    pub fn kind() -> &'static Cluster {
        static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
        match CLUSTER.get_or_init(|| Cluster::check_kind(false)) {
            Ok(cluster) => cluster,
            Err(why) => panic!(
                "the podsnap kind cluster is not usable: {why}\n\
                 (start it with hack/kind-up.sh; these tests do not skip, CI={})",
                std::env::var("CI").unwrap_or_default()
            ),
        }
    }

    /// `pin_pods`: place the pods a test creates on the first worker (the cluster suite).
    fn check_kind(pin_pods: bool) -> Result<Cluster, String> {
        let run = env_path("PODSNAP_KIND_RUN", "/run/podsnap-kind");
        let bin = std::fs::read_to_string(run.join("kube-bin"))
            .map_err(|e| format!("{}: {e}", run.join("kube-bin").display()))?;
        let mut cluster = Cluster {
            kubectl: Path::new(bin.trim()).join("kubectl"),
            kubeconfig: run.join("kubeconfig"),
            kubelet_root: PathBuf::from("/var/lib/kubelet"),
            pki: run.join("pki"),
            kubelet_log: run.join("kubelet.log"),
            run,
            kind: true,
            node: String::new(),
            pin_pods,
            // kind's kubelet cgroupRoot, in the node's cgroup namespace.
            freezer_root: PathBuf::from("/sys/fs/cgroup/freezer/kubelet"),
        };
        for file in [&cluster.kubectl, &cluster.kubeconfig] {
            if !file.exists() {
                return Err(format!("{} is missing", file.display()));
            }
        }
        for (what, args) in [
            (
                "every node Ready",
                "wait --for condition=Ready --timeout 60s node --all",
            ),
            (
                "podsnap-controller available",
                "-n podsnap-system wait --for condition=Available --timeout 60s deployment/podsnap-controller",
            ),
        ] {
            let f = cluster
                .kubectl_try(args.split(' '))
                .map_err(|e| e.to_string())?;
            if !f.success() {
                return Err(format!("not {what}:\n{}", f.report()));
            }
        }
        let mut workers = cluster.workers();
        workers.sort();
        cluster.node = workers
            .into_iter()
            .next()
            .ok_or("the kind cluster has no worker")?;
        Ok(cluster)
    }

    /// A manifest of `examples/`, as kubectl reads it (`create --dry-run=client -o json`).
    pub fn example(&self, file: &str) -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(file);
        let out = self.kubectl([
            "create",
            "--dry-run=client",
            "-o",
            "json",
            "-f",
            path.to_str().unwrap(),
        ]);
        serde_json::from_str(&out).unwrap()
    }

    /// The nodes' names, and whether each is a control-plane node.
    pub fn nodes(&self) -> Vec<(String, bool)> {
        let out = self.kubectl(["get", "nodes", "-o", "json"]);
        let list: Value = serde_json::from_str(&out).expect("kubectl get nodes -o json");
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                let name = n["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let control_plane = n["metadata"]["labels"]
                    .get("node-role.kubernetes.io/control-plane")
                    .is_some();
                (name, control_plane)
            })
            .collect()
    }

    /// The nodes that are not control-plane nodes.
    pub fn workers(&self) -> Vec<String> {
        self.nodes()
            .into_iter()
            .filter(|(_, control_plane)| !control_plane)
            .map(|(name, _)| name)
            .collect()
    }

    /// Runs `argv` on a node, a 60-second deadline: in the kind node's container (`podman
    /// exec`), or on this machine, the single-node cluster's node; its outcome.
    pub fn node_exec(&self, node: &str, argv: &[&str]) -> Finished {
        self.node_command(node, argv)
            .run()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The command line running `argv` on a node (see [`Cluster::node_exec`]).
    fn node_command(&self, node: &str, argv: &[&str]) -> CommandLine {
        let command = if self.kind {
            // podman as hack/kind-lib.sh configures it for this host (runtime, cgroup manager).
            let cache = std::env::var("PODSNAP_CACHE").unwrap_or("/var/cache/podsnap".into());
            CommandLine::new("podman")
                .env("CONTAINERS_CONF", format!("{cache}/kind/containers.conf"))
                .arg("exec")
                .arg(node)
                .args(argv)
        } else {
            assert_eq!(
                node, self.node,
                "the single-node cluster has no node {node}"
            );
            CommandLine::new(argv[0]).args(&argv[1..])
        };
        command.timeout(Duration::from_secs(60))
    }

    /// Runs a POSIX shell script on a node (`sh -c script sh args...`).
    fn node_sh(&self, node: &str, script: &str, args: &[&str]) -> Finished {
        let mut argv = vec!["sh", "-c", script, "sh"];
        argv.extend_from_slice(args);
        self.node_exec(node, &argv)
    }

    /// A file's text on a node; `None` when it cannot be read.
    pub fn node_read(&self, node: &str, path: &Path) -> Option<String> {
        let f = self.node_exec(node, &["cat", "--", path_str(path)]);
        f.success().then_some(f.stdout)
    }

    /// Whether `test <test> <path>` holds on a node (`-e`, `-d`, `-f`, ...).
    pub fn node_test(&self, node: &str, test: &str, path: &Path) -> bool {
        self.node_exec(node, &["test", test, path_str(path)])
            .success()
    }

    /// The names in a directory on a node; empty when it does not exist.
    pub fn node_entries(&self, node: &str, dir: &Path) -> BTreeSet<String> {
        let f = self.node_sh(node, r#"[ ! -e "$1" ] || ls -A1 -- "$1""#, &[path_str(dir)]);
        assert!(f.success(), "{}", f.report());
        f.stdout.lines().map(str::to_owned).collect()
    }

    /// A file's permission bits on a node.
    pub fn node_mode(&self, node: &str, path: &Path) -> u32 {
        let f = self.node_exec(node, &["stat", "-c", "%a", "--", path_str(path)]);
        assert!(f.success(), "{}", f.report());
        u32::from_str_radix(f.stdout.trim(), 8).expect("stat %a is octal")
    }

    /// Removes a file or a directory tree on a node.
    pub fn node_remove(&self, node: &str, path: &Path) {
        let f = self.node_exec(node, &["rm", "-rf", "--", path_str(path)]);
        assert!(f.success(), "{}", f.report());
    }

    /// Tampers with a checkpoint on a node: flips a byte in the middle of its largest file (a
    /// memory image); returns that file.
    pub fn tamper_with(&self, node: &str, checkpoint: &Path) -> PathBuf {
        const SCRIPT: &str = r#"set -e
f=$(find "$1" -type f -printf '%s %p\n' | sort -n | tail -n 1 | cut -d' ' -f2-)
[ -n "$f" ] || { echo "no file under $1" >&2; exit 1; }
mid=$(($(stat -c %s "$f") / 2))
byte=$(od -An -tu1 -j "$mid" -N1 "$f" | tr -d ' ')
printf '%b' "$(printf '\\0%o' $((byte ^ 255)))" | dd of="$f" bs=1 seek="$mid" conv=notrunc status=none
printf '%s\n' "$f""#;
        let f = self.node_sh(node, SCRIPT, &[path_str(checkpoint)]);
        assert!(f.success(), "{}", f.report());
        PathBuf::from(f.stdout.trim_end())
    }

    /// A component's log on a node: its log file on this machine (hack/node-up.sh,
    /// hack/cluster-up.sh), its journal in a kind node.
    pub fn node_log(&self, node: &str, component: Component) -> String {
        if self.kind {
            let f = self.node_exec(
                node,
                &[
                    "journalctl",
                    "--no-pager",
                    "-o",
                    "cat",
                    "-u",
                    component.unit(),
                ],
            );
            assert!(f.success(), "{}", f.report());
            return f.stdout;
        }
        let file = match component {
            Component::Containerd => crate::cri_workspace::node_run().join("containerd.log"),
            Component::Podsnapd => crate::cri_workspace::node_run().join("podsnapd.log"),
            Component::Kubelet => self.kubelet_log.clone(),
        };
        std::fs::read_to_string(&file).unwrap_or_default()
    }

    /// `crictl` on a node, as its kubelet's runtime sees it; its stdout.
    pub fn node_crictl(&self, node: &str, args: &[&str]) -> String {
        if !self.kind {
            return crate::Node::get().crictl(args);
        }
        let mut argv = vec!["crictl", "--runtime-endpoint", KIND_CRI_ENDPOINT];
        argv.extend_from_slice(args);
        let f = self.node_exec(node, &argv);
        assert!(f.success(), "{}", f.report());
        f.stdout
    }

    /// The cgroups under [`Cluster::freezer_root`] on a node that are not thawed.
    pub fn frozen_cgroups(&self, node: &str) -> Vec<String> {
        let root = path_str(&self.freezer_root);
        assert!(
            self.node_test(node, "-d", &self.freezer_root),
            "{root} does not exist on {node}: the frozen-cgroup check would see nothing"
        );
        let f = self.node_sh(
            node,
            r#"find "$1" -name freezer.state | while read -r f; do
                 s=$(cat "$f" 2>/dev/null) || continue
                 [ "$s" = THAWED ] || printf '%s: %s\n' "${f%/freezer.state}" "$s"
               done"#,
            &[root],
        );
        assert!(f.success(), "{}", f.report());
        f.stdout.lines().map(str::to_owned).collect()
    }

    /// Kills the kubelet of a node with SIGKILL: by its pid file on this machine (checking the
    /// pid is the kubelet's), through systemd in a kind node.
    pub fn kill_kubelet(&self, node: &str) {
        if self.kind {
            let f = self.node_exec(node, &["systemctl", "kill", "--signal=KILL", "kubelet"]);
            assert!(f.success(), "{}", f.report());
            return;
        }
        let pidfile = self.run.join("kubelet.pid");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()))
            .trim()
            .parse()
            .expect("a pid");
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_eq!(comm.trim(), "kubelet", "pid {pid} is not the kubelet");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)
            .unwrap_or_else(|e| panic!("kill {pid}: {e}"));
    }

    /// Starts a killed kubelet again (`hack/cluster-up.sh`; systemd in a kind node, whose unit
    /// restarts it by itself) and waits for its node to be Ready.
    pub fn start_kubelet(&self, node: &str) {
        if self.kind {
            let f = self.node_exec(node, &["systemctl", "start", "kubelet"]);
            assert!(f.success(), "{}", f.report());
        } else {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/cluster-up.sh");
            let up = CommandLine::new("bash")
                .arg(script)
                .timeout(Duration::from_secs(300))
                .run()
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(up.success(), "restart the kubelet: {}", up.report());
        }
        // Serving again (its node may still be Ready from before it was killed).
        wait_for(
            format!("the kubelet of {node} to serve"),
            Duration::from_secs(120),
            || {
                let f = self.kubectl_try([
                    "get",
                    "--raw",
                    &format!("/api/v1/nodes/{node}/proxy/healthz"),
                ])?;
                if f.success() && f.stdout.trim() == "ok" {
                    Ok(())
                } else {
                    Err(f.report())
                }
            },
        );
        self.kubectl([
            "wait",
            "--for=condition=Ready",
            "--timeout=120s",
            &format!("node/{node}"),
        ]);
    }

    /// The directory on its node of the checkpoint a PodCheckpoint's `status` names: its
    /// `checkpointLocation`, KEP-5823's `{type: NodeLocal, nodeLocal: {path}}` relative to the
    /// kubelet's checkpoint root.
    pub fn checkpoint_dir(&self, status: &Value) -> PathBuf {
        let location = &status["checkpointLocation"];
        assert_eq!(location["type"], "NodeLocal", "{status}");
        let path = location["nodeLocal"]["path"]
            .as_str()
            .unwrap_or_else(|| panic!("no checkpointLocation.nodeLocal.path in {status}"));
        assert!(
            path.starts_with("checkpoint-") && !path.contains('/'),
            "{status}"
        );
        self.kubelet_root.join("pod-checkpoints").join(path)
    }

    /// The `podsnap` CLI (the workspace's debug build) with the admin kubeconfig, as a user runs
    /// it against this cluster; a 400-second deadline.
    pub fn podsnap(&self, args: &[&str]) -> Finished {
        let binary = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/podsnap");
        assert!(
            binary.exists(),
            "{} is not built (cargo build -p podsnap-cli)",
            binary.display()
        );
        CommandLine::new(binary)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            // Where `inspect` finds a checkpoint's data when this machine is its node.
            .env(
                "PODSNAP_CHECKPOINTS_DIR",
                self.kubelet_root.join("pod-checkpoints"),
            )
            .timeout(Duration::from_secs(400))
            .run()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// `kubectl` with the admin kubeconfig, a 2-minute deadline.
    pub fn kubectl_command<I, S>(&self, args: I) -> CommandLine
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString>,
    {
        CommandLine::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .timeout(Duration::from_secs(120))
    }

    pub fn kubectl_try<I, S>(&self, args: I) -> Result<Finished, String>
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString>,
    {
        self.kubectl_command(args).run().map_err(|e| e.to_string())
    }

    /// Runs kubectl, panicking with its output when it fails; returns its stdout.
    pub fn kubectl<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString>,
    {
        let finished = self.kubectl_try(args).unwrap_or_else(|e| panic!("{e}"));
        assert!(finished.success(), "{}", finished.report());
        finished.stdout
    }

    /// `kubectl apply -f -` of a manifest. A Pod that names no node (alone or in a List) is
    /// placed on [`Cluster::node`] when this is the cluster suite on kind.
    pub fn apply(&self, manifest: &Value) {
        let mut manifest = manifest.clone();
        if self.pin_pods {
            self.pin(&mut manifest);
        }
        let finished = self
            .kubectl_command(["apply", "-f", "-"])
            .input(manifest.to_string())
            .run()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(finished.success(), "{}", finished.report());
    }

    /// Places a Pod (or each Pod of a List) that names no node, node selector or affinity on
    /// [`Cluster::node`], by its `kubernetes.io/hostname` label.
    fn pin(&self, manifest: &mut Value) {
        match manifest["kind"].as_str() {
            Some("List") => {
                for item in manifest["items"].as_array_mut().into_iter().flatten() {
                    self.pin(item);
                }
            }
            Some("Pod") => {
                let spec = &mut manifest["spec"];
                if spec["nodeName"].is_null()
                    && spec["nodeSelector"].is_null()
                    && spec["affinity"].is_null()
                {
                    spec["nodeSelector"] = serde_json::json!({"kubernetes.io/hostname": self.node});
                }
            }
            _ => {}
        }
    }

    /// Creates a pod from a manifest and returns its guard (the pod is deleted on drop).
    pub fn create_pod(&self, manifest: Value) -> KubePod<'_> {
        let name = manifest["metadata"]["name"]
            .as_str()
            .expect("a pod manifest names its pod")
            .to_owned();
        let namespace = manifest["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        self.apply(&manifest);
        KubePod {
            cluster: self,
            name,
            namespace,
        }
    }

    /// A guard for a pod something else created (the controller): deleted when dropped.
    pub fn existing_pod(&self, namespace: &str, name: &str) -> KubePod<'_> {
        KubePod {
            cluster: self,
            name: name.to_owned(),
            namespace: namespace.to_owned(),
        }
    }

    /// Checkpoints a pod through the API server's node proxy to the kubelet's
    /// `POST /checkpointpod/{namespace}/{pod}`, as `user` (impersonated) when given.
    pub fn checkpoint_pod(
        &self,
        namespace: &str,
        pod: &str,
        query: &str,
        user: Option<&str>,
    ) -> CheckpointAnswer {
        let path = format!(
            "/api/v1/nodes/{}/proxy/checkpointpod/{namespace}/{pod}{query}",
            self.node
        );
        let mut args = vec![
            "create".to_owned(),
            "--raw".to_owned(),
            path,
            "-f".to_owned(),
            "/dev/null".to_owned(),
        ];
        if let Some(user) = user {
            args.push(format!("--as={user}"));
        }
        let finished = self.kubectl_try(args).unwrap_or_else(|e| panic!("{e}"));
        let location = finished
            .success()
            .then(|| serde_json::from_str::<Value>(&finished.stdout).ok())
            .flatten()
            .and_then(|v| v["items"][0].as_str().map(PathBuf::from));
        CheckpointAnswer { finished, location }
    }

    /// The events about a pod, one `reason: message` per line.
    pub fn events(&self, namespace: &str, pod: &str) -> Vec<String> {
        let out = self.kubectl([
            "-n",
            namespace,
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.name={pod}"),
            "-o",
            "json",
        ]);
        let list: Value = serde_json::from_str(&out).expect("kubectl get events -o json");
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                format!(
                    "{}: {} (x{})",
                    e["reason"].as_str().unwrap_or(""),
                    e["message"].as_str().unwrap_or(""),
                    e["count"].as_u64().unwrap_or(1)
                )
            })
            .collect()
    }

    /// The kubelet's Prometheus metrics, through the API server's node proxy.
    pub fn kubelet_metrics(&self) -> String {
        self.kubectl([
            "get",
            "--raw",
            &format!("/api/v1/nodes/{}/proxy/metrics", self.node),
        ])
    }

    /// podsnap-controller's Prometheus metrics (`--metrics-bind-address`): cluster-up's port on
    /// this machine, or the controller pod's `metrics` port through the API server's pod proxy.
    pub fn controller_metrics(&self) -> String {
        use std::io::{Read, Write};
        if self.kind {
            let pod = self.controller_pod();
            return wait_for(
                "podsnap-controller's /metrics",
                Duration::from_secs(30),
                || {
                    let f = self.kubectl_try([
                        "get",
                        "--raw",
                        &format!("/api/v1/namespaces/{CONTROLLER_NAMESPACE}/pods/{pod}:8080/proxy/metrics"),
                    ])?;
                    if f.success() {
                        Ok(f.stdout)
                    } else {
                        Err(f.report())
                    }
                },
            );
        }
        let port = std::env::var("PODSNAP_CONTROLLER_METRICS_PORT").unwrap_or("16480".into());
        let answer = wait_for(
            "podsnap-controller's /metrics",
            Duration::from_secs(30),
            || -> Result<String, String> {
                let mut stream = std::net::TcpStream::connect(("127.0.0.1", port.parse().unwrap()))
                    .map_err(|e| format!("connect to 127.0.0.1:{port}: {e}"))?;
                stream
                    .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                    .map_err(|e| e.to_string())?;
                let mut text = String::new();
                stream
                    .read_to_string(&mut text)
                    .map_err(|e| e.to_string())?;
                Ok(text)
            },
        );
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{head}"
        );
        body.to_owned()
    }

    /// The running podsnap-controller pod of the kind cluster (deploy/controller.yaml).
    fn controller_pod(&self) -> String {
        wait_for(
            "a running podsnap-controller pod",
            Duration::from_secs(120),
            || {
                let f = self.kubectl_try([
                    "-n",
                    CONTROLLER_NAMESPACE,
                    "get",
                    "pods",
                    "-l",
                    CONTROLLER_SELECTOR,
                    "--field-selector=status.phase=Running",
                    "-o",
                    "jsonpath={.items[*].metadata.name}",
                ])?;
                match f.stdout.split_whitespace().collect::<Vec<_>>()[..] {
                    [pod] if f.success() => Ok(pod.to_owned()),
                    _ => Err(f.report()),
                }
            },
        )
    }

    /// Kills podsnap-controller with SIGKILL: by its pid file on this machine (checking the pid
    /// is the controller's); in kind, its container's process, found by CRI on the pod's node
    /// (the kubelet then starts the container again, as it would after a crash).
    pub fn kill_controller(&self) {
        if self.kind {
            let pod = self.controller_pod();
            let node = self.kubectl([
                "-n",
                CONTROLLER_NAMESPACE,
                "get",
                "pod",
                &pod,
                "-o",
                "jsonpath={.spec.nodeName}",
            ]);
            let f = self.node_sh(
                node.trim(),
                r#"set -e
endpoint=$3
cri() { crictl --runtime-endpoint "$endpoint" "$@"; }
sandbox=$(cri pods -q --namespace "$1" --name "$2")
id=$(cri ps -q --pod "$sandbox" --name controller)
[ -n "$id" ] || { echo "no running controller container in pod $2" >&2; exit 1; }
kill -KILL "$(cri inspect -o go-template --template '{{.info.pid}}' "$id")""#,
                &[CONTROLLER_NAMESPACE, &pod, KIND_CRI_ENDPOINT],
            );
            assert!(f.success(), "{}", f.report());
            return;
        }
        let pidfile = self.run.join("podsnap-controller.pid");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()))
            .trim()
            .parse()
            .expect("a pid");
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_eq!(
            comm.trim(),
            "podsnap-control",
            "pid {pid} is not podsnap-controller"
        );
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL)
            .unwrap_or_else(|e| panic!("kill {pid}: {e}"));
        wait_for(
            "the killed controller to exit",
            Duration::from_secs(10),
            || {
                match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                    // Gone, or a zombie its parent (setsid's shell) has not reaped.
                    Err(_) => Ok(()),
                    Ok(stat) if stat.split(' ').nth(2) == Some("Z") => Ok(()),
                    Ok(_) => Err(format!("pid {pid} still runs")),
                }
            },
        );
    }

    /// Starts podsnap-controller and its node agent again (`hack/cluster-up.sh
    /// --podsnap-controller`); in kind, waits until its Deployment is available again.
    pub fn start_controller(&self) {
        if self.kind {
            // The kubelet restarts the killed container; Available once it is ready again.
            wait_for(
                "podsnap-controller to be ready again",
                Duration::from_secs(120),
                || {
                    let f = self.kubectl_try([
                        "-n",
                        CONTROLLER_NAMESPACE,
                        "get",
                        "pods",
                        "-l",
                        CONTROLLER_SELECTOR,
                        "-o",
                        "jsonpath={.items[*].status.containerStatuses[*].restartCount} {.items[*].status.containerStatuses[*].ready}",
                    ])?;
                    let out = f.stdout.trim().to_owned();
                    let fields: Vec<&str> = out.split_whitespace().collect();
                    match fields[..] {
                        [restarts, "true"] if restarts != "0" => Ok(()),
                        _ => Err(format!("restarts and ready: {out:?}")),
                    }
                },
            );
            return;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/cluster-up.sh");
        let finished = CommandLine::new("bash")
            .args([script.to_str().unwrap(), "--podsnap-controller"])
            .run()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(finished.success(), "{}", finished.report());
    }

    /// Stops podsnap-controller until the guard returned is dropped (a failed assertion
    /// included), which starts it again: on this machine it is killed and started by
    /// `hack/cluster-up.sh --podsnap-controller`; in kind its Deployment is scaled to 0 (its pod
    /// gone) and back to 1 (rolled out).
    pub fn stop_controller(&self) -> ControllerStopped<'_> {
        if self.kind {
            self.kubectl([
                "-n",
                CONTROLLER_NAMESPACE,
                "scale",
                "deployment/podsnap-controller",
                "--replicas=0",
            ]);
            wait_for(
                "no podsnap-controller pod",
                Duration::from_secs(120),
                || {
                    let f = self.kubectl_try([
                        "-n",
                        CONTROLLER_NAMESPACE,
                        "get",
                        "pods",
                        "-l",
                        CONTROLLER_SELECTOR,
                        "-o",
                        "name",
                    ])?;
                    match f.stdout.trim() {
                        "" if f.success() => Ok(()),
                        _ => Err(f.report()),
                    }
                },
            );
        } else {
            self.kill_controller();
        }
        ControllerStopped { cluster: self }
    }

    /// The tail of the kubelet's log (of [`Cluster::node`]), for messages.
    pub fn kubelet_log_tail(&self) -> String {
        let log = self.node_log(&self.node, Component::Kubelet);
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// A checkpoint.k8s.io object (PodCheckpoint, PodRestore, PodMigration) created by a test,
/// deleted when dropped.
pub struct Object<'c> {
    cluster: &'c Cluster,
    kind: &'static str,
    pub name: String,
}

impl<'c> Object<'c> {
    pub fn create(cluster: &'c Cluster, manifest: Value) -> Self {
        let kind = match manifest["kind"].as_str() {
            Some("PodCheckpoint") => "podcheckpoint",
            Some("PodRestore") => "podrestore",
            Some("PodMigration") => "podmigration",
            other => panic!("not a checkpoint.k8s.io kind: {other:?}"),
        };
        let name = manifest["metadata"]["name"].as_str().unwrap().to_owned();
        cluster.apply(&manifest);
        Object {
            cluster,
            kind,
            name,
        }
    }

    pub fn get(&self) -> Value {
        serde_json::from_str(
            &self
                .cluster
                .kubectl(["get", self.kind, &self.name, "-o", "json"]),
        )
        .unwrap()
    }

    /// Waits for `.status.phase` to be one of `phases`; returns the object.
    pub fn wait_phase(&self, phases: &[&str]) -> Value {
        wait_for(
            format!("{} {} to reach {phases:?}", self.kind, self.name),
            Duration::from_secs(180),
            || {
                let object = self.get();
                match object["status"]["phase"].as_str() {
                    Some(p) if phases.contains(&p) => Ok(object),
                    _ => Err(object["status"].to_string()),
                }
            },
        )
    }
}

impl Drop for Object<'_> {
    fn drop(&mut self) {
        let _ = self.cluster.kubectl_try([
            "delete",
            self.kind,
            &self.name,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=60s",
        ]);
    }
}

/// A PodCheckpoint of pod `pod` in namespace `default`.
pub fn checkpoint_of(name: &str, pod: &str) -> Value {
    serde_json::json!({
        "apiVersion": "checkpoint.k8s.io/v1alpha1", "kind": "PodCheckpoint",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"sourcePodName": pod, "timeoutSeconds": 120}
    })
}

/// A pod created by a test, deleted (and waited for) when dropped.
#[derive(Debug)]
pub struct KubePod<'c> {
    cluster: &'c Cluster,
    pub name: String,
    pub namespace: String,
}

impl KubePod<'_> {
    pub fn get(&self) -> Value {
        let out = self.cluster.kubectl([
            "-n",
            &self.namespace,
            "get",
            "pod",
            &self.name,
            "-o",
            "json",
        ]);
        serde_json::from_str(&out).expect("kubectl get pod -o json")
    }

    /// Waits until the pod is Ready.
    pub fn wait_ready(&self) {
        wait_for(
            format!("pod {}/{} to be Ready", self.namespace, self.name),
            READY_TIMEOUT,
            || {
                let pod = self.get();
                let ready = pod["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                if ready {
                    Ok(())
                } else {
                    Err(format!(
                        "status {}; events {:?}",
                        pod["status"],
                        self.cluster.events(&self.namespace, &self.name)
                    ))
                }
            },
        )
    }

    /// Waits until the pod's condition `kind` has `status` and `reason` (KEP-5823's
    /// `Checkpointing` and `Restoring`, which the kubelet writes); returns the condition.
    pub fn wait_condition(&self, kind: &str, status: &str, reason: &str) -> Value {
        wait_for(
            format!(
                "pod {}/{} condition {kind}={status} ({reason})",
                self.namespace, self.name
            ),
            Duration::from_secs(90),
            || {
                let pod = self.get();
                let found = pod["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|c| c["type"] == kind)
                    .cloned();
                match found {
                    Some(c) if c["status"] == status && c["reason"] == reason => Ok(c),
                    _ => Err(pod["status"]["conditions"].to_string()),
                }
            },
        )
    }

    /// Waits until `container` has logged at least `n` `count: N` lines; returns them.
    pub fn wait_counting(&self, container: &str, n: usize) -> Vec<u64> {
        wait_for(
            format!("{} to count {n} times", self.name),
            Duration::from_secs(60),
            || {
                let seen = counts(&self.logs(container));
                if seen.len() >= n {
                    Ok(seen)
                } else {
                    Err(format!("{seen:?}"))
                }
            },
        )
    }

    /// The current log of one of its containers (`kubectl logs`).
    pub fn logs(&self, container: &str) -> String {
        self.cluster
            .kubectl(["-n", &self.namespace, "logs", &self.name, "-c", container])
    }

    /// [`KubePod::logs`], or why not (a kubelet just restarted may not serve them yet).
    pub fn try_logs(&self, container: &str) -> Result<String, String> {
        let f = self.cluster.kubectl_try([
            "-n",
            &self.namespace,
            "logs",
            &self.name,
            "-c",
            container,
        ])?;
        if f.success() {
            Ok(f.stdout)
        } else {
            Err(f.report())
        }
    }

    /// The `kubectl exec` arguments running `argv` in one of its containers.
    fn exec_args<'a>(&'a self, container: &'a str, argv: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "-n",
            &self.namespace,
            "exec",
            &self.name,
            "-c",
            container,
            "--",
        ];
        args.extend_from_slice(argv);
        args
    }

    /// `kubectl exec` in one of its containers; returns stdout.
    pub fn exec(&self, container: &str, argv: &[&str]) -> String {
        self.cluster.kubectl(self.exec_args(container, argv))
    }

    /// `kubectl exec`, returning stdout even when it fails (empty then).
    pub fn exec_try(&self, container: &str, argv: &[&str]) -> String {
        self.cluster
            .kubectl_try(self.exec_args(container, argv))
            .map(|f| if f.success() { f.stdout } else { String::new() })
            .unwrap_or_default()
    }

    pub fn uid(&self) -> String {
        self.get()["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The events about this pod.
    pub fn events(&self) -> Vec<String> {
        self.cluster.events(&self.namespace, &self.name)
    }

    /// Deletes the pod and waits until it is gone.
    pub fn delete(self) {
        // Drop does it.
    }
}

impl Drop for KubePod<'_> {
    fn drop(&mut self) {
        let result = self.cluster.kubectl_try([
            "-n",
            &self.namespace,
            "delete",
            "pod",
            &self.name,
            "--ignore-not-found",
            "--grace-period=2",
            "--wait=true",
            "--timeout=90s",
        ]);
        match result {
            Ok(f) if f.success() => {}
            Ok(f) if !std::thread::panicking() => {
                panic!("deleting the pod failed:\n{}", f.report())
            }
            Err(e) if !std::thread::panicking() => panic!("deleting the pod failed: {e}"),
            _ => {}
        }
    }
}

/// The seed talk's counting pod in namespace `default`, on the podsnap runtime class: one
/// container `counter` running [`COUNTER_SCRIPT`].
pub fn counter_pod(name: &str) -> Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "counter"}},
        "spec": {
            "runtimeClassName": "podsnap",
            "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "counter", "image": COUNTER_IMAGE, "command": ["sh", "-c", COUNTER_SCRIPT]}]
        }
    })
}

/// The numbers of the `count: N` lines of a log, in order.
pub fn counts(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.strip_prefix("count: "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("the tests' paths are UTF-8")
}

fn env_path(name: &str, default: &str) -> PathBuf {
    std::env::var_os(name)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

/// The value of one series in Prometheus text (`name{labels}` exactly as written there, or the
/// bare name); 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_reads_the_counter_lines() {
        assert_eq!(counts("count: 3\nnoise\ncount: 4\ncount: x\n"), vec![3, 4]);
        assert!(counts("").is_empty());
    }
}

//! The Kubernetes clusters the tests run on, seen from a test: the patched kubelet, the
//! apiserver, and `kubectl` with the administrator's kubeconfig. [`Cluster::get`] is the
//! single-node cluster `hack/cluster-up.sh` starts on this machine; [`Cluster::kind`] the kind
//! cluster `hack/kind-up.sh` starts (nodes in podman containers, podsnap deployed from
//! `deploy/`), whose nodes' files a test reaches with [`Cluster::node_exec`].
//!
//! Like [`crate::node`], nothing here starts or builds anything: a missing cluster fails the
//! test with what to run. Paths follow `hack/cluster-lib.sh` (`PODSNAP_CLUSTER_RUN`,
//! `PODSNAP_CLUSTER_LIB`). Pods a test creates are deleted when their [`KubePod`] guard drops.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use crate::command::{CommandLine, Finished};
use crate::poll::wait_for;

/// The node's name (cluster-up's default).
pub const NODE_NAME: &str = "podsnap-node";

/// The annotation that makes the patched kubelet restore a pod from a checkpoint.
pub const RESTORE_FROM: &str = "checkpoint.k8s.io/restore-from";

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
}

/// The outcome of `POST /checkpointpod/...` through the API server's node proxy.
#[derive(Debug)]
pub struct CheckpointAnswer {
    pub finished: Finished,
    /// The checkpoint directory, when the kubelet made one.
    pub location: Option<PathBuf>,
}

impl Cluster {
    /// The cluster, checked once per test binary: kubectl and the admin kubeconfig exist, the
    /// apiserver is ready and the node is Ready. Panics with what to do otherwise (these tests
    /// never skip).
    pub fn get() -> &'static Cluster {
        static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
        match CLUSTER.get_or_init(Cluster::check) {
            Ok(cluster) => cluster,
            Err(why) => panic!(
                "the podsnap test cluster is not usable: {why}\n\
                 (start it with hack/cluster-up.sh; these tests do not skip, CI={})",
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
        match CLUSTER.get_or_init(Cluster::check_kind) {
            Ok(cluster) => cluster,
            Err(why) => panic!(
                "the podsnap kind cluster is not usable: {why}\n\
                 (start it with hack/kind-up.sh; these tests do not skip, CI={})",
                std::env::var("CI").unwrap_or_default()
            ),
        }
    }

    fn check_kind() -> Result<Cluster, String> {
        let run = env_path("PODSNAP_KIND_RUN", "/run/podsnap-kind");
        let bin = std::fs::read_to_string(run.join("kube-bin"))
            .map_err(|e| format!("{}: {e}", run.join("kube-bin").display()))?;
        let cluster = Cluster {
            kubectl: Path::new(bin.trim()).join("kubectl"),
            kubeconfig: run.join("kubeconfig"),
            kubelet_root: PathBuf::from("/var/lib/kubelet"),
            pki: run.join("pki"),
            kubelet_log: run.join("kubelet.log"),
            run,
            kind: true,
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

    /// Runs `argv` on a kind node (`podman exec`); its outcome.
    pub fn node_exec(&self, node: &str, argv: &[&str]) -> Finished {
        assert!(self.kind, "node_exec is for the kind cluster's nodes");
        // podman as hack/kind-lib.sh configures it for this host (runtime, cgroup manager).
        let cache = std::env::var("PODSNAP_CACHE").unwrap_or("/var/cache/podsnap".into());
        CommandLine::new("podman")
            .env("CONTAINERS_CONF", format!("{cache}/kind/containers.conf"))
            .arg("exec")
            .arg(node)
            .args(argv)
            .timeout(Duration::from_secs(60))
            .run()
            .unwrap_or_else(|e| panic!("{e}"))
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

    /// `kubectl apply -f -` of a manifest.
    pub fn apply(&self, manifest: &Value) {
        let finished = self
            .kubectl_command(["apply", "-f", "-"])
            .input(manifest.to_string())
            .run()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(finished.success(), "{}", finished.report());
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
        let path =
            format!("/api/v1/nodes/{NODE_NAME}/proxy/checkpointpod/{namespace}/{pod}{query}");
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
            &format!("/api/v1/nodes/{NODE_NAME}/proxy/metrics"),
        ])
    }

    /// podsnap-controller's Prometheus metrics (`--metrics-bind-address`, cluster-up's port).
    pub fn controller_metrics(&self) -> String {
        use std::io::{Read, Write};
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

    /// Kills podsnap-controller (SIGKILL, by its pid file, checking the pid is the controller's)
    /// and starts it again with `hack/cluster-up.sh --podsnap-controller`.
    pub fn kill_controller(&self) {
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

    /// Starts podsnap-controller and its node agent (`hack/cluster-up.sh --podsnap-controller`).
    pub fn start_controller(&self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/cluster-up.sh");
        let finished = CommandLine::new("bash")
            .args([script.to_str().unwrap(), "--podsnap-controller"])
            .run()
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(finished.success(), "{}", finished.report());
    }

    /// The tail of the kubelet's log, for messages.
    pub fn kubelet_log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.kubelet_log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// A checkpoint.k8s.io object (PodCheckpoint, PodRestore) created by a test, deleted when dropped.
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

/// Tampers with a checkpoint: flips a byte in the middle of its largest file (a memory image);
/// returns that file.
pub fn tamper_with(checkpoint: &Path) -> PathBuf {
    let victim = largest_file(checkpoint);
    let mut bytes = std::fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&victim, bytes).unwrap();
    victim
}

/// The largest regular file under `dir`.
fn largest_file(dir: &Path) -> PathBuf {
    let mut best: Option<(u64, PathBuf)> = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else if best.as_ref().is_none_or(|(size, _)| meta.len() > *size) {
                best = Some((meta.len(), entry.path()));
            }
        }
    }
    best.expect("the directory has files").1
}

/// The numbers of the `count: N` lines of a log, in order.
pub fn counts(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.strip_prefix("count: "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
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

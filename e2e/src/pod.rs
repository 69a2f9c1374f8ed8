//! A pod a test runs through CRI (`crictl runp/create/start/...`), its containers' configs,
//! and the guarantee that the pod is removed when the test ends, even when it panics.
//!
//! Configs and container logs live in a temporary directory owned by the [`Pod`]. What a
//! removed pod may have left on the host is [`crate::leaks`]' business.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;

use crate::command::{CommandError, Finished};
use crate::leaks::Footprint;
use crate::node::{BUSYBOX, CRI_NAMESPACE, Handler, Node};

/// The Kubernetes namespace of every test pod.
pub const POD_NAMESPACE: &str = "podsnap-e2e";

/// How long `crictl rmp -f` is retried.
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(30);

/// A container to create in a pod: what `crictl create` reads.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    pub name: String,
    pub image: String,
    pub command: Vec<String>,
    pub memory_limit: Option<u64>,
    pub tty: bool,
    pub stdin: bool,
    /// CRI's `LinuxContainerSecurityContext` as JSON, if any.
    pub security_context: Option<Value>,
    /// CRI `Mount`s as JSON.
    pub mounts: Vec<Value>,
}

impl ContainerConfig {
    /// A busybox container named `name` running `sh -c script`.
    pub fn shell(name: &str, script: &str) -> Self {
        Self {
            name: name.to_string(),
            image: BUSYBOX.to_string(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            memory_limit: None,
            tty: false,
            stdin: false,
            security_context: None,
            mounts: Vec::new(),
        }
    }

    /// Binds the host path `host` at `container_path` (read-write).
    pub fn mount(mut self, host: &std::path::Path, container_path: &str) -> Self {
        self.mounts
            .push(json!({"host_path": host, "container_path": container_path}));
        self
    }

    /// Sets the container's `linux.security_context` (CRI JSON).
    pub fn security_context(mut self, context: Value) -> Self {
        self.security_context = Some(context);
        self
    }

    /// Limits the container's memory (`linux.resources.memory_limit_in_bytes`).
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Gives the container a terminal and an open stdin (`tty: true`, `stdin: true`).
    pub fn tty(mut self) -> Self {
        self.tty = true;
        self.stdin = true;
        self
    }

    /// The CRI ContainerConfig as crictl reads it.
    pub fn to_json(&self) -> Value {
        let mut resources = serde_json::Map::new();
        if let Some(bytes) = self.memory_limit {
            resources.insert("memory_limit_in_bytes".into(), json!(bytes));
        }
        json!({
            "metadata": { "name": self.name },
            "image": { "image": self.image },
            "command": self.command,
            "log_path": format!("{}.log", self.name),
            "tty": self.tty,
            "stdin": self.stdin,
            "mounts": self.mounts,
            "linux": match &self.security_context {
                Some(context) => json!({ "resources": resources, "security_context": context }),
                None => json!({ "resources": resources }),
            },
        })
    }
}

/// How an exec'd command ended.
#[derive(Debug, Clone)]
pub struct ExecOutcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// A pod sandbox created with `crictl runp`. Dropping it stops and removes it (`stopp`,
/// `rmp -f`) unless [`Pod::remove`] did already.
pub struct Pod {
    pub node: &'static Node,
    pub id: String,
    pub handler: Handler,
    pub name: String,
    pod_config: PathBuf,
    dir: TempDir,
    containers: Vec<String>,
    removed: bool,
}

impl Pod {
    /// Runs a pod sandbox named after `name` on `handler`.
    pub fn run(handler: Handler, name: &str) -> Pod {
        Pod::run_with(handler, name, json!({}))
    }

    /// Runs a pod sandbox named after `name` on `handler`, with `linux` as the sandbox config's
    /// `linux` (CRI's `LinuxPodSandboxConfig` as JSON).
    pub fn run_with(handler: Handler, name: &str, linux: Value) -> Pod {
        static SEQUENCE: AtomicU32 = AtomicU32::new(0);
        let node = Node::get();
        let name = format!(
            "e2e-{name}-{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix("podsnap-e2e-")
            .tempdir()
            .expect("create a temporary directory");
        let pod_config = dir.path().join("pod.json");
        let config = json!({
            "metadata": {
                "name": name,
                "namespace": POD_NAMESPACE,
                "uid": format!("{name}-uid"),
                "attempt": 0,
            },
            "log_directory": dir.path().join("logs"),
            "linux": linux,
        });
        std::fs::write(&pod_config, config.to_string()).expect("write pod.json");
        let id = node
            .crictl([
                "runp".into(),
                "--runtime".into(),
                handler.name().into(),
                pod_config.clone().into_os_string(),
            ])
            .trim()
            .to_string();
        assert!(!id.is_empty(), "crictl runp printed no pod id");
        Pod {
            node,
            id,
            handler,
            name,
            pod_config,
            dir,
            containers: Vec::new(),
            removed: false,
        }
    }

    /// Creates a container in the pod; returns its id.
    pub fn create(&mut self, config: &ContainerConfig) -> String {
        let path = self.dir.path().join(format!("{}.json", config.name));
        std::fs::write(&path, config.to_json().to_string()).expect("write container config");
        self.node.ensure_image(&config.image);
        let id = self
            .node
            .crictl([
                "create".into(),
                self.id.clone().into(),
                path.into_os_string(),
                self.pod_config.clone().into_os_string(),
            ])
            .trim()
            .to_string();
        assert!(!id.is_empty(), "crictl create printed no container id");
        self.containers.push(id.clone());
        id
    }

    pub fn start(&self, container_id: &str) {
        self.node.crictl(["start", container_id]);
    }

    /// Creates and starts a container; returns its id.
    pub fn run_container(&mut self, config: &ContainerConfig) -> String {
        let id = self.create(config);
        self.start(&id);
        id
    }

    /// The container's log as `crictl logs` prints it (stdout and stderr).
    pub fn logs(&self, container_id: &str) -> String {
        let out = self.node.crictl_try(["logs", container_id]);
        assert!(out.success(), "{}", out.report());
        out.stdout + &out.stderr
    }

    /// Runs `argv` in the container with `crictl exec` and reports its exit code (crictl
    /// itself exits 1 for any failure and names the command's code in its message).
    pub fn exec(&self, container_id: &str, argv: &[&str]) -> ExecOutcome {
        let out = self
            .node
            .crictl_try(["exec", container_id].iter().chain(argv).copied());
        let code = if out.success() {
            0
        } else {
            exit_code_in(&out.stderr).unwrap_or_else(|| {
                panic!(
                    "crictl exec failed without a command exit code:\n{}\n{}",
                    out.report(),
                    self.node.log_excerpt(&[&self.id, container_id])
                )
            })
        };
        ExecOutcome {
            code,
            stdout: out.stdout,
            stderr: out.stderr,
        }
    }

    /// Stops a container (`crictl stop`, grace period `timeout_s`).
    pub fn stop(&self, container_id: &str, timeout_s: u32) {
        self.node
            .crictl(["stop", "--timeout", &timeout_s.to_string(), container_id]);
    }

    /// Removes a stopped container (`crictl rm`).
    pub fn remove_container(&self, container_id: &str) {
        self.node.crictl(["rm", container_id]);
    }

    /// The ids of every container created in the pod.
    pub fn containers(&self) -> &[String] {
        &self.containers
    }

    /// Where CRI writes the log of the container named `name`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{name}.log"))
    }

    /// `crictl inspectp` of the pod.
    pub fn inspect(&self) -> Value {
        self.node.inspect_pod(&self.id)
    }

    /// What the pod and its containers may leave behind, for the leak checks.
    pub fn footprint(&self) -> Footprint {
        Footprint {
            handler: self.handler,
            namespace: CRI_NAMESPACE.to_string(),
            shim_id: Some(self.id.clone()),
            ids: std::iter::once(self.id.clone())
                .chain(self.containers.iter().cloned())
                .collect(),
        }
    }

    /// What one removed container of the pod may leave behind while the pod lives on.
    pub fn container_footprint(&self, container_id: &str) -> Footprint {
        Footprint {
            handler: self.handler,
            namespace: CRI_NAMESPACE.to_string(),
            shim_id: None,
            ids: vec![container_id.to_string()],
        }
    }

    /// Stops and removes the pod (`crictl stopp`, `crictl rmp`); returns what to check for
    /// leaks.
    pub fn remove(mut self) -> Footprint {
        self.node.crictl(["stopp", &self.id]);
        self.node.crictl(["rmp", &self.id]);
        self.removed = true;
        self.footprint()
    }

    /// Removes the pod with `crictl rmp -f` (no stop first), as after a crash; retried until
    /// [`REMOVE_TIMEOUT`], as the kubelet would: right after a shim dies, containerd still
    /// counts its containers as running until it has handled their exits.
    pub fn force_remove(mut self) -> Footprint {
        match self.force_remove_retrying() {
            Ok(out) if out.success() => {}
            Ok(out) => panic!("{}\n{}", out.report(), self.node.log_excerpt(&[&self.id])),
            Err(e) => panic!("{e}"),
        }
        self.removed = true;
        self.footprint()
    }

    /// `crictl rmp -f` until it succeeds or [`REMOVE_TIMEOUT`] passes; never panics.
    fn force_remove_retrying(&self) -> Result<Finished, CommandError> {
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        loop {
            let out = self.node.crictl_command(["rmp", "-f", &self.id]).run()?;
            if out.success() || Instant::now() >= deadline {
                return Ok(out);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        // Best effort, never a panic here: the test's own failure is the one to report.
        let _ = self.node.crictl_command(["stopp", &self.id]).run();
        match self.force_remove_retrying() {
            Ok(out) if out.success() => {}
            Ok(out) => eprintln!("cleanup of pod {} failed: {}", self.name, out.report()),
            Err(e) => eprintln!("cleanup of pod {} failed: {e}", self.name),
        }
    }
}

/// The exit code crictl names in a failed exec's message.
pub fn exit_code_in(message: &str) -> Option<i32> {
    for marker in ["exit code ", "exited with "] {
        if let Some(at) = message.rfind(marker) {
            let digits: String = message[at + marker.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if let Ok(code) = digits.parse() {
                return Some(code);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crictl_exec_messages_name_the_exit_code() {
        assert_eq!(
            exit_code_in(
                "level=error msg=\"execing command in container abc: command terminated with exit code 5\""
            ),
            Some(5)
        );
        assert_eq!(exit_code_in("command 'sh' exited with 3: err"), Some(3));
        assert_eq!(exit_code_in("connection refused"), None);
    }

    #[test]
    fn memory_limit_and_tty_reach_the_cri_config() {
        let config = ContainerConfig::shell("c", "true")
            .memory_limit(1 << 25)
            .tty();
        let value = config.to_json();
        assert_eq!(
            value["linux"]["resources"]["memory_limit_in_bytes"],
            1 << 25
        );
        assert_eq!(
            (value["tty"].as_bool(), value["stdin"].as_bool()),
            (Some(true), Some(true))
        );
        assert_eq!(value["command"], json!(["sh", "-c", "true"]));
    }
}

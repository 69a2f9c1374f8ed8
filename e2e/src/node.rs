//! The test node that `hack/node-up.sh` starts, seen from a test: where its containerd listens,
//! the `crictl` and `ctr` that talk to it, and the check that it is up before any test runs.
//!
//! Nothing here starts or stops the node, or builds anything: a missing prerequisite fails the
//! test with a message saying what to run. Paths follow `hack/lib.sh` and `hack/node-lib.sh`,
//! with the same environment overrides (`PODSNAP_CACHE`, `PODSNAP_NODE_RUN`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::command::{CommandError, CommandLine, Finished, tail};

/// The image every test container runs: the demo's busybox, pushed by `hack/images.sh`.
pub const BUSYBOX: &str = "127.0.0.1:5000/podsnap/busybox:latest";

/// The containerd namespace CRI uses.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// The containerd namespace of containers the tests create with `ctr`.
pub const CTR_NAMESPACE: &str = "podsnap-e2e";

/// Where ctr run by the tests keeps its temporary files.
pub const CTR_TMPDIR: &str = "/var/tmp/podsnap-e2e-ctr";

/// The deadline of one crictl or ctr call (crictl's own connection timeout is 30 s).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Pulling an image from the local registry.
const PULL_TIMEOUT: Duration = Duration::from_secs(180);

/// A runtime handler of the node and what its containers leave on the host while they exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    /// `podsnap`: containerd-shim-podsnap-v2, one shim per pod.
    Podsnap,
    /// `runc`: containerd's own runc shim, for parity.
    Runc,
}

impl Handler {
    /// The CRI runtime handler name.
    pub fn name(self) -> &'static str {
        match self {
            Handler::Podsnap => "podsnap",
            Handler::Runc => "runc",
        }
    }

    /// The shim's runtime type (`ctr run --runtime`).
    pub fn runtime_type(self) -> &'static str {
        match self {
            Handler::Podsnap => "io.containerd.podsnap.v2",
            Handler::Runc => "io.containerd.runc.v2",
        }
    }

    /// The shim's executable name.
    pub fn shim_binary(self) -> &'static str {
        match self {
            Handler::Podsnap => "containerd-shim-podsnap-v2",
            Handler::Runc => "containerd-shim-runc-v2",
        }
    }
}

/// The running test node.
#[derive(Debug)]
pub struct Node {
    pub crictl: PathBuf,
    pub ctr: PathBuf,
    pub socket: PathBuf,
    pub crictl_config: PathBuf,
    pub containerd_log: PathBuf,
    /// The runc shim's state root (`Root` of the `runc` handler).
    pub runc_root: PathBuf,
    /// containerd's task bundles, `<namespace>/<id>` under it.
    pub task_bundles: PathBuf,
}

impl Node {
    /// The node, checked once per test binary: its containerd answers CRI, both runtime
    /// handlers are configured, the podsnap shim is linked and the busybox image is pulled.
    /// Panics with what to do when any of that is not so (in CI and out of it: these tests
    /// never skip).
    pub fn get() -> &'static Node {
        static NODE: OnceLock<Result<Node, String>> = OnceLock::new();
        match NODE.get_or_init(Node::check) {
            Ok(node) => node,
            Err(why) => panic!(
                "the podsnap test node is not usable: {why}\n\
                 (start it with hack/node-up.sh after `cargo build -p containerd-shim-podsnap-v2`; \
                 these tests do not skip, CI={})",
                std::env::var("CI").unwrap_or_default()
            ),
        }
    }

    fn check() -> Result<Node, String> {
        let cache = env_path("PODSNAP_CACHE", "/var/cache/podsnap");
        let run = env_path("PODSNAP_NODE_RUN", "/run/podsnap-node");
        let bin = cache.join("bin");
        let node = Node {
            crictl: bin.join("crictl"),
            ctr: bin.join("ctr"),
            socket: run.join("containerd/containerd.sock"),
            crictl_config: run.join("etc/crictl.yaml"),
            containerd_log: run.join("containerd.log"),
            runc_root: run.join("runc"),
            task_bundles: run.join("containerd/io.containerd.runtime.v2.task"),
        };
        for tool in [&node.crictl, &node.ctr] {
            if !is_executable(tool) {
                return Err(format!(
                    "{} is missing: run hack/install.sh",
                    tool.display()
                ));
            }
        }
        if !node.socket.exists() {
            return Err(format!(
                "containerd socket {} does not exist",
                node.socket.display()
            ));
        }
        let info = node
            .crictl_command(["info"])
            .timeout(Duration::from_secs(20))
            .run()
            .map_err(|e| e.to_string())?;
        if !info.success() {
            return Err(format!(
                "containerd does not answer CRI:\n{}",
                info.report()
            ));
        }
        let info: serde_json::Value = serde_json::from_str(&info.stdout)
            .map_err(|e| format!("crictl info printed no JSON ({e}):\n{}", info.stdout))?;
        for handler in [Handler::Podsnap, Handler::Runc] {
            let runtime = &info["config"]["containerd"]["runtimes"][handler.name()];
            if runtime["runtimeType"].as_str() != Some(handler.runtime_type()) {
                return Err(format!(
                    "containerd has no runtime handler {:?} of type {} (got {runtime})",
                    handler.name(),
                    handler.runtime_type()
                ));
            }
        }
        let shim_link = run.join("bin").join(Handler::Podsnap.shim_binary());
        if !is_executable(&shim_link) {
            return Err(format!(
                "{} does not lead to an executable shim (is target/debug/containerd-shim-podsnap-v2 built?)",
                shim_link.display()
            ));
        }
        node.pull(BUSYBOX)?;
        Ok(node)
    }

    fn pull(&self, image: &str) -> Result<(), String> {
        let pull = self
            .crictl_command(["pull", image])
            .timeout(PULL_TIMEOUT)
            .run()
            .map_err(|e| e.to_string())?;
        if pull.success() {
            Ok(())
        } else {
            Err(format!(
                "cannot pull {image} (run hack/images.sh):\n{}",
                pull.report()
            ))
        }
    }

    /// Pulls `image` through CRI (a no-op when it is there). Called before every container
    /// is created: the node is shared, and critest removes the images it pulls, ours among
    /// them when they share an image id.
    pub fn ensure_image(&self, image: &str) {
        if let Err(why) = self.pull(image) {
            panic!("{why}");
        }
    }

    /// A crictl command line against the node.
    pub fn crictl_command<I, S>(&self, args: I) -> CommandLine
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString>,
    {
        CommandLine::new(&self.crictl)
            .arg("--config")
            .arg(&self.crictl_config)
            .arg("--runtime-endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--image-endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .args(args)
            .timeout(COMMAND_TIMEOUT)
    }

    /// A ctr command line against the node, in containerd namespace `namespace`. ctr's
    /// temporary files (`ctr container checkpoint` leaves a `ctrd-checkpoint*` directory with a
    /// whole checkpoint in $TMPDIR) go to [`CTR_TMPDIR`], which [`Node::remove_ctr_leftovers`]
    /// empties.
    pub fn ctr_command<I, S>(&self, namespace: &str, args: I) -> CommandLine
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString>,
    {
        let _ = std::fs::create_dir_all(CTR_TMPDIR);
        CommandLine::new(&self.ctr)
            .env("TMPDIR", CTR_TMPDIR)
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", namespace])
            .args(args)
            .timeout(COMMAND_TIMEOUT)
    }

    /// Removes what ctr left in [`CTR_TMPDIR`].
    pub fn remove_ctr_leftovers(&self) {
        if let Ok(entries) = std::fs::read_dir(CTR_TMPDIR) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_dir_all(entry.path())
                    .or_else(|_| std::fs::remove_file(entry.path()));
            }
        }
    }

    /// Runs crictl; whatever its exit code. Panics only when it hangs or cannot start.
    pub fn crictl_try<I, S>(&self, args: I) -> Finished
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString>,
    {
        finished(self.crictl_command(args).run())
    }

    /// Runs crictl and returns its stdout; panics (with its output) unless it succeeds.
    pub fn crictl<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString>,
    {
        self.succeed(self.crictl_try(args))
    }

    /// Runs ctr in `namespace`; whatever its exit code.
    pub fn ctr_try<I, S>(&self, namespace: &str, args: I) -> Finished
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString>,
    {
        finished(self.ctr_command(namespace, args).run())
    }

    /// Runs ctr in `namespace` and returns its stdout; panics unless it succeeds.
    pub fn ctr<I, S>(&self, namespace: &str, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString>,
    {
        self.succeed(self.ctr_try(namespace, args))
    }

    fn succeed(&self, out: Finished) -> String {
        if !out.success() {
            panic!("{}\n{}", out.report(), self.log_excerpt(&[]));
        }
        out.stdout
    }

    /// `crictl inspect <id>` as JSON.
    pub fn inspect(&self, container_id: &str) -> serde_json::Value {
        json(&self.crictl(["inspect", "-o", "json", container_id]))
    }

    /// `crictl inspectp <id>` as JSON.
    pub fn inspect_pod(&self, pod_id: &str) -> serde_json::Value {
        json(&self.crictl(["inspectp", "-o", "json", pod_id]))
    }

    /// The CRI state of a container (`CONTAINER_RUNNING`, `CONTAINER_EXITED`, ...).
    pub fn container_state(&self, container_id: &str) -> String {
        self.inspect(container_id)["status"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The task status containerd reports (`RUNNING`, `PAUSED`, `STOPPED`, ...), from
    /// `ctr task ls`; `None` when there is no task.
    pub fn task_status(&self, namespace: &str, id: &str) -> Option<String> {
        self.ctr(namespace, ["task", "ls"])
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.first() == Some(&id))
            .and_then(|f| f.get(2).map(|s| s.to_string()))
    }

    /// The lines of the containerd log (which carries the shims' logs too) that mention any
    /// of `ids`, or its last lines when `ids` is empty; for failure messages.
    pub fn log_excerpt(&self, ids: &[&str]) -> String {
        let Ok(log) = std::fs::read_to_string(&self.containerd_log) else {
            return format!("(no containerd log at {})", self.containerd_log.display());
        };
        let lines: Vec<&str> = if ids.is_empty() {
            log.lines().collect()
        } else {
            log.lines()
                .filter(|l| ids.iter().any(|id| l.contains(id)))
                .collect()
        };
        let start = lines.len().saturating_sub(40);
        format!(
            "--- containerd log {} ({} of {} matching lines) ---\n{}",
            self.containerd_log.display(),
            lines.len() - start,
            lines.len(),
            tail(&lines[start..].join("\n"), 12000)
        )
    }
}

fn finished(result: Result<Finished, CommandError>) -> Finished {
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// Parses JSON a tool printed; panics with the text when it is not JSON.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

fn env_path(name: &str, default: &str) -> PathBuf {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

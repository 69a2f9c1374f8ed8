//! The test node that hack/node-up.sh starts: its tools, crictl and ctr against its containerd,
//! CRI pods, and [`Cleanup`], which removes everything a benchmark created, by id, even when it
//! fails half-way.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::procfs;
use crate::run::{Cmd, wait_for};

/// The image of every benchmark container, as CRI pulls it (the node mirrors docker.io).
pub const BUSYBOX_CRI: &str = "docker.io/library/busybox:latest";
/// The same busybox for `ctr run`, straight from the node's registry.
pub const BUSYBOX_CTR: &str = "127.0.0.1:5000/podsnap/busybox:latest";
/// containerd's namespace for CRI.
pub const CRI_NS: &str = "k8s.io";
/// containerd's namespace of the containers the benchmark makes with ctr, and the Kubernetes
/// namespace of its pods.
pub const BENCH_NS: &str = "podsnap-bench";

/// The podsnap shim's state root (one directory per containerd namespace).
const PODSNAP_STATE: &str = "/run/containerd/podsnap";

/// The runtime handlers compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    Podsnap,
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

    /// containerd's runtime type (ctr's `--runtime`).
    pub fn runtime_type(self) -> &'static str {
        match self {
            Handler::Podsnap => "io.containerd.podsnap.v2",
            Handler::Runc => "io.containerd.runc.v2",
        }
    }
}

/// Where the node's pieces are (hack/lib.sh's variables, or their defaults).
#[derive(Debug, Clone)]
pub struct Node {
    bin: PathBuf,
    node_run: PathBuf,
    sock: String,
    /// The podsnap CLI: $PODSNAP_CLI, else `podsnap` next to this benchmark's binary.
    cli: PathBuf,
}

impl Node {
    pub fn from_env() -> Self {
        let var = |name: &str, default: &str| std::env::var(name).unwrap_or(default.to_string());
        let node_run = PathBuf::from(var("PODSNAP_NODE_RUN", "/run/podsnap-node"));
        let sock = var(
            "CONTAINERD_SOCK",
            &node_run
                .join("containerd/containerd.sock")
                .display()
                .to_string(),
        );
        let cli = std::env::var_os("PODSNAP_CLI")
            .map(PathBuf::from)
            .or_else(|| {
                let exe = std::env::current_exe().ok()?;
                Some(exe.parent()?.join("podsnap"))
            })
            .unwrap_or_else(|| PathBuf::from("podsnap"));
        Self {
            bin: PathBuf::from(var("PODSNAP_BIN", "/var/cache/podsnap/bin")),
            node_run,
            sock,
            cli,
        }
    }

    pub fn crictl<S: AsRef<std::ffi::OsStr>>(&self, args: impl IntoIterator<Item = S>) -> Cmd {
        let endpoint = format!("unix://{}", self.sock);
        Cmd::new(self.bin.join("crictl"))
            .arg("--config")
            .arg(self.node_run.join("etc/crictl.yaml"))
            .args([
                "--runtime-endpoint",
                &endpoint,
                "--image-endpoint",
                &endpoint,
            ])
            .args(["--timeout", "60s"])
            .args(args)
            .timeout(Duration::from_secs(90))
    }

    pub fn ctr<S: AsRef<std::ffi::OsStr>>(
        &self,
        namespace: &str,
        args: impl IntoIterator<Item = S>,
    ) -> Cmd {
        Cmd::new(self.bin.join("ctr"))
            .args(["--address", &self.sock, "-n", namespace])
            .args(args)
    }

    pub fn criu<S: AsRef<std::ffi::OsStr>>(&self, args: impl IntoIterator<Item = S>) -> Cmd {
        Cmd::new(self.bin.join("criu")).args(args)
    }

    /// The runc shim's state root on this node (node-down.sh cleans it).
    pub fn runc_root(&self) -> PathBuf {
        self.node_run.join("runc")
    }

    /// Fails unless the node answers CRI; returns the podsnap shim binary the node runs.
    pub fn check(&self) -> Result<PathBuf, String> {
        self.crictl(["info"])
            .timeout(Duration::from_secs(10))
            .run()
            .map_err(|e| format!("the node does not answer (run hack/node-up.sh): {e}"))?;
        let link = self.node_run.join("bin/containerd-shim-podsnap-v2");
        fs::read_link(&link).map_err(|e| format!("{}: {e}", link.display()))
    }

    /// The state of a CRI container (`CONTAINER_RUNNING`, ...).
    pub fn container_state(&self, id: &str) -> Result<String, String> {
        self.crictl([
            "inspect",
            "-o",
            "go-template",
            "--template",
            "{{.status.state}}",
            id,
        ])
        .run()
        .map(|d| d.stdout.trim().to_string())
    }

    /// The host pid of a CRI container's init.
    pub fn container_pid(&self, id: &str) -> Result<u32, String> {
        let out = self
            .crictl([
                "inspect",
                "-o",
                "go-template",
                "--template",
                "{{.info.pid}}",
                id,
            ])
            .run()?;
        out.stdout.trim().parse().map_err(|_| {
            format!(
                "container {id}: no pid in `crictl inspect`: {:?}",
                out.stdout
            )
        })
    }

    /// Pid and status (`RUNNING`, ...) of a task in `namespace`, from `ctr task ls`.
    pub fn task(&self, namespace: &str, id: &str) -> Result<(u32, String), String> {
        let out = self.ctr(namespace, ["task", "ls"]).run()?;
        out.stdout
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() == 3 && f[0] == id)
            .and_then(|f| Some((f[1].parse().ok()?, f[2].to_string())))
            .ok_or_else(|| format!("no task {namespace}/{id} in `ctr task ls`:\n{}", out.stdout))
    }

    /// Starts a pod on `handler` (configs and logs in `dir`) and registers it with `cleanup`.
    /// Returns the sandbox id and the pod config's path.
    pub fn run_pod(
        &self,
        cleanup: &mut Cleanup,
        handler: Handler,
        name: &str,
        dir: &Path,
    ) -> Result<(String, PathBuf), String> {
        let config = write_pod_config(dir, name, "{}")?;
        let id = self.run_pod_config(cleanup, handler, &config)?;
        Ok((id, config))
    }

    /// `crictl runp` of a pod config written by [`write_pod_config`]; the pod is registered
    /// with `cleanup`. Returns the sandbox id.
    pub fn run_pod_config(
        &self,
        cleanup: &mut Cleanup,
        handler: Handler,
        config: &Path,
    ) -> Result<String, String> {
        let out = self
            .crictl(["runp", "--runtime", handler.name()])
            .arg(config)
            .run()?;
        let id = out.stdout.trim().to_string();
        cleanup.add(Item::Pod(id.clone()));
        Ok(id)
    }

    /// Creates (not starts) a busybox container running `argv` in a pod.
    pub fn create_container(
        &self,
        pod: &str,
        pod_config: &Path,
        name: &str,
        argv: &[&str],
    ) -> Result<String, String> {
        let config = write_container_config(pod_config, name, argv, &[], "{}")?;
        self.create_container_config(pod, pod_config, &config)
    }

    /// `crictl create` of a container config written by [`write_container_config`].
    pub fn create_container_config(
        &self,
        pod: &str,
        pod_config: &Path,
        config: &Path,
    ) -> Result<String, String> {
        let out = self
            .crictl(["create", pod])
            .arg(config)
            .arg(pod_config)
            .run()?;
        Ok(out.stdout.trim().to_string())
    }

    /// The podsnap CLI against the node's podsnapd.
    pub fn podsnap<S: AsRef<std::ffi::OsStr>>(&self, args: impl IntoIterator<Item = S>) -> Cmd {
        let endpoint = format!("unix://{}", self.node_run.join("podsnapd.sock").display());
        Cmd::new(&self.cli)
            .args(["--runtime-endpoint", &endpoint])
            .args(args)
    }

    /// podsnapd's log (hack/node-up.sh appends its stdout and stderr there).
    pub fn podsnapd_log(&self) -> PathBuf {
        self.node_run.join("podsnapd.log")
    }

    /// Fails unless podsnapd listens and the podsnap CLI is there; returns the podsnapd binary
    /// that runs and the CLI's path.
    pub fn check_podsnapd(&self) -> Result<(PathBuf, PathBuf), String> {
        let sock = self.node_run.join("podsnapd.sock");
        if !sock.exists() {
            return Err(format!(
                "podsnapd does not listen on {} (hack/node-up.sh starts it)",
                sock.display()
            ));
        }
        let pidfile = self.node_run.join("podsnapd.pid");
        let exe = fs::read_to_string(&pidfile)
            .map_err(|e| format!("{}: {e}", pidfile.display()))
            .and_then(|pid| {
                let exe = format!("/proc/{}/exe", pid.trim());
                fs::read_link(&exe).map_err(|e| format!("podsnapd is not running ({exe}: {e})"))
            })?;
        if !self.cli.is_file() {
            return Err(format!(
                "the podsnap CLI {} is not built (cargo build --release -p podsnap-cli, or set \
                 PODSNAP_CLI)",
                self.cli.display()
            ));
        }
        Ok((exe, self.cli.clone()))
    }
}

/// A pod's or container's `linux` options giving it a PID namespace of its own (per container,
/// kubelet's default: it sets this in both the pod's and every container's config).
pub const PID_NAMESPACE_PER_CONTAINER: &str =
    r#"{"security_context":{"namespace_options":{"pid":1}}}"#;

/// Writes the config of a pod `name` in [`BENCH_NS`] (logs under `dir`) with the JSON object
/// `linux` as its Linux options; returns its path, `<dir>/<name>-pod.json`.
pub fn write_pod_config(dir: &Path, name: &str, linux: &str) -> Result<PathBuf, String> {
    let config = dir.join(format!("{name}-pod.json"));
    let json = format!(
        r#"{{"metadata":{{"name":{n},"namespace":{ns},"uid":{n},"attempt":0}},"log_directory":{logs},"linux":{linux}}}"#,
        n = json_str(name),
        ns = json_str(BENCH_NS),
        logs = json_str(&dir.join(format!("{name}-logs")).display().to_string()),
    );
    fs::write(&config, json).map_err(|e| format!("write {}: {e}", config.display()))?;
    Ok(config)
}

/// Writes the config of a busybox container `name` running `argv`, with read-only bind
/// `mounts` (host path, container path) and the JSON object `linux` as its Linux options, next
/// to its pod's config; returns its path.
pub fn write_container_config(
    pod_config: &Path,
    name: &str,
    argv: &[&str],
    mounts: &[(&Path, &str)],
    linux: &str,
) -> Result<PathBuf, String> {
    let config = pod_config.with_file_name(format!("{name}-container.json"));
    let argv: Vec<String> = argv.iter().map(|a| json_str(a)).collect();
    let mounts: Vec<String> = mounts
        .iter()
        .map(|(host, path)| {
            format!(
                r#"{{"container_path":{},"host_path":{},"readonly":true}}"#,
                json_str(path),
                json_str(&host.display().to_string())
            )
        })
        .collect();
    let json = format!(
        r#"{{"metadata":{{"name":{n}}},"image":{{"image":{img}}},"command":[{argv}],"mounts":[{mounts}],"log_path":{log},"linux":{linux}}}"#,
        n = json_str(name),
        img = json_str(BUSYBOX_CRI),
        argv = argv.join(","),
        mounts = mounts.join(","),
        log = json_str(&format!("{name}.log")),
    );
    fs::write(&config, json).map_err(|e| format!("write {}: {e}", config.display()))?;
    Ok(config)
}

/// `s` as a JSON string literal.
fn json_str(s: &str) -> String {
    let mut out = String::from('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Something the benchmark created and must remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A CRI pod (sandbox id), with its containers.
    Pod(String),
    /// A container made with ctr in [`BENCH_NS`], with its task and snapshot.
    CtrContainer(String),
    /// An image (checkpoints are images) in a namespace.
    CtrImage {
        namespace: String,
        name: String,
    },
    /// The [`BENCH_NS`] namespace itself (once everything in it is gone).
    BenchNamespace,
    /// A process group the benchmark started (raw CRIU's workload).
    Group(u32),
    /// A container's cgroup, `<namespace>/<id>` in every hierarchy, once the container is gone:
    /// what a runtime left there (a restore may recreate dumped cgroups below it) is removed.
    Cgroup(String),
    Dir(PathBuf),
}

/// Removes what was registered, last first, when dropped; [`Cleanup::remove`] removes one item
/// at once.
pub struct Cleanup<'n> {
    node: &'n Node,
    items: Vec<Item>,
}

impl<'n> Cleanup<'n> {
    pub fn new(node: &'n Node) -> Self {
        Self {
            node,
            items: Vec::new(),
        }
    }

    pub fn add(&mut self, item: Item) {
        self.items.push(item);
    }

    /// Registers `item` to be removed after everything else.
    pub fn add_final(&mut self, item: Item) {
        self.items.insert(0, item);
    }

    /// Removes `item` now and forgets it.
    pub fn remove(&mut self, item: &Item) -> Result<(), String> {
        self.items.retain(|i| i != item);
        undo(self.node, item)
    }
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        while let Some(item) = self.items.pop() {
            if let Err(e) = undo(self.node, &item) {
                eprintln!("cleanup: {item:?}: {e}");
            }
        }
    }
}

fn undo(node: &Node, item: &Item) -> Result<(), String> {
    match item {
        Item::Pod(id) => {
            // rmp -f stops the pod too; stopp first lets CNI release the address normally.
            let stopped = node.crictl(["stopp", id]).run();
            node.crictl(["rmp", "-f", id])
                .run()
                .map_err(|e| match stopped {
                    Err(s) => format!("{s}\n{e}"),
                    Ok(_) => e,
                })?;
        }
        Item::CtrContainer(id) => {
            // No task (never started, or already deleted) is fine.
            let _ = node.ctr(BENCH_NS, ["task", "delete", "-f", id]).run();
            unless_missing(node.ctr(BENCH_NS, ["container", "delete", id]).run())?;
        }
        Item::CtrImage { namespace, name } => {
            unless_missing(
                node.ctr(namespace, ["images", "rm", "--sync", name])
                    .timeout(Duration::from_secs(120))
                    .run(),
            )?;
        }
        Item::BenchNamespace => {
            // Content and snapshots leave with the garbage collector: give it a moment.
            wait_for(
                &format!("namespace {BENCH_NS} to be removable"),
                Duration::from_secs(20),
                || {
                    let r = node.ctr(BENCH_NS, ["namespaces", "rm", BENCH_NS]).run();
                    Ok(r.is_ok().then_some(()))
                },
            )?;
            // The runtimes' per-namespace state directories, when empty.
            for dir in [node.runc_root(), PathBuf::from(PODSNAP_STATE)] {
                let _ = fs::remove_dir(dir.join(BENCH_NS));
            }
        }
        Item::Group(pgid) => {
            if !procfs::group(*pgid).is_empty() {
                Cmd::new("kill")
                    .args(["-KILL", "--", &format!("-{pgid}")])
                    .run()?;
            }
            // The group's processes are init's children: wait until it has reaped them.
            wait_for(
                &format!("process group {pgid} to be gone"),
                Duration::from_secs(30),
                || Ok(procfs::group(*pgid).is_empty().then_some(())),
            )?;
        }
        Item::Cgroup(path) => {
            let mut removed = 0;
            for hierarchy in cgroup_hierarchies() {
                removed += remove_cgroup_tree(&hierarchy.join(path))?;
                if path.starts_with(&format!("{BENCH_NS}/")) {
                    // The runtimes' cgroup of our namespace, when empty.
                    let _ = fs::remove_dir(hierarchy.join(BENCH_NS));
                }
            }
            // The runtime removes the container's own cgroup: anything more is a leak.
            if removed > 0 {
                eprintln!(
                    "warning: {removed} cgroup directories were left under /sys/fs/cgroup/*/{path} \
                     after the container was deleted; removed them"
                );
            }
        }
        Item::Dir(dir) => match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("remove {}: {e}", dir.display()));
            }
            _ => {}
        },
    }
    Ok(())
}

/// The cgroup hierarchies mounted under /sys/fs/cgroup (one on a v2 host).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.procs").exists() {
        return vec![root.to_path_buf()];
    }
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists())
        .collect()
}

/// How many cgroups the host has, in all hierarchies (CRIU's cgroup work grows with it).
pub fn host_cgroups() -> usize {
    fn count(dir: &Path) -> usize {
        let Ok(entries) = fs::read_dir(dir) else {
            return 0;
        };
        1 + entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| count(&e.path()))
            .sum::<usize>()
    }
    cgroup_hierarchies().iter().map(|h| count(h)).sum()
}

/// Removes the cgroup `dir` and every cgroup below it, deepest first; how many were removed.
/// A cgroup that still has processes cannot be removed: that is an error.
fn remove_cgroup_tree(dir: &Path) -> Result<usize, String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            removed += remove_cgroup_tree(&entry.path())?;
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(removed + 1),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(removed),
        Err(e) => Err(format!("remove cgroup {}: {e}", dir.display())),
    }
}

/// Ok when `result` is Ok or says that what it removes does not exist.
fn unless_missing(result: Result<crate::run::Done, String>) -> Result<(), String> {
    match result {
        Err(e) if !e.contains("not found") => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_str(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(json_str("x\ny"), r#""x\u000ay""#);
    }

    #[test]
    fn directories_are_removed_once() {
        let node = Node::from_env();
        let dir = std::env::temp_dir().join(format!("podsnap-bench-test-{}", std::process::id()));
        fs::create_dir_all(dir.join("sub")).unwrap();
        {
            let mut cleanup = Cleanup::new(&node);
            cleanup.add(Item::Dir(dir.clone()));
        }
        assert!(!dir.exists());
        assert!(undo(&node, &Item::Dir(dir)).is_ok());
    }
}

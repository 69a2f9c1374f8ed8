//! What a removed pod or container must not leave on the host: its shim (and the podsnap
//! shim's zygote), container processes, cgroup directories, mounts, the runtime's container
//! state and containerd's task bundle.
//!
//! Everything is read from `/proc` and the filesystem; nothing here kills or removes anything.
//! Shim processes are recognised by their executable name and `-id` argument only.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::node::{Handler, Node};

/// Where cgroup hierarchies are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Where the podsnap shim keeps libcontainer state, per containerd namespace.
pub const PODSNAP_STATE_ROOT: &str = "/run/containerd/podsnap";

/// How long a removed pod's remains may take to disappear (shims exit asynchronously).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// What a pod or container created on the node may leave behind.
#[derive(Debug, Clone)]
pub struct Footprint {
    pub handler: Handler,
    /// The containerd namespace (`k8s.io` for CRI).
    pub namespace: String,
    /// The `-id` its shim runs with: the sandbox id for a CRI pod, the container id for a
    /// container created with ctr; `None` for one container of a pod that lives on.
    pub shim_id: Option<String>,
    /// The sandbox and container ids.
    pub ids: Vec<String>,
}

/// A process of the node: pid, parent and command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostProcess {
    pub pid: i32,
    pub ppid: i32,
    pub argv: Vec<String>,
}

impl fmt::Display for HostProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} (ppid {}): {}",
            self.pid,
            self.ppid,
            self.argv.join(" ")
        )
    }
}

/// Every process on the host, as far as `/proc` can be read (processes vanish while we look).
pub fn host_processes() -> Vec<HostProcess> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let ppid = status
                .lines()
                .find_map(|l| l.strip_prefix("PPid:"))?
                .trim()
                .parse()
                .ok()?;
            let argv = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some(HostProcess { pid, ppid, argv })
        })
        .collect()
}

/// The processes of `handler`'s shim binary started with `-id shim_id` (for podsnap: the
/// shim and its zygote, which share the command line).
pub fn shim_processes(handler: Handler, shim_id: &str) -> Vec<HostProcess> {
    host_processes()
        .into_iter()
        .filter(|p| {
            p.argv.first().is_some_and(|exe| {
                Path::new(exe).file_name().and_then(|n| n.to_str()) == Some(handler.shim_binary())
            }) && p.argv.windows(2).any(|w| w[0] == "-id" && w[1] == shim_id)
        })
        .collect()
}

/// The serving shim among [`shim_processes`]: the one whose parent is not one of them.
pub fn serving_shim(handler: Handler, shim_id: &str) -> Option<HostProcess> {
    let processes = shim_processes(handler, shim_id);
    processes
        .iter()
        .find(|p| !processes.iter().any(|q| q.pid == p.ppid))
        .cloned()
}

/// Processes whose cgroup (any hierarchy) is the container's or the sandbox's.
fn processes_in_cgroups_of(namespace: &str, ids: &[String]) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for pid in entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        let Ok(cgroups) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
            continue;
        };
        if let Some(id) = ids
            .iter()
            .find(|id| cgroups.contains(&format!("/{namespace}/{id}")))
        {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            found.push(format!(
                "process {pid} ({}) in a cgroup of {id}",
                cmdline.trim()
            ));
        }
    }
    found
}

/// The cgroup directories `/<namespace>/<id>` in every hierarchy.
fn cgroup_dirs(namespace: &str, id: &str) -> Vec<PathBuf> {
    let Ok(hierarchies) = std::fs::read_dir(CGROUP_ROOT) else {
        return Vec::new();
    };
    hierarchies
        .flatten()
        .map(|h| h.path().join(namespace).join(id))
        .filter(|dir| dir.is_dir())
        .collect()
}

/// Everything of `footprint` still on the host, one line per remain.
pub fn remains(node: &Node, footprint: &Footprint) -> Vec<String> {
    let mut found: Vec<String> = footprint
        .shim_id
        .iter()
        .flat_map(|id| shim_processes(footprint.handler, id))
        .map(|p| format!("shim process {p}"))
        .collect();
    found.extend(processes_in_cgroups_of(
        &footprint.namespace,
        &footprint.ids,
    ));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for id in &footprint.ids {
        found.extend(
            cgroup_dirs(&footprint.namespace, id)
                .iter()
                .map(|d| format!("cgroup {}", d.display())),
        );
        found.extend(
            mountinfo
                .lines()
                .filter(|l| l.contains(id.as_str()))
                .map(|l| format!("mount {l}")),
        );
        let state = match footprint.handler {
            Handler::Podsnap => Path::new(PODSNAP_STATE_ROOT).join(&footprint.namespace),
            Handler::Runc => node.runc_root.join(&footprint.namespace),
        }
        .join(id);
        if state.exists() {
            found.push(format!("runtime state {}", state.display()));
        }
        let bundle = node.task_bundles.join(&footprint.namespace).join(id);
        if bundle.exists() {
            found.push(format!("task bundle {}", bundle.display()));
        }
    }
    found
}

/// Waits (up to [`SETTLE_TIMEOUT`]) until nothing of `footprint` is left; panics listing what
/// is, with the containerd log lines about it.
pub fn assert_nothing_left(node: &Node, footprint: &Footprint) {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut left = remains(node, footprint);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        left = remains(node, footprint);
    }
    if !left.is_empty() {
        let ids: Vec<&str> = footprint.ids.iter().map(String::as_str).collect();
        panic!(
            "{} on handler {} left behind, {SETTLE_TIMEOUT:?} after removal:\n  {}\n{}",
            ids.join(", "),
            footprint.handler.name(),
            left.join("\n  "),
            node.log_excerpt(&ids)
        );
    }
}

//! A container's cgroup, seen from the shim: the processes in it, freezing it, changing its
//! resources and reading its statistics in the form containerd's `Stats` call returns
//! (`io.containerd.cgroups.v1.Metrics`). Creating and removing the cgroup is libcontainer's job.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use containerd_shim::protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryOomControl, MemoryStat, Metrics, PidsStat, Throttle,
};
use libcgroups::common::{
    AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt, FreezerState,
};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxResources, Spec};

/// Where cgroup filesystems are mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup of one container, named by the spec's `cgroupsPath`.
#[derive(Clone)]
pub struct ContainerCgroup {
    pub path: PathBuf,
    container_id: String,
    /// libcgroups' manager of it, made once and shared by every clone: making one reads the
    /// mount table again for each controller and logs which cgroup version it found, which
    /// every `Stats` call, freeze and update would otherwise pay again.
    manager: Arc<OnceLock<AnyCgroupManager>>,
}

impl std::fmt::Debug for ContainerCgroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerCgroup")
            .field("path", &self.path)
            .field("container_id", &self.container_id)
            .finish_non_exhaustive()
    }
}

impl ContainerCgroup {
    pub fn of(spec: &Spec, container_id: &str) -> Self {
        let configured = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone());
        Self {
            path: libcontainer::utils::get_cgroup_path(&configured, container_id),
            container_id: container_id.to_string(),
            manager: Arc::default(),
        }
    }

    fn manager(&self) -> anyhow::Result<&AnyCgroupManager> {
        if let Some(manager) = self.manager.get() {
            return Ok(manager);
        }
        let made = libcgroups::common::create_cgroup_manager(CgroupConfig {
            cgroup_path: self.path.clone(),
            systemd_cgroup: false,
            container_name: self.container_id.clone(),
        })
        .with_context(|| format!("open cgroup {}", self.path.display()))?;
        // Two threads may make one at once: the first kept is everyone's.
        Ok(self.manager.get_or_init(|| made))
    }

    /// Makes libcgroups' manager of the cgroup now, so that the next call that needs it does
    /// not wait for it; a failure is left to that call to report.
    pub fn warm(&self) {
        let _ = self.manager();
    }

    /// Every process in the cgroup.
    pub fn pids(&self) -> anyhow::Result<Vec<Pid>> {
        self.manager()?
            .get_all_pids()
            .with_context(|| format!("list processes of cgroup {}", self.path.display()))
    }

    /// Freezes (`true`) or thaws the cgroup.
    pub fn freeze(&self, frozen: bool) -> anyhow::Result<()> {
        let state = if frozen {
            FreezerState::Frozen
        } else {
            FreezerState::Thawed
        };
        self.manager()?
            .freeze(state)
            .with_context(|| format!("freeze={frozen} cgroup {}", self.path.display()))
    }

    /// The file that freezes and thaws this cgroup: `freezer.state` on v1, `cgroup.freeze` on
    /// v2.
    pub fn freezer_file(&self) -> Option<FreezerFile> {
        if let Some(dir) = self.v1_dir("freezer") {
            Some(FreezerFile {
                path: dir.join("freezer.state"),
                v1: true,
            })
        } else {
            self.v2_dir().map(|dir| FreezerFile {
                path: dir.join("cgroup.freeze"),
                v1: false,
            })
        }
    }

    /// Applies new resource limits.
    pub fn update(&self, resources: &LinuxResources) -> anyhow::Result<()> {
        self.manager()?
            .apply(&ControllerOpt {
                resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .with_context(|| format!("update resources of cgroup {}", self.path.display()))
    }

    /// Creates the cgroup in every hierarchy (initialising cpuset on v1, which needs it before
    /// any task joins) and applies the spec's resources: where a restore puts its tasks.
    pub fn prepare(&self, spec: &Spec) -> anyhow::Result<()> {
        let relative = self
            .path
            .strip_prefix("/")
            .unwrap_or(&self.path)
            .to_path_buf();
        if let Some(dir) = self.v2_dir() {
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        } else {
            for entry in std::fs::read_dir(CGROUP_ROOT)?.flatten() {
                let hierarchy = entry.path();
                // Only controller hierarchies: not the unified one of a hybrid host, nor named
                // ones such as name=systemd (CRIU restores only the controllers it dumped).
                let name = entry.file_name();
                if !hierarchy.join("cgroup.procs").exists()
                    || name == "unified"
                    || name == "systemd"
                {
                    continue;
                }
                let mut dir = hierarchy.clone();
                for part in relative.components() {
                    let parent = dir.clone();
                    dir.push(part);
                    if !dir.exists() {
                        std::fs::create_dir(&dir)
                            .with_context(|| format!("create {}", dir.display()))?;
                    }
                    for file in ["cpuset.cpus", "cpuset.mems"] {
                        let own = dir.join(file);
                        if own.exists()
                            && std::fs::read_to_string(&own)
                                .unwrap_or_default()
                                .trim()
                                .is_empty()
                        {
                            let inherited = std::fs::read_to_string(parent.join(file))?;
                            std::fs::write(&own, inherited.trim())
                                .with_context(|| format!("initialise {}", own.display()))?;
                        }
                    }
                }
            }
        }
        if let Some(resources) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) {
            self.update(resources)?;
        }
        Ok(())
    }

    /// The v1 hierarchy directory of `controller`, if this host runs cgroup v1 for it.
    pub fn v1_dir(&self, controller: &str) -> Option<PathBuf> {
        let relative = self.path.strip_prefix("/").unwrap_or(&self.path);
        let dir = Path::new(CGROUP_ROOT).join(controller).join(relative);
        dir.is_dir().then_some(dir)
    }

    /// The unified (v2) directory of the cgroup, when the host is cgroup v2 only.
    pub fn v2_dir(&self) -> Option<PathBuf> {
        if !Path::new(CGROUP_ROOT).join("cgroup.controllers").exists() {
            return None;
        }
        let relative = self.path.strip_prefix("/").unwrap_or(&self.path);
        Some(Path::new(CGROUP_ROOT).join(relative))
    }

    /// Statistics in containerd's cgroup v1 metrics format.
    pub fn metrics(&self) -> anyhow::Result<Metrics> {
        let stats = self
            .manager()?
            .stats()
            .with_context(|| format!("read statistics of cgroup {}", self.path.display()))?;
        let mut metrics = Metrics::new();

        let mut usage = CPUUsage::new();
        usage.total = stats.cpu.usage.usage_total;
        usage.user = stats.cpu.usage.usage_user;
        usage.kernel = stats.cpu.usage.usage_kernel;
        usage.per_cpu = stats.cpu.usage.per_core_usage_total.clone();
        if usage.total == 0 {
            // libcgroups' v1 statistics leave out cpuacct; read it directly.
            if let Some(total) = self.v1_cpuacct_usage() {
                usage.total = total;
            }
        }
        let mut throttling = Throttle::new();
        throttling.periods = stats.cpu.throttling.periods;
        throttling.throttled_periods = stats.cpu.throttling.throttled_periods;
        throttling.throttled_time = stats.cpu.throttling.throttled_time;
        let mut cpu = CPUStat::new();
        cpu.usage = Some(usage).into();
        cpu.throttling = Some(throttling).into();
        metrics.cpu = Some(cpu).into();

        let entry = |data: &libcgroups::stats::MemoryData| {
            let mut entry = MemoryEntry::new();
            entry.usage = data.usage;
            entry.max = data.max_usage;
            entry.failcnt = data.fail_count;
            entry.limit = data.limit;
            entry
        };
        let stat = |key: &str| stats.memory.stats.get(key).copied().unwrap_or_default();
        let mut memory = MemoryStat::new();
        memory.usage = Some(entry(&stats.memory.memory)).into();
        memory.swap = Some(entry(&stats.memory.memswap)).into();
        memory.kernel = Some(entry(&stats.memory.kernel)).into();
        memory.kernel_tcp = Some(entry(&stats.memory.kernel_tcp)).into();
        memory.cache = stats.memory.cache;
        memory.rss = stat("rss");
        memory.inactive_file = stat("inactive_file");
        memory.active_file = stat("active_file");
        memory.total_inactive_file = stat("total_inactive_file").max(stat("inactive_file"));
        memory.total_rss = stat("total_rss");
        memory.total_cache = stat("total_cache");
        metrics.memory = Some(memory).into();

        if let Some(control) = self
            .v1_dir("memory")
            .and_then(|dir| std::fs::read_to_string(dir.join("memory.oom_control")).ok())
        {
            let mut oom = MemoryOomControl::new();
            oom.oom_kill_disable = crate::oom::counter(&control, "oom_kill_disable");
            oom.under_oom = crate::oom::counter(&control, "under_oom");
            oom.oom_kill = crate::oom::counter(&control, "oom_kill");
            metrics.memory_oom_control = Some(oom).into();
        }

        let mut pids = PidsStat::new();
        pids.current = stats.pids.current;
        pids.limit = stats.pids.limit;
        metrics.pids = Some(pids).into();
        Ok(metrics)
    }

    fn v1_cpuacct_usage(&self) -> Option<u64> {
        ["cpuacct", "cpu,cpuacct"]
            .iter()
            .filter_map(|c| self.v1_dir(c))
            .find_map(|dir| std::fs::read_to_string(dir.join("cpuacct.usage")).ok())
            .and_then(|s| s.trim().parse().ok())
    }
}

/// A cgroup's freezer file ([`ContainerCgroup::freezer_file`]), written directly where
/// libcgroups' freeze would be too slow or would create a removed cgroup again.
#[derive(Debug, Clone)]
pub struct FreezerFile {
    pub path: PathBuf,
    v1: bool,
}

impl FreezerFile {
    /// What to write to freeze (`true`) or thaw it.
    pub fn value(&self, frozen: bool) -> &'static str {
        match (self.v1, frozen) {
            (true, true) => "FROZEN",
            (true, false) => "THAWED",
            (false, true) => "1",
            (false, false) => "0",
        }
    }

    /// Waits up to `limit` for a freeze already asked of the cgroup to take hold, polling every
    /// 200 µs (libcgroups polls every 10 ms, which a freeze window would pay); on v1 the freeze
    /// is asked again while the state reads FREEZING, as runc does. Whether it is frozen.
    pub fn frozen_within(&self, limit: std::time::Duration) -> bool {
        let until = std::time::Instant::now() + limit;
        let events = self.path.with_file_name("cgroup.events");
        loop {
            let frozen = if self.v1 {
                match std::fs::read_to_string(&self.path)
                    .as_deref()
                    .map(str::trim)
                {
                    Ok("FROZEN") => true,
                    Ok("FREEZING") => {
                        let _ = std::fs::write(&self.path, "FROZEN");
                        false
                    }
                    _ => return false,
                }
            } else {
                match std::fs::read_to_string(&events) {
                    Ok(events) => events.lines().any(|l| l.trim() == "frozen 1"),
                    Err(_) => return false,
                }
            };
            if frozen {
                return true;
            }
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }
}

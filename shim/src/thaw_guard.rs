//! Never a frozen pod: whatever happens between freeze and thaw, every cgroup the shim asked to
//! freeze is thawed.
//!
//! [`ThawGuard`] records a cgroup before it is frozen (so a freeze that fails or times out half
//! way, as youki's cgroup v2 freezer can leave `cgroup.freeze=1`, is thawed too) and thaws them
//! all when told, at its deadline (a watchdog thread: the pod is thawed by the deadline whatever
//! is still running), or when dropped (an error or an unwinding panic). Should the shim itself
//! die — SIGKILL, an aborting panic, the OOM killer — a guard process it started beforehand sees
//! its pipe close without the word `DONE` and thaws every cgroup it was told about: the guard
//! is the shim binary run as `containerd-shim-podsnap-v2 thaw-guard`, in a process group of its
//! own, reading `<file>\t<value>` lines (a `freezer.state` or `cgroup.freeze` file and the
//! value that thaws it).

use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cgroup::ContainerCgroup;

/// The first argument that runs the shim binary as a thaw guard.
pub const GUARD_ARG: &str = "thaw-guard";

/// The file that freezes and thaws a cgroup, and the value that thaws it.
fn thaw_file(cgroup: &ContainerCgroup) -> Option<(PathBuf, &'static str)> {
    if let Some(dir) = cgroup.v1_dir("freezer") {
        Some((dir.join("freezer.state"), "THAWED"))
    } else {
        cgroup.v2_dir().map(|dir| (dir.join("cgroup.freeze"), "0"))
    }
}

/// Whether `file` is one a guard may write: a freezer file under `/sys/fs/cgroup`.
fn guard_may_write(file: &Path) -> bool {
    file.starts_with("/sys/fs/cgroup/")
        && !file
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        && matches!(
            file.file_name().and_then(|n| n.to_str()),
            Some("freezer.state" | "cgroup.freeze")
        )
}

/// Writes `value` to a freezer file, a few times: a v1 thaw can race with a freeze in progress.
fn thaw_now(file: &Path, value: &str) -> std::io::Result<()> {
    let mut last = Ok(());
    for _ in 0..5 {
        last = std::fs::write(file, value);
        if last.is_ok() {
            let state = std::fs::read_to_string(file).unwrap_or_default();
            if state.trim() == value || value == "0" {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    last
}

/// The guard process's loop: records what it is told until `DONE` (then exits doing nothing)
/// or end of input (the shim is gone: thaw everything). Returns what it thawed.
pub fn guard_loop(input: impl BufRead) -> Vec<PathBuf> {
    let mut told: Vec<(PathBuf, String)> = Vec::new();
    for line in input.lines() {
        let Ok(line) = line else { break };
        if line == "DONE" {
            return Vec::new();
        }
        if let Some((file, value)) = line.split_once('\t') {
            let file = PathBuf::from(file);
            if guard_may_write(&file) && matches!(value, "THAWED" | "0") {
                told.push((file, value.to_string()));
            }
        }
    }
    let mut thawed = Vec::new();
    for (file, value) in told {
        if thaw_now(&file, &value).is_ok() {
            thawed.push(file);
        }
    }
    thawed
}

/// `containerd-shim-podsnap-v2 thaw-guard`: never returns.
pub fn run_guard() -> ! {
    // Signals meant for the shim's group are not for the guard: only its pipe ends it.
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
        // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
    let thawed = guard_loop(std::io::stdin().lock());
    for file in &thawed {
        eprintln!(
            "podsnap thaw guard: the shim went away between freeze and thaw; thawed {}",
            file.display()
        );
    }
    std::process::exit(0)
}

/// The guard process, as the shim sees it.
struct GuardProcess {
    child: Child,
    stdin: ChildStdin,
}

/// Every cgroup frozen for one pod checkpoint; see the module documentation.
pub struct ThawGuard {
    frozen: Vec<ContainerCgroup>,
    process: Option<GuardProcess>,
    /// Set when the watchdog thawed the pod at the deadline.
    expired: bool,
}

impl ThawGuard {
    /// A guard backed by a guard process started from `exe` (the shim's own binary); without
    /// one (it could not start) the in-process thaw still runs, and that is logged.
    pub fn start(exe: &Path) -> Self {
        let process = Command::new(exe)
            .arg(GUARD_ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()
            .and_then(|mut child| {
                let stdin = child
                    .stdin
                    .take()
                    .ok_or_else(|| std::io::Error::other("no stdin pipe"))?;
                Ok(GuardProcess { child, stdin })
            });
        let process = match process {
            Ok(p) => Some(p),
            Err(e) => {
                log::error!(
                    "thaw guard: cannot start {} {GUARD_ARG}: {e}; a pod frozen when the shim dies stays frozen",
                    exe.display()
                );
                None
            }
        };
        ThawGuard {
            frozen: Vec::new(),
            process,
            expired: false,
        }
    }

    /// Records `cgroup` (here and in the guard process), then freezes it.
    pub fn freeze(&mut self, cgroup: &ContainerCgroup) -> anyhow::Result<()> {
        if let (Some(process), Some((file, value))) = (self.process.as_mut(), thaw_file(cgroup))
            && let Err(e) = writeln!(process.stdin, "{}\t{value}", file.display())
        {
            log::error!("thaw guard: {e}");
        }
        self.frozen.push(cgroup.clone());
        cgroup.freeze(true)
    }

    /// Whether the watchdog thawed the pod because the deadline passed.
    pub fn expired(&self) -> bool {
        self.expired
    }

    /// Thaws every cgroup recorded (whether its freeze succeeded or not); returns the errors.
    pub fn thaw_all(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for cgroup in self.frozen.drain(..) {
            if let Err(e) = cgroup.freeze(false) {
                // libcgroups could not; write the file directly before giving up.
                let direct = thaw_file(&cgroup).map(|(file, value)| thaw_now(&file, value));
                if !matches!(direct, Some(Ok(()))) {
                    log::error!("thaw {}: {e:#}", cgroup.path.display());
                    errors.push(format!("thaw {}: {e:#}", cgroup.path.display()));
                }
            }
        }
        errors
    }

    /// Thaws everything and dismisses the guard process.
    pub fn finish(mut self) -> Vec<String> {
        let errors = self.thaw_all();
        self.dismiss();
        errors
    }

    fn dismiss(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = writeln!(process.stdin, "DONE");
            drop(process.stdin);
            let _ = process.child.wait();
        }
    }
}

impl Drop for ThawGuard {
    fn drop(&mut self) {
        if !self.frozen.is_empty() {
            self.thaw_all();
        }
        self.dismiss();
    }
}

/// Thaws the pod at `deadline` unless dropped (or told) first: hold it while frozen.
pub struct Watchdog {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn start(guard: Arc<Mutex<ThawGuard>>, deadline: Option<Instant>) -> Self {
        let Some(deadline) = deadline else {
            return Watchdog {
                stop: None,
                thread: None,
            };
        };
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(left) {
                let mut guard = guard.lock().unwrap_or_else(|e| e.into_inner());
                if !guard.frozen.is_empty() {
                    log::warn!("pod checkpoint: deadline passed while frozen; thawing the pod now");
                    guard.expired = true;
                    guard.thaw_all();
                }
            }
        });
        Watchdog {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_does_nothing_when_dismissed() {
        let input = "/sys/fs/cgroup/freezer/k8s.io/a/freezer.state\tTHAWED\nDONE\n";
        assert!(guard_loop(input.as_bytes()).is_empty());
    }

    #[test]
    fn the_guard_writes_only_freezer_files() {
        for file in [
            "/etc/shadow",
            "/sys/fs/cgroup/freezer/../../../etc/shadow",
            "/sys/fs/cgroup/memory/x/memory.limit_in_bytes",
            "relative/freezer.state",
        ] {
            assert!(!guard_may_write(Path::new(file)), "{file}");
        }
        assert!(guard_may_write(Path::new(
            "/sys/fs/cgroup/freezer/k8s.io/a/freezer.state"
        )));
        assert!(guard_may_write(Path::new(
            "/sys/fs/cgroup/k8s.io/a/cgroup.freeze"
        )));
        // Told about files it may not write, at end of input it writes nothing.
        let input = "/etc/shadow\tTHAWED\n/sys/fs/cgroup/x/cgroup.freeze\tFROZEN\n";
        assert!(guard_loop(input.as_bytes()).is_empty());
    }
}

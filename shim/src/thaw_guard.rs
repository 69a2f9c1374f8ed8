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
//! value that thaws it), `criu\t<pid>\t<start time>` lines (each CRIU swrk started for the
//! dump, its start time read by the shim while swrk is its unreaped child, so a pid used again
//! is never mistaken for it) and a `wait\t<seconds>` line (the longest it waits for them).
//!
//! A CRIU outlives the shim that started it: it goes on dumping, and when it ends it puts the
//! freezer cgroup back as it found it, frozen. So the guard thaws at once, then waits for every
//! CRIU it was told about to end, then thaws again. (Killing CRIU instead would be worse: one
//! that dies while its parasite is in a task can take the task with it.)

use std::io::{BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cgroup::ContainerCgroup;
use crate::checkpoint::CriuStarted;

/// The first argument that runs the shim binary as a thaw guard.
pub const GUARD_ARG: &str = "thaw-guard";

/// The file that freezes and thaws a cgroup, and the value that thaws it.
fn thaw_file(cgroup: &ContainerCgroup) -> Option<(PathBuf, &'static str)> {
    cgroup.freezer_file().map(|file| {
        let value = file.value(false);
        (file.path, value)
    })
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

/// A CRIU the shim started, known by pid and start time: a pid used again is not waited for.
#[derive(Debug)]
struct TaskRef {
    pid: i32,
    start: u64,
}

/// A process's state letter and start time (fields 3 and 22 of `/proc/<pid>/stat`).
fn proc_stat(pid: i32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields follow its last `)`.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

impl TaskRef {
    /// The process `pid` as it is now; `None` if there is none (it ended already).
    fn now(pid: i32) -> Option<Self> {
        let (_, start) = proc_stat(pid)?;
        Some(TaskRef { pid, start })
    }

    /// Whether it is still running: a zombie (its new parent may be slow to reap it) has ended.
    fn running(&self) -> bool {
        matches!(proc_stat(self.pid), Some((state, start)) if start == self.start && state != 'Z' && state != 'X')
    }
}

/// How long a guard waits for the CRIUs of a dead shim when not told.
const DEFAULT_WAIT: Duration = Duration::from_secs(3600);

/// What the shim told a guard before its input ended.
#[derive(Debug)]
struct Orders {
    /// Freezer files and the value that thaws each.
    told: Vec<(PathBuf, String)>,
    /// The CRIUs started for the dump.
    criu: Vec<TaskRef>,
    /// The longest to wait for them.
    wait: Duration,
}

/// What the shim told a guard before its input ended; `None` when it said `DONE`.
fn read_orders(input: impl BufRead) -> Option<Orders> {
    let mut told: Vec<(PathBuf, String)> = Vec::new();
    let mut criu: Vec<TaskRef> = Vec::new();
    let mut wait = DEFAULT_WAIT;
    for line in input.lines() {
        let Ok(line) = line else { break };
        if line == "DONE" {
            return None;
        }
        match line.split_once('\t') {
            Some(("criu", task)) => {
                let (pid, start) = match task.split_once('\t') {
                    Some((pid, start)) => (pid, start.parse::<u64>().ok()),
                    None => (task, None),
                };
                let Some(pid) = pid.parse::<i32>().ok().filter(|p| *p > 1) else {
                    continue;
                };
                match start {
                    Some(start) => criu.push(TaskRef { pid, start }),
                    None => criu.extend(TaskRef::now(pid)),
                }
            }
            Some(("wait", seconds)) => {
                if let Ok(seconds) = seconds.parse::<u64>() {
                    wait = Duration::from_secs(seconds);
                }
            }
            Some((file, value)) => {
                let file = PathBuf::from(file);
                if guard_may_write(&file) && matches!(value, "THAWED" | "0") {
                    told.push((file, value.to_string()));
                }
            }
            None => {}
        }
    }
    Some(Orders { told, criu, wait })
}

/// The guard process's loop: records what it is told until `DONE` (then returns doing
/// nothing) or end of input (the shim is gone): then thaws everything, waits for the CRIUs it
/// was told about to end, and thaws everything again. Returns what it thawed.
pub fn guard_loop(input: impl BufRead) -> Vec<PathBuf> {
    let Some(Orders { told, criu, wait }) = read_orders(input) else {
        return Vec::new();
    };
    let thaw = || -> Vec<PathBuf> {
        told.iter()
            .filter(|(file, value)| thaw_now(file, value).is_ok())
            .map(|(file, _)| file.clone())
            .collect()
    };
    let mut thawed = thaw();
    if !criu.is_empty() {
        for task in criu.iter().filter(|t| t.running()) {
            warn(&format!(
                "podsnap thaw guard: the shim went away during a pod checkpoint; waiting for its CRIU (pid {}) to end, then thawing again",
                task.pid
            ));
        }
        let give_up = Instant::now() + wait;
        while criu.iter().any(TaskRef::running) {
            if Instant::now() >= give_up {
                warn(&format!(
                    "podsnap thaw guard: CRIU still runs after {}s; thawing again without waiting longer",
                    wait.as_secs()
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for file in thaw() {
            if !thawed.contains(&file) {
                thawed.push(file);
            }
        }
    }
    thawed
}

/// Logs to the shim's log FIFO (`log` in the bundle, the guard's working directory), which
/// containerd copies into its own log, as the shim's records are; else to stderr. Opened at
/// once, while the shim and so containerd's reader are there, and left non-blocking: a full
/// FIFO loses a record (the logger ignores write errors) rather than holding up a thaw.
fn open_log() {
    let fifo = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("log");
    if let Ok(file) = fifo
        && std::fs::metadata("log")
            .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()))
        && log::set_boxed_logger(Box::new(containerd_shim::logger::FifoLogger::with_file(
            file,
        )))
        .is_ok()
    {
        log::set_max_level(log::LevelFilter::Info);
    }
}

/// Logs a warning, to the shim's log if [`open_log`] could open it, else to stderr.
fn warn(message: &str) {
    if log::max_level() >= log::LevelFilter::Warn {
        log::warn!("{message}");
    } else {
        eprintln!("{message}");
    }
}

/// `containerd-shim-podsnap-v2 thaw-guard`: never returns.
pub fn run_guard() -> ! {
    // Signals meant for the shim's group are not for the guard: only its pipe ends it.
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
        // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
        unsafe { libc::signal(signal, libc::SIG_IGN) };
    }
    log::set_max_level(log::LevelFilter::Off);
    open_log();
    let thawed = guard_loop(std::io::stdin().lock());
    for file in &thawed {
        warn(&format!(
            "podsnap thaw guard: the shim went away between freeze and thaw; thawed {}",
            file.display()
        ));
    }
    std::process::exit(0)
}

/// The guard process, as the shim sees it.
struct GuardProcess {
    child: Child,
    /// Shared with the capture threads, which report the CRIUs they start.
    stdin: Arc<Mutex<ChildStdin>>,
}

/// Writes one line to the guard process.
fn tell(stdin: &Mutex<ChildStdin>, line: &str) {
    let mut stdin = stdin.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = writeln!(stdin, "{line}") {
        log::error!("thaw guard: {e}");
    }
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
                Ok(GuardProcess {
                    child,
                    stdin: Arc::new(Mutex::new(stdin)),
                })
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

    /// Freezes every cgroup of `cgroups` at once: each is recorded (here and in the guard
    /// process) and told to freeze before any is waited for, so that a pod's containers stop
    /// within a few ms of each other rather than one after another. Returns the name of the
    /// first that failed to freeze, and why; all are thawed by [`finish`](Self::finish) all
    /// the same.
    pub fn freeze_all<'a>(
        &mut self,
        cgroups: &[(&'a str, &'a ContainerCgroup)],
    ) -> Result<(), (&'a str, anyhow::Error)> {
        // Each cgroup's freezer file is looked up once: the window is open from here.
        let files: Vec<_> = cgroups.iter().map(|(_, c)| c.freezer_file()).collect();
        for ((_, cgroup), file) in cgroups.iter().zip(&files) {
            if let (Some(process), Some(file)) = (self.process.as_ref(), file) {
                tell(
                    &process.stdin,
                    &format!("{}\t{}", file.path.display(), file.value(false)),
                );
            }
            self.frozen.push((*cgroup).clone());
            // Only a head start: the freeze below writes it again and waits, and says why
            // should it fail.
            if let Some(file) = file {
                let _ = std::fs::write(&file.path, file.value(true));
            }
        }
        for ((name, cgroup), file) in cgroups.iter().zip(&files) {
            // Most freezes take hold within a millisecond or two; one that does not gets
            // libcgroups' own patient loop, which says why should it fail.
            if !file
                .as_ref()
                .is_some_and(|f| f.frozen_within(Duration::from_millis(200)))
            {
                cgroup.freeze(true).map_err(|e| (*name, e))?;
            }
        }
        Ok(())
    }

    /// What tells the guard process about each CRIU started for the dump (it waits for them
    /// should the shim die, at most `wait`); `None` without a guard process.
    pub fn criu_started(&self, wait: Duration) -> Option<CriuStarted> {
        let stdin = self.process.as_ref()?.stdin.clone();
        tell(&stdin, &format!("wait\t{}", wait.as_secs()));
        Some(CriuStarted(Arc::new(move |pid| {
            // Read now, while swrk is this process's unreaped child: its pid is still its own.
            match proc_stat(pid as i32) {
                Some((_, start)) => tell(&stdin, &format!("criu\t{pid}\t{start}")),
                None => tell(&stdin, &format!("criu\t{pid}")),
            }
        })))
    }

    /// Whether the watchdog thawed the pod because the deadline passed.
    pub fn expired(&self) -> bool {
        self.expired
    }

    /// Thaws every cgroup recorded (whether its freeze succeeded or not); returns the errors.
    /// They stay recorded: a CRIU still running when the watchdog thaws puts its cgroup back
    /// as it found it, frozen, when it ends, so [`ThawGuard::finish`] thaws them all again.
    pub fn thaw_all(&self) -> Vec<String> {
        let mut errors = Vec::new();
        // Every cgroup is told to thaw before any is waited for (as `freeze_all` freezes).
        for cgroup in &self.frozen {
            if let Some((file, value)) = thaw_file(cgroup) {
                let _ = std::fs::write(&file, value);
            }
        }
        for cgroup in &self.frozen {
            if let Err(e) = cgroup.freeze(false) {
                // libcgroups could not; write the file directly before giving up.
                let direct = thaw_file(cgroup).map(|(file, value)| thaw_now(&file, value));
                if !matches!(direct, Some(Ok(()))) {
                    log::error!("thaw {}: {e:#}", cgroup.path.display());
                    errors.push(format!("thaw {}: {e:#}", cgroup.path.display()));
                }
            }
        }
        errors
    }

    /// Thaws everything (every CRIU has ended) and dismisses the guard process.
    pub fn finish(mut self) -> Vec<String> {
        let errors = self.thaw_all();
        self.frozen.clear();
        self.dismiss();
        errors
    }

    fn dismiss(&mut self) {
        if let Some(mut process) = self.process.take() {
            tell(&process.stdin, "DONE");
            // DONE ends the guard; the pipe closes when the last clone (the dump options'
            // reporter) goes too.
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
                if !guard.frozen.is_empty() && !guard.expired {
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

    #[test]
    fn the_guard_waits_for_every_criu_it_was_told_about() {
        let mut criu = Command::new("sleep").arg("0.3").spawn().unwrap();
        let input = format!(
            "criu\t{}\ncriu\t0\ncriu\t-5\ncriu\tnot-a-pid\ncriu\t{}\n",
            criu.id(),
            // A pid that is no process: not waited for.
            i32::MAX
        );
        assert!(guard_loop(input.as_bytes()).is_empty());
        // It returned only once the CRIU had ended (a zombie not yet reaped counts as ended).
        assert!(
            matches!(proc_stat(criu.id() as i32), Some(('Z', _)) | None),
            "the guard returned while its CRIU ran"
        );
        criu.wait().unwrap();
        // Told the start time with the pid (as the shim tells it), and at most `wait`: a CRIU
        // that runs on is not waited for past it.
        let mut criu = Command::new("sleep").arg("30").spawn().unwrap();
        let start = proc_stat(criu.id() as i32).unwrap().1;
        let input = format!("wait\t0\ncriu\t{}\t{start}\n", criu.id());
        assert!(guard_loop(input.as_bytes()).is_empty());
        assert!(TaskRef::now(criu.id() as i32).unwrap().running());
        criu.kill().unwrap();
        criu.wait().unwrap();
        // Dismissed, it waits for nothing.
        let mut criu = Command::new("sleep").arg("30").spawn().unwrap();
        let input = format!("criu\t{}\nDONE\n", criu.id());
        assert!(guard_loop(input.as_bytes()).is_empty());
        assert!(TaskRef::now(criu.id() as i32).unwrap().running());
        criu.kill().unwrap();
        criu.wait().unwrap();
    }

    #[test]
    fn a_pid_used_again_is_not_the_criu_told_about() {
        let me = TaskRef::now(std::process::id() as i32).unwrap();
        assert!(me.running());
        let other = TaskRef {
            pid: me.pid,
            start: me.start + 1,
        };
        assert!(!other.running());
    }
}

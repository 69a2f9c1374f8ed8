//! Integration tests against the real CRIU: they dump and restore real processes, so they need
//! root and a working CRIU (`$PODSNAP_CRIU`, `/var/cache/podsnap/bin/criu` or `criu` on PATH).
//!
//! Without them each test prints a loud SKIPPED notice, or fails when `CI=true`.
//!
//! The dumped process is a counting shell loop in its own session (`setsid`), stdio on /dev/null
//! or a pipe, that rewrites `counter` in its working directory every 50 ms: its shell variable is
//! the state that must survive a dump and restore.
//!
//! The test process makes itself a child subreaper, as a containerd shim is: when CRIU kills a
//! dumped tree, its orphans (the loop's `sleep`) come to us and are reaped. Left as zombies (this
//! VM's PID 1 does not reap them), they keep the tree's session id allocated and the restore fails
//! with `Can't fork for <pid>: File exists`.

use std::env;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use criu_rpc::{
    Criu, DumpOptions, ErrorKind, Notification, NotifyError, NotifyScript, RestoreOptions,
};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use tempfile::TempDir;

/// CRIU tests run one at a time: they share 2 cores with builds, and restores need their pids.
static SERIAL: Mutex<()> = Mutex::new(());

const COUNTER_LOOP: &str = "i=0; while :; do i=$((i+1)); echo $i > counter; sleep 0.05; done";
const PRINTER_LOOP: &str = "i=0; while :; do i=$((i+1)); echo $i; sleep 0.05; done";

struct Host {
    criu: Criu,
    _serial: MutexGuard<'static, ()>,
}

/// The CRIU to test with, or `None` after a loud skip notice; panics when `CI=true`.
fn host(test: &str) -> Option<Host> {
    let serial = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
    let criu = Criu::new().timeout(Duration::from_secs(60));
    let problem = if !nix::unistd::geteuid().is_root() {
        Some("not running as root".to_owned())
    } else {
        criu.version()
            .err()
            .map(|err| format!("CRIU at {} is unusable: {err}", criu.binary().display()))
    };
    match problem {
        None => Some(Host {
            criu,
            _serial: serial,
        }),
        Some(why) if env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: needs root and CRIU, and CI=true forbids skipping: {why}")
        }
        Some(why) => {
            // Straight to fd 2: eprintln! output is captured by the test harness and only shown
            // for failing tests, which would make this skip silent.
            let notice = format!(
                "\n################################################################\n\
                 SKIPPED {test}: {why}\n\
                 (CRIU integration tests need root and CRIU; CI=true makes this a failure)\n\
                 ################################################################\n"
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), notice.as_bytes());
            None
        }
    }
}

/// A process tree under test, with directories for its state, images and CRIU's work files.
/// Dropping it kills the tree (whether it is the original or a restored copy) and reaps the root.
struct Subject {
    pid: i32,
    child: Option<Child>,
    root: TempDir,
}

impl Subject {
    /// Starts `script` with `sh` in a new session, stdout as given, other stdio on /dev/null.
    fn start(script: &str, stdout: Stdio) -> Subject {
        let mut stdout = Some(stdout);
        let mut n = 0;
        Subject::start_with_stdio(script, &[], || {
            n += 1;
            if n == 2 {
                stdout.take().unwrap()
            } else {
                Stdio::null()
            }
        })
    }

    /// Starts `script` with `sh` in a new session; `stdio` gives stdin, stdout, stderr in turn;
    /// `setsid_args` go to setsid(1) (`--ctty`: stdin becomes the controlling terminal).
    fn start_with_stdio(
        script: &str,
        setsid_args: &[&str],
        mut stdio: impl FnMut() -> Stdio,
    ) -> Subject {
        let root = tempfile::tempdir().unwrap();
        for dir in ["run", "images", "work"] {
            fs::create_dir(root.path().join(dir)).unwrap();
        }
        // setsid(1) calls setsid() and execs in place: this child is no process group leader.
        let child = Command::new("setsid")
            .args(setsid_args)
            .args(["sh", "-c", script])
            .current_dir(root.path().join("run"))
            .stdin(stdio())
            .stdout(stdio())
            .stderr(stdio())
            .spawn()
            .unwrap();
        Subject {
            pid: child.id() as i32,
            child: Some(child),
            root,
        }
    }

    fn counting() -> Subject {
        let s = Subject::start(COUNTER_LOOP, Stdio::null());
        s.wait_counter_above(3);
        s
    }

    fn images(&self) -> PathBuf {
        self.root.path().join("images")
    }

    fn work(&self) -> PathBuf {
        self.root.path().join("work")
    }

    fn counter_path(&self) -> PathBuf {
        self.root.path().join("run/counter")
    }

    fn counter(&self) -> Option<u64> {
        fs::read_to_string(self.counter_path())
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Waits until the counter exceeds `n` and returns it; panics after 10 s.
    fn wait_counter_above(&self, n: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(c) = self.counter().filter(|c| *c > n) {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "counter of pid {} never went above {n} (now {:?})",
                self.pid,
                self.counter()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The original child after CRIU killed it (dump without leave_running): reap it and its
    /// orphans so its pid and session id are free for the restore, and check it died of SIGKILL.
    fn reap_dumped_original(&mut self) {
        let status = self.child.take().unwrap().wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(Signal::SIGKILL as i32),
            "CRIU should have killed the dumped task, got {status}"
        );
        reap_until_gone(SESSION, self.pid);
    }

    /// The process state letter from /proc/<pid>/stat (`S`, `R`, `T` stopped, `t` traced, ...).
    fn state(&self) -> char {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap();
        let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
        after_comm.chars().next().unwrap()
    }

    fn assert_alive_and_counting(&self, what: &str) {
        let before = self.counter().unwrap_or(0);
        let now = self.wait_counter_above(before + 2);
        assert!(now > before, "{what}: counter stuck at {before}");
        let state = self.state();
        assert!(
            !matches!(state, 'T' | 't' | 'Z' | 'X'),
            "{what}: pid {} is in state {state}",
            self.pid
        );
    }
}

impl Drop for Subject {
    fn drop(&mut self) {
        // The tree is its own session and process group (setsid): kill all of it.
        let _ = kill(Pid::from_raw(-self.pid), Signal::SIGKILL);
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        match self.child.take() {
            Some(mut child) => {
                let _ = child.wait();
            }
            None => {
                let _ = waitpid(Pid::from_raw(self.pid), None);
            }
        }
        reap_until_gone(SESSION, self.pid);
    }
}

/// `/proc/<pid>/stat` fields after `(comm) `: state ppid pgrp session ...
const PGRP: usize = 2;
const SESSION: usize = 3;

/// Reaps zombies (we are a subreaper) until no process has `id` as its process group
/// ([`PGRP`]) or session ([`SESSION`]); gives up after 5 s.
fn reap_until_gone(field: usize, id: i32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        while let Ok(status) = waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            if status == WaitStatus::StillAlive {
                break;
            }
        }
        if members(field, id).is_empty() || Instant::now() > deadline {
            return;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Pids of the processes, zombies included, whose stat `field` is `id`.
fn members(field: usize, id: i32) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
                rest.split_whitespace()
                    .nth(field)
                    .and_then(|s| s.parse::<i32>().ok())
                    == Some(id)
            })
        })
        .collect()
}

fn scripts_recorder(
    seen: &mut Vec<(NotifyScript, Option<i32>)>,
) -> impl FnMut(&mut Notification) -> Result<(), NotifyError> + '_ {
    move |n: &mut Notification| {
        seen.push((n.script().clone(), n.pid()));
        Ok(())
    }
}

fn ls(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn version_is_criu_4_or_newer() {
    let Some(host) = host("version_is_criu_4_or_newer") else {
        return;
    };
    let version = host.criu.version().unwrap();
    assert!(
        version.at_least(4, 0, 0),
        "CRIU {version} is too old for this kernel"
    );
    // The RPC answer matches what the binary prints.
    let out = Command::new(host.criu.binary())
        .arg("--version")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains(&format!("Version: {}.{}", version.major, version.minor)),
        "{printed}"
    );
}

#[test]
fn check_passes_on_this_host() {
    let Some(host) = host("check_passes_on_this_host") else {
        return;
    };
    host.criu.check().unwrap();
}

#[test]
fn features_agree_with_criu_check_feature() {
    let Some(host) = host("features_agree_with_criu_check_feature") else {
        return;
    };
    let features = host.criu.features().unwrap();
    let cli = |feature: &str| {
        Command::new(host.criu.binary())
            .args(["check", "--feature", feature])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    eprintln!("features here: {features:?}");
    assert_eq!(features.mem_track, cli("mem_dirty_track"), "mem_track");
    assert_eq!(features.lazy_pages, cli("uffd-noncoop"), "lazy_pages");
    assert_eq!(features.pidfd_store, cli("pidfd_store"), "pidfd_store");
}

#[test]
fn pre_dump_needs_soft_dirty_and_says_so_when_missing() {
    let Some(host) = host("pre_dump_needs_soft_dirty_and_says_so_when_missing") else {
        return;
    };
    let subject = Subject::counting();
    let opts = DumpOptions::new(subject.pid, subject.images())
        .work_dir(subject.work())
        .track_mem(true);
    let result = host.criu.pre_dump(&opts);
    if host.criu.features().unwrap().mem_track {
        result.unwrap();
        assert!(
            ls(&subject.images())
                .iter()
                .any(|f| f.starts_with("pagemap"))
        );
    } else {
        let err = result.unwrap_err();
        assert!(err.is_unsupported(), "{err:?}");
        assert!(err.to_string().contains("soft-dirty"), "{err}");
        // The same check guards a dump with track_mem.
        let err = host
            .criu
            .dump(&opts.clone().leave_running(true))
            .unwrap_err();
        assert!(err.is_unsupported(), "{err:?}");
        assert!(ls(&subject.images()).is_empty(), "nothing may be dumped");
    }
    subject.assert_alive_and_counting("after pre-dump");
}

#[test]
fn dump_leave_running_writes_images_and_task_keeps_counting() {
    let Some(host) = host("dump_leave_running_writes_images_and_task_keeps_counting") else {
        return;
    };
    let subject = Subject::counting();
    let mut seen = Vec::new();
    let opts = DumpOptions::new(subject.pid, subject.images())
        .work_dir(subject.work())
        .leave_running(true);
    host.criu
        .dump_with(&opts, &mut scripts_recorder(&mut seen))
        .unwrap();

    let images = ls(&subject.images());
    for needed in ["inventory.img", "pstree.img"] {
        assert!(
            images.iter().any(|f| f == needed),
            "{needed} missing from {images:?}"
        );
    }
    assert!(
        !images.iter().any(|f| f.ends_with(".log")),
        "the log belongs in the work dir: {images:?}"
    );
    assert!(
        ls(&subject.work()).contains(&"dump.log".to_owned()),
        "{:?}",
        ls(&subject.work())
    );
    let scripts: Vec<_> = seen.iter().map(|(s, _)| s.clone()).collect();
    assert!(scripts.contains(&NotifyScript::PreDump), "{scripts:?}");
    assert!(scripts.contains(&NotifyScript::PostDump), "{scripts:?}");
    subject.assert_alive_and_counting("after dump with leave_running");
}

#[test]
fn dump_exit_then_restore_as_sibling_continues_state_and_is_reapable() {
    let Some(host) = host("dump_exit_then_restore_as_sibling_continues_state_and_is_reapable")
    else {
        return;
    };
    let mut subject = Subject::counting();
    let pid = subject.pid;
    let before = subject.wait_counter_above(0);
    host.criu
        .dump(&DumpOptions::new(pid, subject.images()).work_dir(subject.work()))
        .unwrap();
    subject.reap_dumped_original();
    // `echo $i > counter` truncates before it writes: a dump between the two leaves the file
    // empty until the restored shell writes it (a flake of CI's, once), so its last value seen
    // stands in for it.
    let file_at_dump = subject.counter();
    let at_dump = file_at_dump.unwrap_or(before);
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        subject.counter(),
        file_at_dump,
        "nothing may count while the task is dumped"
    );

    let mut seen = Vec::new();
    let opts = RestoreOptions::new(subject.images())
        .work_dir(subject.work())
        .rst_sibling(true);
    let restored = host
        .criu
        .restore_with(&opts, &mut scripts_recorder(&mut seen))
        .unwrap();
    assert_eq!(restored.pid, pid, "CRIU restores the original pid");
    assert!(restored.orphan_pts_master.is_none());
    let post_restore = seen.iter().find(|(s, _)| *s == NotifyScript::PostRestore);
    assert_eq!(
        post_restore.map(|(_, p)| *p),
        Some(Some(pid)),
        "post-restore carries the pid: {seen:?}"
    );

    // The shell's variable survived: counting resumes from the dumped value, not from 1.
    let resumed = subject.wait_counter_above(at_dump);
    assert!(
        resumed > at_dump && resumed < at_dump + 100,
        "resumed at {resumed}, dumped at {at_dump}"
    );
    subject.assert_alive_and_counting("after restore");

    // rst_sibling: the restored task is our child, so we can reap it.
    kill(Pid::from_raw(-pid), Signal::SIGKILL).unwrap();
    let status = waitpid(Pid::from_raw(pid), None).unwrap();
    assert_eq!(
        status,
        WaitStatus::Signaled(Pid::from_raw(pid), Signal::SIGKILL, false)
    );
}

#[test]
fn restore_gives_the_task_an_inherited_pipe_as_stdout() {
    let Some(host) = host("restore_gives_the_task_an_inherited_pipe_as_stdout") else {
        return;
    };
    let mut subject = Subject::start(PRINTER_LOOP, Stdio::piped());
    let stdout: OwnedFd = subject
        .child
        .as_mut()
        .unwrap()
        .stdout
        .take()
        .unwrap()
        .into();
    let inode = File::from(stdout.try_clone().unwrap())
        .metadata()
        .unwrap()
        .ino();
    let mut lines = BufReader::new(File::from(stdout)).lines();
    let mut last_read = 0u64;
    while last_read < 3 {
        last_read = lines.next().unwrap().unwrap().parse().unwrap();
    }
    host.criu
        .dump(&DumpOptions::new(subject.pid, subject.images()).work_dir(subject.work()))
        .unwrap();
    subject.reap_dumped_original();
    drop(lines);

    let (new_read, new_write) = nix::unistd::pipe().unwrap();
    let opts = RestoreOptions::new(subject.images())
        .work_dir(subject.work())
        .rst_sibling(true)
        .inherit_fd(format!("pipe:[{inode}]"), new_write.as_fd());
    let restored = host.criu.restore(&opts).unwrap();
    assert_eq!(restored.pid, subject.pid);
    drop(new_write);

    let mut lines = BufReader::new(File::from(new_read)).lines();
    let first: u64 = lines
        .next()
        .expect("restored task writes into the inherited pipe")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        first > last_read,
        "restored output {first} does not continue after {last_read}"
    );
    let second: u64 = lines.next().unwrap().unwrap().parse().unwrap();
    assert_eq!(second, first + 1);
}

#[test]
fn restore_from_empty_images_dir_fails_with_criu_log_tail() {
    let Some(host) = host("restore_from_empty_images_dir_fails_with_criu_log_tail") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let err = host
        .criu
        .restore(&RestoreOptions::new(dir.path()).rst_sibling(true))
        .unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::Failed { .. }), "{err:?}");
    assert!(!err.log_tail().is_empty(), "no log tail in {err}");
    let text = err.to_string();
    assert!(
        text.starts_with("criu restore: criu reported failure"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "--- last {} lines of {}",
            err.log_tail().len(),
            dir.path().join("restore.log").display()
        )),
        "{text}"
    );
    assert!(
        err.log_tail().iter().any(|l| l.contains("Error")),
        "{:?}",
        err.log_tail()
    );
}

#[test]
fn restore_from_nonexistent_images_dir_fails_before_criu_runs() {
    let Some(host) = host("restore_from_nonexistent_images_dir_fails_before_criu_runs") else {
        return;
    };
    let err = host
        .criu
        .restore(&RestoreOptions::new("/nonexistent/images"))
        .unwrap_err();
    assert!(
        matches!(err.kind(), ErrorKind::OpenDir { what: "images", .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("/nonexistent/images: No such file or directory"),
        "{err}"
    );
}

#[test]
fn restore_from_corrupt_images_fails_with_criu_log_tail() {
    let Some(host) = host("restore_from_corrupt_images_fails_with_criu_log_tail") else {
        return;
    };
    let mut subject = Subject::counting();
    host.criu
        .dump(&DumpOptions::new(subject.pid, subject.images()).work_dir(subject.work()))
        .unwrap();
    subject.reap_dumped_original();
    fs::write(
        subject.images().join("pstree.img"),
        b"this is not a CRIU image",
    )
    .unwrap();

    let opts = RestoreOptions::new(subject.images())
        .work_dir(subject.work())
        .rst_sibling(true);
    let err = host.criu.restore(&opts).unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::Failed { .. }), "{err:?}");
    assert!(
        err.log_tail().iter().any(|l| l.contains("Error")),
        "{:?}",
        err.log_tail()
    );
    assert!(err.to_string().contains("restore.log ---"), "{err}");
    assert!(
        !Path::new(&format!("/proc/{}", subject.pid)).exists(),
        "nothing may be restored"
    );
}

#[test]
fn dump_of_missing_pid_fails_with_errno_and_log_tail() {
    let Some(host) = host("dump_of_missing_pid_fails_with_errno_and_log_tail") else {
        return;
    };
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id() as i32;
    gone.wait().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = host
        .criu
        .dump(&DumpOptions::new(pid, dir.path()))
        .unwrap_err();
    assert!(matches!(err.kind(), ErrorKind::Failed { .. }), "{err:?}");
    assert_eq!(err.cr_errno(), Some(Errno::ESRCH as i32), "{err}");
    assert!(
        err.to_string().contains("(cr_errno 3: No such process)"),
        "{err}"
    );
    assert!(!err.log_tail().is_empty(), "{err}");
    eprintln!("dump of a missing pid: {err}");
}

/// CRIU refuses a root task that does not lead its own session unless told it is a shell job.
#[test]
fn dump_of_non_session_leader_needs_shell_job() {
    let Some(host) = host("dump_of_non_session_leader_needs_shell_job") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // A session of its own whose leader (the outer shell) is another process in our PID
    // namespace: the test's own session leader may live outside it (CI runs us that way), and
    // CRIU then fails earlier with "A session leader ... is outside of its pid namespace".
    let mut leader = Command::new("sh");
    leader
        .args(["-c", "sh -c 'while :; do sleep 0.05; done' & echo $!; wait"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        leader.pre_exec(|| {
            nix::unistd::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let mut leader = leader.spawn().unwrap();
    let sid = leader.id() as i32;
    let mut line = String::new();
    BufReader::new(leader.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid: i32 = line.trim().parse().expect("the loop's pid");
    let opts = DumpOptions::new(pid, dir.path()).leave_running(true);
    let err = host.criu.dump(&opts).unwrap_err();
    assert!(err.to_string().contains("is not a session leader"), "{err}");
    host.criu.dump(&opts.shell_job(true)).unwrap();
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "leave_running keeps it alive"
    );
    kill(Pid::from_raw(-sid), Signal::SIGKILL).unwrap();
    leader.wait().unwrap();
    reap_until_gone(SESSION, sid);
    reap_until_gone(PGRP, pid);
}

#[test]
fn notify_callback_error_aborts_dump_and_task_survives() {
    let Some(host) = host("notify_callback_error_aborts_dump_and_task_survives") else {
        return;
    };
    let subject = Subject::counting();
    // Without leave_running CRIU would kill the task after post-dump; the error must stop it.
    let opts = DumpOptions::new(subject.pid, subject.images()).work_dir(subject.work());
    let mut refuse = |n: &mut Notification| -> Result<(), NotifyError> {
        if *n.script() == NotifyScript::PostDump {
            Err("images cannot be stored".into())
        } else {
            Ok(())
        }
    };
    let err = host.criu.dump_with(&opts, &mut refuse).unwrap_err();
    match err.kind() {
        ErrorKind::Notify { script, source } => {
            assert_eq!(script, "post-dump");
            assert_eq!(source.to_string(), "images cannot be stored");
        }
        other => panic!("expected a notify error, got {other:?}: {err}"),
    }
    assert!(!err.log_tail().is_empty(), "{err}");
    subject.assert_alive_and_counting("after a refused dump");
}

/// Kills swrk from a notify callback while the task is seized (`query-ext-files`) or frozen with
/// complete images (`post-dump`), without leave_running: the call must fail promptly, swrk must
/// be reaped, and the task must run on.
#[test]
fn killing_swrk_mid_dump_fails_promptly_and_task_survives() {
    let Some(host) = host("killing_swrk_mid_dump_fails_promptly_and_task_survives") else {
        return;
    };
    for when in [NotifyScript::QueryExtFiles, NotifyScript::PostDump] {
        let subject = Subject::counting();
        let opts = DumpOptions::new(subject.pid, subject.images()).work_dir(subject.work());
        let mut swrk_pid = None;
        let mut killer = |n: &mut Notification| -> Result<(), NotifyError> {
            if *n.script() == when {
                swrk_pid = Some(n.criu_pid());
                kill(Pid::from_raw(n.criu_pid() as i32), Signal::SIGKILL)?;
            }
            Ok(())
        };
        let started = Instant::now();
        let err = host.criu.dump_with(&opts, &mut killer).unwrap_err();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(10), "{when}: took {took:?}");
        match err.kind() {
            ErrorKind::SwrkExited { pid, status } => {
                assert_eq!(Some(*pid), swrk_pid);
                assert!(status.contains("SIGKILL"), "{status}");
            }
            other => panic!("{when}: expected SwrkExited, got {other:?}: {err}"),
        }
        assert!(err.to_string().contains("dump.log ---"), "{when}: {err}");
        // Reaped, not a zombie: the pid is gone.
        assert_eq!(
            kill(Pid::from_raw(swrk_pid.unwrap() as i32), None),
            Err(Errno::ESRCH),
            "{when}"
        );
        subject.assert_alive_and_counting(&format!("after swrk was killed at {when}"));
    }
}

/// A task whose stdio and controlling terminal is a pty slave with the master outside the dump
/// (a container's terminal; CRIU cannot restore a pty that is no session's terminal):
/// dumped with `orphan_pts_master`, restored with it, CRIU sends a new master over the socket
/// (SCM_RIGHTS) and the restored task's output arrives there.
#[test]
fn restore_with_orphan_pts_master_hands_over_the_new_master() {
    let Some(host) = host("restore_with_orphan_pts_master_hands_over_the_new_master") else {
        return;
    };
    let pty = nix::pty::openpty(None, None).unwrap();
    // openpty(3) leaves both fds inheritable: the task must get only the slave, as stdio.
    for fd in [&pty.master, &pty.slave] {
        nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .unwrap();
    }
    let mut subject = Subject::start_with_stdio(PRINTER_LOOP, &["--ctty"], || {
        Stdio::from(pty.slave.try_clone().unwrap())
    });
    drop(pty.slave);
    let mut lines = BufReader::new(File::from(pty.master)).lines();
    let mut last_read = 0u64;
    while last_read < 3 {
        last_read = lines.next().unwrap().unwrap().trim_end().parse().unwrap();
    }
    let dump = DumpOptions::new(subject.pid, subject.images())
        .work_dir(subject.work())
        .orphan_pts_master(true);
    host.criu.dump(&dump).unwrap();
    subject.reap_dumped_original();
    drop(lines);

    let mut seen = Vec::new();
    let opts = RestoreOptions::new(subject.images())
        .work_dir(subject.work())
        .rst_sibling(true)
        .orphan_pts_master(true);
    let restored = host
        .criu
        .restore_with(&opts, &mut scripts_recorder(&mut seen))
        .unwrap();
    assert!(
        seen.iter()
            .any(|(s, _)| *s == NotifyScript::OrphanPtsMaster),
        "{seen:?}"
    );
    let master = restored
        .orphan_pts_master
        .expect("CRIU sent the new pty master");
    let mut lines = BufReader::new(File::from(master)).lines();
    let first: u64 = lines.next().unwrap().unwrap().trim_end().parse().unwrap();
    assert!(
        first > last_read,
        "restored output {first} does not continue after {last_read}"
    );
    let second: u64 = lines.next().unwrap().unwrap().trim_end().parse().unwrap();
    assert_eq!(second, first + 1);
}

#[test]
fn a_dump_with_cpu_check_records_the_cpu_and_cpuinfo_check_reads_it_and_refuses_a_broken_one() {
    let Some(host) = host(
        "a_dump_with_cpu_check_records_the_cpu_and_cpuinfo_check_reads_it_and_refuses_a_broken_one",
    ) else {
        return;
    };
    let subject = Subject::counting();
    host.criu
        .dump(
            &DumpOptions::new(subject.pid, subject.images())
                .work_dir(subject.work())
                .leave_running(true)
                .cpu_check(true),
        )
        .unwrap();
    let before = ls(&subject.images());
    assert!(
        before.iter().any(|f| f == criu_rpc::CPUINFO_IMAGE),
        "{before:?}"
    );
    // This CPU has what it recorded; the check writes nothing beside the images.
    host.criu.cpuinfo_check(&subject.images()).unwrap();
    assert_eq!(ls(&subject.images()), before);
    // A record that is not one: refused, with CRIU's reason.
    let cpuinfo = subject.images().join(criu_rpc::CPUINFO_IMAGE);
    let bytes = std::fs::read(&cpuinfo).unwrap();
    std::fs::write(&cpuinfo, &bytes[..bytes.len() / 2]).unwrap();
    let err = host.criu.cpuinfo_check(&subject.images()).unwrap_err();
    assert_eq!(err.operation(), criu_rpc::Operation::CpuinfoCheck, "{err}");
    std::fs::remove_file(&cpuinfo).unwrap();
    assert!(host.criu.cpuinfo_check(&subject.images()).is_err());
    subject.assert_alive_and_counting("after a dump with cpu_check");
}

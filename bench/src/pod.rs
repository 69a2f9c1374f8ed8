//! `podsnap-bench pod`: pod checkpoint and restore through podsnapd (CRI `CheckpointPod` /
//! `RestorePod`, with the `podsnap` CLI), in one run:
//!
//! - (a) `podsnap pod checkpoint` (leave running) of a pod of 4 containers holding 256 MiB
//!   each, vs (b) the four containers of an identical pod checkpointed one after another with
//!   `ctr -n k8s.io task checkpoint --image-path` (their sum);
//! - (c) the pod's freeze window, first freeze to last thaw, as podsnapd logs it (`pod captured
//!   ... freeze_window_ms=N`, the shim's figure), vs the longest container dump in that pod
//!   checkpoint, from CRIU's own statistics (`stats-dump`: freezing + frozen) and vs the pod
//!   checkpoint's wall time;
//! - (d) `podsnap pod restore --start` of (a)'s checkpoint until all 4 containers run, started
//!   together as the kubelet starts them, vs (d') the same restore with its containers started
//!   one after another (`crictl start`); then, untimed, every restored container checks its
//!   memory page by page;
//!
//!   A restore "runs" when the last StartContainer answered (CRI answers it once the container
//!   runs, as `criu restore --restore-detached` returns once the tree runs): the CLI's return,
//!   or the last `crictl start`'s. `crictl ps` then confirms every container RUNNING; that
//!   confirmation (a `crictl` process and its CRI call, about 20 ms) is printed on its own line,
//!   not counted in the ratios. (d') counts its four `crictl start` processes, as a user
//!   starting the containers one after another with crictl pays them (about 15 ms each here);
//!   (d) runs one CLI process for the whole restore;
//! - (e) `podsnap pod checkpoint` of a pod of one container holding 1 GiB vs raw
//!   `criu dump --leave-running` of the same program run as a plain process;
//! - (f) `podsnap pod restore --start` of (e)'s checkpoint until its container runs vs raw
//!   `criu restore --restore-detached` of the raw dump (its original killed first);
//! - (g) the same restore with `podsnap.io/lazy-restore=true` until its container runs (its
//!   memory streams in after), vs (f); then, untimed, memtest checks every page;
//! - (h) (e)'s checkpoint throughput (its bytes over its wall time) vs `dd` writing as many
//!   bytes (its page image's size) to the same file system: into the page cache as the
//!   checkpoint writes them, and with `conv=fdatasync`, to the disk.
//!
//! Every restore pays for reading its whole checkpoint, as a first restore does: podsnapd
//! remembers the files it verified until one changes, so before each restore every file's mode
//! is set again (which moves its change time) and left to settle, untimed. Before each timed
//! checkpoint, restore and `dd`, podsnap's or the reference's, 1.5 GiB of memory is touched and
//! freed, so that both sides work in memory the VM's host backs (see `warm_free_memory`).
//!
//! The workload is the e2e fixture memtest (e2e/fixtures/memtest.c, built static with gcc and
//! bind-mounted read-only at /memtest): it touches N MiB of anonymous memory with a position
//! dependent pattern, then waits; on SIGUSR1 it checks every word into /tmp/memtest.result. Raw
//! CRIU's copy is built from the same source with its /tmp paths moved into the work
//! directory. Pods have a PID namespace per container, set in the pod's and every container's
//! config as kubelet does. Every timed command starts after a `sync`. One round of everything
//! runs first, not counted (cold caches). (a)'s checkpoint is restored (d) and removed at once,
//! so (b) never runs beside images the other did not have; rounds alternate (a)+(d) / (b), and
//! the two sides of (e).

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::checkpoint::{LONG, client_images, raw_dump, start_raw, sync};
use crate::criu_stats::{self, DumpStats};
use crate::node::{
    BENCH_NS, BUSYBOX_CRI, CRI_NS, Cleanup, Handler, Item, Node, PID_NAMESPACE_PER_CONTAINER,
    write_container_config, write_pod_config,
};
use crate::procfs;
use crate::report::{Table, max, median, min, ratio, secs};
use crate::run::{Cmd, wait_for};

/// Containers of the multi-container pod, and the memory of each, MiB.
const CONTAINERS: usize = 4;
const SMALL_MIB: u64 = 256;
/// Memory of the single-container pod and of raw CRIU's process, MiB.
const BIG_MIB: u64 = 1024;
/// Deadline given to `podsnap pod checkpoint|restore`; the command gets a little more.
const CLI_TIMEOUT: &str = "300s";
/// Memory touched and freed before each restore ([`warm_free_memory`]), MiB.
const WARM_MIB: u64 = 1536;
/// How long a workload may take to fill (or show again) its memory, or a check to finish.
const FILL: Duration = Duration::from_secs(60);
/// The memtest source the e2e tests use.
const MEMTEST_C: &str = include_str!("../../e2e/fixtures/memtest.c");

/// A running pod of memtest containers.
pub(crate) struct Pod {
    pub(crate) id: String,
    /// Its pod config; the container configs are next to it.
    config: PathBuf,
    /// Container id, name and config, in creation order.
    containers: Vec<(String, String, PathBuf)>,
    mib: u64,
}

/// What podsnapd logged about one CheckpointPod: times of day (seconds) and figures.
#[derive(Debug, Default, PartialEq)]
struct PodsnapdLog {
    started: Option<f64>,
    captured: Option<f64>,
    done: Option<f64>,
    freeze_window_ms: Option<u64>,
    elapsed_ms: Option<u64>,
}

/// One pod checkpoint through podsnapd.
struct PodCheckpoint {
    wall: f64,
    freeze_window: f64,
    /// Request received to the shim's answer, and the rest (podsnapd's own work after it).
    to_captured: f64,
    after_captured: f64,
    /// CRIU's statistics of each container.
    dumps: Vec<DumpStats>,
    bytes: u64,
}

impl PodCheckpoint {
    fn longest_dump(&self) -> f64 {
        self.dumps
            .iter()
            .map(DumpStats::dump_seconds)
            .fold(0.0, f64::max)
    }
}

#[derive(Default)]
struct Samples {
    a_wall: Vec<f64>,
    a_window: Vec<f64>,
    a_to_captured: Vec<f64>,
    a_after_captured: Vec<f64>,
    a_longest_dump: Vec<f64>,
    a_memwrite: Vec<f64>,
    a_bytes: u64,
    b_sum: Vec<f64>,
    b_slowest: Vec<f64>,
    b_bytes: u64,
    d_restore: Vec<f64>,
    d_restore_pod: Vec<f64>,
    d_one_by_one: Vec<f64>,
    d_running: Vec<f64>,
    f_restore: Vec<f64>,
    f_running: Vec<f64>,
    f_restore_pod: Vec<f64>,
    g_lazy: Vec<f64>,
    raw_restore: Vec<f64>,
    e_wall: Vec<f64>,
    e_window: Vec<f64>,
    e_to_captured: Vec<f64>,
    e_after_captured: Vec<f64>,
    e_dump: Vec<f64>,
    e_bytes: u64,
    h_dd: Vec<f64>,
    h_dd_sync: Vec<f64>,
    raw: Vec<f64>,
    raw_dump: Vec<f64>,
    raw_bytes: u64,
}

pub fn run(node: &Node, n: usize) -> Result<(), String> {
    let shim = node.check()?;
    let (podsnapd, cli) = node.check_podsnapd()?;
    let mut cleanup = Cleanup::new(node);
    let dir = crate::work_dir(&mut cleanup)?;
    println!(
        "podsnap-bench pod: N={n}, podsnap shim {}, podsnapd {}, CLI {}",
        shim.display(),
        podsnapd.display(),
        cli.display()
    );
    println!(
        "images under {}; {} cgroups on the host",
        dir.display(),
        crate::node::host_cgroups()
    );
    let (memtest, memtest_raw) = build_memtest(&dir)?;
    node.crictl(["pull", BUSYBOX_CRI]).run()?;
    let me = std::process::id();
    let a = start_pod(
        node,
        &mut cleanup,
        &dir,
        &format!("pod-a-{me}"),
        CONTAINERS,
        SMALL_MIB,
        &memtest,
    )?;
    let b = start_pod(
        node,
        &mut cleanup,
        &dir,
        &format!("pod-b-{me}"),
        CONTAINERS,
        SMALL_MIB,
        &memtest,
    )?;
    let c = start_pod(
        node,
        &mut cleanup,
        &dir,
        &format!("pod-c-{me}"),
        1,
        BIG_MIB,
        &memtest,
    )?;
    let raw = start_raw(
        &mut cleanup,
        &dir,
        "raw",
        &format!("exec {} {BIG_MIB}", memtest_raw.display()),
    )?;
    let mut rss = Vec::new();
    for pod in [&a, &b, &c] {
        rss.push(pod_memory(node, pod)?);
    }
    let raw_rss = wait_anon("raw memtest", raw, BIG_MIB << 10)?;
    println!(
        "anonymous memory (RssAnon) per container, smallest: pod a {}, pod b {}, pod c {}; raw \
         process {}",
        mib(rss[0]),
        mib(rss[1]),
        mib(rss[2]),
        mib(raw_rss)
    );

    let w = Workloads { a, b, c, raw, dir };
    let mut notes: Vec<String> = Vec::new();
    // The first checkpoint and restore of each kind pay for cold caches: one round, not counted.
    round(
        node,
        &mut cleanup,
        &w,
        None,
        &mut Samples::default(),
        &mut notes,
    )?;
    let mut s = Samples::default();
    for i in 0..n {
        round(node, &mut cleanup, &w, Some(i), &mut s, &mut notes)?;
    }
    drop(cleanup);
    print_report(n, &s, &notes);
    Ok(())
}

/// What one run measures.
struct Workloads {
    /// (a) and (d)'s pod, (b)'s, (e)'s, and raw CRIU's process.
    a: Pod,
    b: Pod,
    c: Pod,
    raw: u32,
    dir: PathBuf,
}

/// One round of every measurement (`i` None: the warm-up). (a) is restored (d) and its images
/// removed at once, so that (b) never runs beside a checkpoint the other did not have; even
/// rounds go (a) (d) (b), odd ones (b) (a) (d); the two sides of (e) alternate too.
fn round(
    node: &Node,
    cleanup: &mut Cleanup,
    w: &Workloads,
    i: Option<usize>,
    s: &mut Samples,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    let tag = i.map_or("warm-up".to_string(), |i| i.to_string());
    let even = i.is_none_or(|i| i % 2 == 0);
    let dir = &w.dir;
    for do_a in [even, !even] {
        if do_a {
            let images = dir.join(format!("a-{tag}"));
            cleanup.add(Item::Dir(images.clone()));
            let ck = pod_checkpoint(node, &w.a, &images)?;
            eprintln!(
                "[{tag}] (a) pod checkpoint, 4 x {SMALL_MIB} MiB: {:.3}s, freeze window {:.3}s, \
                 longest CRIU dump {:.3}s",
                ck.wall,
                ck.freeze_window,
                ck.longest_dump()
            );
            s.a_wall.push(ck.wall);
            s.a_window.push(ck.freeze_window);
            s.a_to_captured.push(ck.to_captured);
            s.a_after_captured.push(ck.after_captured);
            s.a_longest_dump.push(ck.longest_dump());
            s.a_memwrite.push(
                ck.dumps
                    .iter()
                    .map(|d| d.memwrite_us as f64 / 1e6)
                    .fold(0.0, f64::max),
            );
            s.a_bytes = ck.bytes;
            pod_memory(node, &w.a)?;
            // (d): restore of that checkpoint, its containers started together and (d') one
            // after another (in turns which goes first), then it goes.
            for together in [even, !even] {
                let start = if together {
                    Start::Together
                } else {
                    Start::OneByOne
                };
                let r = pod_restore(node, cleanup, &w.a, &images, dir, &tag, start)?;
                eprintln!(
                    "[{tag}] (d) pod restore, containers started {}, until started: {:.3}s, \
                     seen RUNNING: {:.3}s (RestorePod {:.3}s)",
                    start.label(),
                    r.started,
                    r.until_running,
                    r.restore_pod
                );
                if together {
                    s.d_restore.push(r.started);
                    s.d_running.push(r.until_running);
                    s.d_restore_pod.push(r.restore_pod);
                } else {
                    s.d_one_by_one.push(r.started);
                }
            }
            cleanup.remove(&Item::Dir(images))?;
        } else {
            let (sum, slowest, bytes) =
                sequential_checkpoints(node, cleanup, &w.b, dir, &tag, notes)?;
            eprintln!(
                "[{tag}] (b) 4 sequential container checkpoints: {sum:.3}s (slowest {slowest:.3}s)"
            );
            s.b_sum.push(sum);
            s.b_slowest.push(slowest);
            s.b_bytes = bytes;
        }
    }

    // (e) one container of 1 GiB: pod checkpoint vs raw CRIU.
    for pod_first in [even, !even] {
        if pod_first {
            let images = dir.join(format!("c-{tag}"));
            cleanup.add(Item::Dir(images.clone()));
            let ck = pod_checkpoint(node, &w.c, &images)?;
            eprintln!(
                "[{tag}] (e) pod checkpoint, 1 x {BIG_MIB} MiB: {:.3}s, freeze window {:.3}s",
                ck.wall, ck.freeze_window
            );
            s.e_wall.push(ck.wall);
            s.e_window.push(ck.freeze_window);
            s.e_to_captured.push(ck.to_captured);
            s.e_after_captured.push(ck.after_captured);
            s.e_dump.push(ck.longest_dump());
            s.e_bytes = ck.bytes;
            pod_memory(node, &w.c)?;
            // (f): its restore until running.
            let r = pod_restore(node, cleanup, &w.c, &images, dir, &tag, Start::Together)?;
            eprintln!(
                "[{tag}] (f) pod restore, 1 x {BIG_MIB} MiB, until started: {:.3}s, seen \
                 RUNNING: {:.3}s (RestorePod {:.3}s)",
                r.started, r.until_running, r.restore_pod
            );
            s.f_restore.push(r.started);
            s.f_running.push(r.until_running);
            s.f_restore_pod.push(r.restore_pod);
            // (g): the same, lazily.
            let r = pod_restore(node, cleanup, &w.c, &images, dir, &tag, Start::Lazily)?;
            eprintln!(
                "[{tag}] (g) pod restore, 1 x {BIG_MIB} MiB, lazily, until started: {:.3}s",
                r.started
            );
            s.g_lazy.push(r.started);
            // (h): dd of the same bytes, into the page cache and to the disk.
            for fsync in [false, true] {
                let rate = dd_rate(&images, dir, fsync)?;
                eprintln!(
                    "[{tag}] (h) dd of its page image's size{}: {:.0} MiB/s",
                    if fsync { ", conv=fdatasync" } else { "" },
                    rate / f64::from(1 << 20)
                );
                if fsync {
                    s.h_dd_sync.push(rate);
                } else {
                    s.h_dd.push(rate);
                }
            }
            cleanup.remove(&Item::Dir(images))?;
        } else {
            let images = dir.join(format!("raw-{tag}"));
            cleanup.add(Item::Dir(images.clone()));
            std::fs::create_dir(&images)
                .map_err(|e| format!("create {}: {e}", images.display()))?;
            sync()?;
            warm_free_memory()?;
            let t = raw_dump(node, w.raw, &images)?;
            let stats = criu_stats::read(&images.join("stats-dump"))?;
            eprintln!(
                "[{tag}] (e) raw criu dump, {BIG_MIB} MiB: {:.3}s",
                t.elapsed.as_secs_f64()
            );
            s.raw.push(t.elapsed.as_secs_f64());
            s.raw_dump.push(stats.dump_seconds());
            s.raw_bytes = procfs::du(&images);
            wait_anon("raw memtest after its dump", w.raw, BIG_MIB << 10)?;
            // Its restore: the original goes first (CRIU restores the same pid).
            cleanup.remove(&Item::Group(w.raw))?;
            cold(&images)?;
            cleanup.add(Item::Group(w.raw));
            let t = node
                .criu([
                    "restore",
                    "--restore-detached",
                    "-o",
                    "restore.log",
                    "-v2",
                    "-D",
                ])
                .arg(&images)
                .timeout(LONG)
                .run()
                .map_err(|e| crate::checkpoint::with_log(e, &images.join("restore.log")))?;
            eprintln!(
                "[{tag}] (f) raw criu restore --restore-detached, {BIG_MIB} MiB: {:.3}s",
                t.elapsed.as_secs_f64()
            );
            s.raw_restore.push(t.elapsed.as_secs_f64());
            wait_anon("raw memtest after its restore", w.raw, BIG_MIB << 10)?;
            cleanup.remove(&Item::Dir(images))?;
        }
    }
    Ok(())
}

/// Bytes per second of `dd` writing as many bytes as the largest file under `images` (a page
/// image) into a new file in `dir`, from /dev/zero (reading the image back could meet it evicted
/// from the page cache, and time the disk's reads too), with `conv=fdatasync` when `fsync`; the
/// copy goes again at once.
fn dd_rate(images: &Path, dir: &Path, fsync: bool) -> Result<f64, String> {
    fn largest(dir: &Path) -> Option<u64> {
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter_map(|e| {
                let t = e.file_type().ok()?;
                if t.is_dir() {
                    largest(&e.path())
                } else if t.is_file() {
                    Some(e.metadata().ok()?.len())
                } else {
                    None
                }
            })
            .max()
    }
    let mib = largest(images).ok_or(format!("{} holds no file", images.display()))? >> 20;
    let bytes = mib << 20;
    let copy = dir.join("dd.img");
    sync()?;
    warm_free_memory()?;
    let mut cmd = Cmd::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", copy.display()))
        .arg(format!("count={mib}"))
        .args(["bs=1M", "status=none"]);
    if fsync {
        cmd = cmd.arg("conv=fdatasync");
    }
    let result = cmd.timeout(LONG).run();
    let _ = std::fs::remove_file(&copy);
    let t = result?;
    Ok(bytes as f64 / t.elapsed.as_secs_f64().max(1e-6))
}

/// Builds memtest (for the containers) and memtest-raw (its /tmp files in `dir`) static.
pub(crate) fn build_memtest(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    let dir_text = dir.display().to_string();
    if !dir_text
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c))
    {
        return Err(format!(
            "work directory {dir_text:?}: only letters, digits and / . _ - please (it goes into \
             a C string and a shell command)"
        ));
    }
    let mut built = Vec::new();
    for (name, source) in [
        ("memtest", MEMTEST_C.to_string()),
        (
            "memtest-raw",
            MEMTEST_C.replace("\"/tmp/memtest.", &format!("\"{dir_text}/memtest.")),
        ),
    ] {
        let c = dir.join(format!("{name}.c"));
        std::fs::write(&c, source).map_err(|e| format!("write {}: {e}", c.display()))?;
        let out = dir.join(name);
        Cmd::new("gcc")
            .args(["-O2", "-static", "-o"])
            .arg(&out)
            .arg(&c)
            .timeout(Duration::from_secs(120))
            .run()?;
        built.push(out);
    }
    let raw = built.pop().ok_or("memtest-raw")?;
    let memtest = built.pop().ok_or("memtest")?;
    Ok((memtest, raw))
}

/// Starts a pod (handler podsnap, a PID namespace per container) of `count` memtest
/// containers touching `mib` MiB each; configs and logs under `<dir>/<name>/`.
pub(crate) fn start_pod(
    node: &Node,
    cleanup: &mut Cleanup,
    dir: &Path,
    name: &str,
    count: usize,
    mib: u64,
    memtest: &Path,
) -> Result<Pod, String> {
    let pod_dir = sub_dir(dir, name)?;
    let config = write_pod_config(&pod_dir, name, PID_NAMESPACE_PER_CONTAINER)?;
    let id = node.run_pod_config(cleanup, Handler::Podsnap, &config)?;
    let mut containers = Vec::new();
    for k in 0..count {
        let cname = format!("mem{k}");
        let cconfig = write_container_config(
            &config,
            &cname,
            &["/memtest", &mib.to_string()],
            &[(memtest, "/memtest")],
            PID_NAMESPACE_PER_CONTAINER,
        )?;
        let cid = node.create_container_config(&id, &config, &cconfig)?;
        cleanup.add_final(Item::Cgroup(format!("{CRI_NS}/{cid}")));
        node.crictl(["start", &cid]).run()?;
        containers.push((cid, cname, cconfig));
    }
    Ok(Pod {
        id,
        config,
        containers,
        mib,
    })
}

/// A 0700 directory `<dir>/<name>` (removed with `dir`).
fn sub_dir(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let path = dir.join(name);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&path)
        .map_err(|e| format!("create {}: {e}", path.display()))?;
    Ok(path)
}

/// Fails unless every container of `pod` runs, in a PID namespace of its own, with its memory;
/// returns the smallest RssAnon, KiB.
pub(crate) fn pod_memory(node: &Node, pod: &Pod) -> Result<u64, String> {
    let mut smallest = u64::MAX;
    let mut namespaces = Vec::new();
    for (id, name, _) in &pod.containers {
        let state = node.container_state(id)?;
        if state != "CONTAINER_RUNNING" {
            return Err(format!("container {name} ({id}) is {state}, want running"));
        }
        let pid = node.container_pid(id)?;
        let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
        let own = ns(&pid.to_string());
        if own.is_none() || own == ns("self") || namespaces.contains(&own) {
            return Err(format!(
                "container {name} ({id}): its PID namespace {own:?} is the host's or another \
                 container's (or unreadable)"
            ));
        }
        namespaces.push(own);
        let kib = wait_anon(&format!("container {name} ({id})"), pid, pod.mib << 10)?;
        smallest = smallest.min(kib);
    }
    Ok(smallest)
}

/// Waits until the tree under `root` holds `kib` of anonymous memory; returns what it holds.
fn wait_anon(what: &str, root: u32, kib: u64) -> Result<u64, String> {
    wait_for(
        &format!(
            "{what} (pid {root}) to hold {} of anonymous memory",
            mib(kib)
        ),
        FILL,
        || {
            let held = procfs::tree_rss_anon_kib(root);
            Ok((held >= kib).then_some(held))
        },
    )
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// `podsnap pod checkpoint` of every container of `pod` into `images` (which must not exist),
/// leaving it running; with what podsnapd logged about it and CRIU's statistics.
fn pod_checkpoint(node: &Node, pod: &Pod, images: &Path) -> Result<PodCheckpoint, String> {
    let log_path = node.podsnapd_log();
    let offset = std::fs::metadata(&log_path)
        .map_err(|e| format!("{}: {e}", log_path.display()))?
        .len();
    sync()?;
    warm_free_memory()?;
    let t = node
        .podsnap(["pod", "checkpoint", &pod.id])
        .arg(images)
        .args(["--timeout", CLI_TIMEOUT])
        .timeout(LONG + Duration::from_secs(30))
        .run()?;
    let wall = t.elapsed.as_secs_f64();
    let log = wait_for(
        &format!(
            "`pod checkpointed sandbox={}` in {}",
            pod.id,
            log_path.display()
        ),
        Duration::from_secs(5),
        || {
            let log = parse_podsnapd_log(&read_from(&log_path, offset)?, &pod.id);
            Ok(log.done.is_some().then_some(log))
        },
    )?;
    let (Some(started), Some(captured), Some(done), Some(window)) =
        (log.started, log.captured, log.done, log.freeze_window_ms)
    else {
        return Err(format!(
            "{} lacks the lines `checkpointing pod`, `pod captured ... freeze_window_ms=N` or \
             `pod checkpointed` of sandbox {}: {log:?}",
            log_path.display(),
            pod.id
        ));
    };
    let mut dumps = Vec::new();
    for (_, name, _) in &pod.containers {
        dumps.push(criu_stats::read(&images.join(name).join("stats-dump"))?);
    }
    Ok(PodCheckpoint {
        wall,
        freeze_window: window as f64 / 1000.0,
        to_captured: since(started, captured),
        after_captured: since(captured, done),
        dumps,
        bytes: procfs::du(images),
    })
}

/// Seconds from time of day `from` to `to` (across one midnight).
fn since(from: f64, to: f64) -> f64 {
    let d = to - from;
    if d < 0.0 { d + 86400.0 } else { d }
}

/// The text of `path` from byte `offset` on.
fn read_from(path: &Path, offset: u64) -> Result<String, String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut data = Vec::new();
    file.read_to_end(&mut data)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(String::from_utf8_lossy(&data).into_owned())
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// podsnapd's log lines (tracing's format: `<RFC 3339 time>  INFO <span>: <target>: <message>
/// key=value ...`) about the CheckpointPod of `sandbox`.
fn parse_podsnapd_log(text: &str, sandbox: &str) -> PodsnapdLog {
    let mut log = PodsnapdLog::default();
    let field = |line: &str, key: &str| -> Option<u64> {
        let rest = line.split(&format!(" {key}=")).nth(1)?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    let span = format!("CheckpointPod{{pod={sandbox} ");
    let has_sandbox = |line: &str| line.contains(&format!(" sandbox={sandbox} "));
    for line in text.lines().map(strip_ansi) {
        let line = format!("{line} ");
        if !line.contains(&span) {
            continue;
        }
        let time = line.split_whitespace().next().and_then(time_of_day);
        if line.contains(": checkpointing pod ") {
            log.started = log.started.or(time);
        } else if line.contains(": pod captured ") && has_sandbox(&line) {
            log.captured = time;
            log.freeze_window_ms = field(&line, "freeze_window_ms");
        } else if line.contains(": pod checkpointed ") && has_sandbox(&line) {
            log.done = time;
            log.elapsed_ms = field(&line, "elapsed_ms");
        }
    }
    log
}

/// Seconds since midnight of `2026-11-27T20:48:55.663885Z`.
fn time_of_day(stamp: &str) -> Option<f64> {
    let clock = stamp.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = clock.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// (b): `ctr task checkpoint --image-path` of each container of `pod`, one after another.
/// Returns the sum, the slowest and the images' total size.
fn sequential_checkpoints(
    node: &Node,
    cleanup: &mut Cleanup,
    pod: &Pod,
    dir: &Path,
    tag: &str,
    notes: &mut Vec<String>,
) -> Result<(f64, f64, u64), String> {
    let mut dirs = Vec::new();
    for (_, name, _) in &pod.containers {
        let images = dir.join(format!("b-{tag}-{name}"));
        cleanup.add(Item::Dir(images.clone()));
        dirs.push(images);
    }
    sync()?;
    let mut times = Vec::new();
    for ((id, _, _), images) in pod.containers.iter().zip(&dirs) {
        warm_free_memory()?;
        let t = node
            .ctr(CRI_NS, ["task", "checkpoint", "--image-path"])
            .arg(images)
            .arg(id)
            .timeout(LONG)
            .run()?;
        times.push(t.elapsed.as_secs_f64());
    }
    let mut bytes = 0;
    for ((id, _, _), images) in pod.containers.iter().zip(&dirs) {
        // containerd's client also writes a checkpoint image for runtimes other than runc's.
        let extra = client_images(node, id)?;
        if !extra.is_empty() && !notes.iter().any(|n| n.starts_with("(b)")) {
            notes.push(format!(
                "(b) `ctr task checkpoint --image-path` also created image(s) in containerd \
                 ({}): its client writes them for every runtime but io.containerd.runc.v2; \
                 counted in the time, then removed",
                extra.join(", ")
            ));
        }
        for name in extra {
            cleanup.remove(&Item::CtrImage {
                namespace: CRI_NS.into(),
                name,
            })?;
        }
        bytes += procfs::du(images);
        cleanup.remove(&Item::Dir(images.clone()))?;
    }
    pod_memory(node, pod)?;
    Ok((times.iter().sum(), max(&times), bytes))
}

/// (d): `podsnap pod restore --start` of `images` (a checkpoint of `pod`) into a new pod, timed
/// until every container's StartContainer answered, and until `crictl ps` saw them all
/// RUNNING; then every restored container checks its memory (untimed) and
/// the pod is removed.
fn pod_restore(
    node: &Node,
    cleanup: &mut Cleanup,
    pod: &Pod,
    images: &Path,
    dir: &Path,
    tag: &str,
    start: Start,
) -> Result<Restored, String> {
    let name = format!(
        "{}-restored-{}-{tag}",
        pod.config
            .parent()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        start.label().replace(' ', "-")
    );
    let pod_dir = sub_dir(dir, &name)?;
    let config = write_pod_config(&pod_dir, &name, PID_NAMESPACE_PER_CONTAINER)?;
    let mut cmd = node
        .podsnap(["pod", "restore"])
        .arg(images)
        .arg("--pod-config")
        .arg(&config);
    for (_, _, cconfig) in &pod.containers {
        cmd = cmd.arg("--container-config").arg(cconfig);
    }
    let cmd = match start {
        Start::Together => cmd.arg("--start"),
        Start::OneByOne => cmd,
        Start::Lazily => cmd
            .arg("--start")
            .args(["--option", "podsnap.io/lazy-restore=true"]),
    };
    let cmd = cmd
        .args(["--timeout", CLI_TIMEOUT])
        .timeout(LONG + Duration::from_secs(60));
    let log_path = node.podsnapd_log();
    let offset = std::fs::metadata(&log_path)
        .map_err(|e| format!("{}: {e}", log_path.display()))?
        .len();
    cold(images)?;
    sync()?;
    let t0 = Instant::now();
    let (stdout, result) = cmd.run_keeping_stdout();
    // Whatever it made goes again, even when it failed half-way.
    let mut lines = stdout.lines();
    let sandbox = lines.next().map(str::trim).filter(|l| !l.is_empty());
    let restored: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once('\t'))
        .map(|(id, name)| (id.trim().to_string(), name.trim().to_string()))
        .collect();
    if let Some(id) = sandbox {
        cleanup.add(Item::Pod(id.to_string()));
    }
    for (id, _) in &restored {
        cleanup.add_final(Item::Cgroup(format!("{CRI_NS}/{id}")));
    }
    if let Err(e) = result {
        // A pod RestorePod made and left behind (no id printed) is found by its name.
        if sandbox.is_none() {
            let leaked = node
                .crictl(["pods", "-q", "--name", &format!("^{name}$")])
                .run()
                .map(|d| d.stdout)
                .unwrap_or_default();
            for id in leaked.split_whitespace() {
                cleanup.add(Item::Pod(id.to_string()));
            }
            if !leaked.trim().is_empty() {
                return Err(format!(
                    "{e}\n(the failed restore left pod {name} behind: {})",
                    leaked.trim()
                ));
            }
        }
        return Err(e);
    }
    let sandbox = sandbox.ok_or("`podsnap pod restore` printed no sandbox id")?;
    if restored.len() != pod.containers.len() {
        return Err(format!(
            "`podsnap pod restore` printed {} containers, want {}:\n{stdout}",
            restored.len(),
            pod.containers.len()
        ));
    }
    if start == Start::OneByOne {
        for (id, _) in &restored {
            node.crictl(["start", id]).timeout(LONG).run()?;
        }
    }
    let started = t0.elapsed().as_secs_f64();
    wait_for(
        &format!("the {} restored containers to run", restored.len()),
        FILL,
        || {
            let out = node
                .crictl(["ps", "-q", "--pod", sandbox, "--state", "running"])
                .run()?;
            Ok((out.stdout.split_whitespace().count() == restored.len()).then_some(()))
        },
    )?;
    let elapsed = t0.elapsed().as_secs_f64();

    // Untimed: every page of every restored container is as it was.
    for (id, cname) in &restored {
        let what = format!("restored container {cname} ({id})");
        let pid = node.container_pid(id)?;
        wait_anon(&what, pid, pod.mib << 10)?;
        let result = PathBuf::from(format!("/proc/{pid}/root/tmp/memtest.result"));
        if result.exists() {
            return Err(format!(
                "{what}: {} exists before its check",
                result.display()
            ));
        }
        Cmd::new("kill").args(["-USR1", &pid.to_string()]).run()?;
        let text = wait_for(&format!("{what} to check its memory"), FILL, || {
            Ok(std::fs::read_to_string(&result).ok())
        })?;
        let want = format!("checked {} pages, 0 bad words", (pod.mib << 20) / 4096);
        if text.trim() != want {
            return Err(format!(
                "{what}: memtest says {:?}, want {want:?}",
                text.trim()
            ));
        }
    }
    cleanup.remove(&Item::Pod(sandbox.to_string()))?;
    let span = format!("RestorePod{{pod={BENCH_NS}/{name} ");
    let restore_pod = read_from(&log_path, offset)?
        .lines()
        .map(strip_ansi)
        .filter(|l| l.contains(&span) && l.contains(" done rpc=\"RestorePod\" "))
        .find_map(|l| {
            let rest = l.split(" elapsed_ms=").nth(1)?;
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u64>().ok()
        })
        .ok_or_else(|| {
            format!(
                "{} has no `done rpc=\"RestorePod\" elapsed_ms=N` line of pod {BENCH_NS}/{name}",
                log_path.display()
            )
        })?;
    Ok(Restored {
        started,
        until_running: elapsed,
        restore_pod: restore_pod as f64 / 1000.0,
    })
}

/// How a restore's containers are started.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Start {
    /// `podsnap pod restore --start`: all at once, as the kubelet does.
    Together,
    /// `podsnap pod restore`, then `crictl start` of each container, one after another.
    OneByOne,
    /// `podsnap pod restore --start` with `podsnap.io/lazy-restore=true`.
    Lazily,
}

impl Start {
    fn label(self) -> &'static str {
        match self {
            Start::Together => "together",
            Start::OneByOne => "one by one",
            Start::Lazily => "lazily",
        }
    }
}

/// Makes a restore of `images` pay for reading every file, as the first restore of a checkpoint
/// does: podsnapd remembers the files it verified (until one changes), so each file's change
/// time is moved (`chmod` to its own mode) and left to settle, untimed.
fn cold(images: &Path) -> Result<(), String> {
    fn touch(path: &Path) -> std::io::Result<()> {
        let meta = std::fs::symlink_metadata(path)?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(path)? {
                touch(&entry?.path())?;
            }
        }
        if !meta.is_symlink() {
            std::fs::set_permissions(path, meta.permissions())?;
        }
        Ok(())
    }
    touch(images).map_err(|e| format!("chmod the files of {}: {e}", images.display()))?;
    std::thread::sleep(Duration::from_millis(300));
    warm_free_memory()
}

/// Touches and frees [`WARM_MIB`] of memory, so that the timed command that follows (a
/// checkpoint writing page cache, a restore allocating its memory, `dd`) gets pages its host
/// backs, whichever side it is. On this VM (virtio free page reporting) a page that stayed free
/// for seconds costs the host a fault at its first touch: a raw restore right after killing its
/// original reused that memory warm, a pod restore beside its running original got cold pages,
/// and CRIU's part of it took up to 3x as long, most of it in clear_page (perf); `dd` from
/// /dev/zero into one buffer touches every page of it.
fn warm_free_memory() -> Result<(), String> {
    Cmd::new("dd")
        .args(["if=/dev/zero", "of=/dev/null", "count=1", "status=none"])
        .arg(format!("bs={WARM_MIB}M"))
        .timeout(LONG)
        .run()
        .map(|_| ())
}

/// One pod restore: until every container's StartContainer answered (for [`Start::Together`]
/// and [`Start::Lazily`], the CLI's whole run), until `crictl ps` saw them all RUNNING, and
/// podsnapd's RestorePod.
struct Restored {
    started: f64,
    until_running: f64,
    restore_pod: f64,
}

fn print_report(n: usize, s: &Samples, notes: &[String]) {
    let row = |t: &mut Table, label: &str, v: &[f64]| {
        t.row(vec![
            label.to_string(),
            secs(median(v)),
            secs(min(v)),
            secs(max(v)),
        ]);
    };
    let gib = |b: u64| format!("{:.2} GiB", b as f64 / f64::from(1 << 30));
    println!(
        "\npod of {CONTAINERS} containers x {SMALL_MIB} MiB (memtest, a PID namespace each), \
         handler podsnap, {n} runs each, seconds"
    );
    let mut t = Table::new(1, &["measure", "median", "min", "max"]);
    row(
        &mut t,
        "(a) podsnap pod checkpoint (leave running)",
        &s.a_wall,
    );
    row(
        &mut t,
        "    podsnapd: request to the shim's answer",
        &s.a_to_captured,
    );
    row(
        &mut t,
        "    podsnapd: after it (layout, manifest sha256)",
        &s.a_after_captured,
    );
    row(
        &mut t,
        "(b) 4 x ctr task checkpoint --image-path, one after another (sum)",
        &s.b_sum,
    );
    row(&mut t, "    slowest of the 4", &s.b_slowest);
    row(
        &mut t,
        "(c) freeze window of (a), first freeze to last thaw (podsnapd log)",
        &s.a_window,
    );
    row(
        &mut t,
        "    longest container dump of (a), CRIU freezing+frozen (stats-dump)",
        &s.a_longest_dump,
    );
    row(&mut t, "    longest CRIU memwrite of (a)", &s.a_memwrite);
    let excess: Vec<f64> = s
        .a_window
        .iter()
        .zip(&s.a_longest_dump)
        .map(|(w, d)| w - d)
        .collect();
    row(&mut t, "    freeze window - longest CRIU dump", &excess);
    row(
        &mut t,
        "(d) podsnap pod restore --start until its 4 StartContainer answered",
        &s.d_restore,
    );
    row(
        &mut t,
        "    until crictl ps saw them RUNNING (crictl's start included)",
        &s.d_running,
    );
    row(
        &mut t,
        "    podsnapd RestorePod (podsnapd log)",
        &s.d_restore_pod,
    );
    row(
        &mut t,
        "(d') the same restored, containers started one after another (crictl start)",
        &s.d_one_by_one,
    );
    print!("{}", t.render());
    println!(
        "images: (a) {}, (b) {} (4 together)",
        gib(s.a_bytes),
        gib(s.b_bytes)
    );

    println!(
        "\npod of 1 container x {BIG_MIB} MiB vs the same program as a plain process, {n} runs each, seconds"
    );
    let mut t = Table::new(1, &["measure", "median", "min", "max"]);
    row(
        &mut t,
        "(e) podsnap pod checkpoint (leave running)",
        &s.e_wall,
    );
    row(
        &mut t,
        "    podsnapd: request to the shim's answer",
        &s.e_to_captured,
    );
    row(
        &mut t,
        "    podsnapd: after it (layout, manifest sha256)",
        &s.e_after_captured,
    );
    row(&mut t, "    freeze window (podsnapd log)", &s.e_window);
    row(
        &mut t,
        "    CRIU dump, freezing+frozen (stats-dump)",
        &s.e_dump,
    );
    row(&mut t, "    raw criu dump --leave-running", &s.raw);
    row(&mut t, "    raw: freezing+frozen (stats-dump)", &s.raw_dump);
    row(
        &mut t,
        "(f) podsnap pod restore --start of (e) until StartContainer answered",
        &s.f_restore,
    );
    row(
        &mut t,
        "    until crictl ps saw it RUNNING (crictl's start included)",
        &s.f_running,
    );
    row(
        &mut t,
        "    podsnapd RestorePod (podsnapd log)",
        &s.f_restore_pod,
    );
    row(
        &mut t,
        "    raw criu restore --restore-detached",
        &s.raw_restore,
    );
    row(
        &mut t,
        "(g) the same restore, lazily, until StartContainer answered",
        &s.g_lazy,
    );
    print!("{}", t.render());
    println!("images: (e) {}, raw {}", gib(s.e_bytes), gib(s.raw_bytes));
    // (h): throughput, MiB/s (medians of rates).
    let e_rate: Vec<f64> = s.e_wall.iter().map(|w| s.e_bytes as f64 / w).collect();
    let mibs = |v: &[f64]| format!("{:.0} MiB/s", median(v) / f64::from(1 << 20));
    println!(
        "(h) checkpoint throughput of (e): {}; dd of its page image's size to the same file system: {} \
         (page cache), {} (conv=fdatasync)",
        mibs(&e_rate),
        mibs(&s.h_dd),
        mibs(&s.h_dd_sync)
    );

    println!();
    println!(
        "{}",
        ratio(
            "(a)/(b) pod checkpoint / 4 sequential container checkpoints",
            median(&s.a_wall),
            median(&s.b_sum),
            Some(0.7)
        )
    );
    for (label, bound) in [
        ("longest container dump (CRIU stats)", &s.a_longest_dump),
        ("pod checkpoint wall time", &s.a_wall),
    ] {
        let excess: Vec<f64> = s
            .a_window
            .iter()
            .zip(bound)
            .map(|(w, d)| (w - d) * 1000.0)
            .collect();
        let m = median(&excess);
        println!(
            "TARGET (c) freeze window <= {label} + 20 ms: median excess {m:+.0} ms (max {:+.0} \
             ms): {}",
            max(&excess),
            if m <= 20.0 { "met" } else { "NOT met" }
        );
    }
    for (label, num, den, target) in [
        (
            "(e) pod checkpoint 1 GiB / raw criu dump",
            &s.e_wall,
            &s.raw,
            Some(1.2),
        ),
        (
            "(f) pod restore 1 GiB until started / raw criu restore",
            &s.f_restore,
            &s.raw_restore,
            Some(1.2),
        ),
        (
            "(g)/(f) lazy restore 1 GiB until started / eager",
            &s.g_lazy,
            &s.f_restore,
            Some(0.15),
        ),
        (
            "(d)/(d') 4 x 256 MiB restore, started together / one after another",
            &s.d_restore,
            &s.d_one_by_one,
            Some(0.6),
        ),
        (
            "(d)/(a) pod restore / pod checkpoint",
            &s.d_restore,
            &s.a_wall,
            None,
        ),
    ] {
        println!("{}", ratio(label, median(num), median(den), target));
    }
    for (label, dd) in [("page cache", &s.h_dd), ("conv=fdatasync", &s.h_dd_sync)] {
        println!(
            "{}",
            ratio(
                &format!("(h) checkpoint throughput / dd ({label})"),
                median(&e_rate),
                median(dd),
                None
            )
        );
    }
    for note in notes {
        println!("note: {note}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "59359ee0621de36e37cda2c481a6bd1317bf65bdc8a8a94aeb20ad4f5f9d4668";

    #[test]
    fn podsnapd_log_lines_are_read() {
        let span = format!("CheckpointPod{{pod={ID} output=/x/ck}}");
        let text = format!(
            "2026-11-27T20:48:55.519366Z  INFO {span}: podsnapd::pod_rpc: checkpointing pod containers=[\"a\"] options={{}} timeout_ms=1\n\
             2026-11-27T20:48:55.600000Z  INFO CheckpointPod{{pod=other output=/y}}: podsnapd::checkpoint_pod: pod captured sandbox=other freeze_window_ms=9\n\
             2026-11-27T20:48:55.663885Z  INFO {span}: podsnapd::checkpoint_pod: \u{1b}[3mpod captured\u{1b}[0m sandbox={ID} freeze_window_ms=131\n\
             2026-11-27T20:48:55.685814Z  INFO {span}: podsnapd::checkpoint_pod: pod checkpointed sandbox={ID} containers=2 elapsed_ms=166 output=/x/ck\n"
        );
        let log = parse_podsnapd_log(&text, ID);
        assert_eq!(log.freeze_window_ms, Some(131));
        assert_eq!(log.elapsed_ms, Some(166));
        let (s, c, d) = (
            log.started.unwrap(),
            log.captured.unwrap(),
            log.done.unwrap(),
        );
        assert!((since(s, c) - 0.144519).abs() < 1e-6);
        assert!((since(c, d) - 0.021929).abs() < 1e-6);
        assert_eq!(parse_podsnapd_log(&text, "nothere"), PodsnapdLog::default());
        assert_eq!(parse_podsnapd_log(&text, "other").freeze_window_ms, Some(9));
        assert!((since(86399.5, 0.25) - 0.75).abs() < 1e-9);
    }

    #[test]
    fn memtest_for_raw_criu_writes_into_the_work_dir() {
        let source = MEMTEST_C.replace("\"/tmp/memtest.", "\"/w/memtest.");
        assert!(!source.contains("\"/tmp/"));
        assert_eq!(source.matches("\"/w/memtest.").count(), 4);
    }
}

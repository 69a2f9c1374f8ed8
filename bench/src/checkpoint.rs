//! `podsnap-bench checkpoint`: checkpoint and restore of a container holding 1 GiB of anonymous
//! memory, in one run: podsnap vs raw CRIU vs containerd's runc shim.
//!
//! The workload is busybox `dd if=/dev/urandom bs=1G count=1 iflag=fullblock | { while :; do
//! sleep 3600; done; }`: dd reads 1 GiB into one buffer (its anonymous memory, every page touched;
//! random, so no compression or zero-page shortcut helps anyone) and then blocks for ever writing
//! it into a pipe nobody reads. The loop restarts `sleep`, which exits when a dump interrupts its
//! nanosleep (CRIU turns that into EINTR). Raw CRIU gets the same pipeline as a process tree of
//! its own session, started by the benchmark. Every timed command starts after a `sync`, so none
//! pays for writing back another's dirty pages.
//!
//! Checkpoints (all leave the workload running; every image is deleted after it is measured,
//! but the last of each kind, which the restores use):
//! - raw `criu dump --leave-running` of the tree;
//! - `ctr task checkpoint --image-path` of a CRI container, podsnap and runc handler;
//! - `ctr container checkpoint --task` (containerd's content store) of a container made with
//!   `ctr run`, podsnap and runc runtime.
//!
//! Restores (the originals are gone by then): raw `criu restore --restore-detached`, and
//! `ctr container restore --live` of the content-store checkpoints. Methods rotate every
//! iteration so drift hits all alike.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::node::{BENCH_NS, BUSYBOX_CRI, BUSYBOX_CTR, CRI_NS, Cleanup, Handler, Item, Node};
use crate::procfs;
use crate::report::{Table, max, median, min, ratio, secs};
use crate::run::{Cmd, wait_for};

/// The workload's memory, KiB.
const GIB_KIB: u64 = 1 << 20;
/// Limit of one checkpoint or restore command.
pub const LONG: Duration = Duration::from_secs(300);
/// How long a workload may take to fill (or show again) its memory.
const FILL: Duration = Duration::from_secs(60);

fn workload(busybox: &str) -> String {
    format!(
        "{busybox}dd if=/dev/urandom bs=1G count=1 iflag=fullblock | \
         {{ while :; do {busybox}sleep 3600; done; }}"
    )
}

#[derive(Debug, Clone, Copy)]
enum Dump {
    RawCriu,
    TaskPath(Handler),
    ContentStore(Handler),
}

impl Dump {
    const ALL: [Dump; 5] = [
        Dump::RawCriu,
        Dump::TaskPath(Handler::Podsnap),
        Dump::TaskPath(Handler::Runc),
        Dump::ContentStore(Handler::Podsnap),
        Dump::ContentStore(Handler::Runc),
    ];

    fn label(self) -> String {
        match self {
            Dump::RawCriu => "raw criu dump --leave-running".into(),
            Dump::TaskPath(h) => {
                format!(
                    "{:<8} ctr task checkpoint --image-path (CRI container)",
                    h.name()
                )
            }
            Dump::ContentStore(h) => {
                format!(
                    "{:<8} ctr container checkpoint --task (content store)",
                    h.name()
                )
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Restore {
    RawCriu,
    ContentStore(Handler),
}

impl Restore {
    const ALL: [Restore; 3] = [
        Restore::RawCriu,
        Restore::ContentStore(Handler::Podsnap),
        Restore::ContentStore(Handler::Runc),
    ];

    fn label(self) -> String {
        match self {
            Restore::RawCriu => "raw criu restore --restore-detached".into(),
            Restore::ContentStore(h) => {
                format!(
                    "{:<8} ctr container restore --live (content store)",
                    h.name()
                )
            }
        }
    }
}

/// The workloads, one per way of checkpointing.
struct Workloads {
    /// Raw CRIU's tree: its session leader's pid (= its process group).
    raw: u32,
    /// CRI containers by handler.
    cri: [String; 2],
    /// ctr containers by runtime.
    ctr: [String; 2],
}

pub fn run(node: &Node, n: usize) -> Result<(), String> {
    let shim = node.check()?;
    let mut cleanup = Cleanup::new(node);
    let dir = crate::work_dir(&mut cleanup)?;
    println!(
        "podsnap-bench checkpoint: N={n}, podsnap shim {}",
        shim.display()
    );
    println!(
        "images under {}; {} cgroups on the host",
        dir.display(),
        crate::node::host_cgroups()
    );
    let w = start_workloads(node, &mut cleanup, &dir)?;

    let mut dumps: Vec<Vec<f64>> = vec![Vec::new(); Dump::ALL.len()];
    let mut sizes: Vec<Option<u64>> = vec![None; Dump::ALL.len()];
    let mut notes = Vec::new();
    // The newest image of each kind the restores use.
    let mut raw_images = None;
    let mut store_refs: [Option<String>; 2] = [None, None];
    for i in 0..n {
        for k in (0..Dump::ALL.len()).map(|j| (i + j) % Dump::ALL.len()) {
            let d = Dump::ALL[k];
            sync()?;
            let (seconds, size) = match d {
                Dump::RawCriu => {
                    let images = dir.join(format!("raw-{i}"));
                    cleanup.add(Item::Dir(images.clone()));
                    std::fs::create_dir(&images)
                        .map_err(|e| format!("create {}: {e}", images.display()))?;
                    let t = raw_dump(node, w.raw, &images)?;
                    wait_memory("raw workload after dump", w.raw)?;
                    let size = procfs::du(&images);
                    if let Some(old) = raw_images.replace(images) {
                        cleanup.remove(&Item::Dir(old))?;
                    }
                    (t.elapsed, Some(size))
                }
                Dump::TaskPath(h) => {
                    let id = &w.cri[h as usize];
                    let images = dir.join(format!("{}-task-{i}", h.name()));
                    cleanup.add(Item::Dir(images.clone()));
                    let t = node
                        .ctr(CRI_NS, ["task", "checkpoint", "--image-path"])
                        .arg(&images)
                        .arg(id)
                        .timeout(LONG)
                        .run()?;
                    // containerd's client only skips writing a checkpoint image to the content
                    // store for io.containerd.runc.v2: remove any it wrote.
                    let extra = client_images(node, id)?;
                    if !extra.is_empty() && i == 0 {
                        notes.push(format!(
                            "`ctr task checkpoint --image-path` on {} also created image(s) in \
                             containerd ({}): the client writes them for every runtime but \
                             io.containerd.runc.v2; counted in the time, then removed",
                            h.name(),
                            extra.join(", ")
                        ));
                    }
                    for name in extra {
                        cleanup.remove(&Item::CtrImage {
                            namespace: CRI_NS.into(),
                            name,
                        })?;
                    }
                    if node.container_state(id)? != "CONTAINER_RUNNING" {
                        return Err(format!(
                            "{} CRI container {id} is not running after `ctr task checkpoint`",
                            h.name()
                        ));
                    }
                    wait_memory(
                        &format!("{} CRI container", h.name()),
                        node.container_pid(id)?,
                    )?;
                    let size = procfs::du(&images);
                    cleanup.remove(&Item::Dir(images))?;
                    (t.elapsed, Some(size))
                }
                Dump::ContentStore(h) => {
                    let id = &w.ctr[h as usize];
                    let name = format!("{BENCH_NS}/checkpoint-{}:{i}", h.name());
                    let image = Item::CtrImage {
                        namespace: BENCH_NS.into(),
                        name: name.clone(),
                    };
                    cleanup.add(image.clone());
                    let t = node
                        .ctr(BENCH_NS, ["container", "checkpoint", "--task", id, &name])
                        .timeout(LONG)
                        .run()?;
                    check_task(node, &format!("{} ctr container", h.name()), id)?;
                    if let Some(old) = store_refs[h as usize].replace(name) {
                        cleanup.remove(&Item::CtrImage {
                            namespace: BENCH_NS.into(),
                            name: old,
                        })?;
                    }
                    (t.elapsed, None)
                }
            };
            dumps[k].push(seconds.as_secs_f64());
            sizes[k] = size.or(sizes[k]);
            eprintln!("[{i}] {}: {:.3}s", d.label(), seconds.as_secs_f64());
        }
    }

    // Restores: the originals go first (same pids for raw CRIU, same cgroups for ctr's).
    cleanup.remove(&Item::Group(w.raw))?;
    for id in &w.ctr {
        cleanup.remove(&Item::CtrContainer(id.clone()))?;
    }
    let raw_images = raw_images.ok_or("no raw CRIU images")?;
    let mut restores: Vec<Vec<f64>> = vec![Vec::new(); Restore::ALL.len()];
    for i in 0..n {
        for k in (0..Restore::ALL.len()).map(|j| (i + j) % Restore::ALL.len()) {
            let r = Restore::ALL[k];
            sync()?;
            let seconds = match r {
                Restore::RawCriu => {
                    let log = format!("restore-{i}.log");
                    cleanup.add(Item::Group(w.raw));
                    let t = node
                        .criu(["restore", "--restore-detached", "-o", &log, "-v2", "-D"])
                        .arg(&raw_images)
                        .timeout(LONG)
                        .run()
                        .map_err(|e| with_log(e, &raw_images.join(&log)))?;
                    wait_memory("restored raw workload", w.raw)?;
                    cleanup.remove(&Item::Group(w.raw))?;
                    t.elapsed
                }
                Restore::ContentStore(h) => {
                    let id = format!("{}-{}-restored-{i}", w.ctr[h as usize], h.name());
                    let name = store_refs[h as usize]
                        .as_deref()
                        .ok_or("no checkpoint image")?;
                    cleanup.add(Item::CtrContainer(id.clone()));
                    let t = node
                        .ctr(BENCH_NS, ["container", "restore", "--live", &id, name])
                        .timeout(LONG)
                        .run()?;
                    check_task(node, &format!("restored {} ctr container", h.name()), &id)?;
                    cleanup.remove(&Item::CtrContainer(id))?;
                    t.elapsed
                }
            };
            restores[k].push(seconds.as_secs_f64());
            eprintln!("[{i}] {}: {:.3}s", r.label(), seconds.as_secs_f64());
        }
    }
    drop(cleanup);
    print_report(n, &dumps, &sizes, &restores, &notes);
    Ok(())
}

fn start_workloads(node: &Node, cleanup: &mut Cleanup, dir: &Path) -> Result<Workloads, String> {
    let me = std::process::id();
    let raw = start_raw(cleanup, dir, "raw", &workload("/bin/busybox "))?;

    let script = workload("");
    let mut cri = Vec::new();
    node.crictl(["pull", BUSYBOX_CRI]).run()?;
    for h in [Handler::Podsnap, Handler::Runc] {
        let name = format!("ckpt-{}-{me}", h.name());
        let (pod, config) = node.run_pod(cleanup, h, &name, dir)?;
        let id = node.create_container(&pod, &config, "dd", &["sh", "-c", &script])?;
        cleanup.add_final(Item::Cgroup(format!("{CRI_NS}/{id}")));
        node.crictl(["start", &id]).run()?;
        cri.push(id);
    }

    cleanup.add(Item::BenchNamespace);
    cleanup.add(Item::CtrImage {
        namespace: BENCH_NS.into(),
        name: BUSYBOX_CTR.into(),
    });
    node.ctr(BENCH_NS, ["image", "pull", "--plain-http", BUSYBOX_CTR])
        .timeout(Duration::from_secs(120))
        .run()?;
    let mut ctr = Vec::new();
    for h in [Handler::Podsnap, Handler::Runc] {
        let id = format!("ckpt-{}-{me}", h.name());
        // Restored containers keep the original's cgroup path.
        cleanup.add_final(Item::Cgroup(format!("{BENCH_NS}/{id}")));
        cleanup.add(Item::CtrContainer(id.clone()));
        let mut cmd = node.ctr(
            BENCH_NS,
            ["run", "-d", "--null-io", "--runtime", h.runtime_type()],
        );
        if h == Handler::Runc {
            cmd = cmd.arg("--runc-root").arg(node.runc_root());
        }
        cmd.args([BUSYBOX_CTR, &id, "sh", "-c", &script]).run()?;
        ctr.push(id);
    }

    wait_memory("raw workload", raw)?;
    for (h, id) in [Handler::Podsnap, Handler::Runc].iter().zip(&cri) {
        wait_memory(
            &format!("{} CRI container", h.name()),
            node.container_pid(id)?,
        )?;
    }
    for (h, id) in [Handler::Podsnap, Handler::Runc].iter().zip(&ctr) {
        check_task(node, &format!("{} ctr container", h.name()), id)?;
    }
    let [c0, c1] = <[String; 2]>::try_from(cri).map_err(|_| "two CRI containers")?;
    let [t0, t1] = <[String; 2]>::try_from(ctr).map_err(|_| "two ctr containers")?;
    Ok(Workloads {
        raw,
        cri: [c0, c1],
        ctr: [t0, t1],
    })
}

/// Starts raw CRIU's workload: busybox `sh -c` running `command` in a session of its own (so
/// no --shell-job), stdio /dev/null, cwd `dir`; registered with `cleanup` as a process group.
/// Returns the shell's pid (= the session and the process group; `command` may `exec`).
pub fn start_raw(
    cleanup: &mut Cleanup,
    dir: &Path,
    name: &str,
    command: &str,
) -> Result<u32, String> {
    let pidfile = dir.join(format!("{name}.pid"));
    let script = format!("echo $$ > {}; {command}", pidfile.display());
    let status = Command::new("setsid")
        .args(["-f", "/bin/busybox", "sh", "-c", &script])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run setsid: {e}"))?;
    if !status.success() {
        return Err(format!("setsid -f /bin/busybox sh -c ...: {status}"));
    }
    let pid = wait_for(
        &format!("{name} workload's pid file"),
        Duration::from_secs(10),
        || {
            Ok(std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok()))
        },
    )?;
    cleanup.add(Item::Group(pid));
    Ok(pid)
}

/// Raw `criu dump --leave-running` of the tree of `pid` into `images` (which exists); the
/// error carries the end of CRIU's log.
pub fn raw_dump(node: &Node, pid: u32, images: &Path) -> Result<crate::run::Done, String> {
    node.criu(["dump", "-t", &pid.to_string(), "--leave-running"])
        .args(["-o", "dump.log", "-v2", "-D"])
        .arg(images)
        .timeout(LONG)
        .run()
        .map_err(|e| with_log(e, &images.join("dump.log")))
}

/// Writes dirty pages back, untimed.
pub fn sync() -> Result<(), String> {
    Cmd::new("sync").timeout(LONG).run().map(|_| ())
}

/// Waits until the tree under `root` holds 1 GiB of anonymous memory.
fn wait_memory(what: &str, root: u32) -> Result<(), String> {
    wait_for(
        &format!("{what} (pid {root}) to hold 1 GiB of anonymous memory"),
        FILL,
        || Ok((procfs::tree_rss_anon_kib(root) >= GIB_KIB).then_some(())),
    )
}

/// Fails unless a ctr task runs and holds the workload's memory.
fn check_task(node: &Node, what: &str, id: &str) -> Result<(), String> {
    let (pid, status) = node.task(BENCH_NS, id)?;
    if status != "RUNNING" {
        return Err(format!("{what} {id}: task is {status}, want RUNNING"));
    }
    wait_memory(what, pid)
}

/// Checkpoint images containerd's client made for container `id` in the CRI namespace.
pub fn client_images(node: &Node, id: &str) -> Result<Vec<String>, String> {
    let prefix = format!("containerd.io/checkpoint/{id}:");
    let out = node.ctr(CRI_NS, ["images", "ls", "-q"]).run()?;
    Ok(out
        .stdout
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_string)
        .collect())
}

/// `error` with the end of a CRIU log.
pub(crate) fn with_log(error: String, log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    format!("{error}\n--- {} ---\n{tail}", log.display())
}

fn print_report(
    n: usize,
    dumps: &[Vec<f64>],
    sizes: &[Option<u64>],
    restores: &[Vec<f64>],
    notes: &[String],
) {
    println!(
        "\ncheckpoint of a container holding 1 GiB of anonymous memory, leave running, \
         {n} runs each, seconds"
    );
    let mut t = Table::new(1, &["method", "median", "min", "max", "images"]);
    for (k, d) in Dump::ALL.iter().enumerate() {
        let size = sizes[k].map_or("-".to_string(), |b| {
            format!("{:.2} GiB", b as f64 / f64::from(1 << 30))
        });
        t.row(vec![
            d.label(),
            secs(median(&dumps[k])),
            secs(min(&dumps[k])),
            secs(max(&dumps[k])),
            size,
        ]);
    }
    print!("{}", t.render());
    println!("\nrestore of those checkpoints, {n} runs each, seconds");
    let mut t = Table::new(1, &["method", "median", "min", "max"]);
    for (k, r) in Restore::ALL.iter().enumerate() {
        t.row(vec![
            r.label(),
            secs(median(&restores[k])),
            secs(min(&restores[k])),
            secs(max(&restores[k])),
        ]);
    }
    print!("{}", t.render());

    let m = |v: &Vec<f64>| median(v);
    let (raw, p_path, r_path, p_store, r_store) = (
        m(&dumps[0]),
        m(&dumps[1]),
        m(&dumps[2]),
        m(&dumps[3]),
        m(&dumps[4]),
    );
    let (raw_r, p_r, r_r) = (m(&restores[0]), m(&restores[1]), m(&restores[2]));
    println!();
    for line in [
        ratio(
            "checkpoint podsnap(image path)/raw-criu",
            p_path,
            raw,
            Some(1.2),
        ),
        ratio(
            "checkpoint podsnap(content store)/raw-criu",
            p_store,
            raw,
            Some(1.2),
        ),
        ratio(
            "checkpoint podsnap/runc (image path, both)",
            p_path,
            r_path,
            Some(0.25),
        ),
        ratio(
            "checkpoint podsnap/runc (content store, both)",
            p_store,
            r_store,
            Some(0.25),
        ),
        ratio(
            "checkpoint podsnap(image path)/runc(content store)",
            p_path,
            r_store,
            Some(0.25),
        ),
        ratio(
            "restore podsnap(content store)/raw-criu",
            p_r,
            raw_r,
            Some(1.2),
        ),
        ratio("restore podsnap/runc (content store, both)", p_r, r_r, None),
    ] {
        println!("{line}");
    }
    for note in notes {
        println!("note: {note}");
    }
}

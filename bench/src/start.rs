//! `podsnap-bench start`: pod start latency and shim memory per pod, podsnap vs runc.
//!
//! Latency: `crictl runp` + `create` + `start` of a busybox `sleep` until CRI reports the
//! container running. Memory: RSS and PSS (smaps_rollup) of every shim process whose command
//! line has `-id <sandbox id>`: podsnap's shim and its zygote, or containerd-shim-runc-v2. The
//! handlers alternate every iteration (podsnap first on even ones) so drift hits both alike.
//! Memory is read twice: just after the start, and once every pod ran idle for longer than
//! podsnap's zygote stays without work (it then exits, and a later create or exec spawns it
//! again); the pods stay until then.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use crate::node::{BUSYBOX_CRI, Cleanup, Handler, Item, Node};
use crate::procfs::{self, ShimProcess};
use crate::report::{Table, max, median, mib, min, ratio, secs};
use crate::run::wait_for;

/// Time the shims get to settle before their memory is read.
const SETTLE: Duration = Duration::from_millis(500);

/// How long every pod runs idle before its memory is read again: longer than podsnap's zygote
/// stays without work (30 s, `shim/src/zygote.rs`).
const IDLE: Duration = Duration::from_secs(36);

struct Sample {
    seconds: f64,
    pod: String,
    shims: Vec<ShimProcess>,
    /// Read again after [`IDLE`].
    idle_shims: Vec<ShimProcess>,
}

pub fn run(node: &Node, n: usize) -> Result<(), String> {
    let shim = node.check()?;
    let mut cleanup = Cleanup::new(node);
    let dir = crate::work_dir(&mut cleanup)?;
    node.crictl(["pull", BUSYBOX_CRI]).run()?;
    println!(
        "podsnap-bench start: N={n}, podsnap shim {}",
        shim.display()
    );
    // The first pod of a handler pays for cold caches: one of each, not counted.
    for h in [Handler::Podsnap, Handler::Runc] {
        start_pod(node, &mut cleanup, h, &dir, "warmup")?;
    }
    let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    for i in 0..n {
        let order = match i % 2 {
            0 => [Handler::Podsnap, Handler::Runc],
            _ => [Handler::Runc, Handler::Podsnap],
        };
        for h in order {
            let s = start_pod(node, &mut cleanup, h, &dir, &i.to_string())?;
            samples[h as usize].push(s);
        }
    }
    println!("waiting {IDLE:?} for every pod to run idle");
    thread::sleep(IDLE);
    for s in samples.iter_mut().flatten() {
        s.idle_shims = procfs::shim_processes(&s.pod)?;
    }
    for s in samples.iter().flatten() {
        cleanup.remove(&Item::Pod(s.pod.clone()))?;
    }
    drop(cleanup);
    print_report(n, &samples);
    Ok(())
}

/// Starts a pod with one container on `h` and measures it; the pod stays.
fn start_pod(
    node: &Node,
    cleanup: &mut Cleanup,
    h: Handler,
    dir: &Path,
    tag: &str,
) -> Result<Sample, String> {
    let name = format!("start-{}-{tag}-{}", h.name(), std::process::id());
    let t0 = Instant::now();
    let (pod, config) = node.run_pod(cleanup, h, &name, dir)?;
    let ctr = node.create_container(&pod, &config, "sleeper", &["sleep", "3600"])?;
    node.crictl(["start", &ctr]).run()?;
    wait_for(
        &format!("container {ctr} to run"),
        Duration::from_secs(30),
        || Ok((node.container_state(&ctr)? == "CONTAINER_RUNNING").then_some(())),
    )?;
    let seconds = t0.elapsed().as_secs_f64();
    thread::sleep(SETTLE);
    let shims = procfs::shim_processes(&pod)?;
    if shims.is_empty() {
        return Err(format!(
            "pod {pod} ({}): no containerd-shim-* process has `-id {pod}`",
            h.name()
        ));
    }
    Ok(Sample {
        seconds,
        pod,
        shims,
        idle_shims: Vec::new(),
    })
}

fn print_report(n: usize, samples: &[Vec<Sample>; 2]) {
    let handlers = [Handler::Podsnap, Handler::Runc];
    println!(
        "\npod start latency (runp + create + start until running), {n} pods per handler, seconds"
    );
    let mut t = Table::new(1, &["handler", "median", "min", "max"]);
    let mut latency = [0.0; 2];
    for h in handlers {
        let s: Vec<f64> = samples[h as usize].iter().map(|s| s.seconds).collect();
        latency[h as usize] = median(&s);
        t.row(vec![
            h.name().into(),
            secs(median(&s)),
            secs(min(&s)),
            secs(max(&s)),
        ]);
    }
    print!("{}", t.render());

    let started = memory_table(
        &format!(
            "shim memory per pod just after its start (processes with `-id <sandbox id>`), \
             median of {n} pods, MiB (PSS shares pages among all shims of a kind on the node)"
        ),
        samples,
        |s| &s.shims,
    );
    let idle = memory_table(
        &format!(
            "the same after {IDLE:?} idle (podsnap's zygote exits when it has nothing to do), \
             MiB"
        ),
        samples,
        |s| &s.idle_shims,
    );
    let (p, r) = (Handler::Podsnap as usize, Handler::Runc as usize);
    println!();
    println!(
        "{}",
        ratio(
            "podsnap/runc start latency",
            latency[p],
            latency[r],
            Some(1.0)
        )
    );
    println!(
        "{}",
        ratio(
            "podsnap/runc shim RSS per pod, just started",
            started[p].0,
            started[r].0,
            None
        )
    );
    println!(
        "{}",
        ratio(
            "podsnap/runc shim RSS per pod, idle",
            idle[p].0,
            idle[r].0,
            Some(0.5)
        )
    );
    println!(
        "{}",
        ratio(
            "podsnap/runc shim PSS per pod, idle",
            idle[p].1,
            idle[r].1,
            None
        )
    );
}

/// Prints the memory of each handler's shim processes, by process and in total; returns the
/// totals (RSS, PSS) by handler.
fn memory_table(
    title: &str,
    samples: &[Vec<Sample>; 2],
    shims: fn(&Sample) -> &Vec<ShimProcess>,
) -> [(f64, f64); 2] {
    println!("\n{title}");
    let mut t = Table::new(2, &["handler", "process", "RSS", "PSS"]);
    let mut total = [(0.0, 0.0); 2];
    for h in [Handler::Podsnap, Handler::Runc] {
        let runs = &samples[h as usize];
        // Processes by comm, in pid order (shim before zygote).
        let mut comms: Vec<String> = Vec::new();
        for p in runs.iter().flat_map(shims) {
            if !comms.contains(&p.comm) {
                comms.push(p.comm.clone());
            }
        }
        for comm in &comms {
            let of = |f: fn(&ShimProcess) -> u64| -> Vec<f64> {
                let sum = |s: &Sample| {
                    shims(s)
                        .iter()
                        .filter(|p| &p.comm == comm)
                        .map(f)
                        .sum::<u64>()
                };
                runs.iter().map(|s| sum(s) as f64).collect()
            };
            t.row(vec![
                h.name().into(),
                comm.clone(),
                mib(median(&of(|p| p.rss_kib))),
                mib(median(&of(|p| p.pss_kib))),
            ]);
        }
        let sum = |f: fn(&ShimProcess) -> u64| -> Vec<f64> {
            runs.iter()
                .map(|s| shims(s).iter().map(f).sum::<u64>() as f64)
                .collect()
        };
        let count = runs.iter().map(|s| shims(s).len()).max().unwrap_or(0);
        total[h as usize] = (median(&sum(|p| p.rss_kib)), median(&sum(|p| p.pss_kib)));
        t.row(vec![
            h.name().into(),
            format!(
                "total ({count} process{})",
                if count == 1 { "" } else { "es" }
            ),
            mib(total[h as usize].0),
            mib(total[h as usize].1),
        ]);
    }
    print!("{}", t.render());
    total
}

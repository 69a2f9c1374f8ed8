//! podsnap benchmarks against containerd's runc shim and raw CRIU, on the test node that
//! hack/node-up.sh starts (hack/bench.sh builds everything in release and runs them). Each
//! prints its table and RATIO lines, podsnap vs the stock alternative measured in the same run;
//! targets are reported, never asserted. Everything a run creates is removed again, by id.

mod checkpoint;
mod criu_stats;
mod node;
mod pod;
mod procfs;
mod registry;
mod report;
mod run;
mod start;

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::ExitCode;

use node::{Cleanup, Item, Node};

const USAGE: &str = "usage: podsnap-bench start [N]       pod start latency and shim memory per pod, podsnap vs runc (N=10)
       podsnap-bench checkpoint [N]  checkpoint/restore of a container holding 1 GiB: podsnap vs raw CRIU vs runc (N=3)
       podsnap-bench pod [N]         pod checkpoint/restore through podsnapd: 4 x 256 MiB pod vs 4 sequential
                                     container checkpoints, freeze window, restore; 1 GiB pod vs raw CRIU (N=3)
       podsnap-bench registry [N]    a 1 GiB pod checkpoint pushed to and pulled from a registry by the CLI vs
                                     skopeo copy of the same blobs both ways; zstd levels 1/3/9 (N=3)

Runs as root against the node of hack/node-up.sh (PODSNAP_BIN, PODSNAP_NODE_RUN, CONTAINERD_SOCK as
in hack/lib.sh); work files go under $PODSNAP_BENCH_DIR (default /var/tmp). `pod` also needs podsnapd
(node-up starts it) and the podsnap CLI ($PODSNAP_CLI, default `podsnap` next to this binary), and gcc;
`registry` also docker-registry and skopeo.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let count = |default: usize| -> Result<usize, String> {
        match args.get(1) {
            None => Ok(default),
            Some(n) => n
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or(format!("N must be a positive number, not {n:?}")),
        }
    };
    let node = Node::from_env();
    let result = match (args.first().map(String::as_str), args.len()) {
        (Some("start"), 1 | 2) => count(10).and_then(|n| start::run(&node, n)),
        (Some("checkpoint"), 1 | 2) => count(3).and_then(|n| checkpoint::run(&node, n)),
        (Some("pod"), 1 | 2) => count(3).and_then(|n| pod::run(&node, n)),
        (Some("registry"), 1 | 2) => count(3).and_then(|n| registry::run(&node, n)),
        (Some("-h" | "--help" | "help"), _) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podsnap-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A fresh directory of this run (mode 0700: checkpoints hold memory), removed with `cleanup`.
fn work_dir(cleanup: &mut Cleanup) -> Result<PathBuf, String> {
    let base = std::env::var("PODSNAP_BENCH_DIR").unwrap_or("/var/tmp".into());
    let dir = PathBuf::from(base).join(format!("podsnap-bench.{}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| format!("create {}: {e}", dir.display()))?;
    cleanup.add(Item::Dir(dir.clone()));
    Ok(dir)
}

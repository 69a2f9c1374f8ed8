//! `containerd-shim-podsnap-v2`: the containerd shim v2 (task API v3) of podsnap.
//!
//! One shim process serves every container of one pod. Containers are created with youki's
//! `libcontainer`; because cloning from a multi-threaded process can deadlock, the shim forks a
//! single-threaded [`zygote`] before the async runtime starts, and every clone happens there.
//! The shim itself is the subreaper of every container process and reaps them.
//!
//! # Module map
//!
//! | module | what it does |
//! |---|---|
//! | [`service`] | the shim's entry points for containerd: start/delete of the shim, the Task service and the pod socket, event publishing, exit monitoring |
//! | [`task`] | the Task API (create, start, state, kill, delete, exec, pause, resume, update, wait, stats, checkpoint): what may happen in which state, with which error, and the locks (see `PodTask`) |
//! | [`container`] | one container's lifecycle mechanics: rootfs mount, create through the zygote, start, restore from a checkpoint at start, exec, destroy |
//! | [`error`] | the one error type of requests and its mapping to ttrpc and pod-socket codes |
//! | [`zygote`] | the single-threaded fork that runs every libcontainer clone, and relays its logs |
//! | [`idmap`], [`mount_sources`] | user-namespace pods: idmapped rootfs layers and bind mounts, bind sources the namespace's root can reach |
//! | [`cgroup`], [`oom`] | a container's cgroup (v1 and v2): freeze, update, pids, metrics; OOM events |
//! | [`stdio`] | FIFOs and terminals between containerd and the container |
//! | [`checkpoint`] | one container with CRIU: `mounts` (what is external), `dump`, `restore`; `page_check` and `mapped_digest` verify the page images while CRIU reads them, `lazy` serves them on demand |
//! | [`pod_checkpoint`] | the pod socket: freeze the pod, dump its containers in parallel, capture volumes, thaw |
//! | [`thaw_guard`] | the guard process and watchdog that thaw a pod whatever happens to the shim |
//! | [`rootfs_diff`], [`volumes`] | the writable layer and emptyDir volumes: captured and unpacked through directory descriptors |
//! | [`restore_policy`] | what a checkpoint may not make a restore do: credentials and mounts checked against the new spec |
//! | [`tmpfs_archives`] | CRIU's tmpfs archives (a container's `/dev`): no device the new spec does not give, no name leaving the tmpfs |
//! | [`scratch`] | a restore's expanded page images, removed when their shim no longer runs |
//! | [`info`] | the runtime's features for containerd (`containerd-shim-podsnap-v2 -info`) |
//!
//! The format of what is written (CRIU images aside) belongs to `podsnap-checkpoint-format`.

mod cgroup;
mod checkpoint;
mod container;
mod error;
mod idmap;
mod info;
mod mount_sources;
mod oom;
mod pod_checkpoint;
mod restore_policy;
mod rootfs_diff;
mod scratch;
mod service;
mod stdio;
mod task;
mod thaw_guard;
mod tmpfs_archives;
mod volumes;
mod zygote;

/// The runtime type containerd knows this shim by (`io.containerd.podsnap.v2`).
pub const RUNTIME_ID: &str = "io.containerd.podsnap.v2";

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == thaw_guard::GUARD_ARG) {
        thaw_guard::run_guard();
    }
    if args.get(1).is_some_and(|a| a == zygote::ZYGOTE_ARG) {
        zygote::run_spawned();
    }
    let serving = match containerd_shim::parse(&args[1..]) {
        Ok(flags) => flags.action.is_empty() && !flags.info && !flags.version,
        Err(_) => false,
    };
    if serving {
        // Must happen before any thread exists: the zygote is a fork of this process.
        if let Err(err) = zygote::start() {
            eprintln!("{RUNTIME_ID}: failed to start the zygote: {err:#}");
            std::process::exit(1);
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build the tokio runtime");
    runtime.block_on(containerd_shim::asynchronous::run::<service::Service>(
        RUNTIME_ID, None,
    ));
}

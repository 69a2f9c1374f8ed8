//! `containerd-shim-podsnap-v2`: the containerd shim v2 (task API v3) of podsnap.
//!
//! One shim process serves every container of one pod. Containers are created with youki's
//! `libcontainer`; because cloning from a multi-threaded process can deadlock, the shim forks a
//! single-threaded [`zygote`] before the async runtime starts, and every clone happens there.
//! The shim itself is the subreaper of every container process and reaps them.

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
mod service;
mod stdio;
mod task;
mod thaw_guard;
mod volumes;
mod zygote;

/// The runtime type containerd knows this shim by (`io.containerd.podsnap.v2`).
pub const RUNTIME_ID: &str = "io.containerd.podsnap.v2";

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == thaw_guard::GUARD_ARG) {
        thaw_guard::run_guard();
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

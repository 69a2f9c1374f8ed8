//! Harness for podsnap's end-to-end tests: they drive the real node (containerd 2.x with the
//! CRI plugin, our shim, CNI) from outside, through the `crictl` and `ctr` binaries, as a user
//! or the kubelet would.
//!
//! The node is started by `hack/node-up.sh` and the shim built by the test script; this crate
//! builds and starts nothing, and fails (never skips) when the node is not there. Every external
//! command runs with a deadline and no stdin ([`command`]), every wait has a deadline
//! ([`poll`]), every pod and ctr container is removed when its test ends ([`pod::Pod`],
//! [`task::CtrContainer`]), and removal is checked to leave nothing behind ([`leaks`]).
//!
//! Environment: `PODSNAP_CACHE` (where `bin/crictl` and `bin/ctr` are; default
//! `/var/cache/podsnap`) and `PODSNAP_NODE_RUN` (the node's runtime state; default
//! `/run/podsnap-node`), as for the `hack/` scripts.

#![forbid(unsafe_code)]

pub mod cluster;
pub mod command;
pub mod cri_workspace;
pub mod fixtures;
pub mod leaks;
pub mod node;
pub mod pod;
pub mod poll;
pub mod task;

pub use command::{CommandLine, Finished, shell_quote};
pub use leaks::{Footprint, assert_nothing_left, serving_shim, shim_processes};
pub use node::{BUSYBOX, CRI_NAMESPACE, CTR_NAMESPACE, Handler, Node};
pub use pod::{ContainerConfig, ExecOutcome, Pod};
pub use poll::wait_for;
pub use task::CtrContainer;

//! podsnapd, the node daemon of podsnap: the CRI server that kubelet and crictl use as their
//! runtime and image endpoint. It serves `CheckpointPod` and `RestorePod` itself and forwards
//! every other CRI call to containerd as raw HTTP/2, so nothing a newer kubelet sends is lost.
//!
//! Modules: `server` (socket, connections, routing, shutdown), `route` (which calls stay),
//! `forward` (the raw proxy to containerd), `pod_rpc` (the pod RPCs' gRPC side and the
//! [`PodCheckpointer`] trait), `pod` (what they do), `deadline` (`grpc-timeout`), `socket`,
//! `security` (a restore's security settings against the checkpoint's; manifest pins are
//! [`podsnap_checkpoint_format::pins`]), `in_flight` (one call per sandbox and checkpoint directory).

mod checkpoint_pod;
mod deadline;
mod forward;
pub mod in_flight;
pub mod pod;
mod pod_options;
mod pod_rpc;
mod restore_pod;
mod route;
mod security;
mod server;
mod socket;

pub use pod_rpc::PodCheckpointer;
pub use server::{CriRouter, ServeError, ServerConfig, run};
pub use socket::SocketError;

/// Where podsnapd listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "/run/podsnap-node/podsnapd.sock";
/// containerd's CRI socket on the podsnap test node (`hack/node-up.sh`).
pub const DEFAULT_CONTAINERD: &str = "/run/podsnap-node/containerd/containerd.sock";

//! Which CRI calls podsnapd answers itself and which go to containerd: decided by the HTTP/2
//! request's path alone, before any byte of the body is read.
//!
//! Only `RuntimeService/CheckpointPod` and `RuntimeService/RestorePod` stay here; everything
//! else, including methods newer than this build knows, is containerd's.

use cri_api::paths;

/// Where one call goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `CheckpointPod` or `RestorePod`: served by podsnapd.
    Pod(PodRpc),
    /// Any other path: forwarded to containerd as is.
    Containerd,
}

/// The CRI RPCs podsnapd implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodRpc {
    CheckpointPod,
    RestorePod,
}

impl PodRpc {
    /// The RPC's method name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            PodRpc::CheckpointPod => "CheckpointPod",
            PodRpc::RestorePod => "RestorePod",
        }
    }
}

/// The route of a request whose URI path is `path`. Exact match, as gRPC paths are
/// case-sensitive and carry no query.
pub fn route(path: &str) -> Route {
    match path {
        paths::CHECKPOINT_POD => Route::Pod(PodRpc::CheckpointPod),
        paths::RESTORE_POD => Route::Pod(PodRpc::RestorePod),
        _ => Route::Containerd,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_checkpoint_and_restore_are_served_here() {
        assert_eq!(
            route("/runtime.v1.RuntimeService/CheckpointPod"),
            Route::Pod(PodRpc::CheckpointPod)
        );
        assert_eq!(
            route("/runtime.v1.RuntimeService/RestorePod"),
            Route::Pod(PodRpc::RestorePod)
        );
    }

    #[test]
    fn every_other_path_goes_to_containerd() {
        for path in [
            "/runtime.v1.RuntimeService/Version",
            "/runtime.v1.RuntimeService/CheckpointContainer",
            "/runtime.v1.RuntimeService/GetContainerEvents",
            "/runtime.v1.ImageService/PullImage",
            // A method or service this build does not know (a newer kubelet's) still passes.
            "/runtime.v1.RuntimeService/SomeFutureRpc",
            "/runtime.v2.RuntimeService/CheckpointPod",
            "/runtime.v1.ImageService/CheckpointPod",
            "/runtime.v1.RuntimeService/checkpointpod",
            "/runtime.v1.RuntimeService/CheckpointPod/",
            "/grpc.health.v1.Health/Check",
            "/",
            "",
        ] {
            assert_eq!(route(path), Route::Containerd, "{path:?}");
        }
    }
}

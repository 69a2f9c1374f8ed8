//! Pod checkpoint and restore on this node: what podsnapd does for CRI `CheckpointPod` and
//! `RestorePod` (validating requests, finding the pod and its containers through containerd's
//! CRI, driving the shim's pod-level service, the node-local checkpoint store).
//!
//! Not here: gRPC decoding, deadlines and logging of the calls (`pod_rpc`), and every other CRI
//! call (forwarded to containerd by `forward`).
//!
//! For now both RPCs answer `Unimplemented`.

use std::time::Instant;

use cri_api::RuntimeServiceClient;
use cri_api::v1::{
    CheckpointPodRequest, CheckpointPodResponse, RestorePodRequest, RestorePodResponse,
};
use tonic::Status;
use tonic::transport::Channel;

use crate::pod_rpc::PodCheckpointer;

/// podsnapd's [`PodCheckpointer`].
#[derive(Debug, Clone)]
pub struct PodCheckpointService {
    /// containerd's CRI (`RuntimeService`), for looking up sandboxes and containers.
    containerd: RuntimeServiceClient<Channel>,
}

impl PodCheckpointService {
    /// The service, looking pods up through `containerd`.
    pub fn new(containerd: RuntimeServiceClient<Channel>) -> Self {
        Self { containerd }
    }

    /// containerd's CRI client (cheap to clone: one shared connection).
    pub fn containerd(&self) -> RuntimeServiceClient<Channel> {
        self.containerd.clone()
    }
}

#[tonic::async_trait]
impl PodCheckpointer for PodCheckpointService {
    async fn checkpoint_pod(
        &self,
        _request: CheckpointPodRequest,
        _deadline: Option<Instant>,
    ) -> Result<CheckpointPodResponse, Status> {
        Err(Status::unimplemented(
            "podsnapd: CheckpointPod is not implemented yet",
        ))
    }

    async fn restore_pod(
        &self,
        _request: RestorePodRequest,
        _deadline: Option<Instant>,
    ) -> Result<RestorePodResponse, Status> {
        Err(Status::unimplemented(
            "podsnapd: RestorePod is not implemented yet",
        ))
    }
}

//! Pod checkpoint and restore on this node: what podsnapd does for CRI `CheckpointPod` and
//! `RestorePod` (validating requests, finding the pod and its containers through containerd's
//! CRI, driving the shim's pod-level service, the node-local checkpoint store).
//!
//! Not here: gRPC decoding, deadlines and logging of the calls (`pod_rpc`), and every other CRI
//! call (forwarded to containerd by `forward`).
//!
//! The work itself is in `checkpoint_pod` and `restore_pod`; options in `pod_options`.

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
        request: CheckpointPodRequest,
        deadline: Option<Instant>,
    ) -> Result<CheckpointPodResponse, Status> {
        crate::checkpoint_pod::checkpoint_pod(self.containerd(), request, deadline).await
    }

    async fn restore_pod(
        &self,
        request: RestorePodRequest,
        deadline: Option<Instant>,
    ) -> Result<RestorePodResponse, Status> {
        crate::restore_pod::restore_pod(self.containerd(), request, deadline).await
    }
}

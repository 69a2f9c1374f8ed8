//! The two CRI RPCs podsnapd serves itself, `CheckpointPod` and `RestorePod`: the
//! [`PodCheckpointer`] trait that does the work, and the tonic-generated `RuntimeService`
//! server that decodes the calls, hands each to it with the caller's deadline, and logs it.
//!
//! What checkpointing and restoring a pod means lives behind the trait (`pod.rs`); this module
//! owns only the gRPC side. Every other `RuntimeService` method of the generated server keeps its
//! `Unimplemented` stub: routing never sends those here.

use std::sync::Arc;
use std::time::Instant;

use cri_api::v1::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use cri_api::v1::{
    CheckpointPodRequest, CheckpointPodResponse, RestorePodRequest, RestorePodResponse,
};
use tonic::{Request, Response, Status};

use crate::deadline::CallDeadline;

/// Checkpoints and restores pods for `CheckpointPod` and `RestorePod`, as
/// `k8s.io/cri-api` v0.37's comments on them specify.
///
/// `deadline` is the caller's (from `grpc-timeout`), `None` when it set none. podsnapd does not
/// cut a call off at its deadline: an implementation must itself stop in time and still leave no
/// frozen pod and no partial checkpoint or sandbox behind.
#[tonic::async_trait]
pub trait PodCheckpointer: Send + Sync + 'static {
    /// `RuntimeService.CheckpointPod`.
    async fn checkpoint_pod(
        &self,
        request: CheckpointPodRequest,
        deadline: Option<Instant>,
    ) -> Result<CheckpointPodResponse, Status>;

    /// `RuntimeService.RestorePod`.
    async fn restore_pod(
        &self,
        request: RestorePodRequest,
        deadline: Option<Instant>,
    ) -> Result<RestorePodResponse, Status>;
}

/// The tonic server for the pod RPCs, backed by `checkpointer`.
pub fn pod_rpc_server(checkpointer: Arc<dyn PodCheckpointer>) -> RuntimeServiceServer<PodRpcs> {
    // RestorePod carries every container's config: allow what kubelet's CRI client allows.
    RuntimeServiceServer::new(PodRpcs { checkpointer })
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE)
}

/// kubelet's CRI message size limit (16 MiB).
const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// The generated `RuntimeService`, answering the pod RPCs through a [`PodCheckpointer`].
pub struct PodRpcs {
    checkpointer: Arc<dyn PodCheckpointer>,
}

fn deadline_of<T>(request: &Request<T>) -> Option<Instant> {
    request
        .extensions()
        .get::<CallDeadline>()
        .and_then(|deadline| deadline.0)
}

fn timeout_ms(deadline: Option<Instant>) -> Option<u128> {
    deadline.map(|deadline| {
        deadline
            .saturating_duration_since(Instant::now())
            .as_millis()
    })
}

/// Logs the outcome of one pod RPC.
fn log_outcome<T>(rpc: &str, started: Instant, result: &Result<T, Status>) {
    let elapsed_ms = started.elapsed().as_millis();
    match result {
        Ok(_) => tracing::info!(rpc, elapsed_ms, "done"),
        Err(status) => tracing::warn!(
            rpc,
            elapsed_ms,
            code = ?status.code(),
            message = status.message(),
            "failed"
        ),
    }
}

#[tonic::async_trait]
impl RuntimeService for PodRpcs {
    async fn checkpoint_pod(
        &self,
        request: Request<CheckpointPodRequest>,
    ) -> Result<Response<CheckpointPodResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let started = Instant::now();
        let span = tracing::info_span!(
            "CheckpointPod",
            pod = %request.pod_sandbox_id,
            output = %request.output_path,
        );
        span.in_scope(|| {
            tracing::info!(
                containers = ?request.container_ids,
                options = ?request.options,
                timeout_ms = timeout_ms(deadline),
                "checkpointing pod"
            )
        });
        let result = tracing::Instrument::instrument(
            self.checkpointer.checkpoint_pod(request, deadline),
            span.clone(),
        )
        .await;
        span.in_scope(|| log_outcome("CheckpointPod", started, &result));
        result.map(Response::new)
    }

    async fn restore_pod(
        &self,
        request: Request<RestorePodRequest>,
    ) -> Result<Response<RestorePodResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
        let started = Instant::now();
        let pod_name = request
            .config
            .as_ref()
            .and_then(|config| config.metadata.as_ref())
            .map(|metadata| format!("{}/{}", metadata.namespace, metadata.name))
            .unwrap_or_default();
        let span = tracing::info_span!(
            "RestorePod",
            pod = %pod_name,
            checkpoint = %request.checkpoint_path,
        );
        span.in_scope(|| {
            tracing::info!(
                handler = %request.runtime_handler,
                containers = request.container_configs.len(),
                options = ?request.options,
                timeout_ms = timeout_ms(deadline),
                "restoring pod"
            )
        });
        let result = tracing::Instrument::instrument(
            self.checkpointer.restore_pod(request, deadline),
            span.clone(),
        )
        .await;
        span.in_scope(|| {
            if let Ok(restored) = &result {
                tracing::info!(sandbox = %restored.pod_sandbox_id, "restored");
            }
            log_outcome("RestorePod", started, &result)
        });
        result.map(Response::new)
    }
}

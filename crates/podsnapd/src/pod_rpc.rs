//! The two CRI RPCs podsnapd serves itself, `CheckpointPod` and `RestorePod`: the
//! [`PodCheckpointer`] trait that does the work, and the tonic-generated `RuntimeService`
//! server that decodes the calls, hands each to it with the caller's deadline, and logs it.
//!
//! Each call runs as a task of its own, detached from the connection: a caller that goes away
//! (cancels, times out, disconnects) does not cancel work that may hold a pod frozen; the call
//! runs to its end and its answer is dropped. A checkpoint whose caller went away before it
//! ended is discarded (the output directory is emptied again): nobody will record or use it, and
//! the caller has already been told it failed. Shutdown waits for these tasks ([`PodCalls`]).
//!
//! What checkpointing and restoring a pod means lives behind the trait (`pod.rs`); this module
//! owns only the gRPC side. Every other `RuntimeService` method of the generated server keeps its
//! `Unimplemented` stub: routing never sends those here.

use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use cri_api::v1::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use cri_api::v1::{
    CheckpointPodRequest, CheckpointPodResponse, RestorePodRequest, RestorePodResponse,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::deadline::CallDeadline;

/// Checkpoints and restores pods for `CheckpointPod` and `RestorePod`, as
/// `k8s.io/cri-api` v0.37's comments on them specify.
///
/// `deadline` is the caller's (from `grpc-timeout`), `None` when it set none. podsnapd does not
/// cut a call off at its deadline, nor when the caller goes away, nor at shutdown: an
/// implementation must itself stop in time and still leave no frozen pod and no partial
/// checkpoint or sandbox behind.
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

/// The pod calls running now, for shutdown to wait on.
#[derive(Debug, Clone)]
pub struct PodCalls {
    running: Arc<watch::Sender<usize>>,
}

impl Default for PodCalls {
    fn default() -> Self {
        Self {
            running: Arc::new(watch::Sender::new(0)),
        }
    }
}

impl PodCalls {
    /// How many are running.
    pub fn running(&self) -> usize {
        *self.running.borrow()
    }

    /// Resolves once none is running.
    pub async fn finished(&self) {
        let mut running = self.running.subscribe();
        // The sender lives in `self`, so the channel cannot close while this waits.
        let _ = running.wait_for(|count| *count == 0).await;
    }

    /// Runs `call` as a detached task, counted until it ends. When the caller went away before
    /// a successful call ended, `abandoned` undoes what it made (the answer reaches nobody).
    async fn run<T: Send + 'static>(
        &self,
        call: impl Future<Output = Result<T, Status>> + Send + 'static,
        abandoned: impl FnOnce(&T) + Send + 'static,
    ) -> Result<T, Status> {
        let counted = CountedCall::start(&self.running);
        let caller = CallerPresence::default();
        let gone = caller.gone.clone();
        let task = tokio::spawn(async move {
            let result = call.await;
            if let Ok(made) = &result
                && gone.load(Ordering::SeqCst)
            {
                abandoned(made);
            }
            drop(counted);
            result
        });
        let result = task.await.unwrap_or_else(|err| {
            Err(Status::internal(format!(
                "podsnapd: the pod call's task failed: {err}"
            )))
        });
        caller.answered();
        result
    }
}

/// Marks the caller gone (`true`) when dropped before [`CallerPresence::answered`]: the
/// handler's future is dropped when the caller cancels, times out or disconnects.
#[derive(Default)]
struct CallerPresence {
    gone: Arc<AtomicBool>,
    answered: bool,
}

impl CallerPresence {
    fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for CallerPresence {
    fn drop(&mut self) {
        if !self.answered {
            self.gone.store(true, Ordering::SeqCst);
        }
    }
}

/// One running pod call in [`PodCalls`]' count, until dropped (also when the call panics).
struct CountedCall(Arc<watch::Sender<usize>>);

impl CountedCall {
    fn start(running: &Arc<watch::Sender<usize>>) -> Self {
        running.send_modify(|count| *count += 1);
        Self(running.clone())
    }
}

impl Drop for CountedCall {
    fn drop(&mut self) {
        self.0.send_modify(|count| *count -= 1);
    }
}

/// The tonic server for the pod RPCs, backed by `checkpointer`, counting its calls in `calls`.
pub fn pod_rpc_server(
    checkpointer: Arc<dyn PodCheckpointer>,
    calls: PodCalls,
) -> RuntimeServiceServer<PodRpcs> {
    // RestorePod carries every container's config: allow what kubelet's CRI client allows.
    RuntimeServiceServer::new(PodRpcs {
        checkpointer,
        calls,
    })
    .max_decoding_message_size(MAX_MESSAGE_SIZE)
    .max_encoding_message_size(MAX_MESSAGE_SIZE)
}

/// kubelet's CRI message size limit (16 MiB).
const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// The generated `RuntimeService`, answering the pod RPCs through a [`PodCheckpointer`].
pub struct PodRpcs {
    checkpointer: Arc<dyn PodCheckpointer>,
    calls: PodCalls,
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
        let checkpointer = self.checkpointer.clone();
        let output = PathBuf::from(&request.output_path);
        // Which directory the call was given: a caller that went away may have removed it and
        // made another of the same name since; that one is not this call's to empty.
        let given = std::fs::symlink_metadata(&output)
            .ok()
            .map(|meta| (meta.dev(), meta.ino()));
        let call = async move {
            let started = Instant::now();
            let result = checkpointer.checkpoint_pod(request, deadline).await;
            log_outcome("CheckpointPod", started, &result);
            result
        };
        let discard = {
            let span = span.clone();
            move |_: &CheckpointPodResponse| {
                let now = std::fs::symlink_metadata(&output)
                    .ok()
                    .map(|meta| (meta.dev(), meta.ino()));
                let _entered = span.enter();
                if given.is_none() || now != given {
                    tracing::warn!(
                        output = %output.display(),
                        "the caller went away before the checkpoint ended; its directory is gone or another"
                    );
                    return;
                }
                tracing::warn!(
                    output = %output.display(),
                    "the caller went away before the checkpoint ended: discarding it"
                );
                // Off the async workers: a checkpoint can be GiBs.
                tokio::task::spawn_blocking(move || crate::checkpoint_pod::empty_dir(&output));
            }
        };
        self.calls
            .run(call.instrument(span), discard)
            .await
            .map(Response::new)
    }

    async fn restore_pod(
        &self,
        request: Request<RestorePodRequest>,
    ) -> Result<Response<RestorePodResponse>, Status> {
        let deadline = deadline_of(&request);
        let request = request.into_inner();
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
        let checkpointer = self.checkpointer.clone();
        let call = async move {
            let started = Instant::now();
            let result = checkpointer.restore_pod(request, deadline).await;
            if let Ok(restored) = &result {
                tracing::info!(sandbox = %restored.pod_sandbox_id, "restored");
            }
            log_outcome("RestorePod", started, &result);
            result
        };
        // A restored sandbox whose caller went away is the kubelet's to find and remove (it
        // removes sandboxes of its pods that it does not know).
        self.calls
            .run(call.instrument(span), |_| {})
            .await
            .map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_dropped_call_runs_to_its_end_and_is_counted_until_then() {
        let calls = PodCalls::default();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let (abandoned_tx, abandoned_rx) = tokio::sync::oneshot::channel();
        let call = calls.run(
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = done_tx.send(());
                Ok::<_, Status>(7)
            },
            move |made: &i32| {
                let _ = abandoned_tx.send(*made);
            },
        );
        // The caller gives up almost at once.
        assert!(
            tokio::time::timeout(Duration::from_millis(10), call)
                .await
                .is_err()
        );
        assert_eq!(calls.running(), 1);
        tokio::time::timeout(Duration::from_secs(5), calls.finished())
            .await
            .expect("the call finished");
        assert_eq!(calls.running(), 0);
        done_rx.await.expect("the call ran to its end");
        assert_eq!(abandoned_rx.await, Ok(7), "what it made was undone");
    }

    #[tokio::test]
    async fn an_answered_call_is_not_undone() {
        let calls = PodCalls::default();
        let (abandoned_tx, abandoned_rx) = tokio::sync::oneshot::channel::<()>();
        let answer = calls
            .run(async { Ok::<_, Status>(1) }, move |_| {
                let _ = abandoned_tx.send(());
            })
            .await;
        assert_eq!(answer.unwrap(), 1);
        assert!(abandoned_rx.await.is_err(), "undone although answered");
    }
}

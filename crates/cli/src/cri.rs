//! The CLI's side of CRI: a client for the runtime endpoint, and calls with a deadline that
//! the runtime sees (`grpc-timeout`) and that the CLI enforces too, a little later, so that a
//! runtime that never answers cannot hang it.

use std::future::Future;
use std::time::Duration;

use cri_api::{CriEndpoint, RuntimeServiceClient};
use tonic::transport::Channel;

use crate::error::CliError;

/// How long past the runtime's deadline the CLI still waits for its answer: a runtime that
/// honours the deadline answers DeadlineExceeded itself, after cleaning up.
pub const ANSWER_GRACE: Duration = Duration::from_secs(10);

/// A deadline for the small lookups (ListContainers, PodSandboxStatus, StartContainer).
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);

/// kubelet's CRI message size limit; ListContainers on a busy node exceeds tonic's 4 MiB.
const MAX_MESSAGE_SIZE: usize = 16 << 20;

/// The runtime service at `endpoint` (connected on first call; within a tokio runtime).
pub fn runtime_client(endpoint: &CriEndpoint) -> RuntimeServiceClient<Channel> {
    RuntimeServiceClient::new(endpoint.channel())
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE)
}

/// `message` as a request whose deadline the runtime sees.
pub fn with_timeout<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// Awaits the CRI call `rpc`, which was sent with `timeout`.
pub async fn answer<T>(
    rpc: &'static str,
    timeout: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CliError> {
    let waited = timeout + ANSWER_GRACE;
    match tokio::time::timeout(waited, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(CliError::Rpc { rpc, status }),
        Err(_) => Err(CliError::NoAnswer { rpc, waited }),
    }
}

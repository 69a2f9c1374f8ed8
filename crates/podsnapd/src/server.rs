//! podsnapd's CRI server: HTTP/2 (gRPC) on a unix socket, where each call is routed by its path
//! either to the pod RPCs served here or, as raw HTTP/2, to containerd; and the server's life
//! from bind to a graceful stop.
//!
//! On shutdown the socket stops accepting and is removed at once, open connections get a
//! GOAWAY, and calls in flight have a grace period to finish; pod checkpoint/restore calls are
//! waited for to their end, however long.

use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::UnixListener;
use tonic::body::Body;
use tower::Service;

use crate::deadline::call_deadline;
use crate::forward::Containerd;
use crate::pod_rpc::{PodCalls, PodCheckpointer, PodRpcs, pod_rpc_server};
use crate::route::{Route, route};
use crate::socket::{ListeningSocket, SocketError};
use cri_api::v1::runtime_service_server::RuntimeServiceServer;

/// Where podsnapd listens and forwards to.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// podsnapd's CRI socket (kubelet's `--container-runtime-endpoint` and image endpoint).
    pub listen: PathBuf,
    /// containerd's CRI socket, where every other call goes.
    pub containerd: PathBuf,
    /// How long calls in flight may still run after a shutdown signal.
    pub shutdown_grace: Duration,
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Socket(#[from] SocketError),
}

/// HTTP/2 streams one client may have open at once. kubelet keeps a few long-lived ones
/// (`GetContainerEvents`, streaming stats) next to its calls; containerd sets no limit.
const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// The largest header block (headers or trailers) accepted, as grpc-go's default: the proxy
/// must not refuse what containerd or kubelet would take.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 << 20;

/// Routes each call: the pod RPCs to a [`PodCheckpointer`], everything else to containerd.
pub struct CriRouter {
    containerd: Containerd,
    pods: RuntimeServiceServer<PodRpcs>,
    pod_calls: PodCalls,
}

impl CriRouter {
    /// A router forwarding to containerd's CRI socket `containerd` and answering the pod RPCs
    /// with `checkpointer`.
    pub fn new(containerd: impl Into<PathBuf>, checkpointer: Arc<dyn PodCheckpointer>) -> Self {
        let pod_calls = PodCalls::default();
        Self {
            containerd: Containerd::new(containerd),
            pods: pod_rpc_server(checkpointer, pod_calls.clone()),
            pod_calls,
        }
    }

    /// Answers one call.
    pub async fn handle(&self, mut request: Request<Incoming>) -> Response<Body> {
        let arrived = Instant::now();
        match route(request.uri().path()) {
            Route::Containerd => {
                tracing::debug!(path = request.uri().path(), "forwarding to containerd");
                self.containerd.forward(request).await
            }
            Route::Pod(rpc) => {
                tracing::debug!(rpc = rpc.name(), "serving");
                let deadline = call_deadline(request.headers(), arrived);
                request.extensions_mut().insert(deadline);
                let mut pods = self.pods.clone();
                match pods.call(request).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            }
        }
    }
}

/// Serves CRI on `config.listen` until `shutdown` resolves, then stops as the module says.
pub async fn run(
    config: &ServerConfig,
    checkpointer: Arc<dyn PodCheckpointer>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (socket, listener) = ListeningSocket::bind(&config.listen).await?;
    tracing::info!(
        listen = %config.listen.display(),
        containerd = %config.containerd.display(),
        "serving CRI"
    );
    let router = Arc::new(CriRouter::new(&config.containerd, checkpointer));
    let graceful = serve(listener, router.clone(), shutdown).await;
    socket.remove();
    tracing::info!(
        grace_s = config.shutdown_grace.as_secs_f64(),
        "stopped accepting; waiting for calls in flight"
    );
    match tokio::time::timeout(config.shutdown_grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections closed"),
        Err(_) => {
            tracing::warn!("connections still open at the end of the grace period; closing them")
        }
    }
    // Pod calls are never cut short, grace or not: one may hold a pod frozen. Their deadlines
    // bound them.
    let running = router.pod_calls.running();
    if running > 0 {
        tracing::info!(
            running,
            "waiting for pod checkpoint/restore calls to finish"
        );
        router.pod_calls.finished().await;
        tracing::info!("pod calls finished");
    }
    Ok(())
}

/// Accepts connections on `listener` until `shutdown`; returns the open connections.
async fn serve(
    listener: UnixListener,
    router: Arc<CriRouter>,
    shutdown: impl Future<Output = ()>,
) -> GracefulShutdown {
    let graceful = GracefulShutdown::new();
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST_SIZE);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%err, "accepting a CRI connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |request| {
            let router = router.clone();
            async move { Ok::<_, Infallible>(router.handle(request).await) }
        });
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%err, "CRI connection ended with an error");
            }
        });
    }
    graceful
}

//! podsnapd in-process, between an HTTP/2 client and a fake containerd on a unix socket: what it
//! forwards arrives byte for byte (headers, unknown protobuf fields, trailers, streamed frames),
//! what it serves itself never reaches containerd, and it survives containerd's absence and
//! restarts. Needs no node; the real containerd is `crictl_through_podsnapd.rs`'s job.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cri_api::v1::{
    CheckpointPodRequest, CheckpointPodResponse, RestorePodRequest, RestorePodResponse,
    RestoredContainer,
};
use cri_api::{RuntimeServiceClient, unix_channel};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use podsnapd::{PodCheckpointer, ServerConfig};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tonic::{Code, Status};

/// Every wait in these tests: a hang fails the test instead of stalling it.
const WAIT: Duration = Duration::from_secs(10);

type StreamGate = Arc<Notify>;

/// A fake containerd CRI: `/fake/Echo` answers the request body and what it saw of the headers
/// with trailers; `GetContainerEvents` streams one frame, waits for the gate, streams another.
struct FakeContainerd {
    requests: Arc<AtomicUsize>,
    gate: StreamGate,
    task: JoinHandle<()>,
}

impl FakeContainerd {
    fn start(socket: &Path) -> Self {
        let listener = UnixListener::bind(socket).unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let gate = StreamGate::default();
        let (counter, stream_gate) = (requests.clone(), gate.clone());
        let task = tokio::spawn(async move {
            // Aborting the accept loop drops this set, which aborts every connection with it.
            let mut connections = JoinSet::new();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (counter, stream_gate) = (counter.clone(), stream_gate.clone());
                let service = hyper::service::service_fn(move |request| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    fake_rpc(request, stream_gate.clone())
                });
                connections.spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Self {
            requests,
            gate,
            task,
        }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Stops accepting and drops every connection, as a containerd restart would.
    async fn stop(self, socket: &Path) {
        self.task.abort();
        let _ = self.task.await;
        std::fs::remove_file(socket).unwrap();
    }
}

type FakeBody = http_body_util::channel::Channel<Bytes, Infallible>;

async fn fake_rpc(
    request: Request<Incoming>,
    gate: StreamGate,
) -> Result<Response<FakeBody>, Infallible> {
    let (parts, body) = request.into_parts();
    let (mut sender, response_body) = FakeBody::new(4);
    let mut response = Response::new(response_body);
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    for (seen, header) in [
        ("x-seen-grpc-timeout", "grpc-timeout"),
        ("x-seen-metadata", "x-podsnap-test"),
    ] {
        if let Some(value) = parts.headers.get(header) {
            response.headers_mut().insert(seen, value.clone());
        }
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers.insert("x-fake-trailer", HeaderValue::from_static("kept"));
    match parts.uri.path() {
        "/runtime.v1.RuntimeService/GetContainerEvents" => {
            tokio::spawn(async move {
                sender
                    .send_data(Bytes::from_static(b"first"))
                    .await
                    .unwrap();
                gate.notified().await;
                sender
                    .send_data(Bytes::from_static(b"second"))
                    .await
                    .unwrap();
                sender.send_trailers(trailers).await.unwrap();
            });
        }
        _ => {
            let echoed = body.collect().await.unwrap().to_bytes();
            tokio::spawn(async move {
                sender.send_data(echoed).await.unwrap();
                sender.send_trailers(trailers).await.unwrap();
            });
        }
    }
    Ok(response)
}

/// What the fake pod checkpointer was asked.
#[derive(Default)]
struct Asked {
    checkpoint: Option<(CheckpointPodRequest, Option<Instant>)>,
    restore: Option<(RestorePodRequest, Option<Instant>)>,
}

#[derive(Default)]
struct FakeCheckpointer {
    asked: Mutex<Asked>,
    /// Checkpoints that ran to their end.
    finished: AtomicUsize,
}

/// The sandbox ID for which the fake checkpoint takes `SLOW_CHECKPOINT`.
const SLOW_SANDBOX: &str = "slow";
const SLOW_CHECKPOINT: Duration = Duration::from_millis(500);

#[tonic::async_trait]
impl PodCheckpointer for FakeCheckpointer {
    async fn checkpoint_pod(
        &self,
        request: CheckpointPodRequest,
        deadline: Option<Instant>,
    ) -> Result<CheckpointPodResponse, Status> {
        let relative = !request.output_path.starts_with('/');
        let slow = request.pod_sandbox_id == SLOW_SANDBOX;
        self.asked.lock().unwrap().checkpoint = Some((request, deadline));
        if slow {
            tokio::time::sleep(SLOW_CHECKPOINT).await;
        }
        self.finished.fetch_add(1, Ordering::SeqCst);
        if relative {
            return Err(Status::invalid_argument(
                "fake: output_path must be absolute",
            ));
        }
        Ok(CheckpointPodResponse {})
    }

    async fn restore_pod(
        &self,
        request: RestorePodRequest,
        deadline: Option<Instant>,
    ) -> Result<RestorePodResponse, Status> {
        self.asked.lock().unwrap().restore = Some((request, deadline));
        Ok(RestorePodResponse {
            pod_sandbox_id: "restored-sandbox".into(),
            restored_containers: vec![RestoredContainer {
                name: "app".into(),
                container_id: "restored-app".into(),
            }],
        })
    }
}

/// podsnapd running in this test's runtime, and how to stop it.
struct Podsnapd {
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), podsnapd::ServeError>>,
}

impl Podsnapd {
    async fn start(dir: &Path, containerd: &Path, checkpointer: Arc<dyn PodCheckpointer>) -> Self {
        Self::start_with_grace(dir, containerd, checkpointer, Duration::from_secs(2)).await
    }

    async fn start_with_grace(
        dir: &Path,
        containerd: &Path,
        checkpointer: Arc<dyn PodCheckpointer>,
        shutdown_grace: Duration,
    ) -> Self {
        let config = ServerConfig {
            listen: dir.join("podsnapd.sock"),
            containerd: containerd.to_path_buf(),
            shutdown_grace,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let socket = config.listen.clone();
        let task = tokio::spawn(async move {
            podsnapd::run(&config, checkpointer, async {
                let _ = stopped.await;
            })
            .await
        });
        let started = Instant::now();
        while UnixStream::connect(&socket).await.is_err() {
            assert!(
                started.elapsed() < WAIT,
                "podsnapd did not listen on {socket:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            socket,
            stop: Some(stop),
            task,
        }
    }

    fn cri(&self) -> RuntimeServiceClient<tonic::transport::Channel> {
        RuntimeServiceClient::new(unix_channel(&self.socket))
    }

    /// A raw HTTP/2 connection to podsnapd.
    async fn http2(&self) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        let stream = UnixStream::connect(&self.socket).await.unwrap();
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(connection);
        sender
    }

    async fn shut_down(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

fn grpc_request(path: &str, body: &'static [u8]) -> Request<Full<Bytes>> {
    Request::post(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "4S")
        .header("x-podsnap-test", "passed through")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

/// A gRPC message frame (uncompressed) holding a VersionRequest with `version = "v1"` (field 1)
/// and field 999, which no CRI message has: a proxy that decoded and re-encoded would drop it.
const VERSION_WITH_UNKNOWN_FIELD: &[u8] = &[
    0, 0, 0, 0, 10, // frame: uncompressed, 10 bytes
    0x0a, 0x02, b'v', b'1', // field 1 (version), "v1"
    0xb8, 0x3e, 0x2a, // field 999, varint 42
    0xb8, 0x3e, 0x07, // field 999 again, varint 7
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_calls_keep_headers_unknown_fields_and_trailers() {
    let dir = tempfile::tempdir().unwrap();
    let containerd_socket = dir.path().join("containerd.sock");
    let containerd = FakeContainerd::start(&containerd_socket);
    let checkpointer = Arc::new(FakeCheckpointer::default());
    let podsnapd = Podsnapd::start(dir.path(), &containerd_socket, checkpointer.clone()).await;

    let mut client = podsnapd.http2().await;
    let request = grpc_request(
        "/runtime.v1.RuntimeService/Version",
        VERSION_WITH_UNKNOWN_FIELD,
    );
    let response = tokio::time::timeout(WAIT, client.send_request(request))
        .await
        .unwrap()
        .unwrap();
    let headers = response.headers().clone();
    let body = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .unwrap()
        .unwrap();
    let trailers = body.trailers().cloned().expect("trailers came back");
    assert_eq!(
        body.to_bytes(),
        Bytes::from_static(VERSION_WITH_UNKNOWN_FIELD)
    );
    assert_eq!(headers["x-seen-grpc-timeout"], "4S");
    assert_eq!(headers["x-seen-metadata"], "passed through");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-fake-trailer"], "kept");

    assert_eq!(containerd.requests(), 1);
    {
        let asked = checkpointer.asked.lock().unwrap();
        assert!(asked.checkpoint.is_none() && asked.restore.is_none());
    }
    podsnapd.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_streaming_frames_arrive_as_containerd_sends_them() {
    let dir = tempfile::tempdir().unwrap();
    let containerd_socket = dir.path().join("containerd.sock");
    let containerd = FakeContainerd::start(&containerd_socket);
    let podsnapd = Podsnapd::start(
        dir.path(),
        &containerd_socket,
        Arc::new(FakeCheckpointer::default()),
    )
    .await;

    let mut client = podsnapd.http2().await;
    let request = grpc_request(
        "/runtime.v1.RuntimeService/GetContainerEvents",
        &[0, 0, 0, 0, 0],
    );
    let response = tokio::time::timeout(WAIT, client.send_request(request))
        .await
        .unwrap()
        .unwrap();
    let mut body = response.into_body();
    // The fake holds the second frame back until the first has come through podsnapd: a proxy
    // that buffered the response would never deliver it, and this would time out.
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"first"));
    containerd.gate.notify_one();
    let rest = tokio::time::timeout(WAIT, body.collect())
        .await
        .unwrap()
        .unwrap();
    let trailers = rest.trailers().cloned().expect("trailers came back");
    assert_eq!(rest.to_bytes(), Bytes::from_static(b"second"));
    assert_eq!(trailers["grpc-status"], "0");
    podsnapd.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_rpcs_are_answered_by_podsnapd_with_the_callers_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let containerd_socket = dir.path().join("containerd.sock");
    let containerd = FakeContainerd::start(&containerd_socket);
    let checkpointer = Arc::new(FakeCheckpointer::default());
    let podsnapd = Podsnapd::start(dir.path(), &containerd_socket, checkpointer.clone()).await;
    let mut cri = podsnapd.cri();

    let mut request = tonic::Request::new(CheckpointPodRequest {
        pod_sandbox_id: "sandbox-1".into(),
        output_path: "relative/dir".into(),
        container_ids: vec!["c1".into()],
        options: Default::default(),
    });
    request.set_timeout(Duration::from_secs(30));
    let sent = Instant::now();
    let status = tokio::time::timeout(WAIT, cri.checkpoint_pod(request))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(status.message(), "fake: output_path must be absolute");
    let (asked, deadline) = checkpointer
        .asked
        .lock()
        .unwrap()
        .checkpoint
        .clone()
        .unwrap();
    assert_eq!(asked.pod_sandbox_id, "sandbox-1");
    assert_eq!(asked.container_ids, ["c1"]);
    let deadline = deadline.expect("grpc-timeout became a deadline");
    let timeout = deadline.duration_since(sent);
    assert!(
        timeout > Duration::from_secs(25) && timeout <= Duration::from_secs(31),
        "deadline {timeout:?} after sending, 30 s requested"
    );

    let request = RestorePodRequest {
        checkpoint_path: "/checkpoints/one".into(),
        runtime_handler: "podsnap".into(),
        ..Default::default()
    };
    let restored = tokio::time::timeout(WAIT, cri.restore_pod(request))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(restored.get_ref().pod_sandbox_id, "restored-sandbox");
    let (asked, deadline) = checkpointer.asked.lock().unwrap().restore.clone().unwrap();
    assert_eq!(asked.checkpoint_path, "/checkpoints/one");
    assert_eq!(deadline, None, "no grpc-timeout, no deadline");

    assert_eq!(containerd.requests(), 0, "a pod RPC reached containerd");
    podsnapd.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_away_is_unavailable_and_a_restarted_one_is_reconnected() {
    let dir = tempfile::tempdir().unwrap();
    let containerd_socket = dir.path().join("containerd.sock");
    let podsnapd = Podsnapd::start(
        dir.path(),
        &containerd_socket,
        Arc::new(FakeCheckpointer::default()),
    )
    .await;
    let mut cri = podsnapd.cri();
    let version = || cri_api::v1::VersionRequest {
        version: "v1".into(),
    };

    // Not up yet: podsnapd still serves, and says what is missing.
    let status = tokio::time::timeout(WAIT, cri.version(version()))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().starts_with("podsnapd: "), "{status:?}");
    assert!(
        status
            .message()
            .contains(&*containerd_socket.to_string_lossy()),
        "{status:?}"
    );

    // Up: the echo of the request does not decode as a VersionResponse's fields, but the call
    // succeeding with grpc-status 0 is what matters.
    let containerd = FakeContainerd::start(&containerd_socket);
    tokio::time::timeout(WAIT, cri.version(version()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(containerd.requests(), 1);

    // Restarted: the broken connection is replaced. A call racing podsnapd's notice of the
    // closed connection may fail Unavailable (gRPC clients retry those); the next ones work.
    containerd.stop(&containerd_socket).await;
    let containerd = FakeContainerd::start(&containerd_socket);
    let started = Instant::now();
    loop {
        match tokio::time::timeout(WAIT, cri.version(version()))
            .await
            .unwrap()
        {
            Ok(_) => break,
            Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        }
        assert!(started.elapsed() < WAIT, "podsnapd never reconnected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(containerd.requests(), 1);
    podsnapd.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let podsnapd = Podsnapd::start(
        dir.path(),
        &dir.path().join("containerd.sock"),
        Arc::new(FakeCheckpointer::default()),
    )
    .await;
    let socket = podsnapd.socket.clone();
    assert!(socket.exists());
    podsnapd.shut_down().await;
    assert!(!socket.exists(), "{socket:?} left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_call_outlives_its_caller_and_shutdown_waits_for_it_past_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let checkpointer = Arc::new(FakeCheckpointer::default());
    let podsnapd = Podsnapd::start_with_grace(
        dir.path(),
        &dir.path().join("containerd.sock"),
        checkpointer.clone(),
        Duration::from_millis(10),
    )
    .await;
    let mut cri = podsnapd.cri();
    let request = CheckpointPodRequest {
        pod_sandbox_id: SLOW_SANDBOX.into(),
        output_path: "/checkpoints/slow".into(),
        ..Default::default()
    };
    // The caller gives up long before the checkpoint is done (as kubelet at its deadline).
    let gave_up =
        tokio::time::timeout(Duration::from_millis(100), cri.checkpoint_pod(request)).await;
    assert!(
        gave_up.is_err(),
        "the slow checkpoint answered early: {gave_up:?}"
    );
    drop(cri);
    assert_eq!(checkpointer.finished.load(Ordering::SeqCst), 0);

    // Shutdown, with a grace much shorter than the checkpoint, still lets it finish.
    let stopping = Instant::now();
    podsnapd.shut_down().await;
    assert_eq!(
        checkpointer.finished.load(Ordering::SeqCst),
        1,
        "podsnapd stopped after {:?} with the checkpoint cut short",
        stopping.elapsed()
    );
}

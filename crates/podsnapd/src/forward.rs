//! Forwarding CRI calls to containerd as raw HTTP/2: the request's headers (`grpc-timeout`,
//! metadata) and body frames go to containerd's CRI socket unchanged, and its response headers,
//! body frames and trailers (`grpc-status`) come back unchanged. Nothing is decoded, so fields
//! this build does not know survive and server-streaming RPCs (`GetContainerEvents`) stream.
//!
//! One HTTP/2 connection to containerd carries every forwarded call, as kubelet's own client
//! would; it is opened on first use and again after it breaks. When containerd cannot be
//! reached, the caller gets `Unavailable` from podsnapd, naming the socket.

use std::path::PathBuf;

use http::uri::{Authority, Scheme, Uri};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use tonic::Status;
use tonic::body::Body;

use crate::server::MAX_HEADER_LIST_SIZE;

/// Why a call could not be handed to containerd.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// containerd's socket does not accept connections.
    #[error("containerd CRI at {socket} is unreachable: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The HTTP/2 handshake with containerd failed.
    #[error("HTTP/2 handshake with containerd CRI at {socket} failed: {source}")]
    Handshake {
        socket: PathBuf,
        #[source]
        source: hyper::Error,
    },
    /// The request could not be sent, or containerd's response headers never came.
    #[error("forwarding {path} to containerd CRI at {socket} failed: {source}")]
    Exchange {
        path: String,
        socket: PathBuf,
        #[source]
        source: hyper::Error,
    },
}

impl From<ForwardError> for Status {
    fn from(err: ForwardError) -> Self {
        Status::unavailable(format!("podsnapd: {err}"))
    }
}

/// containerd's CRI server, as the destination of forwarded calls.
#[derive(Debug)]
pub struct Containerd {
    socket: PathBuf,
    connection: Mutex<Option<SendRequest<Incoming>>>,
}

impl Containerd {
    /// containerd's CRI on the unix socket `socket`; nothing is connected yet.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            connection: Mutex::new(None),
        }
    }

    /// Forwards `request` and returns containerd's response as it streams in. A failure to
    /// reach containerd becomes a gRPC `Unavailable` response (HTTP 200, trailers-only), the
    /// way a gRPC client expects a broken backend to look.
    pub async fn forward(&self, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path().to_string();
        match self.exchange(request).await {
            Ok(response) => response.map(Body::new),
            Err(err) => {
                tracing::warn!(%path, %err, "forwarding to containerd failed");
                Status::from(err).into_http()
            }
        }
    }

    async fn exchange(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let path = request.uri().path().to_string();
        let mut request = upstream_request(request);
        // A connection that broke since its last use hands the request back unsent: open a new
        // one and send it there, once.
        for attempt in 0..2 {
            let mut sender = self.sender(attempt > 0).await?;
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(response),
                Err(mut err) => match err.take_message() {
                    Some(unsent) if attempt == 0 => {
                        tracing::debug!(%path, error = %err.error(), "containerd connection broke; reconnecting");
                        request = unsent;
                    }
                    _ => {
                        return Err(ForwardError::Exchange {
                            path,
                            socket: self.socket.clone(),
                            source: err.into_error(),
                        });
                    }
                },
            }
        }
        unreachable!("the second attempt returns")
    }

    /// A handle on the shared connection, opening it when there is none, when it has closed,
    /// or when `reconnect` says the current one failed.
    async fn sender(&self, reconnect: bool) -> Result<SendRequest<Incoming>, ForwardError> {
        let mut connection = self.connection.lock().await;
        match connection.as_ref() {
            Some(sender) if !reconnect && !sender.is_closed() => return Ok(sender.clone()),
            _ => {}
        }
        let sender = self.connect().await?;
        *connection = Some(sender.clone());
        Ok(sender)
    }

    async fn connect(&self) -> Result<SendRequest<Incoming>, ForwardError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ForwardError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ForwardError::Handshake {
                socket: self.socket.clone(),
                source,
            })?;
        let socket = self.socket.clone();
        tokio::spawn(async move {
            match connection.await {
                Ok(()) => {
                    tracing::debug!(socket = %socket.display(), "containerd connection closed")
                }
                Err(err) => {
                    tracing::warn!(socket = %socket.display(), %err, "containerd connection failed")
                }
            }
        });
        tracing::debug!(socket = %self.socket.display(), "connected to containerd CRI");
        Ok(sender)
    }
}

/// The request as it goes to containerd: method, path, headers and body unchanged; the URI
/// made absolute for the HTTP/2 client (the caller's `:authority`, `localhost` when it sent none,
/// as grpc-go does on unix sockets); and none of the extensions hyper attached on the way in.
fn upstream_request(request: Request<Incoming>) -> Request<Incoming> {
    let (mut parts, body) = request.into_parts();
    parts.uri = upstream_uri(&parts.uri);
    parts.extensions = http::Extensions::new();
    Request::from_parts(parts, body)
}

fn upstream_uri(uri: &Uri) -> Uri {
    let mut upstream = uri.clone().into_parts();
    upstream.scheme = Some(Scheme::HTTP);
    if upstream.authority.is_none() {
        upstream.authority = Some(Authority::from_static("localhost"));
    }
    if upstream.path_and_query.is_none() {
        upstream.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    Uri::from_parts(upstream).unwrap_or_else(|_| uri.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_uri_keeps_path_and_authority_and_is_absolute() {
        let uri: Uri = "http://localhost/runtime.v1.RuntimeService/Version"
            .parse()
            .unwrap();
        assert_eq!(upstream_uri(&uri), uri);

        let relative: Uri = "/runtime.v1.ImageService/ListImages".parse().unwrap();
        assert_eq!(
            upstream_uri(&relative).to_string(),
            "http://localhost/runtime.v1.ImageService/ListImages"
        );

        let other: Uri = "https://podsnapd.sock/runtime.v1.RuntimeService/Status"
            .parse()
            .unwrap();
        assert_eq!(
            upstream_uri(&other).to_string(),
            "http://podsnapd.sock/runtime.v1.RuntimeService/Status"
        );
    }

    #[test]
    fn unreachable_containerd_is_unavailable_naming_the_socket() {
        let err = ForwardError::Connect {
            socket: PathBuf::from("/run/x/containerd.sock"),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let status = Status::from(err);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().starts_with("podsnapd: "), "{status:?}");
        assert!(
            status.message().contains("/run/x/containerd.sock"),
            "{status:?}"
        );
    }
}

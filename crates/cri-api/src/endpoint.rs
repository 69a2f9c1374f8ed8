//! CRI endpoints as kubelet and crictl spell them (`unix:///run/containerd/containerd.sock`, or a
//! bare absolute path, which kubelet also takes as a unix socket), and a tonic [`Channel`] to one.
//!
//! Only unix sockets: CRI runtimes listen on nothing else on Linux (crictl's tcp endpoints are
//! deprecated). Connecting is lazy and repeated as needed, so a client can be built before the
//! server is up and survives its restarts.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// A CRI server's address: the path of its unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriEndpoint {
    socket: PathBuf,
}

/// Why a string is not a CRI endpoint this crate can reach.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    /// The endpoint is empty.
    #[error("CRI endpoint is empty")]
    Empty,
    /// A scheme other than `unix://`.
    #[error("CRI endpoint {endpoint:?}: only unix sockets are supported (unix:///path/to.sock)")]
    UnsupportedScheme { endpoint: String },
    /// A socket path that is not absolute.
    #[error("CRI endpoint {endpoint:?}: the socket path must be absolute (unix:///path/to.sock)")]
    RelativePath { endpoint: String },
}

impl CriEndpoint {
    /// The endpoint of the unix socket at `socket`.
    pub fn unix(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A channel to this endpoint (see [`unix_channel`]; within a tokio runtime).
    pub fn channel(&self) -> Channel {
        unix_channel(&self.socket)
    }
}

impl FromStr for CriEndpoint {
    type Err = EndpointError;

    fn from_str(endpoint: &str) -> Result<Self, Self::Err> {
        if endpoint.is_empty() {
            return Err(EndpointError::Empty);
        }
        let path = match endpoint.split_once("://") {
            Some(("unix", path)) => path,
            Some(_) => {
                return Err(EndpointError::UnsupportedScheme {
                    endpoint: endpoint.to_string(),
                });
            }
            None => endpoint,
        };
        if !path.starts_with('/') {
            return Err(EndpointError::RelativePath {
                endpoint: endpoint.to_string(),
            });
        }
        Ok(Self::unix(path))
    }
}

impl fmt::Display for CriEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unix://{}", self.socket.display())
    }
}

/// A gRPC channel to the server on the unix socket `socket`. It connects on first use, and
/// again after the connection breaks; a call while the server is unreachable fails with
/// `Unavailable`. HTTP/2's `:authority` is `localhost`, as grpc-go sends for unix sockets.
///
/// Must be called within a tokio runtime (the channel spawns its worker there).
pub fn unix_channel(socket: impl Into<PathBuf>) -> Channel {
    let socket = socket.into();
    Endpoint::from_static("http://localhost").connect_with_connector_lazy(tower::service_fn(
        move |_: Uri| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_url_and_bare_path_name_the_same_socket() {
        let url: CriEndpoint = "unix:///run/podsnap/podsnapd.sock".parse().unwrap();
        let bare: CriEndpoint = "/run/podsnap/podsnapd.sock".parse().unwrap();
        assert_eq!(url, bare);
        assert_eq!(url.socket(), Path::new("/run/podsnap/podsnapd.sock"));
        assert_eq!(url.to_string(), "unix:///run/podsnap/podsnapd.sock");
    }

    #[test]
    fn other_schemes_relative_paths_and_empty_are_rejected() {
        assert!(matches!(
            "tcp://127.0.0.1:1234".parse::<CriEndpoint>(),
            Err(EndpointError::UnsupportedScheme { .. })
        ));
        assert!(matches!(
            "unix://run/x.sock".parse::<CriEndpoint>(),
            Err(EndpointError::RelativePath { .. })
        ));
        assert!(matches!(
            "x.sock".parse::<CriEndpoint>(),
            Err(EndpointError::RelativePath { .. })
        ));
        assert_eq!("".parse::<CriEndpoint>(), Err(EndpointError::Empty));
    }

    #[tokio::test]
    async fn a_call_to_a_missing_socket_fails_unavailable() {
        let dir = std::env::temp_dir().join(format!("cri-api-test-{}", std::process::id()));
        let mut client = crate::RuntimeServiceClient::new(unix_channel(dir.join("absent.sock")));
        let status = client
            .version(crate::v1::VersionRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
}

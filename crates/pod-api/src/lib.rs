//! The pod-level service of the podsnap shim, which `podsnapd` calls: checkpoint several
//! containers of one pod as one consistent cut (every container frozen before any is captured).
//!
//! Transport: one request and one response per connection on the shim's pod socket
//! ([`socket_path`]), each a JSON document prefixed by its length (u32, big endian). The socket
//! is root-only (0600 in a 0700 directory). This crate owns the messages and the framing; what
//! the shim does with a request is the shim's business.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Directory of the pod sockets, one per shim (pod).
pub const SOCKET_DIR: &str = "/run/podsnap/pods";

/// Largest message either side accepts.
pub const MAX_MESSAGE: u32 = 4 << 20;

/// The pod socket of the shim serving sandbox `sandbox_id`.
pub fn socket_path(sandbox_id: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{sandbox_id}.sock"))
}

/// What podsnapd asks of a pod's shim.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "request")]
pub enum PodRequest {
    /// Freeze every listed container, dump each into `<output_dir>/<container_id>/`, thaw all.
    CheckpointSandbox {
        container_ids: Vec<String>,
        /// An existing, empty, root-only directory.
        output_dir: PathBuf,
        /// Keep the containers running afterwards (else they are stopped after the dump).
        leave_running: bool,
        /// Checkpoint established TCP connections.
        tcp_established: bool,
        /// Give up (and thaw everything) after this many milliseconds.
        timeout_ms: Option<u64>,
    },
}

/// How one container was captured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerCapture {
    pub container_id: String,
    /// Directory holding `checkpoint/`, `rootfs-diff.tar` and `deleted.files`.
    pub dir: PathBuf,
    pub dump_ms: u64,
}

/// The shim's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "response")]
pub enum PodResponse {
    Checkpointed {
        containers: Vec<ContainerCapture>,
        /// From freezing the first container to thawing the last.
        freeze_window_ms: u64,
    },
    Failed {
        code: ErrorCode,
        message: String,
    },
}

/// Why a pod request failed: the gRPC code podsnapd answers with, under its gRPC name on the
/// wire (`"FailedPrecondition"`). A name this side does not know reads as [`ErrorCode::Internal`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request itself is wrong (no containers, a relative output directory, ...).
    InvalidArgument,
    /// A container named is not in the pod.
    NotFound,
    /// The pod is not in a state to be checkpointed (a container not running, a user
    /// namespace, ...).
    FailedPrecondition,
    /// The deadline passed; the pod was thawed first.
    DeadlineExceeded,
    /// Anything else (CRIU failed, a freeze failed, ...).
    #[serde(other)]
    Internal,
}

impl ErrorCode {
    /// The gRPC name, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "InvalidArgument",
            ErrorCode::NotFound => "NotFound",
            ErrorCode::FailedPrecondition => "FailedPrecondition",
            ErrorCode::DeadlineExceeded => "DeadlineExceeded",
            ErrorCode::Internal => "Internal",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Writes one length-prefixed JSON message.
pub fn write_message<T: Serialize>(mut to: impl Write, message: &T) -> io::Result<()> {
    let data = serde_json::to_vec(message).map_err(io::Error::other)?;
    let len = u32::try_from(data.len())
        .ok()
        .filter(|l| *l <= MAX_MESSAGE)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "message too large"))?;
    to.write_all(&len.to_be_bytes())?;
    to.write_all(&data)?;
    to.flush()
}

/// Reads one length-prefixed JSON message.
pub fn read_message<T: for<'de> Deserialize<'de>>(mut from: impl Read) -> io::Result<T> {
    let mut len = [0u8; 4];
    from.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len);
    if len > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes is too large"),
        ));
    }
    let mut data = vec![0u8; len as usize];
    from.read_exact(&mut data)?;
    serde_json::from_slice(&data).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Sends `request` to the shim of `sandbox_id` and waits (at most `timeout`) for its answer.
pub fn call(sandbox_id: &str, request: &PodRequest, timeout: Duration) -> io::Result<PodResponse> {
    call_at(&socket_path(sandbox_id), request, timeout)
}

/// [`call`] on an explicit socket path.
pub fn call_at(socket: &Path, request: &PodRequest, timeout: Duration) -> io::Result<PodResponse> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("connect to pod socket {}: {e}", socket.display()),
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write_message(&stream, request)?;
    read_message(&stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_the_framing() {
        let request = PodRequest::CheckpointSandbox {
            container_ids: vec!["a".into(), "b".into()],
            output_dir: "/ckpt".into(),
            leave_running: true,
            tcp_established: false,
            timeout_ms: Some(5000),
        };
        let mut buf = Vec::new();
        write_message(&mut buf, &request).unwrap();
        assert_eq!(read_message::<PodRequest>(&buf[..]).unwrap(), request);
    }

    #[test]
    fn oversized_and_truncated_messages_are_refused() {
        let mut buf = (MAX_MESSAGE + 1).to_be_bytes().to_vec();
        buf.extend_from_slice(b"{}");
        assert!(read_message::<PodResponse>(&buf[..]).is_err());
        let mut buf = Vec::new();
        write_message(
            &mut buf,
            &PodResponse::Failed {
                code: ErrorCode::Internal,
                message: "x".into(),
            },
        )
        .unwrap();
        buf.truncate(buf.len() - 1);
        assert!(read_message::<PodResponse>(&buf[..]).is_err());
    }

    #[test]
    fn error_codes_travel_by_their_grpc_names_and_unknown_ones_read_as_internal() {
        let failed = PodResponse::Failed {
            code: ErrorCode::FailedPrecondition,
            message: "m".into(),
        };
        let json = serde_json::to_value(&failed).unwrap();
        assert_eq!(json["code"], "FailedPrecondition");
        for code in [
            ErrorCode::InvalidArgument,
            ErrorCode::NotFound,
            ErrorCode::FailedPrecondition,
            ErrorCode::DeadlineExceeded,
            ErrorCode::Internal,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
        let unknown: PodResponse = serde_json::from_str(
            r#"{"response": "failed", "code": "ResourceExhausted", "message": "m"}"#,
        )
        .unwrap();
        assert_eq!(
            unknown,
            PodResponse::Failed {
                code: ErrorCode::Internal,
                message: "m".into()
            }
        );
    }

    #[test]
    fn socket_path_is_per_sandbox() {
        assert_eq!(
            socket_path("abc"),
            PathBuf::from("/run/podsnap/pods/abc.sock")
        );
    }
}

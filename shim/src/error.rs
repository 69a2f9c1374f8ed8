//! The shim's errors: one enum for every failure a request can meet, and one mapping from it to
//! the codes callers see (ttrpc's for containerd, [`podsnap_pod_api::ErrorCode`] for podsnapd),
//! as containerd's rust-extensions shim and runwasi map theirs.
//!
//! The variant says what kind of failure it is; the message says what failed, naming the
//! container. CRIU's errors are kept whole ([`Error::Criu`]), so a CRIU timeout is
//! DeadlineExceeded by its kind. Code below the RPC layer may use `anyhow` with context: an
//! [`Error`] or a `criu_rpc::Error` anywhere in such a chain decides its code
//! ([`Error::Internal`]).

use containerd_shim::protos::ttrpc::{self, Code};
use podsnap_pod_api::ErrorCode;

/// A failed request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such container, process or file.
    #[error("{0}")]
    NotFound(String),
    /// A container or exec with that id exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is malformed: an id, a path, a spec, an option.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request does not fit the container's state (not running, already started, ...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request asks for what it may not have (a restore without its grant).
    #[error("{0}")]
    PermissionDenied(String),
    /// Not something this shim does.
    #[error("{0}")]
    Unimplemented(String),
    /// A deadline passed; what had to be undone was undone first.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// CRIU failed: its whole error (operation, kind, log tail), after what was being done.
    #[error("{context}: {source}")]
    Criu {
        context: String,
        #[source]
        source: criu_rpc::Error,
    },
    /// libcontainer (in the zygote) failed to create or exec a process.
    #[error("{0}")]
    Libcontainer(String),
    /// A system call or file operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Anything else, with its chain of context.
    #[error("{0:#}")]
    Internal(anyhow::Error),
}

/// What the shim's requests return.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An internal error with this message.
    pub fn internal(message: impl Into<String>) -> Self {
        Error::Internal(anyhow::Error::msg(message.into()))
    }

    /// The same error, its message prefixed by `what` (`container c1: ...`); the kind is kept.
    pub fn within(self, what: impl std::fmt::Display) -> Self {
        let prefixed = |message: String| format!("{what}: {message}");
        match self {
            Error::NotFound(m) => Error::NotFound(prefixed(m)),
            Error::AlreadyExists(m) => Error::AlreadyExists(prefixed(m)),
            Error::InvalidArgument(m) => Error::InvalidArgument(prefixed(m)),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(prefixed(m)),
            Error::PermissionDenied(m) => Error::PermissionDenied(prefixed(m)),
            Error::Unimplemented(m) => Error::Unimplemented(prefixed(m)),
            Error::DeadlineExceeded(m) => Error::DeadlineExceeded(prefixed(m)),
            Error::Libcontainer(m) => Error::Libcontainer(prefixed(m)),
            Error::Criu { context, source } => Error::Criu {
                context: prefixed(context),
                source,
            },
            Error::Io { context, source } => Error::Io {
                context: prefixed(context),
                source,
            },
            Error::Internal(chain) => Error::Internal(chain.context(what.to_string())),
        }
    }

    /// The ttrpc code containerd sees.
    pub fn code(&self) -> Code {
        match self {
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::PermissionDenied(_) => Code::PERMISSION_DENIED,
            Error::Unimplemented(_) => Code::UNIMPLEMENTED,
            Error::DeadlineExceeded(_) => Code::DEADLINE_EXCEEDED,
            Error::Criu { source, .. } => criu_code(source),
            Error::Libcontainer(_) => Code::UNKNOWN,
            Error::Io { .. } => Code::INTERNAL,
            Error::Internal(chain) => chain_code(chain),
        }
    }

    /// The code podsnapd hears on the pod socket.
    pub fn pod_code(&self) -> ErrorCode {
        match self.code() {
            Code::INVALID_ARGUMENT => ErrorCode::InvalidArgument,
            Code::NOT_FOUND => ErrorCode::NotFound,
            Code::FAILED_PRECONDITION => ErrorCode::FailedPrecondition,
            Code::DEADLINE_EXCEEDED => ErrorCode::DeadlineExceeded,
            _ => ErrorCode::Internal,
        }
    }
}

/// A CRIU failure's code, by its kind.
fn criu_code(error: &criu_rpc::Error) -> Code {
    use criu_rpc::ErrorKind;
    match error.kind() {
        ErrorKind::Timeout(_) => Code::DEADLINE_EXCEEDED,
        ErrorKind::InvalidOptions(_) => Code::INVALID_ARGUMENT,
        ErrorKind::Unsupported { .. } => Code::FAILED_PRECONDITION,
        _ => Code::UNKNOWN,
    }
}

/// The code of the first [`Error`] or `criu_rpc::Error` in an `anyhow` chain; INTERNAL when
/// there is none.
fn chain_code(chain: &anyhow::Error) -> Code {
    chain
        .chain()
        .find_map(|cause| {
            if let Some(error) = cause.downcast_ref::<Error>() {
                Some(error.code())
            } else {
                cause.downcast_ref::<criu_rpc::Error>().map(criu_code)
            }
        })
        .unwrap_or(Code::INTERNAL)
}

impl From<anyhow::Error> for Error {
    fn from(error: anyhow::Error) -> Self {
        Error::Internal(error)
    }
}

impl From<Error> for ttrpc::Error {
    fn from(error: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(error.code(), error.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    fn status(error: Error) -> (Code, String) {
        match ttrpc::Error::from(error) {
            ttrpc::Error::RpcStatus(status) => (status.code(), status.message),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn every_kind_has_its_ttrpc_code_and_keeps_its_message() {
        let cases = [
            (Error::NotFound("c1 not found".into()), Code::NOT_FOUND),
            (
                Error::AlreadyExists("c1 exists".into()),
                Code::ALREADY_EXISTS,
            ),
            (
                Error::InvalidArgument("bad id".into()),
                Code::INVALID_ARGUMENT,
            ),
            (
                Error::FailedPrecondition("not running".into()),
                Code::FAILED_PRECONDITION,
            ),
            (
                Error::PermissionDenied("no grant".into()),
                Code::PERMISSION_DENIED,
            ),
            (Error::Unimplemented("no".into()), Code::UNIMPLEMENTED),
            (
                Error::DeadlineExceeded("late".into()),
                Code::DEADLINE_EXCEEDED,
            ),
            (Error::Libcontainer("exec failed".into()), Code::UNKNOWN),
            (Error::internal("broken"), Code::INTERNAL),
        ];
        for (error, code) in cases {
            let message = error.to_string();
            assert_eq!(status(error), (code, message.clone()), "{message}");
        }
        let io = Error::Io {
            context: "read state".into(),
            source: std::io::Error::from_raw_os_error(libc::EACCES),
        };
        let (code, message) = status(io);
        assert_eq!(code, Code::INTERNAL);
        assert!(message.starts_with("read state: "), "{message}");
    }

    #[test]
    fn within_prefixes_the_message_and_keeps_the_kind() {
        let error = Error::AlreadyExists("exec e1 exists".into()).within("container c1");
        assert_eq!(error.code(), Code::ALREADY_EXISTS);
        assert_eq!(error.to_string(), "container c1: exec e1 exists");
        let error = Error::internal("broken").within("container c1");
        assert_eq!(error.code(), Code::INTERNAL);
        assert_eq!(error.to_string(), "container c1: broken");
    }

    #[test]
    fn an_error_deep_in_an_anyhow_chain_decides_the_code_and_the_context_is_kept() {
        let inner: anyhow::Result<()> =
            Err(Error::FailedPrecondition("runs in a user namespace".into()).into());
        let error = Error::from(inner.context("checkpoint container c1").unwrap_err());
        assert_eq!(error.code(), Code::FAILED_PRECONDITION);
        assert_eq!(error.pod_code(), ErrorCode::FailedPrecondition);
        assert_eq!(
            error.to_string(),
            "checkpoint container c1: runs in a user namespace"
        );
        let plain = Error::from(anyhow::anyhow!("disk full").context("write pages"));
        assert_eq!(plain.code(), Code::INTERNAL);
        assert_eq!(plain.pod_code(), ErrorCode::Internal);
    }

    #[test]
    fn a_criu_timeout_is_deadline_exceeded_by_its_kind() {
        // A real timeout: `criu swrk` that never answers (a shell that sleeps) within 50 ms.
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("criu");
        std::fs::write(&fake, "#!/bin/sh\nexec sleep 30\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let error = criu_rpc::Criu::with_binary(&fake)
            .timeout(std::time::Duration::from_millis(50))
            .version()
            .unwrap_err();
        assert!(
            matches!(error.kind(), criu_rpc::ErrorKind::Timeout(_)),
            "{error}"
        );
        let typed = Error::Criu {
            context: "checkpoint container c1".into(),
            source: error,
        };
        assert_eq!(typed.code(), Code::DEADLINE_EXCEEDED);
        assert_eq!(typed.pod_code(), ErrorCode::DeadlineExceeded);
        // The same error inside an anyhow chain, as the dump code returns it.
        let error = criu_rpc::Criu::with_binary(&fake)
            .timeout(std::time::Duration::from_millis(50))
            .version()
            .unwrap_err();
        let chained = Error::from(anyhow::Error::new(error).context("checkpoint container c1"));
        assert_eq!(chained.code(), Code::DEADLINE_EXCEEDED);
    }
}

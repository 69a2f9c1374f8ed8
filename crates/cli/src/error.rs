//! The CLI's errors: each says which call or file failed and why, with the gRPC status code
//! and message as the runtime sent them.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::ConfigError;
use crate::options::OptionError;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The runtime answered a CRI call with an error.
    #[error("{rpc} failed: {code:?}: {message}", code = status.code(), message = status.message())]
    Rpc {
        rpc: &'static str,
        status: tonic::Status,
    },
    /// The runtime did not answer within the deadline (plus a grace period).
    #[error("{rpc}: no answer from the runtime after {waited:?}")]
    NoAnswer { rpc: &'static str, waited: Duration },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Option(#[from] OptionError),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A restored container did not start.
    #[error(
        "container {name} ({container_id}) did not start; the restored pod {sandbox_id} is left as it is"
    )]
    Start {
        name: String,
        container_id: String,
        sandbox_id: String,
        #[source]
        source: Box<CliError>,
    },
    /// The command line asks for something that cannot work.
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    /// Whether the runtime endpoint was involved (so naming it helps the reader).
    pub fn involves_runtime(&self) -> bool {
        match self {
            CliError::Rpc { .. } | CliError::NoAnswer { .. } => true,
            CliError::Start { source, .. } => source.involves_runtime(),
            _ => false,
        }
    }

    /// Whether the runtime could not be reached at all.
    pub fn unreachable(&self) -> bool {
        match self {
            CliError::Rpc { status, .. } => status.code() == tonic::Code::Unavailable,
            _ => false,
        }
    }

    pub fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| CliError::Io {
            action,
            path,
            source,
        }
    }
}

//! Errors of CRIU RPC operations.
//!
//! Every [`Error`] names the operation that failed, says why (CRIU's `cr_errno` and first error
//! message, an errno from the socket, how `criu swrk` died, ...) and carries the tail of CRIU's log
//! file when CRIU got far enough to write one. This module only describes failures; deciding what a
//! failure means for a pod is the caller's job.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::log_tail::LogTail;

/// Result of a CRIU RPC operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Error a [`Notify`](crate::Notify) callback returns to abort an operation.
pub type NotifyError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The CRIU operation an [`Error`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `VERSION` request.
    Version,
    /// `CHECK` request.
    Check,
    /// `FEATURE_CHECK` request.
    FeatureCheck,
    /// `DUMP` request.
    Dump,
    /// `SINGLE_PRE_DUMP` request.
    PreDump,
    /// `RESTORE` request.
    Restore,
    /// `CPUINFO_CHECK` request.
    CpuinfoCheck,
}

impl Operation {
    /// The operation's name as CRIU's command line spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Version => "version",
            Operation::Check => "check",
            Operation::FeatureCheck => "feature check",
            Operation::Dump => "dump",
            Operation::PreDump => "pre-dump",
            Operation::Restore => "restore",
            Operation::CpuinfoCheck => "cpuinfo check",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed CRIU operation: which one, why, and the tail of CRIU's log.
///
/// Its `Display` is the whole story: `criu <op>: <why>` and, after a newline, the log tail.
#[derive(Debug, thiserror::Error)]
#[error("criu {}: {}{}", .0.op, .0.kind, .0.log)]
pub struct Error(Box<Details>);

#[derive(Debug)]
struct Details {
    op: Operation,
    kind: ErrorKind,
    log: LogTail,
}

impl Error {
    pub(crate) fn new(op: Operation, kind: ErrorKind) -> Self {
        Error(Box::new(Details {
            op,
            kind,
            log: LogTail::default(),
        }))
    }

    pub(crate) fn with_log(mut self, log: LogTail) -> Self {
        self.0.log = log;
        self
    }

    /// The operation that failed.
    pub fn operation(&self) -> Operation {
        self.0.op
    }

    /// Why it failed.
    pub fn kind(&self) -> &ErrorKind {
        &self.0.kind
    }

    /// The last lines of CRIU's log file (empty when CRIU wrote none, e.g. it could not start).
    pub fn log_tail(&self) -> &[String] {
        self.0.log.lines()
    }

    /// CRIU's `cr_errno` for a failure CRIU reported itself.
    pub fn cr_errno(&self) -> Option<i32> {
        match &self.0.kind {
            ErrorKind::Failed { cr_errno, .. } => *cr_errno,
            _ => None,
        }
    }

    /// True when the failure is a missing kernel or CRIU feature ([`ErrorKind::Unsupported`]).
    pub fn is_unsupported(&self) -> bool {
        matches!(self.0.kind, ErrorKind::Unsupported { .. })
    }
}

/// Why a CRIU operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// `criu swrk` could not be started.
    #[error("cannot start `{} swrk`: {source}", binary.display())]
    Spawn {
        /// The CRIU binary.
        binary: PathBuf,
        /// Why `exec` or the socketpair failed.
        source: io::Error,
    },
    /// The images or work directory could not be opened.
    #[error("cannot open {what} directory {}: {source}", path.display())]
    OpenDir {
        /// `images` or `work`.
        what: &'static str,
        /// The directory.
        path: PathBuf,
        /// Why `open` failed.
        source: io::Error,
    },
    /// The options cannot be turned into a valid request.
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    /// The kernel or CRIU lacks a feature the request needs.
    #[error("{feature} is not supported here: {detail}")]
    Unsupported {
        /// CRIU's name for the feature (`mem_track`, `lazy_pages`, ...).
        feature: &'static str,
        /// What it is needed for and why it is missing.
        detail: String,
    },
    /// Sending to or receiving from the `criu swrk` socket failed.
    #[error("RPC socket I/O with criu swrk failed: {0}")]
    Transport(#[source] io::Error),
    /// CRIU sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// `criu swrk` exited (was killed, crashed) before it answered.
    #[error("criu swrk (pid {pid}) {status} before answering")]
    SwrkExited {
        /// The swrk process.
        pid: u32,
        /// How it ended, e.g. `was killed by signal 9 (SIGKILL)`.
        status: String,
    },
    /// No message came from `criu swrk` within the configured timeout; swrk was killed.
    #[error("no answer from criu swrk within {0:?}; swrk was killed")]
    Timeout(Duration),
    /// CRIU answered that the operation failed.
    #[error(
        "criu reported failure{}{}{}",
        errno_text(*.cr_errno),
        errmsg_text(.errmsg.as_deref()),
        last_error_text(.errmsg.as_deref(), .last_error.as_deref())
    )]
    Failed {
        /// CRIU's `cr_errno` (an errno value such as `ESRCH`, `EEXIST`, `EBADRQC`), if it set one.
        cr_errno: Option<i32>,
        /// The first error CRIU logged (`cr_errmsg`). Often a harmless one (CRIU logs
        /// `Can't setup RLIMIT_NOFILE` as an error where it lacks CAP_SYS_RESOURCE).
        errmsg: Option<String>,
        /// The last `Error (...)` line of CRIU's log, usually the one that made it fail.
        last_error: Option<String>,
    },
    /// A [`Notify`](crate::Notify) callback failed, so the operation was aborted.
    #[error("notify callback for {script:?} failed: {source}")]
    Notify {
        /// The notify script name, e.g. `post-dump`.
        script: String,
        /// The callback's error.
        source: NotifyError,
    },
}

fn errno_text(cr_errno: Option<i32>) -> String {
    match cr_errno {
        Some(n) if n != 0 => format!(" (cr_errno {n}: {})", nix::errno::Errno::from_raw(n).desc()),
        _ => String::new(),
    }
}

fn errmsg_text(errmsg: Option<&str>) -> String {
    match errmsg.map(str::trim) {
        Some(m) if !m.is_empty() => format!(": {m}"),
        _ => String::new(),
    }
}

fn last_error_text(errmsg: Option<&str>, last: Option<&str>) -> String {
    match last.map(str::trim) {
        Some(last)
            if !last.is_empty()
                && !errmsg.is_some_and(|first| first.trim().ends_with(strip_stamp(last))) =>
        {
            format!("; last error: {}", strip_stamp(last))
        }
        _ => String::new(),
    }
}

/// `(00.030736) Error (...)` without the `(00.030736) ` timestamp CRIU's log puts first.
fn strip_stamp(line: &str) -> &str {
    match line
        .strip_prefix('(')
        .and_then(|rest| rest.split_once(") "))
    {
        Some((stamp, rest)) if stamp.chars().all(|c| c.is_ascii_digit() || c == '.') => rest,
        _ => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_error_names_operation_errno_text_errmsg_and_log_tail() {
        let log = LogTail::from_text(
            "/images/restore.log".into(),
            "(00.001) one\n(00.002) Error (criu/cr-restore.c:1): boom\n",
            20,
        );
        let err = Error::new(
            Operation::Restore,
            ErrorKind::Failed {
                cr_errno: Some(libc_esrch()),
                errmsg: Some(
                    "Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE\n".into(),
                ),
                last_error: Some("(00.002) Error (criu/cr-restore.c:1): boom".into()),
            },
        )
        .with_log(log);
        let text = err.to_string();
        assert!(
            text.starts_with("criu restore: criu reported failure (cr_errno 3: No such process"),
            "{text}"
        );
        assert!(
            text.contains(": Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE; "),
            "{text}"
        );
        assert!(
            text.contains("; last error: Error (criu/cr-restore.c:1): boom\n"),
            "{text}"
        );
        assert!(
            text.contains("last 2 lines of /images/restore.log"),
            "{text}"
        );
        assert!(text.contains("(00.001) one"), "{text}");
        assert_eq!(err.cr_errno(), Some(3));
        assert_eq!(err.log_tail().len(), 2);
        assert!(!err.is_unsupported());
    }

    #[test]
    fn failed_error_without_errno_or_message_stays_short() {
        let err = Error::new(
            Operation::Check,
            ErrorKind::Failed {
                cr_errno: Some(0),
                errmsg: None,
                last_error: None,
            },
        );
        assert_eq!(err.to_string(), "criu check: criu reported failure");
    }

    #[test]
    fn last_error_is_shown_only_when_it_differs_from_the_first() {
        let same = ErrorKind::Failed {
            cr_errno: None,
            errmsg: Some("Error (a.c:1): x\n".into()),
            last_error: Some("(00.1) Error (a.c:1): x".into()),
        };
        assert_eq!(same.to_string(), "criu reported failure: Error (a.c:1): x");
        let only_last = ErrorKind::Failed {
            cr_errno: None,
            errmsg: None,
            last_error: Some("Error (b.c:2): y".into()),
        };
        assert_eq!(
            only_last.to_string(),
            "criu reported failure; last error: Error (b.c:2): y"
        );
    }

    fn libc_esrch() -> i32 {
        nix::errno::Errno::ESRCH as i32
    }
}

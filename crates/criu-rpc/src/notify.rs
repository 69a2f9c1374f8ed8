//! Notify callbacks: CRIU's "action scripts" delivered over RPC.
//!
//! With notifications on, CRIU stops at fixed points of a dump or restore (`pre-dump`,
//! `network-lock`, `setup-namespaces`, `post-restore`, ...), sends a `NOTIFY` message and waits for
//! the client's answer. This module defines what a callback sees ([`Notification`]) and how it
//! answers ([`Notify`]); the message exchange itself lives in the session code.

use std::fmt;
use std::os::fd::OwnedFd;

use crate::error::NotifyError;

/// The notify scripts CRIU 4.x sends (`criu/action-scripts.c`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NotifyScript {
    /// Before image streaming starts.
    PreStream,
    /// Dump: before the tasks are seized.
    PreDump,
    /// Dump: images are complete; the tasks are still frozen.
    PostDump,
    /// Restore: before anything is restored.
    PreRestore,
    /// Restore: all tasks are restored, before they resume. Carries the root task's pid.
    PostRestore,
    /// Dump of a net namespace: lock the network now.
    NetworkLock,
    /// Unlock the network locked by `network-lock`.
    NetworkUnlock,
    /// Restore: the root task's namespaces exist; configure them (e.g. move veths). Carries the
    /// root task's pid.
    SetupNamespaces,
    /// Restore: namespaces are set up.
    PostSetupNamespaces,
    /// Restore: the tasks are about to resume.
    PreResume,
    /// Restore: the tasks were resumed.
    PostResume,
    /// Restore with `orphan_pts_master`: carries the master side of a restored pty.
    OrphanPtsMaster,
    /// CRIU is ready (page server, lazy pages).
    StatusReady,
    /// Dump: the client may name more external files (see [`Notification::add_external`]).
    QueryExtFiles,
    /// A script this client does not know.
    Other(String),
}

impl NotifyScript {
    /// The script name as CRIU sends it.
    pub fn as_str(&self) -> &str {
        match self {
            NotifyScript::PreStream => "pre-stream",
            NotifyScript::PreDump => "pre-dump",
            NotifyScript::PostDump => "post-dump",
            NotifyScript::PreRestore => "pre-restore",
            NotifyScript::PostRestore => "post-restore",
            NotifyScript::NetworkLock => "network-lock",
            NotifyScript::NetworkUnlock => "network-unlock",
            NotifyScript::SetupNamespaces => "setup-namespaces",
            NotifyScript::PostSetupNamespaces => "post-setup-namespaces",
            NotifyScript::PreResume => "pre-resume",
            NotifyScript::PostResume => "post-resume",
            NotifyScript::OrphanPtsMaster => "orphan-pts-master",
            NotifyScript::StatusReady => "status-ready",
            NotifyScript::QueryExtFiles => "query-ext-files",
            NotifyScript::Other(name) => name,
        }
    }
}

impl From<&str> for NotifyScript {
    fn from(name: &str) -> Self {
        match name {
            "pre-stream" => NotifyScript::PreStream,
            "pre-dump" => NotifyScript::PreDump,
            "post-dump" => NotifyScript::PostDump,
            "pre-restore" => NotifyScript::PreRestore,
            "post-restore" => NotifyScript::PostRestore,
            "network-lock" => NotifyScript::NetworkLock,
            "network-unlock" => NotifyScript::NetworkUnlock,
            "setup-namespaces" => NotifyScript::SetupNamespaces,
            "post-setup-namespaces" => NotifyScript::PostSetupNamespaces,
            "pre-resume" => NotifyScript::PreResume,
            "post-resume" => NotifyScript::PostResume,
            "orphan-pts-master" => NotifyScript::OrphanPtsMaster,
            "status-ready" => NotifyScript::StatusReady,
            "query-ext-files" => NotifyScript::QueryExtFiles,
            other => NotifyScript::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for NotifyScript {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One notification from CRIU, handed to a [`Notify`] callback.
#[derive(Debug)]
pub struct Notification {
    script: NotifyScript,
    pid: Option<i32>,
    fd: Option<OwnedFd>,
    criu_pid: u32,
    external: Vec<String>,
}

impl Notification {
    pub(crate) fn new(
        script: NotifyScript,
        pid: Option<i32>,
        fd: Option<OwnedFd>,
        criu_pid: u32,
    ) -> Self {
        Notification {
            script,
            pid,
            fd,
            criu_pid,
            external: Vec::new(),
        }
    }

    /// Which script CRIU runs.
    pub fn script(&self) -> &NotifyScript {
        &self.script
    }

    /// The root task's pid, sent with `setup-namespaces` and `post-restore`.
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    /// The pid of the `criu swrk` process serving this request.
    pub fn criu_pid(&self) -> u32 {
        self.criu_pid
    }

    /// Takes the fd CRIU sent with the notification (`orphan-pts-master` sends the pty master).
    /// An `orphan-pts-master` fd left here ends up in
    /// [`RestoreResult::orphan_pts_master`](crate::RestoreResult::orphan_pts_master).
    pub fn take_fd(&mut self) -> Option<OwnedFd> {
        self.fd.take()
    }

    /// Names one more external resource (the same syntax as
    /// [`DumpOptions::external`](crate::DumpOptions::external)) in answer to `query-ext-files`;
    /// ignored for other scripts.
    pub fn add_external(&mut self, external: impl Into<String>) {
        self.external.push(external.into());
    }

    pub(crate) fn into_parts(self) -> (Option<OwnedFd>, Vec<String>) {
        (self.fd, self.external)
    }
}

/// Receives CRIU's notifications. An `Err` makes CRIU abort the operation, which then fails with
/// [`ErrorKind::Notify`](crate::ErrorKind::Notify).
///
/// Closures `FnMut(&mut Notification) -> Result<(), NotifyError>` implement it.
pub trait Notify {
    /// Handles one notification; CRIU waits until it returns.
    fn notify(&mut self, notification: &mut Notification) -> Result<(), NotifyError>;
}

impl<F> Notify for F
where
    F: FnMut(&mut Notification) -> Result<(), NotifyError>,
{
    fn notify(&mut self, notification: &mut Notification) -> Result<(), NotifyError> {
        self(notification)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_names_round_trip() {
        for name in [
            "pre-stream",
            "pre-dump",
            "post-dump",
            "pre-restore",
            "post-restore",
            "network-lock",
            "network-unlock",
            "setup-namespaces",
            "post-setup-namespaces",
            "pre-resume",
            "post-resume",
            "orphan-pts-master",
            "status-ready",
            "query-ext-files",
            "something-new",
        ] {
            let script = NotifyScript::from(name);
            assert_eq!(script.as_str(), name);
            assert_eq!(
                matches!(script, NotifyScript::Other(_)),
                name == "something-new"
            );
        }
    }

    #[test]
    fn closures_are_callbacks() {
        let mut seen = Vec::new();
        let mut callback = |n: &mut Notification| -> Result<(), NotifyError> {
            seen.push(n.script().clone());
            n.add_external("mnt[/data]:data");
            Ok(())
        };
        let mut n = Notification::new(NotifyScript::QueryExtFiles, None, None, 1);
        Notify::notify(&mut callback, &mut n).unwrap();
        assert_eq!(seen, [NotifyScript::QueryExtFiles]);
        assert_eq!(n.into_parts().1, ["mnt[/data]:data"]);
    }
}

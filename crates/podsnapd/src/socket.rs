//! podsnapd's listening unix socket: created mode 0600 (only root talks CRI), a stale socket of a
//! crashed podsnapd replaced, a live one left alone, and on shutdown removed only if it is still
//! the one this process created.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// The socket's permissions: read and write for its owner (root) only.
const SOCKET_MODE: u32 = 0o600;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// Another process answers on the socket.
    #[error("{0} is in use: another podsnapd is serving there")]
    InUse(PathBuf),
    /// Something other than a socket is in the way.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SocketError {
    let path = path.to_path_buf();
    move |source| SocketError::Io {
        action,
        path,
        source,
    }
}

/// The socket podsnapd listens on, and which inode it is.
#[derive(Debug)]
pub struct ListeningSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl ListeningSocket {
    /// Binds `path` (creating its directory), replacing a stale socket there.
    pub async fn bind(path: &Path) -> Result<(Self, UnixListener), SocketError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if tokio::net::UnixStream::connect(path).await.is_ok() {
                    return Err(SocketError::InUse(path.to_path_buf()));
                }
                tracing::info!(path = %path.display(), "removing the stale socket of an earlier podsnapd");
                std::fs::remove_file(path).map_err(io_error("removing stale socket", path))?;
            }
            Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_error("inspecting", path)(err)),
        }
        // With the usual umask (022) the socket is not writable, so not connectable, by anyone
        // but root between bind and chmod.
        let listener = UnixListener::bind(path).map_err(io_error("binding", path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(io_error("setting mode 0600 on", path))?;
        let meta = std::fs::symlink_metadata(path).map_err(io_error("inspecting", path))?;
        let socket = Self {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        Ok((socket, listener))
    }

    /// Removes the socket, unless another process has replaced it meanwhile.
    pub fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == self.dev && meta.ino() == self.ino => {
                if let Err(err) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), %err, "cannot remove the socket");
                }
            }
            Ok(_) => {
                tracing::info!(path = %self.path.display(), "socket was replaced by another process; leaving it")
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(path = %self.path.display(), %err, "cannot inspect the socket")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn socket_is_0600_replaces_a_stale_one_and_refuses_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/podsnapd.sock");

        let (socket, listener) = ListeningSocket::bind(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // Live: another bind fails and leaves it in place.
        assert!(matches!(
            ListeningSocket::bind(&path).await,
            Err(SocketError::InUse(_))
        ));
        assert!(path.exists());

        // Stale (its listener gone, the file left behind as after a crash): replaced.
        drop(listener);
        drop(socket);
        let (second, _listener) = ListeningSocket::bind(&path).await.unwrap();
        second.remove();
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_socket_replaced_by_another_process_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("podsnapd.sock");
        let (socket, _listener) = ListeningSocket::bind(&path).await.unwrap();
        // Another server's socket moved into place (created first, so it has another inode).
        let other = dir.path().join("other.sock");
        let _other_listener = UnixListener::bind(&other).unwrap();
        std::fs::rename(&other, &path).unwrap();
        socket.remove();
        assert!(path.exists(), "removed a socket that was not ours");
    }

    #[tokio::test]
    async fn a_regular_file_in_the_way_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("podsnapd.sock");
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            ListeningSocket::bind(&path).await,
            Err(SocketError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    }
}

//! A container's writable-layer changes, carried across checkpoint and restore in the layout
//! CRI-O, containerd and `checkpointctl` share: `rootfs-diff.tar` (files, directories and
//! symlinks the container created or changed) and `deleted.files` (a JSON list of paths it
//! removed). Captured from the overlay upper directory; applied to the new container's rootfs
//! before CRIU restores the processes. [`pack_tree`] and [`unpack_tree_at`] carry any other
//! directory tree the same way (the pod's emptyDir volumes, [`crate::volumes`]).
//!
//! Neither side resolves a path that a container could change under it. Capture walks the tree
//! by directory descriptor: each name is opened with `O_PATH | O_NOFOLLOW` relative to its
//! parent's descriptor, and everything after goes through that descriptor: the tar header is
//! built from its `fstat`, a directory is listed through it, a regular file's data is read from
//! a reopening of it (`/proc/self/fd`, checked to be the same inode), a symlink's target is read
//! with `readlinkat` on it. A file swapped for a symlink meanwhile is archived as the symlink,
//! never as a host file. Sparse files become GNU sparse entries.
//!
//! Restoring trusts nothing in the archive, and runs while other containers of the pod may run
//! and plant symlinks: every path must be relative without `..`; each entry's parent directory
//! is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`
//! relative to a descriptor of the root, so no symlink is followed (not even one that stays
//! inside the root: an overlay upper directory records real paths) and nothing outside the root
//! is reached; a file is created with `O_CREAT | O_EXCL | O_NOFOLLOW` (an existing entry of that
//! name, a directory with its content, removed first with `unlinkat`), a directory with
//! `mkdirat` (an existing one is kept), a symlink with `symlinkat`
//! (its target is data, never followed), a hard link with `linkat` between two names both
//! resolved beneath the root; ownership, mode and mtime are set on the descriptor. GNU sparse
//! entries are accepted (whole zero blocks become holes). Device nodes, FIFOs, sockets and
//! other entry types are refused. The deletions of `deleted.files` are `unlinkat`s relative to
//! a parent opened the same way.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail, ensure};

use crate::checkpoint::userns::IdShift;

pub const ROOTFS_DIFF: &str = "rootfs-diff.tar";
pub const DELETED_FILES: &str = "deleted.files";

/// Deepest directory nesting captured or removed: the descriptor walks hold one directory open
/// per level, and refuse past this rather than run out of descriptors or stack.
const MAX_DEPTH: usize = 512;

/// Whether a directory of the upper layer hides the lower layers' content.
fn is_opaque(dir: BorrowedFd) -> bool {
    let mut value = [0u8; 1];
    // SAFETY: an open descriptor, a NUL-terminated name and a buffer of the length passed.
    let n = unsafe {
        libc::fgetxattr(
            dir.as_raw_fd(),
            c"trusted.overlay.opaque".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n == 1 && value[0] == b'y'
}

/// Writes the changes recorded in the overlay `upper` directory into `dir`.
pub fn capture(upper: &Path, dir: &Path) -> anyhow::Result<()> {
    let tar_path = dir.join(ROOTFS_DIFF);
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tar_path)
        .with_context(|| format!("create {}", tar_path.display()))?;
    let deleted = archive_tree(upper, file, &tar_path)?;
    let deleted_path = dir.join(DELETED_FILES);
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&deleted_path)
        .and_then(|f| serde_json::to_writer(f, &deleted).map_err(io::Error::other))
        .with_context(|| format!("write {}", deleted_path.display()))
}

/// Archives the directory tree `src` (directories, regular files and symlinks; sockets, FIFOs
/// and devices are left out) into a new root-only tar file `tar_path`.
pub fn pack_tree(src: &Path, tar_path: &Path) -> anyhow::Result<()> {
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tar_path)
        .with_context(|| format!("create {}", tar_path.display()))?;
    archive_tree(src, file, tar_path).map(drop)
}

/// Archives the tree `src` into `file` (`tar_path`, for messages); returns the paths its overlay
/// whiteouts and opaque directories record as deleted.
fn archive_tree(src: &Path, file: fs::File, tar_path: &Path) -> anyhow::Result<Vec<String>> {
    // `src` itself is the host's path (an overlay upper directory, a kubelet volume directory).
    let root = at::open_dir(src).with_context(|| format!("open {}", src.display()))?;
    let mut builder = tar::Builder::new(file);
    let mut deleted = Vec::new();
    walk(root.as_fd(), Path::new(""), 0, &mut builder, &mut deleted)
        .with_context(|| format!("archive {} into {}", src.display(), tar_path.display()))?;
    builder
        .into_inner()
        .with_context(|| format!("finish {}", tar_path.display()))?;
    Ok(deleted)
}

/// A tar header (mode, owner, mtime, type, size) from a descriptor's metadata.
fn header_for(meta: &fs::Metadata) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    header
}

fn walk(
    dir: BorrowedFd,
    relative: &Path,
    depth: usize,
    builder: &mut tar::Builder<fs::File>,
    deleted: &mut Vec<String>,
) -> anyhow::Result<()> {
    ensure!(
        depth < MAX_DEPTH,
        "/{}: directories nested deeper than {MAX_DEPTH} levels",
        relative.display()
    );
    let mut names = at::read_dir(dir).with_context(|| format!("list /{}", relative.display()))?;
    names.sort();
    for name in names {
        let path = relative.join(&name);
        // A handle on whatever `name` is now: opened without following a symlink and without
        // the side effects of opening a device or FIFO. Everything below goes through it.
        let handle = match at::open(dir, &name, libc::O_PATH, 0) {
            Ok(fd) => fs::File::from(fd),
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("open /{}", path.display())),
        };
        let meta = handle
            .metadata()
            .with_context(|| format!("stat /{}", path.display()))?;
        let kind = meta.file_type();
        if kind.is_char_device() && meta.rdev() == 0 {
            // An overlay whiteout: the file was deleted.
            deleted.push(format!("/{}", path.display()));
        } else if kind.is_dir() {
            let sub = at::open(
                handle.as_fd(),
                OsStr::new("."),
                libc::O_RDONLY | libc::O_DIRECTORY,
                0,
            )
            .with_context(|| format!("open /{}", path.display()))?;
            if is_opaque(sub.as_fd()) {
                deleted.push(format!("/{}", path.display()));
            }
            builder
                .append_data(&mut header_for(&meta), &path, io::empty())
                .with_context(|| format!("archive /{}", path.display()))?;
            // One descriptor per level held while descending, not two.
            drop(handle);
            walk(sub.as_fd(), &path, depth + 1, builder, deleted)?;
        } else if kind.is_file() {
            let mut file = at::reopen(handle.as_fd(), libc::O_RDONLY)
                .with_context(|| format!("open /{}", path.display()))?;
            let opened = file
                .metadata()
                .with_context(|| format!("stat /{}", path.display()))?;
            ensure!(
                (opened.dev(), opened.ino()) == (meta.dev(), meta.ino()),
                "/{}: reopened as another file",
                path.display()
            );
            builder
                .append_file(&path, &mut file)
                .with_context(|| format!("archive /{}", path.display()))?;
        } else if kind.is_symlink() {
            let target = at::read_link(handle.as_fd())
                .with_context(|| format!("read symlink /{}", path.display()))?;
            builder
                .append_link(&mut header_for(&meta), &path, Path::new(&target))
                .with_context(|| format!("archive /{}", path.display()))?;
        }
        // Sockets, FIFOs and devices the container made are not carried over.
    }
    Ok(())
}

/// A path from the archive or `deleted.files` as a relative path without `..`, or an error
/// naming it and `what` it would escape.
fn contained(path: &Path, what: &str) -> anyhow::Result<PathBuf> {
    let mut clean = PathBuf::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => clean.push(part),
            Component::ParentDir | Component::Prefix(_) => {
                bail!("path {path:?} escapes {what}")
            }
        }
    }
    ensure!(!clean.as_os_str().is_empty(), "empty path {path:?}");
    Ok(clean)
}

/// The parent directory and last name of a [`contained`] path.
fn split(relative: &Path) -> anyhow::Result<(&Path, &OsStr)> {
    let name = relative
        .file_name()
        .with_context(|| format!("path {relative:?} has no name"))?;
    Ok((relative.parent().unwrap_or(Path::new("")), name))
}

/// Applies `deleted.files` and `rootfs-diff.tar` from `dir` (either may be absent) to `rootfs`,
/// moving the archive's owners by `shift` (a container in a user namespace under a new host
/// range, [`crate::checkpoint::userns`]).
pub fn apply(dir: &Path, rootfs: &Path, shift: Option<&IdShift>) -> anyhow::Result<()> {
    const WHAT: &str = "the container's rootfs";
    let root = at::open_dir(rootfs).with_context(|| format!("open {}", rootfs.display()))?;
    let deleted_path = dir.join(DELETED_FILES);
    if deleted_path.exists() {
        let deleted: Vec<String> = serde_json::from_slice(
            &fs::read(&deleted_path).with_context(|| format!("read {}", deleted_path.display()))?,
        )
        .with_context(|| format!("parse {}", deleted_path.display()))?;
        for path in deleted {
            let relative = contained(Path::new(&path), WHAT)?;
            let (parent, name) = split(&relative)?;
            let parent = match at::open_beneath(root.as_fd(), parent) {
                Ok(fd) => fd,
                // Nothing there to delete.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                    continue;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("deleted path {path:?} in {WHAT}"));
                }
            };
            at::remove_all(parent.as_fd(), name)
                .with_context(|| format!("delete {path:?} from {WHAT}"))?;
        }
    }
    let tar_path = dir.join(ROOTFS_DIFF);
    if tar_path.exists() {
        unpack_shifted(&tar_path, root.as_fd(), WHAT, shift)?;
    }
    Ok(())
}

/// [`unpack_tree_at`] into the directory at the path `root` (which the host resolved).
#[cfg(test)]
pub fn unpack_tree(tar_path: &Path, root: &Path, what: &str) -> anyhow::Result<()> {
    let root = at::open_dir(root).with_context(|| format!("open {what} ({})", root.display()))?;
    unpack_tree_at(tar_path, root.as_fd(), what)
}

/// Unpacks the tar file `tar_path` into the directory open as `root`, trusting nothing in it
/// (see the module docs; `what` names `root` in messages).
pub fn unpack_tree_at(tar_path: &Path, root: BorrowedFd, what: &str) -> anyhow::Result<()> {
    unpack_shifted(tar_path, root, what, None)
}

/// [`unpack_tree_at`], every owner moved by `shift`.
fn unpack_shifted(
    tar_path: &Path,
    root: BorrowedFd,
    what: &str,
    shift: Option<&IdShift>,
) -> anyhow::Result<()> {
    let name = tar_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file = fs::File::open(tar_path).with_context(|| format!("open {}", tar_path.display()))?;
    let mut archive = tar::Archive::new(io::BufReader::new(file));
    let mut directories = Vec::new();
    for entry in archive.entries().with_context(|| format!("read {name}"))? {
        let mut entry = entry.with_context(|| format!("read {name}"))?;
        let path = entry
            .path()
            .with_context(|| format!("read {name}"))?
            .into_owned();
        let relative = contained(&path, what)?;
        use tar::EntryType::*;
        match entry.header().entry_type() {
            Regular | Continuous | GNUSparse | Directory | Symlink | Link => {}
            other => bail!("{name} entry {path:?} is a {other:?}: refused"),
        }
        unpack_entry(&mut entry, root, &relative, what, shift, &mut directories)
            .with_context(|| format!("unpack {path:?} from {name} into {what}"))?;
    }
    // Directory times last: creating what is in them changed them.
    for (relative, mtime) in directories.iter().rev() {
        match at::open_beneath(root, relative) {
            Ok(dir) => at::set_times(dir.as_fd(), *mtime)
                .with_context(|| format!("set the time of {relative:?} in {what}"))?,
            // Replaced by a later entry.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {}
            Err(e) => return Err(e).with_context(|| format!("open {relative:?} in {what}")),
        }
    }
    Ok(())
}

/// Owner, mode and mtime of an entry, as the archive has them.
struct Attributes {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: i64,
}

impl Attributes {
    fn of(header: &tar::Header) -> anyhow::Result<Self> {
        let uid = header.uid().context("uid")?;
        let gid = header.gid().context("gid")?;
        Ok(Self {
            uid: u32::try_from(uid).with_context(|| format!("uid {uid} out of range"))?,
            gid: u32::try_from(gid).with_context(|| format!("gid {gid} out of range"))?,
            mode: header.mode().context("mode")? & 0o7777,
            // As the tar crate does: a 0 mtime becomes 1, which more tools take well.
            mtime: i64::try_from(header.mtime().context("mtime")?)
                .unwrap_or(i64::MAX)
                .max(1),
        })
    }

    /// Owner first (a change of owner clears set-id bits), then mode and time.
    fn set(&self, fd: BorrowedFd) -> io::Result<()> {
        at::chown(fd, self.uid, self.gid)?;
        at::chmod(fd, self.mode)?;
        at::set_times(fd, self.mtime)
    }
}

/// The directory `relative` beneath `root`, with any missing directories on the way made (0755).
fn open_parents(root: BorrowedFd, relative: &Path) -> io::Result<std::os::fd::OwnedFd> {
    match at::open_beneath(root, relative) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        other => return other,
    }
    let mut dir = at::open_beneath(root, Path::new(""))?;
    for component in relative.components() {
        let name = component.as_os_str();
        dir = match at::open_beneath(dir.as_fd(), Path::new(name)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match at::mkdir(dir.as_fd(), name, 0o755) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                    _ => {}
                }
                at::open_beneath(dir.as_fd(), Path::new(name))?
            }
            other => other?,
        };
    }
    Ok(dir)
}

fn unpack_entry<R: Read>(
    entry: &mut tar::Entry<R>,
    root: BorrowedFd,
    relative: &Path,
    what: &str,
    shift: Option<&IdShift>,
    directories: &mut Vec<(PathBuf, i64)>,
) -> anyhow::Result<()> {
    let mut attributes = Attributes::of(entry.header())?;
    if let Some(shift) = shift {
        (attributes.uid, attributes.gid, attributes.mode) =
            shift.apply(attributes.uid, attributes.gid, attributes.mode);
    }
    let (parent, name) = split(relative)?;
    let parent = open_parents(root, parent).context("open its directory")?;
    let parent = parent.as_fd();
    match entry.header().entry_type() {
        tar::EntryType::Directory => {
            match at::mkdir(parent, name, 0o700) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let is_dir = at::lstat(parent, name)?
                        .is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFDIR);
                    if !is_dir {
                        at::remove_all(parent, name)?;
                        at::mkdir(parent, name, 0o700)?;
                    }
                }
                other => other.context("mkdir")?,
            }
            let dir = at::open(parent, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            at::chown(dir.as_fd(), attributes.uid, attributes.gid)?;
            at::chmod(dir.as_fd(), attributes.mode)?;
            directories.push((relative.to_path_buf(), attributes.mtime));
        }
        tar::EntryType::Symlink => {
            let target = entry
                .link_name_bytes()
                .filter(|t| !t.is_empty())
                .context("a symlink without a target")?
                .into_owned();
            at::remove_all(parent, name)?;
            at::symlink(OsStr::from_bytes(&target), parent, name).context("symlink")?;
            at::chown_link(parent, name, attributes.uid, attributes.gid)?;
            at::set_link_times(parent, name, attributes.mtime)?;
        }
        tar::EntryType::Link => {
            let target = entry
                .link_name()
                .context("hard link target")?
                .context("a hard link without a target")?
                .into_owned();
            let target = contained(&target, what)?;
            ensure!(target != relative, "a hard link to itself");
            let (target_parent, target_name) = split(&target)?;
            let target_parent = at::open_beneath(root, target_parent)
                .with_context(|| format!("hard link target {target:?}"))?;
            at::remove_all(parent, name)?;
            at::link(target_parent.as_fd(), target_name, parent, name)
                .with_context(|| format!("link to {target:?}"))?;
        }
        _ => {
            let size = entry.size();
            at::remove_all(parent, name)?;
            let file = at::open(
                parent,
                name,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                0o600,
            )
            .context("create")?;
            let mut file = fs::File::from(file);
            copy_data(entry, size, &mut file)?;
            attributes.set(file.as_fd())?;
        }
    }
    Ok(())
}

/// Copies an entry's `size` bytes of data (a sparse entry's holes read as zeros) into the new,
/// empty `file`, leaving holes where whole blocks are zero; all `size` bytes must arrive.
fn copy_data(data: &mut impl Read, size: u64, file: &mut fs::File) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    let mut copied = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match data.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("read the archive"),
            }
        }
        if filled == 0 {
            break;
        }
        let block = &buf[..filled];
        if block.iter().all(|&b| b == 0) {
            file.seek(SeekFrom::Current(filled as i64))
                .context("seek")?;
        } else {
            file.write_all(block).context("write")?;
        }
        copied += filled as u64;
    }
    ensure!(
        copied == size,
        "the archive ends after {copied} of the entry's {size} bytes"
    );
    // A trailing hole: the size is the file's length, not what was written.
    file.set_len(copied).context("set the length")
}

/// Directory-relative file operations on descriptors: what capture and restore are made of, so
/// that no path a container controls is resolved by name. Names passed are single components.
pub(crate) mod at {
    use std::ffi::{CStr, CString, OsStr, OsString};
    use std::fs;
    use std::io;
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    use std::path::Path;

    fn invalid(message: String) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, message)
    }

    fn cstring(bytes: &[u8]) -> io::Result<CString> {
        CString::new(bytes)
            .map_err(|_| invalid(format!("{:?} holds a NUL byte", OsStr::from_bytes(bytes))))
    }

    /// `name` as a C string, if it is a single name (`.` allowed, for the directory itself).
    fn single(name: &OsStr) -> io::Result<CString> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes == b".." || bytes.contains(&b'/') {
            return Err(invalid(format!("{name:?} is not a single name")));
        }
        cstring(bytes)
    }

    fn check(rc: libc::c_int) -> io::Result<()> {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor the kernel just returned, owned by nothing else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Opens the directory at `path`, a path the host controls (symlinks in it are followed).
    pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
        let path = cstring(path.as_os_str().as_bytes())?;
        // SAFETY: a NUL-terminated path.
        owned(unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })
    }

    /// Opens `name` in `dir` with `flags` and `O_NOFOLLOW | O_CLOEXEC`: a symlink is opened as
    /// itself (`O_PATH`) or refused, never followed.
    pub fn open(
        dir: BorrowedFd,
        name: &OsStr,
        flags: libc::c_int,
        mode: libc::mode_t,
    ) -> io::Result<OwnedFd> {
        let name = single(name)?;
        // SAFETY: an open descriptor and a NUL-terminated name.
        owned(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                libc::c_uint::from(mode),
            )
        })
    }

    /// Opens the directory `relative` (normal components only; empty for `root` itself) beneath
    /// `root` with `openat2`: no symlink or magic link is followed and nothing outside `root` is
    /// reached, whatever is planted on the way.
    pub fn open_beneath(root: BorrowedFd, relative: &Path) -> io::Result<OwnedFd> {
        use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
        let path = if relative.as_os_str().is_empty() {
            Path::new(".")
        } else {
            relative
        };
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
        // The kernel answers EAGAIN when a rename or mount raced the lookup: try again.
        for _ in 0..64 {
            let error = match nix::fcntl::openat2(root.as_raw_fd(), path, how) {
                Ok(fd) => return owned(fd),
                Err(errno) => io::Error::from(errno),
            };
            match error.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => continue,
                Some(libc::ELOOP | libc::EXDEV) => {
                    return Err(io::Error::new(
                        error.kind(),
                        format!(
                            "{relative:?} passes through a symlink or leaves its root: refused ({error})"
                        ),
                    ));
                }
                Some(libc::ENOSYS) => {
                    return Err(io::Error::new(
                        error.kind(),
                        format!("openat2 is not supported (Linux 5.6 or later needed): {error}"),
                    ));
                }
                _ => return Err(error),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("{relative:?}: lookup kept racing renames"),
        ))
    }

    /// A new descriptor with `flags` for the file `fd` (an `O_PATH` handle) refers to, through
    /// `/proc/self/fd`: the same inode, never another name's.
    pub fn reopen(fd: BorrowedFd, flags: libc::c_int) -> io::Result<fs::File> {
        let path = cstring(format!("/proc/self/fd/{}", fd.as_raw_fd()).as_bytes())?;
        // SAFETY: a NUL-terminated path.
        owned(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC | libc::O_NOCTTY) })
            .map(fs::File::from)
    }

    /// The names in the directory `dir` but `.` and `..`, unsorted.
    pub fn read_dir(dir: BorrowedFd) -> io::Result<Vec<OsString>> {
        // A descriptor of its own: the stream moves its offset, and closes it.
        let fd = open(dir, OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0)?.into_raw_fd();
        // SAFETY: an open directory descriptor, whose ownership passes to the stream.
        let stream = unsafe { libc::fdopendir(fd) };
        if stream.is_null() {
            let error = io::Error::last_os_error();
            // SAFETY: the descriptor is still ours when fdopendir fails.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
            return Err(error);
        }
        let mut names = Vec::new();
        let result = loop {
            nix::errno::Errno::clear();
            // SAFETY: an open stream, read by this thread only.
            let entry = unsafe { libc::readdir(stream) };
            if entry.is_null() {
                break match nix::errno::Errno::last_raw() {
                    0 => Ok(()),
                    errno => Err(io::Error::from_raw_os_error(errno)),
                };
            }
            // SAFETY: readdir returned an entry whose name is NUL-terminated, valid until
            // the next readdir.
            let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) }.to_bytes();
            if name != b"." && name != b".." {
                names.push(OsString::from_vec(name.to_vec()));
            }
        };
        // SAFETY: the stream opened above, closed once.
        unsafe { libc::closedir(stream) };
        result.map(|()| names)
    }

    /// The target of the symlink `fd` (an `O_PATH | O_NOFOLLOW` handle on it).
    pub fn read_link(fd: BorrowedFd) -> io::Result<OsString> {
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: an open descriptor, an empty NUL-terminated path (the link itself) and a
            // buffer of the length passed.
            let n = unsafe {
                libc::readlinkat(
                    fd.as_raw_fd(),
                    c"".as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
            if n < buf.len() {
                buf.truncate(n);
                return Ok(OsString::from_vec(buf));
            }
            buf.resize(buf.len() * 2, 0);
        }
    }

    /// `name`'s own metadata in `dir` (a symlink's, not its target's); `None` when there is none.
    pub fn lstat(dir: BorrowedFd, name: &OsStr) -> io::Result<Option<libc::stat>> {
        let name = single(name)?;
        let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: an open descriptor, a NUL-terminated name and room for a stat.
        let rc = unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                name.as_ptr(),
                stat.as_mut_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        match check(rc) {
            // SAFETY: fstatat filled it.
            Ok(()) => Ok(Some(unsafe { stat.assume_init() })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn mkdir(dir: BorrowedFd, name: &OsStr, mode: libc::mode_t) -> io::Result<()> {
        let name = single(name)?;
        // SAFETY: an open descriptor and a NUL-terminated name.
        check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) })
    }

    fn unlink(dir: BorrowedFd, name: &CStr, flags: libc::c_int) -> io::Result<()> {
        // SAFETY: an open descriptor and a NUL-terminated name.
        check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })
    }

    /// Removes `name` from `dir`, a directory with everything in it; never follows a symlink
    /// nor leaves `dir`. Nothing there is no error.
    pub fn remove_all(dir: BorrowedFd, name: &OsStr) -> io::Result<()> {
        remove_all_below(dir, name, 0)
    }

    fn remove_all_below(dir: BorrowedFd, name: &OsStr, depth: usize) -> io::Result<()> {
        let cname = single(name)?;
        match unlink(dir, &cname, 0) {
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => return other,
        }
        if depth >= super::MAX_DEPTH {
            return Err(io::Error::other(format!(
                "directories nested deeper than {} levels",
                super::MAX_DEPTH
            )));
        }
        {
            let sub = open(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
            for child in read_dir(sub.as_fd())? {
                remove_all_below(sub.as_fd(), &child, depth + 1)?;
            }
        }
        match unlink(dir, &cname, libc::AT_REMOVEDIR) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// A symlink `name` in `dir` whose target is `target`, as data.
    pub fn symlink(target: &OsStr, dir: BorrowedFd, name: &OsStr) -> io::Result<()> {
        let target = cstring(target.as_bytes())?;
        let name = single(name)?;
        // SAFETY: NUL-terminated strings and an open descriptor.
        check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })
    }

    /// A hard link `new_name` in `new_dir` to `old_name` in `old_dir` (a symlink linked as
    /// itself).
    pub fn link(
        old_dir: BorrowedFd,
        old_name: &OsStr,
        new_dir: BorrowedFd,
        new_name: &OsStr,
    ) -> io::Result<()> {
        let old_name = single(old_name)?;
        let new_name = single(new_name)?;
        // SAFETY: open descriptors and NUL-terminated names.
        check(unsafe {
            libc::linkat(
                old_dir.as_raw_fd(),
                old_name.as_ptr(),
                new_dir.as_raw_fd(),
                new_name.as_ptr(),
                0,
            )
        })
    }

    /// Moves `old_name` in `old_dir` to `new_name` in `new_dir`, failing if that exists.
    pub fn rename_noreplace(
        old_dir: BorrowedFd,
        old_name: &OsStr,
        new_dir: BorrowedFd,
        new_name: &OsStr,
    ) -> io::Result<()> {
        let old_name = single(old_name)?;
        let new_name = single(new_name)?;
        // SAFETY: open descriptors and NUL-terminated names.
        check(unsafe {
            libc::renameat2(
                old_dir.as_raw_fd(),
                old_name.as_ptr(),
                new_dir.as_raw_fd(),
                new_name.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        })
    }

    pub fn chown(fd: BorrowedFd, uid: u32, gid: u32) -> io::Result<()> {
        // SAFETY: an open descriptor.
        check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })
    }

    pub fn chmod(fd: BorrowedFd, mode: u32) -> io::Result<()> {
        // SAFETY: an open descriptor.
        check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) })
    }

    fn times(mtime: i64) -> [libc::timespec; 2] {
        let time = libc::timespec {
            tv_sec: mtime,
            tv_nsec: 0,
        };
        [time, time]
    }

    /// Sets access and modification time to `mtime` (seconds since the epoch).
    pub fn set_times(fd: BorrowedFd, mtime: i64) -> io::Result<()> {
        let times = times(mtime);
        // SAFETY: an open descriptor and two timespecs.
        check(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) })
    }

    /// [`chown`] of the symlink `name` in `dir` itself.
    pub fn chown_link(dir: BorrowedFd, name: &OsStr, uid: u32, gid: u32) -> io::Result<()> {
        let name = single(name)?;
        // SAFETY: an open descriptor and a NUL-terminated name.
        check(unsafe {
            libc::fchownat(
                dir.as_raw_fd(),
                name.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
    }

    /// [`set_times`] of the symlink `name` in `dir` itself.
    pub fn set_link_times(dir: BorrowedFd, name: &OsStr, mtime: i64) -> io::Result<()> {
        let name = single(name)?;
        let times = times(mtime);
        // SAFETY: an open descriptor, a NUL-terminated name and two timespecs.
        check(unsafe {
            libc::utimensat(
                dir.as_raw_fd(),
                name.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, PermissionsExt, symlink};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    #[test]
    fn changes_and_deletions_round_trip() {
        let upper = tempfile::tempdir().unwrap();
        fs::create_dir_all(upper.path().join("data/sub")).unwrap();
        fs::write(upper.path().join("data/sub/file"), b"hello").unwrap();
        symlink("sub/file", upper.path().join("data/link")).unwrap();
        nix::sys::stat::mknod(
            &upper.path().join("gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
        let out = tempfile::tempdir().unwrap();
        capture(upper.path(), out.path()).unwrap();
        let deleted: Vec<String> =
            serde_json::from_slice(&fs::read(out.path().join(DELETED_FILES)).unwrap()).unwrap();
        assert_eq!(deleted, vec!["/gone".to_string()]);

        let rootfs = tempfile::tempdir().unwrap();
        fs::write(rootfs.path().join("gone"), b"old").unwrap();
        apply(out.path(), rootfs.path(), None).unwrap();
        assert_eq!(
            fs::read(rootfs.path().join("data/sub/file")).unwrap(),
            b"hello"
        );
        assert_eq!(
            fs::read_link(rootfs.path().join("data/link")).unwrap(),
            Path::new("sub/file")
        );
        assert!(!rootfs.path().join("gone").exists());
    }

    #[test]
    fn owner_mode_and_time_are_restored() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir(src.path().join("dir")).unwrap();
        let file = src.path().join("dir/tool");
        fs::write(&file, b"#!/bin/sh\n").unwrap();
        std::os::unix::fs::chown(&file, Some(1234), Some(5678)).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o4751)).unwrap();
        fs::set_permissions(src.path().join("dir"), fs::Permissions::from_mode(0o705)).unwrap();
        let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let out = tempfile::tempdir().unwrap();
        let tar = out.path().join("t.tar");
        pack_tree(src.path(), &tar).unwrap();
        let dst = tempfile::tempdir().unwrap();
        unpack_tree(&tar, dst.path(), "the test tree").unwrap();
        let meta = fs::symlink_metadata(dst.path().join("dir/tool")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
        assert_eq!(meta.mode() & 0o7777, 0o4751);
        assert_eq!(meta.mtime(), 1_000_000_000);
        let dir = fs::symlink_metadata(dst.path().join("dir")).unwrap();
        assert_eq!(dir.mode() & 0o7777, 0o705);
    }

    #[test]
    fn deleted_paths_that_escape_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(DELETED_FILES), br#"["/../../etc/passwd"]"#).unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        let err = apply(dir.path(), rootfs.path(), None).unwrap_err();
        assert!(err.to_string().contains("escapes"), "{err}");
    }

    /// A GNU header with owner root and a time, as real archives have.
    pub(crate) fn new_header() -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header
    }

    /// An archive with one regular file `name` holding `data`.
    fn one_file(name: &str, data: &[u8]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = new_header();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, data).unwrap();
        builder.into_inner().unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_symlink_in_the_rootfs_is_not_followed_out_of_it() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), b"keep").unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        symlink(outside.path(), rootfs.path().join("evil")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(DELETED_FILES), br#"["/evil/victim"]"#).unwrap();
        assert!(apply(dir.path(), rootfs.path(), None).is_err());
        assert!(outside.path().join("victim").exists());

        // A tar entry written through the symlink is refused too.
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join(ROOTFS_DIFF),
            one_file("evil/victim", b"pwnd"),
        )
        .unwrap();
        assert!(apply(dir.path(), rootfs.path(), None).is_err());
        assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"keep");
    }

    #[test]
    fn a_planted_etc_symlink_is_not_followed_by_etc_passwd() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        symlink(outside.path(), root.path().join("etc")).unwrap();
        let work = tempfile::tempdir().unwrap();
        let tar = work.path().join("t.tar");
        fs::write(&tar, one_file("etc/passwd", b"root::0:0::/:/bin/sh\n")).unwrap();
        let err = unpack_tree(&tar, root.path(), "the test root").unwrap_err();
        assert!(format!("{err:#}").contains("symlink"), "{err:#}");
        assert!(names(outside.path()).is_empty());
        assert!(
            fs::symlink_metadata(root.path().join("etc"))
                .unwrap()
                .is_symlink()
        );

        // Nor a symlink deeper down, nor one inside the root (no symlink is followed at all).
        fs::create_dir(root.path().join("usr")).unwrap();
        symlink(outside.path(), root.path().join("usr/lib")).unwrap();
        fs::write(&tar, one_file("usr/lib/libc.so", b"elf")).unwrap();
        assert!(unpack_tree(&tar, root.path(), "the test root").is_err());
        symlink("usr", root.path().join("inside")).unwrap();
        fs::write(&tar, one_file("inside/file", b"x")).unwrap();
        assert!(unpack_tree(&tar, root.path(), "the test root").is_err());
        assert!(names(outside.path()).is_empty());
        assert!(!root.path().join("usr/file").exists());
    }

    #[test]
    fn an_archive_cannot_plant_a_symlink_and_write_through_it() {
        let outside = tempfile::tempdir().unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = new_header();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        header.set_mode(0o777);
        builder
            .append_link(&mut header, "etc", outside.path())
            .unwrap();
        let mut header = new_header();
        header.set_size(1);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, "etc/x", &b"x"[..])
            .unwrap();
        let work = tempfile::tempdir().unwrap();
        let tar = work.path().join("t.tar");
        fs::write(&tar, builder.into_inner().unwrap()).unwrap();
        let root = tempfile::tempdir().unwrap();
        assert!(unpack_tree(&tar, root.path(), "the test root").is_err());
        assert!(names(outside.path()).is_empty());
        // The symlink itself is there, as data.
        assert_eq!(
            fs::read_link(root.path().join("etc")).unwrap(),
            outside.path()
        );
    }

    #[test]
    fn a_hard_link_cannot_reach_out_through_a_symlink() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("shadow"), b"secret").unwrap();
        let root = tempfile::tempdir().unwrap();
        symlink(outside.path(), root.path().join("etc")).unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = new_header();
        header.set_entry_type(tar::EntryType::Link);
        header.set_size(0);
        header.set_mode(0o644);
        builder
            .append_link(&mut header, "stolen", "etc/shadow")
            .unwrap();
        let work = tempfile::tempdir().unwrap();
        let tar = work.path().join("t.tar");
        fs::write(&tar, builder.into_inner().unwrap()).unwrap();
        assert!(unpack_tree(&tar, root.path(), "the test root").is_err());
        assert!(!root.path().join("stolen").exists());
        let meta = fs::metadata(outside.path().join("shadow")).unwrap();
        assert_eq!(meta.nlink(), 1);
    }

    #[test]
    fn hard_links_inside_the_root_are_restored() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = new_header();
        header.set_size(4);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, "a/one", &b"same"[..])
            .unwrap();
        let mut header = new_header();
        header.set_entry_type(tar::EntryType::Link);
        header.set_size(0);
        header.set_mode(0o644);
        builder.append_link(&mut header, "b/two", "a/one").unwrap();
        let work = tempfile::tempdir().unwrap();
        let tar = work.path().join("t.tar");
        fs::write(&tar, builder.into_inner().unwrap()).unwrap();
        let root = tempfile::tempdir().unwrap();
        unpack_tree(&tar, root.path(), "the test root").unwrap();
        let one = fs::metadata(root.path().join("a/one")).unwrap();
        let two = fs::metadata(root.path().join("b/two")).unwrap();
        assert_eq!(one.ino(), two.ino());
        assert_eq!(fs::read(root.path().join("b/two")).unwrap(), b"same");
    }

    #[test]
    fn device_nodes_in_the_archive_are_refused() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = new_header();
        header.set_entry_type(tar::EntryType::Char);
        header.set_size(0);
        header.set_mode(0o666);
        header.set_cksum();
        builder
            .append_data(&mut header, "dev/mem", &b""[..])
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(ROOTFS_DIFF), builder.into_inner().unwrap()).unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        let err = apply(dir.path(), rootfs.path(), None).unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
    }

    #[test]
    fn sparse_files_round_trip() {
        let src = tempfile::tempdir().unwrap();
        let mib = 1u64 << 20;
        // Holes at the start, in the middle and at the end; data in between.
        let sparse = fs::File::create(src.path().join("sparse")).unwrap();
        sparse.set_len(4 * mib).unwrap();
        sparse.write_all_at(b"middle", 2 * mib).unwrap();
        sparse.write_all_at(b"end", 4 * mib - 3).unwrap();
        let tail = fs::File::create(src.path().join("tail-hole")).unwrap();
        tail.write_all_at(b"x", mib).unwrap();
        tail.set_len(3 * mib).unwrap();
        fs::File::create(src.path().join("all-hole"))
            .unwrap()
            .set_len(2 * mib)
            .unwrap();
        let work = tempfile::tempdir().unwrap();
        let tar = work.path().join("t.tar");
        pack_tree(src.path(), &tar).unwrap();
        // The tar crate wrote GNU sparse entries (else this test would prove nothing).
        let mut archive = tar::Archive::new(fs::File::open(&tar).unwrap());
        let sparse_entries = archive
            .entries()
            .unwrap()
            .filter(|e| e.as_ref().unwrap().header().entry_type() == tar::EntryType::GNUSparse)
            .count();
        assert_eq!(sparse_entries, 3, "the file system here reports no holes");
        assert!(
            fs::metadata(&tar).unwrap().len() < mib,
            "the holes were archived"
        );

        let dst = tempfile::tempdir().unwrap();
        unpack_tree(&tar, dst.path(), "the test tree").unwrap();
        for name in ["sparse", "tail-hole", "all-hole"] {
            let before = fs::read(src.path().join(name)).unwrap();
            let after = fs::read(dst.path().join(name)).unwrap();
            assert_eq!(before.len(), after.len(), "{name}");
            assert!(before == after, "{name}: content differs");
        }
        // Holes stay holes.
        assert!(fs::metadata(dst.path().join("sparse")).unwrap().blocks() < 1024);
    }

    #[test]
    fn capture_archives_a_symlink_not_its_target() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"TOP-SECRET-HOST-DATA").unwrap();
        let src = tempfile::tempdir().unwrap();
        symlink(outside.path().join("secret"), src.path().join("link")).unwrap();
        symlink(outside.path(), src.path().join("dirlink")).unwrap();
        let work = tempfile::tempdir().unwrap();
        let tar = work.path().join("t.tar");
        pack_tree(src.path(), &tar).unwrap();
        let bytes = fs::read(&tar).unwrap();
        assert!(!contains(&bytes, b"TOP-SECRET"));
        let mut archive = tar::Archive::new(bytes.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            assert_eq!(entry.header().entry_type(), tar::EntryType::Symlink);
            seen.push((
                entry.path().unwrap().into_owned(),
                entry.link_name().unwrap().unwrap().into_owned(),
            ));
        }
        assert_eq!(
            seen,
            vec![
                (PathBuf::from("dirlink"), outside.path().to_path_buf()),
                (PathBuf::from("link"), outside.path().join("secret")),
            ]
        );
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    /// Swaps the names `a` and `b` (whatever they are) atomically, again and again, until
    /// stopped: a container racing the shim.
    fn swapper(
        pairs: Vec<(PathBuf, PathBuf)>,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let pairs: Vec<_> = pairs
                .iter()
                .map(|(a, b)| {
                    (
                        std::ffi::CString::new(a.as_os_str().as_bytes()).unwrap(),
                        std::ffi::CString::new(b.as_os_str().as_bytes()).unwrap(),
                    )
                })
                .collect();
            while !stop.load(Ordering::Relaxed) {
                for (a, b) in &pairs {
                    // SAFETY: NUL-terminated paths.
                    let rc = unsafe {
                        libc::renameat2(
                            libc::AT_FDCWD,
                            a.as_ptr(),
                            libc::AT_FDCWD,
                            b.as_ptr(),
                            libc::RENAME_EXCHANGE,
                        )
                    };
                    assert_eq!(rc, 0, "{}", io::Error::last_os_error());
                }
            }
        })
    }

    const RACE: Duration = Duration::from_millis(1500);

    #[test]
    fn a_file_swapped_for_a_symlink_during_capture_is_not_read_through_it() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"TOP-SECRET-HOST-DATA").unwrap();
        let src = tempfile::tempdir().unwrap();
        let mut pairs = Vec::new();
        for i in 0..16 {
            let file = src.path().join(format!("f{i}"));
            let link = src.path().join(format!("s{i}"));
            fs::write(&file, b"benign").unwrap();
            symlink(outside.path().join("secret"), &link).unwrap();
            pairs.push((file, link));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let racer = swapper(pairs, stop.clone());
        let work = tempfile::tempdir().unwrap();
        let deadline = Instant::now() + RACE;
        let (mut leaked, mut failed, mut rounds) = (0, Vec::new(), 0);
        while Instant::now() < deadline {
            let tar = work.path().join("t.tar");
            match pack_tree(src.path(), &tar) {
                Ok(()) => leaked += usize::from(contains(&fs::read(&tar).unwrap(), b"TOP-SECRET")),
                Err(e) => failed.push(format!("{e:#}")),
            }
            let _ = fs::remove_file(&tar);
            rounds += 1;
        }
        stop.store(true, Ordering::Relaxed);
        racer.join().unwrap();
        assert_eq!(
            leaked, 0,
            "the host file leaked into {leaked} of {rounds} archives"
        );
        // Nor does the race make the capture fail: each name is archived as what it was when
        // opened.
        assert_eq!(failed, Vec::<String>::new(), "{rounds} rounds");
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_during_unpack_is_not_written_through() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("etc")).unwrap();
        symlink(outside.path(), root.path().join("spare")).unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        for i in 0..32 {
            let mut header = new_header();
            header.set_size(1);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, format!("etc/f{i}"), &b"x"[..])
                .unwrap();
        }
        let work = tempfile::tempdir().unwrap();
        let tar = work.path().join("t.tar");
        fs::write(&tar, builder.into_inner().unwrap()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let racer = swapper(
            vec![(root.path().join("etc"), root.path().join("spare"))],
            stop.clone(),
        );
        let deadline = Instant::now() + RACE;
        while Instant::now() < deadline && names(outside.path()).is_empty() {
            let _ = unpack_tree(&tar, root.path(), "the test root");
        }
        stop.store(true, Ordering::Relaxed);
        racer.join().unwrap();
        assert_eq!(names(outside.path()), Vec::<String>::new());
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_during_deletion_is_not_deleted_through() {
        let outside = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("etc")).unwrap();
        // The real directory, wherever the race moves it.
        let etc_dir = fs::File::open(root.path().join("etc")).unwrap();
        let etc = PathBuf::from(format!("/proc/self/fd/{}", etc_dir.as_raw_fd()));
        symlink(outside.path(), root.path().join("spare")).unwrap();
        let victims: Vec<String> = (0..32).map(|i| format!("v{i}")).collect();
        for v in &victims {
            fs::write(outside.path().join(v), b"keep").unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let deleted: Vec<String> = victims.iter().map(|v| format!("/etc/{v}")).collect();
        fs::write(
            dir.path().join(DELETED_FILES),
            serde_json::to_vec(&deleted).unwrap(),
        )
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let racer = swapper(
            vec![(root.path().join("etc"), root.path().join("spare"))],
            stop.clone(),
        );
        let deadline = Instant::now() + RACE;
        while Instant::now() < deadline && names(outside.path()).len() == victims.len() {
            for v in &victims {
                fs::write(etc.join(v), b"inside").unwrap();
            }
            let _ = apply(dir.path(), root.path(), None);
        }
        stop.store(true, Ordering::Relaxed);
        racer.join().unwrap();
        assert_eq!(
            names(outside.path()).len(),
            victims.len(),
            "a file outside was deleted"
        );
    }

    /// Fuzzing: arbitrary and mutated archives and deletion lists never panic and never touch
    /// anything outside the target directory.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;
        use proptest::sample::Index;

        /// A target root with symlinks planted in it that point out of it, next to an `outside`
        /// directory that must stay as it is.
        struct Fixture {
            dir: tempfile::TempDir,
        }

        impl Fixture {
            fn new() -> Self {
                let dir = tempfile::tempdir().unwrap();
                let root = dir.path().join("root");
                let outside = dir.path().join("outside");
                fs::create_dir_all(root.join("a/b")).unwrap();
                fs::write(root.join("a/file"), b"inside").unwrap();
                fs::create_dir(&outside).unwrap();
                fs::write(outside.join("victim"), b"keep").unwrap();
                symlink(&outside, root.join("link")).unwrap();
                symlink("../outside", root.join("rel")).unwrap();
                symlink("../../outside", root.join("a/up")).unwrap();
                Self { dir }
            }

            fn root(&self) -> PathBuf {
                self.dir.path().join("root")
            }

            fn outside_state(&self) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
                let outside = self.dir.path().join("outside");
                let mut state = Vec::new();
                let meta = fs::symlink_metadata(&outside).unwrap();
                state.push((".".into(), meta.mode(), meta.uid(), meta.gid(), Vec::new()));
                for name in names(&outside) {
                    let path = outside.join(&name);
                    let meta = fs::symlink_metadata(&path).unwrap();
                    let data = if meta.is_file() {
                        fs::read(&path).unwrap()
                    } else {
                        Vec::new()
                    };
                    state.push((name, meta.mode(), meta.uid(), meta.gid(), data));
                }
                state
            }

            fn check(&self, before: &[(String, u32, u32, u32, Vec<u8>)]) {
                assert_eq!(names(self.dir.path()), ["outside", "root"]);
                assert_eq!(self.outside_state(), before);
            }

            /// Unpacks `data` as a tar file into the root, then applies it as a rootfs diff.
            fn unpack(&self, data: &[u8]) {
                let before = self.outside_state();
                let work = tempfile::tempdir().unwrap();
                let tar = work.path().join(ROOTFS_DIFF);
                fs::write(&tar, data).unwrap();
                let _ = unpack_tree(&tar, &self.root(), "the fuzzed root");
                self.check(&before);
                let _ = apply(work.path(), &self.root(), None);
                self.check(&before);
            }
        }

        /// A real archive of a small tree: directories, files, a sparse file, symlinks (one
        /// pointing out, as data) and names that collide with the fixture's planted symlinks.
        fn base_archive() -> &'static [u8] {
            static BASE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
            BASE.get_or_init(|| {
                let src = tempfile::tempdir().unwrap();
                let s = src.path();
                fs::create_dir_all(s.join("a/b/c")).unwrap();
                fs::create_dir_all(s.join("link")).unwrap();
                fs::create_dir_all(s.join("rel/deeper")).unwrap();
                fs::write(s.join("a/file"), b"replaced").unwrap();
                fs::write(s.join("a/b/c/data"), vec![7u8; 3000]).unwrap();
                fs::write(s.join("link/x"), b"through the link?").unwrap();
                fs::write(s.join("rel/deeper/y"), b"through rel?").unwrap();
                symlink("../../outside/victim", s.join("a/b/escape")).unwrap();
                symlink("/etc/passwd", s.join("abs")).unwrap();
                let sparse = fs::File::create(s.join("a/sparse")).unwrap();
                sparse.write_all_at(b"head", 0).unwrap();
                sparse.write_all_at(b"tail", 60 << 10).unwrap();
                let work = tempfile::tempdir().unwrap();
                let tar = work.path().join("base.tar");
                pack_tree(s, &tar).unwrap();
                fs::read(&tar).unwrap()
            })
        }

        /// Recomputes the checksum of every block that looks like a tar header, so that
        /// mutations get past the checksum and into the parsing behind it.
        fn fix_checksums(data: &mut [u8]) {
            for block in data.chunks_exact_mut(512) {
                if &block[257..262] == b"ustar" {
                    let mut header = tar::Header::new_old();
                    header.as_mut_bytes().copy_from_slice(block);
                    header.set_cksum();
                    block.copy_from_slice(header.as_bytes());
                }
            }
        }

        fn config() -> ProptestConfig {
            ProptestConfig {
                cases: 128,
                failure_persistence: None,
                ..ProptestConfig::default()
            }
        }

        #[test]
        fn the_base_archive_unpacks_but_not_through_the_planted_symlinks() {
            let fixture = Fixture::new();
            let before = fixture.outside_state();
            let work = tempfile::tempdir().unwrap();
            let tar = work.path().join("t.tar");
            fs::write(&tar, base_archive()).unwrap();
            // The archive's directories `link` and `rel` replace the planted symlinks.
            unpack_tree(&tar, &fixture.root(), "the fuzzed root").unwrap();
            fixture.check(&before);
            assert_eq!(
                fs::read(fixture.root().join("link/x")).unwrap(),
                b"through the link?"
            );
            let sparse = fs::read(fixture.root().join("a/sparse")).unwrap();
            assert_eq!(sparse.len(), (60 << 10) + 4);
            assert_eq!(&sparse[..4], b"head");
        }

        proptest! {
            #![proptest_config(config())]

            #[test]
            fn arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..4096)) {
                Fixture::new().unpack(&data);
            }

            #[test]
            fn mutated_archives(
                flips in prop::collection::vec((any::<Index>(), any::<u8>()), 1..12),
                truncate in any::<Option<Index>>(),
                fix in any::<bool>(),
            ) {
                let mut data = base_archive().to_vec();
                for (at, value) in flips {
                    let at = at.index(data.len());
                    data[at] = value;
                }
                if fix {
                    fix_checksums(&mut data);
                }
                if let Some(at) = truncate {
                    data.truncate(at.index(data.len()));
                }
                Fixture::new().unpack(&data);
            }

            #[test]
            fn deleted_files(
                paths in prop::collection::vec(
                    prop_oneof![
                        any::<String>(),
                        (
                            any::<bool>(),
                            prop::collection::vec(
                                prop::sample::select(vec![
                                    "..", ".", "", "link", "rel", "a", "up", "b", "file",
                                    "victim", "outside", "root",
                                ]),
                                0..6,
                            ),
                        )
                            .prop_map(|(absolute, parts)| {
                                let joined = parts.join("/");
                                if absolute { format!("/{joined}") } else { joined }
                            }),
                    ],
                    0..8,
                ),
            ) {
                let fixture = Fixture::new();
                let before = fixture.outside_state();
                let work = tempfile::tempdir().unwrap();
                fs::write(
                    work.path().join(DELETED_FILES),
                    serde_json::to_vec(&paths).unwrap(),
                )
                .unwrap();
                let _ = apply(work.path(), &fixture.root(), None);
                fixture.check(&before);
                prop_assert!(fixture.root().is_dir());
            }

            #[test]
            fn deleted_files_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..256)) {
                let fixture = Fixture::new();
                let before = fixture.outside_state();
                let work = tempfile::tempdir().unwrap();
                fs::write(work.path().join(DELETED_FILES), data).unwrap();
                let _ = apply(work.path(), &fixture.root(), None);
                fixture.check(&before);
            }
        }
    }
}

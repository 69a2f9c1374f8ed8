//! A container's writable-layer changes, carried across checkpoint and restore in the layout
//! CRI-O, containerd and `checkpointctl` share: `rootfs-diff.tar` (files, directories and
//! symlinks the container created or changed) and `deleted.files` (a JSON list of paths it
//! removed). Captured from the overlay upper directory; applied to the new container's rootfs
//! before CRIU restores the processes.
//!
//! Applying trusts nothing in the archive: every path must stay inside the rootfs (symlinks in
//! the rootfs are not followed out of it), and device nodes, FIFOs and sockets are refused.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail, ensure};

pub const ROOTFS_DIFF: &str = "rootfs-diff.tar";
pub const DELETED_FILES: &str = "deleted.files";

/// Whether a directory of the upper layer hides the lower layers' content.
fn is_opaque(dir: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut value = [0u8; 1];
    // SAFETY: valid NUL-terminated strings and a buffer of the length passed.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
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
    let mut builder = tar::Builder::new(file);
    builder.follow_symlinks(false);
    let mut deleted = Vec::new();
    walk(upper, Path::new(""), &mut builder, &mut deleted)?;
    builder
        .into_inner()
        .with_context(|| format!("finish {}", tar_path.display()))?;
    let deleted_path = dir.join(DELETED_FILES);
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&deleted_path)
        .and_then(|f| serde_json::to_writer(f, &deleted).map_err(std::io::Error::other))
        .with_context(|| format!("write {}", deleted_path.display()))
}

fn walk(
    dir: &Path,
    relative: &Path,
    builder: &mut tar::Builder<fs::File>,
    deleted: &mut Vec<String>,
) -> anyhow::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = relative.join(entry.file_name());
        let meta = fs::symlink_metadata(&path)?;
        let kind = meta.file_type();
        if kind.is_char_device() && meta.rdev() == 0 {
            // An overlay whiteout: the file was deleted.
            deleted.push(format!("/{}", name.display()));
        } else if kind.is_dir() {
            if is_opaque(&path) {
                deleted.push(format!("/{}", name.display()));
            }
            builder.append_dir(&name, &path)?;
            walk(&path, &name, builder, deleted)?;
        } else if kind.is_file() || kind.is_symlink() {
            builder
                .append_path_with_name(&path, &name)
                .with_context(|| format!("archive {}", path.display()))?;
        }
        // Sockets, FIFOs and devices the container made are not carried over.
    }
    Ok(())
}

/// A path from the archive as a relative path without `..`, or an error naming it.
fn contained(path: &str) -> anyhow::Result<PathBuf> {
    let mut clean = PathBuf::new();
    for component in Path::new(path).components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => clean.push(part),
            Component::ParentDir | Component::Prefix(_) => {
                bail!("path {path:?} escapes the container's rootfs")
            }
        }
    }
    ensure!(!clean.as_os_str().is_empty(), "empty path {path:?}");
    Ok(clean)
}

/// Applies `deleted.files` and `rootfs-diff.tar` from `dir` (either may be absent) to `rootfs`.
pub fn apply(dir: &Path, rootfs: &Path) -> anyhow::Result<()> {
    let root = fs::canonicalize(rootfs).with_context(|| format!("resolve {}", rootfs.display()))?;
    let deleted_path = dir.join(DELETED_FILES);
    if deleted_path.exists() {
        let deleted: Vec<String> = serde_json::from_slice(&fs::read(&deleted_path)?)
            .with_context(|| format!("parse {}", deleted_path.display()))?;
        for path in deleted {
            let relative = contained(&path)?;
            let target = root.join(&relative);
            // The parent must resolve inside the rootfs: never follow a symlink out of it.
            let Some(parent) = target.parent() else {
                continue;
            };
            let Ok(parent) = fs::canonicalize(parent) else {
                continue;
            };
            ensure!(
                parent.starts_with(&root),
                "deleted path {path:?} resolves outside the container's rootfs"
            );
            let target = parent.join(relative.file_name().expect("non-empty"));
            match fs::symlink_metadata(&target) {
                Ok(meta) if meta.is_dir() => fs::remove_dir_all(&target)?,
                Ok(_) => fs::remove_file(&target)?,
                Err(_) => {}
            }
        }
    }
    let tar_path = dir.join(ROOTFS_DIFF);
    if tar_path.exists() {
        unpack_tree(&tar_path, &root, "the container's rootfs")?;
    }
    Ok(())
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
    let mut builder = tar::Builder::new(file);
    builder.follow_symlinks(false);
    let mut deleted = Vec::new();
    walk(src, Path::new(""), &mut builder, &mut deleted)?;
    builder
        .into_inner()
        .with_context(|| format!("finish {}", tar_path.display()))?;
    Ok(())
}

/// Unpacks the tar file `tar_path` into the directory `root` (already resolved), trusting
/// nothing in it: every path must stay inside `root` (`what`, for messages), and only
/// directories, regular files, symlinks and hard links are accepted.
pub fn unpack_tree(tar_path: &Path, root: &Path, what: &str) -> anyhow::Result<()> {
    let name = tar_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file = fs::File::open(tar_path).with_context(|| format!("open {}", tar_path.display()))?;
    let mut archive = tar::Archive::new(file);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.display().to_string();
        contained(&path)?;
        use tar::EntryType::*;
        match entry.header().entry_type() {
            Regular | Directory | Symlink | Link | Continuous => {}
            other => bail!("{name} entry {path:?} is a {other:?}: refused"),
        }
        let inside = entry
            .unpack_in(root)
            .with_context(|| format!("unpack {path:?} from {name}"))?;
        ensure!(inside, "{name} entry {path:?} escapes {what}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_and_deletions_round_trip() {
        let upper = tempfile::tempdir().unwrap();
        fs::create_dir_all(upper.path().join("data/sub")).unwrap();
        fs::write(upper.path().join("data/sub/file"), b"hello").unwrap();
        std::os::unix::fs::symlink("sub/file", upper.path().join("data/link")).unwrap();
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
        apply(out.path(), rootfs.path()).unwrap();
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
    fn deleted_paths_that_escape_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(DELETED_FILES), br#"["/../../etc/passwd"]"#).unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        let err = apply(dir.path(), rootfs.path()).unwrap_err();
        assert!(err.to_string().contains("escapes"), "{err}");
    }

    #[test]
    fn a_symlink_in_the_rootfs_is_not_followed_out_of_it() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("victim"), b"keep").unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), rootfs.path().join("evil")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(DELETED_FILES), br#"["/evil/victim"]"#).unwrap();
        assert!(apply(dir.path(), rootfs.path()).is_err());
        assert!(outside.path().join("victim").exists());

        // A tar entry written through the symlink is refused too.
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(4);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, "evil/victim", &b"pwnd"[..])
            .unwrap();
        let data = builder.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(ROOTFS_DIFF), data).unwrap();
        assert!(apply(dir.path(), rootfs.path()).is_err());
        assert_eq!(fs::read(outside.path().join("victim")).unwrap(), b"keep");
    }

    #[test]
    fn device_nodes_in_the_archive_are_refused() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
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
        let err = apply(dir.path(), rootfs.path()).unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
    }
}

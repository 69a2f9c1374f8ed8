//! A pod's own volumes: the kubelet's `emptyDir` volumes, whose content lives and dies with the
//! pod, so a pod checkpoint must carry it. During a pod checkpoint's freeze each such volume
//! that a checkpointed container mounts is archived into `<pod checkpoint>/_volumes/<name>.tar`
//! ([`VOLUMES_DIR`], which the checkpoint format owns: no container can have that name);
//! checkpoints written before it kept them in `volumes/`, which is still read. Before a container
//! of the restored pod is restored, each emptyDir volume it mounts that is still empty in the new
//! pod is filled from the archive of the same name (the first container to restore fills a
//! shared volume; its siblings find it filled).
//!
//! Filling is all or nothing: the archive is unpacked into a new staging directory inside the
//! volume (`.podsnap-restore-<random>`) and its entries are then moved into the volume root; on
//! any failure everything moved and the staging directory are removed, the volume is left empty
//! (so a retry fills it) and the error is returned. Unpacking trusts nothing in the archive
//! ([`crate::rootfs_diff::unpack_tree_at`]); the archive itself is covered by the pod checkpoint's
//! manifest, which podsnapd verifies before it creates anything.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::Context;
use oci_spec::runtime::Spec;

use crate::rootfs_diff::at;

/// The directory of a pod checkpoint that holds the volume archives.
pub use podsnap_checkpoint_format::VOLUMES_DIR;

/// Where checkpoints written before [`VOLUMES_DIR`] kept the volume archives. A container named
/// `volumes` had its directory at the same place; that one always holds `checkpoint/` (CRIU's
/// images), which a directory of volume archives (`<name>.tar` files) never does.
const LEGACY_VOLUMES_DIR: &str = "volumes";

/// The name of a volume's staging directory, before a random part.
const STAGING_PREFIX: &str = ".podsnap-restore-";

/// Held while a volume is checked and filled: one shim serves every container of the pod, so
/// two of its containers never both find a shared volume empty and fill it.
static FILLING: Mutex<()> = Mutex::new(());

/// The part of a kubelet emptyDir volume's host path before its name.
const EMPTY_DIR: &str = "/volumes/kubernetes.io~empty-dir/";

/// The name of the emptyDir volume `source` is, when it is one: the kubelet lays them out as
/// `<root-dir>/pods/<pod uid>/volumes/kubernetes.io~empty-dir/<name>`.
pub fn empty_dir_name(source: &Path) -> Option<&str> {
    let source = source.to_str()?;
    let (_, name) = source.rsplit_once(EMPTY_DIR)?;
    let name = name.trim_end_matches('/');
    let valid = !name.is_empty()
        && !name.contains('/')
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    valid.then_some(name)
}

/// The emptyDir volumes the containers with these specs bind-mount: name to host path.
pub fn empty_dirs<'a>(specs: impl IntoIterator<Item = &'a Spec>) -> BTreeMap<String, PathBuf> {
    let mut volumes = BTreeMap::new();
    for spec in specs {
        for mount in spec.mounts().iter().flatten() {
            let Some(source) = mount.source() else {
                continue;
            };
            if let Some(name) = empty_dir_name(source) {
                volumes.insert(name.to_string(), source.clone());
            }
        }
    }
    volumes
}

/// Archives each volume into `<output_dir>/_volumes/<name>.tar` (the pod is frozen).
pub fn capture(volumes: &BTreeMap<String, PathBuf>, output_dir: &Path) -> anyhow::Result<()> {
    if volumes.is_empty() {
        return Ok(());
    }
    let dir = output_dir.join(VOLUMES_DIR);
    crate::checkpoint::new_private_dir(&dir)?;
    for (name, source) in volumes {
        crate::rootfs_diff::pack_tree(source, &dir.join(format!("{name}.tar")))
            .with_context(|| format!("capture emptyDir volume {name} ({})", source.display()))?;
    }
    Ok(())
}

/// The directory of the pod checkpoint `pod_checkpoint` that holds its volume archives, if it
/// has one: [`VOLUMES_DIR`], or [`LEGACY_VOLUMES_DIR`] when that is not a container's directory.
fn archives_dir(pod_checkpoint: &Path) -> Option<PathBuf> {
    let dir = pod_checkpoint.join(VOLUMES_DIR);
    if dir.is_dir() {
        return Some(dir);
    }
    let legacy = pod_checkpoint.join(LEGACY_VOLUMES_DIR);
    let is_container = fs::symlink_metadata(legacy.join("checkpoint")).is_ok();
    (legacy.is_dir() && !is_container).then_some(legacy)
}

/// Before the container with `spec` is restored from a container checkpoint inside the pod
/// checkpoint `pod_checkpoint`: fills each emptyDir volume it mounts that is still empty from
/// the pod checkpoint's archive of that volume, if there is one.
pub fn restore(pod_checkpoint: &Path, spec: &Spec) -> anyhow::Result<()> {
    let Some(archives) = archives_dir(pod_checkpoint) else {
        return Ok(());
    };
    let _filling = FILLING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (name, target) in empty_dirs([spec]) {
        let archive = archives.join(format!("{name}.tar"));
        if !archive.is_file() {
            continue;
        }
        let root = at::open_dir(&target)
            .with_context(|| format!("emptyDir volume {name}: open {}", target.display()))?;
        let empty = at::read_dir(root.as_fd())
            .with_context(|| format!("emptyDir volume {name}: read {}", target.display()))?
            .is_empty();
        if empty {
            fill(&archive, root.as_fd(), &format!("emptyDir volume {name}"))
                .with_context(|| format!("restore emptyDir volume {name}"))?;
        }
    }
    Ok(())
}

/// Fills the empty volume open as `root` (`what`, for messages) from `archive`, all or nothing.
fn fill(archive: &Path, root: BorrowedFd, what: &str) -> anyhow::Result<()> {
    let (staging_name, staging) = staging_dir(root)?;
    let mut moved = Vec::new();
    let result = unpack_and_move(archive, root, &staging_name, staging, what, &mut moved);
    let Err(error) = result else {
        return Ok(());
    };
    // Back to empty: what was moved in, then the staging directory with whatever is left in it.
    let mut left = Vec::new();
    for name in moved.iter().chain([&staging_name]) {
        if let Err(e) = at::remove_all(root, name) {
            left.push(format!("{}: {e}", name.to_string_lossy()));
        }
    }
    if left.is_empty() {
        Err(error)
    } else {
        Err(error.context(format!(
            "and {what} could not be emptied again ({})",
            left.join("; ")
        )))
    }
}

/// A new directory `.podsnap-restore-<random>` in `root`, and its name.
fn staging_dir(root: BorrowedFd) -> anyhow::Result<(OsString, OwnedFd)> {
    use std::hash::{BuildHasher, Hasher};
    for _ in 0..16 {
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let name = OsString::from(format!("{STAGING_PREFIX}{random:016x}"));
        match at::mkdir(root, &name, 0o700) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).context("create a staging directory"),
        }
        return match at::open(root, &name, libc::O_RDONLY | libc::O_DIRECTORY, 0) {
            Ok(dir) => Ok((name, dir)),
            Err(e) => {
                let _ = at::remove_all(root, &name);
                Err(e).context("open the staging directory")
            }
        };
    }
    anyhow::bail!("no unused staging directory name")
}

/// Unpacks `archive` into `staging` (named `staging_name` in `root`), moves its entries into
/// `root` (recording each in `moved`) and removes it.
fn unpack_and_move(
    archive: &Path,
    root: BorrowedFd,
    staging_name: &OsString,
    staging: OwnedFd,
    what: &str,
    moved: &mut Vec<OsString>,
) -> anyhow::Result<()> {
    crate::rootfs_diff::unpack_tree_at(archive, staging.as_fd(), what)?;
    let mut names = at::read_dir(staging.as_fd()).context("list the staging directory")?;
    names.sort();
    for name in names {
        at::rename_noreplace(staging.as_fd(), &name, root, &name)
            .with_context(|| format!("move {name:?} into {what}"))?;
        moved.push(name);
    }
    drop(staging);
    at::remove_all(root, staging_name).context("remove the staging directory")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(sources: &[&str]) -> Spec {
        let binds: Vec<_> = sources.iter().map(|s| ("/data", *s)).collect();
        crate::checkpoint::tests::spec_with_binds(&binds)
    }

    #[test]
    fn empty_dir_volumes_are_told_by_the_kubelet_layout() {
        assert_eq!(
            empty_dir_name(Path::new(
                "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~empty-dir/data"
            )),
            Some("data")
        );
        for other in [
            "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~projected/token",
            "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~empty-dir/",
            "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~empty-dir/data/sub",
            "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~empty-dir/..",
            "/data",
        ] {
            assert_eq!(empty_dir_name(Path::new(other)), None, "{other}");
        }
    }

    #[test]
    fn volumes_round_trip_into_an_empty_volume_only() {
        let old_pod = tempfile::tempdir().unwrap();
        let old = old_pod
            .path()
            .join("volumes/kubernetes.io~empty-dir/shared");
        fs::create_dir_all(old.join("sub")).unwrap();
        fs::write(old.join("sub/file"), b"before").unwrap();
        std::os::unix::fs::symlink("sub/file", old.join("link")).unwrap();
        let specs = [spec_with(&[old.to_str().unwrap(), "/etc/hosts"])];
        let volumes = empty_dirs(&specs);
        assert_eq!(volumes.len(), 1);

        let checkpoint = tempfile::tempdir().unwrap();
        capture(&volumes, checkpoint.path()).unwrap();
        let archive = checkpoint.path().join("_volumes/shared.tar");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&archive).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let new_pod = tempfile::tempdir().unwrap();
        let new = new_pod
            .path()
            .join("volumes/kubernetes.io~empty-dir/shared");
        fs::create_dir_all(&new).unwrap();
        let spec = spec_with(&[new.to_str().unwrap()]);
        restore(checkpoint.path(), &spec).unwrap();
        assert_eq!(fs::read(new.join("sub/file")).unwrap(), b"before");
        assert_eq!(
            fs::read_link(new.join("link")).unwrap(),
            Path::new("sub/file")
        );

        // A sibling container restored later finds the volume filled and leaves it alone.
        fs::write(new.join("sub/file"), b"written since").unwrap();
        restore(checkpoint.path(), &spec).unwrap();
        assert_eq!(fs::read(new.join("sub/file")).unwrap(), b"written since");
    }

    #[test]
    fn an_archive_that_escapes_the_volume_is_refused() {
        let checkpoint = tempfile::tempdir().unwrap();
        fs::create_dir(checkpoint.path().join(VOLUMES_DIR)).unwrap();
        let mut builder =
            tar::Builder::new(fs::File::create(checkpoint.path().join("_volumes/v.tar")).unwrap());
        let mut header = crate::rootfs_diff::tests::new_header();
        header.set_size(1);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        // `append_data` refuses `..`; write the name by hand, as an attacker would.
        header.as_old_mut().name[..9].copy_from_slice(b"../escape");
        header.set_cksum();
        builder.append(&header, &b"x"[..]).unwrap();
        builder.into_inner().unwrap();

        let new_pod = tempfile::tempdir().unwrap();
        let new = new_pod.path().join("volumes/kubernetes.io~empty-dir/v");
        fs::create_dir_all(&new).unwrap();
        let err = restore(checkpoint.path(), &spec_with(&[new.to_str().unwrap()])).unwrap_err();
        assert!(format!("{err:#}").contains("escapes"), "{err:#}");
        assert!(
            !new_pod
                .path()
                .join("volumes/kubernetes.io~empty-dir/escape")
                .exists()
        );
    }

    /// A volume `v` of a new pod, and the spec of a container that mounts it.
    fn new_volume() -> (tempfile::TempDir, PathBuf, Spec) {
        let pod = tempfile::tempdir().unwrap();
        let volume = pod.path().join("volumes/kubernetes.io~empty-dir/v");
        fs::create_dir_all(&volume).unwrap();
        let spec = spec_with(&[volume.to_str().unwrap()]);
        (pod, volume, spec)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Writes `<checkpoint>/<dir>/v.tar`: some good entries, then `bad` when given.
    fn write_archive(checkpoint: &Path, dir: &str, bad: Option<&str>) {
        fs::create_dir_all(checkpoint.join(dir)).unwrap();
        let mut builder =
            tar::Builder::new(fs::File::create(checkpoint.join(dir).join("v.tar")).unwrap());
        for (name, data) in [
            ("a-file", &b"one"[..]),
            ("sub/b-file", b"two"),
            ("z-file", b"three"),
        ] {
            let mut header = crate::rootfs_diff::tests::new_header();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, data).unwrap();
        }
        match bad {
            Some("device") => {
                let mut header = crate::rootfs_diff::tests::new_header();
                header.set_entry_type(tar::EntryType::Char);
                header.set_size(0);
                header.set_mode(0o666);
                header.set_cksum();
                builder
                    .append_data(&mut header, "zz-mem", &b""[..])
                    .unwrap();
            }
            Some("escape") => {
                let mut header = crate::rootfs_diff::tests::new_header();
                header.set_size(1);
                header.set_mode(0o644);
                header.as_old_mut().name[..9].copy_from_slice(b"../escape");
                header.set_cksum();
                builder.append(&header, &b"x"[..]).unwrap();
            }
            Some(other) => panic!("{other}"),
            None => {}
        }
        builder.into_inner().unwrap();
    }

    #[test]
    fn a_failed_fill_leaves_the_volume_empty_and_a_retry_fills_it() {
        for bad in ["device", "escape"] {
            let checkpoint = tempfile::tempdir().unwrap();
            write_archive(checkpoint.path(), VOLUMES_DIR, Some(bad));
            let (pod, volume, spec) = new_volume();
            let err = restore(checkpoint.path(), &spec).unwrap_err();
            assert!(format!("{err:#}").contains("emptyDir volume v"), "{err:#}");
            assert_eq!(names(&volume), Vec::<String>::new(), "{bad}: {err:#}");
            assert_eq!(names(volume.parent().unwrap()), ["v"], "{bad}");
            assert!(
                !pod.path()
                    .join("volumes/kubernetes.io~empty-dir/escape")
                    .exists()
            );

            write_archive(checkpoint.path(), VOLUMES_DIR, None);
            restore(checkpoint.path(), &spec).unwrap();
            assert_eq!(names(&volume), ["a-file", "sub", "z-file"], "{bad}");
            assert_eq!(fs::read(volume.join("sub/b-file")).unwrap(), b"two");
        }
    }

    #[test]
    fn a_volume_filled_meanwhile_is_not_overwritten() {
        let checkpoint = tempfile::tempdir().unwrap();
        write_archive(checkpoint.path(), VOLUMES_DIR, None);
        let (_pod, volume, _spec) = new_volume();
        // What a sibling container wrote between the check and the move.
        fs::write(volume.join("z-file"), b"the sibling's").unwrap();
        let root = at::open_dir(&volume).unwrap();
        let archive = checkpoint.path().join(VOLUMES_DIR).join("v.tar");
        let err = fill(&archive, root.as_fd(), "emptyDir volume v").unwrap_err();
        assert!(format!("{err:#}").contains("z-file"), "{err:#}");
        assert_eq!(names(&volume), ["z-file"]);
        assert_eq!(fs::read(volume.join("z-file")).unwrap(), b"the sibling's");
    }

    #[test]
    fn the_archives_are_in_a_directory_no_container_can_be_named() {
        assert_eq!(VOLUMES_DIR, podsnap_checkpoint_format::VOLUMES_DIR);
        // DNS-1123 labels, what Kubernetes container names are: [a-z0-9-].
        assert!(
            !VOLUMES_DIR
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        );
    }

    #[test]
    fn a_legacy_volumes_directory_is_read_unless_it_is_a_containers() {
        let checkpoint = tempfile::tempdir().unwrap();
        write_archive(checkpoint.path(), LEGACY_VOLUMES_DIR, None);
        let (_pod, volume, spec) = new_volume();
        restore(checkpoint.path(), &spec).unwrap();
        assert_eq!(names(&volume), ["a-file", "sub", "z-file"]);

        // A container named `volumes` (its directory holds `checkpoint/`): not volume archives.
        fs::create_dir(checkpoint.path().join("volumes/checkpoint")).unwrap();
        let (_pod, volume, spec) = new_volume();
        restore(checkpoint.path(), &spec).unwrap();
        assert_eq!(names(&volume), Vec::<String>::new());
    }
}

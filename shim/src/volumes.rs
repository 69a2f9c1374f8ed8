//! A pod's own volumes: the kubelet's `emptyDir` volumes, whose content lives and dies with the
//! pod, so a pod checkpoint must carry it. During a pod checkpoint's freeze each such volume
//! that a checkpointed container mounts is archived into `<pod checkpoint>/volumes/<name>.tar`;
//! before a container of the restored pod is restored, each emptyDir volume it mounts that is
//! still empty in the new pod is unpacked from the archive of the same name (the first container
//! to restore fills a shared volume; its siblings find it filled). Unpacking trusts nothing in
//! the archive ([`crate::rootfs_diff::unpack_tree`]); the archive itself is covered by the pod
//! checkpoint's manifest, which podsnapd verifies before it creates anything.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use oci_spec::runtime::Spec;

/// The directory of a pod checkpoint that holds the volume archives.
pub const VOLUMES_DIR: &str = "volumes";

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

/// Archives each volume into `<output_dir>/volumes/<name>.tar` (the pod is frozen).
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

/// Before the container with `spec` is restored from a container checkpoint inside the pod
/// checkpoint `pod_checkpoint`: fills each emptyDir volume it mounts that is still empty from
/// the pod checkpoint's archive of that volume, if there is one.
pub fn restore(pod_checkpoint: &Path, spec: &Spec) -> anyhow::Result<()> {
    let archives = pod_checkpoint.join(VOLUMES_DIR);
    if !archives.is_dir() {
        return Ok(());
    }
    for (name, target) in empty_dirs([spec]) {
        let archive = archives.join(format!("{name}.tar"));
        if !archive.is_file() {
            continue;
        }
        let root = fs::canonicalize(&target)
            .with_context(|| format!("emptyDir volume {name}: resolve {}", target.display()))?;
        let empty = fs::read_dir(&root)
            .with_context(|| format!("emptyDir volume {name}: read {}", root.display()))?
            .next()
            .is_none();
        if empty {
            crate::rootfs_diff::unpack_tree(&archive, &root, &format!("emptyDir volume {name}"))
                .with_context(|| format!("restore emptyDir volume {name}"))?;
        }
    }
    Ok(())
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
        let archive = checkpoint.path().join("volumes/shared.tar");
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
            tar::Builder::new(fs::File::create(checkpoint.path().join("volumes/v.tar")).unwrap());
        let mut header = tar::Header::new_gnu();
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
}

//! Bind-mount sources a user-namespaced container can reach.
//!
//! A container with a user namespace of its own (`hostUsers: false`) sets up its mounts as the
//! namespace's root, an unprivileged id on the host. containerd's bind-mount sources often lie
//! behind directories only host root may search (`io.containerd.grpc.v1.cri/` is `0700`, so are
//! the kubelet's pod directories), and libcontainer's init, already inside the namespace, fails
//! to resolve them with EACCES. runc solves it by opening each source in the host's namespaces
//! and handing the descriptors over; this module does the equivalent before libcontainer runs:
//! each bind source is bind-mounted (recursively, as it is) at `<bundle>/.podsnap-mount-sources/<n>`,
//! a place every id may search, and the bundle's `config.json` names that place instead. The
//! mounts are the same objects, so the container sees exactly what it would have; the shim keeps
//! the original spec (checkpoints describe the original sources). [`release`] detaches them.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use anyhow::Context;
use oci_spec::runtime::{LinuxIdMapping, LinuxNamespaceType, Mount, Spec};

use crate::idmap::{self, IdMapping};

/// A mount's uid and gid mappings.
type IdMappings = (Vec<IdMapping>, Vec<IdMapping>);

/// The directory, inside a bundle, of the staged sources.
pub const DIR: &str = ".podsnap-mount-sources";

/// Whether the container gets a user namespace (of its own or the pod's).
pub fn has_user_namespace(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| ns.iter().any(|n| n.typ() == LinuxNamespaceType::User))
}

/// Whether a spec mount is a bind mount (`type: bind`, or a `bind`/`rbind` option).
pub fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_ref()
            .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"))
}

/// The spec with every bind source staged under `<bundle>/.podsnap-mount-sources`, or `None`
/// when the container has no user namespace or no bind mount. On error, what was staged is
/// released again.
pub fn stage(bundle: &Path, spec: &Spec) -> anyhow::Result<Option<Spec>> {
    if !has_user_namespace(spec) {
        return Ok(None);
    }
    let Some(mounts) = spec.mounts().as_ref() else {
        return Ok(None);
    };
    if !mounts.iter().any(is_bind) {
        return Ok(None);
    }
    let dir = bundle.join(DIR);
    let result = (|| -> anyhow::Result<Vec<Mount>> {
        create_dir(&dir, 0o711)?;
        let mut staged = Vec::with_capacity(mounts.len());
        // One user namespace per distinct mapping (containerd gives every mount the pod's).
        let mut namespaces: Vec<(IdMappings, OwnedFd)> = Vec::new();
        for (n, m) in mounts.iter().enumerate() {
            let mut m = m.clone();
            if let (true, Some(source)) = (is_bind(&m), m.source().clone())
                && source.is_absolute()
            {
                let place = dir.join(n.to_string());
                let idmap = idmapping(spec, &m)?;
                let userns = match &idmap {
                    None => None,
                    Some(maps) => {
                        if !namespaces.iter().any(|(known, _)| known == maps) {
                            let fd = idmap::user_namespace(&maps.0, &maps.1)?;
                            namespaces.push((maps.clone(), fd));
                        }
                        namespaces
                            .iter()
                            .find(|(known, _)| known == maps)
                            .map(|(_, fd)| fd)
                    }
                };
                bind(&source, &place, userns, &m).with_context(|| {
                    format!("stage the source of {}", m.destination().display())
                })?;
                m.set_source(Some(place));
                if idmap.is_some() {
                    // Already idmapped: libcontainer binds it as it is.
                    m.set_uid_mappings(None);
                    m.set_gid_mappings(None);
                    let options = m.options().clone().unwrap_or_default();
                    m.set_options(Some(
                        options
                            .into_iter()
                            .filter(|o| o != "idmap" && o != "ridmap")
                            .collect(),
                    ));
                }
            }
            staged.push(m);
        }
        Ok(staged)
    })();
    match result {
        Ok(staged) => {
            let mut spec = spec.clone();
            spec.set_mounts(Some(staged));
            Ok(Some(spec))
        }
        Err(e) => {
            release(bundle);
            Err(e)
        }
    }
}

/// The id mappings a mount asks its source to be seen through (its own `uidMappings` and
/// `gidMappings`, or the container's with a bare `idmap`/`ridmap` option), if any.
fn idmapping(spec: &Spec, m: &Mount) -> anyhow::Result<Option<IdMappings>> {
    let convert = |maps: &[LinuxIdMapping]| -> Vec<IdMapping> {
        maps.iter()
            .map(|m| IdMapping {
                container: m.container_id(),
                host: m.host_id(),
                size: m.size(),
            })
            .collect()
    };
    let option = m
        .options()
        .as_ref()
        .is_some_and(|o| o.iter().any(|o| o == "idmap" || o == "ridmap"));
    let (uids, gids) = match (m.uid_mappings(), m.gid_mappings()) {
        (Some(u), Some(g)) if !u.is_empty() && !g.is_empty() => (convert(u), convert(g)),
        (None, None) if option => {
            let linux = spec.linux().as_ref();
            let u = linux
                .and_then(|l| l.uid_mappings().as_deref())
                .unwrap_or(&[]);
            let g = linux
                .and_then(|l| l.gid_mappings().as_deref())
                .unwrap_or(&[]);
            anyhow::ensure!(
                !u.is_empty() && !g.is_empty(),
                "an idmap mount without mappings, in a container without its own"
            );
            (convert(u), convert(g))
        }
        (None, None) => return Ok(None),
        _ => anyhow::bail!("a mount's uid and gid mappings must both be given, and not empty"),
    };
    Ok(Some((uids, gids)))
}

fn create_dir(dir: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("create {}", dir.display())),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", dir.display()))
}

/// Bind-mounts `source` (resolved first, as libcontainer resolves it) at `place`, a new empty
/// file or directory; idmapped when `idmap` holds mappings.
fn bind(source: &Path, place: &Path, userns: Option<&OwnedFd>, m: &Mount) -> anyhow::Result<()> {
    let source =
        std::fs::canonicalize(source).with_context(|| format!("resolve {}", source.display()))?;
    if source.is_dir() {
        create_dir(place, 0o700)?;
    } else {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(place)
            .with_context(|| format!("create {}", place.display()))?;
    }
    let options = m.options().as_deref().unwrap_or(&[]);
    // Read-only here already when the container's mount is: the staged place is reachable by
    // the namespace's root, and is never a way to write what the spec mounts read-only.
    let read_only = options.iter().any(|o| o == "ro");
    if let Some(userns) = userns {
        return idmap::idmapped_bind(
            &source,
            place,
            userns,
            idmap::BindAttrs {
                read_only,
                recursive: options.iter().any(|o| o == "rbind"),
                recursive_idmap: options.iter().any(|o| o == "ridmap"),
                private: false,
            },
        );
    }
    use nix::mount::MsFlags;
    nix::mount::mount(
        Some(&source),
        place,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("bind {} at {}", source.display(), place.display()))?;
    if read_only {
        nix::mount::mount(
            None::<&str>,
            place,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .with_context(|| format!("make {} read-only", place.display()))?;
    }
    Ok(())
}

/// Detaches and removes whatever [`stage`] put in `bundle`. Safe to call when nothing was staged.
pub fn release(bundle: &Path) {
    let dir = bundle.join(DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let places: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    for place in places {
        // Each place may carry submounts (MS_REC): detach the whole tree.
        let _ = nix::mount::umount2(&place, nix::mount::MntFlags::MNT_DETACH);
        let removed = if place.is_dir() {
            std::fs::remove_dir(&place)
        } else {
            std::fs::remove_file(&place)
        };
        if let Err(e) = removed {
            log::warn!("remove {}: {e}", place.display());
        }
    }
    let _ = std::fs::remove_dir(&dir);
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxBuilder, LinuxNamespaceBuilder, MountBuilder, SpecBuilder};

    fn spec(userns: bool, mounts: Vec<Mount>) -> Spec {
        let mut namespaces = vec![
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Mount)
                .build()
                .unwrap(),
        ];
        if userns {
            namespaces.push(
                LinuxNamespaceBuilder::default()
                    .typ(LinuxNamespaceType::User)
                    .build()
                    .unwrap(),
            );
        }
        SpecBuilder::default()
            .linux(
                LinuxBuilder::default()
                    .namespaces(namespaces)
                    .build()
                    .unwrap(),
            )
            .mounts(mounts)
            .build()
            .unwrap()
    }

    fn bind_mount(source: &str, destination: &str) -> Mount {
        MountBuilder::default()
            .destination(destination)
            .typ("bind")
            .source(source)
            .options(vec!["rbind".to_string(), "ro".to_string()])
            .build()
            .unwrap()
    }

    #[test]
    fn nothing_is_staged_without_a_user_namespace_or_a_bind_mount() {
        let bundle = tempfile::tempdir().unwrap();
        let host_users = spec(false, vec![bind_mount("/etc/hostname", "/etc/hostname")]);
        assert!(stage(bundle.path(), &host_users).unwrap().is_none());
        let proc_only = spec(
            true,
            vec![
                MountBuilder::default()
                    .destination("/proc")
                    .typ("proc")
                    .source("proc")
                    .build()
                    .unwrap(),
            ],
        );
        assert!(stage(bundle.path(), &proc_only).unwrap().is_none());
        assert!(!bundle.path().join(DIR).exists());
    }

    #[test]
    fn a_missing_source_fails_and_leaves_nothing_staged() {
        let bundle = tempfile::tempdir().unwrap();
        let spec = spec(true, vec![bind_mount("/nonexistent/podsnap-test", "/data")]);
        let err = stage(bundle.path(), &spec).unwrap_err();
        assert!(format!("{err:#}").contains("/data"), "{err:#}");
        assert!(!bundle.path().join(DIR).exists());
    }

    #[test]
    fn bind_sources_are_staged_where_any_id_can_reach_them_and_released() {
        let bundle = tempfile::tempdir().unwrap();
        let private = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(private.path().join("hosts"), "127.0.0.1 here\n").unwrap();
        let source = private.path().join("hosts");
        let spec = spec(
            true,
            vec![bind_mount(source.to_str().unwrap(), "/etc/hosts")],
        );
        let staged = stage(bundle.path(), &spec).unwrap().unwrap();
        let place = staged.mounts().as_ref().unwrap()[0]
            .source()
            .clone()
            .unwrap();
        assert_eq!(place, bundle.path().join(DIR).join("0"));
        assert_eq!(std::fs::read_to_string(&place).unwrap(), "127.0.0.1 here\n");
        // The spec mounts it read-only: so is the staged place.
        assert!(std::fs::write(&place, "changed").is_err());
        let mode = std::fs::metadata(bundle.path().join(DIR))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o711);
        release(bundle.path());
        assert!(!bundle.path().join(DIR).exists());
        assert_eq!(
            std::fs::read_to_string(&source).unwrap(),
            "127.0.0.1 here\n"
        );
    }
}

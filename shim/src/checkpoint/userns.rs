//! Containers in a user namespace of their own (a pod's with `hostUsers: false`).
//!
//! A dump records the container's id mappings ([`recorded`]). CRIU's images hold the ids as
//! the processes saw them inside the namespace; the writable layer's archive holds host ids
//! (an overlay upper directory is not idmapped). A restore runs only where the new container
//! has a user namespace whose mappings cover exactly the same container-side ranges, and
//! nowhere else ([`check`]): the kubelet gives each pod its own host range, so only the host
//! side may differ. The restored processes are cloned inside the new pod's user namespace
//! (CRIU's `--join-ns user:`, with podsnap's `hack/criu-4.1.1-join-userns-at-clone.patch`),
//! keep their ids inside it and so run as the new host ids; the writable layer's owners are
//! moved from the old host range to the new one ([`IdShift`]). The CRIU images must agree with
//! the metadata ([`check_images`]).

use std::os::fd::OwnedFd;
use std::path::Path;

use anyhow::{Context, bail};
use oci_spec::runtime::{LinuxIdMapping, LinuxNamespaceType, Spec};
use podsnap_checkpoint_format::container::{IdMapping, Metadata, UserNamespace};

/// The checkpoint's images as the restored tasks' root reads them: CRIU's tasks open images
/// themselves, inside the new pod's user namespace, where they are root only there; the images
/// are the host root's (0600 in a 0700 directory, as they hold all of the pod's memory). This
/// is a detached, read-only mount of the directory idmapped to the container's own mappings,
/// where the host root's files are the namespace root's; reachable only through the returned
/// descriptor (`/proc/self/fd/N` for CRIU), and gone with it.
pub fn images_view(images: &Path, spec: &Spec) -> anyhow::Result<OwnedFd> {
    let mappings = recorded(spec).context("the container has no user namespace")?;
    let convert = |maps: &[IdMapping]| -> Vec<crate::idmap::IdMapping> {
        maps.iter()
            .map(|m| crate::idmap::IdMapping {
                container: m.container_id,
                host: m.host_id,
                size: m.length,
            })
            .collect()
    };
    let userns = crate::idmap::user_namespace(&convert(&mappings.uids), &convert(&mappings.gids))?;
    crate::idmap::idmapped_tree(
        images,
        &userns,
        crate::idmap::BindAttrs {
            read_only: true,
            recursive: false,
            recursive_idmap: false,
            private: true,
        },
    )
    .with_context(|| format!("an idmapped view of {}", images.display()))
}

/// The user namespace mappings of a container with a user namespace of its own, if it has one.
pub fn recorded(spec: &Spec) -> Option<UserNamespace> {
    if !crate::mount_sources::has_user_namespace(spec) {
        return None;
    }
    let linux = spec.linux().as_ref();
    let convert = |maps: Option<&Vec<LinuxIdMapping>>| -> Vec<IdMapping> {
        let mut maps: Vec<IdMapping> = maps
            .into_iter()
            .flatten()
            .map(|m| IdMapping {
                container_id: m.container_id(),
                host_id: m.host_id(),
                length: m.size(),
            })
            .collect();
        maps.sort();
        maps
    };
    Some(UserNamespace {
        uids: convert(linux.and_then(|l| l.uid_mappings().as_ref())),
        gids: convert(linux.and_then(|l| l.gid_mappings().as_ref())),
    })
}

/// Why a container is not checkpointed (`None` when it may be): one with a user namespace that
/// also shares its pod's process namespace (`shareProcessNamespace`), which CRIU cannot restore
/// into a user namespace it joins (the patched CRIU refuses it). Refused before anything is
/// frozen or written, never half-restored later.
pub fn refusal(id: &str, spec: &Spec) -> Option<String> {
    (crate::mount_sources::has_user_namespace(spec)
        && super::joined_namespace(spec, LinuxNamespaceType::Pid).is_some())
    .then(|| {
        format!(
            "container {id} has a user namespace (hostUsers: false) and shares its pod's process \
             namespace (shareProcessNamespace): podsnap cannot restore such a container yet, so \
             it is not checkpointed"
        )
    })
}

/// Whether CRIU's images hold a user namespace (`userns-*.img`: CRIU builds one from the maps
/// in it when it restores without joining one).
fn images_hold_user_namespace(images: &Path) -> anyhow::Result<bool> {
    Ok(std::fs::read_dir(images)
        .with_context(|| format!("list {}", images.display()))?
        .flatten()
        .any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("userns-") && name.ends_with(".img")
        }))
}

/// Refuses a checkpoint whose CRIU images and metadata disagree on its user namespace: images
/// with one, restored where the metadata says none, would have CRIU write the images' maps (any
/// host ids) for a new user namespace; the metadata alone decides nothing.
pub fn check_images(id: &str, metadata: &Metadata, images: &Path) -> anyhow::Result<()> {
    let in_images = images_hold_user_namespace(images)?;
    if in_images != metadata.user_namespace.is_some() {
        bail!(
            "container {id}: the checkpoint's CRIU images {} and its metadata {}: refused",
            if in_images {
                "hold a user namespace"
            } else {
                "hold no user namespace"
            },
            if in_images {
                "records none"
            } else {
                "records one"
            }
        );
    }
    Ok(())
}

/// The container-side ranges of mappings, in order: what a restore must cover alike.
fn container_side(maps: &[IdMapping]) -> Vec<(u32, u32)> {
    let mut side: Vec<(u32, u32)> = maps.iter().map(|m| (m.container_id, m.length)).collect();
    side.sort();
    side
}

fn describe(maps: &[IdMapping]) -> String {
    let ranges: Vec<String> = maps
        .iter()
        .map(|m| {
            format!(
                "{}..{}",
                m.container_id,
                u64::from(m.container_id) + u64::from(m.length)
            )
        })
        .collect();
    if ranges.is_empty() {
        "none".to_string()
    } else {
        ranges.join(", ")
    }
}

/// Whether the checkpoint (its `metadata`) may be restored into a container of `spec`, and if
/// so, how the writable layer's owners move: `None` for a container without a user namespace.
pub fn check(id: &str, metadata: &Metadata, spec: &Spec) -> anyhow::Result<Option<IdShift>> {
    match (&metadata.user_namespace, recorded(spec)) {
        (None, None) => Ok(None),
        (None, Some(_)) => bail!(
            "container {id} has a user namespace (hostUsers: false) and the checkpoint was \
             taken in the host's: refused, its processes would keep host ids"
        ),
        (Some(_), None) => bail!(
            "the checkpoint was taken in a user namespace (hostUsers: false) and container \
             {id} has none: refused, its processes would run in the host's"
        ),
        (Some(_), Some(_)) if super::joined_namespace(spec, LinuxNamespaceType::User).is_none() => {
            bail!(
                "container {id} has a user namespace of its own rather than its pod's: podsnap \
                 restores only into a pod's user namespace"
            )
        }
        (Some(_), Some(_)) if super::joined_namespace(spec, LinuxNamespaceType::Pid).is_some() => {
            bail!(
                "container {id} has a user namespace and shares its pod's process namespace: \
                 podsnap cannot restore such a container yet"
            )
        }
        (Some(old), Some(new)) => {
            for (what, old, new) in [("uid", &old.uids, &new.uids), ("gid", &old.gids, &new.gids)] {
                if container_side(old) != container_side(new) {
                    bail!(
                        "container {id}: the new user namespace maps container {what}s {} and \
                         the checkpoint's mapped {}: refused, the mappings must cover the same \
                         container ids",
                        describe(new),
                        describe(old)
                    );
                }
            }
            Ok(Some(IdShift {
                uids: moves(&old.uids, &new.uids),
                gids: moves(&old.gids, &new.gids),
            }))
        }
    }
}

/// For each old mapping, its new host start (the new mapping of the same container range).
fn moves(old: &[IdMapping], new: &[IdMapping]) -> Vec<(IdMapping, u32)> {
    old.iter()
        .filter_map(|o| {
            new.iter()
                .find(|n| n.container_id == o.container_id && n.length == o.length)
                .map(|n| (*o, n.host_id))
        })
        .collect()
}

/// How the host ids of a checkpoint's writable layer move to the new container's mapping: an
/// id in an old mapping goes to the same container id's host id in the new one. An id outside
/// the old mappings was unmapped in the old container (seen there as the overflow id) and stays
/// unmapped: it becomes the host's overflow id (65534), never host root's or another range's
/// (an archive could name any id), and a file so owned loses its set-user-id or set-group-id
/// bit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdShift {
    uids: Vec<(IdMapping, u32)>,
    gids: Vec<(IdMapping, u32)>,
}

const OVERFLOW_ID: u32 = 65534;

/// The new host id of `id`, or `None` when the old mappings do not cover it.
fn shift(moves: &[(IdMapping, u32)], id: u32) -> Option<u32> {
    moves.iter().find_map(|(old, new_host)| {
        let offset = id.wrapping_sub(old.host_id);
        (id >= old.host_id && offset < old.length).then(|| new_host + offset)
    })
}

impl IdShift {
    /// The new host uid, gid and mode of a file the checkpoint's archive has as `uid`, `gid`
    /// and `mode`.
    pub fn apply(&self, uid: u32, gid: u32, mode: u32) -> (u32, u32, u32) {
        let mut mode = mode;
        let uid = shift(&self.uids, uid).unwrap_or_else(|| {
            mode &= !libc::S_ISUID;
            OVERFLOW_ID
        });
        let gid = shift(&self.gids, gid).unwrap_or_else(|| {
            mode &= !libc::S_ISGID;
            OVERFLOW_ID
        });
        (uid, gid, mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxBuilder, LinuxIdMappingBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, SpecBuilder,
    };

    fn spec(maps: Option<&[(u32, u32, u32)]>) -> Spec {
        let mut linux = LinuxBuilder::default();
        let mut namespaces = vec![
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Pid)
                .build()
                .unwrap(),
        ];
        if let Some(maps) = maps {
            let maps: Vec<LinuxIdMapping> = maps
                .iter()
                .map(|&(container_id, host_id, size)| {
                    LinuxIdMappingBuilder::default()
                        .container_id(container_id)
                        .host_id(host_id)
                        .size(size)
                        .build()
                        .unwrap()
                })
                .collect();
            namespaces.push(
                LinuxNamespaceBuilder::default()
                    .typ(LinuxNamespaceType::User)
                    .path("/proc/1/ns/user")
                    .build()
                    .unwrap(),
            );
            linux = linux.uid_mappings(maps.clone()).gid_mappings(maps);
        }
        SpecBuilder::default()
            .linux(linux.namespaces(namespaces).build().unwrap())
            .build()
            .unwrap()
    }

    fn metadata(spec: &Spec) -> Metadata {
        Metadata {
            user_namespace: recorded(spec),
            ..Metadata::current()
        }
    }

    #[test]
    fn a_container_without_a_user_namespace_records_none_and_restores_only_without_one() {
        let host = spec(None);
        assert_eq!(recorded(&host), None);
        assert_eq!(check("c", &metadata(&host), &host).unwrap(), None);
        let userns = spec(Some(&[(0, 65536, 65536)]));
        let err = check("c", &metadata(&host), &userns).unwrap_err();
        assert!(err.to_string().contains("taken in the host's"), "{err}");
        let err = check("c", &metadata(&userns), &host).unwrap_err();
        assert!(err.to_string().contains("has none"), "{err}");
    }

    #[test]
    fn a_new_host_range_is_accepted_and_moves_the_layer_s_owners() {
        let old = spec(Some(&[(0, 65536 * 23, 65536)]));
        let new = spec(Some(&[(0, 65536 * 24, 65536)]));
        let shift = check("c", &metadata(&old), &new).unwrap().unwrap();
        let (o, n) = (65536 * 23, 65536 * 24);
        assert_eq!(shift.apply(o, o + 5, 0o6755), (n, n + 5, 0o6755));
        assert_eq!(shift.apply(o + 65535, o, 0o644), (n + 65535, n, 0o644));
        // Unmapped before, unmapped after: never host root's, nor a file of the new range, and
        // without the set-id bit of an owner it lost.
        let over = OVERFLOW_ID;
        assert_eq!(shift.apply(0, o, 0o4755), (over, n, 0o755));
        assert_eq!(shift.apply(o, 0, 0o6755), (n, over, 0o4755));
        assert_eq!(shift.apply(n + 7, o - 1, 0o6755), (over, over, 0o755));
    }

    #[test]
    fn images_and_metadata_must_agree_on_the_user_namespace() {
        let images = tempfile::tempdir().unwrap();
        let userns = spec(Some(&[(0, 65536, 65536)]));
        let host = spec(None);
        check_images("c", &metadata(&host), images.path()).unwrap();
        let err = check_images("c", &metadata(&userns), images.path()).unwrap_err();
        assert!(err.to_string().contains("hold no user namespace"), "{err}");
        std::fs::write(images.path().join("userns-13.img"), b"").unwrap();
        check_images("c", &metadata(&userns), images.path()).unwrap();
        let err = check_images("c", &metadata(&host), images.path()).unwrap_err();
        assert!(err.to_string().contains("records none"), "{err}");
    }

    #[test]
    fn a_shared_process_namespace_with_a_user_namespace_is_refused() {
        let mut shared = spec(Some(&[(0, 65536, 65536)]));
        let mut linux = shared.linux().clone().unwrap();
        let mut namespaces = linux.namespaces().clone().unwrap();
        namespaces[0] = LinuxNamespaceBuilder::default()
            .typ(LinuxNamespaceType::Pid)
            .path("/proc/1/ns/pid")
            .build()
            .unwrap();
        linux.set_namespaces(Some(namespaces));
        shared.set_linux(Some(linux));
        assert!(
            refusal("c", &shared)
                .unwrap()
                .contains("shareProcessNamespace")
        );
        assert!(refusal("c", &spec(Some(&[(0, 65536, 65536)]))).is_none());
        let err = check("c", &metadata(&shared), &shared).unwrap_err();
        assert!(err.to_string().contains("process namespace"), "{err}");
    }

    #[test]
    fn other_container_ranges_are_refused_naming_both() {
        let old = spec(Some(&[(0, 65536 * 23, 65536)]));
        for maps in [
            &[(1, 65536 * 24, 65536)][..],
            &[(0, 65536 * 24, 1000)],
            &[(0, 65536 * 24, 65536), (65536, 0, 1)],
        ] {
            let err = check("c", &metadata(&old), &spec(Some(maps))).unwrap_err();
            assert!(err.to_string().contains("0..65536"), "{err}");
        }
    }
}

//! Idmapped rootfs layers, for pods with a user namespace of their own (`hostUsers: false`).
//!
//! containerd hands such a container's rootfs over as an overlay mount whose options carry
//! `uidmap=<container>:<host>:<size>[,...]` and `gidmap=...`: the image layers are owned by host
//! root, and the container's root is an unprivileged host id, so the lower layers must be seen
//! through an idmapped mount. This does what containerd's own mount code does for runc's shim
//! (`core/mount`: `prepareIDMappedOverlay`): a user namespace with those mappings is made (a
//! forked child that only unshares and waits), the directory the lower layers share is
//! attached read-only and idmapped to that namespace at a private temporary place
//! (`open_tree` + `mount_setattr(MOUNT_ATTR_IDMAP)` + `move_mount`), the overlay is mounted with
//! its lowerdirs rewritten through it, and the temporary mount is detached again (the overlay
//! keeps what it needs).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};

/// One line of a uid or gid map: container id, host id, count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMapping {
    pub container: u32,
    pub host: u32,
    pub size: u32,
}

/// Parses `0:65536:65536[,...]`, as containerd writes `uidmap=`/`gidmap=`.
pub fn parse_mappings(text: &str) -> anyhow::Result<Vec<IdMapping>> {
    let mappings = text
        .split(',')
        .map(|one| {
            let parts: Vec<&str> = one.split(':').collect();
            ensure!(
                parts.len() == 3,
                "id mapping {one:?} is not container-id:host-id:size"
            );
            let number = |s: &str| -> anyhow::Result<u32> {
                s.parse()
                    .with_context(|| format!("id mapping {one:?}: {s:?} is not a number"))
            };
            let mapping = IdMapping {
                container: number(parts[0])?,
                host: number(parts[1])?,
                size: number(parts[2])?,
            };
            ensure!(mapping.size > 0, "id mapping {one:?} maps no id");
            ensure!(
                mapping.container.checked_add(mapping.size).is_some()
                    && mapping.host.checked_add(mapping.size).is_some(),
                "id mapping {one:?} overflows"
            );
            Ok(mapping)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    ensure!(!mappings.is_empty(), "empty id mapping");
    Ok(mappings)
}

/// A rootfs mount's id mappings, split from its other options.
#[derive(Debug)]
pub struct IdMappedOptions {
    pub uids: Vec<IdMapping>,
    pub gids: Vec<IdMapping>,
    /// The options without `uidmap=`/`gidmap=`.
    pub rest: Vec<String>,
}

/// The uid and gid maps among a rootfs mount's options, and the options without them; `None`
/// when the mount is not idmapped (it needs both, as containerd does).
pub fn split_options(options: &[String]) -> anyhow::Result<Option<IdMappedOptions>> {
    let mut uids = None;
    let mut gids = None;
    let mut rest = Vec::new();
    for option in options {
        if let Some(map) = option.strip_prefix("uidmap=") {
            uids = Some(parse_mappings(map)?);
        } else if let Some(map) = option.strip_prefix("gidmap=") {
            gids = Some(parse_mappings(map)?);
        } else {
            rest.push(option.clone());
        }
    }
    match (uids, gids) {
        (Some(uids), Some(gids)) => Ok(Some(IdMappedOptions { uids, gids, rest })),
        (None, None) => Ok(None),
        _ => bail!("an idmapped mount needs both uidmap= and gidmap="),
    }
}

fn map_text(mappings: &[IdMapping]) -> String {
    mappings
        .iter()
        .map(|m| format!("{} {} {}\n", m.container, m.host, m.size))
        .collect()
}

fn errno(what: &str) -> anyhow::Error {
    anyhow::Error::new(std::io::Error::last_os_error()).context(what.to_string())
}

/// A file descriptor of a new user namespace with these mappings.
pub fn user_namespace(uids: &[IdMapping], gids: &[IdMapping]) -> anyhow::Result<OwnedFd> {
    let (ready_r, ready_w) = nix::unistd::pipe().context("pipe")?;
    let (done_r, done_w) = nix::unistd::pipe().context("pipe")?;
    // SAFETY: the child only makes async-signal-safe system calls (unshare, write, read,
    // _exit) before it exits; it touches no lock or allocation of this multi-threaded process.
    let child = match unsafe { nix::unistd::fork() }.context("fork")? {
        nix::unistd::ForkResult::Child => unsafe {
            // The parent's ends: closed here, or the child would never see end of input.
            libc::close(ready_r.as_raw_fd());
            libc::close(done_w.as_raw_fd());
            let ok: u8 = u8::from(libc::unshare(libc::CLONE_NEWUSER) == 0);
            libc::write(ready_w.as_raw_fd(), (&ok as *const u8).cast(), 1);
            let mut byte = 0u8;
            libc::read(done_r.as_raw_fd(), (&mut byte as *mut u8).cast(), 1);
            libc::_exit(0);
        },
        nix::unistd::ForkResult::Parent { child } => child,
    };
    drop(ready_w);
    drop(done_r);
    let result = (|| -> anyhow::Result<OwnedFd> {
        let mut ok = [0u8; 1];
        let n = nix::unistd::read(ready_r.as_raw_fd(), &mut ok).context("wait for the child")?;
        ensure!(
            n == 1 && ok[0] == 1,
            "the child could not unshare a user namespace"
        );
        let proc_dir = PathBuf::from(format!("/proc/{child}"));
        std::fs::write(proc_dir.join("uid_map"), map_text(uids))
            .with_context(|| format!("write uid_map of {child}"))?;
        std::fs::write(proc_dir.join("gid_map"), map_text(gids))
            .with_context(|| format!("write gid_map of {child}"))?;
        let file = std::fs::File::open(proc_dir.join("ns/user"))
            .with_context(|| format!("open the user namespace of {child}"))?;
        Ok(file.into())
    })();
    drop(done_w);
    // The shim's reaper may reap it first; either way it is gone.
    let _ = nix::sys::wait::waitpid(child, None);
    result
}

// Linux's mount API (not in nix 0.29): open_tree, mount_setattr, move_mount.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// How [`idmapped_bind`] attaches a tree.
#[derive(Debug, Clone, Copy)]
pub struct BindAttrs {
    /// Read-only (the overlay's lower layers).
    pub read_only: bool,
    /// The source's submounts too (`rbind`).
    pub recursive: bool,
    /// The submounts idmapped too (`ridmap`; with `recursive`).
    pub recursive_idmap: bool,
    /// Made private (a temporary mount nothing should propagate to).
    pub private: bool,
}

/// The lower layers of an idmapped overlay: read-only, every layer, private.
pub const LAYERS: BindAttrs = BindAttrs {
    read_only: true,
    recursive: true,
    recursive_idmap: true,
    private: true,
};

/// Attaches `source`, idmapped to the user namespace `userns`, at `target`.
pub fn idmapped_bind(
    source: &Path,
    target: &Path,
    userns: &OwnedFd,
    attrs: BindAttrs,
) -> anyhow::Result<()> {
    let target_c = CString::new(target.as_os_str().as_encoded_bytes())?;
    let empty = c"";
    let tree = idmapped_tree(source, userns, attrs)?;
    // SAFETY: valid descriptor and NUL-terminated target path.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target_c.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc < 0 {
        return Err(errno(&format!("attach the idmapped {}", target.display())));
    }
    Ok(())
}

/// A detached copy of the mount tree at `source`, idmapped to the user namespace `userns`:
/// reachable only through the returned descriptor, and gone with it.
pub fn idmapped_tree(source: &Path, userns: &OwnedFd, attrs: BindAttrs) -> anyhow::Result<OwnedFd> {
    let source_c = CString::new(source.as_os_str().as_encoded_bytes())?;
    let empty = c"";
    // SAFETY: valid NUL-terminated paths; the returned descriptor is owned below.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            source_c.as_ptr(),
            OPEN_TREE_CLONE
                | libc::O_CLOEXEC as libc::c_uint
                | if attrs.recursive { AT_RECURSIVE } else { 0 },
        )
    };
    if tree < 0 {
        return Err(errno(&format!("open_tree {}", source.display())));
    }
    // SAFETY: open_tree returned a new descriptor we own.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP
            | if attrs.read_only {
                MOUNT_ATTR_RDONLY
            } else {
                0
            },
        attr_clr: 0,
        propagation: if attrs.private { libc::MS_PRIVATE } else { 0 },
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: a valid descriptor, an empty path with AT_EMPTY_PATH, and an attribute struct of
    // the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint
                | if attrs.recursive && attrs.recursive_idmap {
                    AT_RECURSIVE
                } else {
                    0
                },
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        return Err(errno(&format!("idmap {}", source.display())));
    }
    Ok(tree)
}

/// The directory every lower layer lies in (their longest common parent), as containerd
/// picks it; `/` is refused.
fn common_parent(lowers: &[PathBuf]) -> anyhow::Result<PathBuf> {
    let first = lowers.first().context("no lowerdir")?;
    let mut common = first
        .parent()
        .context("lowerdir without parent")?
        .to_path_buf();
    while !lowers.iter().all(|l| l.starts_with(&common)) {
        common = common
            .parent()
            .context("the lower layers share no directory")?
            .to_path_buf();
    }
    ensure!(
        common != Path::new("/"),
        "the lower layers share only the root directory"
    );
    Ok(common)
}

/// Mounts the overlay described by `options` (which hold `uidmap=`/`gidmap=`) at `target`, its
/// lower layers idmapped; `scratch` is a private directory for the temporary mount.
pub fn mount_overlay(
    source: &str,
    options: &[String],
    target: &Path,
    scratch: &Path,
) -> anyhow::Result<()> {
    let Some(IdMappedOptions {
        uids,
        gids,
        mut rest,
    }) = split_options(options)?
    else {
        bail!("not an idmapped mount");
    };
    let index = rest
        .iter()
        .position(|o| o.starts_with("lowerdir="))
        .context("an idmapped overlay without lowerdir=")?;
    let lowers: Vec<PathBuf> = rest[index]["lowerdir=".len()..]
        .split(':')
        .map(PathBuf::from)
        .collect();
    let common = common_parent(&lowers)?;
    let userns = user_namespace(&uids, &gids)?;
    std::fs::create_dir_all(scratch).with_context(|| format!("create {}", scratch.display()))?;
    let mapped = tempfile::Builder::new()
        .prefix("idmapped-")
        .tempdir_in(scratch)
        .context("create the idmapped layers' mount point")?;
    idmapped_bind(&common, mapped.path(), &userns, LAYERS)?;
    let through: Vec<String> = lowers
        .iter()
        .map(|l| {
            let relative = l.strip_prefix(&common).unwrap_or(l);
            mapped.path().join(relative).display().to_string()
        })
        .collect();
    rest[index] = format!("lowerdir={}", through.join(":"));
    let mounted =
        containerd_shim::mount::mount_rootfs(Some("overlay"), Some(source), &rest, target)
            .map_err(|e| anyhow::anyhow!("mount the overlay with idmapped layers: {e}"));
    // The overlay holds what it needs of the idmapped layers; the temporary place goes.
    let _ = nix::mount::umount2(mapped.path(), nix::mount::MntFlags::MNT_DETACH);
    mounted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_s_id_mappings_are_parsed_and_checked() {
        assert_eq!(
            parse_mappings("0:65536:65536").unwrap(),
            vec![IdMapping {
                container: 0,
                host: 65536,
                size: 65536
            }]
        );
        assert_eq!(parse_mappings("0:1000:1,1:100000:65535").unwrap().len(), 2);
        for bad in ["", "0:1", "a:b:c", "0:1:0", "4294967295:0:2", "0:1:2:3"] {
            assert!(parse_mappings(bad).is_err(), "{bad}");
        }
        let options = vec![
            "lowerdir=/s/1/fs:/s/2/fs".to_string(),
            "uidmap=0:65536:65536".to_string(),
            "gidmap=0:65536:65536".to_string(),
            "upperdir=/s/3/fs".to_string(),
        ];
        let split = split_options(&options).unwrap().unwrap();
        assert_eq!(split.uids, split.gids);
        assert_eq!(split.rest.len(), 2);
        assert!(split_options(&options[..2]).is_err());
        assert!(split_options(&options[3..]).unwrap().is_none());
    }

    #[test]
    fn the_layers_common_parent_is_containerd_s() {
        let lowers = [
            PathBuf::from("/var/lib/c/snapshots/12/fs"),
            PathBuf::from("/var/lib/c/snapshots/3/fs"),
        ];
        assert_eq!(
            common_parent(&lowers).unwrap(),
            Path::new("/var/lib/c/snapshots")
        );
        assert!(common_parent(&[PathBuf::from("/a/fs"), PathBuf::from("/b/fs")]).is_err());
    }

    #[test]
    fn an_idmapped_layer_shows_host_root_files_as_the_container_s_root() {
        // Root in a user namespace mapping container 0 to host 100000: the layer's root-owned
        // files, seen through the idmapped mount, belong to host uid 100000.
        let layer = tempfile::tempdir().unwrap();
        std::fs::write(layer.path().join("file"), b"x").unwrap();
        let target = tempfile::tempdir().unwrap();
        let map = [IdMapping {
            container: 0,
            host: 100_000,
            size: 65536,
        }];
        let userns = user_namespace(&map, &map).unwrap();
        idmapped_bind(layer.path(), target.path(), &userns, LAYERS).unwrap();
        use std::os::unix::fs::MetadataExt;
        let uid = std::fs::metadata(target.path().join("file")).unwrap().uid();
        let readonly = std::fs::write(target.path().join("new"), b"y").is_err();
        nix::mount::umount2(target.path(), nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert_eq!(uid, 100_000);
        assert!(readonly, "the idmapped layer is writable");
    }
}

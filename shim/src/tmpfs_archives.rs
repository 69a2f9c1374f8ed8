//! CRIU's tmpfs archives, checked before CRIU unpacks them as root.
//!
//! A checkpoint keeps the contents of each tmpfs mounted inside a container (its `/dev`, and
//! any tmpfs the spec mounts) as a gzipped tar, `tmpfs-dev-<dev>.tar.gz.img` (or the older
//! `tmpfs-<mnt id>.tar.gz.img`). CRIU's restore hands it to `tar --extract`, run as root on
//! the host while the container's mounts are built, which recreates whatever the archive
//! lists: device nodes of any number, hard links, files of any owner. A device node is access
//! to hardware (a disk by its block number), so [`check`] refuses, before CRIU runs, an archive
//! that holds
//! - a character or block device the new spec does not give the container: its
//!   `linux.devices`, and the devices every OCI container has (null, zero, full, random,
//!   urandom, tty, console, ptmx);
//! - a member or hard-link target named by an absolute path or through `..`, or under an
//!   earlier member that is a symbolic link (GNU tar itself refuses to write through such a
//!   link; nothing here relies on which `tar` CRIU finds);
//! - a member listed twice, or of a kind `tar --create` does not write for a file system
//!   (volume labels, multi-volume continuations).
//!
//! The archive's bytes are verified against the checkpoint's digests before this runs; this
//! is about what a well-formed archive may ask for.

use std::collections::HashSet;
use std::fs::File;
use std::io::BufReader;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail, ensure};
use oci_spec::runtime::{LinuxDeviceType, Spec};

/// The devices every OCI container is given (runtime-spec, "Default Devices"), by
/// (major, minor): null, zero, full, random, urandom, tty, console, ptmx.
const DEFAULT_DEVICES: [(u32, u32); 8] = [
    (1, 3),
    (1, 5),
    (1, 7),
    (1, 8),
    (1, 9),
    (5, 0),
    (5, 1),
    (5, 2),
];

/// Whether `name` is one of CRIU's tmpfs archives.
fn is_tmpfs_archive(name: &str) -> bool {
    name.starts_with("tmpfs-") && name.ends_with(".tar.gz.img")
}

/// Checks every tmpfs archive in the CRIU image directory `images` against `spec`.
pub fn check(spec: &Spec, images: &Path) -> anyhow::Result<()> {
    let allowed = Allowed::of(spec);
    let entries = std::fs::read_dir(images)
        .with_context(|| format!("read the checkpoint's images in {}", images.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("read {}", images.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| is_tmpfs_archive(n)) else {
            continue;
        };
        let file = File::open(entry.path())
            .with_context(|| format!("open the checkpoint's tmpfs archive {name}"))?;
        check_archive(&allowed, BufReader::new(file))
            .with_context(|| format!("the checkpoint's tmpfs archive {name}: refused"))?;
    }
    Ok(())
}

/// The device nodes a spec allows in an archive, by kind and number.
struct Allowed {
    char: HashSet<(u32, u32)>,
    block: HashSet<(u32, u32)>,
}

impl Allowed {
    fn of(spec: &Spec) -> Self {
        let mut allowed = Allowed {
            char: DEFAULT_DEVICES.into_iter().collect(),
            block: HashSet::new(),
        };
        let devices = spec.linux().as_ref().and_then(|l| l.devices().as_ref());
        for d in devices.into_iter().flatten() {
            let (Ok(major), Ok(minor)) = (u32::try_from(d.major()), u32::try_from(d.minor()))
            else {
                continue;
            };
            match d.typ() {
                LinuxDeviceType::C | LinuxDeviceType::U => allowed.char.insert((major, minor)),
                LinuxDeviceType::B => allowed.block.insert((major, minor)),
                _ => false,
            };
        }
        allowed
    }
}

/// A member's name as a relative path of normal components (`./` dropped), or why not.
fn member_path(name: &Path) -> anyhow::Result<PathBuf> {
    let mut clean = PathBuf::new();
    for c in name.components() {
        match c {
            Component::CurDir => {}
            Component::Normal(part) => clean.push(part),
            _ => bail!("{}: not a plain relative path", name.display()),
        }
    }
    Ok(clean)
}

/// Whether a proper ancestor of `path` is one of `links`.
fn under_a_link(path: &Path, links: &HashSet<PathBuf>) -> bool {
    path.ancestors()
        .skip(1)
        .any(|a| !a.as_os_str().is_empty() && links.contains(a))
}

fn check_archive(allowed: &Allowed, reader: impl std::io::Read) -> anyhow::Result<()> {
    // Every gzip member, as `gzip -d` (which `tar --gzip` runs) reads them: a second member
    // would otherwise carry entries this check never sees.
    let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(reader));
    let mut seen = HashSet::new();
    let mut links = HashSet::new();
    for entry in archive.entries().context("read the archive")? {
        let entry = entry.context("read the archive")?;
        let raw = entry.path().context("a member's name")?.into_owned();
        let path = member_path(&raw)?;
        ensure!(
            !under_a_link(&path, &links),
            "{}: under a symbolic link of the archive",
            raw.display()
        );
        ensure!(
            path.as_os_str().is_empty() || seen.insert(path.clone()),
            "{}: listed twice",
            raw.display()
        );
        let header = entry.header();
        let kind = header.entry_type();
        match kind {
            tar::EntryType::Regular
            | tar::EntryType::Continuous
            | tar::EntryType::GNUSparse
            | tar::EntryType::Directory
            | tar::EntryType::Fifo => {}
            tar::EntryType::Symlink => {
                links.insert(path);
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .context("a hard link's target")?
                    .with_context(|| format!("{}: a hard link without a target", raw.display()))?;
                let clean = member_path(&target)
                    .with_context(|| format!("{}: a hard link to", raw.display()))?;
                ensure!(
                    !under_a_link(&clean, &links) && !links.contains(&clean),
                    "{}: a hard link to {}, through a symbolic link of the archive",
                    raw.display(),
                    target.display()
                );
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                let number = header
                    .device_major()
                    .ok()
                    .flatten()
                    .zip(header.device_minor().ok().flatten())
                    .with_context(|| format!("{}: a device without a number", raw.display()))?;
                let (set, what) = if kind == tar::EntryType::Char {
                    (&allowed.char, "character")
                } else {
                    (&allowed.block, "block")
                };
                ensure!(
                    set.contains(&number),
                    "{}: {what} device {}:{}, which the container's spec does not give it",
                    raw.display(),
                    number.0,
                    number.1
                );
            }
            other => bail!("{}: a member of kind {other:?}", raw.display()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxBuilder, LinuxDeviceBuilder};

    /// A gzipped archive of `members`: (name, kind, link target, device number).
    fn archive(members: &[(&str, tar::EntryType, &str, (u32, u32))]) -> Vec<u8> {
        gzip(&tar_of(members))
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap()
    }

    /// The tar of `members`, uncompressed.
    fn tar_of(members: &[(&str, tar::EntryType, &str, (u32, u32))]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, kind, link, (major, minor)) in members {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_mode(0o644);
            header.set_size(0);
            if !link.is_empty() {
                header.set_link_name(link).unwrap();
            }
            if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
                header.set_device_major(*major).unwrap();
                header.set_device_minor(*minor).unwrap();
            }
            // `append_data` would refuse `..`; the raw name is what a hostile archive holds.
            let bytes = name.as_bytes();
            header.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            header.set_cksum();
            builder.append(&header, std::io::empty()).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn spec_with(devices: &[(LinuxDeviceType, i64, i64)]) -> Spec {
        let devices = devices
            .iter()
            .map(|(typ, major, minor)| {
                LinuxDeviceBuilder::default()
                    .path(format!("/dev/d{major}-{minor}"))
                    .typ(*typ)
                    .major(*major)
                    .minor(*minor)
                    .build()
                    .unwrap()
            })
            .collect::<Vec<_>>();
        let mut spec = Spec::default();
        spec.set_linux(Some(
            LinuxBuilder::default().devices(devices).build().unwrap(),
        ));
        spec
    }

    fn checked(spec: &Spec, members: &[(&str, tar::EntryType, &str, (u32, u32))]) -> String {
        match check_archive(&Allowed::of(spec), &archive(members)[..]) {
            Ok(()) => "ok".into(),
            Err(e) => format!("{e:#}"),
        }
    }

    use tar::EntryType::{Block, Char, Directory, Link, Regular, Symlink};

    /// What a container's `/dev` holds as CRIU archives it.
    const DEV: &[(&str, tar::EntryType, &str, (u32, u32))] = &[
        ("./", Directory, "", (0, 0)),
        ("./null", Char, "", (1, 3)),
        ("./zero", Char, "", (1, 5)),
        ("./urandom", Char, "", (1, 9)),
        ("./tty", Char, "", (5, 0)),
        ("./ptmx", Symlink, "pts/ptmx", (0, 0)),
        ("./fd", Symlink, "/proc/self/fd", (0, 0)),
        ("./stdin", Symlink, "/proc/self/fd/0", (0, 0)),
        ("./pts", Directory, "", (0, 0)),
        ("./shm", Directory, "", (0, 0)),
        ("./termination-log", Regular, "", (0, 0)),
    ];

    #[test]
    fn a_containers_dev_passes() {
        assert_eq!(checked(&Spec::default(), DEV), "ok");
    }

    #[test]
    fn a_device_the_spec_does_not_give_is_refused() {
        let disk = [("./sda", Block, "", (8, 0))];
        let message = checked(&Spec::default(), &disk);
        assert!(
            message
                .contains("./sda: block device 8:0, which the container's spec does not give it"),
            "{message}"
        );
        let fuse = [("./fuse", Char, "", (10, 229))];
        assert!(checked(&Spec::default(), &fuse).contains("character device 10:229"));
        // A privileged container's spec lists them: then they pass.
        let granted = spec_with(&[(LinuxDeviceType::B, 8, 0), (LinuxDeviceType::C, 10, 229)]);
        assert_eq!(checked(&granted, &disk), "ok");
        assert_eq!(checked(&granted, &fuse), "ok");
        // A block device is not given by a character device of the same number.
        let char_only = spec_with(&[(LinuxDeviceType::C, 8, 0)]);
        assert!(checked(&char_only, &disk).contains("block device 8:0"));
    }

    #[test]
    fn a_device_in_a_second_gzip_member_is_refused() {
        // `gzip -d` reads on past the first member; so must the check. The first member ends
        // where the device's header begins, without the archive's end.
        let tar = tar_of(&[("./null", Char, "", (1, 3)), ("./sda", Block, "", (8, 0))]);
        let mut two = gzip(&tar[..512]);
        two.extend(gzip(&tar[512..]));
        let message = match check_archive(&Allowed::of(&Spec::default()), &two[..]) {
            Ok(()) => "ok".into(),
            Err(e) => format!("{e:#}"),
        };
        assert!(message.contains("./sda: block device 8:0"), "{message}");
    }

    #[test]
    fn names_that_leave_the_tmpfs_are_refused() {
        for name in ["../etc/cron.d/x", "./a/../../x", "/etc/passwd"] {
            let message = checked(&Spec::default(), &[(name, Regular, "", (0, 0))]);
            assert!(
                message.contains("not a plain relative path"),
                "{name}: {message}"
            );
        }
        let message = checked(
            &Spec::default(),
            &[("./x", Link, "../../etc/shadow", (0, 0))],
        );
        assert!(message.contains("a hard link to"), "{message}");
    }

    #[test]
    fn members_under_a_symbolic_link_are_refused() {
        let through = [
            ("./x", Symlink, "/etc", (0, 0)),
            ("./x/cron.d/job", Regular, "", (0, 0)),
        ];
        let message = checked(&Spec::default(), &through);
        assert!(
            message.contains("./x/cron.d/job: under a symbolic link"),
            "{message}"
        );
        let linked = [
            ("./x", Symlink, "/etc", (0, 0)),
            ("./y", Link, "./x/shadow", (0, 0)),
        ];
        assert!(checked(&Spec::default(), &linked).contains("through a symbolic link"));
        let twice = [
            ("./x", Symlink, "/etc", (0, 0)),
            ("./x", Directory, "", (0, 0)),
        ];
        assert!(checked(&Spec::default(), &twice).contains("listed twice"));
    }

    #[test]
    fn only_tmpfs_archives_are_read_and_a_bad_one_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pages-1.img"), b"not an archive").unwrap();
        std::fs::write(dir.path().join("tmpfs-dev-70.tar.gz.img"), archive(DEV)).unwrap();
        check(&Spec::default(), dir.path()).unwrap();
        std::fs::write(
            dir.path().join("tmpfs-dev-72.tar.gz.img"),
            archive(&[("./sda", Block, "", (8, 0))]),
        )
        .unwrap();
        let message = format!("{:#}", check(&Spec::default(), dir.path()).unwrap_err());
        assert!(
            message.starts_with("the checkpoint's tmpfs archive tmpfs-dev-72.tar.gz.img: refused"),
            "{message}"
        );
        std::fs::write(
            dir.path().join("tmpfs-dev-72.tar.gz.img"),
            b"\x1f\x8b garbage",
        )
        .unwrap();
        assert!(check(&Spec::default(), dir.path()).is_err());
    }
}

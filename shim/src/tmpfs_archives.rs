//! CRIU's tmpfs archives, checked and written again before CRIU unpacks them as root.
//!
//! A checkpoint keeps the contents of each tmpfs mounted inside a container (its `/dev`, and
//! any tmpfs the spec mounts) as a gzipped tar, `tmpfs-dev-<dev>.tar.gz.img` (or the older
//! `tmpfs-<mnt id>.tar.gz.img`). CRIU's restore hands it to `tar --extract`, run as root on
//! the host while the container's mounts are built, which recreates whatever the archive
//! lists: device nodes of any number, hard links, files of any owner (by name, too: the
//! extract does not pass `--numeric-owner`). A device node is access to hardware (a disk by its
//! block number), so [`rewrite`] reads each archive, refuses one that holds
//! - a character or block device the new spec does not give the container: its
//!   `linux.devices`, and the devices every OCI container has (null, zero, full, random,
//!   urandom, tty, console, ptmx);
//! - a member or hard-link target named by an absolute path or through `..`, or under an
//!   earlier member that is a symbolic link; a member listed twice;
//! - a regular file with its set-user-ID or set-group-ID bit (a process of the new pod could
//!   gain the file owner's ids by running it);
//! - a sparse file, a member of a kind `tar --create` does not write for a file system, or more
//!   than [`MAX_CONTENT`] bytes of content,
//!
//! and writes what it accepted into a new archive that CRIU reads instead (the checkpoint itself
//! is never modified: CRIU gets a private directory of links to its images). Checking the
//! archive as this crate parses it and letting GNU tar extract the original would trust that
//! both parse it alike; they do not (where a directory's or a hard link's header claims data,
//! sparse extension blocks, pax against GNU long names, owner names): `tar` only ever reads
//! headers written here, from values checked here, with no owner names.
//!
//! The archive's bytes are verified against the checkpoint's digests before this runs; this
//! is about what a well-formed archive may ask for.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
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

/// The most content (regular files' bytes) one tmpfs archive may hold: far more than the
/// tmpfs a container is given (`/dev` is 64 MiB), and a bound on the work a hostile archive
/// (a few MiB of gzip that expand to terabytes) makes the restore do.
pub const MAX_CONTENT: u64 = 4 << 30;

/// Whether `name` is one of CRIU's tmpfs archives.
fn is_tmpfs_archive(name: &str) -> bool {
    name.starts_with("tmpfs-") && name.ends_with(".tar.gz.img")
}

/// The tmpfs archives of the CRIU image directory `images`, by file name.
fn archives(images: &Path) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    let entries = fs::read_dir(images)
        .with_context(|| format!("read the checkpoint's images in {}", images.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("read {}", images.display()))?;
        if let Some(name) = entry.file_name().to_str().filter(|n| is_tmpfs_archive(n)) {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Checks every tmpfs archive of the CRIU image directory `images` against `spec`, and
/// returns the directory CRIU is to restore from: `scratch` as given (`None`: `images`) when
/// `images` holds no tmpfs archive; else a private directory holding each archive written
/// again as checked, beside the other images: `scratch` itself when there is one (`images` is
/// then `scratch`'s path, a copy of the checkpoint's images), else a new one from
/// `new_scratch` with a symbolic link to each image of `images`.
pub fn rewrite(
    spec: &Spec,
    images: &Path,
    scratch: Option<tempfile::TempDir>,
    new_scratch: impl FnOnce() -> anyhow::Result<tempfile::TempDir>,
) -> anyhow::Result<Option<tempfile::TempDir>> {
    let names = archives(images)?;
    if names.is_empty() {
        return Ok(scratch);
    }
    let allowed = Allowed::of(spec);
    let dir = match scratch {
        Some(dir) => dir,
        None => {
            let dir = new_scratch()?;
            for entry in
                fs::read_dir(images).with_context(|| format!("read {}", images.display()))?
            {
                let entry = entry.with_context(|| format!("read {}", images.display()))?;
                let link = dir.path().join(entry.file_name());
                std::os::unix::fs::symlink(entry.path(), &link)
                    .with_context(|| format!("link {}", link.display()))?;
            }
            dir
        }
    };
    for name in &names {
        let source = images.join(name);
        let checked = dir.path().join(format!(".{name}.checked"));
        let input = File::open(&source)
            .with_context(|| format!("open the checkpoint's tmpfs archive {name}"))?;
        let output = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&checked)
            .with_context(|| format!("create {}", checked.display()))?;
        rewrite_archive(&allowed, BufReader::new(input), BufWriter::new(output))
            .with_context(|| format!("the checkpoint's tmpfs archive {name}: refused"))?;
        let target = dir.path().join(name);
        fs::rename(&checked, &target)
            .with_context(|| format!("rename {} to {}", checked.display(), target.display()))?;
    }
    Ok(Some(dir))
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

/// `path` as the new archive names it: `./` for the tmpfs itself (its mode and owner), the
/// relative path below it.
fn archive_name(path: &Path) -> PathBuf {
    Path::new(".").join(path)
}

/// Reads the gzipped tar `reader`, checks each member, and writes those it accepts to
/// `writer` as a new gzipped tar; fails at the first member refused.
fn rewrite_archive(allowed: &Allowed, reader: impl Read, writer: impl Write) -> anyhow::Result<()> {
    // Every gzip member, as `gzip -d` would read them.
    let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(reader));
    let mut out = tar::Builder::new(flate2::write::GzEncoder::new(
        writer,
        flate2::Compression::fast(),
    ));
    let mut seen = HashSet::new();
    let mut links = HashSet::new();
    let mut content = 0u64;
    for entry in archive.entries().context("read the archive")? {
        let mut entry = entry.context("read the archive")?;
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
        ensure!(
            !path.as_os_str().is_empty() || kind == tar::EntryType::Directory,
            "{}: the tmpfs itself as a {kind:?}",
            raw.display()
        );
        let mode = header.mode().context("a member's mode")? & 0o7777;
        let mut new = tar::Header::new_gnu();
        new.set_mode(mode);
        new.set_uid(header.uid().context("a member's owner")?);
        new.set_gid(header.gid().context("a member's group")?);
        new.set_mtime(header.mtime().unwrap_or(0));
        new.set_size(0);
        let name = archive_name(&path);
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                ensure!(
                    mode & 0o6000 == 0,
                    "{}: a file with its set-user-ID or set-group-ID bit (mode {mode:o})",
                    raw.display()
                );
                let size = entry.size();
                content = content.saturating_add(size);
                ensure!(
                    content <= MAX_CONTENT,
                    "more than {MAX_CONTENT} bytes of content"
                );
                new.set_entry_type(tar::EntryType::Regular);
                new.set_size(size);
                out.append_data(&mut new, &name, &mut entry)
                    .with_context(|| format!("{}: copy", raw.display()))?;
            }
            tar::EntryType::Directory | tar::EntryType::Fifo => {
                new.set_entry_type(kind);
                out.append_data(&mut new, &name, std::io::empty())
                    .with_context(|| format!("{}: copy", raw.display()))?;
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .context("a symbolic link's target")?
                    .with_context(|| {
                        format!("{}: a symbolic link without a target", raw.display())
                    })?
                    .into_owned();
                new.set_entry_type(kind);
                out.append_link(&mut new, &name, &target)
                    .with_context(|| format!("{}: copy", raw.display()))?;
                links.insert(path);
            }
            tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .context("a hard link's target")?
                    .with_context(|| format!("{}: a hard link without a target", raw.display()))?
                    .into_owned();
                let clean = member_path(&target)
                    .with_context(|| format!("{}: a hard link to", raw.display()))?;
                ensure!(
                    !under_a_link(&clean, &links) && !links.contains(&clean),
                    "{}: a hard link to {}, through a symbolic link of the archive",
                    raw.display(),
                    target.display()
                );
                new.set_entry_type(kind);
                out.append_link(&mut new, &name, archive_name(&clean))
                    .with_context(|| format!("{}: copy", raw.display()))?;
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
                new.set_entry_type(kind);
                new.set_device_major(number.0)?;
                new.set_device_minor(number.1)?;
                out.append_data(&mut new, &name, std::io::empty())
                    .with_context(|| format!("{}: copy", raw.display()))?;
            }
            tar::EntryType::GNUSparse => bail!("{}: a sparse file", raw.display()),
            other => bail!("{}: a member of kind {other:?}", raw.display()),
        }
    }
    let mut writer = out
        .into_inner()
        .context("end the checked archive")?
        .finish()
        .context("end the checked archive")?;
    writer.flush().context("write the checked archive")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxBuilder, LinuxDeviceBuilder};
    use tar::EntryType::{Block, Char, Directory, Link, Regular, Symlink};

    type Member<'a> = (&'a str, tar::EntryType, &'a str, (u32, u32));

    /// One raw 512-byte header: `name` written as is (a hostile archive's name is not what
    /// `append_data` would accept), `size` whatever it claims.
    fn header(
        name: &str,
        kind: tar::EntryType,
        link: &str,
        device: (u32, u32),
        size: u64,
    ) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_size(size);
        if !link.is_empty() {
            header.set_link_name(link).unwrap();
        }
        if matches!(kind, Char | Block) {
            header.set_device_major(device.0).unwrap();
            header.set_device_minor(device.1).unwrap();
        }
        let bytes = name.as_bytes();
        header.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        header.set_cksum();
        header
    }

    /// The tar of `members`, uncompressed, without its end.
    fn tar_of(members: &[Member]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (name, kind, link, device) in members {
            bytes.extend_from_slice(header(name, *kind, link, *device, 0).as_bytes());
        }
        bytes
    }

    fn end(mut tar: Vec<u8>) -> Vec<u8> {
        tar.extend_from_slice(&[0; 1024]);
        tar
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(bytes).unwrap();
        gz.finish().unwrap()
    }

    /// A gzipped archive of `members`.
    fn archive(members: &[Member]) -> Vec<u8> {
        gzip(&end(tar_of(members)))
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

    /// The rewritten archive of the gzipped `archive`, or the error's text.
    fn rewritten(spec: &Spec, archive: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        rewrite_archive(&Allowed::of(spec), archive, &mut out).map_err(|e| format!("{e:#}"))?;
        Ok(out)
    }

    fn checked(spec: &Spec, members: &[Member]) -> String {
        match rewritten(spec, &archive(members)) {
            Ok(_) => "ok".into(),
            Err(e) => e,
        }
    }

    /// What GNU tar, the program CRIU runs, lists of a gzipped archive.
    fn gnu_tar_lists(archive: &[u8]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.tar.gz");
        fs::write(&file, archive).unwrap();
        let out = std::process::Command::new("tar")
            .args(["--list", "--gzip", "--file"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    /// What a container's `/dev` holds as CRIU archives it.
    const DEV: &[Member] = &[
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
        ("./null2", Link, "./null", (0, 0)),
    ];

    #[test]
    fn a_containers_dev_is_written_again_as_it_was() {
        let out = rewritten(&Spec::default(), &archive(DEV)).unwrap();
        // The names as the tar crate writes them: `./` for the tmpfs, relative paths below it.
        let names: Vec<&str> = DEV
            .iter()
            .map(|m| if m.0 == "./" { m.0 } else { &m.0[2..] })
            .collect();
        assert_eq!(gnu_tar_lists(&out), names);
        let mut read = tar::Archive::new(flate2::read::GzDecoder::new(&out[..]));
        for (entry, (name, kind, link, device)) in read.entries().unwrap().zip(DEV) {
            let entry = entry.unwrap();
            let header = entry.header();
            assert_eq!(header.entry_type(), *kind, "{name}");
            assert_eq!(header.mode().unwrap(), 0o644, "{name}");
            if !link.is_empty() {
                assert_eq!(
                    entry.link_name().unwrap().unwrap(),
                    Path::new(link),
                    "{name}"
                );
            }
            if matches!(kind, Char | Block) {
                assert_eq!(header.device_major().unwrap(), Some(device.0), "{name}");
                assert_eq!(header.device_minor().unwrap(), Some(device.1), "{name}");
            }
        }
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
        let tar = end(tar_of(&[
            ("./null", Char, "", (1, 3)),
            ("./sda", Block, "", (8, 0)),
        ]));
        let mut two = gzip(&tar[..512]);
        two.extend(gzip(&tar[512..]));
        let message = rewritten(&Spec::default(), &two).unwrap_err();
        assert!(message.contains("./sda: block device 8:0"), "{message}");
    }

    #[test]
    fn a_header_hidden_where_gnu_tar_reads_no_data_never_reaches_it() {
        // GNU tar reads no data after a directory's header, and none after a hard link's, whatever
        // their size fields claim: it would take the next block as a header (a disk, here),
        // which this crate skips as data. Written again, the archive holds no such block.
        let hidden = header("./sda", Block, "", (8, 0), 0);
        for hider in [
            header("./", Directory, "", (0, 0), 512),
            header("./l", Link, "./null", (0, 0), 512),
        ] {
            let mut tar = tar_of(&[("./null", Char, "", (1, 3))]);
            tar.extend_from_slice(hider.as_bytes());
            tar.extend_from_slice(hidden.as_bytes());
            let tar = end(tar);
            assert!(
                gnu_tar_lists(&gzip(&tar)).contains(&"./sda".to_string()),
                "GNU tar reads the hidden header"
            );
            let out = rewritten(&Spec::default(), &gzip(&tar)).unwrap();
            let listed = gnu_tar_lists(&out);
            assert!(!listed.iter().any(|n| n.contains("sda")), "{listed:?}");
        }
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
        let message = checked(&Spec::default(), &[("./", Symlink, "/etc", (0, 0))]);
        assert!(message.contains("the tmpfs itself"), "{message}");
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
    fn set_id_files_and_owner_names_do_not_pass() {
        let mut setuid = header("./su", Regular, "", (0, 0), 0);
        setuid.set_mode(0o4755);
        setuid.set_cksum();
        let tar = end(setuid.as_bytes().to_vec());
        let message = rewritten(&Spec::default(), &gzip(&tar)).unwrap_err();
        assert!(message.contains("set-user-ID"), "{message}");
        // GNU tar's extract (no --numeric-owner) would give a file named owner "root" uid 0:
        // the name is not written again.
        let mut named = header("./f", Regular, "", (0, 0), 0);
        named.set_uid(1000);
        named.as_gnu_mut().unwrap().set_username("root").unwrap();
        named.set_cksum();
        let out = rewritten(&Spec::default(), &gzip(&end(named.as_bytes().to_vec()))).unwrap();
        let mut read = tar::Archive::new(flate2::read::GzDecoder::new(&out[..]));
        let entry = read.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(entry.header().uid().unwrap(), 1000);
        assert_eq!(entry.header().username().unwrap(), Some(""));
    }

    #[test]
    fn rewrite_links_the_other_images_and_names_a_refused_archive() {
        let images = tempfile::tempdir().unwrap();
        fs::write(images.path().join("pages-1.img"), b"pages").unwrap();
        fs::write(images.path().join("tmpfs-dev-70.tar.gz.img"), archive(DEV)).unwrap();
        let scratch = rewrite(&Spec::default(), images.path(), None, || {
            Ok(tempfile::tempdir()?)
        })
        .unwrap()
        .expect("a directory for CRIU");
        let pages = scratch.path().join("pages-1.img");
        assert_eq!(
            fs::read_link(&pages).unwrap(),
            images.path().join("pages-1.img")
        );
        let dev = scratch.path().join("tmpfs-dev-70.tar.gz.img");
        assert!(!fs::symlink_metadata(&dev).unwrap().file_type().is_symlink());
        assert_eq!(gnu_tar_lists(&fs::read(&dev).unwrap()).len(), DEV.len());
        assert_eq!(
            fs::read_dir(scratch.path()).unwrap().count(),
            2,
            "a temporary file is left"
        );
        // Without a tmpfs archive there is nothing to write: CRIU reads the images as they are.
        fs::remove_file(images.path().join("tmpfs-dev-70.tar.gz.img")).unwrap();
        let none = rewrite(&Spec::default(), images.path(), None, || unreachable!()).unwrap();
        assert!(none.is_none());

        fs::write(
            images.path().join("tmpfs-dev-72.tar.gz.img"),
            archive(&[("./sda", Block, "", (8, 0))]),
        )
        .unwrap();
        let message = format!(
            "{:#}",
            rewrite(&Spec::default(), images.path(), None, || Ok(
                tempfile::tempdir()?
            ))
            .unwrap_err()
        );
        assert!(
            message.starts_with("the checkpoint's tmpfs archive tmpfs-dev-72.tar.gz.img: refused"),
            "{message}"
        );
        fs::write(
            images.path().join("tmpfs-dev-72.tar.gz.img"),
            b"\x1f\x8b garbage",
        )
        .unwrap();
        assert!(
            rewrite(&Spec::default(), images.path(), None, || Ok(
                tempfile::tempdir()?
            ))
            .is_err()
        );
    }
}

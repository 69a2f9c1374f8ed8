//! CRIU's tmpfs archives, checked before CRIU unpacks them as root.
//!
//! A checkpoint keeps the contents of each tmpfs mounted inside a container (its `/dev`, and
//! any tmpfs the spec mounts) as a gzipped tar, `tmpfs-dev-<dev>.tar.gz.img` (or the older
//! `tmpfs-<mnt id>.tar.gz.img`). CRIU's restore hands it to GNU `tar --extract`, run as root on
//! the host while the container's mounts are built, which recreates whatever the archive
//! lists: device nodes of any number, hard links, files of any owner. A device node is access
//! to hardware (a disk by its block number), so [`check`] refuses, before CRIU runs, an archive
//! that holds
//! - a character or block device the new spec does not give the container: its
//!   `linux.devices`, and the devices every OCI container has (null, zero, full, random,
//!   urandom, tty, console, ptmx);
//! - a regular file with its set-user-ID or set-group-ID bit (a process of the new pod could
//!   gain the file owner's ids by running it), or an owner or group by name (the extract maps
//!   names to the host's ids: CRIU archives with `--numeric-owner`);
//! - a member or hard-link target named by an absolute path or through `..`, or under an
//!   earlier member that is a symbolic link; a member listed twice;
//! - more than [`MAX_BYTES`] of tar, or anything but what GNU tar writes for a file system in
//!   its default (GNU) format: no pax or sparse members, no data after a header that is not a
//!   regular file's or a long name's, numbers only as octal digits;
//! - more than one gzip member, bytes after it, or a back-reference before its start (the
//!   inflater is zlib-rs, which refuses those; `gzip -d` reads them from the window a member
//!   before left).
//!
//! The walk is over the tar's 512-byte blocks as GNU tar reads them (this crate's own reading
//! with the `tar` crate was not: where a directory's or a hard link's header claims data, GNU
//! tar reads none and takes the next block as a header, and the two parse numbers and names
//! differently), and anything it cannot read as GNU tar would is refused: what it checked is
//! what `tar` will create.
//!
//! The archive's bytes are verified against the checkpoint's digests before this runs; this
//! is about what a well-formed archive may ask for.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
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

/// The most tar (headers and content, decompressed) one tmpfs archive may hold: far more than
/// the tmpfs a container is given (`/dev` is 64 MiB), and a bound on the work a hostile archive
/// (a few MiB of gzip that expand to terabytes) makes the restore do.
pub const MAX_BYTES: u64 = 4 << 30;

/// The most a GNU long name or long link target may hold (`PATH_MAX`).
const MAX_LONG_NAME: u64 = 4096;

const BLOCK: usize = 512;

/// A numeric field as GNU tar writes it: spaces, octal digits, then NULs or spaces.
fn octal(field: &[u8]) -> Option<u64> {
    let start = field.iter().position(|b| *b != b' ')?;
    let digits = field[start..]
        .iter()
        .take_while(|b| (b'0'..=b'7').contains(b))
        .count();
    let rest = &field[start + digits..];
    if digits == 0 || !rest.iter().all(|b| *b == 0 || *b == b' ') {
        return None;
    }
    field[start..start + digits].iter().try_fold(0u64, |n, d| {
        n.checked_mul(8)?.checked_add(u64::from(d - b'0'))
    })
}

/// A numeric field this check does not read (owner, time): octal, or GNU's base-256 (a first
/// byte of 0x80 or 0xff). GNU tar reports anything else as an error (and the restore fails);
/// refused here first.
fn numeric(field: &[u8]) -> bool {
    octal(field).is_some() || matches!(field.first(), Some(0x80 | 0xff))
}

/// A C string: `bytes` up to its first NUL.
fn c_string(bytes: &[u8]) -> &[u8] {
    bytes.split(|b| *b == 0).next().unwrap_or_default()
}

/// Reads exactly one block, or `false` at the end of the stream.
fn next_block(reader: &mut impl BufRead, block: &mut [u8; BLOCK]) -> anyhow::Result<bool> {
    if reader.fill_buf().context("read the archive")?.is_empty() {
        return Ok(false);
    }
    match reader.read_exact(block) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            bail!("the archive ends inside a block")
        }
        Err(e) => Err(e).context("read the archive"),
    }
}

/// Reads the `size` bytes of data after a header (whole blocks), keeping at most `keep`.
fn data(reader: &mut impl BufRead, size: u64, keep: u64) -> anyhow::Result<Vec<u8>> {
    let mut kept = Vec::new();
    let mut left = size;
    let mut block = [0u8; BLOCK];
    while left > 0 {
        ensure!(
            next_block(reader, &mut block)?,
            "the archive ends inside a member's data"
        );
        let n = left.min(BLOCK as u64);
        if (kept.len() as u64) < keep {
            kept.extend_from_slice(&block[..n as usize]);
        }
        left -= n;
    }
    Ok(kept)
}

/// Checks the gzipped tar `reader`: one gzip member (what `tar --gzip` writes), read to its end
/// (its CRC and length checked), nothing after it. `gzip -d`, which `tar --gzip` runs, reads on
/// into further members, and decodes a back-reference before a member's start from what the
/// member before left in its window, where another inflater reads zeros: with one member and an
/// inflater that refuses such references (zlib-rs), both read the same bytes.
fn check_archive(allowed: &Allowed, reader: impl Read) -> anyhow::Result<()> {
    let mut input = BufReader::new(reader);
    {
        let gz = flate2::bufread::GzDecoder::new(&mut input);
        // One byte past the bound, so that reaching it is told from ending at it.
        let mut tar = gz.take(MAX_BYTES + 1);
        walk(allowed, &mut tar)?;
        // What follows the end-of-archive block, to the member's end: GNU tar reads it too.
        std::io::copy(&mut tar, &mut std::io::sink()).context("read the archive")?;
        ensure!(tar.limit() > 0, "more than {MAX_BYTES} bytes of tar");
    }
    ensure!(
        input.fill_buf().context("read the archive")?.is_empty(),
        "data after the archive's gzip member"
    );
    Ok(())
}

/// Walks the tar's blocks from `reader` up to its end-of-archive block, as GNU tar reads them.
fn walk(allowed: &Allowed, reader: &mut impl Read) -> anyhow::Result<()> {
    let mut reader = BufReader::new(reader);
    let mut seen = HashSet::new();
    let mut links = HashSet::new();
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut read = 0u64;
    let mut block = [0u8; BLOCK];
    loop {
        ensure!(
            next_block(&mut reader, &mut block)?,
            "the archive ends without its end-of-archive block"
        );
        read += BLOCK as u64;
        if block.iter().all(|b| *b == 0) {
            // GNU tar stops at the first zero block: nothing after it is extracted.
            return Ok(());
        }
        ensure!(
            &block[257..265] == b"ustar  \0",
            "a header not in GNU tar's format (magic {:?})",
            String::from_utf8_lossy(&block[257..265])
        );
        let checksum = octal(&block[148..156]).context("a header's checksum is not octal")?;
        let sum: u64 = block
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if (148..156).contains(&i) {
                    u64::from(b' ')
                } else {
                    u64::from(*b)
                }
            })
            .sum();
        ensure!(checksum == sum, "a header's checksum does not match");
        let kind = block[156];
        let size = octal(&block[124..136]).context("a header's size is not octal")?;
        let mode = octal(&block[100..108]).context("a header's mode is not octal")?;
        ensure!(
            numeric(&block[108..116]) && numeric(&block[116..124]) && numeric(&block[136..148]),
            "a header's owner, group or time is not a number GNU tar reads"
        );
        read = read.saturating_add(size.div_ceil(BLOCK as u64) * BLOCK as u64);
        ensure!(read <= MAX_BYTES, "more than {MAX_BYTES} bytes of tar");
        if kind == b'L' || kind == b'K' {
            ensure!(size <= MAX_LONG_NAME, "a long name of {size} bytes");
            let name = c_string(&data(&mut reader, size, size)?).to_vec();
            let slot = if kind == b'L' {
                &mut long_name
            } else {
                &mut long_link
            };
            ensure!(slot.is_none(), "two long names for one member");
            *slot = Some(name);
            continue;
        }
        let name_bytes = long_name
            .take()
            .unwrap_or_else(|| c_string(&block[..100]).to_vec());
        let link_bytes = long_link
            .take()
            .unwrap_or_else(|| c_string(&block[157..257]).to_vec());
        let raw = PathBuf::from(std::ffi::OsString::from_vec(name_bytes));
        let who = raw.display().to_string();
        ensure!(
            c_string(&block[265..297]).is_empty() && c_string(&block[297..329]).is_empty(),
            "{who}: an owner or group by name"
        );
        if kind == b'0' {
            ensure!(
                !raw.as_os_str().as_bytes().ends_with(b"/"),
                "{who}: a regular file named as a directory"
            );
            ensure!(
                mode & 0o6000 == 0,
                "{who}: a file with its set-user-ID or set-group-ID bit (mode {mode:o})"
            );
            data(&mut reader, size, 0)?;
        } else {
            ensure!(
                size == 0,
                "{who}: data after a header of kind {:?}",
                kind as char
            );
        }
        let path = member_path(&raw)?;
        ensure!(
            !under_a_link(&path, &links),
            "{who}: under a symbolic link of the archive"
        );
        ensure!(
            path.as_os_str().is_empty() || seen.insert(path.clone()),
            "{who}: listed twice"
        );
        ensure!(
            !path.as_os_str().is_empty() || kind == b'5',
            "{who}: the tmpfs itself as a member of kind {:?}",
            kind as char
        );
        let target = PathBuf::from(std::ffi::OsString::from_vec(link_bytes));
        match kind {
            b'0' | b'5' | b'6' => {}
            b'2' => {
                ensure!(
                    !target.as_os_str().is_empty(),
                    "{who}: a symbolic link without a target"
                );
                links.insert(path);
            }
            b'1' => {
                let clean =
                    member_path(&target).with_context(|| format!("{who}: a hard link to"))?;
                ensure!(
                    !under_a_link(&clean, &links) && !links.contains(&clean),
                    "{who}: a hard link to {}, through a symbolic link of the archive",
                    target.display()
                );
            }
            b'3' | b'4' => {
                let number = octal(&block[329..337])
                    .zip(octal(&block[337..345]))
                    .and_then(|(major, minor)| {
                        Some((u32::try_from(major).ok()?, u32::try_from(minor).ok()?))
                    })
                    .with_context(|| format!("{who}: a device without a number"))?;
                let (set, what) = if kind == b'3' {
                    (&allowed.char, "character")
                } else {
                    (&allowed.block, "block")
                };
                ensure!(
                    set.contains(&number),
                    "{who}: {what} device {}:{}, which the container's spec does not give it",
                    number.0,
                    number.1
                );
            }
            other => bail!("{who}: a member of kind {:?}", other as char),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{LinuxBuilder, LinuxDeviceBuilder};
    use std::io::Write;
    use tar::EntryType::{Block, Char, Directory, Link, Regular, Symlink};

    type Member<'a> = (&'a str, tar::EntryType, &'a str, (u32, u32));

    /// One raw GNU header: `name` written as is (a hostile archive's name is not what
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

    fn checked_gz(spec: &Spec, archive: &[u8]) -> String {
        match check_archive(&Allowed::of(spec), archive) {
            Ok(()) => "ok".into(),
            Err(e) => format!("{e:#}"),
        }
    }

    fn checked(spec: &Spec, members: &[Member]) -> String {
        checked_gz(spec, &archive(members))
    }

    /// The tar of one raw header (and `data`), ended.
    fn one(header: &tar::Header, data: &[u8]) -> Vec<u8> {
        let mut tar = header.as_bytes().to_vec();
        tar.extend_from_slice(data);
        gzip(&end(tar))
    }

    /// What GNU tar, the program CRIU runs, lists of a gzipped archive.
    fn gnu_tar_lists(archive: &[u8]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.tar.gz");
        fs_write(&file, archive);
        let out = std::process::Command::new("tar")
            .args(["--list", "--gzip", "--file"])
            .arg(&file)
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn fs_write(path: &Path, bytes: &[u8]) {
        std::fs::write(path, bytes).unwrap();
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
    fn a_containers_dev_passes() {
        assert_eq!(checked(&Spec::default(), DEV), "ok");
    }

    #[test]
    fn what_gnu_tar_writes_as_criu_runs_it_passes() {
        // CRIU's own command line; no device (mknod needs root), everything else a tmpfs
        // holds: files with content, a long name, a long link target, links, a FIFO.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tmpfs");
        let long = "n".repeat(150);
        std::fs::create_dir_all(root.join("sub").join(&long)).unwrap();
        fs_write(&root.join("file"), &vec![7u8; 3000]);
        fs_write(&root.join("sub").join(&long).join("inner"), b"x");
        std::os::unix::fs::symlink("/proc/self/fd", root.join("fd")).unwrap();
        std::os::unix::fs::symlink("t".repeat(180), root.join("far")).unwrap();
        std::fs::hard_link(root.join("file"), root.join("again")).unwrap();
        nix::unistd::mkfifo(
            &root.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let out = std::process::Command::new("tar")
            .args([
                "--create",
                "--gzip",
                "--no-unquote",
                "--no-wildcards",
                "--one-file-system",
                "--check-links",
                "--preserve-permissions",
                "--sparse",
                "--numeric-owner",
                "--directory",
            ])
            .arg(&root)
            .arg(".")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(checked_gz(&Spec::default(), &out.stdout), "ok");
        assert_eq!(gnu_tar_lists(&out.stdout).len(), 9);
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
        let message = checked_gz(&Spec::default(), &two);
        assert!(
            message.contains("without its end-of-archive block"),
            "{message}"
        );
        // A whole archive, then another member: CRIU's tar writes one.
        let mut more = archive(DEV);
        more.extend(gzip(&tar));
        let message = checked_gz(&Spec::default(), &more);
        assert!(
            message.contains("data after the archive's gzip member"),
            "{message}"
        );
    }

    #[test]
    fn a_back_reference_before_the_members_start_is_refused() {
        // gzip -d decodes it from its window (what a member before left there), another
        // inflater as zeros: the two would read different tars. zlib-rs refuses it.
        let dictionary = header("./sda", Block, "", (8, 0), 0).as_bytes().to_vec();
        let mut deflate = flate2::Compress::new(flate2::Compression::best(), false);
        deflate.set_dictionary(&dictionary).unwrap();
        let tail = end(dictionary.clone());
        let mut raw = Vec::with_capacity(4096);
        deflate
            .compress_vec(&tail, &mut raw, flate2::FlushCompress::Finish)
            .unwrap();
        let mut crc = flate2::Crc::new();
        crc.update(&tail);
        let mut member = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
        member.extend_from_slice(&raw);
        member.extend_from_slice(&crc.sum().to_le_bytes());
        member.extend_from_slice(&(tail.len() as u32).to_le_bytes());
        let message = checked_gz(&Spec::default(), &member);
        assert!(message.contains("read the archive"), "{message}");
        // The stream itself is sound: with the window it refers to, it inflates to the tar.
        let mut inflate = flate2::Decompress::new(false);
        inflate.set_dictionary(&dictionary).unwrap();
        let mut out = Vec::with_capacity(tail.len() + 16);
        inflate
            .decompress_vec(&raw, &mut out, flate2::FlushDecompress::Finish)
            .unwrap();
        assert_eq!(out, tail);
    }

    #[test]
    fn data_after_the_end_of_archive_is_read_and_after_the_member_refused() {
        // Blocks after the end GNU tar ignores; the member's CRC still covers them.
        let mut tar = end(tar_of(DEV));
        tar.extend_from_slice(header("./sda", Block, "", (8, 0), 0).as_bytes());
        assert_eq!(checked_gz(&Spec::default(), &gzip(&tar)), "ok");
        let mut corrupt = archive(DEV);
        let n = corrupt.len();
        corrupt[n - 8] ^= 1; // the CRC
        assert!(checked_gz(&Spec::default(), &corrupt).contains("read the archive"));
        let mut trailing = archive(DEV);
        trailing.extend_from_slice(b"junk");
        assert!(
            checked_gz(&Spec::default(), &trailing)
                .contains("data after the archive's gzip member")
        );
    }

    #[test]
    fn a_header_hidden_where_gnu_tar_reads_no_data_is_refused() {
        // GNU tar reads no data after a directory's header, and none after a hard link's,
        // whatever their size fields claim: it takes the next block as a header (a disk,
        // here), which a reader skipping `size` bytes never sees.
        let hidden = header("./sda", Block, "", (8, 0), 0);
        for hider in [
            header("./", Directory, "", (0, 0), 512),
            header("./l", Link, "./null", (0, 0), 512),
            header("./s", Symlink, "x", (0, 0), 512),
            header("./d/", Regular, "", (0, 0), 512),
        ] {
            let mut tar = tar_of(&[("./null", Char, "", (1, 3))]);
            tar.extend_from_slice(hider.as_bytes());
            tar.extend_from_slice(hidden.as_bytes());
            let archive = gzip(&end(tar));
            let message = checked_gz(&Spec::default(), &archive);
            assert!(
                message.contains("data after a header") || message.contains("named as a directory"),
                "{message}"
            );
        }
        // GNU tar does read the hidden header (checked on the directory's case).
        let mut tar = header("./", Directory, "", (0, 0), 512).as_bytes().to_vec();
        tar.extend_from_slice(hidden.as_bytes());
        assert!(gnu_tar_lists(&gzip(&end(tar))).contains(&"./sda".to_string()));
    }

    #[test]
    fn what_gnu_tar_parses_otherwise_is_refused() {
        // A size GNU tar reads as base-64 (`+`), another as octal: the two would frame the
        // archive differently.
        let mut plus = header("./f", Regular, "", (0, 0), 0);
        plus.as_old_mut().size.copy_from_slice(b"+0000001000\0");
        plus.set_cksum();
        assert!(checked_gz(&Spec::default(), &one(&plus, &[0; 512])).contains("size is not octal"));
        // pax and sparse members, another format's magic.
        for (kind, what) in [
            (tar::EntryType::XHeader, "kind 'x'"),
            (tar::EntryType::GNUSparse, "kind 'S'"),
        ] {
            let h = header("./p", kind, "", (0, 0), 0);
            let message = checked_gz(&Spec::default(), &one(&h, &[]));
            assert!(message.contains(what), "{message}");
        }
        let ustar = tar::Header::new_ustar();
        assert!(
            checked_gz(&Spec::default(), &one(&ustar, &[])).contains("not in GNU tar's format")
        );
        // A checksum that does not match, an archive cut short.
        let mut bad = header("./f", Regular, "", (0, 0), 0);
        bad.as_old_mut().name[0] = b'X';
        assert!(checked_gz(&Spec::default(), &one(&bad, &[])).contains("checksum"));
        let cut = gzip(&tar_of(DEV));
        assert!(checked_gz(&Spec::default(), &cut).contains("without its end-of-archive block"));
        assert!(checked_gz(&Spec::default(), b"\x1f\x8b garbage").contains("read the archive"));
    }

    #[test]
    fn long_names_are_read_as_gnu_tar_reads_them() {
        // A GNU long name is a C string: GNU tar stops at its first NUL, and so does the check.
        let mut tar = Vec::new();
        let name = b"./sub/../../etc\0padding";
        tar.extend_from_slice(
            header(
                "././@LongLink",
                tar::EntryType::GNULongName,
                "",
                (0, 0),
                name.len() as u64,
            )
            .as_bytes(),
        );
        let mut data = name.to_vec();
        data.resize(512, 0);
        tar.extend_from_slice(&data);
        tar.extend_from_slice(header("./short", Regular, "", (0, 0), 0).as_bytes());
        let message = checked_gz(&Spec::default(), &gzip(&end(tar)));
        assert!(
            message.contains("./sub/../../etc: not a plain relative path"),
            "{message}"
        );
        // A long name of more than PATH_MAX is refused before it is read.
        let huge = header(
            "././@LongLink",
            tar::EntryType::GNULongName,
            "",
            (0, 0),
            1 << 20,
        );
        assert!(checked_gz(&Spec::default(), &one(&huge, &[])).contains("a long name of"));
    }

    #[test]
    fn set_id_files_and_owner_names_are_refused() {
        let mut setuid = header("./su", Regular, "", (0, 0), 0);
        setuid.set_mode(0o4755);
        setuid.set_cksum();
        assert!(checked_gz(&Spec::default(), &one(&setuid, &[])).contains("set-user-ID"));
        let mut named = header("./f", Regular, "", (0, 0), 0);
        named.as_gnu_mut().unwrap().set_username("root").unwrap();
        named.set_cksum();
        assert!(checked_gz(&Spec::default(), &one(&named, &[])).contains("owner or group by name"));
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
    fn only_tmpfs_archives_are_read_and_a_bad_one_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        fs_write(&dir.path().join("pages-1.img"), b"not an archive");
        fs_write(&dir.path().join("tmpfs-dev-70.tar.gz.img"), &archive(DEV));
        check(&Spec::default(), dir.path()).unwrap();
        fs_write(
            &dir.path().join("tmpfs-dev-72.tar.gz.img"),
            &archive(&[("./sda", Block, "", (8, 0))]),
        );
        let message = format!("{:#}", check(&Spec::default(), dir.path()).unwrap_err());
        assert!(
            message.starts_with("the checkpoint's tmpfs archive tmpfs-dev-72.tar.gz.img: refused"),
            "{message}"
        );
    }
}

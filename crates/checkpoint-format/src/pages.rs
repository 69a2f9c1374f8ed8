//! zstd compression of a container checkpoint's memory pages (`podsnap.io/compression=zstd`).
//!
//! Compressing replaces each `pages-*.img` of a CRIU images directory by `pages-*.img.zst`.
//! CRIU reads only plain images, so a restore first expands a compressed directory into a
//! private scratch directory ([`expand_into`]); the checkpoint itself is never modified there.

use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The zstd level: fast, since checkpoint time matters more than a few percent of size.
const LEVEL: i32 = 3;

fn is_pages(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

fn private_file(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Compresses every `pages-*.img` of `images` in place; returns how many were compressed.
pub fn compress_pages(images: &Path) -> io::Result<usize> {
    let mut count = 0;
    for entry in fs::read_dir(images)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if !is_pages(&name) || !entry.file_type()?.is_file() {
            continue;
        }
        let target = images.join(format!("{name}.zst"));
        let mut input = fs::File::open(entry.path())?;
        let output = private_file(&target)?;
        let mut encoder = zstd::stream::Encoder::new(output, LEVEL)?;
        io::copy(&mut input, &mut encoder)?;
        encoder.finish()?.sync_all()?;
        fs::remove_file(entry.path())?;
        count += 1;
    }
    Ok(count)
}

/// Whether `images` holds compressed pages.
pub fn is_compressed(images: &Path) -> bool {
    fs::read_dir(images)
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".img.zst"))
        })
        .unwrap_or(false)
}

/// Copies `images` into the (empty, private) directory `scratch`, expanding compressed pages.
/// Only regular files are copied; anything else is an error.
pub fn expand_into(images: &Path, scratch: &Path) -> io::Result<()> {
    for entry in fs::read_dir(images)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a regular file", entry.path().display()),
            ));
        }
        let name = entry.file_name().to_string_lossy().to_string();
        let mut input = fs::File::open(entry.path())?;
        match name.strip_suffix(".zst") {
            Some(plain) if is_pages(plain) => {
                let mut output = private_file(&scratch.join(plain))?;
                zstd::stream::copy_decode(&mut input, &mut output)?;
            }
            _ => {
                let mut output = private_file(&scratch.join(&name))?;
                io::copy(&mut input, &mut output)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_pages_expand_to_the_original_bytes() {
        let images = tempfile::tempdir().unwrap();
        let pages: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(images.path().join("pages-1.img"), &pages).unwrap();
        fs::write(images.path().join("core-1.img"), b"core").unwrap();
        assert!(!is_compressed(images.path()));
        assert_eq!(compress_pages(images.path()).unwrap(), 1);
        assert!(is_compressed(images.path()));
        assert!(!images.path().join("pages-1.img").exists());
        let zst = fs::metadata(images.path().join("pages-1.img.zst"))
            .unwrap()
            .len();
        assert!(zst < pages.len() as u64 / 10, "compressed to {zst} bytes");

        let scratch = tempfile::tempdir().unwrap();
        expand_into(images.path(), scratch.path()).unwrap();
        assert_eq!(fs::read(scratch.path().join("pages-1.img")).unwrap(), pages);
        assert_eq!(
            fs::read(scratch.path().join("core-1.img")).unwrap(),
            b"core"
        );
    }
}

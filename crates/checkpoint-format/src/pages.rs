//! zstd compression of a container checkpoint's memory pages (`podsnap.io/compression=zstd`).
//!
//! Compressing replaces each `pages-*.img` of a CRIU images directory by `pages-*.img.zst`.
//! CRIU reads only plain images, so a restore first expands a compressed directory into a
//! private scratch directory ([`expand_into`]); the checkpoint itself is never modified there.
//!
//! Expansion is bounded: a `pages-<id>.img` holds at most the pages its pagemaps
//! (`pagemap-*.img` whose head names pages id `<id>`) list, so a compressed file that expands
//! beyond that (a zstd bomb) is refused before it fills the disk.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::Path;

/// The zstd level: fast, since checkpoint time matters more than a few percent of size.
const LEVEL: i32 = 3;

fn is_pages(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
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
        let output = crate::private_file(&target)?;
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

/// CRIU's `pagemap_head` (pagemap.proto).
#[derive(Clone, PartialEq, prost::Message)]
struct PagemapHead {
    #[prost(uint32, required, tag = "1")]
    pages_id: u32,
}

/// CRIU's `pagemap_entry`: only the page count matters here.
#[derive(Clone, PartialEq, prost::Message)]
struct PagemapEntry {
    #[prost(uint32, required, tag = "2")]
    nr_pages: u32,
}

/// Largest page size CRIU dumps (64 KiB pages exist on arm64 and ppc64).
const MAX_PAGE_SIZE: u64 = 64 << 10;
/// Largest pagemap image read.
const MAX_PAGEMAP: u64 = 64 << 20;

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// The most bytes each `pages-<id>.img` of `images` can hold, by id, from the pagemaps.
pub fn page_bounds(images: &Path) -> io::Result<BTreeMap<u32, u64>> {
    let mut bounds = BTreeMap::new();
    for entry in fs::read_dir(images)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if !(name.starts_with("pagemap") && name.ends_with(".img")) {
            continue;
        }
        let mut data = Vec::new();
        fs::File::open(entry.path())?
            .take(MAX_PAGEMAP)
            .read_to_end(&mut data)?;
        let path = entry.path();
        let records = crate::criu_image::entries(&path, &data, crate::criu_image::PAGEMAP_MAGIC)
            .map_err(|e| invalid(e.to_string()))?;
        let Some((head, rest)) = records.split_first() else {
            continue;
        };
        let head = <PagemapHead as prost::Message>::decode(*head)
            .map_err(|e| invalid(format!("{}: pagemap head: {e}", path.display())))?;
        let mut pages: u64 = 0;
        for record in rest {
            let record = <PagemapEntry as prost::Message>::decode(*record)
                .map_err(|e| invalid(format!("{}: pagemap entry: {e}", path.display())))?;
            pages = pages.saturating_add(u64::from(record.nr_pages));
        }
        let bound = bounds.entry(head.pages_id).or_insert(0u64);
        *bound = bound.saturating_add(pages.saturating_mul(MAX_PAGE_SIZE));
    }
    Ok(bounds)
}

/// The pages id of a `pages-<id>.img` name.
fn pages_id(plain: &str) -> Option<u32> {
    plain
        .strip_prefix("pages-")?
        .strip_suffix(".img")?
        .parse()
        .ok()
}

/// Copies `images` into the (empty, private) directory `scratch`, expanding compressed pages,
/// each no further than its pagemaps allow ([`page_bounds`]). Only regular files are copied;
/// anything else is an error.
pub fn expand_into(images: &Path, scratch: &Path) -> io::Result<()> {
    let bounds = page_bounds(images)?;
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
                let bound = pages_id(plain)
                    .and_then(|id| bounds.get(&id))
                    .copied()
                    .unwrap_or(0);
                let mut output = crate::private_file(&scratch.join(plain))?;
                let decoder = zstd::stream::read::Decoder::new(input)?;
                let copied = io::copy(&mut decoder.take(bound.saturating_add(1)), &mut output)?;
                if copied > bound {
                    return Err(invalid(format!(
                        "{} expands beyond the {bound} bytes its pagemaps list: refused",
                        entry.path().display()
                    )));
                }
            }
            _ => {
                let mut output = crate::private_file(&scratch.join(&name))?;
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
        write_pagemap(images.path(), 1, 1_000_000 / 4096 + 1);
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

    /// A `pagemap-1.img` for pages id `id` listing `pages` pages.
    fn write_pagemap(dir: &Path, id: u32, pages: u32) {
        use prost::Message;
        let mut data = Vec::new();
        data.extend_from_slice(&crate::criu_image::IMG_COMMON_MAGIC.to_le_bytes());
        data.extend_from_slice(&crate::criu_image::PAGEMAP_MAGIC.to_le_bytes());
        for record in [
            PagemapHead { pages_id: id }.encode_to_vec(),
            PagemapEntry { nr_pages: pages }.encode_to_vec(),
        ] {
            data.extend_from_slice(&(record.len() as u32).to_le_bytes());
            data.extend_from_slice(&record);
        }
        fs::write(dir.join(format!("pagemap-{id}.img")), data).unwrap();
    }

    #[test]
    fn pages_that_expand_beyond_their_pagemaps_are_refused() {
        let images = tempfile::tempdir().unwrap();
        // 64 MiB of zeros compresses to a few KiB; its pagemap lists one page.
        let zeros = vec![0u8; 64 << 20];
        fs::write(images.path().join("pages-1.img"), &zeros).unwrap();
        write_pagemap(images.path(), 1, 1);
        compress_pages(images.path()).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let err = expand_into(images.path(), scratch.path()).unwrap_err();
        assert!(err.to_string().contains("expands beyond"), "{err}");
        // Without any pagemap, a pages file may hold nothing at all.
        fs::remove_file(images.path().join("pagemap-1.img")).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        assert!(expand_into(images.path(), scratch.path()).is_err());
    }
}

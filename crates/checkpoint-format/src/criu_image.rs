//! CRIU's image files, as far as podsnap reads them: `IMG_COMMON_MAGIC`, the image's own
//! magic, then entries, each a little-endian `u32` length and a protobuf message. Every length
//! is checked against the data; nothing is trusted.

use std::path::{Path, PathBuf};

/// The first word of every CRIU image (since CRIU 1.x images carry two magics).
pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// The second word of a `core-<tid>.img`.
pub const CORE_MAGIC: u32 = 0x5505_3847;
/// The second word of a `pagemap-*.img`.
pub const PAGEMAP_MAGIC: u32 = 0x5608_4025;

/// Why an image could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("CRIU image {0} does not have the expected magic")]
    Magic(PathBuf),
    #[error("CRIU image {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
}

/// The entries of an image of kind `magic`, given as bytes read from `path`.
pub fn entries<'a>(path: &Path, data: &'a [u8], magic: u32) -> Result<Vec<&'a [u8]>, ImageError> {
    let word = |at: usize| -> Option<u32> {
        data.get(at..at.checked_add(4)?)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut at = match word(0) {
        Some(IMG_COMMON_MAGIC) if word(4) == Some(magic) => 8,
        Some(first) if first == magic => 4,
        _ => return Err(ImageError::Magic(path.to_path_buf())),
    };
    let mut out = Vec::new();
    while at < data.len() {
        let len = word(at).ok_or_else(|| ImageError::Malformed {
            path: path.to_path_buf(),
            reason: format!("truncated entry length at byte {at}"),
        })? as usize;
        let body = at
            .checked_add(4)
            .and_then(|start| Some((start, start.checked_add(len)?)))
            .and_then(|(start, end)| data.get(start..end))
            .ok_or_else(|| ImageError::Malformed {
                path: path.to_path_buf(),
                reason: format!("entry at byte {at} is longer than the file"),
            })?;
        out.push(body);
        at += 4 + len;
    }
    Ok(out)
}

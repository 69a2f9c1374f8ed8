//! The digests a checkpoint lists for its files (the manifest's `files`, a container's
//! `podsnap.sha256`), and the hashing that produces and checks them.
//!
//! A digest names its algorithm: `blake3:<64 hex digits>`, which podsnap writes since manifest
//! version 2, or 64 bare hex digits, the sha256 that version 1 wrote and that every reader still
//! accepts. Each file is checked with the algorithm its own digest names. BLAKE3 because the
//! page images are most of a checkpoint and their hash sits on the critical path of both a
//! checkpoint (the seal after the thaw) and a restore (the shim holds CRIU until they are
//! verified): on this machine's CPU (SHA-NI, AVX-512) one core hashes a gigabyte with BLAKE3 in
//! about 0.3 s, with sha256 in 0.85 s. Both are 256-bit cryptographic hashes; a checkpoint's
//! authenticity still rests on the sha256 of its manifest, which the node pins and an OCI
//! registry addresses.

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::path::Path;

use sha2::{Digest, Sha256};

/// A hash algorithm a checkpoint's file digests may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Bare hex (manifest version 1).
    Sha256,
    /// `blake3:<hex>`.
    Blake3,
}

/// The algorithm this build writes.
pub const WRITTEN: Algorithm = Algorithm::Blake3;

const BLAKE3_PREFIX: &str = "blake3:";

fn is_hex64(text: &str) -> bool {
    text.len() == 64
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Algorithm {
    /// The algorithm `digest` names, if it is a well-formed digest of one.
    pub fn of(digest: &str) -> Option<Algorithm> {
        match digest.strip_prefix(BLAKE3_PREFIX) {
            Some(hex) if is_hex64(hex) => Some(Algorithm::Blake3),
            Some(_) => None,
            None if is_hex64(digest) => Some(Algorithm::Sha256),
            None => None,
        }
    }

    /// A hasher of this algorithm.
    pub fn hasher(self) -> Hasher {
        match self {
            Algorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            Algorithm::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Blake3 => "blake3",
        })
    }
}

/// An incremental hash of one algorithm; [`Hasher::finish`] gives its digest as a checkpoint
/// lists it.
pub enum Hasher {
    Sha256(Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Blake3(h) => {
                h.update(bytes);
            }
        }
    }

    /// The digest, as the manifest lists it (`blake3:<hex>`, or bare hex for sha256).
    pub fn finish(self) -> String {
        match self {
            Hasher::Sha256(h) => crate::hex(&h.finalize()),
            Hasher::Blake3(h) => format!("{BLAKE3_PREFIX}{}", h.finalize().to_hex()),
        }
    }
}

/// The digest of everything `reader` yields, read in 1 MiB blocks.
pub fn of_reader(algorithm: Algorithm, reader: &mut impl Read) -> io::Result<String> {
    let mut hasher = algorithm.hasher();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finish())
}

/// The digest of the file at `path`.
pub fn of_file(algorithm: Algorithm, path: &Path) -> io::Result<String> {
    of_reader(algorithm, &mut fs::File::open(path)?)
}

/// A reader that hashes and counts what passes through it.
pub struct Reading<R> {
    inner: R,
    hasher: Hasher,
    read: u64,
}

impl<R> Reading<R> {
    pub fn new(inner: R, algorithm: Algorithm) -> Self {
        Reading {
            inner,
            hasher: algorithm.hasher(),
            read: 0,
        }
    }

    /// The digest of what was read, and how many bytes that was.
    pub fn finish(self) -> (String, u64) {
        (self.hasher.finish(), self.read)
    }
}

impl<R: Read> Read for Reading<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_name_their_algorithm_and_match_the_reference_values() {
        let sha = of_reader(Algorithm::Sha256, &mut &b"abc"[..]).unwrap();
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Algorithm::of(&sha), Some(Algorithm::Sha256));
        let b3 = of_reader(Algorithm::Blake3, &mut &b"abc"[..]).unwrap();
        assert_eq!(
            b3,
            "blake3:6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        assert_eq!(Algorithm::of(&b3), Some(Algorithm::Blake3));
        let mut reading = Reading::new(&b"abc"[..], Algorithm::Blake3);
        std::io::copy(&mut reading, &mut std::io::sink()).unwrap();
        assert_eq!(reading.finish(), (b3, 3));
    }

    #[test]
    fn malformed_digests_name_no_algorithm() {
        for bad in [
            "",
            "00",
            "blake3:",
            "blake3:00",
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
            "blake3:6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d8",
        ] {
            assert_eq!(Algorithm::of(bad), None, "{bad:?}");
        }
    }
}

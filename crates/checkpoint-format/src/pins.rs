//! Checkpoint pins: the sha256 of each pod checkpoint's manifest, recorded by podsnapd when it
//! writes the checkpoint, outside the checkpoint (root-only, [`PIN_DIR`]).
//!
//! A manifest lists the sha256 of every file, but it lives beside the files it protects: whoever
//! can change a checkpoint can re-compute its hashes. A restore of a checkpoint this node's
//! podsnapd took is refused unless its manifest is byte for byte the one pinned then. (A
//! checkpoint with no pin — copied here from elsewhere — is verified by its manifest alone.) A
//! checkpoint pulled from a registry is pinned by the node agent that pulled it, to the config
//! digest its image manifest named: the manifest file it pulled, verified against that digest.
//!
//! The node agent also reads the pin before it pushes a checkpoint: one whose manifest is not the
//! pinned one does not leave the node.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Where podsnapd keeps pins.
pub const PIN_DIR: &str = "/var/lib/podsnap/pins";

/// What a restore learns from the pin store about a checkpoint.
#[derive(Debug, PartialEq, Eq)]
pub enum Pin {
    /// This node took the checkpoint; its manifest had this sha256.
    Pinned(String),
    /// No record: not taken by this node's podsnapd.
    Unknown,
}

/// The pin file of a checkpoint directory: named by the sha256 of its canonical path.
fn pin_file(dir: &Path, checkpoint: &Path) -> PathBuf {
    let canonical = fs::canonicalize(checkpoint).unwrap_or_else(|_| checkpoint.to_path_buf());
    let key: String = Sha256::digest(canonical.as_os_str().as_encoded_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    dir.join(key)
}

/// Records `manifest_sha256` for the checkpoint at `checkpoint` (replacing an older pin of the
/// same path), and drops pins of checkpoints that no longer exist.
pub fn pin(dir: &Path, checkpoint: &Path, manifest_sha256: &str) -> std::io::Result<()> {
    write_pin(dir, checkpoint, manifest_sha256, true)
}

/// [`pin`], pruning nothing: for a writer that does not see every checkpoint the node's podsnapd
/// pinned (the node agent, in its container, sees only the kubelet's directory), and so cannot
/// tell a removed checkpoint from one it cannot see. podsnapd's next pin prunes.
pub fn pin_only(dir: &Path, checkpoint: &Path, manifest_sha256: &str) -> std::io::Result<()> {
    write_pin(dir, checkpoint, manifest_sha256, false)
}

fn write_pin(
    dir: &Path,
    checkpoint: &Path,
    manifest_sha256: &str,
    prune_stale: bool,
) -> std::io::Result<()> {
    // One pin write at a time: a prune must not see another call's half-written pin.
    static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _writing = WRITING.lock().unwrap_or_else(|e| e.into_inner());
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    if prune_stale {
        prune(dir);
    }
    let path = pin_file(dir, checkpoint);
    let temporary = path.with_extension("new");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&temporary)?;
    writeln!(file, "{manifest_sha256} {}", checkpoint.display())?;
    file.sync_all()?;
    fs::rename(&temporary, &path)
}

/// Removes pins whose checkpoint directory is gone.
fn prune(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.path().extension().is_some_and(|e| e == "new") {
            continue;
        }
        let text = fs::read_to_string(entry.path()).unwrap_or_default();
        let gone = text
            .trim_end()
            .split_once(' ')
            .is_none_or(|(_, path)| !Path::new(path).is_dir());
        if gone {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// The pin of the checkpoint at `checkpoint`.
pub fn lookup(dir: &Path, checkpoint: &Path) -> std::io::Result<Pin> {
    match fs::read_to_string(pin_file(dir, checkpoint)) {
        Ok(text) => {
            let digest = text.split_whitespace().next().unwrap_or_default();
            if digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(Pin::Pinned(digest.to_string()))
            } else {
                Err(std::io::Error::other(format!(
                    "malformed pin for checkpoint {}",
                    checkpoint.display()
                )))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Pin::Unknown),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_is_found_by_the_checkpoint_s_path_and_replaced_by_a_newer_one() {
        let root = tempfile::tempdir().unwrap();
        let pins = root.path().join("pins");
        let checkpoint = root.path().join("ckpt");
        fs::create_dir(&checkpoint).unwrap();
        assert_eq!(lookup(&pins, &checkpoint).unwrap(), Pin::Unknown);
        pin(&pins, &checkpoint, &"a".repeat(64)).unwrap();
        assert_eq!(
            lookup(&pins, &checkpoint).unwrap(),
            Pin::Pinned("a".repeat(64))
        );
        // The same directory reached another way is the same checkpoint.
        let other_way = root.path().join("./ckpt/../ckpt");
        assert_eq!(
            lookup(&pins, &other_way).unwrap(),
            Pin::Pinned("a".repeat(64))
        );
        pin(&pins, &checkpoint, &"b".repeat(64)).unwrap();
        assert_eq!(
            lookup(&pins, &checkpoint).unwrap(),
            Pin::Pinned("b".repeat(64))
        );
        // Pins of removed checkpoints go with the next pin.
        fs::remove_dir(&checkpoint).unwrap();
        let second = root.path().join("second");
        fs::create_dir(&second).unwrap();
        // Not by a writer that sees only some of the node's checkpoints.
        pin_only(&pins, &second, &"c".repeat(64)).unwrap();
        assert_eq!(fs::read_dir(&pins).unwrap().count(), 2);
        pin(&pins, &second, &"c".repeat(64)).unwrap();
        assert_eq!(fs::read_dir(&pins).unwrap().count(), 1);
        // A pin written before its directory exists is found once it does.
        let later = root.path().join("later");
        pin_only(&pins, &later, &"d".repeat(64)).unwrap();
        fs::create_dir(&later).unwrap();
        assert_eq!(lookup(&pins, &later).unwrap(), Pin::Pinned("d".repeat(64)));
    }

    #[test]
    fn concurrent_pins_all_land() {
        let root = tempfile::tempdir().unwrap();
        let pins = root.path().join("pins");
        let checkpoints: Vec<PathBuf> = (0..16)
            .map(|i| {
                let dir = root.path().join(format!("ckpt-{i}"));
                fs::create_dir(&dir).unwrap();
                dir
            })
            .collect();
        std::thread::scope(|scope| {
            for (i, checkpoint) in checkpoints.iter().enumerate() {
                let pins = &pins;
                scope.spawn(move || pin(pins, checkpoint, &format!("{i:064x}")).unwrap());
            }
        });
        for (i, checkpoint) in checkpoints.iter().enumerate() {
            assert_eq!(
                lookup(&pins, checkpoint).unwrap(),
                Pin::Pinned(format!("{i:064x}"))
            );
        }
    }
}

//! Scratch directories of a restore: the page images of a compressed checkpoint expanded for
//! CRIU, which reads only plain images. They hold a pod's memory, so none may outlive the shim
//! that made it. Each is named by its shim (`restore-<pid>-<start time>-XXXXXX` under
//! [`ROOT`]: the pid and that process's start time, in clock ticks since boot), and one whose
//! shim no longer runs (it crashed or was killed mid-restore) is removed by the next shim that
//! restores a compressed checkpoint, that starts, or that containerd runs to clean up after a
//! dead one (`delete`). One made before the host last booted is gone too, whatever its name.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::Context;

/// Where scratch directories are made (0700, root's; on disk, not in memory).
pub const ROOT: &str = "/var/lib/podsnap/scratch";

/// What every scratch directory's name starts with.
const PREFIX: &str = "restore-";

/// Makes a scratch directory under `root` (0700, removed when dropped), after removing those
/// of shims that no longer run.
pub fn create(root: &Path) -> anyhow::Result<tempfile::TempDir> {
    crate::checkpoint::private_dir(root)?;
    sweep(root);
    let me = procfs::process::Process::myself()
        .and_then(|p| p.stat())
        .context("read this shim's start time")?;
    tempfile::Builder::new()
        .prefix(&format!("{PREFIX}{}-{}-", me.pid, me.starttime))
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir_in(root)
        .with_context(|| format!("create a scratch directory in {}", root.display()))
}

/// Removes every scratch directory under `root` whose shim is gone; returns how many. Each is
/// first renamed to a trash name (at once), then removed, so that a sweep cut short (the `delete`
/// containerd runs has a few seconds) leaves trash the next sweep removes, never a directory
/// that looks made by a live shim. One whose name does not say its shim (made by a shim before
/// this naming) goes only if it was made before the host last booted. Nothing goes when this
/// process cannot read its own entry in /proc (no /proc, or another pid namespace's): every
/// shim would look gone.
pub fn sweep(root: &Path) -> usize {
    if procfs::process::Process::myself()
        .and_then(|p| p.stat())
        .is_err()
    {
        log::warn!("cannot read this process in /proc: scratch directories are not swept");
        return 0;
    }
    let Ok(entries) = fs::read_dir(root) else {
        return 0;
    };
    let booted = procfs::boot_time_secs().ok();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let trash = if name.starts_with(TRASH) {
            entry.path()
        } else {
            if !name.starts_with(PREFIX) {
                continue;
            }
            let before_boot = booted.is_some_and(|booted| {
                entry
                    .metadata()
                    .is_ok_and(|m| u64::try_from(m.ctime()).is_ok_and(|ctime| ctime < booted))
            });
            let owner = owner(name);
            if !before_boot && !owner.is_some_and(|(pid, start)| gone(pid, start)) {
                continue;
            }
            let pid = owner.map_or_else(|| "unknown".to_string(), |(pid, _)| pid.to_string());
            let trash = root.join(format!("{TRASH}{name}"));
            match fs::rename(entry.path(), &trash) {
                Ok(()) => {}
                // Another sweep took it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    log::warn!("cannot move {} to the trash: {e}", entry.path().display());
                    continue;
                }
            }
            log::warn!(
                "removing {}: the scratch directory of a shim (pid {pid}) that no longer runs",
                entry.path().display()
            );
            trash
        };
        let removal = if trash.is_dir() {
            fs::remove_dir_all(&trash)
        } else {
            fs::remove_file(&trash)
        };
        match removal {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("cannot remove {}: {e}", trash.display()),
        }
    }
    removed
}

/// What a scratch directory is renamed to before it is removed starts with this.
const TRASH: &str = "trash-";

/// The pid and start time a scratch directory's name gives.
fn owner(name: &str) -> Option<(i32, u64)> {
    let mut parts = name.strip_prefix(PREFIX)?.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    let start = parts.next()?.parse().ok()?;
    parts.next()?;
    Some((pid, start))
}

/// Whether the shim `pid`, started at `start`, is gone: no process has that pid, another one
/// does (another start time), or it died and is not reaped yet (a zombie). Any other answer of
/// /proc (out of descriptors, denied) keeps its directory: removing a live shim's would pull its
/// page images from under CRIU.
fn gone(pid: i32, start: u64) -> bool {
    match procfs::process::Process::new(pid).and_then(|p| p.stat()) {
        Ok(stat) => stat.starttime != start || matches!(stat.state, 'Z' | 'X'),
        Err(procfs::ProcError::NotFound(_)) => true,
        Err(e) => {
            log::warn!("cannot tell whether shim {pid} runs ({e}): its scratch directory stays");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_say_their_shim_and_others_are_not_read_as_one() {
        assert_eq!(owner("restore-42-12345-AbCdEf"), Some((42, 12345)));
        assert_eq!(owner("restore-AbCdEf"), None);
        assert_eq!(owner("restore-42-AbCdEf"), None);
        assert_eq!(owner("restore-42-12345"), None);
        assert_eq!(owner("other-42-12345-AbCdEf"), None);
    }

    #[test]
    fn a_dead_shims_directory_and_trash_go_and_a_running_ones_and_an_old_ones_stay() {
        let root = tempfile::tempdir().unwrap();
        let mine = create(root.path()).unwrap();
        fs::write(mine.path().join("pages-1.img"), b"memory").unwrap();
        // A process that died and is not reaped yet (a zombie), then one reaped: neither runs.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        let started = procfs::process::Process::new(dead as i32)
            .and_then(|p| p.stat())
            .map(|s| s.starttime)
            .unwrap();
        let gone = root.path().join(format!("{PREFIX}{dead}-{started}-XyZ123"));
        fs::create_dir(&gone).unwrap();
        fs::write(gone.join("pages-1.img"), b"memory").unwrap();
        while procfs::process::Process::new(dead as i32)
            .and_then(|p| p.stat())
            .is_ok_and(|s| s.state != 'Z')
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(sweep(root.path()), 1, "a zombie's directory goes");
        assert!(!gone.exists());
        child.wait().unwrap();
        fs::create_dir(&gone).unwrap();
        assert_eq!(sweep(root.path()), 1, "a reaped process's directory goes");
        assert!(!gone.exists());
        // This process, but started at another time: a reused pid.
        let reused = root
            .path()
            .join(format!("{PREFIX}{}-{}-XyZ124", std::process::id(), 1));
        fs::create_dir(&reused).unwrap();
        let unnamed = root.path().join(format!("{PREFIX}XyZ125"));
        fs::create_dir(&unnamed).unwrap();
        // What a sweep cut short left.
        let trash = root.path().join(format!("{TRASH}{PREFIX}1-1-XyZ126"));
        fs::create_dir(&trash).unwrap();
        fs::write(trash.join("pages-1.img"), b"memory").unwrap();

        assert_eq!(sweep(root.path()), 2);
        assert!(!reused.exists());
        assert!(!trash.exists());
        assert!(mine.path().join("pages-1.img").exists());
        assert!(unnamed.exists());
        let mode = fs::metadata(mine.path()).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700
        );
    }
}

//! OOM-kill notification for a container's cgroup, reported to containerd as `TaskOOM` (which
//! the CRI turns into the container's `OOMKilled` reason). cgroup v1 uses the memory
//! controller's eventfd interface (`cgroup.event_control`); cgroup v2 watches the `oom_kill`
//! counter in `memory.events` with inotify. Each watch runs on its own thread and ends when the
//! cgroup is removed.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::Context;
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::sync::mpsc::UnboundedSender;

use crate::cgroup::ContainerCgroup;

/// Starts watching `cgroup` for OOM kills; each one sends `container_id` on `events`.
pub fn watch(
    cgroup: &ContainerCgroup,
    container_id: &str,
    events: UnboundedSender<String>,
) -> anyhow::Result<()> {
    let id = container_id.to_string();
    if let Some(dir) = cgroup.v1_dir("memory") {
        let efd = register_v1(&dir)?;
        std::thread::Builder::new()
            .name("oom-v1".into())
            .spawn(move || watch_v1(dir, efd, id, events))?;
        return Ok(());
    }
    if let Some(dir) = cgroup.v2_dir() {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC)?;
        inotify
            .add_watch(
                &dir.join("memory.events"),
                AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_DELETE_SELF,
            )
            .with_context(|| format!("watch {}/memory.events", dir.display()))?;
        std::thread::Builder::new()
            .name("oom-v2".into())
            .spawn(move || watch_v2(dir, inotify, id, events))?;
    }
    Ok(())
}

fn register_v1(dir: &Path) -> anyhow::Result<OwnedFd> {
    let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC).context("eventfd")?;
    let control = File::open(dir.join("memory.oom_control"))
        .with_context(|| format!("open {}/memory.oom_control", dir.display()))?;
    std::fs::write(
        dir.join("cgroup.event_control"),
        format!("{} {}", efd.as_raw_fd(), control.as_raw_fd()),
    )
    .with_context(|| format!("register OOM eventfd in {}", dir.display()))?;
    Ok(OwnedFd::from(efd))
}

/// Reads `key N` from a flat-keyed cgroup file.
pub fn counter(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or_default()
}

fn watch_v1(dir: PathBuf, efd: OwnedFd, id: String, events: UnboundedSender<String>) {
    let mut efd = File::from(efd);
    let mut buf = [0u8; 8];
    // Like containerd's runc shim: every wake-up while the cgroup exists is an OOM; the eventfd
    // also fires when the cgroup is removed, which ends the watch.
    while efd.read_exact(&mut buf).is_ok() {
        if !dir.join("memory.oom_control").exists() || events.send(id.clone()).is_err() {
            return;
        }
    }
}

fn watch_v2(dir: PathBuf, inotify: Inotify, id: String, events: UnboundedSender<String>) {
    let path = dir.join("memory.events");
    let read_kills = || {
        std::fs::read_to_string(&path)
            .map(|t| counter(&t, "oom_kill"))
            .ok()
    };
    let mut kills = read_kills().unwrap_or_default();
    loop {
        let Ok(list) = inotify.read_events() else {
            return;
        };
        if list.iter().any(|e| {
            e.mask
                .intersects(AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_IGNORED)
        }) {
            return;
        }
        let Some(now) = read_kills() else { return };
        if now > kills && events.send(id.clone()).is_err() {
            return;
        }
        kills = now;
    }
}

#[cfg(test)]
mod tests {
    use super::counter;

    #[test]
    fn counter_reads_the_named_key_only() {
        let text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(counter(text, "oom_kill"), 3);
        assert_eq!(counter(text, "under_oom"), 0);
        assert_eq!(counter(text, "missing"), 0);
    }

    #[test]
    fn counter_reads_v2_memory_events() {
        let text = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(counter(text, "oom_kill"), 1);
        assert_eq!(counter(text, "oom"), 2);
    }
}

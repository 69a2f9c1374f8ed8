//! What a CRIU checkpoint would make its processes: the credentials, capabilities, securebits,
//! no_new_privs, seccomp mode and LSM label of every thread, read from the `core-<tid>.img`
//! images CRIU wrote. CRIU restores exactly these, whatever the new container's spec says, so a
//! restore must compare them with the spec before any process exists.
//!
//! A zombie (a child that exited and was not yet reaped when the dump froze it) has no thread
//! part and no credentials in its image: CRIU restores it by forking a task that runs only
//! CRIU's own code and exits with the recorded status, so it grants nothing and is left out.
//!
//! Only the fields needed for that comparison are decoded (CRIU's `core.proto` and
//! `creds.proto`, proto2, with the same field numbers); unknown fields are skipped. An image
//! file is CRIU's usual layout: `IMG_COMMON_MAGIC`, `CORE_MAGIC`, then one entry (a
//! little-endian `u32` length and the protobuf message).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::criu_image::{self, CORE_MAGIC, IMG_COMMON_MAGIC, ImageError};
/// Largest core image read: one entry of registers, creds and signal state is a few KiB.
const MAX_CORE_IMAGE: u64 = 4 << 20;

/// Why a checkpoint's credentials could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CredsError {
    #[error("read CRIU image {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CRIU image {0} is not a core image (bad magic)")]
    Magic(PathBuf),
    #[error("CRIU image {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("CRIU image {0} holds no credentials (a checkpoint without them cannot be checked)")]
    NoCredentials(PathBuf),
    #[error(
        "checkpoint {0} holds no core image of a live task: not a CRIU checkpoint of a running container"
    )]
    NoTasks(PathBuf),
}

/// CRIU's `creds_entry` (creds.proto), the fields a restore check needs.
#[derive(Clone, PartialEq, prost::Message)]
struct CredsEntry {
    #[prost(uint32, required, tag = "1")]
    uid: u32,
    #[prost(uint32, required, tag = "2")]
    gid: u32,
    #[prost(uint32, required, tag = "3")]
    euid: u32,
    #[prost(uint32, required, tag = "4")]
    egid: u32,
    #[prost(uint32, required, tag = "5")]
    suid: u32,
    #[prost(uint32, required, tag = "6")]
    sgid: u32,
    #[prost(uint32, required, tag = "7")]
    fsuid: u32,
    #[prost(uint32, required, tag = "8")]
    fsgid: u32,
    #[prost(uint32, repeated, packed = "false", tag = "9")]
    cap_inh: Vec<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "10")]
    cap_prm: Vec<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "11")]
    cap_eff: Vec<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "12")]
    cap_bnd: Vec<u32>,
    #[prost(uint32, required, tag = "13")]
    secbits: u32,
    #[prost(uint32, repeated, packed = "false", tag = "14")]
    groups: Vec<u32>,
    #[prost(string, optional, tag = "15")]
    lsm_profile: Option<String>,
    #[prost(uint32, optional, tag = "18")]
    no_new_privs: Option<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "19")]
    cap_amb: Vec<u32>,
}

/// CRIU's `thread_core_entry` (core.proto), the fields a restore check needs.
#[derive(Clone, PartialEq, prost::Message)]
struct ThreadCoreEntry {
    #[prost(message, optional, tag = "10")]
    creds: Option<CredsEntry>,
    #[prost(uint32, optional, tag = "11")]
    seccomp_mode: Option<u32>,
    #[prost(string, optional, tag = "13")]
    comm: Option<String>,
}

/// CRIU's `task_core_entry`: the task's state and command name.
#[derive(Clone, PartialEq, prost::Message)]
struct TaskCoreEntry {
    #[prost(uint32, optional, tag = "1")]
    task_state: Option<u32>,
    #[prost(string, optional, tag = "6")]
    comm: Option<String>,
}

/// CRIU's `TASK_DEAD` (compel's `COMPEL_TASK_DEAD`): the image of a zombie.
const TASK_DEAD: u32 = 2;

/// CRIU's `core_entry`: only the task and thread parts.
#[derive(Clone, PartialEq, prost::Message)]
struct CoreEntry {
    #[prost(message, optional, tag = "3")]
    tc: Option<TaskCoreEntry>,
    #[prost(message, optional, tag = "5")]
    thread_core: Option<ThreadCoreEntry>,
}

/// CRIU's seccomp modes (`SECCOMP_MODE_*`).
pub const SECCOMP_MODE_FILTER: u32 = 2;

/// What one checkpointed thread will be once CRIU restores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadCredentials {
    /// The thread id at dump time (from the image's name).
    pub tid: u32,
    /// The command name, for messages.
    pub comm: String,
    /// Real, effective, saved and filesystem user ids.
    pub uids: [u32; 4],
    /// Real, effective, saved and filesystem group ids.
    pub gids: [u32; 4],
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// Capability sets as bit masks (bit n = capability n).
    pub inheritable: u64,
    pub permitted: u64,
    pub effective: u64,
    pub bounding: u64,
    pub ambient: u64,
    pub securebits: u32,
    /// Whether `PR_SET_NO_NEW_PRIVS` was set (false when the image does not say).
    pub no_new_privs: bool,
    /// `SECCOMP_MODE_*` (0 when the image does not say).
    pub seccomp_mode: u32,
    /// The LSM label (AppArmor profile or SELinux context), if any.
    pub lsm_profile: Option<String>,
}

/// CRIU keeps each capability set as 32-bit words, lowest first.
fn mask(words: &[u32]) -> u64 {
    words
        .iter()
        .take(2)
        .enumerate()
        .fold(0, |acc, (i, w)| acc | (u64::from(*w) << (32 * i)))
}

/// Decodes one `core-<tid>.img` given as bytes: the thread's credentials, or `None` for a
/// zombie's image (which CRIU writes without any, and restores without running its code).
pub fn parse_core_image(path: &Path, data: &[u8]) -> Result<Option<ThreadCredentials>, CredsError> {
    let malformed = |reason: &str| CredsError::Malformed {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let entries = criu_image::entries(path, data, CORE_MAGIC).map_err(|e| match e {
        ImageError::Magic(path) => CredsError::Magic(path),
        ImageError::Malformed { path, reason } => CredsError::Malformed { path, reason },
    })?;
    let body = *entries.first().ok_or_else(|| malformed("no entry"))?;
    let core = <CoreEntry as prost::Message>::decode(body)
        .map_err(|e| malformed(&format!("core entry: {e}")))?;
    // Only an image as CRIU writes a zombie's: dead, and no thread part. CRIU restores a
    // thread from its own thread part whatever its task part says, so an image with one is
    // checked, whatever state it claims.
    if core.thread_core.is_none() && core.tc.as_ref().and_then(|t| t.task_state) == Some(TASK_DEAD)
    {
        return Ok(None);
    }
    let thread = core
        .thread_core
        .ok_or_else(|| CredsError::NoCredentials(path.to_path_buf()))?;
    let creds = thread
        .creds
        .ok_or_else(|| CredsError::NoCredentials(path.to_path_buf()))?;
    let tid = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("core-"))
        .and_then(|n| n.strip_suffix(".img"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok(Some(ThreadCredentials {
        tid,
        comm: thread
            .comm
            .or(core.tc.and_then(|t| t.comm))
            .unwrap_or_default(),
        uids: [creds.uid, creds.euid, creds.suid, creds.fsuid],
        gids: [creds.gid, creds.egid, creds.sgid, creds.fsgid],
        groups: creds.groups,
        inheritable: mask(&creds.cap_inh),
        permitted: mask(&creds.cap_prm),
        effective: mask(&creds.cap_eff),
        bounding: mask(&creds.cap_bnd),
        ambient: mask(&creds.cap_amb),
        securebits: creds.secbits,
        no_new_privs: creds.no_new_privs.unwrap_or(0) != 0,
        seccomp_mode: thread.seccomp_mode.unwrap_or(0),
        lsm_profile: creds.lsm_profile.filter(|p| !p.is_empty()),
    }))
}

/// The credentials of every thread a CRIU images directory would restore (every
/// `core-<tid>.img` but a zombie's), or an error if there is none or one cannot be read.
pub fn thread_credentials(images: &Path) -> Result<Vec<ThreadCredentials>, CredsError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CredsError::Io { path, source }
    };
    let mut threads = Vec::new();
    for entry in fs::read_dir(images).map_err(io(images))? {
        let entry = entry.map_err(io(images))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !(name.starts_with("core-") && name.ends_with(".img")) {
            continue;
        }
        let path = entry.path();
        let file = fs::File::open(&path).map_err(io(&path))?;
        let mut data = Vec::new();
        file.take(MAX_CORE_IMAGE)
            .read_to_end(&mut data)
            .map_err(io(&path))?;
        threads.extend(parse_core_image(&path, &data)?);
    }
    if threads.is_empty() {
        return Err(CredsError::NoTasks(images.to_path_buf()));
    }
    threads.sort_by_key(|t| t.tid);
    Ok(threads)
}

/// Writes a `core-<tid>.img` with these credentials: for tests of the readers and of the
/// restore checks built on them.
pub fn write_core_image(dir: &Path, creds: &ThreadCredentials) -> std::io::Result<()> {
    let split = |m: u64| vec![m as u32, (m >> 32) as u32];
    let core = CoreEntry {
        tc: Some(TaskCoreEntry {
            task_state: Some(1),
            comm: Some(creds.comm.clone()),
        }),
        thread_core: Some(ThreadCoreEntry {
            creds: Some(CredsEntry {
                uid: creds.uids[0],
                euid: creds.uids[1],
                suid: creds.uids[2],
                fsuid: creds.uids[3],
                gid: creds.gids[0],
                egid: creds.gids[1],
                sgid: creds.gids[2],
                fsgid: creds.gids[3],
                cap_inh: split(creds.inheritable),
                cap_prm: split(creds.permitted),
                cap_eff: split(creds.effective),
                cap_bnd: split(creds.bounding),
                cap_amb: split(creds.ambient),
                secbits: creds.securebits,
                groups: creds.groups.clone(),
                lsm_profile: creds.lsm_profile.clone(),
                no_new_privs: Some(u32::from(creds.no_new_privs)),
            }),
            seccomp_mode: Some(creds.seccomp_mode),
            comm: Some(creds.comm.clone()),
        }),
    };
    fs::write(
        dir.join(format!("core-{}.img", creds.tid)),
        core_image(&core),
    )
}

/// `core` framed as CRIU writes a core image: the two magics, the entry's length, the entry.
fn core_image(core: &CoreEntry) -> Vec<u8> {
    let body = prost::Message::encode_to_vec(core);
    let mut data = Vec::with_capacity(body.len() + 12);
    data.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    data.extend_from_slice(&CORE_MAGIC.to_le_bytes());
    data.extend_from_slice(&(body.len() as u32).to_le_bytes());
    data.extend_from_slice(&body);
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn root_with_caps() -> ThreadCredentials {
        ThreadCredentials {
            tid: 1,
            comm: "sh".into(),
            uids: [0; 4],
            gids: [0; 4],
            groups: vec![10],
            inheritable: 0,
            permitted: 0xa80425fb,
            effective: 0xa80425fb,
            bounding: 0x1_ffff_ffff,
            ambient: 0,
            securebits: 0,
            no_new_privs: true,
            seccomp_mode: SECCOMP_MODE_FILTER,
            lsm_profile: None,
        }
    }

    #[test]
    fn written_core_images_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut second = root_with_caps();
        second.tid = 42;
        second.uids = [65534; 4];
        second.lsm_profile = Some("cri-containerd.apparmor.d (enforce)".into());
        write_core_image(dir.path(), &root_with_caps()).unwrap();
        write_core_image(dir.path(), &second).unwrap();
        fs::write(dir.path().join("pages-1.img"), b"not a core image").unwrap();
        let threads = thread_credentials(dir.path()).unwrap();
        assert_eq!(threads, vec![root_with_caps(), second]);
    }

    #[test]
    fn a_directory_without_core_images_or_with_a_bad_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            thread_credentials(dir.path()),
            Err(CredsError::NoTasks(_))
        ));
        fs::write(dir.path().join("core-7.img"), b"\x19\x43\x56\x54garbage").unwrap();
        assert!(matches!(
            thread_credentials(dir.path()),
            Err(CredsError::Magic(_))
        ));
        let mut data = Vec::new();
        data.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
        data.extend_from_slice(&CORE_MAGIC.to_le_bytes());
        data.extend_from_slice(&1000u32.to_le_bytes());
        data.extend_from_slice(b"short");
        fs::write(dir.path().join("core-7.img"), data).unwrap();
        assert!(matches!(
            thread_credentials(dir.path()),
            Err(CredsError::Malformed { .. })
        ));
    }

    #[test]
    fn a_core_image_without_credentials_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = core_image(&CoreEntry {
            tc: None,
            thread_core: Some(ThreadCoreEntry::default()),
        });
        fs::write(dir.path().join("core-3.img"), data).unwrap();
        assert!(matches!(
            thread_credentials(dir.path()),
            Err(CredsError::NoCredentials(_))
        ));
    }

    /// A core image as CRIU's `dump_one_zombie` writes it: a task part only.
    fn write_task_only_image(dir: &Path, tid: u32, task_state: u32) {
        let data = core_image(&CoreEntry {
            tc: Some(TaskCoreEntry {
                task_state: Some(task_state),
                comm: Some("cat".into()),
            }),
            thread_core: None,
        });
        fs::write(dir.join(format!("core-{tid}.img")), data).unwrap();
    }

    #[test]
    fn a_zombie_is_left_out_but_a_live_task_without_credentials_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_core_image(dir.path(), &root_with_caps()).unwrap();
        write_task_only_image(dir.path(), 9, TASK_DEAD);
        assert_eq!(
            thread_credentials(dir.path()).unwrap(),
            vec![root_with_caps()]
        );
        // The same image claiming a live task (state 1): no credentials to check, refused.
        write_task_only_image(dir.path(), 9, 1);
        assert!(matches!(
            thread_credentials(dir.path()),
            Err(CredsError::NoCredentials(_))
        ));
        // A thread image that claims to be dead but has a thread part (credentials) is a
        // thread CRIU would restore: checked.
        let mut dead_root = root_with_caps();
        dead_root.tid = 11;
        write_core_image(dir.path(), &dead_root).unwrap();
        let data = fs::read(dir.path().join("core-11.img")).unwrap();
        let mut core = <CoreEntry as prost::Message>::decode(&data[12..]).unwrap();
        core.tc.as_mut().unwrap().task_state = Some(TASK_DEAD);
        let claimed = parse_core_image(Path::new("core-11.img"), &core_image(&core)).unwrap();
        assert_eq!(claimed, Some(dead_root));
        // Only zombies: nothing that would run, not a checkpoint to restore.
        let zombies = tempfile::tempdir().unwrap();
        write_task_only_image(zombies.path(), 9, TASK_DEAD);
        assert!(matches!(
            thread_credentials(zombies.path()),
            Err(CredsError::NoTasks(_))
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for len in 0..512usize {
            let mut data = Vec::with_capacity(len + 12);
            data.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
            data.extend_from_slice(&CORE_MAGIC.to_le_bytes());
            data.extend_from_slice(&(len as u32).to_le_bytes());
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                data.push(state as u8);
            }
            let _ = parse_core_image(Path::new("core-1.img"), &data);
        }
    }
}

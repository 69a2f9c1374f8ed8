//! What the benchmark reads from /proc: process trees, their anonymous memory, and the shim
//! processes serving a pod with their RSS and PSS.

use std::fs;
use std::path::Path;

/// One line of /proc/<pid>/stat, the fields we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub pid: u32,
    pub comm: String,
    pub ppid: u32,
    pub pgrp: u32,
}

/// Parses /proc/<pid>/stat text; `comm` may hold spaces and parentheses.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let (head, rest) = text.split_once(" (")?;
    let (comm, rest) = rest.rsplit_once(") ")?;
    let mut fields = rest.split(' ').skip(1); // state
    Some(Stat {
        pid: head.trim().parse().ok()?,
        comm: comm.to_string(),
        ppid: fields.next()?.parse().ok()?,
        pgrp: fields.next()?.parse().ok()?,
    })
}

/// Every process on the host (zombies included).
pub fn processes() -> Vec<Stat> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|e| parse_stat(&fs::read_to_string(e.path().join("stat")).ok()?))
        .collect()
}

/// `root` and its descendants, when `root` exists.
pub fn tree(root: u32) -> Vec<u32> {
    let all = processes();
    if !all.iter().any(|p| p.pid == root) {
        return Vec::new();
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(all.iter().filter(|p| p.ppid == parent).map(|p| p.pid));
        i += 1;
    }
    found
}

/// The processes of process group `pgid`.
pub fn group(pgid: u32) -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|p| p.pgrp == pgid)
        .map(|p| p.pid)
        .collect()
}

/// A `Key:   123 kB` value of a /proc status-like file, in KiB.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Anonymous resident memory of `pid` (RssAnon), KiB; 0 when it is gone.
pub fn rss_anon_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| kib_field(&s, "RssAnon"))
        .unwrap_or(0)
}

/// Anonymous resident memory of `root` and its descendants, KiB.
pub fn tree_rss_anon_kib(root: u32) -> u64 {
    tree(root).into_iter().map(rss_anon_kib).sum()
}

/// A shim process serving a pod, with its memory.
#[derive(Debug, Clone)]
pub struct ShimProcess {
    pub pid: u32,
    pub comm: String,
    pub rss_kib: u64,
    pub pss_kib: u64,
}

/// The processes whose command line is `containerd-shim-* ... -id <shim_id>` (containerd's
/// shims for a pod are started with the sandbox id), with RSS and PSS from smaps_rollup.
pub fn shim_processes(shim_id: &str) -> Result<Vec<ShimProcess>, String> {
    let mut found = Vec::new();
    for p in processes() {
        let Ok(cmdline) = fs::read(format!("/proc/{}/cmdline", p.pid)) else {
            continue;
        };
        let argv: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_shim = argv.first().is_some_and(|a| {
            Path::new(&*String::from_utf8_lossy(a))
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("containerd-shim-"))
        });
        if !is_shim
            || !argv
                .windows(2)
                .any(|w| w[0] == b"-id" && w[1] == shim_id.as_bytes())
        {
            continue;
        }
        let rollup = fs::read_to_string(format!("/proc/{}/smaps_rollup", p.pid))
            .map_err(|e| format!("read /proc/{}/smaps_rollup: {e}", p.pid))?;
        found.push(ShimProcess {
            pid: p.pid,
            comm: p.comm,
            rss_kib: kib_field(&rollup, "Rss").unwrap_or(0),
            pss_kib: kib_field(&rollup, "Pss").unwrap_or(0),
        });
    }
    found.sort_by_key(|p| p.pid);
    Ok(found)
}

/// Total size of the files under `dir`, bytes.
pub fn du(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => du(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_comm_is_parsed() {
        let s = parse_stat("42 (a) b (c)) S 7 42 42 0 -1 4194560 1 2 3").unwrap();
        assert_eq!(
            s,
            Stat {
                pid: 42,
                comm: "a) b (c)".into(),
                ppid: 7,
                pgrp: 42
            }
        );
    }

    #[test]
    fn kib_fields_are_read() {
        let t = "Rss:                5120 kB\nPss:                1234 kB\nPss_Anon: 3 kB\n";
        assert_eq!(kib_field(t, "Rss"), Some(5120));
        assert_eq!(kib_field(t, "Pss"), Some(1234));
        assert_eq!(kib_field(t, "Swap"), None);
    }

    #[test]
    fn own_tree_and_memory_are_visible() {
        let me = std::process::id();
        assert!(tree(me).contains(&me));
        assert!(rss_anon_kib(me) > 0);
    }
}

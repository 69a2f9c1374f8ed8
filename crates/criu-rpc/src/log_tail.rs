//! The tail of CRIU's log file, attached to every error of an operation that got far enough to
//! write one (a project rule: CRIU failures include the tail of CRIU's log).
//!
//! CRIU writes its log into the work directory (the images directory when no work directory is
//! given). This module reads the end of that file through the directory fd the request passed, so
//! the tail is found even when the directory was renamed meanwhile. It does not parse the log.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;

/// How many lines of CRIU's log an error carries.
pub(crate) const TAIL_LINES: usize = 20;

/// At most this many bytes are read from the end of the log: CRIU lines are short, and a debug log
/// of a big dump runs to many megabytes.
const TAIL_BYTES: u64 = 64 * 1024;

/// The last lines of a CRIU log file, or why they could not be read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct LogTail {
    path: Option<PathBuf>,
    lines: Vec<String>,
    unreadable: Option<String>,
}

impl LogTail {
    /// Reads the last `max_lines` lines of `name` inside the directory `dir`. `shown_dir` is the
    /// directory's path, used only to name the file in messages.
    pub(crate) fn read(
        dir: BorrowedFd<'_>,
        shown_dir: &std::path::Path,
        name: &str,
        max_lines: usize,
    ) -> Self {
        let shown = shown_dir.join(name);
        let via_fd = PathBuf::from(format!("/proc/self/fd/{}/{name}", dir.as_raw_fd()));
        match read_end(&via_fd, TAIL_BYTES) {
            Ok(text) => Self::from_text(shown, &text, max_lines),
            Err(err) => LogTail {
                path: Some(shown),
                lines: Vec::new(),
                unreadable: Some(err.to_string()),
            },
        }
    }

    /// The last `max_lines` non-empty lines of `text`, which came from `path`.
    pub(crate) fn from_text(path: PathBuf, text: &str, max_lines: usize) -> Self {
        let mut lines: Vec<String> = text
            .lines()
            .rev()
            .map(str::trim_end)
            .filter(|line| !line.is_empty())
            .take(max_lines)
            .map(str::to_owned)
            .collect();
        lines.reverse();
        LogTail {
            path: Some(path),
            lines,
            unreadable: None,
        }
    }

    pub(crate) fn lines(&self) -> &[String] {
        &self.lines
    }

    /// The last line of the tail that reports an error (`Error (file:line): ...`), passing over
    /// CRIU's closing `Dumping FAILED.` / `Restoring FAILED.` when a more telling one precedes it.
    pub(crate) fn last_error(&self) -> Option<String> {
        let mut errors = self
            .lines
            .iter()
            .rev()
            .filter(|line| line.contains("Error ("));
        let last = errors.next()?;
        if !last.ends_with(" FAILED.") {
            return Some(last.clone());
        }
        Some(errors.next().unwrap_or(last).clone())
    }
}

/// Reads at most `max` bytes from the end of the file, dropping a first line cut in half.
fn read_end(path: &std::path::Path, max: u64) -> io::Result<String> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(max);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::with_capacity((len - start) as usize);
    file.read_to_end(&mut bytes)?;
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if start > 0 {
        let cut = text.find('\n').map_or(text.len(), |i| i + 1);
        text.drain(..cut);
    }
    Ok(text)
}

impl fmt::Display for LogTail {
    /// Empty when there is no log; otherwise a newline, a header naming the file, and the lines.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if let Some(why) = &self.unreadable {
            return write!(f, "\n(criu log {} unreadable: {why})", path.display());
        }
        if self.lines.is_empty() {
            return write!(f, "\n(criu log {} is empty)", path.display());
        }
        write!(
            f,
            "\n--- last {} lines of {} ---",
            self.lines.len(),
            path.display()
        )?;
        for line in &self.lines {
            write!(f, "\n{line}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    #[test]
    fn tail_keeps_only_the_last_lines_in_order() {
        let text: String = (1..=30).map(|i| format!("({i:02}) line {i}\n")).collect();
        let tail = LogTail::from_text("/w/dump.log".into(), &text, 20);
        assert_eq!(tail.lines().len(), 20);
        assert_eq!(tail.lines()[0], "(11) line 11");
        assert_eq!(tail.lines()[19], "(30) line 30");
        assert_eq!(tail.last_error(), None);
        let tail = LogTail::from_text(
            "/w/r.log".into(),
            "Error (a.c:1): first\nError (b.c:2): last\nbye\n",
            20,
        );
        assert_eq!(tail.last_error().as_deref(), Some("Error (b.c:2): last"));
        let text = "Error (u.c:1): rlimit\n(0.2) Error (r.c:1230): Can't fork for 7: File exists\n(0.3) Error (r.c:2320): Restoring FAILED.\n";
        let tail = LogTail::from_text("/w/r.log".into(), text, 20);
        assert_eq!(
            tail.last_error().as_deref(),
            Some("(0.2) Error (r.c:1230): Can't fork for 7: File exists")
        );
        let tail = LogTail::from_text(
            "/w/r.log".into(),
            "(0.3) Error (r.c:2320): Restoring FAILED.\n",
            20,
        );
        assert_eq!(
            tail.last_error().as_deref(),
            Some("(0.3) Error (r.c:2320): Restoring FAILED.")
        );
    }

    #[test]
    fn tail_of_short_log_skips_blank_lines_and_trailing_whitespace() {
        let tail = LogTail::from_text("/w/dump.log".into(), "a  \n\n\nb\r\n\n", 20);
        assert_eq!(tail.lines(), ["a", "b"]);
    }

    #[test]
    fn display_names_the_file_or_says_why_it_is_missing() {
        let tail = LogTail::from_text("/w/dump.log".into(), "x\n", 20);
        assert_eq!(tail.to_string(), "\n--- last 1 lines of /w/dump.log ---\nx");
        assert_eq!(LogTail::default().to_string(), "");
        let dir = tempfile::tempdir().unwrap();
        let fd = File::open(dir.path()).unwrap();
        let missing = LogTail::read(fd.as_fd(), dir.path(), "nope.log", 20);
        let shown = missing.to_string();
        assert!(shown.contains("nope.log unreadable"), "{shown}");
        assert!(shown.contains("No such file"), "{shown}");
    }

    #[test]
    fn read_through_dir_fd_drops_the_line_cut_by_the_byte_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = File::create(dir.path().join("restore.log")).unwrap();
        for i in 0..10_000 {
            writeln!(
                log,
                "({i:05}) a fairly long criu log line to push the file past the limit"
            )
            .unwrap();
        }
        writeln!(log, "Error (criu/cr-restore.c:42): the last line").unwrap();
        drop(log);
        let fd = File::open(dir.path()).unwrap();
        let tail = LogTail::read(fd.as_fd(), dir.path(), "restore.log", TAIL_LINES);
        assert_eq!(tail.lines().len(), TAIL_LINES);
        assert_eq!(
            tail.lines().last().unwrap(),
            "Error (criu/cr-restore.c:42): the last line"
        );
        assert!(
            tail.lines()[0].starts_with("(09981)"),
            "{:?}",
            tail.lines()[0]
        );

        let text = read_end(&dir.path().join("restore.log"), 100).unwrap();
        assert_eq!(text, "Error (criu/cr-restore.c:42): the last line\n");
    }
}

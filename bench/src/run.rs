//! Running an external program (crictl, ctr, criu) so that it can never hang the benchmark: it
//! runs under coreutils' `timeout` (which kills its whole process group past the deadline, and
//! SIGKILLs it 5 s later), with stdin from `/dev/null`.

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A program invocation with a deadline.
#[derive(Debug, Clone)]
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    timeout: Duration,
}

/// What a program that exited 0 printed, and how long it ran.
#[derive(Debug)]
pub struct Done {
    pub stdout: String,
    pub elapsed: Duration,
}

impl Cmd {
    /// `program` with a 60 s deadline.
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            timeout: Duration::from_secs(60),
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The command line, for messages.
    pub fn display(&self) -> String {
        let name = Path::new(&self.program)
            .file_name()
            .unwrap_or(&self.program)
            .to_string_lossy()
            .into_owned();
        std::iter::once(name)
            .chain(self.args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs the program to its end; an error names the command and carries its stderr when it
    /// fails, times out or cannot start. `elapsed` is the wall time of the whole run.
    pub fn run(&self) -> Result<Done, String> {
        self.run_keeping_stdout().1
    }

    /// [`Cmd::run`], and also what the program printed on stdout when it failed (what it made
    /// before failing may need cleaning up).
    pub fn run_keeping_stdout(&self) -> (String, Result<Done, String>) {
        let start = Instant::now();
        let out = Command::new("timeout")
            .arg("--kill-after=5")
            .arg(format!("{}", self.timeout.as_secs_f64()))
            .arg(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .output();
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                let e = format!("cannot run `{}`: {e}", self.display());
                return (String::new(), Err(e));
            }
        };
        let elapsed = start.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            return (stdout.clone(), Ok(Done { stdout, elapsed }));
        }
        // ctr warns about cgroup v1 on every call: not worth repeating.
        let stderr: Vec<&str> = std::str::from_utf8(&out.stderr)
            .unwrap_or("(stderr is not UTF-8)")
            .lines()
            .filter(|l| !l.contains("DEPRECATION"))
            .collect();
        let why = match out.status.code() {
            Some(124) | Some(137) => format!("timed out after {:?}", self.timeout),
            Some(code) => format!("exit code {code}"),
            None => format!("{}", out.status),
        };
        let error = format!(
            "`{}` failed ({why}) after {:.2}s:\n{}{}",
            self.display(),
            elapsed.as_secs_f64(),
            tail(&stdout, 2000),
            tail(&stderr.join("\n"), 4000)
        );
        (stdout, Err(error))
    }
}

/// The last `max` bytes of `text` (on a character boundary).
fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after `timeout` with `what`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check()? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_failures_and_timeouts_are_reported() {
        let ok = Cmd::new("sh").args(["-c", "echo hi"]).run().unwrap();
        assert_eq!(ok.stdout, "hi\n");
        let err = Cmd::new("sh")
            .args(["-c", "echo oops >&2; exit 3"])
            .run()
            .unwrap_err();
        assert!(err.contains("exit code 3") && err.contains("oops"), "{err}");
        let (stdout, err) = Cmd::new("sh")
            .args(["-c", "echo made; exit 1"])
            .run_keeping_stdout();
        assert_eq!(stdout, "made\n");
        assert!(err.is_err());
        let err = Cmd::new("sleep")
            .arg("10")
            .timeout(Duration::from_millis(200))
            .run()
            .unwrap_err();
        assert!(err.contains("timed out"), "{err}");
    }

    #[test]
    fn stdin_is_empty() {
        let out = Cmd::new("cat").run().unwrap();
        assert_eq!(out.stdout, "");
    }
}

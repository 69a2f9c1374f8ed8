//! Running an external program (crictl, ctr, script) so that it can never hang a test run:
//! stdin is `/dev/null` unless input is given, the program runs in a process group of its own,
//! and past its deadline the whole group is killed with SIGKILL.
//!
//! This module knows nothing of the node; [`crate::node`] builds the command lines.

use std::ffi::OsString;
use std::fmt;
use std::io::{Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// How long output readers may outlive a killed or exited program (a grandchild that left the
/// process group may keep a pipe open).
const READER_GRACE: Duration = Duration::from_secs(5);

/// A program invocation with a deadline.
#[derive(Debug, Clone)]
pub struct CommandLine {
    program: OsString,
    args: Vec<OsString>,
    input: Option<Vec<u8>>,
    env: Vec<(OsString, OsString)>,
    timeout: Duration,
}

/// How a program ended: its exit code (or the signal that killed it) and its output.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The command line, for messages.
    pub command: String,
    /// The exit code; `None` when a signal ended the program.
    pub code: Option<i32>,
    /// The signal that ended the program, if one did.
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Why a program did not finish on its own.
#[derive(Debug)]
pub enum CommandError {
    /// The program could not be started.
    Spawn {
        command: String,
        error: std::io::Error,
    },
    /// The program outlived its deadline and was killed, with its process group.
    TimedOut {
        command: String,
        timeout: Duration,
        stdout: String,
        stderr: String,
    },
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandError::Spawn { command, error } => write!(f, "cannot run `{command}`: {error}"),
            CommandError::TimedOut {
                command,
                timeout,
                stdout,
                stderr,
            } => write!(
                f,
                "`{command}` did not finish within {timeout:?} and was killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
                tail(stdout, 4000),
                tail(stderr, 4000)
            ),
        }
    }
}

impl std::error::Error for CommandError {}

impl CommandLine {
    /// `program` with a 60 s deadline and no input.
    pub fn new(program: impl Into<OsString>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            input: None,
            env: Vec::new(),
            timeout: Duration::from_secs(60),
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the program.
    pub fn env(mut self, name: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// Feeds `input` to the program's stdin, then closes it.
    pub fn input(mut self, input: impl Into<Vec<u8>>) -> Self {
        self.input = Some(input.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The command line, quoted for a POSIX shell (`script -c` runs it; messages show it).
    pub fn display(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|a| shell_quote(&a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs the program to its end or its deadline.
    pub fn run(&self) -> Result<Finished, CommandError> {
        let command = self.display();
        let started = Instant::now();
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(if self.input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|error| CommandError::Spawn {
                command: command.clone(),
                error,
            })?;
        let group = Pid::from_raw(child.id() as i32);
        if let (Some(input), Some(mut stdin)) = (self.input.clone(), child.stdin.take()) {
            // A writer thread: a program that does not read must not block us.
            thread::spawn(move || {
                let _ = stdin.write_all(&input);
            });
        }
        let stdout = read_in_background(child.stdout.take().expect("piped"));
        let stderr = read_in_background(child.stderr.take().expect("piped"));
        let deadline = started + self.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() >= deadline => break None,
                Ok(None) => thread::sleep(Duration::from_millis(10)),
                Err(_) => break None,
            }
        };
        let status = match status {
            Some(status) => status,
            None => {
                // Not reaped yet, so the group id cannot have been reused: whatever the program
                // started in its group (a `script` session, a pager) goes with it.
                let _ = killpg(group, Signal::SIGKILL);
                let _ = child.kill();
                let _ = child.wait();
                return Err(CommandError::TimedOut {
                    command,
                    timeout: self.timeout,
                    stdout: collect(stdout),
                    stderr: collect(stderr),
                });
            }
        };
        Ok(Finished {
            command,
            code: status.code(),
            signal: status.signal(),
            stdout: collect(stdout),
            stderr: collect(stderr),
            elapsed: started.elapsed(),
        })
    }
}

fn read_in_background(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

fn collect(rx: mpsc::Receiver<Vec<u8>>) -> String {
    match rx.recv_timeout(READER_GRACE) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => "<output not closed: a process outside the group still holds the pipe>".into(),
    }
}

/// `word` quoted for a POSIX shell (unchanged when it needs no quoting).
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:=@,+%".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The last `max` bytes of `text` (at a character boundary).
pub fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

impl Finished {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// stdout and stderr, for messages.
    pub fn report(&self) -> String {
        format!(
            "`{}` exited with {} after {:.1?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            match (self.code, self.signal) {
                (Some(code), _) => format!("code {code}"),
                (None, Some(signal)) => format!("signal {signal}"),
                (None, None) => "unknown status".to_string(),
            },
            self.elapsed,
            tail(&self.stdout, 4000),
            tail(&self.stderr, 4000)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_past_its_deadline_is_killed_with_its_group() {
        let started = Instant::now();
        let err = CommandLine::new("sh")
            .args(["-c", "sleep 30 & sleep 30; echo never"])
            .timeout(Duration::from_millis(300))
            .run()
            .unwrap_err();
        assert!(matches!(err, CommandError::TimedOut { .. }), "{err}");
        // The backgrounded sleep held stdout: killing only `sh` would leave the reader waiting.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn stdin_is_empty_unless_input_is_given() {
        let out = CommandLine::new("cat").run().unwrap();
        assert!(out.success() && out.stdout.is_empty(), "{}", out.report());
        let out = CommandLine::new("cat").input("fed\n").run().unwrap();
        assert_eq!(out.stdout, "fed\n");
    }

    #[test]
    fn quoted_command_lines_survive_a_shell() {
        let line = CommandLine::new("printf").args(["%s|", "a b", "it's", "$HOME", ""]);
        let out = CommandLine::new("sh")
            .args(["-c", &line.display()])
            .run()
            .unwrap();
        assert_eq!(out.stdout, "a b|it's|$HOME||");
    }

    #[test]
    fn exit_code_and_output_are_reported() {
        let out = CommandLine::new("sh")
            .args(["-c", "echo out; echo err >&2; exit 7"])
            .run()
            .unwrap();
        assert_eq!(
            (out.code, out.stdout.as_str(), out.stderr.as_str()),
            (Some(7), "out\n", "err\n")
        );
    }
}

//! Test programs built from `e2e/fixtures/` on first use, static, so they run in any image.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use crate::command::CommandLine;

/// `memtest`: touches N MiB (first argument) with a position-dependent pattern, writes
/// `/tmp/memtest.ready`, and on SIGUSR1 checks every word into `/tmp/memtest.result`.
pub fn memtest() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| build("memtest"))
}

/// `listener`: listens on TCP port N (first argument) without accepting, writes
/// `/tmp/listener.ready`; on each SIGUSR1 accepts one connection and writes what it read to
/// `/tmp/listener.got`.
pub fn listener() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| build("listener"))
}

/// `fixtures/<name>.c`, built static into a directory of this test process.
fn build(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("podsnap-e2e-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the fixture directory");
    let out = dir.join(name);
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fixtures/{name}.c"));
    let build = CommandLine::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(&source)
        .timeout(Duration::from_secs(120))
        .run()
        .expect("run gcc");
    assert!(build.success(), "cannot build {name}: {}", build.report());
    out
}

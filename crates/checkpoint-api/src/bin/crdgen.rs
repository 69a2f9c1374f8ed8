//! `crdgen`: writes the CustomResourceDefinitions of `PodCheckpoint` and `PodRestore`, generated
//! from their Rust types, into `deploy/crds/` (or the directory given as the one argument).
//!
//! `cargo run -p podsnap-checkpoint-api --bin crdgen`

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = std::env::args_os().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds"),
        PathBuf::from,
    );
    let files = match podsnap_checkpoint_api::crds::crd_files() {
        Ok(files) => files,
        Err(e) => {
            eprintln!("crdgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    for (file, yaml) in files {
        let path = dir.join(file);
        if let Err(e) = std::fs::write(&path, yaml) {
            eprintln!("crdgen: write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("crdgen: wrote {}", path.display());
    }
    ExitCode::SUCCESS
}

//! Prints the CRIU version, `criu check`'s verdict and the optional features CRIU reports here.
//!
//! Run as root: `cargo run -p criu-rpc --example criu-info` (set `PODSNAP_CRIU` to pick a binary).

use criu_rpc::Criu;

fn main() -> Result<(), criu_rpc::Error> {
    let criu = Criu::new();
    println!("binary:   {}", criu.binary().display());
    println!("version:  {}", criu.version()?);
    match criu.check() {
        Ok(()) => println!("check:    ok"),
        Err(err) => println!("check:    FAILED: {err}"),
    }
    let features = criu.features()?;
    println!(
        "features: mem_track={} lazy_pages={} pidfd_store={}",
        features.mem_track, features.lazy_pages, features.pidfd_store
    );
    Ok(())
}

//! The CRIU image readers against images CRIU 4.1.1 wrote: `data/core-sleep.img` is the core
//! image of `sleep 1000` dumped by root (`criu dump -t <pid> --shell-job`) on the test machine.

use std::path::Path;

use podsnap_checkpoint_format::creds::parse_core_image;

#[test]
fn a_real_core_image_yields_the_thread_s_credentials() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/core-sleep.img");
    let data = std::fs::read(&path).unwrap();
    let creds = parse_core_image(&path, &data)
        .unwrap()
        .expect("a live task's image");
    assert_eq!(creds.comm, "sleep");
    assert_eq!(creds.uids, [0; 4]);
    assert_eq!(creds.gids, [0; 4]);
    // Root outside any container: the full bounding set, CAP_SYS_ADMIN (21) among it.
    assert_ne!(creds.bounding & (1 << 21), 0, "{creds:?}");
    assert_ne!(creds.permitted & (1 << 21), 0, "{creds:?}");
    assert!(!creds.no_new_privs);
}

#[test]
fn a_real_pagemap_bounds_its_pages_file() {
    // That dump's pages-1.img held 30 pages (122880 bytes).
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pagemap-sleep.img"),
        dir.path().join("pagemap-14796.img"),
    )
    .unwrap();
    let bounds = podsnap_checkpoint_format::pages::page_bounds(dir.path()).unwrap();
    let bound = bounds[&1];
    assert!((122_880..=30 * 65_536).contains(&bound), "{bounds:?}");
}

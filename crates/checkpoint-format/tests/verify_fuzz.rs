//! `verify` against hostile manifests: the reserved volumes directory name, and property tests
//! that mutate a real small checkpoint's manifest (byte flips, random field values, random
//! `files` keys) while one of its files is modified. `verify` must never panic, and must never
//! accept a checkpoint whose files are not exactly what the manifest it returns vouches for.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use podsnap_checkpoint_format::digest::{self, Algorithm};
use podsnap_checkpoint_format::{
    ContainerEntry, Error, FORMAT, MANIFEST, Manifest, PodEntry, VERSION, VOLUMES_DIR, files,
    sha256_file, verify, write_manifest,
};
use proptest::prelude::*;
use proptest::sample::Index;

/// A real small checkpoint in `root`: one container, a volume archive; its manifest.
fn sample(root: &Path, container: &str) -> Manifest {
    fs::create_dir_all(root.join(container).join("checkpoint")).unwrap();
    fs::write(
        root.join(container).join("checkpoint/pages-1.img"),
        b"pages",
    )
    .unwrap();
    fs::write(root.join(container).join("rootfs-diff.tar"), b"tar").unwrap();
    fs::create_dir_all(root.join(VOLUMES_DIR)).unwrap();
    fs::write(root.join(VOLUMES_DIR).join("data.tar"), b"volume").unwrap();
    let mut manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        minor: podsnap_checkpoint_format::MINOR,
        created: "2026-11-27T00:00:00Z".into(),
        pod: PodEntry {
            sandbox_id: "sb".into(),
            name: "pod".into(),
            namespace: "default".into(),
            uid: "u".into(),
            runtime_handler: "podsnap".into(),
            config: serde_json::json!({}),
            ips: Vec::new(),
        },
        containers: vec![ContainerEntry {
            name: container.into(),
            id: "c1".into(),
            image: "busybox".into(),
            image_ref: "sha256:x".into(),
            config: serde_json::json!({}),
        }],
        criu_version: "4.1.1".into(),
        kernel: "6.18".into(),
        options: BTreeMap::new(),
        files: BTreeMap::new(),
        machine: None,
    };
    write_manifest(root, &mut manifest).unwrap();
    manifest
}

#[test]
fn a_container_named_like_the_volumes_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    sample(dir.path(), "web");
    assert!(verify(dir.path()).is_ok());

    let dir = tempfile::tempdir().unwrap();
    sample(dir.path(), VOLUMES_DIR);
    let err = verify(dir.path()).unwrap_err();
    assert!(
        matches!(err, Error::BadContainerDir(ref name) if name == VOLUMES_DIR),
        "{err}"
    );
}

/// What an accepted checkpoint must be: every file present listed with its actual digest and
/// every listed file present, every listed path and container directory inside the checkpoint,
/// no container named like the volumes directory.
fn check_accepted(root: &Path, manifest: &Manifest) {
    let present = files(root).unwrap();
    assert_eq!(
        present.keys().collect::<Vec<_>>(),
        manifest.files.keys().collect::<Vec<_>>()
    );
    for (relative, path) in &present {
        let listed = &manifest.files[relative];
        let algorithm = Algorithm::of(listed).expect("an accepted digest names its algorithm");
        assert_eq!(
            &digest::of_file(algorithm, path).unwrap(),
            listed,
            "{relative}"
        );
    }
    for container in &manifest.containers {
        assert_ne!(container.name, VOLUMES_DIR);
        assert_eq!(Path::new(&container.name).components().count(), 1);
        assert!(!container.name.contains(".."));
    }
}

/// A checkpoint in a directory of its own (`<dir>/cp`, with an `outside` file beside it that a
/// manifest key `../outside` would name), with `rootfs-diff.tar` modified after the manifest
/// was written unless `modify` is false.
fn checkpoint(modify: bool) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cp");
    fs::create_dir(&root).unwrap();
    sample(&root, "web");
    fs::write(dir.path().join("outside"), b"outside").unwrap();
    if modify {
        fs::write(root.join("web/rootfs-diff.tar"), b"evil").unwrap();
    }
    let manifest = fs::read(root.join(MANIFEST)).unwrap();
    (dir, root, manifest)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 128,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// A path-like string: any string, or parts such as `..`, `/`, real names, joined.
fn path_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        (
            any::<bool>(),
            prop::collection::vec(
                prop::sample::select(vec![
                    "..",
                    ".",
                    "",
                    "web",
                    "checkpoint",
                    "pages-1.img",
                    "rootfs-diff.tar",
                    "outside",
                    "_volumes",
                    "data.tar",
                    "volumes",
                    "etc",
                    "passwd",
                ]),
                0..5,
            ),
        )
            .prop_map(|(absolute, parts)| {
                let joined = parts.join("/");
                if absolute {
                    format!("/{joined}")
                } else {
                    joined
                }
            }),
    ]
}

/// An arbitrary JSON value of small depth.
fn json() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u32>().prop_map(serde_json::Value::from),
        path_like().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(path_like(), inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The manifest's fields, and those of its pod and first container, as JSON pointers.
const FIELDS: &[&str] = &[
    "/format",
    "/version",
    "/created",
    "/pod",
    "/pod/name",
    "/pod/config",
    "/containers",
    "/containers/0",
    "/containers/0/name",
    "/containers/0/config",
    "/criu_version",
    "/options",
    "/files",
];

proptest! {
    #![proptest_config(config())]

    #[test]
    fn byte_flips_never_accept_a_modified_file(
        flips in prop::collection::vec((any::<Index>(), any::<u8>()), 1..8),
        truncate in any::<Option<Index>>(),
        modify in any::<bool>(),
    ) {
        let (_dir, root, mut manifest) = checkpoint(modify);
        for (at, value) in flips {
            let at = at.index(manifest.len());
            manifest[at] = value;
        }
        if let Some(at) = truncate {
            manifest.truncate(at.index(manifest.len()));
        }
        fs::write(root.join(MANIFEST), &manifest).unwrap();
        if let Ok(accepted) = verify(&root) {
            prop_assert!(!modify, "accepted a modified file");
            check_accepted(&root, &accepted);
        }
    }

    #[test]
    fn random_field_values_never_accept_a_modified_file(
        field in prop::sample::select(FIELDS),
        value in json(),
        modify in any::<bool>(),
    ) {
        let (_dir, root, manifest) = checkpoint(modify);
        let mut manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        if let Some(slot) = manifest.pointer_mut(field) {
            *slot = value;
        }
        fs::write(root.join(MANIFEST), serde_json::to_vec(&manifest).unwrap()).unwrap();
        if let Ok(accepted) = verify(&root) {
            prop_assert!(!modify, "accepted a modified file after changing {}", field);
            check_accepted(&root, &accepted);
        }
    }

    #[test]
    fn random_files_keys_never_reach_outside(
        extra in prop::collection::btree_map(path_like(), "[0-9a-f]{0,64}", 1..6),
        correct_outside_hash in any::<bool>(),
        modify in any::<bool>(),
        container in path_like(),
    ) {
        let (dir, root, manifest) = checkpoint(modify);
        let mut manifest: Manifest = serde_json::from_slice(&manifest).unwrap();
        for (key, hash) in extra {
            let hash = if correct_outside_hash {
                // The right hash for `../outside`, should the key name it.
                sha256_file(&dir.path().join("outside")).unwrap()
            } else {
                hash
            };
            manifest.files.insert(key, hash);
        }
        manifest.containers[0].name = container;
        fs::write(root.join(MANIFEST), serde_json::to_vec(&manifest).unwrap()).unwrap();
        // Every extra key names a file outside, none at all, or one with another hash.
        let result = verify(&root);
        prop_assert!(result.is_err(), "accepted {:?}", result.map(|m| m.files));
    }
}

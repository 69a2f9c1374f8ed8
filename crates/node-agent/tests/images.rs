//! The node agent's push and pull of checkpoint images against a real registry (Debian's
//! docker-registry, started on a free loopback port with storage of its own; a missing binary
//! fails the test): a checkpoint goes up only when it is the one podsnapd pinned, with the
//! kubelet's record; it comes down by digest only, into the kubelet's directory with that
//! record, pinned to what was pulled, and never into another namespace.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use podsnap_checkpoint_format::pins::{self, Pin};
use podsnap_checkpoint_format::{self as format, ContainerEntry, Manifest, PodEntry};
use podsnap_node_agent::RegistryConfig;
use podsnap_node_agent::images::{self, PullOutcome};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A registry of the test's own; stopped (by its pid) when dropped.
struct TestRegistry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl TestRegistry {
    fn start() -> Self {
        assert!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: run hack/install.sh (Debian package docker-registry)"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.path().join("storage").display()
            ),
        )
        .unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let registry = TestRegistry {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&registry.addr).is_err() {
            assert!(Instant::now() < deadline, "the registry did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    fn config(&self) -> RegistryConfig {
        RegistryConfig {
            insecure: vec![self.addr.clone()],
            auth_file: None,
            ca_file: None,
            identity_file: None,
        }
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-container checkpoint of pod `counter` in `default`, as podsnapd writes one, with the
/// kubelet's record beside it; pinned in `pins_dir`.
fn checkpoint(dir: &Path, name: &str, pins_dir: &Path) -> PathBuf {
    let root = dir.join(name);
    for (path, data) in [
        ("counter/checkpoint/pages-1.img", &b"pages"[..]),
        ("counter/checkpoint/inventory.img", b"inventory"),
        ("counter/rootfs-diff.tar", b"diff"),
    ] {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }
    let mut manifest = Manifest {
        format: format::FORMAT.into(),
        version: format::VERSION,
        minor: format::MINOR,
        created: "2026-12-03T00:00:00Z".into(),
        pod: PodEntry {
            sandbox_id: "sb".into(),
            name: "counter".into(),
            namespace: "default".into(),
            uid: "u".into(),
            runtime_handler: "podsnap".into(),
            config: serde_json::json!({}),
            ips: Vec::new(),
        },
        containers: vec![ContainerEntry {
            name: "counter".into(),
            id: "id".into(),
            image: "busybox".into(),
            image_ref: "sha256:x".into(),
            config: serde_json::json!({}),
        }],
        criu_version: "4.1.1".into(),
        kernel: "6.1.0".into(),
        options: BTreeMap::new(),
        files: BTreeMap::new(),
        machine: None,
    };
    format::write_manifest(&root, &mut manifest).unwrap();
    std::fs::write(
        images::record_path(&root),
        r#"{"apiVersion":"podcheckpoint.kubelet.k8s.io/v1alpha1","namespace":"default","name":"counter","podCheckpointUID":"uid-1","containers":[{"name":"counter","image":"busybox"}]}"#,
    )
    .unwrap();
    pins::pin(pins_dir, &root, &format::manifest_sha256(&root).unwrap()).unwrap();
    root
}

fn mode(path: &Path) -> u32 {
    std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions()) & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_checkpoint_goes_up_with_its_record_and_comes_down_pinned_on_another_node() {
    let registry = TestRegistry::start();
    let config = registry.config();
    let source = tempfile::tempdir().unwrap();
    let source_pins = source.path().join("pins");
    let name = "checkpoint-counter_default-2026-12-03T00:00:00Z";
    let taken = checkpoint(source.path(), name, &source_pins);
    let repository = format!("{}/e2e/counter", registry.addr);

    let pushed = images::push(
        &config,
        &source_pins,
        &taken,
        &repository,
        "uid-1",
        None,
        None,
    )
    .await
    .unwrap();
    assert!(
        pushed
            .reference
            .starts_with(&format!("{repository}@sha256:")),
        "{pushed:?}"
    );

    // The other node: its own kubelet directory and pins.
    let target = tempfile::tempdir().unwrap();
    let dir = target.path().join("pod-checkpoints");
    std::fs::create_dir(&dir).unwrap();
    let pins_dir = target.path().join("pins");
    let pull_as =
        |name: &'static str, image: String, namespace: &'static str, uid: &'static str| {
            let (config, pins_dir, dir) = (config.clone(), pins_dir.clone(), dir.clone());
            async move {
                images::pull(
                    &config,
                    &pins_dir,
                    &dir,
                    name,
                    &image,
                    namespace,
                    uid,
                    1 << 30,
                    None,
                )
                .await
            }
        };
    let pull = |name, image, namespace| pull_as(name, image, namespace, "uid-1");

    // By tag: refused; into another namespace: refused; a name that is no checkpoint's: refused.
    let by_tag = format!("{repository}:uid-1");
    let err = pull(name, by_tag.clone(), "default").await.unwrap_err();
    assert!(err.contains("names no digest"), "{err}");
    let err = pull(name, pushed.reference.clone(), "other")
        .await
        .unwrap_err();
    assert!(err.contains("do not cross namespaces"), "{err}");
    // The image of another PodCheckpoint than the one that published this reference: refused.
    let err = pull_as(name, pushed.reference.clone(), "default", "uid-2")
        .await
        .unwrap_err();
    assert!(err.contains("names PodCheckpoint \"uid-1\""), "{err}");
    for bad in [
        "../checkpoint-x",
        "x",
        "checkpoint-a/b",
        "checkpoint-a.kubelet.json",
    ] {
        let err = pull(bad, pushed.reference.clone(), "default")
            .await
            .unwrap_err();
        assert!(err.contains("not a pod checkpoint name"), "{bad}: {err}");
    }
    // Each refusal left nothing behind.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

    let outcome = pull(name, pushed.reference.clone(), "default")
        .await
        .unwrap();
    assert!(matches!(outcome, PullOutcome::Pulled { .. }), "{outcome:?}");
    let pulled = dir.join(name);
    format::verify(&pulled).unwrap();
    assert_eq!(
        std::fs::read(images::record_path(&pulled)).unwrap(),
        std::fs::read(images::record_path(&taken)).unwrap()
    );
    assert_eq!(mode(&images::record_path(&pulled)), 0o600);
    // Pinned to what the image named: podsnapd's restore refuses it changed from now on.
    assert_eq!(
        pins::lookup(&pins_dir, &pulled).unwrap(),
        Pin::Pinned(format::manifest_sha256(&taken).unwrap())
    );
    // Again: it is here.
    assert_eq!(
        pull(name, pushed.reference.clone(), "default")
            .await
            .unwrap(),
        PullOutcome::Present
    );
    let pulled_names: Vec<String> = images::pulled_checkpoints(&dir)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(pulled_names, vec![name.to_string()]);
    images::remove_pulled(&dir, name).unwrap();
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

    // An agent stopped after the marker, before the rename: the next pull starts over.
    std::fs::write(dir.join(format!("{name}.pulled")), "sha256:0\n").unwrap();
    std::fs::write(images::record_path(&pulled), "{}").unwrap();
    let outcome = pull(name, pushed.reference.clone(), "default")
        .await
        .unwrap();
    assert!(matches!(outcome, PullOutcome::Pulled { .. }), "{outcome:?}");
    format::verify(&pulled).unwrap();
    // A record with no marker and no checkpoint is the kubelet's, writing one: not touched.
    images::remove_pulled(&dir, name).unwrap();
    std::fs::write(images::record_path(&pulled), "{}").unwrap();
    let err = pull(name, pushed.reference.clone(), "default")
        .await
        .unwrap_err();
    assert!(err.contains("the kubelet is writing one"), "{err}");
    assert_eq!(std::fs::read(images::record_path(&pulled)).unwrap(), b"{}");
}

#[test]
fn what_unfinished_pulls_leave_is_found_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        ".pull-checkpoint-a",
        "..pull-checkpoint-b.partial-12-34",
        ".pull-checkpoint-running",
        "checkpoint-c",
        ".checkpoint-d.pulled.tmp",
        ".checkpoint-e.kubelet.json.tmp",
        "checkpoint-f.kubelet.json.tmp",
        ".pull-other",
    ] {
        std::fs::create_dir(dir.path().join(name)).unwrap();
    }
    let running = std::collections::BTreeSet::from(["checkpoint-running".to_string()]);
    let mut stale: Vec<String> = images::stale_pulls(dir.path(), &running)
        .into_iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .collect();
    stale.sort();
    assert_eq!(
        stale,
        [
            "..pull-checkpoint-b.partial-12-34",
            ".checkpoint-d.pulled.tmp",
            ".checkpoint-e.kubelet.json.tmp",
            ".pull-checkpoint-a",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_changed_since_podsnapd_pinned_it_or_never_pinned_stays_on_the_node() {
    let registry = TestRegistry::start();
    let config = registry.config();
    let node = tempfile::tempdir().unwrap();
    let pins_dir = node.path().join("pins");
    let repository = format!("{}/e2e/counter", registry.addr);

    // Changed, its hashes re-computed: it verifies, but is not the one podsnapd wrote.
    let changed = checkpoint(node.path(), "checkpoint-a_default-t", &pins_dir);
    std::fs::write(changed.join("counter/checkpoint/pages-1.img"), b"PAGES").unwrap();
    let mut rewritten: Manifest =
        serde_json::from_slice(&std::fs::read(changed.join(format::MANIFEST)).unwrap()).unwrap();
    rewritten.files.clear();
    std::fs::remove_file(changed.join(format::MANIFEST)).unwrap();
    format::write_manifest(&changed, &mut rewritten).unwrap();
    format::verify(&changed).unwrap();
    let err = images::push(&config, &pins_dir, &changed, &repository, "t", None, None)
        .await
        .unwrap_err();
    assert!(err.contains("it was changed, and is not pushed"), "{err}");

    // Never pinned on this node.
    let unpinned = checkpoint(
        node.path(),
        "checkpoint-b_default-t",
        &node.path().join("other-pins"),
    );
    let err = images::push(&config, &pins_dir, &unpinned, &repository, "t", None, None)
        .await
        .unwrap_err();
    assert!(err.contains("has no pin of it"), "{err}");

    // No kubelet record beside it.
    let pinned = checkpoint(node.path(), "checkpoint-c_default-t", &pins_dir);
    std::fs::remove_file(images::record_path(&pinned)).unwrap();
    let err = images::push(&config, &pins_dir, &pinned, &repository, "t", None, None)
        .await
        .unwrap_err();
    assert!(err.contains("the kubelet's record"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_checkpoint_and_its_record_go_up_sealed_and_come_down_only_where_a_key_opens_them()
 {
    let registry = TestRegistry::start();
    let source = tempfile::tempdir().unwrap();
    let source_pins = source.path().join("pins");
    let name = "checkpoint-counter_default-2026-12-03T00:00:01Z";
    let taken = checkpoint(source.path(), name, &source_pins);
    let repository = format!("{}/e2e/sealed", registry.addr);
    let (identity_file, public) = podsnap_checkpoint_image::crypt::generate();

    // A recipient that is no age key: refused before anything is sent.
    let err = images::push(
        &registry.config(),
        &source_pins,
        &taken,
        &repository,
        "uid-1",
        Some(&["age1nope".to_string()]),
        None,
    )
    .await
    .unwrap_err();
    assert!(err.contains("spec.storage.image.encryption"), "{err}");

    let pushed = images::push(
        &registry.config(),
        &source_pins,
        &taken,
        &repository,
        "uid-1",
        Some(std::slice::from_ref(&public)),
        None,
    )
    .await
    .unwrap();
    // Neither the record (the pod's spec) nor the pages are in the clear in the registry.
    let storage = registry._dir.path().join("storage");
    let mut stack = vec![storage];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            for needle in [&b"podCheckpointUID"[..], b"pages"] {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle),
                    "{:?} in {}",
                    String::from_utf8_lossy(needle),
                    path.display()
                );
            }
        }
    }

    let target = tempfile::tempdir().unwrap();
    let dir = target.path().join("pod-checkpoints");
    std::fs::create_dir(&dir).unwrap();
    let pins_dir = target.path().join("pins");
    let keys = target.path().join("identities");
    let config = RegistryConfig {
        identity_file: Some(keys.clone()),
        ..registry.config()
    };
    let pull = || {
        images::pull(
            &config,
            &pins_dir,
            &dir,
            name,
            &pushed.reference,
            "default",
            "uid-1",
            1 << 30,
            None,
        )
    };
    // No key on this node (the optional Secret not created): refused, nothing left.
    let err = pull().await.unwrap_err();
    assert!(err.contains("no decryption key"), "{err}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    // Another key: refused, nothing left.
    let (other, _) = podsnap_checkpoint_image::crypt::generate();
    std::fs::write(&keys, other).unwrap();
    let err = pull().await.unwrap_err();
    assert!(err.contains("encrypted to other keys"), "{err}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    // Its key, beside another: pulled, the record opened, pinned to the plaintext manifest.
    std::fs::write(
        &keys,
        format!(
            "{}\n{identity_file}",
            std::fs::read_to_string(&keys).unwrap()
        ),
    )
    .unwrap();
    let outcome = pull().await.unwrap();
    assert!(matches!(outcome, PullOutcome::Pulled { .. }), "{outcome:?}");
    let pulled = dir.join(name);
    format::verify(&pulled).unwrap();
    assert_eq!(
        std::fs::read(images::record_path(&pulled)).unwrap(),
        std::fs::read(images::record_path(&taken)).unwrap()
    );
    assert_eq!(
        pins::lookup(&pins_dir, &pulled).unwrap(),
        Pin::Pinned(format::manifest_sha256(&taken).unwrap())
    );
}

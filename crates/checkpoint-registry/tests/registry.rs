//! Push and pull against a real registry: Debian's docker-registry (distribution 2.8), which
//! `hack/install.sh` installs, started by each test on a free loopback port with storage of its
//! own. A missing binary fails the test.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use podsnap_checkpoint_format::{self as format, ContainerEntry, Manifest, PodEntry};
use podsnap_checkpoint_registry::{Access, Error, PushOptions, Registry, Retry, reference};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// Retries with short pauses: the tests' registries fail on purpose.
const QUICK: Retry = Retry {
    attempts: 3,
    first_delay: Duration::from_millis(20),
    max_delay: Duration::from_millis(50),
};

/// A registry of the test's own; stopped (by its pid) when dropped.
struct TestRegistry {
    child: Child,
    addr: String,
    storage: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestRegistry {
    fn start() -> Self {
        Self::start_with("")
    }

    /// A registry whose config has `extra` appended (top-level YAML sections).
    fn start_with(extra: &str) -> Self {
        Self::start_config("", extra)
    }

    /// A registry whose `http` section has `http_extra` appended (indented YAML keys).
    fn start_http_with(http_extra: &str) -> Self {
        Self::start_config(http_extra, "")
    }

    fn start_config(http_extra: &str, extra: &str) -> Self {
        assert!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: run hack/install.sh (Debian package docker-registry)"
        );
        let dir = tempfile::tempdir().unwrap();
        let storage = dir.path().join("storage");
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
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{http_extra}{extra}",
                storage.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let registry = TestRegistry {
            child,
            addr,
            storage,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&registry.addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the registry did not listen on {}",
                registry.addr
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    fn client(&self) -> Registry {
        Registry::new(&Access {
            insecure: vec![self.addr.clone()],
            credentials: None,
            retry: QUICK,
            ca_certificates: Vec::new(),
        })
        .unwrap()
    }

    /// The stored bytes of blob `digest`.
    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bytes that zstd cannot shrink much (a xorshift stream), so layers span several chunks.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A checkpoint of two containers and a volume, as podsnapd writes one; `web` holds `pages`.
fn sample(root: &Path, pages: &[u8]) -> Manifest {
    for (path, data) in [
        ("web/checkpoint/pages-1.img", pages),
        ("web/checkpoint/inventory.img", b"inventory"),
        ("web/rootfs-diff.tar", b"diff"),
        ("sidecar/checkpoint/pages-1.img", b"pages of the sidecar"),
        ("_volumes/cache.tar", b"a volume archive"),
    ] {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }
    let container = |name: &str| ContainerEntry {
        name: name.into(),
        id: format!("id-{name}"),
        image: "busybox".into(),
        image_ref: "sha256:x".into(),
        config: serde_json::json!({}),
    };
    let mut manifest = Manifest {
        format: format::FORMAT.into(),
        version: format::VERSION,
        minor: format::MINOR,
        created: "2026-12-02T00:00:00Z".into(),
        pod: PodEntry {
            sandbox_id: "sb".into(),
            name: "counter".into(),
            namespace: "default".into(),
            uid: "u".into(),
            runtime_handler: "podsnap".into(),
            config: serde_json::json!({}),
            ips: Vec::new(),
        },
        containers: vec![container("web"), container("sidecar")],
        criu_version: "4.1.1".into(),
        kernel: "6.1.0".into(),
        options: BTreeMap::new(),
        files: BTreeMap::new(),
        machine: None,
    };
    format::write_manifest(root, &mut manifest).unwrap();
    manifest
}

/// Every file under `root`, relative, with its bytes.
fn tree(root: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let relative = path.strip_prefix(root).unwrap().display().to_string();
                out.insert(relative, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Every directory under `root` (and itself) is 0700, every file 0600.
fn assert_root_only(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(root).unwrap().permissions().mode() & 0o7777;
    let want = if root.is_dir() { 0o700 } else { 0o600 };
    assert_eq!(mode, want, "{} has mode {mode:o}", root.display());
    if root.is_dir() {
        for entry in std::fs::read_dir(root).unwrap() {
            assert_root_only(&entry.unwrap().path());
        }
    }
}

/// The names in `dir`.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_pushed_and_pulled_is_the_same_and_a_second_push_uploads_nothing() {
    let registry = TestRegistry::start();
    let client = registry.client();
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("checkpoint");
    // 10 MiB of pages: three chunks of the web layer.
    let manifest = sample(&source, &noise(10 << 20, 7));
    let cache = work.path().join("layers.json");
    let opts = PushOptions {
        layer_cache: Some(cache.clone()),
        annotations: BTreeMap::from([("io.podsnap.kubelet.record".into(), "{}".into())]),
        ..Default::default()
    };
    let target_ref = reference(&format!("{}/podsnap/counter:ckpt-1", registry.addr)).unwrap();
    // The checkpoint's own annotations are not the caller's to replace.
    let forged = PushOptions {
        annotations: BTreeMap::from([(
            "io.podsnap.checkpoint.pod.namespace".into(),
            "other".into(),
        )]),
        ..Default::default()
    };
    let refused = client
        .push(&source, &target_ref, &forged)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("checkpoint's own"),
        "{refused}"
    );
    let pushed = client.push(&source, &target_ref, &opts).await.unwrap();
    assert_eq!(pushed.uploaded, pushed.size, "{pushed:?}");
    assert!(pushed.size > 10 << 20, "{pushed:?}");
    // The config is the checkpoint's manifest, byte for byte: its digest is what a restore pins.
    let manifest_bytes = std::fs::read(source.join(format::MANIFEST)).unwrap();
    assert_eq!(
        std::fs::read(registry.blob_path(&pushed.config_digest)).unwrap(),
        manifest_bytes
    );
    assert!(
        pushed
            .reference
            .ends_with(&format!("podsnap/counter@{}", pushed.digest)),
        "{pushed:?}"
    );
    // The registry keeps the artifact as sent: artifactType and the path annotations.
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(registry.blob_path(&pushed.digest)).unwrap())
            .unwrap();
    assert_eq!(
        stored["artifactType"],
        podsnap_checkpoint_image::ARTIFACT_TYPE
    );
    assert_eq!(stored["layers"].as_array().unwrap().len(), 3, "{stored}");
    let cache_mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&cache).unwrap().permissions());
    assert_eq!(cache_mode & 0o777, 0o600);

    // Pulled by tag and by digest, each is the checkpoint it was.
    for (name, from) in [
        ("by-tag", target_ref.clone()),
        ("by-digest", reference(&pushed.reference).unwrap()),
    ] {
        let target = work.path().join(name);
        let pulled = client
            .pull(&from, &target, 1 << 30, &Default::default())
            .await
            .unwrap();
        assert_eq!(pulled.digest, pushed.digest);
        assert_eq!(pulled.manifest, manifest);
        assert_eq!(pulled.config_digest, pushed.config_digest);
        assert_eq!(pulled.annotations["io.podsnap.kubelet.record"], "{}");
        assert_eq!(tree(&target), tree(&source), "{name}");
        format::verify(&target).unwrap();
        // A checkpoint holds the pod's memory: root-only, whatever the blobs said.
        assert_root_only(&target);
    }

    // Again, with the layer cache: the registry has every blob, nothing is sent, same digest.
    let again = client.push(&source, &target_ref, &opts).await.unwrap();
    assert_eq!(again.uploaded, 0, "{again:?}");
    assert_eq!(again.digest, pushed.digest);
    // Without it, the layers are packed and sent again, to the same bytes (deterministic).
    let uncached = PushOptions {
        layer_cache: None,
        ..opts.clone()
    };
    let fresh = client.push(&source, &target_ref, &uncached).await.unwrap();
    assert_eq!(fresh.digest, pushed.digest);
    assert!(fresh.uploaded > 0);
    // A cached layer the registry no longer has is sent again.
    let layer = stored["layers"][0]["digest"].as_str().unwrap().to_string();
    std::fs::remove_dir_all(registry.blob_path(&layer).parent().unwrap()).unwrap();
    let repaired = client.push(&source, &target_ref, &opts).await.unwrap();
    assert_eq!(repaired.digest, pushed.digest);
    assert!(repaired.uploaded > 0, "{repaired:?}");
    let target = work.path().join("after-repair");
    client
        .pull(&target_ref, &target, 1 << 30, &Default::default())
        .await
        .unwrap();
    assert_eq!(tree(&target), tree(&source));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_blob_a_wrong_digest_or_a_foreign_image_fails_the_pull_and_leaves_nothing() {
    let registry = TestRegistry::start();
    let client = registry.client();
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("checkpoint");
    sample(&source, &noise(1 << 20, 3));
    let tag = reference(&format!("{}/podsnap/tampered:1", registry.addr)).unwrap();
    let pushed = client
        .push(&source, &tag, &PushOptions::default())
        .await
        .unwrap();
    let cache = work.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let target = cache.join("checkpoint-pulled");

    // A byte of the web layer flipped in the registry's storage.
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(registry.blob_path(&pushed.digest)).unwrap())
            .unwrap();
    let web = stored["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["annotations"]["io.podsnap.checkpoint.path"] == "web")
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = registry.blob_path(&web);
    let original = std::fs::read(&blob).unwrap();
    let mut bad = original.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0x55;
    std::fs::write(&blob, &bad).unwrap();
    let err = client
        .pull(&tag, &target, 1 << 30, &Default::default())
        .await
        .unwrap_err();
    let text = err.to_string();
    // Refused for its digest (the unpacker's check, or oci-client's at the end of the stream),
    // which the message names.
    assert!(
        text.contains(&web),
        "a tampered blob was not refused for its digest: {text}"
    );
    assert!(names(&cache).is_empty(), "left behind: {:?}", names(&cache));
    std::fs::write(&blob, &original).unwrap();

    // A digest the registry does not have.
    let missing = reference(&format!(
        "{}/podsnap/tampered@sha256:{}",
        registry.addr,
        "0".repeat(64)
    ))
    .unwrap();
    let err = client
        .pull(&missing, &target, 1 << 30, &Default::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Registry { .. }), "{err:?}");
    // A tag that is not there.
    let err = client
        .pull(
            &reference(&format!("{}/podsnap/tampered:nope", registry.addr)).unwrap(),
            &target,
            1 << 30,
            &Default::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Registry { .. }), "{err:?}");

    // An ordinary image is not a checkpoint.
    let plain = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    let other = reference(&format!("{}/podsnap/not-a-checkpoint:1", registry.addr)).unwrap();
    plain
        .auth(
            &other,
            &oci_client::secrets::RegistryAuth::Anonymous,
            oci_client::RegistryOperation::Push,
        )
        .await
        .unwrap();
    plain
        .push(
            &other,
            &[oci_client::client::ImageLayer::oci_v1(
                b"not a checkpoint".to_vec(),
                None,
            )],
            oci_client::client::Config::oci_v1(b"{}".to_vec(), None),
            &oci_client::secrets::RegistryAuth::Anonymous,
            None,
        )
        .await
        .unwrap();
    let err = client
        .pull(&other, &target, 1 << 30, &Default::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("not a podsnap checkpoint image"),
        "{err}"
    );

    // More than the budget allows.
    let err = client
        .pull(&tag, &target, 1 << 10, &Default::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("budget"), "{err}");
    assert!(names(&cache).is_empty(), "left behind: {:?}", names(&cache));

    // And with everything put back, it pulls.
    client
        .pull(&tag, &target, 1 << 30, &Default::default())
        .await
        .unwrap();
    assert_eq!(tree(&target), tree(&source));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_is_down_is_a_registry_error_naming_it() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let client = Registry::new(&Access {
        insecure: vec![addr.clone()],
        credentials: None,
        retry: QUICK,
        ca_certificates: Vec::new(),
    })
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("checkpoint");
    sample(&source, b"pages");
    let tag = reference(&format!("{addr}/podsnap/down:1")).unwrap();
    let err = client
        .push(&source, &tag, &PushOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Registry { registry, .. } if *registry == addr),
        "{err:?}"
    );
    let err = client
        .pull(
            &tag,
            &work.path().join("pulled"),
            1 << 30,
            &Default::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Registry { .. }), "{err:?}");
    assert!(!work.path().join("pulled").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_that_does_not_verify_is_not_pushed() {
    let registry = TestRegistry::start();
    let client = registry.client();
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("checkpoint");
    sample(&source, &noise(1 << 20, 5));
    std::fs::write(source.join("web/rootfs-diff.tar"), b"changed").unwrap();
    let tag = reference(&format!("{}/podsnap/changed:1", registry.addr)).unwrap();
    let err = client
        .push(&source, &tag, &PushOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Image(_)) && err.to_string().contains("rootfs-diff.tar"),
        "{err:?}"
    );
    // No tag, so nothing to pull.
    let err = client
        .pull(
            &tag,
            &work.path().join("pulled"),
            1 << 30,
            &Default::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Registry { .. }) && err.to_string().contains("manifest unknown"),
        "{err}"
    );
    assert!(!work.path().join("pulled").exists());
}

/// Requests a [`FaultyProxy`] has seen, by kind, and the faults it injects.
#[derive(Debug, Default)]
struct Traffic {
    /// PATCHes (upload chunks) seen; those numbered in `fail_patch` (from 1) got a 503.
    patches: usize,
    fail_patch: Vec<usize>,
    /// Blob GETs seen; those numbered in `reset_blob_get` had their connection dropped.
    blob_gets: usize,
    reset_blob_get: Vec<usize>,
    /// Manifest GETs seen.
    manifest_gets: usize,
}

/// An HTTP/1.1 proxy in front of a registry that answers chosen requests with a 503 or drops
/// their connection, and counts them. Every other request goes to the registry on a connection
/// of its own.
struct FaultyProxy {
    addr: String,
    traffic: std::sync::Arc<std::sync::Mutex<Traffic>>,
}

impl FaultyProxy {
    async fn start(upstream: &str, traffic: Traffic) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let traffic = std::sync::Arc::new(std::sync::Mutex::new(traffic));
        let (shared, upstream) = (traffic.clone(), upstream.to_string());
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(proxy_connection(conn, upstream.clone(), shared.clone()));
            }
        });
        FaultyProxy { addr, traffic }
    }
}

async fn proxy_connection(
    mut client: tokio::net::TcpStream,
    upstream: String,
    traffic: std::sync::Arc<std::sync::Mutex<Traffic>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut pending: Vec<u8> = Vec::new();
    loop {
        // One request: its head, then Content-Length bytes of body.
        let head_end = loop {
            if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut buf = [0u8; 65536];
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        };
        let head = String::from_utf8_lossy(&pending[..head_end]).to_string();
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        let chunked =
            header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // The request's end: Content-Length bytes after the head, or the chunked body's last
        // (empty) chunk.
        let end = loop {
            if !chunked && pending.len() >= head_end + length {
                break head_end + length;
            }
            if chunked && let Some(end) = chunked_end(&pending[head_end..]) {
                break head_end + end;
            }
            let mut buf = [0u8; 65536];
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        };
        let request: Vec<u8> = pending.drain(..end).collect();
        let line = head.lines().next().unwrap_or_default().to_string();
        enum Fault {
            None,
            Unavailable,
            Reset,
        }
        let fault = {
            let mut t = traffic.lock().unwrap();
            if line.starts_with("PATCH ") {
                t.patches += 1;
                if t.fail_patch.contains(&t.patches) {
                    Fault::Unavailable
                } else {
                    Fault::None
                }
            } else if line.starts_with("GET ") && line.contains("/blobs/sha256:") {
                t.blob_gets += 1;
                if t.reset_blob_get.contains(&t.blob_gets) {
                    Fault::Reset
                } else {
                    Fault::None
                }
            } else {
                if line.starts_with("GET ") && line.contains("/manifests/") {
                    t.manifest_gets += 1;
                }
                Fault::None
            }
        };
        match fault {
            Fault::Unavailable => {
                let answer = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
                if client.write_all(answer).await.is_err() {
                    return;
                }
                continue;
            }
            Fault::Reset => return,
            Fault::None => {}
        }
        // Forwarded on a connection of its own, which the registry closes after its answer.
        let Ok(mut registry) = tokio::net::TcpStream::connect(&upstream).await else {
            return;
        };
        let first_line_end = head.find("\r\n").unwrap() + 2;
        let mut forwarded = request[..first_line_end].to_vec();
        forwarded.extend_from_slice(b"Connection: close\r\n");
        forwarded.extend_from_slice(&request[first_line_end..]);
        if registry.write_all(&forwarded).await.is_err() {
            return;
        }
        let mut answer = Vec::new();
        if registry.read_to_end(&mut answer).await.is_err()
            || client.write_all(&answer).await.is_err()
        {
            return;
        }
        // The answer says `Connection: close`: the client opens another connection.
        return;
    }
}

/// Where a chunked body that starts `body` ends, once all of it is there.
fn chunked_end(body: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let line_end = at + body.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[at..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            // No trailers: the empty line that ends the body.
            return (body.get(at..at + 2)? == b"\r\n").then_some(at + 2);
        }
        at += size + 2;
        if body.len() < at {
            return None;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_mid_upload_and_a_dropped_download_are_retried_a_404_is_not() {
    let registry = TestRegistry::start();
    let proxy = FaultyProxy::start(
        &registry.addr,
        Traffic {
            // Uploads go config, _volumes/cache.tar, sidecar, web: web's first two tries.
            fail_patch: vec![4, 5],
            // The first blob fetched (the config).
            reset_blob_get: vec![1],
            ..Default::default()
        },
    )
    .await;
    let client = Registry::new(&Access {
        insecure: vec![proxy.addr.clone()],
        credentials: None,
        retry: QUICK,
        ca_certificates: Vec::new(),
    })
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("checkpoint");
    // 10 MiB of pages: the web layer is sent in several pieces.
    sample(&source, &noise(10 << 20, 11));
    let tag = reference(&format!("{}/podsnap/flaky:1", proxy.addr)).unwrap();
    let pushed = client
        .push(&source, &tag, &PushOptions::default())
        .await
        .unwrap();
    let target = work.path().join("pulled");
    let pulled = client
        .pull(&tag, &target, 1 << 30, &Default::default())
        .await
        .unwrap();
    assert_eq!(pulled.digest, pushed.digest);
    assert_eq!(tree(&target), tree(&source));
    {
        let t = proxy.traffic.lock().unwrap();
        // Four uploads and web's two failed tries.
        assert_eq!(t.patches, 6, "{t:?}");
        assert!(t.blob_gets >= 2, "no fault was injected: {t:?}");
        // The pull was tried twice: two manifest GETs.
        assert_eq!(t.manifest_gets, 2, "{t:?}");
    }

    // Failing every time: given up after `attempts` tries, with the registry's answer.
    let proxy = FaultyProxy::start(
        &registry.addr,
        Traffic {
            fail_patch: (1..100).collect(),
            ..Default::default()
        },
    )
    .await;
    let client = Registry::new(&Access {
        insecure: vec![proxy.addr.clone()],
        credentials: None,
        retry: QUICK,
        ca_certificates: Vec::new(),
    })
    .unwrap();
    let tag = reference(&format!("{}/podsnap/down-for-good:1", proxy.addr)).unwrap();
    let err = client
        .push(&source, &tag, &PushOptions::default())
        .await
        .unwrap_err();
    assert!(
        err.is_transient() && err.to_string().contains("503"),
        "{err}"
    );
    assert_eq!(
        proxy.traffic.lock().unwrap().patches,
        QUICK.attempts as usize
    );

    // A tag that is not there is a 404: asked once, not again.
    let missing = reference(&format!("{}/podsnap/flaky:nope", proxy.addr)).unwrap();
    let err = client
        .pull(
            &missing,
            &work.path().join("missing"),
            1 << 30,
            &Default::default(),
        )
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert_eq!(proxy.traffic.lock().unwrap().manifest_gets, 1);
}

/// `s3cret:with-colon`, bcrypt (cost 4, so that the registry checks it quickly), for user
/// `podsnap`: made with Python's `crypt.crypt(..., crypt.mksalt(crypt.METHOD_BLOWFISH,
/// rounds=16))`.
const HTPASSWD: &str = "podsnap:$2b$04$AsJ5hGONhd99Vt81c1oThukojKwBfw9hQ1qE..z28rza1E7LJPeU6\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_with_basic_auth_takes_the_secrets_credentials_and_refuses_anonymous() {
    let work = tempfile::tempdir().unwrap();
    let htpasswd = work.path().join("htpasswd");
    std::fs::write(&htpasswd, HTPASSWD).unwrap();
    let registry = TestRegistry::start_with(&format!(
        "auth:\n  htpasswd:\n    realm: podsnap-test\n    path: {}\n",
        htpasswd.display()
    ));
    let source = work.path().join("checkpoint");
    sample(&source, &noise(1 << 20, 13));
    let tag = reference(&format!("{}/podsnap/private:1", registry.addr)).unwrap();
    let with = |credentials| {
        Registry::new(&Access {
            insecure: vec![registry.addr.clone()],
            credentials,
            retry: QUICK,
            ca_certificates: Vec::new(),
        })
        .unwrap()
    };
    // Anonymous: refused, and not retried as if it could pass.
    let err = with(None)
        .push(&source, &tag, &PushOptions::default())
        .await
        .unwrap_err();
    assert!(
        !err.is_transient() && err.to_string().contains("401"),
        "{err}"
    );
    // From a kubernetes.io/dockerconfigjson Secret's payload (auth = base64 of user:password).
    let secret = serde_json::json!({"auths": {
        format!("http://{}", registry.addr): {"auth": "cG9kc25hcDpzM2NyZXQ6d2l0aC1jb2xvbg=="}
    }});
    let credentials =
        podsnap_checkpoint_image::auth::credentials(secret.to_string().as_bytes(), &registry.addr)
            .unwrap()
            .expect("credentials for the registry");
    let client = with(Some(credentials.clone()));
    let pushed = client
        .push(&source, &tag, &PushOptions::default())
        .await
        .unwrap();
    let target = work.path().join("pulled");
    let pulled = client
        .pull(&tag, &target, 1 << 30, &Default::default())
        .await
        .unwrap();
    assert_eq!(pulled.digest, pushed.digest);
    assert_eq!(tree(&target), tree(&source));
    // A wrong password: refused for good.
    let wrong = podsnap_checkpoint_image::auth::Credentials {
        password: "guess".into(),
        ..credentials
    };
    let err = with(Some(wrong))
        .pull(
            &tag,
            &work.path().join("wrong"),
            1 << 30,
            &Default::default(),
        )
        .await
        .unwrap_err();
    assert!(
        !err.is_transient() && err.to_string().contains("Not authorized"),
        "{err}"
    );
    assert!(!work.path().join("wrong").exists());
}

/// Every file under `dir` whose bytes contain `marker`.
fn files_holding(dir: &Path, marker: &[u8]) -> Vec<PathBuf> {
    tree(dir)
        .into_iter()
        .filter(|(_, bytes)| bytes.windows(marker.len()).any(|w| w == marker))
        .map(|(path, _)| dir.join(path))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_checkpoint_leaves_no_plaintext_in_the_registry_and_opens_only_with_its_key() {
    use podsnap_checkpoint_image::{Identities, Recipients, crypt};
    let registry = TestRegistry::start();
    let client = registry.client();
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("checkpoint");
    // Memory holding a secret the pod had, between pages that do not compress.
    let marker = b"PODSNAP-SECRET-IN-MEMORY-7f3a";
    let mut pages = noise(2 << 20, 5);
    pages.splice(1 << 20..(1 << 20) + marker.len(), marker.iter().copied());
    sample(&source, &pages);
    let (identity_file, public) = crypt::generate();
    let opts = PushOptions {
        recipients: Some(Recipients::parse(&[public]).unwrap()),
        ..Default::default()
    };
    let tag = reference(&format!("{}/podsnap/sealed:1", registry.addr)).unwrap();
    let pushed = client.push(&source, &tag, &opts).await.unwrap();

    // The plain push of the same checkpoint would hold the marker; this one holds it nowhere:
    // not in a blob, not in the manifest, not in any file of the registry's storage.
    assert!(!files_holding(&source, marker).is_empty());
    for needle in [&marker[..], b"pages of the sidecar", b"\"namespace\""] {
        let found = files_holding(&registry.storage, needle);
        assert!(
            found.is_empty(),
            "{:?} in the registry's storage: {found:?}",
            String::from_utf8_lossy(needle)
        );
    }

    // Without a key, with another key: refused, nothing left at the target.
    let target = work.path().join("pulled");
    let err = client
        .pull(&tag, &target, 1 << 30, &Default::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no decryption key"), "{err}");
    assert!(!err.is_transient());
    let (other, _) = crypt::generate();
    let other = std::sync::Arc::new(Identities::parse(&other).unwrap());
    let err = client
        .pull(&tag, &target, 1 << 30, &other)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("encrypted to other keys"), "{err}");
    assert_eq!(names(work.path()), ["checkpoint"]);

    // With the key: the checkpoint, whole; the pin is the plaintext manifest's sha256.
    let identities = std::sync::Arc::new(Identities::parse(&identity_file).unwrap());
    let pulled = client
        .pull(&tag, &target, 1 << 30, &identities)
        .await
        .unwrap();
    assert!(pulled.encrypted);
    assert_eq!(pulled.digest, pushed.digest);
    assert_eq!(tree(&target), tree(&source));
    assert_eq!(
        pulled.manifest_sha256,
        format!("sha256:{}", format::manifest_sha256(&source).unwrap())
    );
    assert_ne!(pulled.manifest_sha256, pulled.config_digest);
    assert_root_only(&target);
}

/// A certificate authority and a certificate it signed for 127.0.0.1, made with openssl (Debian's,
/// as hack/install.sh has it): `(ca.crt, server.crt, server.key)` paths under `dir`.
fn private_ca(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let script = r#"set -e
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=podsnap-test-ca -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -subj /CN=127.0.0.1 -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
  -extfile server.ext -out server.crt 2>/dev/null
"#;
    let status = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .status()
        .expect("openssl (hack/install.sh installs it)");
    assert!(status.success(), "openssl could not make the test CA");
    (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

/// A registry on HTTPS whose certificate a private CA signed: refused while that CA is not
/// trusted (never retried as if it could pass, never sent over plain HTTP instead); pushed and
/// pulled once it is (`Access::ca_certificates`, the agents' and the CLI's `--ca-file`). A CA
/// file without a certificate is refused before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_registry_signed_by_a_private_ca_is_reached_once_that_ca_is_trusted() {
    let work = tempfile::tempdir().unwrap();
    let (ca, cert, key) = private_ca(work.path());
    let registry = TestRegistry::start_http_with(&format!(
        "  tls:\n    certificate: {}\n    key: {}\n",
        cert.display(),
        key.display()
    ));
    let source = work.path().join("checkpoint");
    sample(&source, &noise(1 << 20, 21));
    let tag = reference(&format!("{}/podsnap/tls:1", registry.addr)).unwrap();
    let with = |ca_certificates: Vec<u8>| {
        Registry::new(&Access {
            insecure: Vec::new(),
            credentials: None,
            retry: QUICK,
            ca_certificates,
        })
    };
    let err = with(Vec::new())
        .unwrap()
        .push(&source, &tag, &PushOptions::default())
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(
        format!("{err:#}").to_lowercase().contains("certificate"),
        "{err:#}"
    );
    let err = with(b"not a certificate".to_vec()).unwrap_err();
    assert!(err.to_string().contains("no PEM certificate"), "{err}");

    let client = with(std::fs::read(&ca).unwrap()).unwrap();
    let pushed = client
        .push(&source, &tag, &PushOptions::default())
        .await
        .unwrap();
    let target = work.path().join("pulled");
    let pulled = client
        .pull(&tag, &target, 1 << 30, &Default::default())
        .await
        .unwrap();
    assert_eq!(pulled.digest, pushed.digest);
    assert_eq!(tree(&target), tree(&source));
}

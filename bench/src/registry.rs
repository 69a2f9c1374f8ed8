//! `podsnap-bench registry`: a pod checkpoint through an OCI registry, in one run:
//!
//! - (a) `podsnap pod push` of the checkpoint of a pod of one container holding 1 GiB (the
//!   memtest workload of `pod`) to a registry, then `podsnap pod pull` of it into a new
//!   directory: pack (tar + zstd) while uploading, and download while unpacking and verifying
//!   every file;
//! - (b) `skopeo copy` of the same bytes: an OCI image layout holding the very blobs (a)
//!   pushed, copied to the registry and back into another layout (transfer only, no packing);
//! - (c) the zstd level: (a)'s push at levels 1, 3 (the default) and 9, its size and time.
//!
//! The registry is Debian's docker-registry (distribution 2.8) started for the run on a free
//! loopback port, storage in the work directory. Every round pushes to repositories of its own,
//! so nothing is deduplicated between rounds; every timed command starts after a `sync`. One
//! round runs first, not counted.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::checkpoint::{LONG, start_raw, sync};
use crate::node::{BUSYBOX_CRI, Cleanup, Node};
use crate::report::{Table, median, ratio, secs};
use crate::run::{Cmd, wait_for};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
const SKOPEO: &str = "skopeo";
/// Where containers/image keeps its blob info cache when run as root.
const SKOPEO_CACHE: &str = "/var/lib/containers/cache";
const MIB: u64 = 1024;

pub fn run(node: &Node, n: usize) -> Result<(), String> {
    node.check()?;
    let (_, cli) = node.check_podsnapd()?;
    for bin in [REGISTRY_BIN, "/usr/bin/skopeo"] {
        if !Path::new(bin).exists() {
            return Err(format!("{bin} is missing (hack/install.sh installs it)"));
        }
    }
    std::fs::create_dir_all(SKOPEO_CACHE).map_err(|e| format!("create {SKOPEO_CACHE}: {e}"))?;
    let mut cleanup = Cleanup::new(node);
    let dir = crate::work_dir(&mut cleanup)?;
    let registry = start_registry(&mut cleanup, &dir)?;
    println!(
        "podsnap-bench registry: N={n}, CLI {}, registry {registry} (docker-registry 2.8, storage \
         under {})",
        cli.display(),
        dir.display()
    );

    // The checkpoint: the `pod` benchmark's 1 GiB pod, checkpointed once (leave running).
    let (memtest, _) = crate::pod::build_memtest(&dir)?;
    node.crictl(["pull", BUSYBOX_CRI]).run()?;
    let pod = crate::pod::start_pod(node, &mut cleanup, &dir, "registry-pod", 1, MIB, &memtest)?;
    crate::pod::pod_memory(node, &pod)?;
    let checkpoint = dir.join("checkpoint");
    node.podsnap(["pod", "checkpoint", &pod.id, &path(&checkpoint)])
        .timeout(LONG)
        .run()?;
    let checkpoint_bytes = tree_bytes(&checkpoint)?;
    println!(
        "checkpoint: {:.1} MiB of files in {}",
        checkpoint_bytes as f64 / (1 << 20) as f64,
        checkpoint.display()
    );

    let mut podsnap_push = Vec::new();
    let mut podsnap_pull = Vec::new();
    let mut skopeo_push = Vec::new();
    let mut skopeo_pull = Vec::new();
    let mut pushed_bytes = 0;
    let mut layout: Option<PathBuf> = None;
    for round in 0..=n {
        // (a)
        let target = format!("{registry}/bench/podsnap-{round}:1");
        sync()?;
        let pushed = node
            .podsnap([
                "pod",
                "push",
                &path(&checkpoint),
                &target,
                "--insecure-registry",
                &registry,
            ])
            .timeout(LONG)
            .run()?;
        let by_digest = pushed.stdout.trim().to_string();
        let pulled = dir.join(format!("pulled-{round}"));
        sync()?;
        let pull = node
            .podsnap([
                "pod",
                "pull",
                &by_digest,
                &path(&pulled),
                "--insecure-registry",
                &registry,
            ])
            .timeout(LONG)
            .run()?;
        remove(&pulled)?;
        // (b): the layout is made once, of the blobs (a) pushed first.
        if layout.is_none() {
            let (made, bytes) = make_layout(&dir, &by_digest)?;
            layout = Some(made);
            pushed_bytes = bytes;
        }
        let layout = layout.as_ref().ok_or("no layout")?;
        let copy = format!("docker://{registry}/bench/skopeo-{round}:1");
        sync()?;
        let s_push = skopeo()
            .args([
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                &format!("oci:{}:latest", path(layout)),
                &copy,
            ])
            .timeout(LONG)
            .run()?;
        let back = dir.join(format!("skopeo-pulled-{round}"));
        sync()?;
        let s_pull = skopeo()
            .args([
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                &copy,
                &format!("oci:{}:latest", path(&back)),
            ])
            .timeout(LONG)
            .run()?;
        remove(&back)?;
        if round > 0 {
            podsnap_push.push(pushed.elapsed.as_secs_f64());
            podsnap_pull.push(pull.elapsed.as_secs_f64());
            skopeo_push.push(s_push.elapsed.as_secs_f64());
            skopeo_pull.push(s_pull.elapsed.as_secs_f64());
        }
    }

    // (c)
    let mut levels = Table::new(1, &["zstd level", "push s", "blobs MiB", "of the files"]);
    for level in [1, 3, 9] {
        let target = format!("{registry}/bench/level-{level}:1");
        sync()?;
        let done = node
            .podsnap([
                "pod",
                "push",
                &path(&checkpoint),
                &target,
                "--insecure-registry",
                &registry,
                "--level",
                &level.to_string(),
            ])
            .timeout(LONG)
            .run()?;
        let bytes = image_bytes(&dir, done.stdout.trim())?;
        levels.row(vec![
            level.to_string(),
            secs(done.elapsed.as_secs_f64()),
            format!("{:.1}", bytes as f64 / (1 << 20) as f64),
            format!("{:.1}%", 100.0 * bytes as f64 / checkpoint_bytes as f64),
        ]);
    }
    drop(cleanup);

    let (pp, pl, sp, sl) = (
        median(&podsnap_push),
        median(&podsnap_pull),
        median(&skopeo_push),
        median(&skopeo_pull),
    );
    println!(
        "\n1 GiB pod checkpoint ({:.1} MiB of files, {:.1} MiB of blobs at the default level), median of {n}, seconds:",
        checkpoint_bytes as f64 / (1 << 20) as f64,
        pushed_bytes as f64 / (1 << 20) as f64
    );
    let mut table = Table::new(1, &["", "push", "pull", "push+pull"]);
    table.row(vec![
        "podsnap pod push / pull (packs, verifies)".into(),
        secs(pp),
        secs(pl),
        secs(pp + pl),
    ]);
    table.row(vec![
        "skopeo copy, same blobs (transfer only)".into(),
        secs(sp),
        secs(sl),
        secs(sp + sl),
    ]);
    print!("{}", table.render());
    println!("\nzstd level (one push each):");
    print!("{}", levels.render());
    println!(
        "{}",
        ratio(
            "podsnap push+pull / skopeo copy both ways",
            pp + pl,
            sp + sl,
            Some(1.2)
        )
    );
    println!("{}", ratio("podsnap push / skopeo push", pp, sp, None));
    println!("{}", ratio("podsnap pull / skopeo pull", pl, sl, None));
    Ok(())
}

/// `skopeo` with an empty blob info cache of its own (a tmpfs over /var/lib/containers/cache
/// in a mount namespace of its own): containers/image remembers where it has seen a blob and
/// would mount it from the previous round's repository instead of sending it.
fn skopeo() -> Cmd {
    Cmd::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &format!(
            "mount -t tmpfs -o mode=0700 podsnap-bench {SKOPEO_CACHE} && exec {SKOPEO} \"$@\""
        ),
        "skopeo",
    ])
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn remove(dir: &Path) -> Result<(), String> {
    std::fs::remove_dir_all(dir).map_err(|e| format!("remove {}: {e}", dir.display()))
}

/// Starts docker-registry on a free loopback port, storage under `dir`; returns `host:port`.
fn start_registry(cleanup: &mut Cleanup, dir: &Path) -> Result<String, String> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("a free port: {e}"))?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.join("registry").display()
        ),
    )
    .map_err(|e| format!("write {}: {e}", config.display()))?;
    start_raw(
        cleanup,
        dir,
        "registry",
        &format!(
            "exec {REGISTRY_BIN} serve {} >{} 2>&1",
            config.display(),
            dir.join("registry.log").display()
        ),
    )?;
    wait_for(
        &format!("the registry to listen on {addr}"),
        Duration::from_secs(20),
        || Ok(std::net::TcpStream::connect(&addr).ok().map(|_| ())),
    )?;
    Ok(addr)
}

/// The stored bytes of blob `digest` in the run's registry.
fn blob(dir: &Path, digest: &str) -> Result<PathBuf, String> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64)
        .ok_or(format!("not a sha256 digest: {digest}"))?;
    Ok(dir
        .join("registry/docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data"))
}

/// The image manifest `reference` (`...@sha256:...`) names, from the registry's storage.
fn manifest(dir: &Path, reference: &str) -> Result<serde_json::Value, String> {
    let digest = reference.split_once('@').map(|(_, d)| d).ok_or(format!(
        "push printed {reference:?}, not a reference by digest"
    ))?;
    let file = blob(dir, digest)?;
    let bytes = std::fs::read(&file).map_err(|e| format!("read {}: {e}", file.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", file.display()))
}

/// The total size of the image's config and layers.
fn image_bytes(dir: &Path, reference: &str) -> Result<u64, String> {
    let m = manifest(dir, reference)?;
    let size = |d: &serde_json::Value| d["size"].as_u64().unwrap_or(0);
    Ok(size(&m["config"])
        + m["layers"]
            .as_array()
            .map_or(0, |l| l.iter().map(size).sum()))
}

/// An OCI image layout (`<dir>/layout`) holding the layers of the checkpoint image `reference`
/// as ordinary zstd layers, with a minimal image config; returns it and the blobs' total size.
fn make_layout(dir: &Path, reference: &str) -> Result<(PathBuf, u64), String> {
    let m = manifest(dir, reference)?;
    let layout = dir.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| format!("create {}: {e}", blobs.display()))?;
    let write = |name: &Path, bytes: &[u8]| {
        std::fs::write(name, bytes).map_err(|e| format!("write {}: {e}", name.display()))
    };
    let mut layers = Vec::new();
    let mut total = 0;
    for layer in m["layers"].as_array().ok_or("the image has no layers")? {
        let digest = layer["digest"].as_str().ok_or("a layer without digest")?;
        let size = layer["size"].as_u64().ok_or("a layer without size")?;
        let to = blobs.join(&digest["sha256:".len()..]);
        std::fs::copy(blob(dir, digest)?, &to).map_err(|e| format!("copy {digest}: {e}"))?;
        total += size;
        layers.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
            "digest": digest,
            "size": size,
        }));
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []},
    }))
    .map_err(|e| e.to_string())?;
    let (config_digest, config_size) = put(&blobs, &config)?;
    total += config_size;
    let image = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layers,
    }))
    .map_err(|e| e.to_string())?;
    let (image_digest, image_size) = put(&blobs, &image)?;
    write(
        &layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": image_digest,
            "size": image_size,
            "annotations": {"org.opencontainers.image.ref.name": "latest"},
        }],
    }))
    .map_err(|e| e.to_string())?;
    write(&layout.join("index.json"), &index)?;
    Ok((layout, total))
}

/// Writes `bytes` as a blob of the layout; returns its digest and size.
fn put(blobs: &Path, bytes: &[u8]) -> Result<(String, u64), String> {
    use sha2::Digest;
    let hex: String = sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let file = blobs.join(&hex);
    std::fs::write(&file, bytes).map_err(|e| format!("write {}: {e}", file.display()))?;
    Ok((format!("sha256:{hex}"), bytes.len() as u64))
}

/// The total size of the files under `root`.
fn tree_bytes(root: &Path) -> Result<u64, String> {
    let mut total = 0;
    for entry in std::fs::read_dir(root).map_err(|e| format!("read {}: {e}", root.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let meta = entry.metadata().map_err(|e| e.to_string())?;
        total += if meta.is_dir() {
            tree_bytes(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

use super::*;
use format::{ContainerEntry, FORMAT, MINOR, PodEntry, VERSION};

/// A checkpoint of two containers and a volume, written and hashed as podsnapd writes one.
fn sample(root: &Path) -> Manifest {
    for (path, data) in [
        ("web/checkpoint/pages-1.img", &b"pages of web"[..]),
        ("web/checkpoint/inventory.img", b"inventory"),
        ("web/rootfs-diff.tar", b"diff"),
        ("sidecar/checkpoint/pages-1.img", b"pages of the sidecar"),
        ("_volumes/cache.tar", b"a volume archive"),
    ] {
        let path = root.join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, data).unwrap();
    }
    let container = |name: &str| ContainerEntry {
        name: name.into(),
        id: format!("id-{name}"),
        image: "busybox".into(),
        image_ref: "sha256:x".into(),
        config: serde_json::json!({}),
    };
    let mut manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        minor: MINOR,
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

/// The image of the checkpoint at `root`: its manifest, config and layer blobs.
fn pack(root: &Path) -> (ImageManifest, Vec<u8>, Vec<Vec<u8>>) {
    pack_sealed(root, None)
}

/// The image of the checkpoint at `root`, sealed to `recipients` if any.
fn pack_sealed(
    root: &Path,
    recipients: Option<&Recipients>,
) -> (ImageManifest, Vec<u8>, Vec<Vec<u8>>) {
    let (manifest, layers) = plan(root).unwrap();
    let (mut config_bytes, mut config_descriptor) = config(root).unwrap();
    if let Some(r) = recipients {
        (config_bytes, config_descriptor) = seal_config(&config_bytes, r).unwrap();
    }
    let mut blobs = Vec::new();
    let mut descriptors = Vec::new();
    for layer in &layers {
        let mut blob = Vec::new();
        descriptors.push(write_layer(layer, &mut blob, DEFAULT_LEVEL, recipients).unwrap());
        blobs.push(blob);
    }
    (
        ImageManifest::new(&manifest, config_descriptor, descriptors),
        config_bytes,
        blobs,
    )
}

fn unpack_blobs(
    image: &ImageManifest,
    config: &[u8],
    blobs: &[Vec<u8>],
    target: &Path,
) -> Result<Manifest> {
    unpack_with(image, config, blobs, target, &Identities::none())
}

fn unpack_with(
    image: &ImageManifest,
    config: &[u8],
    blobs: &[Vec<u8>],
    target: &Path,
    identities: &Identities,
) -> Result<Manifest> {
    unpack(
        image,
        config,
        blobs.iter().map(|b| &b[..]),
        target,
        1 << 20,
        identities,
    )
    .map(|(manifest, _)| manifest)
}

/// Nothing but `target` (or nothing at all) in `parent`: no staging directory left.
fn only(parent: &Path, target: Option<&str>) {
    let mut names: Vec<String> = fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        target.into_iter().map(String::from).collect::<Vec<_>>()
    );
}

#[test]
fn a_checkpoint_is_one_layer_per_container_and_per_volume_and_comes_back_whole() {
    let source = tempfile::tempdir().unwrap();
    let written = sample(source.path());
    let (image, config, blobs) = pack(source.path());
    assert_eq!(image.artifact_type, ARTIFACT_TYPE);
    assert_eq!(image.config.media_type, CONFIG);
    assert_eq!(
        image.config.digest,
        format!("sha256:{}", format::manifest_sha256(source.path()).unwrap()),
        "the config is the manifest's bytes: its digest is what a restore pins"
    );
    let paths: Vec<(&str, &str)> = image
        .layers
        .iter()
        .map(|l| {
            (
                l.media_type.as_str(),
                l.annotations[PATH_ANNOTATION].as_str(),
            )
        })
        .collect();
    assert_eq!(
        paths,
        [
            (VOLUME_LAYER, "_volumes/cache.tar"),
            (CONTAINER_LAYER, "sidecar"),
            (CONTAINER_LAYER, "web"),
        ]
    );
    assert_eq!(
        image.annotations["org.criu.checkpoint.criu.version"],
        "4.1.1"
    );
    // The image manifest survives a registry's round trip through JSON.
    let json = serde_json::to_vec(&image).unwrap();
    assert_eq!(ImageManifest::parse(&json).unwrap(), image);

    let dest = tempfile::tempdir().unwrap();
    let target = dest.path().join("checkpoint");
    let restored = unpack_blobs(&image, &config, &blobs, &target).unwrap();
    assert_eq!(restored, written);
    for file in written.files.keys() {
        assert_eq!(
            fs::read(target.join(file)).unwrap(),
            fs::read(source.path().join(file)).unwrap(),
            "{file}"
        );
        let mode = fs::metadata(target.join(file)).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }
    only(dest.path(), Some("checkpoint"));
}

#[test]
fn packing_twice_gives_the_same_blobs() {
    let source = tempfile::tempdir().unwrap();
    sample(source.path());
    // A name longer than a tar header holds (a GNU long name entry).
    let long = format!("web/checkpoint/{}.img", "x".repeat(120));
    fs::write(source.path().join(&long), b"long").unwrap();
    let mut manifest: Manifest =
        serde_json::from_slice(&fs::read(source.path().join(MANIFEST)).unwrap()).unwrap();
    fs::remove_file(source.path().join(MANIFEST)).unwrap();
    format::write_manifest(source.path(), &mut manifest).unwrap();
    let (first, config, blobs) = pack(source.path());
    // The same checkpoint elsewhere, its files with other modes and times: the same blobs.
    let copy = tempfile::tempdir().unwrap();
    for file in manifest.files.keys().chain([&MANIFEST.to_string()]) {
        let to = copy.path().join(file);
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(source.path().join(file), &to).unwrap();
        fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let earlier = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1 << 30);
        fs::File::options()
            .write(true)
            .open(&to)
            .unwrap()
            .set_modified(earlier)
            .unwrap();
    }
    let (second, _, second_blobs) = pack(copy.path());
    assert_eq!(first, second);
    assert_eq!(blobs, second_blobs);
    // And the long name comes back.
    let dest = tempfile::tempdir().unwrap();
    let target = dest.path().join("checkpoint");
    unpack_blobs(&first, &config, &blobs, &target).unwrap();
    assert_eq!(fs::read(target.join(&long)).unwrap(), b"long");
}

#[test]
fn a_changed_blob_or_config_is_refused_and_leaves_nothing() {
    let source = tempfile::tempdir().unwrap();
    sample(source.path());
    let (image, config, blobs) = pack(source.path());
    let dest = tempfile::tempdir().unwrap();
    let target = dest.path().join("checkpoint");

    // A flipped byte anywhere in a layer: the digest says so.
    for layer in 0..blobs.len() {
        for at in [0, blobs[layer].len() / 2, blobs[layer].len() - 1] {
            let mut tampered = blobs.clone();
            tampered[layer][at] ^= 0x20;
            let err = unpack_blobs(&image, &config, &tampered, &target).unwrap_err();
            assert!(matches!(err, Error::Digest { .. }), "{err}");
            only(dest.path(), None);
        }
    }
    // A layer with a byte appended or cut off.
    let mut longer = blobs.clone();
    longer[0].push(0);
    let err = unpack_blobs(&image, &config, &longer, &target).unwrap_err();
    assert!(matches!(err, Error::Digest { .. }), "{err}");
    let mut shorter = blobs.clone();
    shorter[2].pop();
    assert!(unpack_blobs(&image, &config, &shorter, &target).is_err());
    // Another config than the descriptor's.
    let mut other = config.clone();
    other[10] ^= 0x01;
    let err = unpack_blobs(&image, &other, &blobs, &target).unwrap_err();
    assert!(matches!(err, Error::Digest { .. }), "{err}");
    // A layer missing.
    let mut fewer = image.clone();
    fewer.layers.pop();
    let err = unpack_blobs(&fewer, &config, &blobs[..2], &target).unwrap_err();
    assert!(
        matches!(err, Error::Incomplete(ref files) if files.len() == 3),
        "{err}"
    );
    only(dest.path(), None);
    // The target exists: never unpacked over.
    fs::create_dir(&target).unwrap();
    let err = unpack_blobs(&image, &config, &blobs, &target).unwrap_err();
    assert!(matches!(err, Error::Exists(_)), "{err}");
}

#[test]
fn an_image_that_is_not_a_podsnap_checkpoint_is_refused() {
    let source = tempfile::tempdir().unwrap();
    sample(source.path());
    let (image, _, _) = pack(source.path());
    let mut other = serde_json::to_value(&image).unwrap();
    other["artifactType"] = "application/vnd.cncf.helm.chart.v1".into();
    let err = ImageManifest::parse(&serde_json::to_vec(&other).unwrap()).unwrap_err();
    assert!(matches!(err, Error::NotACheckpoint(_)), "{err}");
    assert!(matches!(
        ImageManifest::parse(b"{}"),
        Err(Error::NotACheckpoint(_))
    ));
    // Digests that are not sha256 hex (they would go into URLs), sizes that overflow a sum, a
    // config too large to hold: refused before any blob is asked for.
    let good = serde_json::to_value(&image).unwrap();
    for (pointer, value) in [
        ("/layers/0/digest", serde_json::json!("sha256:../../etc")),
        ("/layers/0/digest", serde_json::json!("sha512:00")),
        (
            "/config/digest",
            serde_json::json!(format!("sha256:{}", "A".repeat(64))),
        ),
        ("/layers/0/size", serde_json::json!(u64::MAX)),
        ("/config/size", serde_json::json!(MAX_CONFIG + 1)),
    ] {
        let mut bad = good.clone();
        *bad.pointer_mut(pointer).unwrap() = value.clone();
        let err = ImageManifest::parse(&serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(
            matches!(err, Error::NotACheckpoint(_)),
            "{pointer}={value}: {err}"
        );
    }
    assert_eq!(
        ImageManifest::parse(&serde_json::to_vec(&good).unwrap())
            .unwrap()
            .size(),
        image.config.size + image.layers.iter().map(|l| l.size).sum::<u64>()
    );
}

/// A tar entry of a crafted layer: path, type, data.
type Entry<'a> = (&'a str, tar::EntryType, &'a [u8]);

/// A layer holding `entries` (path, type, data), compressed as podsnap writes layers, and the
/// image around it, with the right digests: only the entries are wrong.
fn crafted(
    image: &ImageManifest,
    layer_path: &str,
    entries: &[Entry<'_>],
) -> (ImageManifest, Vec<u8>) {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, kind, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(*kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o600);
        if *kind == tar::EntryType::Symlink || *kind == tar::EntryType::Link {
            header.set_size(0);
            builder
                .append_link(&mut header, path, "/etc/shadow")
                .unwrap();
        } else {
            // Paths with `..` or a leading `/` are written raw: tar's writer refuses them.
            let raw: Vec<u8> = match path.strip_suffix("\\xff") {
                Some(prefix) => [prefix.as_bytes(), &[0xff]].concat(),
                None => path.as_bytes().to_vec(),
            };
            let name = header.as_old_mut();
            name.name[..raw.len()].copy_from_slice(&raw);
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
    }
    let blob = zstd::encode_all(&builder.into_inner().unwrap()[..], 3).unwrap();
    let mut image = image.clone();
    let layer = image
        .layers
        .iter_mut()
        .find(|l| l.annotations[PATH_ANNOTATION] == layer_path)
        .unwrap();
    layer.digest = format!("sha256:{}", hex(&Sha256::digest(&blob)));
    layer.size = blob.len() as u64;
    (image, blob)
}

#[test]
fn a_layer_may_hold_only_listed_regular_files_under_its_own_path_once() {
    let source = tempfile::tempdir().unwrap();
    sample(source.path());
    let (image, config, blobs) = pack(source.path());
    let dest = tempfile::tempdir().unwrap();
    let target = dest.path().join("checkpoint");
    let regular = tar::EntryType::Regular;
    let kind = |k: tar::EntryType| vec![("web/checkpoint/pages-1.img", k, &b""[..])];
    let cases: Vec<(&str, Vec<Entry<'_>>, &str)> = vec![
        ("web", kind(tar::EntryType::Symlink), "not a regular file"),
        ("web", kind(tar::EntryType::Link), "not a regular file"),
        ("web", kind(tar::EntryType::Char), "not a regular file"),
        ("web", kind(tar::EntryType::Fifo), "not a regular file"),
        ("web", kind(tar::EntryType::Directory), "not a regular file"),
        (
            "web",
            vec![("web/../../etc/cron.d/x", regular, b"* * * * * root sh")],
            "leaves the checkpoint",
        ),
        (
            "web",
            vec![("/etc/cron.d/x", regular, b"x")],
            "leaves the checkpoint",
        ),
        (
            "web",
            vec![("web//rootfs-diff.tar", regular, b"diff")],
            "not a plain path",
        ),
        (
            "web",
            vec![("web/./rootfs-diff.tar", regular, b"diff")],
            "not a plain path",
        ),
        ("web", vec![("web/\\xff", regular, b"x")], "not UTF-8"),
        // another layer's file (web's layer comes after sidecar's), a name that only starts
        // like the layer's, a file the manifest does not list
        (
            "sidecar",
            vec![("web/rootfs-diff.tar", regular, b"diff")],
            "outside the layer's path",
        ),
        (
            "web",
            vec![("websocket/x", regular, b"x")],
            "outside the layer's path",
        ),
        (
            "web",
            vec![("web/checkpoint/extra.img", regular, b"x")],
            "not in the checkpoint's manifest",
        ),
        (
            "_volumes/cache.tar",
            vec![("_volumes/other.tar", regular, b"x")],
            "outside the layer's path",
        ),
        (
            "web",
            vec![
                ("web/rootfs-diff.tar", regular, b"diff"),
                ("web/rootfs-diff.tar", regular, b"diff"),
            ],
            "comes twice",
        ),
    ];
    for (layer_path, entries, reason) in cases {
        let (bad_image, blob) = crafted(&image, layer_path, &entries);
        let index = image
            .layers
            .iter()
            .position(|l| l.annotations[PATH_ANNOTATION] == layer_path)
            .unwrap();
        let mut bad_blobs = blobs.clone();
        bad_blobs[index] = blob;
        let err = unpack_blobs(&bad_image, &config, &bad_blobs, &target).unwrap_err();
        assert!(
            matches!(err, Error::BadEntry { .. }) && err.to_string().contains(reason),
            "{layer_path} {:?}: {err}",
            entries.iter().map(|e| e.0).collect::<Vec<_>>()
        );
        only(dest.path(), None);
    }
    assert!(!Path::new("/etc/cron.d/x").exists());
}

#[test]
fn an_image_larger_than_the_budget_is_refused() {
    let source = tempfile::tempdir().unwrap();
    sample(source.path());
    let (image, config, blobs) = pack(source.path());
    let dest = tempfile::tempdir().unwrap();
    let target = dest.path().join("checkpoint");
    let err = unpack(
        &image,
        &config[..],
        blobs.iter().map(|b| &b[..]),
        &target,
        20,
        &Identities::none(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err}");
    only(dest.path(), None);
}

#[test]
fn only_a_verified_checkpoint_is_packed() {
    // A file missing, or one the manifest does not list: refused by the plan.
    let source = tempfile::tempdir().unwrap();
    sample(source.path());
    fs::remove_file(source.path().join("web/rootfs-diff.tar")).unwrap();
    assert!(matches!(plan(source.path()), Err(Error::Format(_))));
    let source = tempfile::tempdir().unwrap();
    sample(source.path());
    fs::write(source.path().join("web/extra"), b"unlisted").unwrap();
    assert!(matches!(plan(source.path()), Err(Error::Format(_))));
    // A file whose bytes changed: the plan does not hash (the packer does), and the layer
    // holding it fails as it is packed.
    let source = tempfile::tempdir().unwrap();
    sample(source.path());
    fs::write(source.path().join("web/rootfs-diff.tar"), b"changed").unwrap();
    let (_, layers) = plan(source.path()).unwrap();
    let web = layers.iter().find(|l| l.path == "web").unwrap();
    let err = write_layer(web, std::io::sink(), DEFAULT_LEVEL, None).unwrap_err();
    assert!(
        matches!(&err, Error::Changed { path, .. } if path == "web/rootfs-diff.tar"),
        "{err}"
    );
}

#[test]
fn right_names_with_other_contents_fail_verification() {
    let source = tempfile::tempdir().unwrap();
    sample(source.path());
    let (image, config, blobs) = pack(source.path());
    let regular = tar::EntryType::Regular;
    // The web layer with the right names, one file's bytes not the manifest's sha256.
    let (bad_image, blob) = crafted(
        &image,
        "web",
        &[
            ("web/checkpoint/inventory.img", regular, b"inventory"),
            ("web/checkpoint/pages-1.img", regular, b"pages of evil"),
            ("web/rootfs-diff.tar", regular, b"diff"),
        ],
    );
    let mut bad_blobs = blobs.clone();
    bad_blobs[2] = blob;
    let dest = tempfile::tempdir().unwrap();
    let target = dest.path().join("checkpoint");
    let err = unpack_blobs(&bad_image, &config, &bad_blobs, &target).unwrap_err();
    assert!(
        matches!(err, Error::Format(format::Error::Modified { .. })),
        "{err}"
    );
    only(dest.path(), None);
}

#[test]
fn layers_that_name_no_part_of_the_checkpoint_or_a_huge_header_are_refused() {
    let source = tempfile::tempdir().unwrap();
    sample(source.path());
    let (image, config, blobs) = pack(source.path());
    let dest = tempfile::tempdir().unwrap();
    let target = dest.path().join("checkpoint");
    let refused = |image: &ImageManifest, blobs: &[Vec<u8>], reason: &str| {
        let err = unpack_blobs(image, &config, blobs, &target).unwrap_err();
        assert!(err.to_string().contains(reason), "{reason}: {err}");
        only(dest.path(), None);
    };
    let mut other = image.clone();
    other.layers[2].media_type = "application/vnd.oci.image.layer.v1.tar+gzip".into();
    refused(&other, &blobs, "not a podsnap checkpoint layer");
    let mut other = image.clone();
    other.layers[2].annotations.clear();
    refused(&other, &blobs, "names no container or volume archive");
    for path in ["db", "_volumes/../web", "_volumes/", "_volumes/a/b.tar"] {
        let mut other = image.clone();
        other.layers[0]
            .annotations
            .insert(PATH_ANNOTATION.into(), path.into());
        refused(&other, &blobs, "names no container or volume archive");
    }
    // A config bigger than any podsnap manifest.
    let mut other = image.clone();
    other.config.size = MAX_CONFIG + 1;
    refused(&other, &blobs, "a config of");

    // A GNU long name of 64 MiB (a few KiB compressed), which tar would read into memory: the
    // layer's cap ends it first.
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::GNULongName);
    let huge = vec![b'a'; 64 << 20];
    header.set_size(huge.len() as u64);
    header.as_old_mut().name[..13].copy_from_slice(b"././@LongLink");
    header.set_cksum();
    builder.append(&header, &huge[..]).unwrap();
    let blob = zstd::encode_all(&builder.into_inner().unwrap()[..], 3).unwrap();
    assert!(blob.len() < 1 << 20);
    let mut bomb = image.clone();
    bomb.layers[2].digest = format!("sha256:{}", hex(&Sha256::digest(&blob)));
    bomb.layers[2].size = blob.len() as u64;
    let mut bomb_blobs = blobs.clone();
    bomb_blobs[2] = blob;
    assert!(unpack_blobs(&bomb, &config, &bomb_blobs, &target).is_err());
    only(dest.path(), None);
}

#[test]
fn a_file_changed_after_planning_is_not_packed() {
    let source = tempfile::tempdir().unwrap();
    sample(source.path());
    let (_, layers) = plan(source.path()).unwrap();
    let web = layers.iter().find(|l| l.path == "web").unwrap();
    for changed in [&b"DIFF"[..], b"a longer diff"] {
        fs::write(source.path().join("web/rootfs-diff.tar"), changed).unwrap();
        let err = write_layer(web, Vec::new(), DEFAULT_LEVEL, None).unwrap_err();
        assert!(matches!(err, Error::Changed { .. }), "{err}");
    }
}

#[test]
fn an_encrypted_image_holds_nothing_in_the_clear_and_opens_only_with_its_key() {
    let source = tempfile::tempdir().unwrap();
    let written = sample(source.path());
    let (identity_file, public) = crypt::generate();
    let identities = Identities::parse(&identity_file).unwrap();
    let recipients = Recipients::parse(&[public]).unwrap();
    let (image, config, blobs) = pack_sealed(source.path(), Some(&recipients));
    assert!(image.encrypted());
    assert_eq!(image.annotations[crypt::ANNOTATION], "age");
    assert!(image.layers.iter().all(|l| l.media_type.ends_with("+age")));
    // Not a byte of the pod in the registry's blobs: page content, file names, the manifest.
    for blob in blobs.iter().chain(std::iter::once(&config)) {
        for marker in [&b"pages of"[..], b"sidecar", b"podsnap", b"counter"] {
            assert!(
                !blob.windows(marker.len()).any(|w| w == marker),
                "{:?} in a sealed blob",
                String::from_utf8_lossy(marker)
            );
        }
    }
    let parsed = ImageManifest::parse(&serde_json::to_vec(&image).unwrap()).unwrap();
    assert_eq!(parsed, image);

    let dest = tempfile::tempdir().unwrap();
    let target = dest.path().join("checkpoint");
    // No key, another key: refused before anything is unpacked; nothing left.
    let err = unpack_blobs(&image, &config, &blobs, &target).unwrap_err();
    assert!(err.to_string().contains("no decryption key"), "{err}");
    only(dest.path(), None);
    let (other, _) = crypt::generate();
    let other = Identities::parse(&other).unwrap();
    let err = unpack_with(&image, &config, &blobs, &target, &other).unwrap_err();
    assert!(err.to_string().contains("encrypted to other keys"), "{err}");
    only(dest.path(), None);

    // The key: the checkpoint comes back whole, and the pin is the plaintext manifest's.
    let (manifest, pin) = unpack(
        &image,
        &config[..],
        blobs.iter().map(|b| &b[..]),
        &target,
        1 << 20,
        &identities,
    )
    .unwrap();
    assert_eq!(manifest, written);
    assert_eq!(
        pin,
        format!("sha256:{}", format::manifest_sha256(source.path()).unwrap())
    );
    assert_eq!(
        fs::read(target.join("web/checkpoint/pages-1.img")).unwrap(),
        b"pages of web"
    );
}

#[test]
fn a_tampered_or_mixed_encrypted_image_is_refused() {
    let source = tempfile::tempdir().unwrap();
    sample(source.path());
    let (identity_file, public) = crypt::generate();
    let identities = Identities::parse(&identity_file).unwrap();
    let recipients = Recipients::parse(&[public]).unwrap();
    let (image, config, blobs) = pack_sealed(source.path(), Some(&recipients));
    let dest = tempfile::tempdir().unwrap();
    let target = dest.path().join("checkpoint");

    // A flipped byte in a sealed layer: its digest says so, and nothing is left.
    let mut tampered = blobs.clone();
    let last = tampered[2].len() - 20;
    tampered[2][last] ^= 1;
    let err = unpack_with(&image, &config, &tampered, &target, &identities).unwrap_err();
    assert!(matches!(err, Error::Digest { .. }), "{err}");
    only(dest.path(), None);

    // A plain layer in an encrypted image is refused as the manifest is parsed.
    let (plain, _, _) = pack(source.path());
    let mut mixed = image.clone();
    mixed.layers[0] = plain.layers[0].clone();
    let err = ImageManifest::parse(&serde_json::to_vec(&mixed).unwrap()).unwrap_err();
    assert!(err.to_string().contains("is not encrypted"), "{err}");

    // A sealed layer re-sealed by someone holding only the public key, with its descriptor
    // rewritten: the image manifest's digest (which names the image) changes, and within an
    // image whose descriptors were forged, the layer must still decrypt to listed files.
    let (other_file, other_public) = crypt::generate();
    let _ = other_file;
    let other = Recipients::parse(&[other_public]).unwrap();
    let (_, layers) = plan(source.path()).unwrap();
    let mut forged_blob = Vec::new();
    let forged = write_layer(&layers[2], &mut forged_blob, DEFAULT_LEVEL, Some(&other)).unwrap();
    let mut forged_image = image.clone();
    forged_image.layers[2] = forged;
    let mut forged_blobs = blobs.clone();
    forged_blobs[2] = forged_blob;
    let err = unpack_with(&forged_image, &config, &forged_blobs, &target, &identities).unwrap_err();
    assert!(err.to_string().contains("encrypted to other keys"), "{err}");
    only(dest.path(), None);
}

#!/usr/bin/env python3
"""Build podsnap's local container images and push them to the local registry (stdlib only).

No container registry is reachable from the test machine, so every image that critest
(cri-tools v1.37.0) or the demo pulls is built here: one linux/amd64 layer (tar.gz) made from a
static busybox with its applets as hard links (as in the upstream busybox image), plus whatever
files, users, groups, USER and tags each image needs, pushed as an OCI image manifest.

The busybox is busybox 1.37.0 (what cri-tools' test images are built FROM) with upstream's
defconfig, built static by hack/install.sh into $PODSNAP_BIN/busybox from Debian's source
tarball. Debian's busybox-static binary does not do: its shell runs applets in-process instead
of exec'ing /bin/<applet> (FEATURE_SH_STANDALONE), so critest's MaskedPaths spec, which masks
/bin/ls and expects `sh -c ls` to fail, cannot pass with it for any runtime; and it lacks the
pgrep and ipcs applets critest runs. nginx, httpd, nonewprivs and pause are small static C
programs in hack/images/ that do what critest checks of the upstream images.

containerd resolves docker.io, registry.k8s.io, k8s.gcr.io, gcr.io, quay.io, ... to the local
registry through hosts.toml mirrors (hack/node-up.sh), so an image pulled as
`registry.k8s.io/e2e-test-images/busybox:1.29-2` is stored here as repository
`e2e-test-images/busybox`, tag `1.29-2`: the repository path is the reference without its host,
as containerd asks a mirror for it.

Images referenced by digest (critest's `test-image-digest@sha256:9700f9...`) cannot be rebuilt
byte for byte: their tag is pushed so that the repository exists, but a pull by that digest
fails (see hack/critest.sh, which skips that one spec for every runtime handler).

Every image's config carries the label io.podsnap.image.recipe, a hash of this script, the
helper sources in hack/images/, the busybox binary and the image's spec. A tag whose manifest in
the registry already carries the current recipe is left alone, so a rerun only reads manifests.

Usage: mkimage.py [--registry 127.0.0.1:5000] [--busybox PATH] [--force] [--list]
                  [--changed FILE]
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
HELPERS = os.path.join(HERE, "images")
EPOCH = 0  # every file's mtime and the image's creation time: builds are reproducible
CREATED = "1970-01-01T00:00:00Z"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ACCEPT = ", ".join([
    OCI_MANIFEST,
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
])
RECIPE_LABEL = "io.podsnap.image.recipe"

# Accounts of the upstream busybox image (busybox:1.37.0's /etc/passwd and /etc/group).
PASSWD = [
    "root:x:0:0:root:/root:/bin/sh",
    "daemon:x:1:1:daemon:/usr/sbin:/bin/false",
    "bin:x:2:2:bin:/bin:/bin/false",
    "sys:x:3:3:sys:/dev:/bin/false",
    "sync:x:4:100:sync:/bin:/bin/sync",
    "mail:x:8:8:mail:/var/spool/mail:/bin/false",
    "www-data:x:33:33:www-data:/var/www:/bin/false",
    "operator:x:37:37:Operator:/var:/bin/false",
    "nobody:x:65534:65534:nobody:/home:/bin/false",
]
GROUP = [
    "root:x:0:", "daemon:x:1:", "bin:x:2:", "sys:x:3:", "adm:x:4:", "tty:x:5:", "disk:x:6:",
    "lp:x:7:", "mail:x:8:", "kmem:x:9:", "wheel:x:10:root", "cdrom:x:11:", "dialout:x:18:",
    "floppy:x:19:", "video:x:28:", "audio:x:29:", "tape:x:32:", "www-data:x:33:",
    "operator:x:37:", "utmp:x:43:", "plugdev:x:46:", "staff:x:50:", "lock:x:54:",
    "netdev:x:82:", "users:x:100:", "nogroup:x:65534:",
]

NGINX_HTML = "<!DOCTYPE html>\n<html><head><title>Welcome to nginx!</title></head>\n" \
             "<body><h1>Welcome to nginx!</h1><p>(podsnap's stand-in web server)</p></body></html>\n"
HTTPD_HTML = "<html><body><h1>It works!</h1></body></html>\n"

# The images. "refs" are the references as tests pull them; all refs of one spec are tags of
# one image (same image ID). kind: busybox (busybox rootfs) or pause (just /pause).
IMAGES = [
    # critest's default test container image (framework.DefaultLinuxContainerImage).
    {"name": "e2e-busybox", "refs": ["registry.k8s.io/e2e-test-images/busybox:1.29-2"],
     "cmd": ["sh"]},
    # Plain busybox for ad-hoc use (crictl, node-smoke.sh).
    {"name": "busybox", "refs": ["docker.io/library/busybox:latest",
                                 "docker.io/library/busybox:1.37.0"],
     "cmd": ["sh"]},
    # The demo's image.
    {"name": "podsnap-busybox", "refs": ["127.0.0.1:5000/podsnap/busybox:latest"],
     "cmd": ["sh"]},
    # Web servers: networking, port mapping/forward, PID namespace and multi-container specs.
    {"name": "nginx", "refs": ["registry.k8s.io/e2e-test-images/nginx:1.14-2"],
     "webserver": "nginx", "cmd": ["nginx", "-g", "daemon off;"], "stop_signal": "SIGQUIT",
     "expose": ["80/tcp"]},
    {"name": "hostnet-nginx", "refs": ["gcr.io/k8s-staging-cri-tools/hostnet-nginx-amd64:latest"],
     "webserver": "nginx", "cmd": ["nginx", "-g", "daemon off;", "-p", "12003"],
     "stop_signal": "SIGQUIT", "expose": ["12003/tcp"]},
    {"name": "httpd", "refs": ["registry.k8s.io/e2e-test-images/httpd:2.4.39-4"],
     "webserver": "httpd", "cmd": ["httpd", "-p", "80"], "workdir": "/usr/local/apache2",
     "env": ["PATH=/usr/local/apache2/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "HTTPD_PREFIX=/usr/local/apache2"],
     "stop_signal": "SIGWINCH", "expose": ["80/tcp"]},
    # NoNewPrivs specs: a set-user-ID root binary printing its effective uid.
    {"name": "nonewprivs", "refs": ["registry.k8s.io/e2e-test-images/nonewprivs:1.3"],
     "nnp": True, "entrypoint": ["/usr/local/bin/nnp"]},
    # Image USER specs (cri-tools images/image-user, built with these USER values).
    {"name": "test-image-user-uid", "refs": ["gcr.io/k8s-staging-cri-tools/test-image-user-uid:latest"],
     "user": "1002", "cmd": ["sh"]},
    {"name": "test-image-user-username",
     "refs": ["gcr.io/k8s-staging-cri-tools/test-image-user-username:latest"],
     "user": "www-data", "cmd": ["sh"]},
    {"name": "test-image-user-uid-group",
     "refs": ["gcr.io/k8s-staging-cri-tools/test-image-user-uid-group:latest"],
     "user": "1003:1004", "cmd": ["sh"]},
    {"name": "test-image-user-username-group",
     "refs": ["gcr.io/k8s-staging-cri-tools/test-image-user-username-group:latest"],
     "user": "www-data:1004", "cmd": ["sh"]},
    # cri-tools images/image-predefined-group: default-user (1000) in group 50000, USER 1000.
    {"name": "test-image-predefined-group",
     "refs": ["gcr.io/k8s-staging-cri-tools/test-image-predefined-group:latest"],
     "users": [("default-user", 1000, 1000, "/home/default-user")],
     "groups": [("default-user", 1000, []), ("group-defined-in-image", 50000, ["default-user"])],
     "user": "1000", "cmd": ["sh"]},
    # cri-tools images/image-test: busybox plus one marker file, so that each image differs.
    {"name": "test-image-latest", "refs": ["gcr.io/k8s-staging-cri-tools/test-image-latest:latest"],
     "marker": "test-image-latest", "cmd": ["sh"]},
    {"name": "test-image-tag-test", "refs": ["gcr.io/k8s-staging-cri-tools/test-image-tag:test"],
     "marker": "test", "cmd": ["sh"]},
    {"name": "test-image-tag-all", "refs": ["gcr.io/k8s-staging-cri-tools/test-image-tag:all"],
     "marker": "all", "cmd": ["sh"]},
    {"name": "test-image-1", "refs": ["gcr.io/k8s-staging-cri-tools/test-image-1:latest"],
     "marker": "test-image-1", "cmd": ["sh"]},
    {"name": "test-image-2", "refs": ["gcr.io/k8s-staging-cri-tools/test-image-2:latest"],
     "marker": "test-image-2", "cmd": ["sh"]},
    {"name": "test-image-3", "refs": ["gcr.io/k8s-staging-cri-tools/test-image-3:latest"],
     "marker": "test-image-3", "cmd": ["sh"]},
    # One image, three tags ("different tags, same image").
    {"name": "test-image-tags", "refs": ["gcr.io/k8s-staging-cri-tools/test-image-tags:1",
                                         "gcr.io/k8s-staging-cri-tools/test-image-tags:2",
                                         "gcr.io/k8s-staging-cri-tools/test-image-tags:3"],
     "marker": "same-image", "cmd": ["sh"]},
    # critest pulls this one by digest only (sha256:9700f9..., upstream's manifest list), which
    # cannot be reproduced; the tag exists so the repository does.
    {"name": "test-image-digest", "refs": ["gcr.io/k8s-staging-cri-tools/test-image-digest:latest"],
     "marker": "test-image-digest", "cmd": ["sh"]},
    # Sandbox images. 3.10.2 is containerd 2.4's default (pinned) sandbox image; critest pulls
    # registry.k8s.io/pause:3.9 and k8s.gcr.io/pause:3.9 (one repository here, one image) and
    # then removes it, so 3.9 must be a different image from the pinned one.
    {"name": "pause-3.10.2", "refs": ["registry.k8s.io/pause:3.10.2"], "kind": "pause"},
    {"name": "pause-3.10.1", "refs": ["registry.k8s.io/pause:3.10.1"], "kind": "pause"},
    {"name": "pause-3.10", "refs": ["registry.k8s.io/pause:3.10"], "kind": "pause"},
    {"name": "pause-3.9", "refs": ["registry.k8s.io/pause:3.9", "k8s.gcr.io/pause:3.9"],
     "kind": "pause"},
]


def log(msg):
    print(f"[mkimage] {msg}", file=sys.stderr, flush=True)


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def split_ref(ref):
    """'registry.k8s.io/pause:3.9' -> ('pause', '3.9'): the repository path a mirror is asked."""
    name, _, tag = ref.rpartition(":")
    if "/" in tag or not name:
        name, tag = ref, "latest"
    parts = name.split("/")
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        host, parts = parts[0], parts[1:]
    else:
        host = "docker.io"
    if host == "docker.io" and len(parts) == 1:
        parts = ["library"] + parts
    return "/".join(parts), tag


class Registry:
    def __init__(self, addr):
        self.base = f"http://{addr}/v2"
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(self, method, url, data=None, headers=None):
        if not url.startswith("http"):
            url = self.base + url
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        try:
            with self.opener.open(req, timeout=60) as resp:
                return resp.status, resp.headers, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.headers, err.read()

    def ping(self):
        status, _, _ = self.request("GET", "/")
        return status == 200

    def manifest(self, repo, tag):
        status, _, body = self.request("GET", f"/{repo}/manifests/{tag}", headers={"Accept": ACCEPT})
        return json.loads(body) if status == 200 else None

    def blob(self, repo, digest):
        status, _, body = self.request("GET", f"/{repo}/blobs/{digest}")
        return body if status == 200 else None

    def has_blob(self, repo, digest):
        status, _, _ = self.request("HEAD", f"/{repo}/blobs/{digest}")
        return status == 200

    def push_blob(self, repo, data):
        digest = sha256(data)
        if self.has_blob(repo, digest):
            return digest
        status, headers, body = self.request("POST", f"/{repo}/blobs/uploads/")
        if status != 202:
            raise RuntimeError(f"starting upload to {repo}: HTTP {status} {body[:200]!r}")
        location = headers["Location"]
        if location.startswith("/"):
            location = self.base[: -len("/v2")] + location
        sep = "&" if "?" in location else "?"
        status, _, body = self.request("PUT", f"{location}{sep}digest={digest}", data=data,
                                       headers={"Content-Type": "application/octet-stream"})
        if status != 201:
            raise RuntimeError(f"uploading {digest} to {repo}: HTTP {status} {body[:200]!r}")
        return digest

    def push_manifest(self, repo, tag, manifest):
        status, _, body = self.request("PUT", f"/{repo}/manifests/{tag}", data=manifest,
                                       headers={"Content-Type": OCI_MANIFEST})
        if status != 201:
            raise RuntimeError(f"pushing {repo}:{tag}: HTTP {status} {body[:200]!r}")


class Layer:
    """A deterministic tar: sorted entries, root-owned unless told otherwise, mtime EPOCH."""

    def __init__(self):
        self.entries = {}  # path -> (TarInfo, bytes or None)

    def _info(self, path, kind, mode, uid=0, gid=0):
        info = tarfile.TarInfo(path.lstrip("/"))
        info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, EPOCH
        info.uname = info.gname = ""
        return info

    def dir(self, path, mode=0o755, uid=0, gid=0):
        parent = os.path.dirname(path.rstrip("/"))
        if parent not in ("", "/") and parent.lstrip("/") not in self.entries:
            self.dir(parent)
        self.entries[path.lstrip("/")] = (self._info(path, tarfile.DIRTYPE, mode, uid, gid), None)

    def file(self, path, data, mode=0o644, uid=0, gid=0):
        if isinstance(data, str):
            data = data.encode()
        if os.path.dirname(path) not in ("", "/"):
            self.dir(os.path.dirname(path))
        info = self._info(path, tarfile.REGTYPE, mode, uid, gid)
        info.size = len(data)
        self.entries[path.lstrip("/")] = (info, data)

    def hardlink(self, path, target):
        info = self._info(path, tarfile.LNKTYPE, 0o755)
        info.linkname = target.lstrip("/")
        self.entries[path.lstrip("/")] = (info, None)

    def build(self):
        """Returns (uncompressed tar, gzipped tar)."""
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            # Hard links after everything else: their target must be in the archive first.
            for path in sorted(self.entries, key=lambda p: (self.entries[p][0].type == tarfile.LNKTYPE, p)):
                info, data = self.entries[path]
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        tar_bytes = raw.getvalue()
        gz = io.BytesIO()
        with gzip.GzipFile(filename="", fileobj=gz, mode="wb", mtime=EPOCH, compresslevel=6) as g:
            g.write(tar_bytes)
        return tar_bytes, gz.getvalue()


class Builder:
    def __init__(self, busybox):
        self.busybox = busybox
        self.busybox_bytes = open(busybox, "rb").read()
        self._helpers = None
        self._applets = None

    def applets(self):
        if self._applets is None:
            out = subprocess.run([self.busybox, "--list"], check=True, capture_output=True, text=True)
            self._applets = sorted(a for a in out.stdout.split() if a and a != "busybox")
        return self._applets

    def helpers(self):
        """Compile the static helpers (pause, nnp, webserver) once per run."""
        if self._helpers is None:
            cc = shutil.which("gcc") or shutil.which("cc")
            if not cc:
                raise RuntimeError("gcc is needed to build the image helpers (install.sh installs build-essential)")
            out = tempfile.mkdtemp(prefix="podsnap-mkimage-")
            self._helpers = {}
            try:
                for name in ("pause", "nnp", "webserver"):
                    exe = os.path.join(out, name)
                    subprocess.run([cc, "-static", "-Os", "-s", "-Wall", "-o", exe,
                                    os.path.join(HELPERS, name + ".c")], check=True)
                    self._helpers[name] = open(exe, "rb").read()
            finally:
                shutil.rmtree(out, ignore_errors=True)
        return self._helpers

    def busybox_rootfs(self, spec):
        layer = Layer()
        for d, mode in (("/bin", 0o755), ("/dev", 0o755), ("/etc", 0o755), ("/home", 0o755),
                        ("/proc", 0o555), ("/root", 0o700), ("/sys", 0o555), ("/tmp", 0o1777),
                        ("/usr/bin", 0o755), ("/usr/sbin", 0o755), ("/usr/local/bin", 0o755),
                        ("/usr/local/sbin", 0o755), ("/var/run", 0o755), ("/var/spool/mail", 0o755),
                        ("/var/www", 0o755), ("/run", 0o755)):
            layer.dir(d, mode)
        layer.file("/bin/busybox", self.busybox_bytes, 0o755)
        # Applets are hard links, as in the upstream busybox image: critest masks /bin/ls
        # (MaskedPaths), and a mount over a symlink would mask /bin/busybox, i.e. every applet.
        for applet in self.applets():
            layer.hardlink(f"/bin/{applet}", "/bin/busybox")
        passwd, group = list(PASSWD), list(GROUP)
        for user, uid, gid, home in spec.get("users", []):
            passwd.append(f"{user}:x:{uid}:{gid}:Linux User,,,:{home}:/bin/sh")
            layer.dir(home, 0o755, uid, gid)
        for name, gid, members in spec.get("groups", []):
            group.append(f"{name}:x:{gid}:{','.join(members)}")
        layer.file("/etc/passwd", "\n".join(passwd) + "\n")
        layer.file("/etc/group", "\n".join(group) + "\n")
        layer.file("/etc/shadow", "".join(f"{line.split(':')[0]}:*:10933:0:99999:7:::\n" for line in passwd), 0o600)
        layer.file("/etc/nsswitch.conf", "hosts: files dns\nnetworks: files\n")
        if spec.get("marker"):
            layer.file("/" + spec["marker"], b"")
        kind = spec.get("webserver")
        if kind == "nginx":
            layer.file("/usr/sbin/nginx", self.helpers()["webserver"], 0o755)
            layer.file("/usr/share/nginx/html/index.html", NGINX_HTML)
            layer.dir("/var/log/nginx")
        elif kind == "httpd":
            layer.file("/usr/local/apache2/bin/httpd", self.helpers()["webserver"], 0o755)
            layer.file("/usr/local/apache2/htdocs/index.html", HTTPD_HTML)
            layer.dir("/usr/local/apache2/logs")
        if spec.get("nnp"):
            layer.file("/usr/local/bin/nnp", self.helpers()["nnp"], 0o4755)
        return layer

    def pause_rootfs(self, _spec):
        layer = Layer()
        layer.file("/pause", self.helpers()["pause"], 0o755)
        return layer

    def image(self, spec, recipe):
        """Returns (blobs {digest: bytes}, manifest bytes)."""
        pause = spec.get("kind") == "pause"
        layer = self.pause_rootfs(spec) if pause else self.busybox_rootfs(spec)
        tar_bytes, gz_bytes = layer.build()
        labels = {RECIPE_LABEL: recipe, "io.podsnap.image.name": spec["name"],
                  "org.opencontainers.image.source": "podsnap hack/mkimage.py"}
        cfg = {"Env": spec.get("env", [PATH_ENV]), "Labels": labels}
        if pause:
            cfg.update({"Entrypoint": ["/pause"], "User": "65535:65535", "WorkingDir": "/"})
            labels["org.opencontainers.image.version"] = split_ref(spec["refs"][0])[1]
        for key, field in (("cmd", "Cmd"), ("entrypoint", "Entrypoint"), ("user", "User"),
                           ("workdir", "WorkingDir"), ("stop_signal", "StopSignal")):
            if key in spec:
                cfg[field] = spec[key]
        if "expose" in spec:
            cfg["ExposedPorts"] = {p: {} for p in spec["expose"]}
        config = {
            "architecture": "amd64", "os": "linux", "created": CREATED, "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": [sha256(tar_bytes)]},
            "history": [{"created": CREATED, "created_by": f"podsnap hack/mkimage.py: {spec['name']}"}],
        }
        config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        manifest = {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(config_bytes), "size": len(config_bytes)},
            "layers": [{"mediaType": OCI_LAYER, "digest": sha256(gz_bytes), "size": len(gz_bytes)}],
        }
        blobs = {sha256(gz_bytes): gz_bytes, sha256(config_bytes): config_bytes}
        return blobs, json.dumps(manifest, sort_keys=True, indent=2).encode()


def base_recipe(busybox):
    h = hashlib.sha256()
    h.update(open(os.path.abspath(__file__), "rb").read())
    for name in sorted(os.listdir(HELPERS)):
        h.update(name.encode() + b"\0" + open(os.path.join(HELPERS, name), "rb").read())
    h.update(open(busybox, "rb").read())
    return h.hexdigest()


def spec_recipe(base, spec):
    return hashlib.sha256((base + json.dumps(spec, sort_keys=True)).encode()).hexdigest()[:32]


def current(registry, repo, tag, recipe):
    manifest = registry.manifest(repo, tag)
    if not manifest or "config" not in manifest:
        return False
    config = registry.blob(repo, manifest["config"]["digest"])
    if not config:
        return False
    labels = (json.loads(config).get("config") or {}).get("Labels") or {}
    return labels.get(RECIPE_LABEL) == recipe


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--registry", default=os.environ.get("PODSNAP_REGISTRY", "127.0.0.1:5000"))
    ap.add_argument("--busybox", default=os.path.join(
        os.environ.get("PODSNAP_BIN", "/var/cache/podsnap/bin"), "busybox"))
    ap.add_argument("--force", action="store_true", help="rebuild and push even when up to date")
    ap.add_argument("--list", action="store_true", help="print every image reference and exit")
    ap.add_argument("--changed", metavar="FILE",
                    help="write the references of every image pushed by this run to FILE")
    args = ap.parse_args()

    if args.list:
        for spec in IMAGES:
            for ref in spec["refs"]:
                print(ref)
        return 0

    registry = Registry(args.registry)
    if not registry.ping():
        log(f"registry {args.registry} does not answer /v2/")
        return 1
    base = base_recipe(args.busybox)
    builder = Builder(args.busybox)
    built = skipped = 0
    changed = []
    for spec in IMAGES:
        recipe = spec_recipe(base, spec)
        targets = list(dict.fromkeys(split_ref(ref) for ref in spec["refs"]))
        stale = [t for t in targets if args.force or not current(registry, *t, recipe)]
        if not stale:
            skipped += len(targets)
            continue
        blobs, manifest = builder.image(spec, recipe)
        changed.extend(spec["refs"])
        for repo, tag in stale:
            for data in blobs.values():
                registry.push_blob(repo, data)
            registry.push_manifest(repo, tag, manifest)
            log(f"pushed {args.registry}/{repo}:{tag} ({sha256(manifest)[:19]})")
            built += 1
        skipped += len(targets) - len(stale)
    if args.changed:
        with open(args.changed, "w") as f:
            f.writelines(ref + "\n" for ref in changed)
    log(f"{built} tag(s) pushed, {skipped} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())

//! `podsnap-ipam` in front of the real `host-local` (from `hack/install.sh`'s CNI plugins in
//! `$PODSNAP_CACHE/cni/bin`): a pod with an address grant gets exactly that address; a second
//! pod granted the same address while it is held is refused with host-local's reason; a pod
//! without a grant gets the next free address; DEL releases. Needs root (the grant directory is
//! root-only) and the plugins; a missing prerequisite fails the test.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use podsnap_cni::grant::{self, GRANT_DIR, IpGrant};
use serde_json::{Value, json};

fn cni_bin() -> PathBuf {
    let cache = std::env::var("PODSNAP_CACHE").unwrap_or_else(|_| "/var/cache/podsnap".into());
    let dir = PathBuf::from(cache).join("cni/bin");
    assert!(
        dir.join("host-local").is_file(),
        "{} is missing: run hack/install.sh",
        dir.join("host-local").display()
    );
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "run as root: the address grant directory is root-only"
    );
    dir
}

/// A network namespace of its own (CNI plugins refuse to run in the one they are given), held by
/// a `sleep` killed on drop.
struct Netns(std::process::Child);

impl Netns {
    fn new() -> Self {
        let child = Command::new("unshare")
            .args(["--net", "sleep", "300"])
            .spawn()
            .expect("unshare (util-linux) runs");
        let netns = Netns(child);
        let own = std::fs::read_link("/proc/self/ns/net").unwrap();
        for _ in 0..100 {
            if std::fs::read_link(netns.path()).is_ok_and(|ns| ns != own) {
                return netns;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("unshare --net did not enter a network namespace of its own");
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.0.id()))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs podsnap-ipam on the test network (host-local's state in `data_dir`).
fn ipam(command: &str, container: &str, uid: &str, data_dir: &Path) -> (bool, Value) {
    let config = json!({
        "cniVersion": "1.0.0",
        "name": "podsnap-ipam-test",
        "type": "bridge",
        "ipam": {
            "type": "podsnap-ipam",
            "delegate": "host-local",
            "dataDir": data_dir,
            "ranges": [[{"subnet": "10.231.0.0/24"}]],
        },
    });
    run_plugin(command, container, uid, &config)
}

/// Runs podsnap-ipam as bridge would: the network configuration on stdin, CNI_* in the
/// environment, with the plugin's own directory and the CNI plugins' in CNI_PATH. Whether it
/// succeeded, and its result (Null when it printed none).
fn run_plugin(command: &str, container: &str, uid: &str, config: &Value) -> (bool, Value) {
    let netns = Netns::new();
    let plugin = PathBuf::from(env!("CARGO_BIN_EXE_podsnap-ipam"));
    let cni_path = format!(
        "{}:{}",
        plugin.parent().unwrap().display(),
        cni_bin().display()
    );
    let mut child = Command::new(&plugin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path)
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_UID={uid}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(config.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout:?}"))
    };
    (out.status.success(), value)
}

fn address(result: &Value) -> String {
    result["ips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address in {result}"))
        .to_string()
}

#[test]
fn host_local_gives_a_granted_pod_exactly_its_address_or_refuses() {
    let data = tempfile::tempdir().unwrap();
    let tag = std::process::id();
    let (first, second, plain) = (
        format!("ipam-test-a-{tag}"),
        format!("ipam-test-b-{tag}"),
        format!("ipam-test-c-{tag}"),
    );
    let wanted = IpGrant {
        ips: vec!["10.231.0.77".parse().unwrap()],
    };
    let dir = Path::new(GRANT_DIR);

    let held = grant::issue(dir, &first, &wanted).unwrap();
    let (ok, result) = ipam("ADD", "c1", &first, data.path());
    assert!(ok, "{result}");
    assert_eq!(address(&result), "10.231.0.77/24");
    drop(held);

    let contested = grant::issue(dir, &second, &wanted).unwrap();
    let (ok, result) = ipam("ADD", "c2", &second, data.path());
    assert!(!ok, "a held address was given twice: {result}");
    let msg = result["msg"].as_str().unwrap_or_default();
    assert!(msg.contains("10.231.0.77"), "{result}");

    let (ok, result) = ipam("ADD", "c3", &plain, data.path());
    assert!(ok, "{result}");
    assert_ne!(address(&result), "10.231.0.77/24");

    // Released by DEL, the address can be granted again.
    let (ok, result) = ipam("DEL", "c1", &first, data.path());
    assert!(ok, "{result}");
    let (ok, result) = ipam("ADD", "c2", &second, data.path());
    assert!(ok, "{result}");
    assert_eq!(address(&result), "10.231.0.77/24");
    drop(contested);
    for (container, uid) in [("c2", &second), ("c3", &plain)] {
        let (ok, result) = ipam("DEL", container, uid, data.path());
        assert!(ok, "{result}");
    }
}

#[test]
fn a_bad_configuration_is_a_cni_error_result() {
    let config = json!({
        "cniVersion": "0.4.0",
        "name": "x",
        "ipam": {"type": "podsnap-ipam", "delegate": "../sh"},
    });
    let (ok, result) = run_plugin("ADD", "c1", "bad-config", &config);
    assert!(!ok);
    assert_eq!(result["code"], 7, "{result}");
    assert_eq!(result["cniVersion"], "0.4.0");
}

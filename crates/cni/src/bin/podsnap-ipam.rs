//! `podsnap-ipam`: the CNI IPAM plugin that keeps a restored pod's address (see the crate's
//! docs). Runs its delegate with the same environment and the rewritten configuration, passes
//! the delegate's result and exit status through, and reports its own failures as CNI errors.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use podsnap_cni::grant::{self, GRANT_DIR, GrantError};
use podsnap_cni::ipam::{self, PluginError, code};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

fn run(command: &str, stdin: &[u8]) -> Result<ExitCode, PluginError> {
    if command == "VERSION" {
        println!("{}", ipam::version_result(stdin));
        return Ok(ExitCode::SUCCESS);
    }
    let cni_args = env("CNI_ARGS");
    let pod_uid = ipam::pod_uid(&cni_args);
    // Only an ADD can ask for addresses, and only podsnapd can write the grant.
    let granted = if command == "ADD" {
        match pod_uid {
            None => None,
            Some(uid) => match grant::read(Path::new(GRANT_DIR), uid) {
                Ok(grant) => grant,
                // podsnapd never issues a grant for such a UID: nothing was asked.
                Err(GrantError::BadUid(_)) => None,
                Err(e) => return Err(PluginError::new(code::IO, e.to_string())),
            },
        }
    } else {
        None
    };
    let delegation = ipam::delegation(command, stdin, granted.as_ref())?;
    let plugin = ipam::find_plugin(&delegation.plugin, &env("CNI_PATH"))?;
    let mut child = Command::new(&plugin)
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| PluginError::new(code::IO, format!("run {}: {e}", plugin.display())))?;
    let written = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(&delegation.stdin);
    let status = child
        .wait()
        .map_err(|e| PluginError::new(code::IO, format!("wait for {}: {e}", plugin.display())))?;
    if let Err(e) = written
        && status.success()
    {
        return Err(PluginError::new(
            code::IO,
            format!("write the configuration to {}: {e}", plugin.display()),
        ));
    }
    if !delegation.requested.is_empty() && status.success() {
        eprintln!(
            "{}: pod {:?} got its checkpointed addresses {:?}",
            ipam::PLUGIN,
            pod_uid.unwrap_or_default(),
            delegation.requested
        );
    }
    match status.code() {
        Some(0) => Ok(ExitCode::SUCCESS),
        Some(code) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(1))),
        // Killed by a signal: it wrote no error result, so write one.
        None => Err(PluginError::new(
            code::IO,
            format!("{} was killed ({status})", plugin.display()),
        )),
    }
}

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().take(16 << 20).read_to_end(&mut stdin) {
        let err = PluginError::new(code::IO, format!("read the network configuration: {e}"));
        println!("{}", err.to_json(&ipam::cni_version(&stdin)));
        return ExitCode::FAILURE;
    }
    let command = env("CNI_COMMAND");
    match run(&command, &stdin) {
        Ok(code) => code,
        Err(err) => {
            println!("{}", err.to_json(&ipam::cni_version(&stdin)));
            ExitCode::FAILURE
        }
    }
}

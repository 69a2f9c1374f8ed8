//! `podsnap pod push` and `podsnap pod pull`: a pod checkpoint directory to and from an OCI
//! registry, as the artifact `podsnap-checkpoint-registry` writes (the README's "Checkpoint
//! images"). Credentials come from a Docker config file (`config.json`, the format of a
//! `kubernetes.io/dockerconfigjson` Secret), never from the command line.

use std::path::{Path, PathBuf};

use std::sync::Arc;

use podsnap_checkpoint_image::{Identities, Recipients};
use podsnap_checkpoint_registry::{Access, PushOptions, Registry, reference};

/// The registry options both commands take.
#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    /// A registry (host:port) to reach over plain HTTP instead of HTTPS (repeat for several).
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure: Vec<String>,
    /// A Docker config file holding the registry's credentials (anonymous without one).
    #[arg(long, value_name = "FILE", env = "REGISTRY_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// PEM certificates of the authorities that signed a registry's HTTPS certificate, trusted
    /// besides the system's (a registry with a private CA).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

impl RegistryArgs {
    /// `err`, with a hint when a registry spoken to over HTTPS did not answer: one on plain
    /// HTTP (a test registry) needs --insecure-registry.
    fn explain(&self, registry: &str, err: podsnap_checkpoint_registry::Error) -> anyhow::Error {
        let unreachable = matches!(&err, podsnap_checkpoint_registry::Error::Registry { source, .. }
            if source.to_string().contains("error sending request"));
        if unreachable && !self.insecure.iter().any(|r| r == registry) {
            anyhow::anyhow!(
                "{err} (tried HTTPS; a registry on plain HTTP needs --insecure-registry {registry})"
            )
        } else {
            err.into()
        }
    }

    fn registry(&self, registry: &str) -> anyhow::Result<Registry> {
        let credentials = match &self.auth_file {
            Some(path) => {
                let bytes = std::fs::read(path).map_err(|e| {
                    anyhow::anyhow!("reading the auth file {}: {e}", path.display())
                })?;
                let found = podsnap_checkpoint_image::auth::credentials(&bytes, registry)
                    .map_err(|e| anyhow::anyhow!("auth file {}: {e}", path.display()))?;
                if found.is_none() {
                    anyhow::bail!(
                        "auth file {} has no credentials for {registry}",
                        path.display()
                    );
                }
                found
            }
            None => None,
        };
        let ca_certificates = match &self.ca_file {
            Some(path) => std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("reading the CA file {}: {e}", path.display()))?,
            None => Vec::new(),
        };
        Registry::new(&Access {
            insecure: self.insecure.clone(),
            credentials,
            retry: Default::default(),
            ca_certificates,
        })
        .map_err(|e| match &self.ca_file {
            Some(path) => anyhow::anyhow!("--ca-file {}: {e}", path.display()),
            None => e.into(),
        })
    }
}

/// How `podsnap pod push` packs.
#[derive(Debug)]
pub struct PushArgs {
    pub level: i32,
    pub layer_cache: Option<PathBuf>,
    /// age public keys to seal the image to (none: not encrypted).
    pub encrypt_to: Vec<String>,
}

/// Pushes the checkpoint at `dir` to `target`; prints the checkpoint by digest.
pub async fn push(
    dir: &Path,
    target: &str,
    args: &RegistryArgs,
    options: PushArgs,
) -> anyhow::Result<()> {
    let PushArgs {
        level,
        layer_cache,
        encrypt_to,
    } = options;
    let recipients = match encrypt_to.is_empty() {
        true => None,
        false => {
            Some(Recipients::parse(&encrypt_to).map_err(|e| anyhow::anyhow!("--encrypt-to: {e}"))?)
        }
    };
    anyhow::ensure!(
        (1..=19).contains(&level),
        "--level {level}: zstd levels here are 1 to 19"
    );
    let reference = reference(target)?;
    let registry = args.registry(reference.resolve_registry())?;
    let started = std::time::Instant::now();
    let pushed = registry
        .push(
            dir,
            &reference,
            &PushOptions {
                level,
                layer_cache,
                recipients,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| args.explain(reference.resolve_registry(), e))
        .map_err(|e| e.context(format!("pushing {} to {target}", dir.display())))?;
    eprintln!(
        "pushed {} ({} bytes, {} uploaded) in {:.1}s; config {}",
        dir.display(),
        pushed.size,
        pushed.uploaded,
        started.elapsed().as_secs_f64(),
        pushed.config_digest
    );
    println!("{}", pushed.reference);
    Ok(())
}

/// Pulls the checkpoint `source` into `dir` (which must not exist); prints its digest.
pub async fn pull(
    source: &str,
    dir: &Path,
    args: &RegistryArgs,
    max_bytes: u64,
    identity_file: Option<&Path>,
) -> anyhow::Result<()> {
    let identities = match identity_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("reading the identity file {}: {e}", path.display())
            })?;
            Identities::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => Identities::none(),
    };
    let identities = Arc::new(identities);
    let reference = reference(source)?;
    let registry = args.registry(reference.resolve_registry())?;
    let started = std::time::Instant::now();
    let pulled = registry
        .pull(&reference, dir, max_bytes, &identities)
        .await
        .map_err(|e| args.explain(reference.resolve_registry(), e))
        .map_err(|e| e.context(format!("pulling {source} into {}", dir.display())))?;
    eprintln!(
        "pulled {source} ({} bytes; pod {}/{}, {} container(s)) into {} in {:.1}s",
        pulled.size,
        pulled.manifest.pod.namespace,
        pulled.manifest.pod.name,
        pulled.manifest.containers.len(),
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    println!("{}", pulled.digest);
    Ok(())
}

/// `podsnap keygen`: a new age key pair; the private key to `output` (created 0600, never
/// over an existing file) or stdout, the public key to stderr.
pub fn keygen(output: Option<&Path>) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (identity, public) = podsnap_checkpoint_image::crypt::generate();
    match output {
        Some(path) => {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
            file.write_all(identity.as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
        }
        None => print!("{identity}"),
    }
    eprintln!("Public key: {public}");
    Ok(())
}

//! A podsnap pod checkpoint pushed to an OCI registry as an artifact, and pulled back verified
//! (the format: [`podsnap_checkpoint_image`]; the plan: docs/design/checkpoint-images.md).
//!
//! [`Registry::push`] packs each layer while it uploads it: the tar+zstd stream goes from a
//! blocking packer thread through a small bounded channel into chunked PATCHes, so no second
//! copy of the checkpoint is ever written, and memory stays at a few chunks whatever its size.
//! The digest the packer computed must be the one the upload computed. A layer cache (optional,
//! keyed by the layer's files' digests and the compression level) lets a second push of the
//! same checkpoint upload nothing: a cached layer is reused only if the registry has the blob.
//!
//! [`Registry::pull`] streams each blob from the registry into
//! [`podsnap_checkpoint_image::unpack`], which trusts none of it: every blob's digest and size
//! must be the descriptor's, every file its manifest's digest, and nothing appears at the target
//! until the whole checkpoint verifies. A manifest pulled by digest must have that digest.
//!
//! oci-client has no retries; this crate retries what fails for a passing reason (a refused or
//! reset connection, a timeout, 5xx, 429, 408: [`Error::is_transient`]) with exponential backoff
//! ([`Retry`]): a whole blob at a time (a registry may not resume an upload: 2.8 ignores
//! `Content-Range`), re-packed from disk, and a pull whole (the unpacker removes what it
//! unpacked). A 4xx, an authentication failure or a digest that does not match is never retried.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol, SizedStream};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use podsnap_checkpoint_format::Manifest;
use podsnap_checkpoint_image::{
    self as image, Descriptor, Identities, ImageManifest, Layer, Recipients,
};
use sha2::{Digest, Sha256};

/// The size of the pieces a layer goes to its upload in.
const CHUNK: usize = 4 << 20;
/// Pieces in flight between the packer and the upload.
const IN_FLIGHT: usize = 2;
/// The longest a connection to a registry may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest an upload may go without the registry taking any of it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest a request without a body (opening or committing an upload) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest a registry may stay silent in an answer.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest image manifest taken from a registry.
const MAX_MANIFEST: usize = 4 << 20;

/// What went wrong in a push or pull.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Image(#[from] image::Error),
    #[error("registry {registry}: {context}: {}", causes(source))]
    Registry {
        registry: String,
        context: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("{0}: not a valid image reference")]
    Reference(String),
    #[error("manifest of {reference}: {reason}")]
    Manifest { reference: String, reason: String },
    #[error("layer cache {path}: {source}")]
    Cache {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Task(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Whether trying again may succeed: the registry was unreachable, dropped the connection,
    /// timed out, or answered 5xx, 429 or 408. Never for a 4xx, an authentication failure or a
    /// digest mismatch.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Registry { source, .. } => transient(source),
            // What a pulled blob's reader marks so (see BlobReader).
            Error::Image(image::Error::Io { source, .. }) => {
                source.kind() == io::ErrorKind::ConnectionAborted
            }
            _ => false,
        }
    }
}

/// `e` and what caused it, down to the first cause (reqwest says "error sending request" and
/// keeps why, a refused certificate say, in its sources).
fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text = format!("{text}: {said}");
        }
        source = cause.source();
    }
    text
}

/// Whether a TLS error is among the causes of `e`: a certificate not trusted, a name that does
/// not match, a handshake refused. Configuration, which trying again does not change.
fn is_tls(e: &(dyn std::error::Error + 'static)) -> bool {
    // An io::Error's source() skips the error it wraps: open those (hyper-rustls nests two).
    fn is_rustls(e: &(dyn std::error::Error + 'static)) -> bool {
        e.downcast_ref::<rustls::Error>().is_some()
            || e.downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .is_some_and(|inner| is_rustls(inner))
    }
    let mut source = Some(e);
    while let Some(cause) = source {
        if is_rustls(cause) {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Whether an oci-client error is one that passes.
fn transient(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RequestError(e) => {
            (e.is_connect() || e.is_timeout() || e.is_request() || e.is_body()) && !is_tls(e)
        }
        OciDistributionError::ServerError { code, .. } => {
            *code >= 500 || *code == 429 || *code == 408
        }
        OciDistributionError::IoError(e) => matches!(
            e.kind(),
            io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionRefused
                | io::ErrorKind::TimedOut
                | io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// How an operation that failed for a passing reason is tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Tries in all (1: never again).
    pub attempts: u32,
    /// The first pause; each next one doubles, up to `max_delay`.
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 5,
            first_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(8),
        }
    }
}

/// A parsed image reference (`registry/repository[:tag][@sha256:…]`).
pub fn reference(text: &str) -> Result<Reference> {
    text.parse::<Reference>()
        .map_err(|e| Error::Reference(format!("{text}: {e}")))
}

/// How to reach a registry.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Registries (`host:port`) spoken to over plain HTTP; every other one over HTTPS.
    pub insecure: Vec<String>,
    /// Credentials; anonymous when `None`.
    pub credentials: Option<image::auth::Credentials>,
    /// Retries of what fails for a passing reason.
    pub retry: Retry,
    /// PEM certificates of authorities trusted for HTTPS registries besides the system's (a
    /// registry whose certificate a private CA signed); empty: the system's only.
    pub ca_certificates: Vec<u8>,
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// `registry/repository@sha256:…`: the checkpoint, by digest.
    pub reference: String,
    /// The image manifest's digest.
    pub digest: String,
    /// The config blob's digest: the checkpoint's manifest_sha256, which a restore pins (when
    /// the image is encrypted, the digest of its sealed bytes).
    pub config_digest: String,
    /// Bytes of blobs sent (0 when the registry had them all).
    pub uploaded: u64,
    /// Total size of the image's blobs.
    pub size: u64,
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The image manifest's digest.
    pub digest: String,
    /// The checkpoint's manifest, verified; it is at the pull's target.
    pub manifest: Manifest,
    /// Total size of the blobs pulled.
    pub size: u64,
    /// The config blob's digest.
    pub config_digest: String,
    /// `sha256:<hex>` of the checkpoint's manifest file as unpacked (the config's digest when
    /// the image is not encrypted): what a restore pins.
    pub manifest_sha256: String,
    /// Whether the image was encrypted (and opened with the pull's identities).
    pub encrypted: bool,
    /// The image manifest's annotations (covered by its digest).
    pub annotations: BTreeMap<String, String>,
}

/// Options of a push.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// zstd level.
    pub level: i32,
    /// A JSON file remembering the descriptor of each layer pushed, so that the same layer is
    /// not packed and sent again while the registry has it; root-only (0600).
    pub layer_cache: Option<PathBuf>,
    /// Annotations added to the image manifest (covered by its digest); they may not replace
    /// the checkpoint's own (`org.criu.checkpoint.*`, `io.podsnap.checkpoint.*`).
    pub annotations: BTreeMap<String, String>,
    /// Seal the config and every layer to these age recipients ([`image::crypt`]).
    pub recipients: Option<Recipients>,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            level: image::DEFAULT_LEVEL,
            layer_cache: None,
            annotations: BTreeMap::new(),
            recipients: None,
        }
    }
}

/// A registry client.
#[derive(Clone)]
pub struct Registry {
    client: Client,
    /// For the streamed blob uploads oci-client does not do.
    http: reqwest::Client,
    insecure: Vec<String>,
    auth: RegistryAuth,
    retry: Retry,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    pub fn new(access: &Access) -> Result<Self> {
        // rustls needs one crypto provider for the process: ring, which kube already uses. A
        // second call finds it installed, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let roots = if access.ca_certificates.is_empty() {
            Vec::new()
        } else {
            reqwest::Certificate::from_pem_bundle(&access.ca_certificates)
                .map_err(|e| Error::Task(format!("the CA certificates: {e}")))?
        };
        if !access.ca_certificates.is_empty() && roots.is_empty() {
            return Err(Error::Task(
                "the CA certificates hold no PEM certificate".to_string(),
            ));
        }
        let client = Client::try_from(ClientConfig {
            protocol: ClientProtocol::HttpsExcept(access.insecure.clone()),
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            extra_root_certificates: if access.ca_certificates.is_empty() {
                Vec::new()
            } else {
                vec![oci_client::client::Certificate {
                    encoding: oci_client::client::CertificateEncoding::Pem,
                    data: access.ca_certificates.clone(),
                }]
            },
            ..Default::default()
        })
        .map_err(|e| Error::Task(format!("building the registry client: {e}")))?;
        let auth = match &access.credentials {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        // No read timeout: while a long upload is sent, the registry's answer is still to come.
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_keepalive(Duration::from_secs(30))
            .tls_certs_merge(roots)
            .build()
            .map_err(|e| Error::Task(format!("building the HTTP client: {e}")))?;
        Ok(Registry {
            client,
            http,
            insecure: access.insecure.clone(),
            auth,
            retry: access.retry,
        })
    }

    /// Runs `op` until it succeeds, fails for good, or has been tried `retry.attempts` times.
    async fn again<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut delay = self.retry.first_delay;
        let mut attempt = 1;
        loop {
            match op().await {
                Err(e) if e.is_transient() && attempt < self.retry.attempts => {
                    tracing::warn!(%what, attempt, error = %e, ?delay, "trying again");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.retry.max_delay);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    fn registry_error(
        reference: &Reference,
        context: impl Into<String>,
    ) -> impl FnOnce(OciDistributionError) -> Error {
        let registry = reference.resolve_registry().to_string();
        let context = context.into();
        move |source| Error::Registry {
            registry,
            context,
            source,
        }
    }

    /// Pushes the checkpoint at `dir` (it must verify) to `reference` (a tag, or a repository
    /// alone for `latest`). Returns it by digest.
    pub async fn push(
        &self,
        dir: &Path,
        reference: &Reference,
        opts: &PushOptions,
    ) -> Result<Pushed> {
        let root = dir.to_path_buf();
        let (manifest, layers) = blocking(move || image::plan(&root)).await??;
        let (mut config_bytes, mut config) = image::config(dir)?;
        // The config is read again: it must still be the manifest `plan` verified, or what a
        // restore pins would not be what was checked.
        if serde_json::from_slice::<Manifest>(&config_bytes)
            .ok()
            .as_ref()
            != Some(&manifest)
        {
            return Err(Error::Image(image::Error::Changed {
                path: podsnap_checkpoint_format::MANIFEST.to_string(),
                reason: "it changed while the checkpoint was being pushed".into(),
            }));
        }
        if let Some(recipients) = &opts.recipients {
            (config_bytes, config) = image::seal_config(&config_bytes, recipients)?;
        }
        // The caller's annotations, checked before anything is sent.
        let own = ImageManifest::new(&manifest, config.clone(), Vec::new()).annotations;
        if let Some(key) = opts.annotations.keys().find(|k| own.contains_key(*k)) {
            return Err(Error::Manifest {
                reference: reference.whole(),
                reason: format!("annotation {key} is the checkpoint's own"),
            });
        }
        self.again("authenticate", || self.push_token(reference))
            .await?;
        let mut uploaded = 0;
        if !self.exists(reference, &config.digest).await? {
            self.again("push the config", || async {
                self.client
                    .push_blob(reference, config_bytes.clone(), &config.digest)
                    .await
                    .map_err(Self::registry_error(reference, "pushing the config"))
            })
            .await?;
            uploaded += config.size;
        }
        let mut cache = LayerCache::open(opts.layer_cache.as_deref())?;
        let mut descriptors = Vec::new();
        for layer in layers {
            let key = layer_key(&layer, opts.level, opts.recipients.as_ref());
            if let Some(known) = cache.get(&key)
                && self.exists(reference, &known.digest).await?
            {
                tracing::debug!(layer = %layer.path, digest = %known.digest, "layer already in the registry");
                descriptors.push(known);
                continue;
            }
            let what = format!("push layer {}", layer.path);
            let descriptor = self
                .again(&what, || {
                    self.push_layer(
                        reference,
                        layer.clone(),
                        opts.level,
                        opts.recipients.clone(),
                    )
                })
                .await?;
            uploaded += descriptor.size;
            cache.put(key, descriptor.clone())?;
            descriptors.push(descriptor);
        }
        let mut image_manifest = ImageManifest::new(&manifest, config.clone(), descriptors);
        image_manifest.annotations.extend(opts.annotations.clone());
        let size = image_manifest.size();
        let body = serde_json::to_vec(&image_manifest).map_err(|e| Error::Manifest {
            reference: reference.whole(),
            reason: e.to_string(),
        })?;
        let digest = format!("sha256:{}", hex(&Sha256::digest(&body)));
        self.again("push the manifest", || async {
            self.client
                .push_manifest_raw(
                    reference,
                    body.clone(),
                    image::IMAGE_MANIFEST.parse().expect("a valid header value"),
                )
                .await
                .map_err(Self::registry_error(reference, "pushing the manifest"))
        })
        .await?;
        let by_digest = Reference::with_digest(
            reference.registry().to_string(),
            reference.repository().to_string(),
            digest.clone(),
        );
        Ok(Pushed {
            reference: by_digest.whole(),
            digest,
            config_digest: config.digest,
            uploaded,
            size,
        })
    }

    async fn exists(&self, reference: &Reference, digest: &str) -> Result<bool> {
        self.again("look up a blob", || async {
            self.client
                .blob_exists(reference, digest)
                .await
                .map_err(Self::registry_error(
                    reference,
                    format!("looking up blob {digest}"),
                ))
        })
        .await
    }

    /// A bearer token for pushing to `reference`'s repository when the registry hands them out,
    /// asked for again each time: tokens can live for minutes only (Docker Hub's: 300 s).
    async fn push_token(&self, reference: &Reference) -> Result<Option<String>> {
        self.client
            .auth(reference, &self.auth, RegistryOperation::Push)
            .await
            .map_err(Self::registry_error(reference, "authenticating to push"))
    }

    /// Packs `layer` on a blocking thread while it is uploaded in one streamed request.
    async fn push_layer(
        &self,
        reference: &Reference,
        layer: Layer,
        level: i32,
        recipients: Option<Recipients>,
    ) -> Result<Descriptor> {
        let token = self.push_token(reference).await?;
        let token = token.as_deref();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<
            std::result::Result<Bytes, OciDistributionError>,
        >(IN_FLIGHT);
        let path = layer.path.clone();
        let packer = tokio::task::spawn_blocking(move || {
            let mut out = ChannelWriter {
                tx,
                buf: Vec::with_capacity(CHUNK),
                finished: false,
            };
            let written = image::write_layer(&layer, &mut out, level, recipients.as_ref());
            // Only a layer packed whole ends the stream cleanly; an error (or a panic, through
            // ChannelWriter's drop) ends it with an error, so the upload never commits a blob
            // cut short.
            out.finished = written.is_ok();
            written
        });
        let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let sent_error = Self::registry_error(reference, format!("pushing layer {path}"));
        // The upload ends when the stream does: once the packer has written the whole layer
        // (then its digest is known, and the upload is committed with it) or failed.
        let session = self.upload(reference, token, stream).await;
        let written = packer
            .await
            .map_err(|e| Error::Task(format!("packing layer {path}: {e}")))?;
        let (written, location) = match (written, session) {
            (Ok(written), Ok(location)) => (written, location),
            // The packer stopped because the upload did: the registry's error says why.
            (Err(image::Error::Io { source, .. }), Err(e))
                if source.kind() == io::ErrorKind::BrokenPipe =>
            {
                return Err(sent_error(e));
            }
            // The packer failed (a file changed, a read error): that is why.
            (Err(e), _) => return Err(e.into()),
            (Ok(_), Err(e)) => return Err(sent_error(e)),
        };
        // The registry computes the digest of what it received and refuses a commit under
        // another: what it stores is what the packer wrote. (A fresh token: the upload may
        // have outlived the first.)
        let token = self.push_token(reference).await?;
        self.commit(reference, token.as_deref(), &location, &written.digest)
            .await
            .map_err(sent_error)?;
        Ok(written)
    }

    /// `scheme://host` of the reference's registry.
    fn base(&self, reference: &Reference) -> String {
        let registry = reference.resolve_registry();
        let scheme = match self.insecure.iter().any(|r| r == registry) {
            true => "http",
            false => "https",
        };
        format!("{scheme}://{registry}")
    }

    /// A `method` request to `url` with the push's credentials, which go only to the registry
    /// itself: an upload `Location` on another host, port or scheme gets none (as oci-client
    /// does; CVE-2020-15157).
    fn request(
        &self,
        reference: &Reference,
        method: reqwest::Method,
        url: &str,
        token: Option<&str>,
    ) -> std::result::Result<reqwest::RequestBuilder, OciDistributionError> {
        let target = reqwest::Url::parse(url)
            .map_err(|e| OciDistributionError::UrlParseError(format!("{url}: {e}")))?;
        let base = reqwest::Url::parse(&self.base(reference))
            .map_err(|e| OciDistributionError::UrlParseError(e.to_string()))?;
        let request = self.http.request(method, target.clone());
        if target.origin() != base.origin() {
            tracing::warn!(%url, "an upload location on another origin: sent without credentials");
            return Ok(request);
        }
        Ok(match (token, &self.auth) {
            (Some(token), _) => request.bearer_auth(token),
            (None, RegistryAuth::Basic(user, password)) => request.basic_auth(user, Some(password)),
            (None, _) => request,
        })
    }

    /// Opens an upload session and sends `body` in one streamed PATCH (chunked transfer
    /// encoding) as `docker push` and skopeo do; returns the session's location, for
    /// [`Registry::commit`]. oci-client uploads a stream only in 4 MiB PATCHes, a round trip
    /// each, which on a 1 GiB checkpoint cost half again as much time (README, "registry"
    /// benchmark).
    async fn upload<S>(
        &self,
        reference: &Reference,
        token: Option<&str>,
        body: S,
    ) -> std::result::Result<String, OciDistributionError>
    where
        S: futures::Stream<Item = std::result::Result<Bytes, OciDistributionError>>
            + Send
            + 'static,
    {
        let base = self.base(reference);
        let start = format!("{base}/v2/{}/blobs/uploads/", reference.repository());
        let answer = self
            .request(reference, reqwest::Method::POST, &start, token)?
            .header(reqwest::header::CONTENT_LENGTH, "0")
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await?;
        let location = session_location(answer, reqwest::StatusCode::ACCEPTED).await?;
        // Not bounded as a whole (a layer may be large and a link slow), but as progress: the
        // upload fails when the registry takes nothing for IDLE_TIMEOUT, or does not answer
        // within that once it has it all.
        let progress = Arc::new(std::sync::Mutex::new(tokio::time::Instant::now()));
        let seen = progress.clone();
        let body = body.inspect(move |_| {
            *seen.lock().unwrap_or_else(|e| e.into_inner()) = tokio::time::Instant::now();
        });
        let send = self
            .request(reference, reqwest::Method::PATCH, &location, token)?
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(reqwest::Body::wrap_stream(body))
            .send();
        let stalled = async {
            loop {
                let last = *progress.lock().unwrap_or_else(|e| e.into_inner());
                if last.elapsed() >= IDLE_TIMEOUT {
                    break;
                }
                tokio::time::sleep_until(last + IDLE_TIMEOUT).await;
            }
        };
        let answer = tokio::select! {
            answer = send => answer?,
            () = stalled => {
                return Err(OciDistributionError::IoError(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the upload to {location} made no progress for {IDLE_TIMEOUT:?}"),
                )));
            }
        };
        session_location(answer, reqwest::StatusCode::ACCEPTED).await
    }

    /// Commits the upload session at `location` as blob `digest`.
    async fn commit(
        &self,
        reference: &Reference,
        token: Option<&str>,
        location: &str,
        digest: &str,
    ) -> std::result::Result<(), OciDistributionError> {
        let mut url = reqwest::Url::parse(location)
            .map_err(|e| OciDistributionError::UrlParseError(format!("{location}: {e}")))?;
        url.query_pairs_mut().append_pair("digest", digest);
        let answer = self
            .request(reference, reqwest::Method::PUT, url.as_str(), token)?
            .header(reqwest::header::CONTENT_LENGTH, "0")
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await?;
        session_location(answer, reqwest::StatusCode::CREATED)
            .await
            .map(|_| ())
    }

    /// Pulls the checkpoint image `reference` (by tag or digest) into `target`, which must not
    /// exist and appears only once the whole checkpoint verifies; at most `max_bytes` of files
    /// are written. An encrypted image is opened with `identities`.
    pub async fn pull(
        &self,
        reference: &Reference,
        target: &Path,
        max_bytes: u64,
        identities: &Arc<Identities>,
    ) -> Result<Pulled> {
        // Whole: a failed pull has removed what it unpacked.
        self.again("pull", || {
            self.pull_once(reference, target, max_bytes, identities.clone())
        })
        .await
    }

    async fn pull_once(
        &self,
        reference: &Reference,
        target: &Path,
        max_bytes: u64,
        identities: Arc<Identities>,
    ) -> Result<Pulled> {
        self.client
            .auth(reference, &self.auth, RegistryOperation::Pull)
            .await
            .map_err(Self::registry_error(reference, "authenticating to pull"))?;
        let (body, digest) = self
            .client
            .pull_manifest_raw(reference, &self.auth, &[image::IMAGE_MANIFEST])
            .await
            .map_err(Self::registry_error(reference, "pulling the manifest"))?;
        let manifest_error = |reason: String| Error::Manifest {
            reference: reference.whole(),
            reason,
        };
        if body.len() > MAX_MANIFEST {
            return Err(manifest_error(format!(
                "{} bytes, more than the {MAX_MANIFEST} a checkpoint's can be",
                body.len()
            )));
        }
        // Whatever the registry says the digest is, it is the body's.
        let actual = format!("sha256:{}", hex(&Sha256::digest(&body)));
        if let Some(wanted) = reference.digest()
            && wanted != actual
        {
            return Err(manifest_error(format!(
                "it has digest {actual}, the reference names {wanted}"
            )));
        }
        if digest != actual {
            tracing::warn!(reference = %reference.whole(), registry_digest = %digest, %actual, "the registry named another digest for the manifest it sent; using the body's");
        }
        let image_manifest = ImageManifest::parse(&body)?;
        let size = image_manifest.size();
        let config_digest = image_manifest.config.digest.clone();
        let encrypted = image_manifest.encrypted();
        let annotations = image_manifest.annotations.clone();
        let by_digest = Reference::with_digest(
            reference.registry().to_string(),
            reference.repository().to_string(),
            actual.clone(),
        );
        let handle = tokio::runtime::Handle::current();
        let client = self.client.clone();
        let target = target.to_path_buf();
        // Should this future be dropped (a caller's timeout), the blocking unpacker stops at its
        // next read and removes what it unpacked, instead of finishing behind the caller's back.
        let cancel = Cancel::default();
        let cancelled = cancel.0.clone();
        let (manifest, manifest_sha256) = blocking(move || {
            let blob = |descriptor: &Descriptor| BlobReader {
                handle: handle.clone(),
                client: client.clone(),
                reference: by_digest.clone(),
                digest: descriptor.digest.clone(),
                stream: None,
                chunk: Bytes::new(),
                ended: false,
                cancelled: cancelled.clone(),
            };
            let config = blob(&image_manifest.config);
            let layers: Vec<BlobReader> = image_manifest.layers.iter().map(blob).collect();
            image::unpack(
                &image_manifest,
                config,
                layers,
                &target,
                max_bytes,
                &identities,
            )
        })
        .await??;
        drop(cancel);
        Ok(Pulled {
            digest: actual,
            manifest,
            size,
            config_digest,
            manifest_sha256,
            encrypted,
            annotations,
        })
    }
}

/// The `Location` of an upload session from `answer`, absolute, when it has the `expected`
/// status; else the registry's error (a 5xx, 429 or 408 is one that passes).
async fn session_location(
    answer: reqwest::Response,
    expected: reqwest::StatusCode,
) -> std::result::Result<String, OciDistributionError> {
    let status = answer.status();
    let url = answer.url().clone();
    if status != expected {
        let code = status.as_u16();
        let message = answer.text().await.unwrap_or_default();
        let url = url.to_string();
        return Err(match code {
            401 | 403 => OciDistributionError::UnauthorizedError { url },
            // An upload session the registry no longer knows (it expired, or another replica
            // answered): a new one may work, so it is reported as one that passes.
            404 if message.contains("BLOB_UPLOAD_UNKNOWN") => OciDistributionError::ServerError {
                code: 503,
                url,
                message: format!("upload session unknown (404): {message}"),
            },
            _ => OciDistributionError::ServerError { code, url, message },
        });
    }
    let location = answer
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .ok_or(OciDistributionError::RegistryNoLocationError)?;
    // Relative to the request's URL, as HTTP resolves a Location.
    url.join(location)
        .map(String::from)
        .map_err(|e| OciDistributionError::UrlParseError(format!("Location {location}: {e}")))
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Task(format!("blocking task: {e}")))
}

/// The layer as a stream of [`CHUNK`]-sized pieces into a bounded channel.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<std::result::Result<Bytes, OciDistributionError>>,
    buf: Vec<u8>,
    /// Set once the whole layer is written: dropped before that, the stream ends in an error.
    finished: bool,
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self
                .tx
                .blocking_send(Err(OciDistributionError::IoError(io::Error::other(
                    "the layer was not packed whole",
                ))));
        }
    }
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(piece))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Set when dropped: tells a pull's blocking half that its caller is gone.
#[derive(Default)]
struct Cancel(Arc<AtomicBool>);

impl Drop for Cancel {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A blob pulled as a blocking reader (for the unpacker's thread), its request sent on the
/// first read.
struct BlobReader {
    handle: tokio::runtime::Handle,
    client: Client,
    reference: Reference,
    digest: String,
    stream: Option<SizedStream>,
    chunk: Bytes,
    /// The stream has ended.
    ended: bool,
    cancelled: Arc<AtomicBool>,
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancelled.load(Ordering::Relaxed) {
            // Not Interrupted: read_to_end and io::copy would read again, for ever.
            return Err(io::Error::other("the pull was cancelled"));
        }
        if self.ended && self.chunk.is_empty() {
            return Ok(0);
        }
        while self.chunk.is_empty() {
            let stream = match &mut self.stream {
                Some(stream) => stream,
                None => {
                    let started = self
                        .handle
                        .block_on(
                            self.client
                                .pull_blob_stream(&self.reference, self.digest.as_str()),
                        )
                        .map_err(|e| {
                            // ConnectionAborted marks what may pass (Error::is_transient).
                            let kind = match transient(&e) {
                                true => io::ErrorKind::ConnectionAborted,
                                false => io::ErrorKind::Other,
                            };
                            io::Error::new(kind, format!("pulling blob {}: {e}", self.digest))
                        })?;
                    self.stream.insert(started)
                }
            };
            match self.handle.block_on(stream.next()) {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => {
                    // oci-client's stream fails with its DigestError when the blob is not the
                    // one asked for (never retried), else with the transport's error.
                    let digest = e
                        .get_ref()
                        .is_some_and(|inner| inner.is::<oci_client::errors::DigestError>());
                    let kind = match digest {
                        true => io::ErrorKind::InvalidData,
                        false => io::ErrorKind::ConnectionAborted,
                    };
                    return Err(io::Error::new(
                        kind,
                        format!("pulling blob {}: {e}", self.digest),
                    ));
                }
                None => {
                    // oci-client's stream checks the digest again if polled past its end (and
                    // finds the empty blob's): a reader asked again at its end (age's is)
                    // answers the end again.
                    self.ended = true;
                    return Ok(0);
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// What identifies a layer's bytes: its media type, path, level and every file's name and
/// digest (packing is deterministic for one zstd).
fn layer_key(layer: &Layer, level: i32, recipients: Option<&Recipients>) -> String {
    let mut hash = Sha256::new();
    hash.update(format!(
        "{}\n{}\n{} level {level}\n",
        layer.media_type,
        layer.path,
        image::codec()
    ));
    // A sealed layer is reused only for the same recipients.
    if let Some(recipients) = recipients {
        hash.update(format!("age\n{}\n", recipients.fingerprint()));
    }
    for (relative, (_, sha256)) in &layer.files {
        hash.update(format!("{relative}\0{sha256}\n"));
    }
    hex(&hash.finalize())
}

/// The layer cache file: layer key → descriptor.
struct LayerCache {
    path: Option<PathBuf>,
    entries: BTreeMap<String, Descriptor>,
}

impl LayerCache {
    fn open(path: Option<&Path>) -> Result<Self> {
        let mut entries = BTreeMap::new();
        if let Some(path) = path {
            match std::fs::read(path) {
                // A cache that does not parse is only a cache: start again.
                Ok(bytes) => {
                    entries = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                        tracing::warn!(path = %path.display(), "the layer cache does not parse ({e}); starting it again");
                        BTreeMap::new()
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(Error::Cache {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
        }
        Ok(LayerCache {
            path: path.map(Path::to_path_buf),
            entries,
        })
    }

    fn get(&self, key: &str) -> Option<Descriptor> {
        self.entries.get(key).cloned()
    }

    fn put(&mut self, key: String, descriptor: Descriptor) -> Result<()> {
        self.entries.insert(key, descriptor);
        let Some(path) = &self.path else {
            return Ok(());
        };
        let cache_error = |source| Error::Cache {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(&self.entries)
            .map_err(io::Error::other)
            .map_err(cache_error)?;
        // A temporary file of its own (0600, O_EXCL) beside it, renamed over it: two pushes
        // never write one file, and a reader sees the old cache or the new one.
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut temp = tempfile::Builder::new()
            .prefix(".layers-")
            .tempfile_in(dir)
            .map_err(cache_error)?;
        temp.write_all(&bytes).map_err(cache_error)?;
        temp.as_file().sync_all().map_err(cache_error)?;
        temp.persist(path).map_err(|e| cache_error(e.error))?;
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, location: Option<&str>, body: &str) -> reqwest::Response {
        use reqwest::ResponseBuilderExt;
        let url = reqwest::Url::parse("http://reg:5000/v2/team/app/blobs/uploads/").unwrap();
        let mut builder = http::Response::builder().status(status).url(url);
        if let Some(location) = location {
            builder = builder.header("Location", location);
        }
        reqwest::Response::from(builder.body(body.to_string()).unwrap())
    }

    #[tokio::test]
    async fn upload_locations_resolve_as_http_does_and_errors_are_classified() {
        let accepted = reqwest::StatusCode::ACCEPTED;
        for (location, want) in [
            (
                "/v2/team/app/blobs/uploads/u1?_state=x",
                "http://reg:5000/v2/team/app/blobs/uploads/u1?_state=x",
            ),
            ("u2", "http://reg:5000/v2/team/app/blobs/uploads/u2"),
            ("https://other:443/x", "https://other/x"),
            ("//cdn.example/x", "http://cdn.example/x"),
        ] {
            let got = session_location(answer(202, Some(location), ""), accepted)
                .await
                .unwrap();
            assert_eq!(got, want, "{location}");
        }
        let no_location = session_location(answer(202, None, ""), accepted).await;
        assert!(matches!(
            no_location,
            Err(OciDistributionError::RegistryNoLocationError)
        ));
        let registry = |source| Error::Registry {
            registry: "reg:5000".into(),
            context: "test".into(),
            source,
        };
        for (status, body, transient) in [
            (503, "", true),
            (429, "", true),
            (404, r#"{"errors":[{"code":"BLOB_UPLOAD_UNKNOWN"}]}"#, true),
            (404, r#"{"errors":[{"code":"NAME_UNKNOWN"}]}"#, false),
            (400, r#"{"errors":[{"code":"DIGEST_INVALID"}]}"#, false),
            (401, "", false),
        ] {
            let err = session_location(answer(status, None, body), accepted)
                .await
                .unwrap_err();
            assert_eq!(registry(err).is_transient(), transient, "{status} {body}");
        }
    }

    #[test]
    fn credentials_go_only_to_the_registry_itself() {
        let registry = Registry::new(&Access {
            insecure: vec!["reg:5000".into()],
            credentials: Some(image::auth::Credentials {
                username: "u".into(),
                password: "p".into(),
            }),
            retry: Retry::default(),
            ..Default::default()
        })
        .unwrap();
        let reference = reference("reg:5000/team/app:1").unwrap();
        let authorization = |url: &str, token: Option<&str>| {
            registry
                .request(&reference, reqwest::Method::PUT, url, token)
                .unwrap()
                .build()
                .unwrap()
                .headers()
                .get(reqwest::header::AUTHORIZATION)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let same = "http://reg:5000/v2/team/app/blobs/uploads/u";
        assert_eq!(authorization(same, None).unwrap(), "Basic dTpw");
        assert_eq!(authorization(same, Some("t")).unwrap(), "Bearer t");
        for elsewhere in [
            "http://evil:5000/v2/x",
            "https://reg:5000/v2/x",
            "http://reg:5001/v2/x",
        ] {
            assert_eq!(authorization(elsewhere, Some("t")), None, "{elsewhere}");
        }
    }
}

//! Optional encryption of a checkpoint image with [age] (X25519 recipients): the config and
//! every layer are sealed to the PodCheckpoint's recipients, each blob its own age file
//! (media type `…+age`), so the registry holds no byte of the pod's memory, files or CRI
//! configs (environment values included) in the clear. The blobs' sha256 digests are those of
//! the ciphertext, which the image manifest's digest covers as before; each age file is
//! authenticated (ChaCha20-Poly1305 per 64 KiB), and every unpacked file is still checked
//! against the decrypted manifest.
//!
//! Recipients are public keys (`age1…`): they may stand in a PodCheckpoint's spec. Identities
//! (`AGE-SECRET-KEY-1…`, one per line, `#` comments, as `age-keygen` writes them) are read only
//! where a checkpoint is restored, from a file the node agent mounts from a Secret.
//!
//! [age]: https://age-encryption.org/v1

use std::io::{self, Read, Write};
use std::path::Path;
use std::str::FromStr;

use crate::{Error, Result};

/// What an encrypted blob's media type ends with.
pub const SUFFIX: &str = "+age";
/// The image manifest annotation naming the encryption of its blobs.
pub const ANNOTATION: &str = "io.podsnap.checkpoint.encryption";
/// The most recipients one checkpoint is sealed to.
pub const MAX_RECIPIENTS: usize = 16;
/// What starts an armored age file (a sealed kubelet record).
const ARMOR_BEGIN: &str = "-----BEGIN AGE ENCRYPTED FILE-----";

/// The public keys a checkpoint is sealed to.
#[derive(Clone)]
pub struct Recipients {
    keys: Vec<age::x25519::Recipient>,
}

impl std::fmt::Debug for Recipients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| k.to_string()))
            .finish()
    }
}

impl Recipients {
    /// Parses age X25519 public keys (`age1…`); at least one, at most [`MAX_RECIPIENTS`].
    pub fn parse<S: AsRef<str>>(keys: &[S]) -> Result<Self> {
        if keys.is_empty() || keys.len() > MAX_RECIPIENTS {
            return Err(Error::Crypt(format!(
                "{} recipients: a checkpoint is encrypted to 1 to {MAX_RECIPIENTS}",
                keys.len()
            )));
        }
        let keys = keys
            .iter()
            .map(|k| {
                let k = k.as_ref().trim();
                age::x25519::Recipient::from_str(k).map_err(|e| {
                    Error::Crypt(format!(
                        "recipient {k:?} is not an age X25519 public key (age1…): {e}"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Recipients { keys })
    }

    /// The keys, sorted, one per line: what a layer cache keys an encrypted layer by.
    pub fn fingerprint(&self) -> String {
        let mut keys: Vec<String> = self.keys.iter().map(|k| k.to_string()).collect();
        keys.sort();
        keys.join("\n")
    }

    fn encryptor(&self) -> Result<age::Encryptor> {
        age::Encryptor::with_recipients(self.keys.iter().map(|k| k as &dyn age::Recipient))
            .map_err(|e| Error::Crypt(format!("encrypting: {e}")))
    }

    /// `bytes`, sealed.
    pub fn seal(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        let mut out = self
            .encryptor()?
            .wrap_output(Vec::with_capacity(bytes.len() + 256))
            .map_err(|e| Error::Crypt(format!("encrypting: {e}")))?;
        out.write_all(bytes)
            .and_then(|()| out.finish())
            .map_err(|e| Error::Crypt(format!("encrypting: {e}")))
    }

    /// `text`, sealed and armored (ASCII): for an annotation.
    pub fn seal_text(&self, text: &str) -> Result<String> {
        let armored =
            age::armor::ArmoredWriter::wrap_output(Vec::new(), age::armor::Format::AsciiArmor)
                .map_err(|e| Error::Crypt(format!("encrypting: {e}")))?;
        let mut out = self
            .encryptor()?
            .wrap_output(armored)
            .map_err(|e| Error::Crypt(format!("encrypting: {e}")))?;
        let bytes = out
            .write_all(text.as_bytes())
            .and_then(|()| out.finish())
            .and_then(|armored| armored.finish())
            .map_err(|e| Error::Crypt(format!("encrypting: {e}")))?;
        String::from_utf8(bytes).map_err(|e| Error::Crypt(format!("armor: {e}")))
    }

    /// A writer that seals what it is given into `out`; [`Sealing::finish`] must end it.
    pub(crate) fn sealing<W: Write>(&self, out: W) -> Result<age::stream::StreamWriter<W>> {
        self.encryptor()?
            .wrap_output(out)
            .map_err(|e| Error::Crypt(format!("encrypting: {e}")))
    }
}

/// A new key pair: the identity file's text (the secret key, as `age-keygen` writes it) and
/// the recipient (the public key).
pub fn generate() -> (String, String) {
    use age::secrecy::ExposeSecret;
    let key = age::x25519::Identity::generate();
    let public = key.to_public().to_string();
    let file = format!(
        "# podsnap checkpoint key\n# public key: {public}\n{}\n",
        key.to_string().expose_secret()
    );
    (file, public)
}

/// Whether `text` is a sealed (armored) value.
pub fn is_sealed_text(text: &str) -> bool {
    text.trim_start().starts_with(ARMOR_BEGIN)
}

/// The private keys a node opens checkpoints with.
#[derive(Default)]
pub struct Identities {
    keys: Vec<age::x25519::Identity>,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identities({} keys)", self.keys.len())
    }
}

impl Identities {
    /// No key: opens no encrypted checkpoint.
    pub fn none() -> Self {
        Identities::default()
    }

    /// Parses an age identity file: `AGE-SECRET-KEY-1…` lines; blank lines and `#` comments
    /// are skipped. A line that is neither is an error that does not quote it (it may be a key).
    pub fn parse(text: &str) -> Result<Self> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = age::x25519::Identity::from_str(line).map_err(|_| {
                Error::Crypt(format!(
                    "line {} of the identity file is not an age X25519 secret key (AGE-SECRET-KEY-1…)",
                    n + 1
                ))
            })?;
            keys.push(key);
        }
        Ok(Identities { keys })
    }

    /// Reads an identity file; a file that does not exist (an optional Secret not created) is
    /// no key.
    pub fn read(path: &Path) -> Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => Identities::parse(&text).map_err(|e| match e {
                Error::Crypt(reason) => Error::Crypt(format!("{}: {reason}", path.display())),
                other => other,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Identities::none()),
            Err(source) => Err(Error::Io {
                context: format!("reading the identity file {}", path.display()),
                source,
            }),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The public keys of these identities (what a checkpoint to be opened here is sealed to).
    pub fn recipients(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| k.to_public().to_string())
            .collect()
    }

    /// A reader of the plaintext of the age file `input`.
    pub(crate) fn opening<R: Read>(&self, input: R) -> Result<age::stream::StreamReader<R>> {
        if self.keys.is_empty() {
            return Err(Error::Crypt(
                "the checkpoint image is encrypted and this node has no decryption key".into(),
            ));
        }
        let decryptor = age::Decryptor::new(input)
            .map_err(|e| Error::Crypt(format!("not an age file: {e}")))?;
        decryptor
            .decrypt(self.keys.iter().map(|k| k as &dyn age::Identity))
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => Error::Crypt(
                    "the checkpoint image is encrypted to other keys: none of this node's decryption keys opens it".into(),
                ),
                other => Error::Crypt(format!("decrypting: {other}")),
            })
    }

    /// The plaintext of the age file `bytes`, at most `max` bytes of it.
    pub fn open(&self, bytes: &[u8], max: u64) -> Result<Vec<u8>> {
        let mut plain = Vec::new();
        self.opening(bytes)?
            .take(max.saturating_add(1))
            .read_to_end(&mut plain)
            .map_err(|e| Error::Crypt(format!("decrypting: {e}")))?;
        if plain.len() as u64 > max {
            return Err(Error::Crypt(format!(
                "it decrypts to more than {max} bytes"
            )));
        }
        Ok(plain)
    }

    /// The text of a sealed (armored) value, at most `max` bytes of it.
    pub fn open_text(&self, text: &str, max: u64) -> Result<String> {
        let mut plain = Vec::new();
        self.opening(age::armor::ArmoredReader::new(text.trim().as_bytes()))?
            .take(max.saturating_add(1))
            .read_to_end(&mut plain)
            .map_err(|e| Error::Crypt(format!("decrypting: {e}")))?;
        if plain.len() as u64 > max {
            return Err(Error::Crypt(format!(
                "it decrypts to more than {max} bytes"
            )));
        }
        String::from_utf8(plain).map_err(|e| Error::Crypt(format!("not UTF-8: {e}")))
    }
}

/// A writer that is either plain or sealing.
pub(crate) enum Sealing<W: Write> {
    Plain(W),
    Age(age::stream::StreamWriter<W>),
}

impl<W: Write> Sealing<W> {
    /// Ends the age file (its last chunk) and returns the writer beneath.
    pub(crate) fn finish(self) -> io::Result<W> {
        match self {
            Sealing::Plain(w) => Ok(w),
            Sealing::Age(w) => w.finish(),
        }
    }
}

impl<W: Write> Write for Sealing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sealing::Plain(w) => w.write(buf),
            Sealing::Age(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sealing::Plain(w) => w.flush(),
            Sealing::Age(w) => w.flush(),
        }
    }
}

/// A reader that is either plain or opening.
pub(crate) enum Opening<R: Read> {
    Plain(R),
    Age(Box<age::stream::StreamReader<R>>),
}

impl<R: Read> Read for Opening<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Opening::Plain(r) => r.read(buf),
            Opening::Age(r) => r.read(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Recipients, Identities) {
        let key = age::x25519::Identity::generate();
        let recipients = Recipients::parse(&[key.to_public().to_string()]).unwrap();
        (recipients, Identities { keys: vec![key] })
    }

    #[test]
    fn sealed_bytes_and_text_open_with_the_key_and_only_with_it() {
        let (recipients, identities) = pair();
        let sealed = recipients.seal(b"the pod's memory").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"memory"));
        assert_eq!(
            identities.open(&sealed, 1 << 20).unwrap(),
            b"the pod's memory"
        );
        let text = recipients.seal_text("{\"namespace\":\"x\"}").unwrap();
        assert!(is_sealed_text(&text));
        assert!(!text.contains("namespace"));
        assert_eq!(
            identities.open_text(&text, 1 << 20).unwrap(),
            "{\"namespace\":\"x\"}"
        );
        let (_, other) = pair();
        let err = other.open(&sealed, 1 << 20).unwrap_err().to_string();
        assert!(err.contains("encrypted to other keys"), "{err}");
        let err = Identities::none()
            .open(&sealed, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no decryption key"), "{err}");
        let err = identities.open(&sealed, 3).unwrap_err().to_string();
        assert!(err.contains("more than 3 bytes"), "{err}");
    }

    #[test]
    fn recipients_and_identity_files_are_checked() {
        assert!(Recipients::parse::<&str>(&[]).is_err());
        let err = Recipients::parse(&["ssh-ed25519 AAAA"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an age X25519 public key"), "{err}");
        let key = age::x25519::Identity::generate();
        let secret = {
            use age::secrecy::ExposeSecret;
            key.to_string().expose_secret().to_string()
        };
        let file = format!(
            "# created: today\n# public key: {}\n\n{secret}\n",
            key.to_public()
        );
        let identities = Identities::parse(&file).unwrap();
        assert_eq!(identities.recipients(), vec![key.to_public().to_string()]);
        let err = Identities::parse(&format!("{secret}x\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
        assert!(!err.contains(&secret), "an error never quotes a key");
        let missing = Identities::read(Path::new("/nonexistent/podsnap/keys")).unwrap();
        assert!(missing.is_empty());
    }
}

//! Secrets at rest: the key that encrypts tools' `secret_env` values in the store, where that
//! key comes from, and the one form an encrypted value has.
//!
//! A stored value reads `enc:v1:<base64(nonce || ciphertext)>`: XChaCha20-Poly1305 with a
//! random 24-byte nonce per value (random nonces of that size never collide in practice, so no
//! counter has to survive restarts or be shared between nodes), and the tool's id and the
//! variable's name as associated data, so a ciphertext copied to another tool or variable
//! does not decrypt. A value without the `enc:` prefix is plain text written by a release
//! before this one; the store encrypts those once at start ([`crate::store::Store::seal_plain_secrets`]).
//!
//! The key is 32 random bytes kept outside the database (whoever holds a database backup
//! must not hold the secrets too): `SWITCHBOARD_SECRET_KEY` (base64), else the file that
//! `[secrets] key_file` names, else `<data dir>/secret.key`, created (mode 0600) at first
//! start. Invariant: the key and decrypted values are never logged, and no error message
//! quotes either.

use std::{
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use chacha20poly1305::{
    KeyInit as _, XChaCha20Poly1305, XNonce,
    aead::{Aead as _, Generate as _, Payload},
};
use uuid::Uuid;
use zeroize::Zeroizing;

/// The environment variable that may hold the key (base64 of 32 bytes).
pub const KEY_ENV: &str = "SWITCHBOARD_SECRET_KEY";

/// Switchboard's own credentials in its environment, which no process it starts (servers,
/// their bridges, package installers running packages' scripts) may inherit: the key decrypts
/// every tool's secrets, the tokens open the API.
pub const NEVER_INHERITED: &[&str] = &["SWITCHBOARD_API_TOKEN", "SWITCHBOARD_TOKEN", KEY_ENV];
/// The key file's name in the data directory.
pub const KEY_FILE: &str = "secret.key";
/// What every encrypted value starts with; the version names the cipher and the associated
/// data's layout.
const PREFIX: &str = "enc:v1:";
/// Any `enc:` value is ours, whatever its version (a newer release may write another).
const FAMILY: &str = "enc:";
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;

/// Where the key comes from (see the module's doc for the order).
#[derive(Debug, Clone, Default)]
pub enum KeySource {
    /// `<data dir>/secret.key`, created at first start.
    #[default]
    DataDir,
    /// A file the operator keeps (`[secrets] key_file`); Switchboard never creates it.
    File(PathBuf),
    /// The key itself, from [`KEY_ENV`]; no file is read or written.
    Env(SecretKey),
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "{origin} is not a secret key: it must be 32 bytes in base64, such as \
         `head -c 32 /dev/urandom | base64` prints ({problem})"
    )]
    Malformed { origin: String, problem: String },
    #[error(
        "the secret key file {0} ([secrets] key_file) does not exist: restore it from your \
         backup, or create one with `head -c 32 /dev/urandom | base64 > {0}; chmod 600 {0}` \
         (a new key cannot decrypt the values stored with the old one)"
    )]
    Missing(PathBuf),
    #[error("cannot read the secret key file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot create the secret key file {path}: {error}")]
    Create {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// A stored value that cannot be turned back into the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Authentication failed: another key, or a value copied from another tool or variable,
    /// or altered.
    #[error(
        "it does not decrypt with this Switchboard's secret key (it was stored with another \
         key, or copied from another tool or variable)"
    )]
    WrongKey,
    #[error("it was stored by a newer Switchboard (format '{0}')")]
    NewerFormat(String),
    #[error("it is not a well-formed encrypted value")]
    Malformed,
}

/// Encrypting failed: the system's random number generator did not answer.
#[derive(Debug, thiserror::Error)]
#[error("cannot encrypt a secret: the system's random number generator failed: {0}")]
pub struct SealError(String);

/// The key, ready to encrypt and decrypt. Its `Debug` says where it came from, never what it
/// is; the cipher wipes its copy of the key when dropped.
#[derive(Clone)]
pub struct SecretKey {
    cipher: XChaCha20Poly1305,
    origin: Arc<str>,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey(from {})", self.origin)
    }
}

impl SecretKey {
    /// A key from its base64 text (surrounding whitespace ignored); `origin` names where the
    /// text came from, for messages.
    pub fn from_base64(text: &str, origin: &str) -> Result<SecretKey, KeyError> {
        let malformed = |problem: String| KeyError::Malformed {
            origin: origin.to_owned(),
            problem,
        };
        let bytes = Zeroizing::new(
            STANDARD
                .decode(text.trim())
                .map_err(|_| malformed("not base64".to_owned()))?,
        );
        let key: [u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| malformed(format!("{} bytes instead of {KEY_LEN}", bytes.len())))?;
        let key = Zeroizing::new(key);
        Ok(SecretKey {
            cipher: XChaCha20Poly1305::new(&(*key).into()),
            origin: origin.into(),
        })
    }

    /// Where the key came from, for logs (`SWITCHBOARD_SECRET_KEY`, or the file's path).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The key `source` names. The data directory's file is created (see
    /// [`create_key_file`]) when absent; `created` then says so, so the caller can tell the
    /// operator to back it up.
    pub fn load(source: &KeySource, data_dir: &Path) -> Result<Loaded, KeyError> {
        let (path, create) = match source {
            KeySource::Env(key) => {
                return Ok(Loaded {
                    key: key.clone(),
                    created: false,
                });
            }
            KeySource::File(path) => (path.clone(), false),
            KeySource::DataDir => (data_dir.join(KEY_FILE), true),
        };
        let mut created = false;
        if create && !path.exists() {
            create_key_file(&path)?;
            created = true;
        }
        match read_key_file(&path)? {
            Some(key) => Ok(Loaded { key, created }),
            None => Err(KeyError::Missing(path)),
        }
    }

    /// Encrypts a secret of a tool's variable into its stored form.
    pub fn seal(&self, tool: Uuid, name: &str, plain: &str) -> Result<String, SealError> {
        let nonce = XNonce::try_generate().map_err(|e| SealError(e.to_string()))?;
        let aad = associated_data(tool, name);
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plain.as_bytes(),
                    aad: &aad,
                },
            )
            // Encryption fails only for messages beyond 256 GiB.
            .map_err(|_| SealError("the value is too long".to_owned()))?;
        let mut raw = Vec::with_capacity(NONCE_LEN + sealed.len());
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&sealed);
        Ok(format!("{PREFIX}{}", STANDARD.encode(raw)))
    }

    /// The secret a stored value of this tool's variable holds (see [`is_sealed`]).
    pub fn open(&self, tool: Uuid, name: &str, stored: &str) -> Result<String, OpenError> {
        let Some(body) = stored.strip_prefix(PREFIX) else {
            let format = stored.split(':').take(2).collect::<Vec<_>>().join(":");
            return Err(if stored.starts_with(FAMILY) && format.len() <= 16 {
                OpenError::NewerFormat(format)
            } else {
                OpenError::Malformed
            });
        };
        let raw = STANDARD.decode(body).map_err(|_| OpenError::Malformed)?;
        if raw.len() < NONCE_LEN {
            return Err(OpenError::Malformed);
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce = XNonce::try_from(nonce).map_err(|_| OpenError::Malformed)?;
        let aad = associated_data(tool, name);
        let plain = self
            .cipher
            .decrypt(
                &nonce,
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| OpenError::WrongKey)?;
        String::from_utf8(plain).map_err(|_| OpenError::Malformed)
    }
}

/// Whether a stored value is encrypted (else it is plain text an earlier release wrote).
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(FAMILY)
}

/// The key [`SecretKey::load`] found, and whether it had to create the key file.
#[derive(Debug)]
pub struct Loaded {
    pub key: SecretKey,
    pub created: bool,
}

/// Binds a ciphertext to its tool and variable; NUL separates them since neither contains one.
fn associated_data(tool: Uuid, name: &str) -> Vec<u8> {
    format!("switchboard secret_env v1\0{tool}\0{name}").into_bytes()
}

/// `None` when the file does not exist.
fn read_key_file(path: &Path) -> Result<Option<SecretKey>, KeyError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => Zeroizing::new(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(KeyError::Read {
                path: path.to_path_buf(),
                error,
            });
        }
    };
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "The secret key file can be read by other users: chmod 600 it"
        );
    }
    SecretKey::from_base64(&text, &path.display().to_string()).map(Some)
}

/// Writes a new random key to `path`, which never exists without its whole content or with
/// a mode other than 0600: the key goes to a temporary file created 0600 (`O_EXCL`, so not
/// an existing file someone else can read), synced, then linked to its name (which fails,
/// leaving the existing key alone, if the name exists) and the directory synced.
pub fn create_key_file(path: &Path) -> Result<(), KeyError> {
    let create = |error: std::io::Error| KeyError::Create {
        path: path.to_path_buf(),
        error,
    };
    let key = Zeroizing::new(
        <[u8; KEY_LEN]>::try_generate()
            .map_err(|e| create(std::io::Error::other(e.to_string())))?,
    );
    let text = Zeroizing::new(format!("{}\n", STANDARD.encode(*key)));
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{KEY_FILE}.{}", Uuid::new_v4().simple()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::hard_link(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    let _ = std::fs::remove_file(&tmp);
    written.map_err(create)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey::from_base64(&STANDARD.encode([7u8; 32]), "test").unwrap()
    }

    #[test]
    fn a_value_round_trips_only_for_its_own_tool_and_variable() {
        let k = key();
        let tool = Uuid::new_v4();
        let sealed = k.seal(tool, "API_KEY", "s3cr3t").unwrap();
        assert!(sealed.starts_with("enc:v1:") && is_sealed(&sealed));
        assert!(!sealed.contains("s3cr3t"));
        assert_eq!(k.open(tool, "API_KEY", &sealed).unwrap(), "s3cr3t");
        assert_ne!(
            sealed,
            k.seal(tool, "API_KEY", "s3cr3t").unwrap(),
            "fresh nonce"
        );
        assert_eq!(
            k.open(Uuid::new_v4(), "API_KEY", &sealed),
            Err(OpenError::WrongKey)
        );
        assert_eq!(k.open(tool, "OTHER", &sealed), Err(OpenError::WrongKey));
        let other = SecretKey::from_base64(&STANDARD.encode([8u8; 32]), "other").unwrap();
        assert_eq!(
            other.open(tool, "API_KEY", &sealed),
            Err(OpenError::WrongKey)
        );
        assert_eq!(
            k.open(tool, "API_KEY", "enc:v9:AAAA"),
            Err(OpenError::NewerFormat("enc:v9".into()))
        );
        assert_eq!(
            k.open(tool, "API_KEY", "enc:v1:!!"),
            Err(OpenError::Malformed)
        );
        assert_eq!(
            k.open(tool, "API_KEY", "enc:v1:AAAA"),
            Err(OpenError::Malformed)
        );
        assert!(!is_sealed("s3cr3t"));
    }

    #[test]
    fn a_malformed_key_is_refused_without_quoting_it() {
        for bad in ["not base64 at all!", "c2hvcnQ=", ""] {
            let e = SecretKey::from_base64(bad, KEY_ENV)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(KEY_ENV), "{e}");
            assert!(bad.is_empty() || !e.contains(bad), "{e}");
        }
        let k = SecretKey::from_base64(&format!("  {}\n", STANDARD.encode([1u8; 32])), "f");
        assert!(k.is_ok(), "whitespace around the text is ignored");
        assert_eq!(format!("{:?}", key()), "SecretKey(from test)");
    }

    #[test]
    fn the_data_directory_key_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let first = SecretKey::load(&KeySource::DataDir, dir.path()).unwrap();
        assert!(first.created);
        let path = dir.path().join(KEY_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = SecretKey::load(&KeySource::DataDir, dir.path()).unwrap();
        assert!(!again.created);
        let tool = Uuid::new_v4();
        let sealed = first.key.seal(tool, "K", "v").unwrap();
        assert_eq!(again.key.open(tool, "K", &sealed).unwrap(), "v");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left: {names:?}");
        let missing = dir.path().join("elsewhere.key");
        let e = SecretKey::load(&KeySource::File(missing.clone()), dir.path()).unwrap_err();
        assert!(matches!(e, KeyError::Missing(p) if p == missing));
        assert!(!missing.exists(), "a configured key file is never created");
    }
}

//! Node keys (`STORE/keys/`): the Ed25519 key that signs manifests, the X25519 key that
//! receives wrapped data keys, and the store's hash key that names chunks.
//!
//! Layout (see docs/store-format.md):
//! ```text
//! node.key              0600  FRYK v1: Ed25519 seed, X25519 secret, hash key
//! node.pub                    FRYP v1: Ed25519 public, X25519 public
//! retired/<n>.pub             earlier node.pub files, still trusted to verify old manifests
//! recipients/NAME.pub         other nodes' node.pub: slots are made for them, their signatures trusted
//! ```
//! This directory holds the trust anchors, so looser permissions than the owner's are refused.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use rand_core::{OsRng, RngCore as _};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// Keyed BLAKE3 of a chunk's plaintext.
pub type ChunkId = [u8; 32];

const KEY_MAGIC: &[u8; 4] = b"FRYK";
const PUB_MAGIC: &[u8; 4] = b"FRYP";
const FILE_VERSION: u16 = 1;
const KIND_SECRET: u16 = 1;
const KIND_PUBLIC: u16 = 2;
/// Size of `node.key`.
pub const SECRET_FILE_LEN: usize = 8 + 32 * 3;
/// Size of `node.pub` (and of [`NodePublic::to_bytes`]).
pub const PUBLIC_LEN: usize = 8 + 32 * 2;
/// Prefix of the text form of a [`NodePublic`].
pub const TEXT_PREFIX: &str = "ferry-node-v1:";
const MAX_RECIPIENT_NAME: usize = 64;
/// Listing more entries than this in `recipients/` or `retired/` is refused rather than read.
const MAX_LISTED: usize = 4096;

const KEY_FILE: &str = "node.key";
const PUB_FILE: &str = "node.pub";
const RETIRED_DIR: &str = "retired";
const RECIPIENTS_DIR: &str = "recipients";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("node keys already exist in {} (refusing to overwrite them)", .0.display())]
    Exists(PathBuf),
    #[error("no node keys in {} (create them with `ferry keys init`)", .0.display())]
    Missing(PathBuf),
    #[error("{} has mode {mode:04o}: {why}; fix it with `chmod {fix:o} {}`", path.display(), path.display())]
    Permissions { path: PathBuf, mode: u32, why: &'static str, fix: u32 },
    #[error("{} is not a valid key file: {detail}", path.display())]
    BadFile { path: PathBuf, detail: String },
    #[error("invalid node public key: {0}")]
    BadPublic(&'static str),
    #[error("invalid node secret key: {0}")]
    BadSecret(String),
    #[error("invalid recipient name '{name}': {why}")]
    BadName { name: String, why: &'static str },
    #[error("recipient '{0}' already exists with a different key (remove recipients/{0}.pub first)")]
    RecipientExists(String),
}

fn io_err<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> KeyError + 'p {
    move |source| KeyError::Io { action, path: path.to_path_buf(), source }
}

/// Lower-case hex, for messages.
pub(crate) fn hex(b: &[u8]) -> String {
    use fmt::Write as _;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// This node's secret keys. Secret bytes are wiped when dropped (the dalek types and
/// `Zeroizing` do it).
pub struct NodeKeys {
    signing: SigningKey,
    x25519: StaticSecret,
    hash_key: Zeroizing<[u8; 32]>,
    // Cached: deriving the X25519 public costs a scalar multiplication.
    public: NodePublic,
}

impl fmt::Debug for NodeKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKeys").field("public", &self.public).finish_non_exhaustive()
    }
}

impl NodeKeys {
    /// Fresh keys, including a fresh hash key (a new trust domain).
    pub fn generate() -> NodeKeys {
        let mut hash_key = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(hash_key.as_mut());
        Self::generate_with_hash_key(&hash_key)
    }

    /// Fresh signing and X25519 keys in an existing trust domain (`--hash-key-from`).
    pub fn generate_with_hash_key(hash_key: &[u8; 32]) -> NodeKeys {
        let signing = SigningKey::generate(&mut OsRng);
        let x25519 = StaticSecret::random_from_rng(OsRng);
        Self::from_parts(signing, x25519, Zeroizing::new(*hash_key))
    }

    fn from_parts(signing: SigningKey, x25519: StaticSecret, hash_key: Zeroizing<[u8; 32]>) -> NodeKeys {
        let public = NodePublic {
            ed25519: signing.verifying_key().to_bytes(),
            x25519: PublicKey::from(&x25519).to_bytes(),
        };
        NodeKeys { signing, x25519, hash_key, public }
    }

    /// Creates `dir` (0700) and writes new keys into it; refuses if `node.key` exists.
    pub fn init(dir: &Path) -> Result<NodeKeys, KeyError> {
        Self::init_keys(dir, NodeKeys::generate())
    }

    /// Like [`NodeKeys::init`], joining the trust domain of `hash_key`.
    pub fn init_with_hash_key(dir: &Path, hash_key: &[u8; 32]) -> Result<NodeKeys, KeyError> {
        Self::init_keys(dir, NodeKeys::generate_with_hash_key(hash_key))
    }

    fn init_keys(dir: &Path, keys: NodeKeys) -> Result<NodeKeys, KeyError> {
        ensure_dir(dir)?;
        let key_path = dir.join(KEY_FILE);
        if key_path.symlink_metadata().is_ok() {
            return Err(KeyError::Exists(dir.to_path_buf()));
        }
        write_no_clobber(dir, KEY_FILE, keys.to_secret_bytes().as_ref(), 0o600).map_err(|e| match e {
            KeyError::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists => {
                KeyError::Exists(dir.to_path_buf())
            }
            e => e,
        })?;
        write_replace(dir, PUB_FILE, &keys.public.to_bytes(), 0o644)?;
        Ok(keys)
    }

    /// Reads `dir/node.key`, refusing it if group or others can reach it or can write `dir`.
    /// The public half is derived from it; `node.pub` is only for people and peers.
    pub fn load(dir: &Path) -> Result<NodeKeys, KeyError> {
        check_dir(dir)?;
        let path = dir.join(KEY_FILE);
        let mut file = match open_nofollow(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(KeyError::Missing(dir.to_path_buf()))
            }
            Err(e) => return Err(io_err("cannot open", &path)(e)),
        };
        let meta = file.metadata().map_err(io_err("cannot stat", &path))?;
        if !meta.is_file() {
            return Err(bad_file(&path, "not a regular file"));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path,
                mode,
                why: "the secret key is accessible to group or others",
                fix: 0o600,
            });
        }
        let mut buf = Zeroizing::new([0u8; SECRET_FILE_LEN + 1]);
        let n = read_up_to(&mut file, buf.as_mut()).map_err(io_err("cannot read", &path))?;
        if n != SECRET_FILE_LEN {
            return Err(bad_file(&path, format!("{n} bytes, expected {SECRET_FILE_LEN}")));
        }
        Self::parse_secret(&buf[..SECRET_FILE_LEN]).map_err(|d| bad_file(&path, d))
    }

    /// Loads the keys, creating them first if this store has none.
    pub fn load_or_init(dir: &Path) -> Result<NodeKeys, KeyError> {
        match Self::load(dir) {
            Err(KeyError::Missing(_)) => match Self::init(dir) {
                // Another process created them between our two steps.
                Err(KeyError::Exists(_)) => Self::load(dir),
                r => r,
            },
            r => r,
        }
    }

    /// Replaces the Ed25519 and X25519 keys, keeping the hash key so that chunk ids (and
    /// dedup) carry on. The old public key goes to `retired/<n>.pub` first, so manifests it
    /// signed still verify through [`trusted_signers`], even if we stop half way.
    ///
    /// Slots made for the old X25519 key do not open with the new one: re-wrap them (see
    /// [`crate::seal::Slots::add_recipient`]) with the old keys before dropping them.
    pub fn rotate(dir: &Path) -> Result<NodeKeys, KeyError> {
        let old = Self::load(dir)?;
        let retired_dir = dir.join(RETIRED_DIR);
        ensure_subdir(&retired_dir)?;
        let retired = list_pub_dir(&retired_dir, ListKind::Retired)?;
        // A rotation that stopped after this step left the key already retired.
        if !retired.iter().any(|(_, p)| *p == old.public) {
            let next = retired
                .iter()
                .filter_map(|(n, _)| n.parse::<u64>().ok())
                .max()
                .map_or(1, |m| m.saturating_add(1));
            write_no_clobber(&retired_dir, &format!("{next}.pub"), &old.public.to_bytes(), 0o644)?;
        }
        let new = Self::generate_with_hash_key(&old.hash_key);
        write_replace(dir, KEY_FILE, new.to_secret_bytes().as_ref(), 0o600)?;
        write_replace(dir, PUB_FILE, &new.public.to_bytes(), 0o644)?;
        Ok(new)
    }

    pub fn public(&self) -> NodePublic {
        self.public
    }

    /// The chunk id of `plaintext` in this store's trust domain.
    pub fn chunk_id(&self, plaintext: &[u8]) -> ChunkId {
        *blake3::keyed_hash(&self.hash_key, plaintext).as_bytes()
    }

    /// The Ed25519 secret seed: the node's identity also on the wire (its TLS key).
    pub fn identity_seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.signing.sign(msg).to_bytes()
    }

    pub fn x25519_secret(&self) -> &StaticSecret {
        &self.x25519
    }

    pub fn hash_key(&self) -> &[u8; 32] {
        &self.hash_key
    }

    fn to_secret_bytes(&self) -> Zeroizing<[u8; SECRET_FILE_LEN]> {
        let mut b = Zeroizing::new([0u8; SECRET_FILE_LEN]);
        b[0..4].copy_from_slice(KEY_MAGIC);
        b[4..6].copy_from_slice(&FILE_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&KIND_SECRET.to_le_bytes());
        b[8..40].copy_from_slice(self.signing.as_bytes());
        b[40..72].copy_from_slice(self.x25519.as_bytes());
        b[72..104].copy_from_slice(self.hash_key.as_ref());
        b
    }

    /// Keys from the bytes of a `node.key` file (fixed keys for tests and fuzzing; imports).
    pub fn from_secret_bytes(b: &[u8]) -> Result<NodeKeys, KeyError> {
        Self::parse_secret(b).map_err(KeyError::BadSecret)
    }

    fn parse_secret(b: &[u8]) -> Result<NodeKeys, String> {
        if b.len() != SECRET_FILE_LEN {
            return Err(format!("{} bytes, expected {SECRET_FILE_LEN}", b.len()));
        }
        check_head(b, KEY_MAGIC, KIND_SECRET)?;
        let mut seed = Zeroizing::new([0u8; 32]);
        let mut x = Zeroizing::new([0u8; 32]);
        let mut hash_key = Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(&b[8..40]);
        x.copy_from_slice(&b[40..72]);
        hash_key.copy_from_slice(&b[72..104]);
        Ok(Self::from_parts(SigningKey::from_bytes(&seed), StaticSecret::from(*x), hash_key))
    }
}

fn check_head(b: &[u8], magic: &[u8; 4], kind: u16) -> Result<(), String> {
    if &b[0..4] != magic {
        return Err(format!("bad magic (expected {})", String::from_utf8_lossy(magic)));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != FILE_VERSION {
        return Err(format!("version {version} is not supported (this ferry reads {FILE_VERSION})"));
    }
    let k = u16::from_le_bytes([b[6], b[7]]);
    if k != kind {
        return Err(format!("kind {k}, expected {kind}"));
    }
    Ok(())
}

fn bad_file(path: &Path, detail: impl Into<String>) -> KeyError {
    KeyError::BadFile { path: path.to_path_buf(), detail: detail.into() }
}

/// A node's public keys, as in its `node.pub`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct NodePublic {
    pub ed25519: [u8; 32],
    pub x25519: [u8; 32],
}

impl NodePublic {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(PUBLIC_LEN);
        b.extend_from_slice(PUB_MAGIC);
        b.extend_from_slice(&FILE_VERSION.to_le_bytes());
        b.extend_from_slice(&KIND_PUBLIC.to_le_bytes());
        b.extend_from_slice(&self.ed25519);
        b.extend_from_slice(&self.x25519);
        b
    }

    /// Parses a `node.pub`. Keys that would be unsafe to trust are refused: an Ed25519 key of
    /// small order (its signatures prove nothing) and an X25519 key of small order (a slot
    /// wrapped for it would be readable by anyone).
    pub fn from_bytes(b: &[u8]) -> Result<Self, KeyError> {
        if b.len() != PUBLIC_LEN {
            return Err(KeyError::BadPublic("wrong length"));
        }
        if &b[0..4] != PUB_MAGIC {
            return Err(KeyError::BadPublic("bad magic"));
        }
        if u16::from_le_bytes([b[4], b[5]]) != FILE_VERSION {
            return Err(KeyError::BadPublic("unsupported version"));
        }
        if u16::from_le_bytes([b[6], b[7]]) != KIND_PUBLIC {
            return Err(KeyError::BadPublic("not a public key"));
        }
        let mut p = NodePublic { ed25519: [0; 32], x25519: [0; 32] };
        p.ed25519.copy_from_slice(&b[8..40]);
        p.x25519.copy_from_slice(&b[40..72]);
        match VerifyingKey::from_bytes(&p.ed25519) {
            Ok(v) if !v.is_weak() => {}
            _ => return Err(KeyError::BadPublic("invalid Ed25519 key")),
        }
        if !x25519_is_safe(&p.x25519) {
            return Err(KeyError::BadPublic("X25519 key of small order"));
        }
        Ok(p)
    }

    pub fn to_text(&self) -> String {
        format!("{TEXT_PREFIX}{}", URL_SAFE_NO_PAD.encode(self.to_bytes()))
    }

    /// Parses the text form; surrounding whitespace (a pasted newline) is ignored.
    pub fn from_text(s: &str) -> Result<Self, KeyError> {
        let s = s.trim();
        let Some(b64) = s.strip_prefix(TEXT_PREFIX) else {
            return Err(KeyError::BadPublic("does not start with ferry-node-v1:"));
        };
        // Checked before decoding so that a pasted megabyte is not decoded.
        if b64.len() != (PUBLIC_LEN * 4).div_ceil(3) {
            return Err(KeyError::BadPublic("wrong length"));
        }
        let b = URL_SAFE_NO_PAD.decode(b64).map_err(|_| KeyError::BadPublic("not base64url"))?;
        Self::from_bytes(&b)
    }
}

/// False for points of small order. Clamped scalars are multiples of the cofactor 8, so
/// multiplying by any of them gives the identity exactly for those points.
fn x25519_is_safe(public: &[u8; 32]) -> bool {
    StaticSecret::from([0x5a; 32]).diffie_hellman(&PublicKey::from(*public)).was_contributory()
}

/// Adds (or confirms) the node `name` as a recipient: slots are made for it and its
/// signatures trusted. An existing recipient is never silently replaced.
pub fn add_recipient(dir: &Path, name: &str, public: &NodePublic) -> Result<(), KeyError> {
    validate_recipient_name(name)?;
    ensure_dir(dir)?;
    let rdir = dir.join(RECIPIENTS_DIR);
    ensure_subdir(&rdir)?;
    let file = format!("{name}.pub");
    let bytes = public.to_bytes();
    match write_no_clobber(&rdir, &file, &bytes, 0o644) {
        Err(KeyError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
            let existing = read_pub_file(&rdir.join(&file))?;
            if existing == *public {
                Ok(())
            } else {
                Err(KeyError::RecipientExists(name.to_owned()))
            }
        }
        r => r,
    }
}

/// The recipients, sorted by name.
pub fn recipients(dir: &Path) -> Result<Vec<(String, NodePublic)>, KeyError> {
    check_dir(dir)?;
    list_pub_dir(&dir.join(RECIPIENTS_DIR), ListKind::Recipients)
}

/// Earlier public keys of this node, oldest first.
pub fn retired(dir: &Path) -> Result<Vec<NodePublic>, KeyError> {
    check_dir(dir)?;
    let mut v = list_pub_dir(&dir.join(RETIRED_DIR), ListKind::Retired)?;
    v.sort_by_key(|(n, _)| n.parse::<u64>().unwrap_or(u64::MAX));
    Ok(v.into_iter().map(|(_, p)| p).collect())
}

/// Ed25519 keys whose manifests this node accepts: its own (current and retired) and its
/// recipients'. No duplicates; the current key first.
pub fn trusted_signers(dir: &Path) -> Result<Vec<[u8; 32]>, KeyError> {
    let own = NodeKeys::load(dir)?.public().ed25519;
    let mut out = vec![own];
    for k in retired(dir)?.into_iter().chain(recipients(dir)?.into_iter().map(|(_, p)| p)).map(|p| p.ed25519)
    {
        if !out.contains(&k) {
            out.push(k);
        }
    }
    Ok(out)
}

/// Recipient names become file names: `[A-Za-z0-9._-]{1,64}`, and never `.` or `..`.
pub fn validate_recipient_name(name: &str) -> Result<(), KeyError> {
    let bad = |why| Err(KeyError::BadName { name: name.chars().take(MAX_RECIPIENT_NAME).collect(), why });
    if name.is_empty() || name.len() > MAX_RECIPIENT_NAME {
        return bad("it must be 1 to 64 characters long");
    }
    if !name.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-')) {
        return bad("only letters, digits, '.', '_' and '-' are allowed");
    }
    if name.starts_with('.') {
        // Also keeps `.`/`..` and our temporary files (`.NAME.tmp`) out.
        return bad("it must not start with '.'");
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum ListKind {
    Recipients,
    Retired,
}

/// Reads every `*.pub` in `dir` (absent: none). Entries with other names are ignored; a
/// `.pub` with a bad name or content is an error, since it would otherwise hide tampering.
fn list_pub_dir(dir: &Path, kind: ListKind) -> Result<Vec<(String, NodePublic)>, KeyError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("cannot list", dir)(e)),
    };
    check_not_writable_by_others(dir, 0o700)?;
    let mut out = Vec::new();
    for (i, entry) in rd.enumerate() {
        if i >= MAX_LISTED {
            return Err(bad_file(dir, format!("more than {MAX_LISTED} entries")));
        }
        let entry = entry.map_err(io_err("cannot list", dir))?;
        let fname = entry.file_name();
        let Some(stem) = fname.to_str().and_then(|s| s.strip_suffix(".pub")) else {
            continue;
        };
        let path = entry.path();
        match kind {
            ListKind::Recipients => validate_recipient_name(stem)?,
            ListKind::Retired => {
                if stem.is_empty() || stem.len() > 20 || !stem.bytes().all(|c| c.is_ascii_digit()) {
                    return Err(bad_file(&path, "retired keys are named <number>.pub"));
                }
            }
        }
        out.push((stem.to_owned(), read_pub_file(&path)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn read_pub_file(path: &Path) -> Result<NodePublic, KeyError> {
    let mut file = open_nofollow(path).map_err(io_err("cannot open", path))?;
    let meta = file.metadata().map_err(io_err("cannot stat", path))?;
    if !meta.is_file() {
        return Err(bad_file(path, "not a regular file"));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
            mode,
            why: "a trusted key must be writable only by its owner",
            fix: 0o644,
        });
    }
    let mut buf = [0u8; PUBLIC_LEN + 1];
    let n = read_up_to(&mut file, &mut buf).map_err(io_err("cannot read", path))?;
    NodePublic::from_bytes(&buf[..n]).map_err(|e| bad_file(path, e.to_string()))
}

/// Opens for reading without following a final symlink (a link could point the key check at
/// a file other than the one read).
fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

/// Reads until `buf` is full or EOF; returns the count (a file one byte too long shows).
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The keys directory exists and is writable only by its owner.
fn check_dir(dir: &Path) -> Result<(), KeyError> {
    match fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(KeyError::Missing(dir.to_path_buf())),
        Err(e) => Err(io_err("cannot stat", dir)(e)),
        Ok(m) if !m.is_dir() => Err(bad_file(dir, "not a directory")),
        Ok(_) => check_not_writable_by_others(dir, 0o700),
    }
}

fn check_not_writable_by_others(path: &Path, fix: u32) -> Result<(), KeyError> {
    let meta = fs::metadata(path).map_err(io_err("cannot stat", path))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
            mode,
            why: "group or others can replace the keys in it",
            fix,
        });
    }
    Ok(())
}

/// Creates `dir` (and parents) 0700 if absent; an existing one must pass [`check_dir`].
fn ensure_dir(dir: &Path) -> Result<(), KeyError> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io_err("cannot create", dir))?;
    check_dir(dir)
}

fn ensure_subdir(dir: &Path) -> Result<(), KeyError> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("cannot create", dir)(e)),
    }
    check_not_writable_by_others(dir, 0o700)
}

/// Writes `dir/.NAME.tmp` with `mode` and fsyncs it; the caller links or renames it.
fn write_temp(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<PathBuf, KeyError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    // A leftover from a crash is ours to replace; O_EXCL below keeps a planted link out.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("cannot remove", &tmp)(e)),
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("cannot create", &tmp))?;
    // The umask may have narrowed it; a public file should stay readable.
    f.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_err("cannot chmod", &tmp))?;
    f.write_all(bytes).map_err(io_err("cannot write", &tmp))?;
    f.sync_all().map_err(io_err("cannot fsync", &tmp))?;
    Ok(tmp)
}

fn sync_dir(dir: &Path) -> Result<(), KeyError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("cannot fsync", dir))
}

/// Creates `dir/name` whole or not at all, failing with `AlreadyExists` if it is there
/// (link(2) does not replace, unlike rename(2)).
fn write_no_clobber(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let tmp = write_temp(dir, name, bytes, mode)?;
    let path = dir.join(name);
    let linked = fs::hard_link(&tmp, &path).map_err(io_err("cannot create", &path));
    let removed = fs::remove_file(&tmp).map_err(io_err("cannot remove", &tmp));
    linked?;
    removed?;
    sync_dir(dir)
}

/// Replaces `dir/name` atomically.
fn write_replace(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let tmp = write_temp(dir, name, bytes, mode)?;
    let path = dir.join(name);
    fs::rename(&tmp, &path).map_err(io_err("cannot rename into", &path))?;
    sync_dir(dir)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing test should stop right there
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn chmod(p: &Path, m: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
    }

    #[test]
    fn init_then_load_gives_the_same_keys() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("keys");
        let k = NodeKeys::init(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert_eq!(fs::metadata(dir.join(KEY_FILE)).unwrap().len(), SECRET_FILE_LEN as u64);
        let pub_file = fs::read(dir.join(PUB_FILE)).unwrap();
        assert_eq!(NodePublic::from_bytes(&pub_file).unwrap(), k.public());
        let l = NodeKeys::load(&dir).unwrap();
        assert_eq!(l.public(), k.public());
        assert_eq!(l.hash_key(), k.hash_key());
        assert_eq!(l.x25519_secret().to_bytes(), k.x25519_secret().to_bytes());
        assert_eq!(l.sign(b"m"), k.sign(b"m"));
        assert_eq!(l.chunk_id(b"page"), k.chunk_id(b"page"));
        assert_eq!(k.chunk_id(b"page"), *blake3::keyed_hash(k.hash_key(), b"page").as_bytes());
        // No temporary files left behind.
        let names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn init_refuses_existing_keys_and_load_or_init_reuses_them() {
        let t = tempfile::tempdir().unwrap();
        let k = NodeKeys::init(t.path()).unwrap();
        assert!(matches!(NodeKeys::init(t.path()), Err(KeyError::Exists(_))));
        assert_eq!(NodeKeys::load_or_init(t.path()).unwrap().public(), k.public());
        let fresh = t.path().join("fresh");
        assert!(matches!(NodeKeys::load(&fresh), Err(KeyError::Missing(_))));
        let a = NodeKeys::load_or_init(&fresh).unwrap();
        assert_eq!(NodeKeys::load(&fresh).unwrap().public(), a.public());
    }

    #[test]
    fn hash_key_import_joins_the_trust_domain() {
        let t = tempfile::tempdir().unwrap();
        let a = NodeKeys::generate();
        let b = NodeKeys::init_with_hash_key(t.path(), a.hash_key()).unwrap();
        assert_ne!(a.public(), b.public());
        assert_eq!(a.chunk_id(b"x"), b.chunk_id(b"x"));
        assert_ne!(NodeKeys::generate().chunk_id(b"x"), a.chunk_id(b"x"));
    }

    #[test]
    fn loose_permissions_are_refused_with_the_fix() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("keys");
        NodeKeys::init(&dir).unwrap();
        let key = dir.join(KEY_FILE);
        chmod(&key, 0o644);
        let e = NodeKeys::load(&dir).unwrap_err();
        assert!(matches!(e, KeyError::Permissions { .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        chmod(&key, 0o640);
        assert!(matches!(NodeKeys::load(&dir), Err(KeyError::Permissions { .. })));
        chmod(&key, 0o600);
        NodeKeys::load(&dir).unwrap();
        chmod(&dir, 0o777);
        let e = NodeKeys::load(&dir).unwrap_err();
        assert!(e.to_string().contains("chmod 700"), "{e}");
        chmod(&dir, 0o755);
        NodeKeys::load(&dir).unwrap();
    }

    #[test]
    fn symlinked_or_damaged_key_files_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let a = t.path().join("a");
        let b = t.path().join("b");
        NodeKeys::init(&a).unwrap();
        fs::create_dir(&b).unwrap();
        chmod(&b, 0o700);
        std::os::unix::fs::symlink(a.join(KEY_FILE), b.join(KEY_FILE)).unwrap();
        assert!(NodeKeys::load(&b).is_err());

        let key = a.join(KEY_FILE);
        let good = fs::read(&key).unwrap();
        for bad in [&good[..50], &[good.as_slice(), b"x"].concat()[..], b""] {
            fs::write(&key, bad).unwrap();
            assert!(matches!(NodeKeys::load(&a), Err(KeyError::BadFile { .. })));
        }
        let mut v2 = good.clone();
        v2[4] = 2;
        fs::write(&key, &v2).unwrap();
        let e = NodeKeys::load(&a).unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
    }

    #[test]
    fn text_form_round_trips_and_rejects_garbage() {
        let p = NodeKeys::generate().public();
        let t = p.to_text();
        assert!(t.starts_with("ferry-node-v1:"));
        assert_eq!(t.len(), TEXT_PREFIX.len() + 96);
        assert_eq!(NodePublic::from_text(&t).unwrap(), p);
        assert_eq!(NodePublic::from_text(&format!("  {t}\n")).unwrap(), p);
        assert_eq!(NodePublic::from_bytes(&p.to_bytes()).unwrap(), p);
        let long = format!("{TEXT_PREFIX}{}", "A".repeat(1 << 20));
        for bad in [
            "",
            "ferry-node-v1:",
            &t[1..],
            &t[..t.len() - 1],
            &format!("{t}A"),
            &t.replace("ferry-node-v1", "ferry-node-v2"),
            &format!("{}+{}", &t[..20], &t[21..]),
            &long,
        ] {
            assert!(NodePublic::from_text(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unsafe_public_keys_are_refused() {
        let good = NodeKeys::generate().public();
        // X25519 points of small order: 0 and 1 (and 0 with the high bit, which X25519 ignores).
        let mut hi = [0u8; 32];
        hi[31] = 0x80;
        let mut one = [0u8; 32];
        one[0] = 1;
        for x in [[0u8; 32], one, hi] {
            let p = NodePublic { x25519: x, ..good };
            assert!(NodePublic::from_bytes(&p.to_bytes()).is_err());
        }
        // The Ed25519 identity point is weak.
        let mut id = [0u8; 32];
        id[0] = 1;
        let p = NodePublic { ed25519: id, ..good };
        assert!(NodePublic::from_bytes(&p.to_bytes()).is_err());
        let mut b = good.to_bytes();
        b[6] = 1; // kind: secret
        assert!(NodePublic::from_bytes(&b).is_err());
    }

    #[test]
    fn recipients_are_listed_and_never_silently_replaced() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        let own = NodeKeys::init(dir).unwrap();
        assert!(recipients(dir).unwrap().is_empty());
        let b = NodeKeys::generate().public();
        let a = NodeKeys::generate().public();
        add_recipient(dir, "node-b", &b).unwrap();
        add_recipient(dir, "node-a.example", &a).unwrap();
        add_recipient(dir, "node-b", &b).unwrap();
        assert!(matches!(add_recipient(dir, "node-b", &a), Err(KeyError::RecipientExists(_))));
        for bad in ["", ".", "..", ".x", "a/b", "a b", "ä", &"x".repeat(65)] {
            assert!(matches!(add_recipient(dir, bad, &a), Err(KeyError::BadName { .. })), "{bad:?}");
        }
        fs::write(dir.join(RECIPIENTS_DIR).join("README"), "ignored").unwrap();
        let r = recipients(dir).unwrap();
        assert_eq!(r, vec![("node-a.example".to_owned(), a), ("node-b".to_owned(), b)]);
        assert_eq!(trusted_signers(dir).unwrap(), vec![own.public().ed25519, a.ed25519, b.ed25519]);

        // A world-writable trust anchor is refused, as is a damaged one.
        let rdir = dir.join(RECIPIENTS_DIR);
        chmod(&rdir, 0o777);
        assert!(matches!(recipients(dir), Err(KeyError::Permissions { .. })));
        chmod(&rdir, 0o700);
        chmod(&rdir.join("node-b.pub"), 0o666);
        assert!(matches!(recipients(dir), Err(KeyError::Permissions { .. })));
        chmod(&rdir.join("node-b.pub"), 0o644);
        fs::write(rdir.join("evil.pub"), b"short").unwrap();
        assert!(matches!(recipients(dir), Err(KeyError::BadFile { .. })));
    }

    #[test]
    fn rotate_keeps_the_hash_key_and_trusts_the_old_signer() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path();
        let k1 = NodeKeys::init(dir).unwrap();
        let k2 = NodeKeys::rotate(dir).unwrap();
        let k3 = NodeKeys::rotate(dir).unwrap();
        assert_eq!(k1.hash_key(), k3.hash_key());
        assert_ne!(k1.public(), k2.public());
        assert_ne!(k2.public().x25519, k3.public().x25519);
        let loaded = NodeKeys::load(dir).unwrap();
        assert_eq!(loaded.public(), k3.public());
        assert_eq!(NodePublic::from_bytes(&fs::read(dir.join(PUB_FILE)).unwrap()).unwrap(), k3.public());
        assert_eq!(retired(dir).unwrap(), vec![k1.public(), k2.public()]);
        assert!(dir.join("retired/1.pub").is_file() && dir.join("retired/2.pub").is_file());
        assert_eq!(
            trusted_signers(dir).unwrap(),
            vec![k3.public().ed25519, k1.public().ed25519, k2.public().ed25519]
        );
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
    }
}

//! Manifests (`STORE/manifests/NAME.fmf`): what a checkpoint holds, signed by the node that
//! took it. Format: docs/store-format.md.
//!
//! Reading checks the envelope and the signature before the body is decoded at all, so an
//! untrusted file never reaches the decoder; the body is then validated as if hostile anyway
//! (a trusted peer can have bugs), with counts capped while decoding so that a small body
//! cannot demand a large allocation.

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;

use ed25519_dalek::{Signature, VerifyingKey};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::keys::{hex, ChunkId, NodeKeys};

pub const MAX_MANIFEST: usize = 256 << 20;
const MAGIC: &[u8; 4] = b"FRYM";
/// 2: the signature covers the header and the BLAKE3 hash of the body (1: the whole file,
/// which Ed25519 hashes with SHA-512: 20 ms for the 9 MiB manifest of a 1 GiB checkpoint, on
/// every restore). Both are read.
const VERSION: u16 = 2;
/// Domain of the body's hash in a version 2 signature.
const BODY_HASH_CONTEXT: &str = "ferry manifest body v2";
const HEAD_LEN: usize = 12;
const SIG_LEN: usize = 64;
const SIGNER_LEN: usize = 32;
/// Largest manifest file; refuse larger ones before reading them.
pub const MAX_MANIFEST_FILE: usize = HEAD_LEN + MAX_MANIFEST + SIG_LEN + SIGNER_LEN;

pub const MAX_FILES: usize = 100_000;
pub const MAX_EXTENTS_PER_FILE: usize = 1 << 24;
/// Largest chunk extent (the chunk frame's plaintext cap).
pub const MAX_CHUNK_LEN: u32 = 4 << 20;
const MAX_FILE_NAME: usize = 255;
const MAX_KEY_IDS: usize = crate::seal::MAX_SLOT_KEYS;
const MAX_RECIPIENTS: usize = crate::seal::MAX_SLOTS_PER_KEY;
const MAX_LOCK_TABLES: usize = 64;
const MAX_LOCK_TABLE_NAME: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("not a valid manifest: {0}")]
    BadFormat(&'static str),
    #[error("manifest is not signed")]
    Unsigned,
    #[error("manifest is signed by {}, which is not a trusted key (add the node with `ferry keys add`)", hex(.0))]
    UntrustedSigner([u8; 32]),
    #[error("manifest signature is invalid (tampered with or damaged)")]
    BadSignature,
    #[error("manifest content is invalid: {0}")]
    Invalid(String),
    #[error("manifest body of {0} bytes exceeds the 256 MiB cap")]
    TooLarge(usize),
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ManifestBody {
    pub id: [u8; 16],
    pub name: String,
    pub created: u64,
    pub generation: u64,
    pub source: String,
    pub host: HostInfo,
    pub spec: String,
    pub tcp_established: bool,
    pub leave_running: bool,
    #[serde(deserialize_with = "capped::<_, _, MAX_LOCK_TABLES>")]
    pub network_lock_tables: Vec<String>,
    pub dump_seconds: f64,
    #[serde(deserialize_with = "capped::<_, _, MAX_KEY_IDS>")]
    pub key_ids: Vec<[u8; 16]>,
    #[serde(deserialize_with = "capped::<_, _, MAX_RECIPIENTS>")]
    pub recipients: Vec<[u8; 32]>,
    #[serde(deserialize_with = "capped::<_, _, MAX_FILES>")]
    pub files: Vec<FileRecord>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct HostInfo {
    pub hostname: String,
    pub kernel: String,
    pub criu_version: String,
    pub cpu_flags: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FileRecord {
    pub name: String,
    pub size: u64,
    /// In file order, covering it exactly. No extent is empty and no two `Zero` extents are
    /// adjacent (writers merge them), which also bounds the memory a body can cost.
    #[serde(deserialize_with = "extents")]
    pub extents: Vec<Extent>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Extent {
    Chunk { id: ChunkId, len: u32 },
    Zero { len: u64 },
}

impl Extent {
    pub fn len(&self) -> u64 {
        match *self {
            Extent::Chunk { len, .. } => u64::from(len),
            Extent::Zero { len } => len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Validates `body`, then frames and signs it. Refuses what [`decode_verified`] would refuse,
/// so that no node writes a manifest that nobody can read.
pub fn encode_signed(body: &ManifestBody, keys: &NodeKeys) -> Result<Vec<u8>, ManifestError> {
    validate(body)?;
    let size = postcard::experimental::serialized_size(body)
        .map_err(|e| ManifestError::Invalid(format!("cannot encode: {e}")))?;
    if size > MAX_MANIFEST {
        return Err(ManifestError::TooLarge(size));
    }
    let mut out = Vec::with_capacity(HEAD_LEN + size + SIG_LEN + SIGNER_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(size as u32).to_le_bytes());
    let mut out =
        postcard::to_extend(body, out).map_err(|e| ManifestError::Invalid(format!("cannot encode: {e}")))?;
    let sig = keys.sign(&signed_message(VERSION, &out));
    out.extend_from_slice(&sig);
    out.extend_from_slice(&keys.public().ed25519);
    Ok(out)
}

/// Checks the envelope and the signature (by one of `trusted`), then decodes and validates
/// the body. Returns it with the key that signed it.
pub fn decode_verified(
    bytes: &[u8],
    trusted: &[[u8; 32]],
) -> Result<(ManifestBody, [u8; 32]), ManifestError> {
    if bytes.len() > MAX_MANIFEST_FILE {
        return Err(ManifestError::BadFormat("larger than the size cap"));
    }
    let Some(head) = bytes.get(..HEAD_LEN) else {
        return Err(ManifestError::BadFormat("truncated header"));
    };
    if &head[0..4] != MAGIC {
        return Err(ManifestError::BadFormat("bad magic"));
    }
    let version = u16::from_le_bytes([head[4], head[5]]);
    if version != 1 && version != VERSION {
        return Err(ManifestError::BadFormat("unsupported version"));
    }
    if head[6..8] != [0, 0] {
        return Err(ManifestError::BadFormat("reserved bytes are not zero"));
    }
    let body_len = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize;
    if body_len > MAX_MANIFEST {
        return Err(ManifestError::BadFormat("body length over the 256 MiB cap"));
    }
    let signed_len = HEAD_LEN + body_len;
    if bytes.len() == signed_len {
        return Err(ManifestError::Unsigned);
    }
    if bytes.len() != signed_len + SIG_LEN + SIGNER_LEN {
        return Err(ManifestError::BadFormat("length does not match the header"));
    }
    let (signed, tail) = bytes.split_at(signed_len);
    let mut sig = [0u8; SIG_LEN];
    sig.copy_from_slice(&tail[..SIG_LEN]);
    let mut signer = [0u8; SIGNER_LEN];
    signer.copy_from_slice(&tail[SIG_LEN..]);
    if !trusted.contains(&signer) {
        return Err(ManifestError::UntrustedSigner(signer));
    }
    let key = VerifyingKey::from_bytes(&signer).map_err(|_| ManifestError::BadSignature)?;
    // Strict: no small-order keys, no malleable signatures.
    key.verify_strict(&signed_message(version, signed), &Signature::from_bytes(&sig))
        .map_err(|_| ManifestError::BadSignature)?;
    let body = &signed[HEAD_LEN..];
    let (m, rest) = postcard::take_from_bytes::<ManifestBody>(body)
        .map_err(|e| ManifestError::Invalid(format!("body does not decode: {e}")))?;
    if !rest.is_empty() {
        return Err(ManifestError::Invalid("trailing bytes after the body".into()));
    }
    validate(&m)?;
    Ok((m, signer))
}

/// What the signature of a manifest of `version` covers, given its header and body: version 1,
/// both as they are; version 2, the header and the body's BLAKE3 hash (in its own domain).
fn signed_message(version: u16, head_and_body: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if version == 1 {
        return std::borrow::Cow::Borrowed(head_and_body);
    }
    let (head, body) = head_and_body.split_at(HEAD_LEN.min(head_and_body.len()));
    let hash = blake3::Hasher::new_derive_key(BODY_HASH_CONTEXT).update(body).finalize();
    let mut m = Vec::with_capacity(HEAD_LEN + 32);
    m.extend_from_slice(head);
    m.extend_from_slice(hash.as_bytes());
    std::borrow::Cow::Owned(m)
}

/// What every manifest must satisfy beyond decoding.
pub fn validate(m: &ManifestBody) -> Result<(), ManifestError> {
    let invalid = |s: String| Err(ManifestError::Invalid(s));
    if let Err(e) = crate::validate_name(&m.name) {
        return invalid(format!("name: {e}"));
    }
    if !m.dump_seconds.is_finite() || m.dump_seconds < 0.0 {
        return invalid("dump_seconds is not a duration".into());
    }
    if m.network_lock_tables.len() > MAX_LOCK_TABLES {
        return invalid("too many network lock tables".into());
    }
    for t in &m.network_lock_tables {
        // These names reach nft's command line.
        if t.is_empty()
            || t.len() > MAX_LOCK_TABLE_NAME
            || !t.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_'))
        {
            return invalid(format!("network lock table {:?} is not a table name", trunc(t)));
        }
    }
    if m.key_ids.len() > MAX_KEY_IDS {
        return invalid("more than 64 data keys".into());
    }
    if has_duplicates(&m.key_ids) {
        return invalid("a data key is listed twice".into());
    }
    if m.recipients.len() > MAX_RECIPIENTS {
        return invalid("more than 256 recipients".into());
    }
    if has_duplicates(&m.recipients) {
        return invalid("a recipient is listed twice".into());
    }
    if m.files.len() > MAX_FILES {
        return invalid(format!("more than {MAX_FILES} files"));
    }
    let mut names = HashSet::with_capacity(m.files.len());
    let mut any_chunk = false;
    for f in &m.files {
        if let Err(why) = check_file_name(&f.name) {
            return invalid(format!("file name {:?}: {why}", trunc(&f.name)));
        }
        if !names.insert(f.name.as_str()) {
            return invalid(format!("file {:?} is listed twice", f.name));
        }
        if f.extents.len() > MAX_EXTENTS_PER_FILE {
            return invalid(format!("file {:?} has more than 2^24 extents", f.name));
        }
        let mut sum: u64 = 0;
        let mut prev_zero = false;
        for e in &f.extents {
            match *e {
                Extent::Chunk { len, .. } => {
                    if len == 0 || len > MAX_CHUNK_LEN {
                        return invalid(format!("file {:?}: chunk length {len} not in 1..=4 MiB", f.name));
                    }
                    any_chunk = true;
                    prev_zero = false;
                }
                Extent::Zero { len } => {
                    if len == 0 {
                        return invalid(format!("file {:?}: empty zero extent", f.name));
                    }
                    if prev_zero {
                        return invalid(format!("file {:?}: adjacent zero extents (merge them)", f.name));
                    }
                    prev_zero = true;
                }
            }
            sum = match sum.checked_add(e.len()) {
                Some(s) => s,
                None => return invalid(format!("file {:?}: extents overflow", f.name)),
            };
        }
        if sum != f.size {
            return invalid(format!("file {:?}: extents cover {sum} bytes, size is {}", f.name, f.size));
        }
    }
    if any_chunk && m.key_ids.is_empty() {
        return invalid("chunks but no data key".into());
    }
    Ok(())
}

/// A plain file name: no path, no NUL, at most 255 bytes.
fn check_file_name(n: &str) -> Result<(), &'static str> {
    if n.is_empty() {
        return Err("empty");
    }
    if n.len() > MAX_FILE_NAME {
        return Err("longer than 255 bytes");
    }
    if n == "." || n == ".." {
        return Err("not a file name");
    }
    if n.contains(['/', '\0']) {
        return Err("contains '/' or NUL");
    }
    Ok(())
}

fn has_duplicates<T: Eq + std::hash::Hash>(v: &[T]) -> bool {
    let mut seen = HashSet::with_capacity(v.len());
    v.iter().any(|x| !seen.insert(x))
}

/// For messages: hostile strings are cut short.
fn trunc(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Preallocation is bounded as serde's own is: a hostile length gets no more than this.
const PREALLOC_BYTES: usize = 1 << 20;

fn capped<'de, D, T, const N: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T, const N: usize>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a sequence of at most {N} elements")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let hint = seq.size_hint().unwrap_or(0);
            if hint > N {
                return Err(de::Error::invalid_length(hint, &self));
            }
            let mut v = Vec::with_capacity(hint.min(PREALLOC_BYTES / std::mem::size_of::<T>().max(1)));
            while let Some(x) = seq.next_element()? {
                if v.len() == N {
                    return Err(de::Error::invalid_length(N + 1, &self));
                }
                v.push(x);
            }
            Ok(v)
        }
    }
    d.deserialize_seq(V::<T, N>(PhantomData))
}

/// Extents, refusing while decoding what [`validate`] refuses later: without it a body of
/// 2-byte `Zero` extents would cost 20 times its size in memory.
fn extents<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Extent>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<Extent>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "at most 2^24 non-empty extents, no two zero extents adjacent")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Extent>, A::Error> {
            let hint = seq.size_hint().unwrap_or(0);
            if hint > MAX_EXTENTS_PER_FILE {
                return Err(de::Error::invalid_length(hint, &self));
            }
            let mut v: Vec<Extent> =
                Vec::with_capacity(hint.min(PREALLOC_BYTES / std::mem::size_of::<Extent>()));
            while let Some(e) = seq.next_element::<Extent>()? {
                if v.len() == MAX_EXTENTS_PER_FILE {
                    return Err(de::Error::invalid_length(v.len() + 1, &self));
                }
                let adjacent_zero =
                    matches!(e, Extent::Zero { .. }) && matches!(v.last(), Some(Extent::Zero { .. }));
                if e.is_empty() || adjacent_zero {
                    return Err(de::Error::invalid_value(de::Unexpected::Other("extent"), &self));
                }
                v.push(e);
            }
            Ok(v)
        }
    }
    d.deserialize_seq(V)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing test should stop right there
mod tests {
    use super::*;

    fn sample(keys: &NodeKeys) -> ManifestBody {
        let page = |b: u8| keys.chunk_id(&[b; 4096]);
        ManifestBody {
            id: [7; 16],
            name: "web1".into(),
            created: 1_760_000_000,
            generation: 3,
            source: "pid:1234".into(),
            host: HostInfo {
                hostname: "node-a".into(),
                kernel: "6.8.0".into(),
                criu_version: "4.0".into(),
                cpu_flags: "fpu sse2 avx2".into(),
            },
            spec: r#"{"kind":"pid"}"#.into(),
            tcp_established: true,
            leave_running: false,
            network_lock_tables: vec!["CRIU-1a2b3c".into()],
            dump_seconds: 0.25,
            key_ids: vec![[1; 16]],
            recipients: vec![keys.public().x25519],
            files: vec![
                FileRecord {
                    name: "pages-1.img".into(),
                    size: 3 * 4096 + 100,
                    extents: vec![
                        Extent::Chunk { id: page(1), len: 4096 },
                        Extent::Zero { len: 4096 },
                        Extent::Chunk { id: page(2), len: 4096 },
                        Extent::Zero { len: 100 },
                    ],
                },
                FileRecord { name: "inventory.img".into(), size: 0, extents: vec![] },
            ],
        }
    }

    /// Frames and signs arbitrary body bytes, as a buggy or hostile trusted peer could.
    fn sign_raw(body: &[u8], keys: &NodeKeys) -> Vec<u8> {
        sign_raw_as(VERSION, body, keys)
    }

    fn sign_raw_as(version: u16, body: &[u8], keys: &NodeKeys) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
        let sig = keys.sign(&signed_message(version, &out));
        out.extend_from_slice(&sig);
        out.extend_from_slice(&keys.public().ed25519);
        out
    }

    fn signed_body(m: &ManifestBody, keys: &NodeKeys) -> Vec<u8> {
        sign_raw(&postcard::to_allocvec(m).unwrap(), keys)
    }

    #[test]
    fn round_trips() {
        let k = NodeKeys::generate();
        let m = sample(&k);
        let bytes = encode_signed(&m, &k).unwrap();
        let (back, signer) = decode_verified(&bytes, &[k.public().ed25519]).unwrap();
        assert_eq!(back, m);
        assert_eq!(signer, k.public().ed25519);
        assert_eq!(&bytes[..4], b"FRYM");
        assert_eq!(bytes.len(), HEAD_LEN + postcard::to_allocvec(&m).unwrap().len() + 96);
    }

    /// Manifests of version 1 (signed whole, as ferry wrote them before) still verify; a
    /// version 1 signature does not pass for version 2 or the reverse; unknown versions fail.
    #[test]
    fn version_1_manifests_are_still_read() {
        let k = NodeKeys::generate();
        let m = sample(&k);
        let body = postcard::to_allocvec(&m).unwrap();
        let trusted = [k.public().ed25519];
        let v1 = sign_raw_as(1, &body, &k);
        assert_eq!(decode_verified(&v1, &trusted).unwrap().0, m);
        let mut relabelled = v1.clone();
        relabelled[4] = 2;
        assert!(matches!(decode_verified(&relabelled, &trusted), Err(ManifestError::BadSignature)));
        let mut v2 = encode_signed(&m, &k).unwrap();
        assert_eq!(u16::from_le_bytes([v2[4], v2[5]]), 2);
        v2[4] = 1;
        assert!(matches!(decode_verified(&v2, &trusted), Err(ManifestError::BadSignature)));
        let mut v3 = sign_raw_as(3, &body, &k);
        assert!(matches!(decode_verified(&v3, &trusted), Err(ManifestError::BadFormat(_))));
        v3[4] = 0;
        assert!(decode_verified(&v3, &trusted).is_err());
    }

    #[test]
    fn any_flipped_byte_fails() {
        let k = NodeKeys::generate();
        let bytes = encode_signed(&sample(&k), &k).unwrap();
        let trusted = [k.public().ed25519];
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert!(decode_verified(&bad, &trusted).is_err(), "flip at {i} accepted");
        }
    }

    #[test]
    fn distinct_errors_for_distinct_failures() {
        let k = NodeKeys::generate();
        let other = NodeKeys::generate();
        let trusted = [k.public().ed25519];
        let bytes = encode_signed(&sample(&k), &k).unwrap();
        let body_end = bytes.len() - 96;

        assert!(matches!(decode_verified(&bytes[..body_end], &trusted), Err(ManifestError::Unsigned)));
        assert!(matches!(decode_verified(&bytes, &[]), Err(ManifestError::UntrustedSigner(_))));
        let by_other = encode_signed(&sample(&k), &other).unwrap();
        assert!(matches!(
            decode_verified(&by_other, &trusted),
            Err(ManifestError::UntrustedSigner(s)) if s == other.public().ed25519
        ));
        // Claims a trusted signer but was signed by another key.
        let mut forged = by_other.clone();
        let n = forged.len();
        forged[n - 32..].copy_from_slice(&k.public().ed25519);
        assert!(matches!(decode_verified(&forged, &trusted), Err(ManifestError::BadSignature)));
        let mut bad_sig = bytes.clone();
        bad_sig[body_end + 3] ^= 4;
        assert!(matches!(decode_verified(&bad_sig, &trusted), Err(ManifestError::BadSignature)));
        for (i, v) in [(0, b'X'), (4, 3), (6, 1)] {
            let mut b = bytes.clone();
            b[i] = v;
            assert!(matches!(decode_verified(&b, &trusted), Err(ManifestError::BadFormat(_))));
        }
        // Invalid content, properly signed by a trusted key.
        let mut m = sample(&k);
        m.files[0].size += 1;
        let e = decode_verified(&signed_body(&m, &k), &trusted).unwrap_err();
        assert!(matches!(&e, ManifestError::Invalid(d) if d.contains("cover")), "{e}");
        assert!(matches!(encode_signed(&m, &k), Err(ManifestError::Invalid(_))));
    }

    #[test]
    fn old_manifests_verify_after_rotation() {
        let t = tempfile::tempdir().unwrap();
        let k1 = NodeKeys::init(t.path()).unwrap();
        let old = encode_signed(&sample(&k1), &k1).unwrap();
        let k2 = NodeKeys::rotate(t.path()).unwrap();
        let new = encode_signed(&sample(&k2), &k2).unwrap();
        let trusted = crate::keys::trusted_signers(t.path()).unwrap();
        assert_eq!(decode_verified(&old, &trusted).unwrap().1, k1.public().ed25519);
        assert_eq!(decode_verified(&new, &trusted).unwrap().1, k2.public().ed25519);
        // A peer's manifest is trusted once the peer is a recipient.
        let peer = NodeKeys::generate();
        let theirs = encode_signed(&sample(&peer), &peer).unwrap();
        assert!(decode_verified(&theirs, &trusted).is_err());
        crate::keys::add_recipient(t.path(), "peer", &peer.public()).unwrap();
        let trusted = crate::keys::trusted_signers(t.path()).unwrap();
        decode_verified(&theirs, &trusted).unwrap();
    }

    #[test]
    fn invalid_bodies_are_refused() {
        let k = NodeKeys::generate();
        let trusted = [k.public().ed25519];
        type Change = Box<dyn Fn(&mut ManifestBody)>;
        let cases: Vec<(&str, Change)> = vec![
            ("name", Box::new(|m| m.name = "../etc".into())),
            ("name", Box::new(|m| m.name = String::new())),
            ("file name", Box::new(|m| m.files[1].name = "a/b".into())),
            ("file name", Box::new(|m| m.files[1].name = "..".into())),
            ("file name", Box::new(|m| m.files[1].name = ".".into())),
            ("file name", Box::new(|m| m.files[1].name = "a\0b".into())),
            ("file name", Box::new(|m| m.files[1].name = String::new())),
            ("file name", Box::new(|m| m.files[1].name = "x".repeat(256))),
            ("twice", Box::new(|m| m.files[1].name = "pages-1.img".into())),
            (
                "chunk length",
                Box::new(|m| {
                    m.files[0].extents[0] = Extent::Chunk { id: [0; 32], len: (4 << 20) + 1 };
                    m.files[0].size += 4 << 20;
                }),
            ),
            ("cover", Box::new(|m| m.files[1].size = 1)),
            (
                "overflow",
                Box::new(|m| {
                    m.files[1].extents =
                        vec![Extent::Zero { len: u64::MAX }, Extent::Chunk { id: [0; 32], len: 1 }];
                }),
            ),
            ("data key", Box::new(|m| m.key_ids.clear())),
            ("twice", Box::new(|m| m.key_ids.push([1; 16]))),
            ("twice", Box::new(|m| m.recipients.push(m.recipients[0]))),
            ("dump_seconds", Box::new(|m| m.dump_seconds = f64::NAN)),
            ("lock table", Box::new(|m| m.network_lock_tables.push("x; rm -rf /".into()))),
        ];
        for (want, change) in &cases {
            let mut m = sample(&k);
            change(&mut m);
            let e = decode_verified(&signed_body(&m, &k), &trusted).unwrap_err();
            assert!(matches!(&e, ManifestError::Invalid(d) if d.contains(want)), "{want}: {e}");
            assert!(encode_signed(&m, &k).is_err(), "{want}: encoded");
        }
        // Rules enforced while decoding (a generic decode error, but refused all the same).
        for change in [
            |m: &mut ManifestBody| m.files[0].extents[1] = Extent::Zero { len: 0 },
            |m: &mut ManifestBody| m.files[0].extents.insert(1, Extent::Zero { len: 1 }),
        ] {
            let mut m = sample(&k);
            change(&mut m);
            m.files[0].size = m.files[0].extents.iter().map(Extent::len).sum();
            assert!(matches!(
                decode_verified(&signed_body(&m, &k), &trusted),
                Err(ManifestError::Invalid(_))
            ));
            assert!(encode_signed(&m, &k).is_err());
        }
    }

    #[test]
    fn hostile_envelopes_and_bodies_are_refused_without_panic() {
        let k = NodeKeys::generate();
        let trusted = [k.public().ed25519];
        let bytes = encode_signed(&sample(&k), &k).unwrap();
        for n in 0..bytes.len() {
            assert!(decode_verified(&bytes[..n], &trusted).is_err());
        }
        let mut huge = bytes.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_verified(&huge, &trusted), Err(ManifestError::BadFormat(_))));
        let mut trailing = postcard::to_allocvec(&sample(&k)).unwrap();
        trailing.push(0);
        assert!(matches!(
            decode_verified(&sign_raw(&trailing, &k), &trusted),
            Err(ManifestError::Invalid(_))
        ));
        // Signed bodies claiming huge counts: refused before allocating for them.
        let mut m = sample(&k);
        m.files.clear();
        let base = postcard::to_allocvec(&m).unwrap();
        // `files` is the last field: replace its length (0) with 2^32-1 and 2^21.
        assert_eq!(base.last(), Some(&0));
        for len in [[0xff, 0xff, 0xff, 0xff, 0x0f].as_slice(), &[0x80, 0x80, 0x80, 0x01]] {
            let mut b = base[..base.len() - 1].to_vec();
            b.extend_from_slice(len);
            assert!(matches!(decode_verified(&sign_raw(&b, &k), &trusted), Err(ManifestError::Invalid(_))));
        }
        // One file whose extent count claims 2^24 + 1 and 2^24 (with no extents present).
        for varint in [[0x81, 0x80, 0x80, 0x08].as_slice(), &[0x80, 0x80, 0x80, 0x08]] {
            let mut b = base[..base.len() - 1].to_vec();
            b.extend_from_slice(&[1, 1, b'f', 0]); // one file, name "f", size 0
            b.extend_from_slice(varint);
            assert!(decode_verified(&sign_raw(&b, &k), &trusted).is_err());
        }
        for raw in [&b""[..], b"FRYM", &[0u8; 200], &vec![0xffu8; 5000]] {
            assert!(decode_verified(raw, &trusted).is_err());
            assert!(decode_verified(&sign_raw(raw, &k), &trusted).is_err());
        }
    }

    #[test]
    fn oversized_bodies_are_refused_when_encoding() {
        let k = NodeKeys::generate();
        let mut m = sample(&k);
        m.spec = "x".repeat(MAX_MANIFEST);
        assert!(matches!(encode_signed(&m, &k), Err(ManifestError::TooLarge(_))));
    }
}

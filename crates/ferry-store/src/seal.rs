//! Sealing chunks (compress, then an AEAD under the checkpoint's data key) and wrapping data
//! keys for recipients (key slots). Formats: docs/store-format.md.
//!
//! Two chunk frame formats; both are opened, so checkpoints of either restore and dedup
//! against each other (a chunk's id does not depend on its frame):
//! - **2, AES-256-GCM**, written where the CPU has AES and carry-less multiply instructions
//!   ([`FrameFormat::preferred`]): ring's AES-256-GCM seals 4 KiB chunks in 0.30 of the time
//!   of format 1 on this project's machines (`examples/seal_bench.rs`, docs/store-format.md).
//!   GCM's 96-bit nonce is too short to leave to chance with room to spare, so each [`Sealer`]
//!   draws a random 128-bit salt, derives its own chunk key
//!   `BLAKE3-derive_key("ferry 2026 chunk key", DK || salt)` once, and numbers its frames 0,
//!   1, 2, ...: no nonce can repeat under a chunk key, and two sealers share a chunk key only
//!   if they draw the same salt for the same data key. After 2^32 AES blocks (64 GiB) under
//!   one chunk key the sealer draws a new salt.
//! - **1, XChaCha20-Poly1305**, random 192-bit nonces: HChaCha20 (RustCrypto's `chacha20`) for
//!   the per-nonce subkey, then ring's ChaCha20-Poly1305 (draft-irtf-cfrg-xchacha). Written
//!   where AES has no hardware support (ring's constant-time software AES is slower than
//!   ChaCha20 there), and by ferry before format 2.
//!
//! [`Sealer::seal`] runs once per 4 KiB page for GiBs, so it allocates nothing and makes no
//! syscall per call: salts and nonces come from a ChaCha20 CSPRNG seeded once from the OS,
//! the zstd context and the chunk key are reused. An [`Opener`] keeps the chunk keys of the
//! last salts it met (a sealer's frames lie together in packs). Key slots stay
//! XChaCha20-Poly1305: one per key and recipient, speed does not matter there. Tests check
//! frames and slots against RustCrypto's `aes-gcm` and `chacha20poly1305`.

use std::fmt;

use chacha20::cipher::consts::U10;
use rand_chacha::ChaCha20Rng;
use rand_core::{OsRng, RngCore, SeedableRng};
use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

use crate::keys::{hex, ChunkId};

/// Bytes of a frame before its body (the same in both formats).
pub const HEADER_LEN: usize = 56;
/// Largest plaintext of one chunk.
pub const MAX_PLAIN: usize = 4 << 20;
/// Largest body the format allows (this sealer never expands: at most `MAX_PLAIN + 16`).
pub const MAX_BODY: usize = MAX_PLAIN + (64 << 10);
/// Largest frame; readers of packs can refuse a larger length before reading.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_BODY;
const TAG_LEN: usize = 16;
const FRAME_MAGIC: &[u8; 4] = b"FRYC";
const FLAG_ZSTD: u8 = 1;
/// Format 2: the salt that picks a sealer's chunk key, then its frame number, fill the 24
/// bytes that hold format 1's nonce.
const SALT_LEN: usize = 16;
/// AES blocks (16 bytes) one chunk key may encrypt: 64 GiB keeps GCM's bound for a key
/// (blocks² / 2^129) below 2^-65.
const MAX_GCM_BLOCKS: u64 = 1 << 32;
/// Chunk keys an [`Opener`] keeps.
const GCM_CACHE: usize = 16;

/// zstd level, measured on 4 KiB pages (`throughput` test, one core): -1 seals random pages
/// at 1.5 GiB/s (level 1: 1.05) and real heap pages at 710 MiB/s (level 1: 490), storing
/// 18% of them (level 1: 17%); -3 and below save little more time and compress worse.
const ZSTD_LEVEL: i32 = -1;
/// Smaller chunks are not worth a zstd call.
const MIN_COMPRESS: usize = 64;

/// One key slot: eph_pub (32) || R (32) || nonce (24) || sealed DK (32 + 16).
pub const SLOT_LEN: usize = 136;
const SLOTS_MAGIC: &[u8; 4] = b"FRYS";
const SLOTS_VERSION: u16 = 1;
/// Data keys per checkpoint (format limit).
pub const MAX_SLOT_KEYS: usize = 64;
/// Slots per data key, one per recipient.
pub const MAX_SLOTS_PER_KEY: usize = 256;
/// Largest valid slots file; refuse larger ones before reading them.
pub const MAX_SLOTS_FILE: usize = 8 + MAX_SLOT_KEYS * (18 + MAX_SLOTS_PER_KEY * SLOT_LEN);

const KEY_ID_CONTEXT: &str = "ferry 2026 data key id";
const KEY_WRAP_CONTEXT: &str = "ferry 2026 key wrap";
const CHUNK_KEY_CONTEXT: &str = "ferry 2026 chunk key";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("bad chunk frame: {0}")]
    BadFrame(&'static str),
    #[error("chunk frame of format {0}: this ferry reads formats 1 and 2 (written by a newer ferry?)")]
    UnsupportedVersion(u8),
    #[error("chunk sealed with unknown data key {}", hex(.0))]
    UnknownKey([u8; 16]),
    #[error("chunk failed authentication (corrupted, tampered with, or stored under another id)")]
    AuthFailed,
    #[error("chunk content does not match its id")]
    HashMismatch,
    #[error("authenticated chunk does not decompress to its length")]
    Decompress,
    #[error("bad key slots: {0}")]
    BadSlots(&'static str),
    #[error("X25519 key of small order")]
    WeakKey,
    #[error("key slot is for another recipient")]
    NotRecipient,
    #[error("key slot does not open (wrong key, or tampered with)")]
    SlotAuthFailed,
    #[error("no key slot for this node's key opens data key {}", hex(.0))]
    NoSlot([u8; 16]),
}

/// The AEAD of a chunk frame; its discriminant is the frame's version byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameFormat {
    /// XChaCha20-Poly1305 under the data key, random 192-bit nonce.
    XChaCha20Poly1305 = 1,
    /// AES-256-GCM under a sealer's chunk key (data key and salt), numbered nonces.
    Aes256Gcm = 2,
}

impl FrameFormat {
    /// AES-256-GCM where the CPU has AES and carry-less multiply instructions (ring uses them
    /// when present), XChaCha20-Poly1305 elsewhere.
    pub fn preferred() -> FrameFormat {
        if hardware_aes() {
            FrameFormat::Aes256Gcm
        } else {
            FrameFormat::XChaCha20Poly1305
        }
    }

    pub fn version(self) -> u8 {
        self as u8
    }

    fn from_version(v: u8) -> Result<FrameFormat, SealError> {
        match v {
            1 => Ok(FrameFormat::XChaCha20Poly1305),
            2 => Ok(FrameFormat::Aes256Gcm),
            other => Err(SealError::UnsupportedVersion(other)),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn hardware_aes() -> bool {
    std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
}

#[cfg(target_arch = "aarch64")]
fn hardware_aes() -> bool {
    // Rust's "aes" feature on aarch64 is FEAT_AES together with FEAT_PMULL.
    std::arch::is_aarch64_feature_detected!("aes")
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn hardware_aes() -> bool {
    false
}

/// A checkpoint's data key. Wiped when dropped.
#[derive(Clone)]
pub struct DataKey {
    id: [u8; 16],
    key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey").field("id", &hex(&self.id)).finish_non_exhaustive()
    }
}

impl DataKey {
    pub fn generate() -> DataKey {
        let mut key = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(key.as_mut());
        Self::from_key(key)
    }

    /// A data key from its bytes (fixed keys for tests and fuzzing); its id is derived.
    pub fn from_bytes(key: &[u8; 32]) -> DataKey {
        Self::from_key(Zeroizing::new(*key))
    }

    fn from_key(key: Zeroizing<[u8; 32]>) -> DataKey {
        DataKey { id: key_id_of(&key), key }
    }

    pub fn id(&self) -> [u8; 16] {
        self.id
    }
}

fn key_id_of(key: &[u8; 32]) -> [u8; 16] {
    let d = Zeroizing::new(blake3::derive_key(KEY_ID_CONTEXT, key));
    let mut id = [0u8; 16];
    id.copy_from_slice(&d[..16]);
    id
}

/// Format 2's chunk key of data key `dk` and `salt`.
fn chunk_key(dk: &[u8; 32], salt: &[u8; SALT_LEN]) -> LessSafeKey {
    let mut material = Zeroizing::new([0u8; 32 + SALT_LEN]);
    material[..32].copy_from_slice(dk);
    material[32..].copy_from_slice(salt);
    let key = Zeroizing::new(blake3::derive_key(CHUNK_KEY_CONTEXT, material.as_ref()));
    // ring refuses only a key of the wrong length.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key.as_ref()).expect("a 32-byte AES-256 key"))
}

/// Format 2's GCM nonce from the header's 24 nonce bytes (salt || frame number u64): the
/// frame number, little-endian, then 4 zero bytes.
fn gcm_nonce(field: &[u8; 24]) -> Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&field[SALT_LEN..]);
    Nonce::assume_unique_for_key(n)
}

/// A sealer's current format-2 chunk key.
struct GcmKey {
    salt: [u8; SALT_LEN],
    key: LessSafeKey,
    /// Number of the next frame: the nonce.
    next: u64,
    /// AES blocks encrypted under `key` so far.
    blocks: u64,
}

impl GcmKey {
    fn draw(dk: &[u8; 32], rng: &mut ChaCha20Rng) -> GcmKey {
        let mut salt = [0u8; SALT_LEN];
        rng.fill_bytes(&mut salt);
        GcmKey { salt, key: chunk_key(dk, &salt), next: 0, blocks: 0 }
    }
}

enum Cipher {
    XChaCha,
    // Boxed: ring's AES key with its GHASH table is 576 bytes.
    Gcm(Box<GcmKey>),
}

/// Seals chunks under one data key. One per thread; not to be used in a forked child
/// (parent and child would draw the same nonces, or number frames alike under one key).
pub struct Sealer {
    key_id: [u8; 16],
    key: Zeroizing<[u8; 32]>,
    cipher: Cipher,
    rng: ChaCha20Rng,
    // None if zstd could not allocate its context: chunks are then stored uncompressed.
    zstd: Option<zstd::bulk::Compressor<'static>>,
    // Compressed plaintext of the last chunk; wiped on drop.
    scratch: Vec<u8>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("key_id", &hex(&self.key_id))
            .field("format", &self.format())
            .finish_non_exhaustive()
    }
}

impl Drop for Sealer {
    fn drop(&mut self) {
        self.scratch.zeroize();
    }
}

impl Sealer {
    /// A sealer of frames in [`FrameFormat::preferred`].
    pub fn new(key: &DataKey) -> Sealer {
        Self::with_format(key, FrameFormat::preferred())
    }

    /// A sealer of frames in `format` (tests and measurements of either format).
    pub fn with_format(key: &DataKey, format: FrameFormat) -> Sealer {
        let mut seed = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(seed.as_mut());
        let mut rng = ChaCha20Rng::from_seed(*seed);
        let cipher = match format {
            FrameFormat::XChaCha20Poly1305 => Cipher::XChaCha,
            FrameFormat::Aes256Gcm => Cipher::Gcm(Box::new(GcmKey::draw(&key.key, &mut rng))),
        };
        Sealer {
            key_id: key.id,
            key: key.key.clone(),
            cipher,
            rng,
            zstd: zstd::bulk::Compressor::new(ZSTD_LEVEL).ok(),
            scratch: Vec::new(),
        }
    }

    pub fn format(&self) -> FrameFormat {
        match self.cipher {
            Cipher::XChaCha => FrameFormat::XChaCha20Poly1305,
            Cipher::Gcm(_) => FrameFormat::Aes256Gcm,
        }
    }

    /// Appends the frame of chunk `id` to `out`. zstd's output is kept only if it saves at
    /// least 1/8 of the plaintext.
    ///
    /// # Panics
    /// If `plaintext` is longer than [`MAX_PLAIN`] (the pipeline's chunks never are).
    pub fn seal(&mut self, id: &ChunkId, plaintext: &[u8], out: &mut Vec<u8>) {
        self.seal_with(id, plaintext, out, true);
    }

    /// Like [`Sealer::seal`], trying compression only if `try_compress`; true if the frame
    /// holds compressed data.
    pub fn seal_with(
        &mut self,
        id: &ChunkId,
        plaintext: &[u8],
        out: &mut Vec<u8>,
        try_compress: bool,
    ) -> bool {
        assert!(plaintext.len() <= MAX_PLAIN, "chunk of {} bytes exceeds 4 MiB", plaintext.len());
        let compressed = if try_compress { self.compress(plaintext) } else { None };
        let nonce = self.next_nonce(compressed.unwrap_or(plaintext.len()));
        let (flags, payload) = match compressed {
            Some(n) => (FLAG_ZSTD, &self.scratch[..n]),
            None => (0, plaintext),
        };
        // Both fit in u32: they are at most MAX_PLAIN + 16.
        let header = Header {
            format: self.format(),
            flags,
            key_id: self.key_id,
            nonce,
            plain_len: plaintext.len() as u32,
            body_len: (payload.len() + TAG_LEN) as u32,
        }
        .to_bytes();
        let start = out.len();
        out.reserve(HEADER_LEN + payload.len() + TAG_LEN);
        out.extend_from_slice(&header);
        out.extend_from_slice(payload);
        let aad = aad(&header, id);
        let body = &mut out[start + HEADER_LEN..];
        let sealed = match &self.cipher {
            Cipher::XChaCha => xseal(&self.key, &nonce, &aad, body),
            Cipher::Gcm(g) => {
                tag_of(g.key.seal_in_place_separate_tag(gcm_nonce(&nonce), Aad::from(&aad), body))
            }
        };
        match sealed {
            Ok(tag) => {
                out.extend_from_slice(&tag);
                flags == FLAG_ZSTD
            }
            Err(()) => {
                // Only for messages over 64 GiB; never leave plaintext in `out`.
                out[start..].zeroize();
                out.truncate(start);
                panic!("{:?} refused a {} byte chunk", self.format(), payload.len());
            }
        }
    }

    /// The 24 nonce bytes of the next frame, whose payload is `payload_len` bytes: format 1's
    /// random nonce, or format 2's salt and frame number (a new chunk key first if this frame
    /// would take the current one past [`MAX_GCM_BLOCKS`]).
    fn next_nonce(&mut self, payload_len: usize) -> [u8; 24] {
        let mut nonce = [0u8; 24];
        match &mut self.cipher {
            Cipher::XChaCha => self.rng.fill_bytes(&mut nonce),
            Cipher::Gcm(g) => {
                // The counter blocks of the payload, and one for the tag.
                let blocks = payload_len.div_ceil(16) as u64 + 1;
                if g.blocks + blocks > MAX_GCM_BLOCKS {
                    **g = GcmKey::draw(&self.key, &mut self.rng);
                }
                g.blocks += blocks;
                nonce[..SALT_LEN].copy_from_slice(&g.salt);
                nonce[SALT_LEN..].copy_from_slice(&g.next.to_le_bytes());
                g.next += 1;
            }
        }
        nonce
    }

    /// Compresses into `scratch`; the length if it saved at least 1/8.
    fn compress(&mut self, plaintext: &[u8]) -> Option<usize> {
        if plaintext.len() < MIN_COMPRESS {
            return None;
        }
        let zstd = self.zstd.as_mut()?;
        let limit = plaintext.len() - plaintext.len() / 8;
        if self.scratch.len() < limit {
            self.scratch.resize(limit, 0);
        }
        // A destination of exactly `limit` bytes lets zstd give up as soon as it overflows.
        match zstd.compress_to_buffer(plaintext, &mut self.scratch[..limit]) {
            Ok(n) if n > 0 && n <= limit => Some(n),
            _ => None,
        }
    }
}

fn tag_of(tag: Result<Tag, ring::error::Unspecified>) -> Result<[u8; TAG_LEN], ()> {
    let tag = tag.map_err(|_| ())?;
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(tag.as_ref());
    Ok(t)
}

/// ring's key and nonce for XChaCha20 nonce `nonce`: key HChaCha20(key, nonce[..16]), nonce
/// 0000 || nonce[16..].
fn xchacha_key(key: &[u8; 32], nonce: &[u8; 24]) -> Result<(LessSafeKey, Nonce), ()> {
    let mut sub = chacha20::hchacha::<U10>(key.into(), nonce[..16].into());
    let k = UnboundKey::new(&CHACHA20_POLY1305, &sub).map_err(|_| ());
    sub.as_mut_slice().zeroize();
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&nonce[16..]);
    Ok((LessSafeKey::new(k?), Nonce::assume_unique_for_key(n)))
}

/// XChaCha20-Poly1305 in place; the tag.
fn xseal(key: &[u8; 32], nonce: &[u8; 24], aad: &[u8], buf: &mut [u8]) -> Result<[u8; TAG_LEN], ()> {
    let (k, n) = xchacha_key(key, nonce)?;
    tag_of(k.seal_in_place_separate_tag(n, Aad::from(aad), buf))
}

/// Checks the tag, then decrypts in place (on failure `buf` is left unspecified, never
/// returned).
fn xopen(
    key: &[u8; 32],
    nonce: &[u8; 24],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), SealError> {
    let (k, n) = xchacha_key(key, nonce).map_err(|()| SealError::AuthFailed)?;
    k.open_in_place_separate_tag(n, Aad::from(aad), Tag::from(*tag), buf, 0..)
        .map_err(|_| SealError::AuthFailed)?;
    Ok(())
}

fn aad(header: &[u8; HEADER_LEN], id: &ChunkId) -> [u8; HEADER_LEN + 32] {
    let mut a = [0u8; HEADER_LEN + 32];
    a[..HEADER_LEN].copy_from_slice(header);
    a[HEADER_LEN..].copy_from_slice(id);
    a
}

struct Header {
    format: FrameFormat,
    flags: u8,
    key_id: [u8; 16],
    /// Format 1: the XChaCha20 nonce; format 2: salt (16) || frame number (u64).
    nonce: [u8; 24],
    plain_len: u32,
    body_len: u32,
}

impl Header {
    fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(FRAME_MAGIC);
        h[4] = self.format.version();
        h[5] = self.flags;
        // h[6..8]: reserved, 0
        h[8..24].copy_from_slice(&self.key_id);
        h[24..48].copy_from_slice(&self.nonce);
        h[48..52].copy_from_slice(&self.plain_len.to_le_bytes());
        h[52..56].copy_from_slice(&self.body_len.to_le_bytes());
        h
    }

    /// Parses and checks the first 56 bytes of `b`. Beyond the format's caps it insists on
    /// what a sealer produces: a raw body is exactly plaintext + tag, a compressed one is
    /// smaller than the plaintext.
    fn parse(b: &[u8]) -> Result<(Header, [u8; HEADER_LEN]), SealError> {
        let Some(h) = b.get(..HEADER_LEN) else {
            return Err(SealError::BadFrame("shorter than its header"));
        };
        let mut raw = [0u8; HEADER_LEN];
        raw.copy_from_slice(h);
        if &raw[0..4] != FRAME_MAGIC {
            return Err(SealError::BadFrame("bad magic"));
        }
        let format = FrameFormat::from_version(raw[4])?;
        let flags = raw[5];
        if flags & !FLAG_ZSTD != 0 {
            return Err(SealError::BadFrame("unknown flags"));
        }
        if raw[6..8] != [0, 0] {
            return Err(SealError::BadFrame("reserved bytes are not zero"));
        }
        let u32_at = |i: usize| u32::from_le_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
        let (plain_len, body_len) = (u32_at(48), u32_at(52));
        let (plain, body) = (plain_len as usize, body_len as usize);
        if plain > MAX_PLAIN {
            return Err(SealError::BadFrame("plaintext length over 4 MiB"));
        }
        if body > MAX_BODY {
            return Err(SealError::BadFrame("body length over cap"));
        }
        if body < TAG_LEN {
            return Err(SealError::BadFrame("body shorter than the tag"));
        }
        let payload = body - TAG_LEN;
        if flags & FLAG_ZSTD == 0 && payload != plain {
            return Err(SealError::BadFrame("body length does not match plaintext length"));
        }
        if flags & FLAG_ZSTD != 0 && (payload == 0 || payload >= plain) {
            return Err(SealError::BadFrame("compressed body not smaller than plaintext"));
        }
        let mut key_id = [0u8; 16];
        key_id.copy_from_slice(&raw[8..24]);
        let mut nonce = [0u8; 24];
        nonce.copy_from_slice(&raw[24..48]);
        Ok((Header { format, flags, key_id, nonce, plain_len, body_len }, raw))
    }
}

/// Total length of the frame whose first 56 bytes are `header` (checked as [`Opener::open`]
/// checks them), so that readers of packs never read more than the caps allow.
pub fn frame_len(header: &[u8]) -> Result<usize, SealError> {
    let (h, _) = Header::parse(header)?;
    Ok(HEADER_LEN + h.body_len as usize)
}

/// The data keys of the checkpoints being read, by id.
#[derive(Debug, Default, Clone)]
pub struct KeyRing {
    // Few keys per restore (a checkpoint has at most 64): a scan beats hashing.
    keys: Vec<DataKey>,
}

impl KeyRing {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `k`, replacing a key with the same id.
    pub fn insert(&mut self, k: DataKey) {
        match self.keys.iter_mut().find(|x| x.id == k.id) {
            Some(slot) => *slot = k,
            None => self.keys.push(k),
        }
    }

    pub fn get(&self, id: &[u8; 16]) -> Option<&DataKey> {
        self.keys.iter().find(|k| &k.id == id)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = [u8; 16]> + '_ {
        self.keys.iter().map(|k| k.id)
    }
}

/// The chunk keys of the last [`GCM_CACHE`] (data key, salt) pairs an opener met: a miss
/// costs a BLAKE3 derivation and an AES key schedule, about as much as opening a 4 KiB chunk.
#[derive(Default)]
struct GcmCache {
    entries: Vec<([u8; 16], [u8; SALT_LEN], LessSafeKey)>,
    /// The entry replaced next once the cache is full.
    next: usize,
}

impl GcmCache {
    fn get(&mut self, dk: &DataKey, salt: &[u8; SALT_LEN]) -> &LessSafeKey {
        let i = match self.entries.iter().position(|(id, s, _)| *id == dk.id && s == salt) {
            Some(i) => i,
            None => {
                let entry = (dk.id, *salt, chunk_key(&dk.key, salt));
                if self.entries.len() < GCM_CACHE {
                    self.entries.push(entry);
                    self.entries.len() - 1
                } else {
                    let i = self.next;
                    self.entries[i] = entry;
                    self.next = (i + 1) % GCM_CACHE;
                    i
                }
            }
        };
        &self.entries[i].2
    }
}

/// Checks the tag of a frame with header `h` sealed under `dk`, then decrypts `buf` in place
/// (on failure `buf` is left unspecified, never returned).
fn decrypt(
    cache: &mut GcmCache,
    dk: &DataKey,
    h: &Header,
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), SealError> {
    match h.format {
        FrameFormat::XChaCha20Poly1305 => xopen(&dk.key, &h.nonce, aad, buf, tag),
        FrameFormat::Aes256Gcm => {
            let mut salt = [0u8; SALT_LEN];
            salt.copy_from_slice(&h.nonce[..SALT_LEN]);
            cache
                .get(dk, &salt)
                .open_in_place_separate_tag(gcm_nonce(&h.nonce), Aad::from(aad), Tag::from(*tag), buf, 0..)
                .map_err(|_| SealError::AuthFailed)?;
            Ok(())
        }
    }
}

/// Opens chunk frames of either format. One per thread.
pub struct Opener<'a> {
    ring: &'a KeyRing,
    hash_key: &'a [u8; 32],
    gcm: GcmCache,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    // Decrypted, still compressed plaintext; wiped on drop.
    scratch: Vec<u8>,
}

impl fmt::Debug for Opener<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener").field("keys", &self.ring.len()).finish_non_exhaustive()
    }
}

impl Drop for Opener<'_> {
    fn drop(&mut self) {
        self.scratch.zeroize();
    }
}

impl<'a> Opener<'a> {
    pub fn new(ring: &'a KeyRing, hash_key: &'a [u8; 32]) -> Self {
        Opener {
            ring,
            hash_key,
            gcm: GcmCache::default(),
            zstd: zstd::bulk::Decompressor::new().ok(),
            scratch: Vec::new(),
        }
    }

    /// The plaintext of chunk `id` from its `frame` (exactly one frame, nothing after it).
    /// Order: header within caps, key known, tag (which binds header and id), bounded
    /// decompression, keyed hash equal to `id`.
    pub fn open(&mut self, id: &ChunkId, frame: &[u8]) -> Result<Vec<u8>, SealError> {
        let (h, _) = Header::parse(frame)?;
        let mut plain = vec![0u8; h.plain_len as usize];
        self.open_into(id, frame, &mut plain)?;
        Ok(plain)
    }
}

impl Opener<'_> {
    /// As [`open`](Self::open), into `out`, which must be exactly as long as the chunk's
    /// plaintext: nothing is allocated on the way. On failure `out` is zeroed.
    pub fn open_into(&mut self, id: &ChunkId, frame: &[u8], out: &mut [u8]) -> Result<(), SealError> {
        let r = self.open_into_unchecked(id, frame, out);
        if r.is_err() {
            out.zeroize();
        }
        r
    }

    fn open_into_unchecked(&mut self, id: &ChunkId, frame: &[u8], out: &mut [u8]) -> Result<(), SealError> {
        let (h, raw) = Header::parse(frame)?;
        if frame.len() != HEADER_LEN + h.body_len as usize {
            return Err(SealError::BadFrame("frame length does not match its header"));
        }
        if h.plain_len as usize != out.len() {
            return Err(SealError::BadFrame("plaintext length is not the one asked for"));
        }
        let key = self.ring.get(&h.key_id).ok_or(SealError::UnknownKey(h.key_id))?;
        let body = &frame[HEADER_LEN..];
        let (ct, tag) = body.split_at(body.len() - TAG_LEN);
        let aad = aad(&raw, id);
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag);
        if h.flags & FLAG_ZSTD == 0 {
            if ct.len() != out.len() {
                return Err(SealError::BadFrame("plaintext length is not the one asked for"));
            }
            out.copy_from_slice(ct);
            decrypt(&mut self.gcm, key, &h, &aad, out, &t)?;
        } else {
            self.scratch.clear();
            self.scratch.extend_from_slice(ct);
            decrypt(&mut self.gcm, key, &h, &aad, &mut self.scratch, &t)?;
            let zstd = self.zstd.as_mut().ok_or(SealError::Decompress)?;
            match zstd.decompress_to_buffer(&self.scratch, out) {
                Ok(n) if n == out.len() => {}
                _ => return Err(SealError::Decompress),
            }
        }
        if blake3::keyed_hash(self.hash_key, out) != blake3::Hash::from_bytes(*id) {
            return Err(SealError::HashMismatch);
        }
        Ok(())
    }
}

/// Wraps `dk` for the recipient X25519 key. A small-order key, which `NodePublic` never
/// holds, yields an all-zero slot that nobody can open (rather than a slot anyone could):
/// use [`try_wrap_key`] to get the error instead.
pub fn wrap_key(dk: &DataKey, recipient_x25519: &[u8; 32]) -> [u8; SLOT_LEN] {
    try_wrap_key(dk, recipient_x25519).unwrap_or([0u8; SLOT_LEN])
}

pub fn try_wrap_key(dk: &DataKey, recipient_x25519: &[u8; 32]) -> Result<[u8; SLOT_LEN], SealError> {
    let eph = StaticSecret::random_from_rng(OsRng);
    let eph_pub = PublicKey::from(&eph).to_bytes();
    let shared = eph.diffie_hellman(&PublicKey::from(*recipient_x25519));
    if !shared.was_contributory() {
        return Err(SealError::WeakKey);
    }
    let kek = kek(shared.as_bytes(), &eph_pub, recipient_x25519);
    let mut nonce = [0u8; 24];
    OsRng.fill_bytes(&mut nonce);
    let mut sealed = Zeroizing::new([0u8; 32]);
    sealed.copy_from_slice(dk.key.as_ref());
    let tag = xseal(&kek, &nonce, &slot_aad(&dk.id, recipient_x25519), sealed.as_mut())
        .map_err(|()| SealError::SlotAuthFailed)?;
    let mut slot = [0u8; SLOT_LEN];
    slot[0..32].copy_from_slice(&eph_pub);
    slot[32..64].copy_from_slice(recipient_x25519);
    slot[64..88].copy_from_slice(&nonce);
    slot[88..120].copy_from_slice(sealed.as_ref());
    slot[120..136].copy_from_slice(&tag);
    Ok(slot)
}

fn kek(shared: &[u8; 32], eph_pub: &[u8; 32], recipient: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let mut material = Zeroizing::new([0u8; 96]);
    material[0..32].copy_from_slice(shared);
    material[32..64].copy_from_slice(eph_pub);
    material[64..96].copy_from_slice(recipient);
    Zeroizing::new(blake3::derive_key(KEY_WRAP_CONTEXT, material.as_ref()))
}

fn slot_aad(key_id: &[u8; 16], recipient: &[u8; 32]) -> [u8; 48] {
    let mut a = [0u8; 48];
    a[..16].copy_from_slice(key_id);
    a[16..].copy_from_slice(recipient);
    a
}

pub fn unwrap_key(
    slot: &[u8; SLOT_LEN],
    key_id: &[u8; 16],
    secret: &StaticSecret,
) -> Result<DataKey, SealError> {
    unwrap_for(slot, key_id, secret, &PublicKey::from(secret).to_bytes())
}

fn unwrap_for(
    slot: &[u8; SLOT_LEN],
    key_id: &[u8; 16],
    secret: &StaticSecret,
    own_public: &[u8; 32],
) -> Result<DataKey, SealError> {
    let mut eph_pub = [0u8; 32];
    eph_pub.copy_from_slice(&slot[0..32]);
    if &slot[32..64] != own_public {
        return Err(SealError::NotRecipient);
    }
    let shared = secret.diffie_hellman(&PublicKey::from(eph_pub));
    if !shared.was_contributory() {
        return Err(SealError::SlotAuthFailed);
    }
    let kek = kek(shared.as_bytes(), &eph_pub, own_public);
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&slot[88..120]);
    let mut nonce = [0u8; 24];
    nonce.copy_from_slice(&slot[64..88]);
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&slot[120..136]);
    xopen(&kek, &nonce, &slot_aad(key_id, own_public), key.as_mut(), &tag)
        .map_err(|_| SealError::SlotAuthFailed)?;
    let dk = DataKey::from_key(key);
    // The aad already binds key_id; this also catches a sealer that mislabelled its key.
    if dk.id != *key_id {
        return Err(SealError::SlotAuthFailed);
    }
    Ok(dk)
}

/// A checkpoint's slots file: for each data key, its slots, one per recipient.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slots {
    pub entries: Vec<([u8; 16], Vec<[u8; SLOT_LEN]>)>,
}

impl Slots {
    /// Wraps every key for every recipient (X25519 publics).
    pub fn wrap(keys: &[&DataKey], recipients: &[[u8; 32]]) -> Result<Slots, SealError> {
        if keys.len() > MAX_SLOT_KEYS {
            return Err(SealError::BadSlots("more than 64 data keys"));
        }
        if recipients.is_empty() || recipients.len() > MAX_SLOTS_PER_KEY {
            return Err(SealError::BadSlots("need 1 to 256 recipients"));
        }
        let mut entries = Vec::with_capacity(keys.len());
        for k in keys {
            let slots = recipients.iter().map(|r| try_wrap_key(k, r)).collect::<Result<Vec<_>, _>>()?;
            entries.push((k.id, slots));
        }
        Ok(Slots { entries })
    }

    /// Opens every key with `secret` and adds a slot for `recipient` (another node, or this
    /// node's next key before a rotation), unless it has one already.
    pub fn add_recipient(&mut self, secret: &StaticSecret, recipient: &[u8; 32]) -> Result<(), SealError> {
        let ring = self.open_all(secret)?;
        for (id, slots) in &mut self.entries {
            if slots.iter().any(|s| &s[32..64] == recipient) {
                continue;
            }
            if slots.len() >= MAX_SLOTS_PER_KEY {
                return Err(SealError::BadSlots("more than 256 slots for a key"));
            }
            let dk = ring.get(id).ok_or(SealError::NoSlot(*id))?;
            slots.push(try_wrap_key(dk, recipient)?);
        }
        Ok(())
    }

    /// The file's bytes. Entries beyond the caps make a file that [`Slots::decode`] refuses;
    /// [`Slots::wrap`] and [`Slots::add_recipient`] stay within them.
    pub fn encode(&self) -> Vec<u8> {
        let n: usize = self.entries.iter().map(|(_, s)| 18 + s.len() * SLOT_LEN).sum();
        let mut b = Vec::with_capacity(8 + n);
        b.extend_from_slice(SLOTS_MAGIC);
        b.extend_from_slice(&SLOTS_VERSION.to_le_bytes());
        b.extend_from_slice(&u16::try_from(self.entries.len()).unwrap_or(u16::MAX).to_le_bytes());
        for (id, slots) in &self.entries {
            b.extend_from_slice(id);
            b.extend_from_slice(&u16::try_from(slots.len()).unwrap_or(u16::MAX).to_le_bytes());
            for s in slots {
                b.extend_from_slice(s);
            }
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Slots, SealError> {
        if b.len() > MAX_SLOTS_FILE {
            return Err(SealError::BadSlots("file over size cap"));
        }
        let mut r = Reader(b);
        if r.take(4)? != SLOTS_MAGIC {
            return Err(SealError::BadSlots("bad magic"));
        }
        if r.u16()? != SLOTS_VERSION {
            return Err(SealError::BadSlots("unsupported version"));
        }
        let count = usize::from(r.u16()?);
        if count > MAX_SLOT_KEYS {
            return Err(SealError::BadSlots("more than 64 data keys"));
        }
        let mut entries: Vec<([u8; 16], Vec<[u8; SLOT_LEN]>)> = Vec::with_capacity(count);
        for _ in 0..count {
            let mut id = [0u8; 16];
            id.copy_from_slice(r.take(16)?);
            if entries.iter().any(|(x, _)| *x == id) {
                return Err(SealError::BadSlots("data key listed twice"));
            }
            let n = usize::from(r.u16()?);
            if n == 0 || n > MAX_SLOTS_PER_KEY {
                return Err(SealError::BadSlots("need 1 to 256 slots per key"));
            }
            // Checked before allocating: the bytes must be there.
            let raw = r.take(n * SLOT_LEN)?;
            let slots = raw
                .chunks_exact(SLOT_LEN)
                .map(|c| {
                    let mut s = [0u8; SLOT_LEN];
                    s.copy_from_slice(c);
                    s
                })
                .collect();
            entries.push((id, slots));
        }
        if !r.0.is_empty() {
            return Err(SealError::BadSlots("trailing bytes"));
        }
        Ok(Slots { entries })
    }

    /// Opens every data key with this node's secret; fails unless each one opens.
    pub fn open_all(&self, secret: &StaticSecret) -> Result<KeyRing, SealError> {
        let own = PublicKey::from(secret).to_bytes();
        let mut ring = KeyRing::new();
        for (id, slots) in &self.entries {
            let mut opened = None;
            let mut last_err = SealError::NoSlot(*id);
            for s in slots.iter().filter(|s| s[32..64] == own) {
                match unwrap_for(s, id, secret, &own) {
                    Ok(k) => {
                        opened = Some(k);
                        break;
                    }
                    Err(e) => last_err = e,
                }
            }
            ring.insert(opened.ok_or(last_err)?);
        }
        Ok(ring)
    }
}

struct Reader<'b>(&'b [u8]);

impl<'b> Reader<'b> {
    fn take(&mut self, n: usize) -> Result<&'b [u8], SealError> {
        if self.0.len() < n {
            return Err(SealError::BadSlots("truncated"));
        }
        let (a, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16, SealError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing test should stop right there
mod tests {
    use super::*;
    use crate::keys::NodeKeys;

    fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut v = vec![0u8; n];
        rng.fill_bytes(&mut v);
        v
    }

    /// Page-like data that compresses about 3:1: small integers, pointers, some text.
    fn compressible(n: usize, seed: u64) -> Vec<u8> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let words: [&[u8]; 8] = [
            b"ferry ",
            b"checkpoint ",
            b"restore ",
            b"\0\0\0\0",
            b"page ",
            b"0x7ffd",
            b"\x01\0\0\0\0\0\0\0",
            b"criu ",
        ];
        let mut v = Vec::with_capacity(n + 16);
        while v.len() < n {
            match rng.next_u32() % 10 {
                0 => v.extend_from_slice(
                    &(0x5555_0000_0000u64 + u64::from(rng.next_u32() % 4096) * 8).to_le_bytes(),
                ),
                _ => v.extend_from_slice(words[(rng.next_u32() % 8) as usize]),
            }
        }
        v.truncate(n);
        v
    }

    struct Fixture {
        keys: NodeKeys,
        dk: DataKey,
        ring: KeyRing,
    }

    fn fixture() -> Fixture {
        let keys = NodeKeys::generate();
        let dk = DataKey::generate();
        let mut ring = KeyRing::new();
        ring.insert(dk.clone());
        Fixture { keys, dk, ring }
    }

    const FORMATS: [FrameFormat; 2] = [FrameFormat::XChaCha20Poly1305, FrameFormat::Aes256Gcm];

    fn seal_one(f: &Fixture, plain: &[u8]) -> (ChunkId, Vec<u8>) {
        seal_as(f, FrameFormat::preferred(), plain)
    }

    fn seal_as(f: &Fixture, format: FrameFormat, plain: &[u8]) -> (ChunkId, Vec<u8>) {
        let id = f.keys.chunk_id(plain);
        let mut out = Vec::new();
        Sealer::with_format(&f.dk, format).seal(&id, plain, &mut out);
        (id, out)
    }

    #[test]
    fn new_frames_are_aes_gcm_where_the_cpu_has_aes() {
        let f = fixture();
        let (id, frame) = seal_one(&f, &random_bytes(4096, 20));
        assert_eq!(frame[4], FrameFormat::preferred().version());
        assert_eq!(Sealer::new(&f.dk).format(), FrameFormat::preferred());
        // The machines ferry runs on (x86-64 with AES-NI) must get the faster format.
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            FrameFormat::preferred() == FrameFormat::Aes256Gcm,
            std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
        );
        assert_eq!(Opener::new(&f.ring, f.keys.hash_key()).open(&id, &frame).unwrap().len(), 4096);
    }

    #[test]
    fn round_trips_raw_and_compressed() {
        let f = fixture();
        let mut opener = Opener::new(&f.ring, f.keys.hash_key());
        for format in FORMATS {
            round_trip(&f, &mut opener, format);
        }
    }

    fn round_trip(f: &Fixture, opener: &mut Opener<'_>, format: FrameFormat) {
        for (plain, compressed) in [
            (random_bytes(4096, 1), false),
            (compressible(4096, 2), true),
            (vec![7u8; 4 << 20], true),
            (random_bytes(1, 3), false),
            (Vec::new(), false),
            (vec![0xab; 63], false),
        ] {
            let (id, frame) = seal_as(f, format, &plain);
            assert_eq!(frame[4], format.version());
            assert_eq!(frame[5] & FLAG_ZSTD != 0, compressed, "len {}", plain.len());
            assert_eq!(frame_len(&frame).unwrap(), frame.len());
            if compressed {
                assert!(frame.len() - HEADER_LEN - TAG_LEN <= plain.len() - plain.len() / 8);
            } else {
                assert_eq!(frame.len(), HEADER_LEN + plain.len() + TAG_LEN);
            }
            assert_eq!(opener.open(&id, &frame).unwrap(), plain);
        }
    }

    #[test]
    fn appends_frames_and_uses_fresh_nonces() {
        for format in FORMATS {
            appends_with_fresh_nonces(format);
        }
    }

    fn appends_with_fresh_nonces(format: FrameFormat) {
        let f = fixture();
        let mut s = Sealer::with_format(&f.dk, format);
        let p = random_bytes(4096, 4);
        let id = f.keys.chunk_id(&p);
        let mut out = b"prefix".to_vec();
        s.seal(&id, &p, &mut out);
        let first = out.len();
        s.seal(&id, &p, &mut out);
        let (a, b) = (&out[6..first], &out[first..]);
        assert_eq!(a.len(), b.len());
        assert_ne!(a[24..48], b[24..48], "nonce reused");
        assert_ne!(a, b);
        let mut o = Opener::new(&f.ring, f.keys.hash_key());
        assert_eq!(o.open(&id, a).unwrap(), p);
        assert_eq!(o.open(&id, b).unwrap(), p);
    }

    #[test]
    fn any_flipped_byte_fails() {
        let f = fixture();
        let mut o = Opener::new(&f.ring, f.keys.hash_key());
        for (format, plain) in
            FORMATS.into_iter().flat_map(|v| [(v, random_bytes(300, 5)), (v, compressible(4096, 6))])
        {
            let (id, frame) = seal_as(&f, format, &plain);
            for i in 0..frame.len() {
                for bit in [0x01, 0x80] {
                    let mut bad = frame.clone();
                    bad[i] ^= bit;
                    assert!(o.open(&id, &bad).is_err(), "flip at {i} accepted");
                }
            }
            for i in 0..32 {
                let mut bad_id = id;
                bad_id[i] ^= 1;
                assert!(matches!(o.open(&bad_id, &frame), Err(SealError::AuthFailed)));
            }
            assert_eq!(o.open(&id, &frame).unwrap(), plain);
        }
    }

    #[test]
    fn frames_swapped_between_ids_fail() {
        let f = fixture();
        let mut o = Opener::new(&f.ring, f.keys.hash_key());
        for format in FORMATS {
            let (id_a, frame_a) = seal_as(&f, format, &random_bytes(4096, 7));
            let (id_b, frame_b) = seal_as(&f, format, &random_bytes(4096, 8));
            assert!(matches!(o.open(&id_a, &frame_b), Err(SealError::AuthFailed)));
            assert!(matches!(o.open(&id_b, &frame_a), Err(SealError::AuthFailed)));
        }
    }

    #[test]
    fn a_frame_relabelled_as_the_other_format_fails() {
        // The version byte is in the aad, and the two formats use different keys anyway.
        let f = fixture();
        let mut o = Opener::new(&f.ring, f.keys.hash_key());
        for (format, other) in [(FORMATS[0], FORMATS[1]), (FORMATS[1], FORMATS[0])] {
            let (id, mut frame) = seal_as(&f, format, &random_bytes(4096, 21));
            frame[4] = other.version();
            assert!(matches!(o.open(&id, &frame), Err(SealError::AuthFailed)));
        }
    }

    #[test]
    fn unknown_versions_are_refused_by_name() {
        let f = fixture();
        let (id, frame) = seal_one(&f, &random_bytes(100, 22));
        let mut o = Opener::new(&f.ring, f.keys.hash_key());
        for v in [0u8, 3, 255] {
            let mut bad = frame.clone();
            bad[4] = v;
            assert!(matches!(frame_len(&bad), Err(SealError::UnsupportedVersion(x)) if x == v));
            let e = o.open(&id, &bad).unwrap_err();
            assert!(e.to_string().contains(&format!("format {v}")), "{e}");
        }
    }

    /// Frames sealed by ferry before format 2 existed (the fuzz seed corpus of 2026-11-25:
    /// mode byte, chunk id, frame; data key [4; 32], hash key [3; 32]).
    #[test]
    fn format_1_frames_written_before_format_2_still_open() {
        let mut ring = KeyRing::new();
        ring.insert(DataKey::from_bytes(&[4; 32]));
        let mut o = Opener::new(&ring, &[3; 32]);
        let text: Vec<u8> = b"ferry checkpoint restore page ".iter().cycle().take(4096).copied().collect();
        for (seed, zstd) in [
            (&include_bytes!("../testdata/chunk-v1-raw.seed")[..], false),
            (&include_bytes!("../testdata/chunk-v1-zstd.seed")[..], true),
        ] {
            let id: ChunkId = seed[1..33].try_into().unwrap();
            let frame = &seed[33..];
            assert_eq!((frame[4], frame[5] == FLAG_ZSTD), (1, zstd));
            // The keyed hash was checked against the id: this is the plaintext that was sealed.
            let plain = o.open(&id, frame).unwrap();
            assert_eq!(plain.len(), 4096);
            if zstd {
                assert_eq!(plain, text);
            }
        }
    }

    #[test]
    fn gcm_nonces_count_up_under_a_salt_of_each_sealer() {
        let f = fixture();
        let p = random_bytes(4096, 23);
        let id = f.keys.chunk_id(&p);
        let mut salts = std::collections::HashSet::new();
        let mut o = Opener::new(&f.ring, f.keys.hash_key());
        for _ in 0..4 {
            let mut s = Sealer::with_format(&f.dk, FrameFormat::Aes256Gcm);
            let mut frames = Vec::new();
            for _ in 0..100 {
                let mut out = Vec::new();
                s.seal(&id, &p, &mut out);
                frames.push(out);
            }
            let salt = &frames[0][24..40];
            for (n, fr) in frames.iter().enumerate() {
                assert_eq!(&fr[24..40], salt);
                assert_eq!(fr[40..48], (n as u64).to_le_bytes());
                assert_eq!(o.open(&id, fr).unwrap(), p);
            }
            assert!(salts.insert(salt.to_vec()), "two sealers drew the same salt");
        }
    }

    #[test]
    fn a_sealer_draws_a_new_salt_before_its_key_encrypts_64_gib() {
        let f = fixture();
        let p = random_bytes(4096, 24);
        let id = f.keys.chunk_id(&p);
        let mut s = Sealer::with_format(&f.dk, FrameFormat::Aes256Gcm);
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        s.seal_with(&id, &p, &mut a, false);
        // 4096 bytes take 257 blocks: this one still fits, the next does not.
        if let Cipher::Gcm(g) = &mut s.cipher {
            g.blocks = MAX_GCM_BLOCKS - 2 * 257 + 1;
        }
        s.seal_with(&id, &p, &mut b, false);
        s.seal_with(&id, &p, &mut c, false);
        assert_eq!(a[24..40], b[24..40]);
        assert_eq!(b[40..48], 1u64.to_le_bytes());
        assert_ne!(b[24..40], c[24..40], "same salt past the budget");
        assert_eq!(c[40..48], 0u64.to_le_bytes());
        let Cipher::Gcm(g) = &s.cipher else { panic!("format changed") };
        assert_eq!(g.blocks, 257);
        let mut o = Opener::new(&f.ring, f.keys.hash_key());
        for fr in [&a, &b, &c] {
            assert_eq!(o.open(&id, fr).unwrap(), p);
        }
    }

    #[test]
    fn frames_of_more_sealers_than_the_opener_caches_open() {
        let f = fixture();
        let mut sealers: Vec<Sealer> =
            (0..GCM_CACHE + 5).map(|_| Sealer::with_format(&f.dk, FrameFormat::Aes256Gcm)).collect();
        let mut frames = Vec::new();
        for round in 0..3u64 {
            for (i, s) in sealers.iter_mut().enumerate() {
                let p = random_bytes(512, 1000 * round + i as u64);
                let (id, mut out) = (f.keys.chunk_id(&p), Vec::new());
                s.seal(&id, &p, &mut out);
                frames.push((id, out, p));
            }
        }
        let mut o = Opener::new(&f.ring, f.keys.hash_key());
        // In order, then backwards: every lookup misses a full cache, or hits it.
        for (id, fr, p) in frames.iter().chain(frames.iter().rev()) {
            assert_eq!(&o.open(id, fr).unwrap(), p);
        }
        assert_eq!(o.gcm.entries.len(), GCM_CACHE);
    }

    #[test]
    fn wrong_or_unknown_data_key_fails() {
        for format in FORMATS {
            wrong_or_unknown_key(format);
        }
    }

    fn wrong_or_unknown_key(format: FrameFormat) {
        let f = fixture();
        let (id, frame) = seal_as(&f, format, &random_bytes(4096, 9));
        let empty = KeyRing::new();
        let mut o = Opener::new(&empty, f.keys.hash_key());
        assert!(matches!(o.open(&id, &frame), Err(SealError::UnknownKey(k)) if k == f.dk.id()));
        // Another key under the same id (the id is derived from the key, so only a forged
        // ring can do this) fails authentication.
        let mut forged = KeyRing::new();
        let mut other = DataKey::generate();
        other.id = f.dk.id();
        forged.insert(other);
        let mut o = Opener::new(&forged, f.keys.hash_key());
        assert!(matches!(o.open(&id, &frame), Err(SealError::AuthFailed)));
    }

    #[test]
    fn a_valid_frame_for_the_wrong_content_fails_the_hash() {
        // A sealer with a different hash key: the frame authenticates, the content does not
        // hash to the id under ours.
        let f = fixture();
        let plain = random_bytes(100, 10);
        let id = NodeKeys::generate().chunk_id(&plain);
        let mut o = Opener::new(&f.ring, f.keys.hash_key());
        for format in FORMATS {
            let mut frame = Vec::new();
            Sealer::with_format(&f.dk, format).seal(&id, &plain, &mut frame);
            assert!(matches!(o.open(&id, &frame), Err(SealError::HashMismatch)));
        }
    }

    #[test]
    fn hostile_frames_are_refused_without_panic() {
        for format in FORMATS {
            hostile_frames(format);
        }
    }

    fn hostile_frames(format: FrameFormat) {
        let f = fixture();
        let (id, frame) = seal_as(&f, format, &compressible(4096, 11));
        let mut o = Opener::new(&f.ring, f.keys.hash_key());
        for n in 0..frame.len() {
            assert!(o.open(&id, &frame[..n]).is_err());
            if n < HEADER_LEN {
                assert!(frame_len(&frame[..n]).is_err());
            }
        }
        let mut longer = frame.clone();
        longer.push(0);
        assert!(matches!(o.open(&id, &longer), Err(SealError::BadFrame(_))));
        let set = |i: usize, v: u32| {
            let mut b = frame.clone();
            b[i..i + 4].copy_from_slice(&v.to_le_bytes());
            b
        };
        for bad in [set(48, u32::MAX), set(52, u32::MAX), set(52, 0), set(52, 15), set(48, 5 << 20)] {
            assert!(matches!(frame_len(&bad), Err(SealError::BadFrame(_))));
            assert!(matches!(o.open(&id, &bad), Err(SealError::BadFrame(_))));
        }
        let mut b = frame.clone();
        b[5] = 0x82;
        assert!(matches!(frame_len(&b), Err(SealError::BadFrame("unknown flags"))));
        // A compressed frame that claims a plaintext of 4 MiB still authenticates nothing.
        let b = set(48, 4 << 20);
        assert!(matches!(o.open(&id, &b), Err(SealError::AuthFailed)));
    }

    #[test]
    fn slots_round_trip_and_open_only_for_their_recipients() {
        let a = NodeKeys::generate();
        let b = NodeKeys::generate();
        let c = NodeKeys::generate();
        let k1 = DataKey::generate();
        let k2 = DataKey::generate();
        let slots = Slots::wrap(&[&k1, &k2], &[a.public().x25519, b.public().x25519]).unwrap();
        let bytes = slots.encode();
        assert_eq!(bytes.len(), 8 + 2 * (18 + 2 * SLOT_LEN));
        let back = Slots::decode(&bytes).unwrap();
        assert_eq!(back, slots);
        for n in [&a, &b] {
            let ring = back.open_all(n.x25519_secret()).unwrap();
            assert_eq!(ring.len(), 2);
            assert_eq!(ring.get(&k1.id()).unwrap().key, k1.key);
            assert_eq!(ring.get(&k2.id()).unwrap().key, k2.key);
        }
        assert!(matches!(back.open_all(c.x25519_secret()), Err(SealError::NoSlot(_))));

        // unwrap_key directly: right key, wrong secret, wrong key id.
        let slot = wrap_key(&k1, &a.public().x25519);
        assert_eq!(unwrap_key(&slot, &k1.id(), a.x25519_secret()).unwrap().key, k1.key);
        assert!(matches!(unwrap_key(&slot, &k1.id(), b.x25519_secret()), Err(SealError::NotRecipient)));
        assert!(matches!(unwrap_key(&slot, &k2.id(), a.x25519_secret()), Err(SealError::SlotAuthFailed)));
        // The wrong secret claiming to be the recipient (R rewritten) still fails.
        let mut forged = slot;
        forged[32..64].copy_from_slice(&b.public().x25519);
        assert!(matches!(unwrap_key(&forged, &k1.id(), b.x25519_secret()), Err(SealError::SlotAuthFailed)));
        for i in 0..SLOT_LEN {
            let mut bad = slot;
            bad[i] ^= 1;
            assert!(unwrap_key(&bad, &k1.id(), a.x25519_secret()).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn every_key_must_open() {
        let a = NodeKeys::generate();
        let b = NodeKeys::generate();
        let k1 = DataKey::generate();
        let k2 = DataKey::generate();
        let mut slots = Slots::wrap(&[&k1], &[a.public().x25519]).unwrap();
        slots.entries.push((k2.id(), vec![wrap_key(&k2, &b.public().x25519)]));
        assert!(matches!(slots.open_all(a.x25519_secret()), Err(SealError::NoSlot(id)) if id == k2.id()));
        // A corrupted slot for us is an authentication failure, not "no slot".
        let mut s = Slots::wrap(&[&k1], &[a.public().x25519]).unwrap();
        s.entries[0].1[0][100] ^= 1;
        assert!(matches!(s.open_all(a.x25519_secret()), Err(SealError::SlotAuthFailed)));
    }

    #[test]
    fn add_recipient_rewraps_for_a_rotated_key() {
        let old = NodeKeys::generate();
        let new = NodeKeys::generate();
        let k = DataKey::generate();
        let mut s = Slots::wrap(&[&k], &[old.public().x25519]).unwrap();
        s.add_recipient(old.x25519_secret(), &new.public().x25519).unwrap();
        s.add_recipient(old.x25519_secret(), &new.public().x25519).unwrap();
        assert_eq!(s.entries[0].1.len(), 2);
        let ring = s.open_all(new.x25519_secret()).unwrap();
        assert_eq!(ring.get(&k.id()).unwrap().key, k.key);
    }

    #[test]
    fn weak_recipient_keys_get_no_usable_slot() {
        let k = DataKey::generate();
        assert!(matches!(try_wrap_key(&k, &[0u8; 32]), Err(SealError::WeakKey)));
        assert_eq!(wrap_key(&k, &[0u8; 32]), [0u8; SLOT_LEN]);
        assert!(Slots::wrap(&[&k], &[[0u8; 32]]).is_err());
    }

    #[test]
    fn hostile_slot_files_are_refused_without_panic() {
        let a = NodeKeys::generate();
        let k = DataKey::generate();
        let good = Slots::wrap(&[&k], &[a.public().x25519]).unwrap().encode();
        for n in 0..good.len() {
            assert!(Slots::decode(&good[..n]).is_err());
        }
        let mut b = good.clone();
        b.push(0);
        assert!(Slots::decode(&b).is_err());
        let with = |i: usize, v: u16| {
            let mut b = good.clone();
            b[i..i + 2].copy_from_slice(&v.to_le_bytes());
            b
        };
        for bad in [with(6, 65), with(6, u16::MAX), with(24, u16::MAX), with(24, 0), with(4, 2)] {
            assert!(matches!(Slots::decode(&bad), Err(SealError::BadSlots(_))));
        }
        // The same key twice.
        let mut twice = with(6, 2);
        twice.extend_from_slice(&good[8..]);
        assert!(matches!(Slots::decode(&twice), Err(SealError::BadSlots("data key listed twice"))));
        assert!(Slots::decode(&vec![0u8; MAX_SLOTS_FILE + 1]).is_err());
        let empty = Slots::default().encode();
        assert_eq!(Slots::decode(&empty).unwrap().open_all(a.x25519_secret()).unwrap().len(), 0);
    }

    #[test]
    fn key_id_follows_the_spec() {
        let k = DataKey::generate();
        let d = blake3::derive_key("ferry 2026 data key id", k.key.as_ref());
        assert_eq!(k.id(), d[..16]);
    }

    /// Format 2 by the formulas of docs/store-format.md, with RustCrypto's AES-GCM: what we
    /// seal it opens, and what it seals we open.
    #[test]
    fn format_2_frames_are_standard_aes256gcm() {
        use aes_gcm::aead::{AeadInPlace, KeyInit};
        use aes_gcm::Aes256Gcm;
        let f = fixture();
        let reference_key = |salt: &[u8]| {
            let k = blake3::derive_key("ferry 2026 chunk key", &[&f.dk.key[..], salt].concat());
            Aes256Gcm::new((&k).into())
        };
        let nonce_of = |n: &[u8]| [&n[16..24], &[0u8; 4][..]].concat();
        for plain in [random_bytes(1000, 13), compressible(4096, 14), Vec::new()] {
            let (id, frame) = seal_as(&f, FrameFormat::Aes256Gcm, &plain);
            let hdr: [u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().unwrap();
            let (body, tag) = frame[HEADER_LEN..].split_at(frame.len() - HEADER_LEN - TAG_LEN);
            let mut body = body.to_vec();
            reference_key(&hdr[24..40])
                .decrypt_in_place_detached(
                    nonce_of(&hdr[24..48])[..].into(),
                    &aad(&hdr, &id),
                    &mut body,
                    tag.into(),
                )
                .unwrap();
            if frame[5] == FLAG_ZSTD {
                body = zstd::bulk::decompress(&body, plain.len()).unwrap();
            }
            assert_eq!(body, plain);
        }

        let plain = random_bytes(4096, 15);
        let id = f.keys.chunk_id(&plain);
        let mut hdr = Vec::new();
        hdr.extend_from_slice(b"FRYC\x02\0\0\0");
        hdr.extend_from_slice(&f.dk.id());
        hdr.extend_from_slice(&[0x5a; 16]); // salt
        hdr.extend_from_slice(&7u64.to_le_bytes());
        hdr.extend_from_slice(&4096u32.to_le_bytes());
        hdr.extend_from_slice(&(4096u32 + 16).to_le_bytes());
        let hdr: [u8; HEADER_LEN] = hdr.try_into().unwrap();
        let mut body = plain.clone();
        let tag = reference_key(&[0x5a; 16])
            .encrypt_in_place_detached(nonce_of(&hdr[24..48])[..].into(), &aad(&hdr, &id), &mut body)
            .unwrap();
        let frame = [&hdr[..], &body[..], &tag[..]].concat();
        assert_eq!(Opener::new(&f.ring, f.keys.hash_key()).open(&id, &frame).unwrap(), plain);
    }

    #[test]
    fn frames_and_slots_are_standard_xchacha20poly1305() {
        use chacha20poly1305::aead::{AeadInPlace, KeyInit};
        use chacha20poly1305::XChaCha20Poly1305;
        let f = fixture();
        let plain = random_bytes(1000, 12);
        let (id, frame) = seal_as(&f, FrameFormat::XChaCha20Poly1305, &plain);
        let mut hdr = [0u8; HEADER_LEN];
        hdr.copy_from_slice(&frame[..HEADER_LEN]);
        let (body, tag) = frame[HEADER_LEN..].split_at(frame.len() - HEADER_LEN - TAG_LEN);
        let mut body = body.to_vec();
        XChaCha20Poly1305::new(f.dk.key.as_ref().into())
            .decrypt_in_place_detached(frame[24..48].into(), &aad(&hdr, &id), &mut body, tag.into())
            .unwrap();
        assert_eq!(body, plain);

        // A slot, by the formula in docs/store-format.md.
        let r = NodeKeys::generate();
        let rx = r.public().x25519;
        let slot = wrap_key(&f.dk, &rx);
        let eph: [u8; 32] = slot[..32].try_into().unwrap();
        let shared = r.x25519_secret().diffie_hellman(&PublicKey::from(eph));
        let kek = blake3::derive_key("ferry 2026 key wrap", &[shared.as_bytes(), &eph[..], &rx[..]].concat());
        let mut dk = slot[88..120].to_vec();
        XChaCha20Poly1305::new((&kek).into())
            .decrypt_in_place_detached(
                slot[64..88].into(),
                &[&f.dk.id()[..], &rx[..]].concat(),
                &mut dk,
                slot[120..].into(),
            )
            .unwrap();
        assert_eq!(dk, f.dk.key.as_ref());
        assert_eq!(&slot[32..64], &rx);
    }

    /// The CPU floor of the secure path, per GiB of random 4 KiB pages, on one core: the
    /// keyed BLAKE3 chunk id and sealing in the preferred format (no compression), each alone,
    /// from pages already in cache (the ingest reads them from CRIU's images first, which costs
    /// more). `examples/seal_bench.rs` compares the formats.
    /// `cargo test --release -p ferry-store seal::tests::floor_per_gib -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark; run in release"]
    fn floor_per_gib() {
        use std::time::Instant;
        const N: usize = 256 << 10; // 1 GiB of 4 KiB pages
        let f = fixture();
        let pages: Vec<Vec<u8>> = (0..256).map(|i| random_bytes(4096, i)).collect();
        let t = Instant::now();
        let mut fold = 0u8;
        for i in 0..N {
            fold ^= f.keys.chunk_id(&pages[i % pages.len()])[0];
        }
        let hash = t.elapsed().as_secs_f64();
        let id = f.keys.chunk_id(&pages[0]);
        let mut sealer = Sealer::new(&f.dk);
        let mut out = Vec::with_capacity(8192);
        let t = Instant::now();
        for i in 0..N {
            out.clear();
            sealer.seal_with(&id, &pages[i % pages.len()], &mut out, false);
        }
        let seal = t.elapsed().as_secs_f64();
        println!(
            "per GiB on one core: keyed BLAKE3 {hash:.3} s, {:?} {seal:.3} s, both {:.3} s ({fold})",
            sealer.format(),
            hash + seal
        );
        assert!(hash > 0.0 && seal > 0.0);
    }

    /// `cargo test --release -p ferry-store seal::tests::throughput -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark; run in release"]
    fn throughput() {
        use std::time::Instant;
        const N: usize = 64 << 10; // 256 MiB of 4 KiB pages per run
        let f = fixture();
        let pages = |g: &dyn Fn(usize, u64) -> Vec<u8>| -> Vec<(ChunkId, Vec<u8>)> {
            (0..256)
                .map(|i| {
                    let p = g(4096, i);
                    (f.keys.chunk_id(&p), p)
                })
                .collect()
        };
        let mut sets = vec![("incompressible", pages(&random_bytes)), ("compressible", pages(&compressible))];
        // Real pages (e.g. non-zero pages read from a process's /proc/PID/mem), if given.
        if let Ok(path) = std::env::var("FERRY_BENCH_PAGES") {
            let raw = std::fs::read(path).unwrap();
            let real = raw.chunks_exact(4096).take(16384).map(|p| (f.keys.chunk_id(p), p.to_vec())).collect();
            sets.push(("real", real));
        }
        for level in [ZSTD_LEVEL, 1, -3] {
            for (what, set) in &sets {
                let mut s = Sealer::new(&f.dk);
                s.zstd = zstd::bulk::Compressor::new(level).ok();
                let mut out = Vec::with_capacity(8192);
                let mut bytes_out = 0usize;
                let t = Instant::now();
                for i in 0..N {
                    let (id, p) = &set[i % set.len()];
                    out.clear();
                    s.seal(id, p, &mut out);
                    bytes_out += out.len();
                }
                let secs = t.elapsed().as_secs_f64();
                let mib = (N * 4096) as f64 / (1 << 20) as f64;
                println!(
                    "seal {what:>14} zstd {level:>2}: {:7.0} MiB/s  ({:.3} of input stored)",
                    mib / secs,
                    bytes_out as f64 / (N * 4096) as f64
                );
            }
        }
        for (what, set) in &sets {
            let frames: Vec<(ChunkId, Vec<u8>)> = set
                .iter()
                .map(|(id, p)| {
                    let mut out = Vec::new();
                    Sealer::new(&f.dk).seal(id, p, &mut out);
                    (*id, out)
                })
                .collect();
            let mut o = Opener::new(&f.ring, f.keys.hash_key());
            let t = Instant::now();
            for i in 0..N {
                let (id, fr) = &frames[i % frames.len()];
                std::hint::black_box(o.open(id, fr).unwrap());
            }
            let secs = t.elapsed().as_secs_f64();
            println!("open {what:>14}:         {:7.0} MiB/s", (N * 4096) as f64 / (1 << 20) as f64 / secs);
        }
        let t = Instant::now();
        for i in 0..N {
            std::hint::black_box(f.keys.chunk_id(&sets[0].1[i % 256].1));
        }
        println!(
            "chunk_id (keyed BLAKE3):     {:7.0} MiB/s",
            (N * 4096) as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
        );
    }
}

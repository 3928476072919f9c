//! The catalog: which manifest is the current one for each checkpoint name, and at which
//! generation. Signed by the node, so that putting back an older (validly signed) manifest in
//! place of a newer one, or a removed checkpoint's manifest, is detected.
//!
//! ```text
//! "FRYG" version:u16 0:u16 body_len:u32 body(JSON) signature[64] signer[32]
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::error::io_err;
use crate::keys::NodeKeys;
use crate::StoreError;

const MAGIC: &[u8; 4] = b"FRYG";
const VERSION: u16 = 1;
const HEADER: usize = 12;
/// A catalog of a million checkpoints is far below this.
pub const MAX_CATALOG: usize = 64 << 20;

/// The current state of one checkpoint name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// Hex id of the current manifest.
    pub manifest: String,
    pub generation: u64,
    /// Removed checkpoints stay as tombstones: their generation keeps counting.
    pub removed: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Catalog {
    pub entries: BTreeMap<String, CatalogEntry>,
}

impl Catalog {
    /// Reads and verifies the catalog at `path`; a missing file is an empty catalog.
    pub fn load(path: &Path, trusted: &[[u8; 32]]) -> Result<Catalog, StoreError> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Catalog::default()),
            Err(e) => {
                return Err(StoreError::Io { action: "cannot read", path: path.to_path_buf(), source: e })
            }
        };
        Catalog::decode(&bytes, trusted)
            .map_err(|detail| StoreError::Tampered { file: path_text(path), detail })
    }

    pub fn decode(b: &[u8], trusted: &[[u8; 32]]) -> Result<Catalog, String> {
        if b.len() < HEADER + 96 || b.len() > MAX_CATALOG || &b[..4] != MAGIC {
            return Err("not a catalog (bad magic or size)".into());
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(format!("catalog version {version} is not supported"));
        }
        let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize;
        if b.len() != HEADER + len + 96 {
            return Err(format!("catalog claims a {len}-byte body in {} bytes", b.len()));
        }
        let signed = &b[..HEADER + len];
        let sig: [u8; 64] = b[HEADER + len..HEADER + len + 64].try_into().map_err(|_| "short signature")?;
        let signer: [u8; 32] = b[HEADER + len + 64..].try_into().map_err(|_| "short signer")?;
        if !trusted.contains(&signer) {
            return Err("signed by a key this node does not trust".into());
        }
        let key = VerifyingKey::from_bytes(&signer).map_err(|e| e.to_string())?;
        key.verify_strict(signed, &Signature::from_bytes(&sig)).map_err(|_| "bad signature".to_string())?;
        serde_json::from_slice(&b[HEADER..HEADER + len]).map_err(|e| format!("bad body: {e}"))
    }

    pub fn encode(&self, keys: &NodeKeys) -> Vec<u8> {
        let body = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER + body.len() + 96);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        let sig = keys.sign(&out);
        out.extend_from_slice(&sig);
        out.extend_from_slice(&keys.public().ed25519);
        out
    }

    /// Writes the catalog atomically (temporary file, fsync, rename, fsync of the directory).
    pub fn save(&self, path: &Path, keys: &NodeKeys) -> Result<(), StoreError> {
        crate::fsutil::write_atomic(path, &self.encode(keys))
    }

    /// The generation a new manifest named `name` gets.
    pub fn next_generation(&self, name: &str) -> u64 {
        self.entries.get(name).map_or(1, |e| e.generation + 1)
    }

    /// The live entry for `name`.
    pub fn live(&self, name: &str) -> Option<&CatalogEntry> {
        self.entries.get(name).filter(|e| !e.removed)
    }
}

fn path_text(p: &Path) -> String {
    p.file_name().map_or_else(|| PathBuf::from(p), PathBuf::from).display().to_string()
}

/// Reads a manifest or other signed file with a size cap before allocating.
pub(crate) fn read_capped(path: &Path, cap: usize) -> Result<Vec<u8>, StoreError> {
    let md = fs::symlink_metadata(path).map_err(io_err("cannot stat", path))?;
    if !md.is_file() || md.len() > cap as u64 {
        return Err(StoreError::Tampered {
            file: path_text(path),
            detail: "not a regular file of acceptable size".into(),
        });
    }
    fs::read(path).map_err(io_err("cannot read", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Catalog {
        let mut c = Catalog::default();
        c.entries
            .insert("web".into(), CatalogEntry { manifest: "ab".repeat(16), generation: 3, removed: false });
        c
    }

    #[test]
    fn round_trip_and_generations() {
        let keys = NodeKeys::generate();
        let trusted = [keys.public().ed25519];
        let c = Catalog::decode(&sample().encode(&keys), &trusted).expect("decode");
        assert_eq!(c, sample());
        assert_eq!(c.next_generation("web"), 4);
        assert_eq!(c.next_generation("new"), 1);
    }

    #[test]
    fn tampering_and_strangers_are_refused() {
        let keys = NodeKeys::generate();
        let trusted = [keys.public().ed25519];
        let bytes = sample().encode(&keys);
        for i in [0, 5, HEADER + 3, bytes.len() - 40, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(Catalog::decode(&b, &trusted).is_err(), "flip at {i}");
        }
        let stranger = NodeKeys::generate();
        assert!(Catalog::decode(&sample().encode(&stranger), &trusted).is_err());
        assert!(Catalog::decode(&bytes[..bytes.len() - 1], &trusted).is_err());
    }
}

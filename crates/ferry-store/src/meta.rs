//! `meta.json`: what a checkpoint is, where it came from, and which files it must contain.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::StoreError;

/// Version of the on-disk layout; independent of ferry's own version.
pub const FORMAT_VERSION: u32 = 1;
/// A meta file larger than this is refused before parsing.
pub const MAX_META_BYTES: u64 = 4 << 20;
/// At most this many image files per checkpoint.
const MAX_FILES: usize = 100_000;

/// Facts about the host that took the checkpoint; a restore elsewhere compares them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub hostname: String,
    pub kernel: String,
    pub criu_version: String,
}

/// One image file and its size when the checkpoint was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    /// BLAKE3 of the content, hex.
    pub blake3: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: u32,
    pub name: String,
    /// The workload, as the user named it (`pid:1234`).
    pub source: String,
    /// Host PID of the tree's root when it was checkpointed.
    pub pid: i32,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub host: HostFacts,
    pub tcp_established: bool,
    pub leave_running: bool,
    /// nftables tables (`inet CRIU-...`) holding the checkpointed connections' traffic until
    /// the restore; released by `ferry rm` if the checkpoint is never restored.
    #[serde(default)]
    pub network_lock_tables: Vec<String>,
    /// Seconds the dump took.
    pub dump_seconds: f64,
    pub files: Vec<FileEntry>,
}

impl CheckpointMeta {
    pub fn size_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    pub(crate) fn to_json(&self) -> Vec<u8> {
        // Serializing plain data to JSON cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Parses and checks a meta file's bytes; every name in it is treated as hostile.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<CheckpointMeta, StoreError> {
        let bad = |detail: String| StoreError::BadMeta {
            path: path.to_path_buf(),
            detail,
        };
        if bytes.len() as u64 > MAX_META_BYTES {
            return Err(bad(format!("larger than {MAX_META_BYTES} bytes")));
        }
        #[derive(Deserialize)]
        struct Probe {
            format: u32,
        }
        let probe: Probe = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if probe.format != FORMAT_VERSION {
            return Err(StoreError::UnsupportedFormat {
                found: probe.format,
                supported: FORMAT_VERSION,
            });
        }
        let meta: CheckpointMeta = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        crate::validate_name(&meta.name).map_err(|e| bad(e.to_string()))?;
        if meta.files.len() > MAX_FILES {
            return Err(bad(format!("more than {MAX_FILES} files")));
        }
        for f in &meta.files {
            if !is_plain_file_name(&f.name) {
                return Err(bad(format!("file name {:?} is not a plain name", f.name)));
            }
            if f.blake3.len() != 64 || !f.blake3.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!("the hash of {:?} is not 64 hex digits", f.name)));
            }
        }
        Ok(meta)
    }
}

/// CRIU's image directory is flat: a listed file is a single, ordinary path component.
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CheckpointMeta {
        CheckpointMeta {
            format: FORMAT_VERSION,
            name: "c1".into(),
            source: "pid:42".into(),
            pid: 42,
            created: 1_700_000_000,
            host: HostFacts::default(),
            tcp_established: false,
            leave_running: false,
            network_lock_tables: vec![],
            dump_seconds: 0.5,
            files: vec![FileEntry {
                name: "pages-1.img".into(),
                size: 4096,
                blake3: "ab".repeat(32),
            }],
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let back = CheckpointMeta::parse(&m.to_json(), Path::new("m")).expect("parse");
        assert_eq!(back, m);
        assert_eq!(back.size_bytes(), 4096);
    }

    #[test]
    fn refuses_hostile_file_names() {
        for bad in ["../../etc/passwd", "/etc/shadow", "..", "", "a/b"] {
            let mut m = sample();
            m.files[0].name = bad.into();
            let err = CheckpointMeta::parse(&m.to_json(), Path::new("m")).expect_err(bad);
            assert!(matches!(err, StoreError::BadMeta { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn refuses_other_formats_and_garbage() {
        let mut m = sample();
        m.format = 99;
        assert!(matches!(
            CheckpointMeta::parse(&m.to_json(), Path::new("m")),
            Err(StoreError::UnsupportedFormat { found: 99, .. })
        ));
        assert!(CheckpointMeta::parse(b"{not json", Path::new("m")).is_err());
        let huge = vec![b' '; (MAX_META_BYTES + 1) as usize];
        assert!(CheckpointMeta::parse(&huge, Path::new("m")).is_err());
    }
}

//! Helpers of the crate's unit tests: stores in temporary directories, checkpoints of given
//! image files, and what a checkpoint materializes to.
#![allow(clippy::unwrap_used)] // a failing test should stop right there

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use crate::keys::{add_recipient, NodeKeys};
use crate::manifest::HostInfo;
use crate::{CheckpointInfo, Committed, Store};

/// A store at `root` whose node shares `other`'s hash key and trusts it (as recipient `a`).
pub(crate) fn peer_store(root: &Path, other: &Store) -> Store {
    fs::create_dir(root).unwrap();
    let keys = root.join("keys");
    NodeKeys::init_with_hash_key(&keys, other.keys().hash_key()).unwrap();
    add_recipient(&keys, "a", &other.keys().public()).unwrap();
    Store::open(root).unwrap()
}

/// `len` pseudo-random bytes (xorshift), the same for the same seed.
pub(crate) fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Commits a checkpoint `name` whose images are `files`.
pub(crate) fn checkpoint(store: &Store, name: &str, files: &[(&str, Vec<u8>)]) -> Committed {
    let pending = store.begin(name).unwrap();
    for (n, data) in files {
        fs::write(pending.images_dir().join(n), data).unwrap();
    }
    let pipeline = pending.start_ingest(store).unwrap();
    let info = CheckpointInfo {
        source: "pid:4242".into(),
        host: HostInfo {
            hostname: "node-a".into(),
            kernel: "6.8".into(),
            criu_version: "4.0".into(),
            cpu_flags: "sse2".into(),
        },
        spec: r#"{"kind":"pid","pid":4242}"#.into(),
        dump_seconds: 0.5,
        ..CheckpointInfo::default()
    };
    pending.commit(store, info, pipeline).unwrap()
}

/// The files checkpoint `name` materializes to, by name.
pub(crate) fn materialized(store: &Store, name: &str) -> BTreeMap<String, Vec<u8>> {
    let c = store.get(name).unwrap();
    let scratch = store.scratch("test").unwrap();
    c.materialize(store, scratch.path()).unwrap();
    fs::read_dir(scratch.path())
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), fs::read(e.path()).unwrap())
        })
        .collect()
}

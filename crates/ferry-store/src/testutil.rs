//! Helpers of the crate's unit tests: stores in temporary directories, checkpoints of given
//! image files, and what a checkpoint materializes to.
#![allow(clippy::unwrap_used)] // a failing test should stop right there

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::keys::{add_recipient, NodeKeys};
use crate::manifest::HostInfo;
use crate::seal::{FrameFormat, Opener, Sealer};
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

/// Seals every chunk of checkpoint `name` again in frame format 1 (XChaCha20-Poly1305), in
/// place: the store as a ferry of before format 2 would have written it. Returns the number
/// of frames rewritten.
pub(crate) fn reseal_as_format_1(store: &Store, name: &str) -> usize {
    let c = store.get(name).unwrap();
    let ring = c.key_ring(store).unwrap();
    let locations = store.chunk_locations(&c).unwrap();
    let packs = store.packs().unwrap();
    let mut reader = packs.reader();
    let mut opener = Opener::new(&ring, store.keys().hash_key());
    let (mut frame, mut old) = (Vec::new(), Vec::new());
    for (id, loc) in &locations {
        reader.read_at(*loc, &mut frame).unwrap();
        let plain = opener.open(id, &frame).unwrap();
        let mut sealer = Sealer::with_format(ring.get(&loc.key).unwrap(), FrameFormat::XChaCha20Poly1305);
        old.clear();
        // zstd is deterministic: the same choice gives the same length, so the frame fits.
        sealer.seal_with(id, &plain, &mut old, frame[5] & 1 == 1);
        assert_eq!(old.len(), frame.len());
        let pack = OpenOptions::new().write(true).open(packs.pack_path(&loc.pack, "pack")).unwrap();
        pack.write_all_at(&old, loc.offset).unwrap();
    }
    locations.len()
}

/// How many of checkpoint `name`'s chunks this store holds in each frame format (version).
pub(crate) fn frame_versions(store: &Store, name: &str) -> BTreeMap<u8, usize> {
    let c = store.get(name).unwrap();
    let locations = store.chunk_locations(&c).unwrap();
    let mut reader = store.packs().unwrap().reader();
    let mut frame = Vec::new();
    let mut out = BTreeMap::new();
    for (_, loc) in locations {
        reader.read_at(loc, &mut frame).unwrap();
        *out.entry(frame[4]).or_default() += 1;
    }
    out
}

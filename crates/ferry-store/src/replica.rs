//! Copying a checkpoint from one node's store into another's, as migration does: the source
//! describes it (signed manifest, data keys wrapped for the receiver, the sealed chunks it
//! needs), the receiver says which chunks it lacks, and only those cross, as stored (sealed;
//! never opened on the way). The receiver checks the manifest's signature against its trusted
//! signers, writes and syncs the chunks before slots, manifest and catalog entry, and opens
//! every chunk before anything is restored from it (`Checkpoint::materialize`).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::catalog::{read_capped, CatalogEntry};
use crate::fsutil::write_atomic;
use crate::manifest::{decode_verified, Extent, MAX_MANIFEST_FILE};
use crate::packs::{hex, PackReader, PackWriter};
use crate::seal::{DataKey, Slots, MAX_FRAME};
use crate::store::{Checkpoint, Store};
use crate::StoreError;

/// Most bytes read from a pack in one call when sending.
const BATCH_SPAN: u32 = 1 << 20;

/// Most chunks one shipment may list (a 64 GiB checkpoint of 4 KiB pages would need 16 M).
pub const MAX_SHIPMENT_CHUNKS: usize = 1 << 24;

/// A sealed chunk as a shipment lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    pub id: [u8; 32],
    pub key: [u8; 16],
    pub len: u32,
}

/// What a receiver needs to take in a checkpoint, besides the chunks' bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Shipment {
    pub name: String,
    /// The manifest as signed by the source.
    pub manifest: Vec<u8>,
    /// The checkpoint's data keys, wrapped for the receiver.
    pub slots: Vec<u8>,
    /// Every distinct chunk the manifest uses, in first-use order.
    pub chunks: Vec<ChunkRef>,
}

impl Shipment {
    /// Total sealed bytes of `chunks`.
    pub fn bytes(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.len)).sum()
    }
}

impl Store {
    /// Describes checkpoint `name` for a receiver whose X25519 public key is `recipient`.
    pub fn shipment(&self, name: &str, recipient: &[u8; 32]) -> Result<Shipment, StoreError> {
        let c = self.get(name)?;
        self.shipment_of(&c, recipient)
    }

    /// [`shipment`](Store::shipment) of a checkpoint already verified (one just committed):
    /// its manifest is not decoded and checked again (9 MiB per GiB of memory; the receiver
    /// checks its signature).
    pub fn shipment_of(&self, c: &Checkpoint, recipient: &[u8; 32]) -> Result<Shipment, StoreError> {
        let name = c.name();
        let manifest = read_capped(&self.manifest_path(name), MAX_MANIFEST_FILE)?;
        let ring = c.key_ring(self)?;
        let keys: Vec<&DataKey> = c
            .manifest
            .key_ids
            .iter()
            .map(|k| {
                ring.get(k).ok_or_else(|| StoreError::NoKey {
                    name: name.to_owned(),
                    detail: format!("key {} has no slot", hex(k)),
                })
            })
            .collect::<Result<_, _>>()?;
        let slots = Slots::wrap(&keys, &[*recipient])
            .map_err(|e| StoreError::NoKey { name: name.to_owned(), detail: e.to_string() })?
            .encode();
        let chunks = self
            .chunk_locations(c)?
            .into_iter()
            .map(|(id, loc)| ChunkRef { id, key: loc.key, len: loc.len })
            .collect();
        Ok(Shipment { name: name.to_owned(), manifest, slots, chunks })
    }

    /// Reads sealed chunks for sending.
    pub fn chunk_reader(&self) -> Result<ChunkReader, StoreError> {
        Ok(ChunkReader { reader: self.packs()?.reader() })
    }

    /// Positions in `chunks` of those this store does not hold under the same data key.
    pub fn lacking(&self, chunks: &[ChunkRef]) -> Result<Vec<u32>, StoreError> {
        if chunks.len() > MAX_SHIPMENT_CHUNKS {
            return Err(refused(format!("{} chunks listed, at most {MAX_SHIPMENT_CHUNKS}", chunks.len())));
        }
        let packs = self.packs()?;
        Ok((0..chunks.len() as u32)
            .filter(|&i| {
                let c = &chunks[i as usize];
                packs.find(&c.id, &|k| *k == c.key).is_none()
            })
            .collect())
    }

    /// Starts taking in chunks; nothing is visible until [`Receiver::finish`].
    pub fn receiver(&self) -> Result<Receiver<'_>, StoreError> {
        self.receiver_with(true)
    }

    /// Like [`receiver`](Store::receiver); without `durable` the pack's bytes are not synced
    /// ([`PackWriter::volatile`]): for a migration's arrival.
    pub fn receiver_with(&self, durable: bool) -> Result<Receiver<'_>, StoreError> {
        let dir = self.packs()?.dir().to_path_buf();
        // The writer's own key is unused: every frame is appended under the key it was sealed by.
        let writer = PackWriter::create(&dir, [0u8; 16])?;
        let writer = if durable { writer } else { writer.volatile() };
        Ok(Receiver { store: self, writer: Some(writer), received: HashSet::new(), durable })
    }
}

/// Reads a chunk's sealed bytes as stored.
#[derive(Debug)]
pub struct ChunkReader {
    reader: PackReader,
}

impl ChunkReader {
    /// The sealed frame of `chunk` into `buf`.
    pub fn read(&mut self, chunk: &ChunkRef, buf: &mut Vec<u8>) -> Result<(), StoreError> {
        let loc = self.locate(chunk)?;
        self.reader.read_at(loc, buf)
    }

    /// Appends the sealed frames of `chunks`, in order, to `out`; frames that lie back to back
    /// in a pack (as a checkpoint's new chunks do) are read with one call.
    pub fn read_batch(&mut self, chunks: &[ChunkRef], out: &mut Vec<u8>) -> Result<(), StoreError> {
        let mut span = Vec::new();
        let mut next = match chunks.first() {
            Some(c) => Some(self.locate(c)?),
            None => None,
        };
        let mut i = 0;
        while let Some(first) = next.take() {
            let mut end = first.offset + u64::from(first.len);
            i += 1;
            while i < chunks.len() {
                let l = self.locate(&chunks[i])?;
                if l.pack != first.pack || l.offset != end || end - first.offset >= u64::from(BATCH_SPAN) {
                    next = Some(l);
                    break;
                }
                end += u64::from(l.len);
                i += 1;
            }
            self.reader
                .read_span(crate::packs::Location { len: (end - first.offset) as u32, ..first }, &mut span)?;
            out.extend_from_slice(&span);
        }
        Ok(())
    }

    fn locate(&self, chunk: &ChunkRef) -> Result<crate::packs::Location, StoreError> {
        let loc = self.reader.find(&chunk.id, &|k| *k == chunk.key).ok_or_else(|| StoreError::Damaged {
            name: String::new(),
            file: "packs".into(),
            detail: format!("chunk {} is missing from the store", hex(&chunk.id[..8])),
        })?;
        if loc.len != chunk.len {
            return Err(StoreError::Damaged {
                name: String::new(),
                file: "packs".into(),
                detail: format!(
                    "chunk {} has {} bytes in its pack, {} listed",
                    hex(&chunk.id[..8]),
                    loc.len,
                    chunk.len
                ),
            });
        }
        Ok(loc)
    }
}

/// Chunks being received; dropped without `finish`, it leaves nothing.
#[derive(Debug)]
pub struct Receiver<'a> {
    store: &'a Store,
    writer: Option<PackWriter>,
    received: HashSet<ChunkRef>,
    durable: bool,
}

impl Receiver<'_> {
    /// Appends one sealed frame (checked when the checkpoint is verified or materialized).
    pub fn add(&mut self, chunk: ChunkRef, frame: &[u8]) -> Result<(), StoreError> {
        if frame.len() != chunk.len as usize || frame.len() > MAX_FRAME {
            return Err(refused(format!(
                "chunk {} came with {} bytes, announced {}",
                hex(&chunk.id[..8]),
                frame.len(),
                chunk.len
            )));
        }
        if self.received.len() >= MAX_SHIPMENT_CHUNKS {
            return Err(refused("too many chunks".into()));
        }
        let writer = self.writer.as_mut().ok_or_else(|| refused("receiver already finished".into()))?;
        writer.append_sealed_by(&chunk.id, chunk.key, frame)?;
        self.received.insert(chunk);
        Ok(())
    }

    /// Appends frames laid back to back in `bytes` (`chunks` gives each one, in order) with
    /// one write.
    pub fn add_batch(&mut self, chunks: &[ChunkRef], bytes: &[u8]) -> Result<(), StoreError> {
        let total: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
        if total != bytes.len() as u64 || chunks.iter().any(|c| c.len == 0 || c.len as usize > MAX_FRAME) {
            return Err(refused(format!(
                "a batch of {} chunks came with {} bytes, announced {total}",
                chunks.len(),
                bytes.len()
            )));
        }
        if self.received.len() + chunks.len() > MAX_SHIPMENT_CHUNKS {
            return Err(refused("too many chunks".into()));
        }
        let writer = self.writer.as_mut().ok_or_else(|| refused("receiver already finished".into()))?;
        let frames: Vec<([u8; 32], [u8; 16], u32)> = chunks.iter().map(|c| (c.id, c.key, c.len)).collect();
        writer.append_frames(bytes, &frames)?;
        self.received.extend(chunks.iter().copied());
        Ok(())
    }

    /// The pack the chunks go to (to release it once the checkpoint is no longer needed).
    pub fn pack(&self) -> Option<crate::packs::PackId> {
        self.writer.as_ref().map(PackWriter::id)
    }

    /// Bytes appended so far.
    pub fn bytes(&self) -> u64 {
        self.writer.as_ref().map_or(0, PackWriter::size)
    }

    /// Makes the chunks durable and known to the store, without a checkpoint that uses them
    /// (yet): chunks streamed ahead of their manifest. Until a manifest names them they are
    /// garbage to `ferry gc`, and `Store::release_packs` of [`Receiver::pack`] removes them.
    pub fn finish_loose(mut self) -> Result<u64, StoreError> {
        let writer = self.writer.take().ok_or_else(|| refused("receiver already finished".into()))?;
        let finished = writer.finish()?;
        let chunks = finished.entries.len() as u64;
        self.store.packs()?.absorb(finished);
        Ok(chunks)
    }

    /// Makes the chunks durable, then records the checkpoint: slots, manifest (signature
    /// checked against this node's trusted signers), catalog entry. Every chunk the manifest
    /// uses must now be in the store under the key the shipment named.
    pub fn finish(mut self, shipment: &Shipment) -> Result<Checkpoint, StoreError> {
        let store = self.store;
        let name = &shipment.name;
        crate::validate_name(name)?;
        if shipment.manifest.len() > MAX_MANIFEST_FILE {
            return Err(refused("manifest over its size cap".into()));
        }
        let (manifest, signer) =
            decode_verified(&shipment.manifest, &store.trusted()?).map_err(|e| StoreError::Tampered {
                file: format!("manifests/{name}.fmf (received)"),
                detail: format!("{e}; is the sending node trusted here (`ferry node trust`)?"),
            })?;
        if manifest.name != *name {
            return Err(refused(format!("the manifest describes '{}', not '{name}'", manifest.name)));
        }
        if store.manifest_path(name).exists() || store.catalog_live(name)? {
            return Err(StoreError::Exists(name.clone()));
        }
        let slots = Slots::decode(&shipment.slots)
            .map_err(|e| StoreError::NoKey { name: name.clone(), detail: e.to_string() })?;
        let ring = slots.open_all(store.keys().x25519_secret()).map_err(|e| StoreError::NoKey {
            name: name.clone(),
            detail: format!("the keys were not wrapped for this node: {e}"),
        })?;
        if let Some(k) = manifest.key_ids.iter().find(|k| ring.get(k).is_none()) {
            return Err(StoreError::NoKey {
                name: name.clone(),
                detail: format!("key {} has no slot", hex(k)),
            });
        }
        let writer = self.writer.take().ok_or_else(|| refused("receiver already finished".into()))?;
        let finished = writer.finish()?;
        {
            let mut packs = store.packs()?;
            packs.absorb(finished);
            let mut used = std::collections::BTreeSet::new();
            for f in &manifest.files {
                for e in &f.extents {
                    if let Extent::Chunk { id, .. } = e {
                        let Some(loc) = packs.find(id, &|k| manifest.key_ids.contains(k)) else {
                            return Err(StoreError::Damaged {
                                name: name.clone(),
                                file: f.name.clone(),
                                detail: format!(
                                    "chunk {} was neither sent nor held{}",
                                    hex(&id[..8]),
                                    if shipment.chunks.iter().any(|c| c.id == *id) {
                                        ""
                                    } else {
                                        " (not announced)"
                                    }
                                ),
                            });
                        };
                        used.insert(loc.pack);
                    }
                }
            }
            if self.durable {
                packs.sync(&used)?;
            }
        }
        write_atomic(&store.slots_path(&manifest.id), &shipment.slots)?;
        write_atomic(&store.manifest_path(name), &shipment.manifest)?;
        let entry =
            CatalogEntry { manifest: hex(&manifest.id), generation: manifest.generation, removed: false };
        store.put_catalog_entry(name, entry)?;
        Ok(Checkpoint { manifest, signer })
    }
}

fn refused(detail: String) -> StoreError {
    StoreError::Tampered { file: "shipment".into(), detail }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing test should stop right there
mod tests {
    use super::*;
    use crate::testutil::{checkpoint, materialized, peer_store, random};

    /// Ships `name` from `from` to `to`, sending only what `to` lacks; returns the chunks sent.
    fn ship(from: &Store, to: &Store, name: &str) -> Result<usize, StoreError> {
        let shipment = from.shipment(name, &to.keys().public().x25519)?;
        let lacking = to.lacking(&shipment.chunks)?;
        let mut reader = from.chunk_reader()?;
        let mut rx = to.receiver()?;
        let mut buf = Vec::new();
        for &i in &lacking {
            let c = shipment.chunks[i as usize];
            reader.read(&c, &mut buf)?;
            rx.add(c, &buf)?;
        }
        rx.finish(&shipment)?;
        Ok(lacking.len())
    }

    fn images(seed: u64) -> Vec<(&'static str, Vec<u8>)> {
        let mut pages = random(64 * 4096, 1);
        // One page in 16 differs between seeds: the dirtied part of a second checkpoint.
        for p in (0..64).step_by(16) {
            pages[p * 4096..(p + 1) * 4096].copy_from_slice(&random(4096, seed * 1000 + p as u64));
        }
        vec![("pages-1.img", pages), ("core-1.img", random(900, seed)), ("inventory.img", b"inv".to_vec())]
    }

    #[test]
    fn a_shipped_checkpoint_materializes_the_same_and_the_next_sends_only_the_delta() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(dir.path().join("a")).unwrap();
        let b = peer_store(&dir.path().join("b"), &a);
        crate::keys::add_recipient(&a.keys_dir(), "b", &b.keys().public()).unwrap();

        checkpoint(&a, "first", &images(1));
        let first = a.shipment("first", &b.keys().public().x25519).unwrap();
        assert_eq!(ship(&a, &b, "first").unwrap(), first.chunks.len());
        assert_eq!(materialized(&b, "first"), materialized(&a, "first"));
        let got = b.get("first").unwrap();
        assert_eq!(got.signer, a.keys().public().ed25519);

        checkpoint(&a, "second", &images(2));
        let sent = ship(&a, &b, "second").unwrap();
        // 4 changed pages and the changed core file.
        assert_eq!(sent, 5, "only the chunks the receiver lacks cross");
        assert_eq!(materialized(&b, "second"), materialized(&a, "second"));
    }

    #[test]
    fn batched_reads_and_writes_ship_the_same_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(dir.path().join("a")).unwrap();
        let b = peer_store(&dir.path().join("b"), &a);
        checkpoint(&a, "c", &images(1));
        let shipment = a.shipment("c", &b.keys().public().x25519).unwrap();
        let lacking = b.lacking(&shipment.chunks).unwrap();
        let mut reader = a.chunk_reader().unwrap();
        let mut rx = b.receiver().unwrap();
        for part in lacking.chunks(7) {
            let refs: Vec<ChunkRef> = part.iter().map(|&i| shipment.chunks[i as usize]).collect();
            let mut bytes = Vec::new();
            reader.read_batch(&refs, &mut bytes).unwrap();
            rx.add_batch(&refs, &bytes).unwrap();
        }
        // A batch whose bytes do not add up is refused.
        let one = [shipment.chunks[0]];
        assert!(rx.add_batch(&one, b"short").is_err());
        rx.finish(&shipment).unwrap();
        assert_eq!(materialized(&b, "c"), materialized(&a, "c"));
    }

    #[test]
    fn a_checkpoint_from_an_untrusted_node_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(dir.path().join("a")).unwrap();
        let stranger = Store::open(dir.path().join("s")).unwrap();
        let b = peer_store(&dir.path().join("b"), &a);
        checkpoint(&stranger, "x", &images(1));
        let err = ship(&stranger, &b, "x").unwrap_err();
        assert!(matches!(err, StoreError::Tampered { .. }), "{err}");
        assert!(err.to_string().contains("ferry node trust"), "{err}");
        let (good, bad) = b.list().unwrap();
        assert!(good.is_empty() && bad.is_empty());
    }

    #[test]
    fn a_corrupted_chunk_is_caught_before_restore() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(dir.path().join("a")).unwrap();
        let b = peer_store(&dir.path().join("b"), &a);
        checkpoint(&a, "c", &images(1));
        let shipment = a.shipment("c", &b.keys().public().x25519).unwrap();
        let mut reader = a.chunk_reader().unwrap();
        let mut rx = b.receiver().unwrap();
        let mut buf = Vec::new();
        for (i, c) in shipment.chunks.iter().enumerate() {
            reader.read(c, &mut buf).unwrap();
            if i == 3 {
                let n = buf.len();
                buf[n / 2] ^= 1;
            }
            rx.add(*c, &buf).unwrap();
        }
        rx.finish(&shipment).unwrap();
        let c = b.get("c").unwrap();
        let err = c.verify(&b).unwrap_err();
        assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
    }

    #[test]
    fn a_chunk_neither_sent_nor_held_fails_the_receipt() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(dir.path().join("a")).unwrap();
        let b = peer_store(&dir.path().join("b"), &a);
        checkpoint(&a, "c", &images(1));
        let shipment = a.shipment("c", &b.keys().public().x25519).unwrap();
        let mut reader = a.chunk_reader().unwrap();
        let mut rx = b.receiver().unwrap();
        let mut buf = Vec::new();
        for c in shipment.chunks.iter().skip(1) {
            reader.read(c, &mut buf).unwrap();
            rx.add(*c, &buf).unwrap();
        }
        let err = rx.finish(&shipment).unwrap_err();
        assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
        assert!(b.get("c").is_err());
    }
}

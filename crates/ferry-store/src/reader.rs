//! Random access to a checkpoint's files without writing them out: what a restore through
//! ferry's pager reads page data with. Every chunk is opened (tag, bounded decompression,
//! keyed hash) before a byte of it is handed out, exactly as when the images are written
//! into a tmpfs; the plaintext only ever lives in the caller's buffer.

use std::path::PathBuf;
use std::sync::Arc;

use crate::keys::ChunkId;
use crate::manifest::{Extent, ManifestBody};
use crate::packs::{hex, KeyId, Known, Location, PackReader};
use crate::seal::{KeyRing, Opener};
use crate::StoreError;

/// Frames read from a pack in one go, at most (they follow each other there).
const SPAN: u64 = 4 << 20;

/// One file of a checkpoint: where each extent starts.
#[derive(Debug)]
struct Indexed {
    name: String,
    size: u64,
    starts: Vec<u64>,
    extents: Vec<Extent>,
}

/// The files of one checkpoint, readable at any offset. Shared between threads; each thread
/// reads through its own [`Cursor`].
#[derive(Debug)]
pub struct ImageReader {
    checkpoint: String,
    files: Vec<Indexed>,
    ring: Arc<KeyRing>,
    hash_key: [u8; 32],
    known: Known,
    dir: PathBuf,
}

impl ImageReader {
    pub(crate) fn new(
        manifest: &ManifestBody,
        ring: KeyRing,
        hash_key: [u8; 32],
        known: Known,
        dir: PathBuf,
    ) -> ImageReader {
        let files = manifest
            .files
            .iter()
            .map(|f| {
                let mut at = 0u64;
                let starts = f
                    .extents
                    .iter()
                    .map(|e| {
                        let s = at;
                        at += e.len();
                        s
                    })
                    .collect();
                Indexed { name: f.name.clone(), size: f.size, starts, extents: f.extents.clone() }
            })
            .collect();
        ImageReader { checkpoint: manifest.name.clone(), files, ring: Arc::new(ring), hash_key, known, dir }
    }

    /// The index of file `name`, if the checkpoint has it.
    pub fn file(&self, name: &str) -> Option<usize> {
        self.files.iter().position(|f| f.name == name)
    }

    /// The size of file `file` (an index from [`file`](Self::file)).
    pub fn size(&self, file: usize) -> u64 {
        self.files.get(file).map_or(0, |f| f.size)
    }

    /// A reader for one thread.
    pub fn cursor(&self) -> Cursor<'_> {
        Cursor {
            r: self,
            packs: PackReader::new(&self.dir, self.known.clone()),
            opener: Opener::new(&self.ring, &self.hash_key),
            span: Vec::new(),
        }
    }
}

/// Reads a checkpoint's files for one thread (its own pack handles and cipher state).
#[derive(Debug)]
pub struct Cursor<'a> {
    r: &'a ImageReader,
    packs: PackReader,
    opener: Opener<'a>,
    span: Vec<u8>,
}

impl Cursor<'_> {
    /// Fills `out` with the bytes of file `file` from `offset` on, every chunk they come
    /// from checked first. Nothing of a chunk that fails its check reaches `out`.
    pub fn read(&mut self, file: usize, offset: u64, out: &mut [u8]) -> Result<(), StoreError> {
        let r = self.r;
        let f = r.files.get(file).ok_or_else(|| self.damaged("?", offset, "no such file".into()))?;
        let end = offset
            .checked_add(out.len() as u64)
            .filter(|&e| e <= f.size)
            .ok_or_else(|| self.damaged(&f.name, offset, format!("{} bytes past its end", out.len())))?;
        let mut i = f.starts.partition_point(|&s| s <= offset).saturating_sub(1);
        let mut pos = offset;
        while pos < end {
            let (start, ext) = match (f.starts.get(i), f.extents.get(i)) {
                (Some(&s), Some(e)) => (s, *e),
                _ => return Err(self.damaged(&f.name, pos, "extents end before the file".into())),
            };
            match ext {
                Extent::Zero { len } => {
                    let hi = end.min(start + len);
                    out[(pos - offset) as usize..(hi - offset) as usize].fill(0);
                    pos = hi;
                    i += 1;
                }
                Extent::Chunk { .. } => {
                    let n = self.read_chunks(f, i, pos, end, offset, out)?;
                    pos = f.starts.get(i + n).copied().unwrap_or(f.size).min(end);
                    i += n;
                }
            }
        }
        Ok(())
    }

    /// Reads the chunk extents from `first` on that lie back to back in one pack, as one
    /// span, and copies their part of `[pos, end)` into `out` (which starts at `base`).
    /// Returns how many extents it consumed (at least one).
    fn read_chunks(
        &mut self,
        f: &Indexed,
        first: usize,
        pos: u64,
        end: u64,
        base: u64,
        out: &mut [u8],
    ) -> Result<usize, StoreError> {
        let mut locs: Vec<(ChunkId, u32, Location)> = Vec::new();
        let mut span_end = 0u64;
        for k in first..f.extents.len() {
            if f.starts[k] >= end {
                break;
            }
            let Extent::Chunk { id, len } = f.extents[k] else { break };
            let loc = self.locate(&f.name, f.starts[k], &id)?;
            if let Some((_, _, l0)) = locs.first() {
                if loc.pack != l0.pack || loc.offset != span_end || span_end - l0.offset >= SPAN {
                    break;
                }
            }
            span_end = loc.offset + u64::from(loc.len);
            locs.push((id, len, loc));
        }
        let l0 = locs[0].2;
        let span_loc = Location { len: (span_end - l0.offset) as u32, ..l0 };
        let mut span = std::mem::take(&mut self.span);
        if let Err(e) = self.packs.read_span(span_loc, &mut span) {
            return Err(self.damaged(
                &f.name,
                f.starts[first],
                format!("chunk {}: {e}", hex(&locs[0].0[..8])),
            ));
        }
        for (k, (id, len, loc)) in locs.iter().enumerate() {
            let at = f.starts[first + k];
            let frame = &span[(loc.offset - l0.offset) as usize..][..loc.len as usize];
            if pos <= at && at + u64::from(*len) <= end {
                // The whole chunk is wanted: opened straight into place.
                let dst = &mut out[(at - base) as usize..(at - base + u64::from(*len)) as usize];
                if let Err(e) = self.opener.open_into(id, frame, dst) {
                    return Err(self.damaged(&f.name, at, format!("chunk {}: {e}", hex(&id[..8]))));
                }
                continue;
            }
            let plain = match self.opener.open(id, frame) {
                Ok(p) if p.len() == *len as usize => p,
                Ok(p) => {
                    let detail =
                        format!("chunk {} has {} bytes, the manifest says {len}", hex(&id[..8]), p.len());
                    return Err(self.damaged(&f.name, at, detail));
                }
                Err(e) => return Err(self.damaged(&f.name, at, format!("chunk {}: {e}", hex(&id[..8])))),
            };
            let lo = pos.max(at);
            let hi = end.min(at + u64::from(*len));
            if lo < hi {
                out[(lo - base) as usize..(hi - base) as usize]
                    .copy_from_slice(&plain[(lo - at) as usize..(hi - at) as usize]);
            }
        }
        self.span = span;
        Ok(locs.len())
    }

    fn locate(&self, file: &str, at: u64, id: &ChunkId) -> Result<Location, StoreError> {
        let ring = &self.r.ring;
        self.packs.find(id, &|k: &KeyId| ring.get(k).is_some()).ok_or_else(|| {
            self.damaged(file, at, format!("chunk {} is missing from the store", hex(&id[..8])))
        })
    }

    fn damaged(&self, file: &str, at: u64, detail: String) -> StoreError {
        StoreError::Damaged {
            name: self.r.checkpoint.clone(),
            file: format!("{file} at offset {at}"),
            detail,
        }
    }
}

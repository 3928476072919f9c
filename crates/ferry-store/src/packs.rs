//! Pack files: sealed chunk frames appended to large files, each with an index written after
//! the pack is durable. A 4 KiB page must not cost a file of its own.
//!
//! ```text
//! PACKID.pack   frame frame frame ...                     (append-only, fsynced, then closed)
//! PACKID.idx    "FRYX" ver:u16 0:u16 count:u32  { id[32] key[16] offset:u64 len:u32 } * count
//! ```
//! A pack without an index is the leftover of an interrupted writer; `gc` removes it.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::io_err;
use crate::fsutil::{create_private, random_bytes};
use crate::StoreError;

pub type PackId = [u8; 16];
type Id = [u8; 32];
/// Id of the data key that sealed a chunk.
pub type KeyId = [u8; 16];

const IDX_MAGIC: &[u8; 4] = b"FRYX";
const IDX_VERSION: u16 = 1;
const IDX_HEADER: usize = 12;
const IDX_ENTRY: usize = 60;
/// An index may list at most this many chunks (a full pack of 4 KiB chunks is 65536).
const MAX_IDX_ENTRIES: usize = 1 << 24;
/// A pack is closed once it reaches this size.
pub const PACK_TARGET: u64 = 256 << 20;
/// Largest read of several frames at once.
pub const MAX_SPAN: u32 = 8 << 20;
/// No frame is larger than this (4 MiB chunk + compression slack + header).
pub const MAX_FRAME: u32 = (4 << 20) + (64 << 10) + 128;

/// Where a chunk's frame lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub pack: PackId,
    pub key: KeyId,
    pub offset: u64,
    pub len: u32,
}

/// Where each chunk is. Usually one copy; a chunk can be stored twice under different data
/// keys (sealed again because the first copy's key was gone), so readers say which keys they
/// can use.
///
/// The packs found at the store's open form one table sorted by id (bucketed by the id's first
/// two bytes, which are uniform: ids are keyed hashes), written in two sequential passes; the
/// packs written since (a checkpoint's) go into a hash map beside it. A hash map of every entry
/// took most of a restore's time before CRIU started: 85 MB of table written at random for a
/// store of 530 000 chunks. Entries name their pack and key by number ([`Slot`]).
#[derive(Debug, Clone, Default)]
struct Index {
    base: Arc<Sorted>,
    recent: HashMap<Id, Vec<Slot>, IdHashing>,
    /// The (pack, key) pairs the slots name by position; one or a few per pack.
    places: Vec<(PackId, KeyId)>,
    place_of: HashMap<(PackId, KeyId), u32>,
}

/// A chunk's frame: where in which pack, sealed under which key (`Index::places[place]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Slot {
    offset: u64,
    len: u32,
    place: u32,
}

/// Entries bucketed by their ids' first two bytes, in the order they were added within a
/// bucket; `fanout[b]` is where bucket `b` starts.
#[derive(Debug, Clone, Default)]
struct Sorted {
    entries: Vec<(Id, Slot)>,
    fanout: Vec<u32>,
}

const FANOUT: usize = 1 << 16;

fn bucket(id: &Id) -> usize {
    usize::from(u16::from_be_bytes([id[0], id[1]]))
}

impl Sorted {
    /// Buckets `entries` by their ids' first two bytes, keeping their order within a bucket
    /// (the first copy of an id stays first). A bucket holds a few ids, read one by one.
    fn build(entries: Vec<(Id, Slot)>) -> Sorted {
        let mut fanout = vec![0u32; FANOUT + 1];
        for (id, _) in &entries {
            fanout[bucket(id) + 1] += 1;
        }
        for b in 0..FANOUT {
            fanout[b + 1] += fanout[b];
        }
        let mut next: Vec<usize> = fanout[..FANOUT].iter().map(|&n| n as usize).collect();
        let mut table = Vec::with_capacity(entries.len());
        ferry_sys::prefer_huge_pages(table.spare_capacity_mut());
        table.resize(entries.len(), ([0u8; 32], Slot::default()));
        for e in entries {
            let b = bucket(&e.0);
            table[next[b]] = e;
            next[b] += 1;
        }
        Sorted { entries: table, fanout }
    }

    /// Every copy of `id`, first added first.
    fn copies<'a>(&'a self, id: &'a Id) -> impl Iterator<Item = Slot> + 'a {
        let run = match self.fanout.len() == FANOUT + 1 {
            true => &self.entries[self.fanout[bucket(id)] as usize..self.fanout[bucket(id) + 1] as usize],
            false => &[][..],
        };
        run.iter().filter(move |e| e.0 == *id).map(|e| e.1)
    }

    /// Ids counted once however many copies (a copy is in its id's bucket).
    fn distinct(&self) -> usize {
        let mut n = 0;
        let mut ids: Vec<&Id> = Vec::new();
        for b in 0..self.fanout.len().saturating_sub(1) {
            ids.clear();
            ids.extend(
                self.entries[self.fanout[b] as usize..self.fanout[b + 1] as usize].iter().map(|e| &e.0),
            );
            ids.sort_unstable();
            ids.dedup();
            n += ids.len();
        }
        n
    }
}

impl Index {
    /// The entries of the packs found at the store's open (nothing else indexed yet).
    fn set_base(&mut self, base: Sorted) {
        self.base = Arc::new(base);
    }

    /// Distinct ids indexed (counted when asked: no reader needs it).
    fn distinct(&self) -> usize {
        self.base.distinct() + self.recent.keys().filter(|id| self.base.copies(id).next().is_none()).count()
    }

    fn place(&mut self, pack: PackId, key: KeyId) -> u32 {
        if let Some(&n) = self.place_of.get(&(pack, key)) {
            return n;
        }
        // More (pack, key) pairs than u32 counts would need 2^32 packs: not a real store.
        let n = u32::try_from(self.places.len()).unwrap_or(u32::MAX);
        self.places.push((pack, key));
        self.place_of.insert((pack, key), n);
        n
    }

    /// A pack's chunks are sealed under one key, or a few: its place is looked up once a run.
    fn place_cached(&mut self, pack: PackId, key: KeyId, last: &mut Option<(KeyId, u32)>) -> u32 {
        let place = match *last {
            Some((k, place)) if k == key => place,
            _ => self.place(pack, key),
        };
        *last = Some((key, place));
        place
    }

    fn location(&self, slot: Slot) -> Location {
        let (pack, key) = self.places[slot.place as usize];
        Location { pack, key, offset: slot.offset, len: slot.len }
    }

    fn contains(&self, id: &Id) -> bool {
        self.base.copies(id).next().is_some() || self.recent.contains_key(id)
    }

    fn insert(&mut self, id: Id, slot: Slot) {
        if self.base.copies(&id).any(|s| s == slot) {
            return;
        }
        let recent = self.recent.entry(id).or_default();
        if !recent.contains(&slot) {
            recent.push(slot);
        }
    }

    fn find(&self, id: &Id, usable: &dyn Fn(&KeyId) -> bool) -> Option<Location> {
        let usable = |s: &Slot| usable(&self.places[s.place as usize].1);
        let base = self.base.copies(id);
        let recent = self.recent.get(id).into_iter().flatten().copied();
        base.chain(recent).find(usable).map(|s| self.location(s))
    }

    /// Drops every entry of `pack` (deleted).
    fn forget_pack(&mut self, pack: &PackId) {
        let gone: std::collections::HashSet<u32> =
            self.places.iter().enumerate().filter(|(_, (p, _))| p == pack).map(|(n, _)| n as u32).collect();
        if gone.is_empty() {
            return;
        }
        if self.base.entries.iter().any(|(_, s)| gone.contains(&s.place)) {
            let kept = self.base.entries.iter().filter(|(_, s)| !gone.contains(&s.place)).copied().collect();
            self.base = Arc::new(Sorted::build(kept));
        }
        self.recent.retain(|_, slots| {
            slots.retain(|s| !gone.contains(&s.place));
            !slots.is_empty()
        });
    }
}

/// Hashing for chunk ids. An id is a keyed BLAKE3 output, uniform already: its first eight
/// bytes mixed with a seed of this process are a good hash, and SipHash over all 32 bytes was
/// most of the time it takes to open a store (262 144 ids per GiB of memory).
#[derive(Debug, Clone, Copy)]
pub(crate) struct IdHashing(u64);

impl Default for IdHashing {
    fn default() -> Self {
        use std::hash::BuildHasher;
        IdHashing(std::collections::hash_map::RandomState::new().hash_one(0u8))
    }
}

impl std::hash::BuildHasher for IdHashing {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(self.0)
    }
}

#[derive(Debug)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        self.0 = (self.0 ^ u64::from_le_bytes(word)).rotate_left(29).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    // The length an array's hash writes first is the same for every id.
    fn write_usize(&mut self, _: usize) {}

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A set of chunk ids hashed by their own bits ([`IdHashing`]).
pub(crate) type IdSet = std::collections::HashSet<Id, IdHashing>;

/// Any key will do.
pub fn any_key(_: &KeyId) -> bool {
    true
}

/// All indexed packs of a store, and where each chunk is.
#[derive(Debug)]
pub struct PackSet {
    dir: PathBuf,
    index: Arc<Index>,
    /// Which chunks each pack holds is read again from its index when asked (gc): keeping
    /// it here doubled the memory, and the time, of every store's open.
    packs: std::collections::HashSet<PackId>,
}

impl PackSet {
    /// Loads every index under `dir`.
    pub fn open(dir: &Path) -> Result<PackSet, StoreError> {
        let mut set = PackSet { dir: dir.to_path_buf(), index: Arc::default(), packs: Default::default() };
        let mut found = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err("cannot read", dir))? {
            let entry = entry.map_err(io_err("cannot read", dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pack) = name.strip_suffix(".idx").and_then(parse_pack_id) else {
                continue;
            };
            let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
            found.push((pack, name, len));
        }
        // One allocation for every entry, sized from the files' lengths.
        let total: u64 =
            found.iter().map(|(_, _, len)| len.saturating_sub(IDX_HEADER as u64) / IDX_ENTRY as u64).sum();
        let mut index = Index::default();
        let mut all = Vec::with_capacity(usize::try_from(total).unwrap_or(0).min(MAX_IDX_ENTRIES));
        ferry_sys::prefer_huge_pages(all.spare_capacity_mut());
        // One buffer for every file, read straight into the table (no list of entries per pack).
        let mut bytes = Vec::new();
        for (pack, name, _) in found {
            let path = dir.join(&name);
            read_capped_into(&path, (IDX_HEADER + MAX_IDX_ENTRIES * IDX_ENTRY) as u64, &mut bytes)?;
            let mut last: Option<(KeyId, u32)> = None;
            each_idx_entry(&bytes, |e| {
                let place = index.place_cached(pack, e.key, &mut last);
                all.push((e.id, Slot { offset: e.offset, len: e.len, place }));
            })
            .map_err(|detail| StoreError::Damaged {
                name: String::new(),
                file: format!("packs/{name}"),
                detail,
            })?;
            set.packs.insert(pack);
        }
        index.set_base(Sorted::build(all));
        set.index = Arc::new(index);
        Ok(set)
    }

    fn add(&mut self, pack: PackId, entries: Vec<Entry>) {
        let index = Arc::make_mut(&mut self.index);
        index.recent.reserve(entries.len());
        let mut last: Option<(KeyId, u32)> = None;
        for e in &entries {
            let place = index.place_cached(pack, e.key, &mut last);
            index.insert(e.id, Slot { offset: e.offset, len: e.len, place });
        }
        self.packs.insert(pack);
    }

    pub fn contains(&self, id: &Id) -> bool {
        self.index.contains(id)
    }

    /// Where a copy of `id` sealed under a key `usable` accepts is.
    pub fn find(&self, id: &Id, usable: &dyn Fn(&KeyId) -> bool) -> Option<Location> {
        self.index.find(id, usable)
    }

    /// Where some copy of `id` is.
    pub fn location(&self, id: &Id) -> Option<Location> {
        self.index.find(id, &any_key)
    }

    /// The chunks indexed now, for readers on other threads (shared, not copied).
    pub fn known(&self) -> Known {
        Known(self.index.clone())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of distinct chunks indexed.
    pub fn chunk_count(&self) -> usize {
        self.index.distinct()
    }

    /// The indexed packs.
    pub fn packs(&self) -> impl Iterator<Item = &PackId> {
        self.packs.iter()
    }

    /// The chunks `pack` holds, from its index file.
    pub fn entries(&self, pack: &PackId) -> Result<Vec<Entry>, StoreError> {
        read_idx(&self.pack_path(pack, "idx"), &format!("{}.idx", hex(pack)))
    }

    /// Starts a new pack of chunks sealed under `key`.
    pub fn writer(&self, key: KeyId) -> Result<PackWriter, StoreError> {
        PackWriter::create(&self.dir, key)
    }

    /// Syncs the bytes of `packs` to disk: a durable checkpoint's chunks found in packs it did
    /// not write may sit in a migration's, whose bytes were not synced
    /// ([`PackWriter::volatile`]); one with nothing left to write takes microseconds.
    pub fn sync<'a>(&self, packs: impl IntoIterator<Item = &'a PackId>) -> Result<(), StoreError> {
        for pack in packs {
            let path = self.pack_path(pack, "pack");
            File::open(&path).and_then(|f| f.sync_data()).map_err(io_err("cannot sync", &path))?;
        }
        Ok(())
    }

    /// Makes the chunks of a finished pack visible.
    pub fn absorb(&mut self, finished: FinishedPack) {
        // An empty pack was removed by `finish`: listed, it would have no index to read.
        if !finished.entries.is_empty() {
            self.add(finished.pack, finished.entries);
        }
    }

    /// A reader with its own open files (one per thread).
    pub fn reader(&self) -> PackReader {
        PackReader::new(&self.dir, self.known())
    }

    pub fn pack_path(&self, pack: &PackId, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", hex(pack)))
    }

    /// Deletes a pack and its index (index first: a pack without index is ignored).
    pub fn delete(&mut self, pack: &PackId) -> Result<(), StoreError> {
        let idx = self.pack_path(pack, "idx");
        fs::remove_file(&idx).or_else(ignore_missing).map_err(io_err("cannot remove", &idx))?;
        let data = self.pack_path(pack, "pack");
        fs::remove_file(&data).or_else(ignore_missing).map_err(io_err("cannot remove", &data))?;
        if self.packs.remove(pack) {
            Arc::make_mut(&mut self.index).forget_pack(pack);
        }
        Ok(())
    }

    /// Pack files without an index: leftovers of writers that died.
    pub fn orphans(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err("cannot read", &self.dir))? {
            let entry = entry.map_err(io_err("cannot read", &self.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pack) = name.strip_suffix(".pack").and_then(parse_pack_id) {
                if !self.packs.contains(&pack) {
                    out.push(entry.path());
                }
            } else if name.ends_with(".idx.tmp") {
                out.push(entry.path());
            }
        }
        Ok(out)
    }
}

fn ignore_missing(e: io::Error) -> io::Result<()> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

/// A read-only view of which chunks a store held at one moment.
#[derive(Debug, Clone)]
pub struct Known(Arc<Index>);

impl Known {
    /// Where a copy of `id` sealed under a key `usable` accepts is.
    pub fn find(&self, id: &Id, usable: &dyn Fn(&KeyId) -> bool) -> Option<Location> {
        self.0.find(id, usable)
    }
}

/// Reads frames by location.
#[derive(Debug)]
pub struct PackReader {
    dir: PathBuf,
    known: Known,
    files: HashMap<PackId, File>,
}

impl PackReader {
    pub fn new(dir: &Path, known: Known) -> PackReader {
        PackReader { dir: dir.to_path_buf(), known, files: HashMap::new() }
    }

    /// The frame stored for `id` under a key `usable` accepts, or `None` if no pack holds one.
    pub fn read(
        &mut self,
        id: &Id,
        usable: &dyn Fn(&KeyId) -> bool,
        buf: &mut Vec<u8>,
    ) -> Result<Option<Location>, StoreError> {
        let Some(loc) = self.known.find(id, usable) else {
            return Ok(None);
        };
        self.read_at(loc, buf)?;
        Ok(Some(loc))
    }

    /// Where a copy of `id` sealed under a key `usable` accepts is.
    pub fn find(&self, id: &Id, usable: &dyn Fn(&KeyId) -> bool) -> Option<Location> {
        self.known.find(id, usable)
    }

    /// Reads `loc.len` bytes at `loc.offset` of `loc.pack`: several frames back to back, up to
    /// [`MAX_SPAN`] bytes.
    pub fn read_span(&mut self, loc: Location, buf: &mut Vec<u8>) -> Result<(), StoreError> {
        self.read_capped(loc, buf, MAX_SPAN)
    }

    pub fn read_at(&mut self, loc: Location, buf: &mut Vec<u8>) -> Result<(), StoreError> {
        self.read_capped(loc, buf, MAX_FRAME)
    }

    fn read_capped(&mut self, loc: Location, buf: &mut Vec<u8>, cap: u32) -> Result<(), StoreError> {
        let path = self.dir.join(format!("{}.pack", hex(&loc.pack)));
        if loc.len > cap {
            return Err(StoreError::Damaged {
                name: String::new(),
                file: format!("packs/{}.idx", hex(&loc.pack)),
                detail: format!("frame of {} bytes exceeds the cap", loc.len),
            });
        }
        let file = match self.files.entry(loc.pack) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(File::open(&path).map_err(|e| StoreError::Damaged {
                    name: String::new(),
                    file: format!("packs/{}.pack", hex(&loc.pack)),
                    detail: format!("the pack holding this chunk cannot be opened: {e}"),
                })?)
            }
        };
        buf.resize(loc.len as usize, 0);
        file.read_exact_at(buf, loc.offset).map_err(|e| StoreError::Damaged {
            name: String::new(),
            file: format!("packs/{}.pack", hex(&loc.pack)),
            detail: format!("cannot read {} bytes at offset {}: {e}", loc.len, loc.offset),
        })
    }
}

/// A pack being written.
#[derive(Debug)]
pub struct PackWriter {
    dir: PathBuf,
    pack: PackId,
    file: File,
    offset: u64,
    key: KeyId,
    entries: Vec<Entry>,
    finished: bool,
    /// Whether `finish` syncs the pack's bytes (its index is synced either way).
    durable: bool,
}

/// A finished pack (durable unless written [`volatile`](PackWriter::volatile)) and its entries.
#[derive(Debug)]
pub struct FinishedPack {
    pub pack: PackId,
    pub entries: Vec<Entry>,
}

/// One index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub id: Id,
    pub key: KeyId,
    pub offset: u64,
    pub len: u32,
}

impl PackWriter {
    /// A new pack whose chunks are all sealed under data key `key`.
    pub fn create(dir: &Path, key: KeyId) -> Result<PackWriter, StoreError> {
        let pack = random_bytes()?;
        let file = create_private(&dir.join(format!("{}.pack", hex(&pack))))?;
        Ok(PackWriter {
            dir: dir.to_path_buf(),
            pack,
            file,
            offset: 0,
            key,
            entries: Vec::new(),
            finished: false,
            durable: true,
        })
    }

    /// A pack whose bytes `finish` leaves to the page cache: for a migration's chunks, which
    /// no crash recovery reads (the frozen tree or the running copy is what a failure returns
    /// to, and the checkpoint is removed when the migration ends). The index is still synced,
    /// so that a store opened after a crash finds a whole index; a chunk the crash lost then
    /// fails its tag when read, as damage does, and the migration's recovery releases the pack.
    pub fn volatile(mut self) -> PackWriter {
        self.durable = false;
        self
    }

    pub fn id(&self) -> PackId {
        self.pack
    }

    /// Appends one frame sealed under the pack's key.
    pub fn append(&mut self, id: &Id, frame: &[u8]) -> Result<Location, StoreError> {
        self.append_sealed_by(id, self.key, frame)
    }

    /// Appends frames laid back to back in `bytes`, all sealed under the pack's key, in one
    /// write; `chunks` gives each one's id and length, in order.
    pub fn append_batch(&mut self, bytes: &[u8], chunks: &[(Id, u32)]) -> Result<(), StoreError> {
        let total: u64 = chunks.iter().map(|(_, l)| u64::from(*l)).sum();
        if total != bytes.len() as u64 || chunks.iter().any(|(_, l)| *l == 0 || *l > MAX_FRAME) {
            return Err(StoreError::Io {
                action: "inconsistent frame batch for",
                path: self.path("pack"),
                source: io::Error::other("lengths do not add up"),
            });
        }
        self.file.write_all(bytes).map_err(io_err("cannot write", self.path("pack")))?;
        for (id, len) in chunks {
            self.entries.push(Entry { id: *id, key: self.key, offset: self.offset, len: *len });
            self.offset += u64::from(*len);
        }
        Ok(())
    }

    /// Appends frames laid back to back in `bytes`, each sealed under its own key, in one
    /// write; `frames` gives each one's id, key and length, in order.
    pub fn append_frames(&mut self, bytes: &[u8], frames: &[(Id, KeyId, u32)]) -> Result<(), StoreError> {
        let total: u64 = frames.iter().map(|(_, _, l)| u64::from(*l)).sum();
        if total != bytes.len() as u64 || frames.iter().any(|(_, _, l)| *l == 0 || *l > MAX_FRAME) {
            return Err(StoreError::Io {
                action: "inconsistent frame batch for",
                path: self.path("pack"),
                source: io::Error::other("lengths do not add up"),
            });
        }
        self.file.write_all(bytes).map_err(io_err("cannot write", self.path("pack")))?;
        for (id, key, len) in frames {
            self.entries.push(Entry { id: *id, key: *key, offset: self.offset, len: *len });
            self.offset += u64::from(*len);
        }
        Ok(())
    }

    /// Appends one frame sealed under `key` (repacking keeps each chunk's own key).
    pub fn append_sealed_by(&mut self, id: &Id, key: KeyId, frame: &[u8]) -> Result<Location, StoreError> {
        let len =
            u32::try_from(frame.len()).ok().filter(|l| *l <= MAX_FRAME).ok_or_else(|| StoreError::Io {
                action: "frame too large for",
                path: self.path("pack"),
                source: io::Error::other(format!("{} bytes", frame.len())),
            })?;
        self.file.write_all(frame).map_err(io_err("cannot write", self.path("pack")))?;
        let loc = Location { pack: self.pack, key, offset: self.offset, len };
        self.entries.push(Entry { id: *id, key, offset: self.offset, len });
        self.offset += u64::from(len);
        Ok(loc)
    }

    pub fn size(&self) -> u64 {
        self.offset
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Syncs the pack, then writes its index durably. An empty pack is removed instead.
    pub fn finish(mut self) -> Result<FinishedPack, StoreError> {
        self.finished = true;
        let pack_path = self.path("pack");
        if self.entries.is_empty() {
            let _ = fs::remove_file(&pack_path);
            return Ok(FinishedPack { pack: self.pack, entries: Vec::new() });
        }
        if self.durable {
            self.file.sync_all().map_err(io_err("cannot sync", &pack_path))?;
        }
        let idx = encode_idx(&self.entries);
        let tmp = self.dir.join(format!("{}.idx.tmp", hex(&self.pack)));
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("cannot create", &tmp))?;
        f.write_all(&idx).and_then(|_| f.sync_all()).map_err(io_err("cannot write", &tmp))?;
        let final_path = self.path("idx");
        fs::rename(&tmp, &final_path).map_err(io_err("cannot rename", &final_path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io_err("cannot sync", &self.dir))?;
        Ok(FinishedPack { pack: self.pack, entries: std::mem::take(&mut self.entries) })
    }

    fn path(&self, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", hex(&self.pack)))
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = fs::remove_file(self.path("pack"));
        }
    }
}

fn encode_idx(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(IDX_HEADER + entries.len() * IDX_ENTRY);
    out.extend_from_slice(IDX_MAGIC);
    out.extend_from_slice(&IDX_VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for Entry { id, key, offset, len } in entries {
        out.extend_from_slice(id);
        out.extend_from_slice(key);
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
    out
}

/// Parses an index; hostile input gives an error, never a panic.
pub fn decode_idx(b: &[u8]) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    each_idx_entry(b, |e| out.push(e))?;
    Ok(out)
}

/// Checks a pack index's header and every entry, handing each to `each` (an error may come
/// after some entries were handed out).
fn each_idx_entry(b: &[u8], mut each: impl FnMut(Entry)) -> Result<(), String> {
    if b.len() < IDX_HEADER || &b[..4] != IDX_MAGIC {
        return Err("not a pack index (bad magic)".into());
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != IDX_VERSION {
        return Err(format!("pack index version {version} is not supported"));
    }
    let count = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize;
    if count > MAX_IDX_ENTRIES || b.len() != IDX_HEADER + count * IDX_ENTRY {
        return Err(format!("index claims {count} entries in {} bytes", b.len()));
    }
    for e in b[IDX_HEADER..].chunks_exact(IDX_ENTRY) {
        let mut id = [0u8; 32];
        id.copy_from_slice(&e[..32]);
        let mut key = [0u8; 16];
        key.copy_from_slice(&e[32..48]);
        let offset = u64::from_le_bytes(e[48..56].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(e[56..60].try_into().unwrap_or_default());
        if len == 0 || len > MAX_FRAME {
            return Err(format!("entry with frame length {len}"));
        }
        each(Entry { id, key, offset, len });
    }
    Ok(())
}

/// A pack's index file `name` at `path`, read with its cap and checked.
fn read_idx(path: &Path, name: &str) -> Result<Vec<Entry>, StoreError> {
    let bytes = read_capped(path, (IDX_HEADER + MAX_IDX_ENTRIES * IDX_ENTRY) as u64)?;
    decode_idx(&bytes).map_err(|detail| StoreError::Damaged {
        name: String::new(),
        file: format!("packs/{name}"),
        detail,
    })
}

fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::new();
    read_capped_into(path, cap, &mut out)?;
    Ok(out)
}

/// Replaces `out`'s contents with the file's (its allocation is reused).
fn read_capped_into(path: &Path, cap: u64, out: &mut Vec<u8>) -> Result<(), StoreError> {
    use std::io::Read;
    // Not through a link: a pack directory holds files ferry wrote, nothing else.
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err("cannot read", path))?;
    let md = file.metadata().map_err(io_err("cannot stat", path))?;
    if !md.is_file() || md.len() > cap {
        return Err(StoreError::Damaged {
            name: String::new(),
            file: path.display().to_string(),
            detail: "not a regular file of acceptable size".into(),
        });
    }
    out.clear();
    out.reserve(usize::try_from(md.len()).unwrap_or(0));
    // At most the size checked above, whatever the file became since.
    (&mut file).take(cap).read_to_end(out).map_err(io_err("cannot read", path))?;
    Ok(())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_pack_id(s: &str) -> Option<PackId> {
    if s.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, out) in id.iter_mut().enumerate() {
        *out = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Id {
        [n; 32]
    }

    #[test]
    fn write_finish_reopen_read() {
        // A volatile pack (a migration's) differs only in when its bytes reach the disk.
        for durable in [true, false] {
            let tmp = tempfile::tempdir().expect("tempdir");
            let mut set = PackSet::open(tmp.path()).expect("open");
            let w = set.writer([5; 16]).expect("writer");
            let mut w = if durable { w } else { w.volatile() };
            w.append(&id(1), b"frame-one").expect("append");
            w.append(&id(2), b"frame-two!").expect("append");
            set.absorb(w.finish().expect("finish"));
            assert!(set.contains(&id(2)));

            let set = PackSet::open(tmp.path()).expect("reopen");
            assert_eq!(set.chunk_count(), 2);
            let mut r = set.reader();
            let mut buf = Vec::new();
            r.read(&id(2), &any_key, &mut buf).expect("read").expect("present");
            assert_eq!(buf, b"frame-two!");
            assert!(r.read(&id(9), &any_key, &mut buf).expect("read").is_none());
        }
    }

    #[test]
    fn unfinished_pack_is_removed_and_orphans_found() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let set = PackSet::open(tmp.path()).expect("open");
        let mut w = set.writer([5; 16]).expect("writer");
        w.append(&id(1), b"x").expect("append");
        let pack = w.id();
        drop(w);
        assert!(!set.pack_path(&pack, "pack").exists());
        // A pack finished empty is removed, and not listed.
        let mut set = set;
        let empty = set.writer([5; 16]).expect("writer");
        let empty_id = empty.id();
        set.absorb(empty.finish().expect("finish"));
        assert!(!set.packs().any(|p| *p == empty_id), "an empty pack is not listed");
        assert!(!set.pack_path(&empty_id, "pack").exists());
        // A crash leaves a pack without its index.
        fs::write(tmp.path().join(format!("{}.pack", hex(&[7u8; 16]))), b"junk").expect("write");
        assert_eq!(PackSet::open(tmp.path()).expect("open").orphans().expect("orphans").len(), 1);
    }

    /// Copies of one id in packs read at the open and in packs written since, sealed under
    /// different keys; a deleted pack's copy gone, the other found.
    #[test]
    fn copies_across_open_and_later_packs() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let set = PackSet::open(tmp.path()).expect("open");
        // Many ids share a bucket's first two bytes only by chance: these share them all.
        let ids: Vec<Id> = (0..600u16)
            .map(|n| {
                let mut i = [0u8; 32];
                i[2..4].copy_from_slice(&n.to_be_bytes());
                i
            })
            .collect();
        let mut w = set.writer([1; 16]).expect("writer");
        for i in &ids {
            w.append(i, b"under-key-one").expect("append");
        }
        let first = w.finish().expect("finish").pack;
        let mut set = PackSet::open(tmp.path()).expect("reopen");
        let mut w = set.writer([2; 16]).expect("writer");
        w.append(&ids[7], b"under-key-two").expect("append");
        w.append(&id(9), b"only-here").expect("append");
        let second = w.finish().expect("finish");
        let second_pack = second.pack;
        set.absorb(second);
        assert_eq!(set.chunk_count(), 601);
        assert_eq!(set.find(&ids[7], &|k| *k == [1; 16]).expect("key one").pack, first);
        assert_eq!(set.find(&ids[7], &|k| *k == [2; 16]).expect("key two").pack, second_pack);
        assert!(set.find(&ids[8], &|k| *k == [2; 16]).is_none());
        let mut r = set.reader();
        let mut buf = Vec::new();
        r.read(&ids[599], &any_key, &mut buf).expect("read").expect("present");
        assert_eq!(buf, b"under-key-one");

        set.delete(&first).expect("delete");
        assert!(!set.contains(&ids[0]));
        assert_eq!(set.find(&ids[7], &any_key).expect("the later copy").pack, second_pack);
        assert_eq!(set.chunk_count(), 2);
        let set = PackSet::open(tmp.path()).expect("reopen");
        assert_eq!(set.location(&id(9)).expect("indexed").pack, second_pack);
        assert_eq!(set.chunk_count(), 2);
    }

    #[test]
    fn delete_drops_chunks() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut set = PackSet::open(tmp.path()).expect("open");
        let mut w = set.writer([5; 16]).expect("writer");
        w.append(&id(1), b"a").expect("append");
        let finished = w.finish().expect("finish");
        let pack = finished.pack;
        set.absorb(finished);
        set.delete(&pack).expect("delete");
        assert!(!set.contains(&id(1)));
        assert_eq!(fs::read_dir(tmp.path()).expect("ls").count(), 0);
    }

    #[test]
    fn hostile_indexes_are_refused() {
        assert!(decode_idx(b"").is_err());
        assert!(decode_idx(b"FRYX\x01\x00\x00\x00\xff\xff\xff\xff").is_err());
        let entry = Entry { id: id(1), key: [2; 16], offset: 0, len: 5 };
        let mut good = encode_idx(&[entry]);
        assert_eq!(decode_idx(&good).expect("good"), vec![entry]);
        good[IDX_HEADER + 56..IDX_HEADER + 60].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_idx(&good).is_err());
        let truncated = &encode_idx(&[entry])[..20];
        assert!(decode_idx(truncated).is_err());
    }
}

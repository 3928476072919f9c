//! The ingest pipeline: CRIU's images become sealed, deduplicated chunks while CRIU is still
//! writing them.
//!
//! ```text
//!  follower ──segments──▶ worker × N ──frames──▶ writer ──▶ packs
//!  (tails pages-*.img      (zero check, keyed      (appends, rotates
//!   as CRIU appends)        hash, dedup, seal)       and syncs packs)
//! ```
//! Page images are cut into 4 KiB pages (a page changed between two checkpoints costs one
//! chunk); other images are small and cut into pieces of at most [`PIECE`] once the dump is
//! over (CRIU may rewrite them in place; page images are only appended to). All-zero pages
//! are recorded as zero extents and stored nowhere.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::error::io_err;
use crate::keys::{ChunkId, NodeKeys};
use crate::manifest::{Extent, FileRecord};
use crate::packs::{FinishedPack, KeyId, Known, PackSet, PackWriter, PACK_TARGET};
use crate::progress::{Progress, SharedProgress};
use crate::seal::{DataKey, Sealer};
use crate::StoreError;

/// Chunk size for page data.
pub const PAGE: usize = 4096;
/// Largest chunk cut from a non-page image.
pub const PIECE: usize = 1 << 20;
/// Page data travels to the workers in segments of this size.
const SEGMENT: usize = 1 << 20;
/// Segments in flight between the follower and the workers.
const QUEUE: usize = 8;
const IDLE: Duration = Duration::from_millis(3);
/// After this many chunks in a row that zstd could not shrink, compression is tried only on
/// every `PROBE_EVERY`th chunk until one shrinks again.
const SKIP_AFTER: u32 = 16;
const PROBE_EVERY: u32 = 64;

/// Figures of one ingest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngestStats {
    /// Bytes of image data seen.
    pub logical_bytes: u64,
    /// Bytes of all-zero pages (stored nowhere).
    pub zero_bytes: u64,
    /// Bytes of chunks the store already held.
    pub dedup_bytes: u64,
    /// Chunks written by this ingest, and their size on disk (sealed, maybe compressed).
    pub new_chunks: u64,
    pub stored_bytes: u64,
}

/// What an ingest produced: the files, the packs written, and the figures.
#[derive(Debug)]
pub struct Ingested {
    pub files: Vec<FileRecord>,
    pub packs: Vec<FinishedPack>,
    pub stats: IngestStats,
}

struct Segment {
    file: usize,
    seq: u64,
    data: Vec<u8>,
    chunk: usize,
}

/// The frames sealed from one segment, back to back, with each chunk's id and length: one
/// channel message and one write per segment, not per 4 KiB page.
struct Frames {
    bytes: Vec<u8>,
    chunks: Vec<(ChunkId, u32)>,
}

/// Final size of each followed page image.
type FollowedSizes = Vec<(String, u64)>;
/// Packs written, chunks written, bytes written.
type Written = (Vec<FinishedPack>, u64, u64);

/// Frames the pipeline has just written to a pack, as they lie there: `chunks` gives each
/// one's id and length, in order, all sealed under `key`.
#[derive(Debug)]
pub struct TappedFrames {
    pub key: KeyId,
    pub bytes: Vec<u8>,
    pub chunks: Vec<(ChunkId, u32)>,
}

/// Receives a copy of every batch of new frames once it is in a pack (a migration streams
/// them to its target while CRIU is still dumping). It never slows the ingest: a batch that
/// finds the tap's queue full is not copied (its chunks are still in the store, and whoever
/// taps learns which ones it missed by asking the store).
#[derive(Debug, Clone)]
pub struct Tap(SyncSender<TappedFrames>);

impl Tap {
    /// A tap holding at most `depth` batches (about 1 MiB each) not yet taken.
    pub fn new(depth: usize) -> (Tap, Receiver<TappedFrames>) {
        let (tx, rx) = sync_channel(depth);
        (Tap(tx), rx)
    }
}

/// A running ingest of one images directory.
#[derive(Debug)]
pub struct Pipeline {
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    follower: Option<JoinHandle<Result<FollowedSizes, StoreError>>>,
    workers: Vec<JoinHandle<Vec<SegmentDone>>>,
    writer: Option<JoinHandle<Result<Written, StoreError>>>,
    segments: Option<SyncSender<Segment>>,
    names: Arc<Mutex<Vec<String>>>,
    /// Files given through [`Pipeline::feed`], with their sizes.
    fed: Mutex<Vec<(usize, u64)>>,
}

/// A page image given to the pipeline by its caller rather than read from the images
/// directory (see [`Pipeline::feed`]).
#[derive(Debug)]
pub struct Feed<'a> {
    pipeline: &'a Pipeline,
    idx: usize,
    seq: u64,
    size: u64,
    pending: Vec<u8>,
}

impl Feed<'_> {
    /// Appends `data` to the file.
    pub fn write(&mut self, mut data: &[u8]) -> Result<(), StoreError> {
        while !data.is_empty() {
            let n = (SEGMENT - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.pending.len() == SEGMENT {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Appends a whole segment the caller filled (no copy when it is segment-sized and
    /// nothing is pending).
    pub fn write_owned(&mut self, data: Vec<u8>) -> Result<(), StoreError> {
        if self.pending.is_empty() && data.len() == SEGMENT {
            self.pending = data;
            return self.flush();
        }
        self.write(&data)
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.pending, Vec::with_capacity(SEGMENT));
        self.size += data.len() as u64;
        let tx = self.pipeline.segments.as_ref().ok_or_else(|| internal("pipeline finished"))?;
        send(tx, Segment { file: self.idx, seq: self.seq, data, chunk: PAGE })?;
        self.seq += 1;
        Ok(())
    }

    /// The file is complete.
    pub fn finish(mut self) -> Result<u64, StoreError> {
        self.flush()?;
        self.pipeline.fed.lock().map_err(|_| internal("fed lock poisoned"))?.push((self.idx, self.size));
        Ok(self.size)
    }
}

#[derive(Debug)]
struct SegmentDone {
    file: usize,
    seq: u64,
    extents: Vec<Extent>,
    logical: u64,
    zero: u64,
    dedup: u64,
}

/// What the workers share: the key material and which chunks exist or are being written.
struct Shared {
    keys: Arc<NodeKeys>,
    known: Mutex<crate::packs::IdSet>,
    /// Data keys some checkpoint still holds: a stored chunk sealed under any other key (its
    /// checkpoint removed, not yet collected) cannot be reused and is sealed again.
    usable: HashSet<KeyId>,
}

impl Pipeline {
    /// A page image named `name` that the caller writes itself: cut into pages, sealed and
    /// recorded as that file; a file of that name in the images directory is then ignored.
    /// Only for a pipeline that does not follow page images (`follow` false at start).
    pub fn feed(&self, name: &str) -> Result<Feed<'_>, StoreError> {
        let idx = {
            let mut n = self.names.lock().map_err(|_| internal("names lock poisoned"))?;
            if n.iter().any(|x| x == name) {
                return Err(internal("a file fed twice"));
            }
            n.push(name.to_owned());
            n.len() - 1
        };
        Ok(Feed { pipeline: self, idx, seq: 0, size: 0, pending: Vec::with_capacity(SEGMENT) })
    }

    /// Starts following `dir`. `existing` answers whether the store already holds a chunk.
    /// Without `follow`, page images are not tailed: they are ingested whole at the end like
    /// any other image, unless given through [`feed`](Self::feed).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        dir: PathBuf,
        keys: Arc<NodeKeys>,
        data_key: Arc<DataKey>,
        packs: &PackSet,
        usable: HashSet<KeyId>,
        workers: usize,
        tap: Option<Tap>,
        follow: bool,
        durable: bool,
        progress: SharedProgress,
    ) -> Result<Pipeline, StoreError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (seg_tx, seg_rx) = sync_channel::<Segment>(QUEUE);
        let (frame_tx, frame_rx) = sync_channel::<Frames>(QUEUE);
        let seg_rx = Arc::new(Mutex::new(seg_rx));
        let shared = Arc::new(Shared { keys, known: Mutex::new(crate::packs::IdSet::default()), usable });
        let names = Arc::new(Mutex::new(Vec::new()));

        let packs_dir = packs.dir().to_path_buf();
        let key_id = data_key.id();
        let writer =
            spawn("ferry-pack-writer", move || write_frames(frame_rx, &packs_dir, key_id, tap, durable))?;
        let mut handles = Vec::new();
        for n in 0..workers.max(1) {
            let rx = seg_rx.clone();
            let tx = frame_tx.clone();
            let shared = shared.clone();
            let key = data_key.clone();
            let exists = packs.known();
            handles.push(spawn(&format!("ferry-seal-{n}"), move || work(rx, tx, &shared, &key, &exists))?);
        }
        drop(frame_tx);
        let follower_tx = seg_tx.clone();
        let follower_stop = stop.clone();
        let follower_dir = dir.clone();
        let follower_names = names.clone();
        let follower = spawn("ferry-follow", move || {
            if !follow {
                return Ok(Vec::new());
            }
            self::follow(&follower_dir, &follower_stop, &follower_tx, &follower_names, &*progress)
        })?;
        Ok(Pipeline {
            dir,
            stop,
            follower: Some(follower),
            workers: handles,
            writer: Some(writer),
            segments: Some(seg_tx),
            names,
            fed: Mutex::new(Vec::new()),
        })
    }

    /// Call once the writer of the images (CRIU) is done: ingests the rest and returns the
    /// files, in name order, with their extents.
    pub fn finish(mut self) -> Result<Ingested, StoreError> {
        self.stop.store(true, Ordering::Release);
        let followed = join(self.follower.take())??;
        // Non-page images, now complete, go through the same workers.
        let seg_tx = self.segments.take().ok_or_else(|| internal("pipeline finished twice"))?;
        let mut sizes: BTreeMap<usize, u64> = BTreeMap::new();
        {
            let mut names = self.names.lock().map_err(|_| internal("names lock poisoned"))?;
            for (idx, name) in names.iter().enumerate() {
                if let Some((_, size)) = followed.iter().find(|(n, _)| n == name) {
                    sizes.insert(idx, *size);
                }
            }
            for (idx, size) in self.fed.lock().map_err(|_| internal("fed lock poisoned"))?.iter() {
                sizes.insert(*idx, *size);
            }
            for entry in fs::read_dir(&self.dir).map_err(io_err("cannot read", &self.dir))? {
                let entry = entry.map_err(io_err("cannot read", &self.dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if names.contains(&name) {
                    continue;
                }
                check_regular(&entry)?;
                let idx = names.len();
                names.push(name);
                let size = feed_whole(&entry.path(), idx, &seg_tx)?;
                sizes.insert(idx, size);
            }
        }
        drop(seg_tx);
        let mut done = Vec::new();
        for w in self.workers.drain(..) {
            done.extend(w.join().map_err(|_| internal("a sealing thread panicked"))?);
        }
        let (packs, new_chunks, stored_bytes) = join(self.writer.take())??;
        let names = self.names.lock().map_err(|_| internal("names lock poisoned"))?.clone();
        let (files, mut stats) = assemble(&names, &sizes, done)?;
        stats.new_chunks = new_chunks;
        stats.stored_bytes = stored_bytes;
        Ok(Ingested { files, packs, stats })
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        drop(self.segments.take());
        let _ = join(self.follower.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        // Packs of an abandoned ingest are finished but no manifest names them: gc removes them.
        let _ = join(self.writer.take());
    }
}

fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, StoreError> {
    thread::Builder::new().name(name.into()).spawn(f).map_err(|e| StoreError::Io {
        action: "cannot start thread",
        path: PathBuf::from(name),
        source: e,
    })
}

fn join<T>(h: Option<JoinHandle<T>>) -> Result<T, StoreError> {
    h.ok_or_else(|| internal("thread already joined"))?
        .join()
        .map_err(|_| internal("a pipeline thread panicked"))
}

fn internal(what: &str) -> StoreError {
    StoreError::Io { action: "internal error:", path: PathBuf::from(what), source: io::Error::other(what) }
}

fn check_regular(entry: &fs::DirEntry) -> Result<(), StoreError> {
    let ft = entry.file_type().map_err(io_err("cannot stat", entry.path()))?;
    if ft.is_file() {
        return Ok(());
    }
    Err(StoreError::Damaged {
        name: String::new(),
        file: entry.file_name().to_string_lossy().into_owned(),
        detail: "the images directory holds something other than a regular file".into(),
    })
}

fn is_page_image(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

/// Tails page images while CRIU writes them; returns each followed file's final size.
fn follow(
    dir: &Path,
    stop: &AtomicBool,
    tx: &SyncSender<Segment>,
    names: &Mutex<Vec<String>>,
    progress: &dyn Progress,
) -> Result<Vec<(String, u64)>, StoreError> {
    struct Tail {
        name: String,
        idx: usize,
        file: File,
        pos: u64,
        seq: u64,
        pending: Vec<u8>,
    }
    let mut tails: Vec<Tail> = Vec::new();
    loop {
        let finishing = stop.load(Ordering::Acquire);
        let mut progressed = false;
        for entry in fs::read_dir(dir).map_err(io_err("cannot read", dir))? {
            let entry = entry.map_err(io_err("cannot read", dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_page_image(&name) || tails.iter().any(|t| t.name == name) {
                continue;
            }
            check_regular(&entry)?;
            // Writable too: what was read is punched out of the tmpfs (see `punch_hole`).
            let Ok(file) = fs::OpenOptions::new().read(true).write(true).open(entry.path()) else { continue };
            let idx = {
                let mut n = names.lock().map_err(|_| internal("names lock poisoned"))?;
                n.push(name.clone());
                n.len() - 1
            };
            tails.push(Tail { name, idx, file, pos: 0, seq: 0, pending: Vec::with_capacity(SEGMENT) });
        }
        for t in tails.iter_mut() {
            loop {
                let room = SEGMENT - t.pending.len();
                let start = t.pending.len();
                t.pending.resize(SEGMENT, 0);
                let n =
                    t.file.read(&mut t.pending[start..start + room]).map_err(io_err("cannot read", dir))?;
                t.pending.truncate(start + n);
                if n == 0 {
                    break;
                }
                progressed = true;
                t.pos += n as u64;
                progress.advance(n as u64);
                if t.pending.len() == SEGMENT {
                    let data = std::mem::replace(&mut t.pending, Vec::with_capacity(SEGMENT));
                    send(tx, Segment { file: t.idx, seq: t.seq, data, chunk: PAGE })?;
                    t.seq += 1;
                    // The segment is in our memory now: its tmpfs pages can go.
                    let _ = ferry_sys::punch_hole(&t.file, t.pos - SEGMENT as u64, SEGMENT as u64);
                }
            }
        }
        if finishing {
            break;
        }
        if !progressed {
            thread::sleep(IDLE);
        }
    }
    let mut sizes = Vec::new();
    for mut t in tails {
        if !t.pending.is_empty() {
            let data = std::mem::take(&mut t.pending);
            send(tx, Segment { file: t.idx, seq: t.seq, data, chunk: PAGE })?;
        }
        sizes.push((t.name, t.pos));
    }
    Ok(sizes)
}

fn send(tx: &SyncSender<Segment>, seg: Segment) -> Result<(), StoreError> {
    tx.send(seg).map_err(|_| internal("sealing threads stopped"))
}

/// Feeds a complete non-page image to the workers; returns its size.
fn feed_whole(path: &Path, idx: usize, tx: &SyncSender<Segment>) -> Result<u64, StoreError> {
    let mut file = File::open(path).map_err(io_err("cannot open", path))?;
    let mut seq = 0;
    let mut total = 0u64;
    loop {
        let mut data = vec![0u8; PIECE];
        let mut filled = 0;
        while filled < PIECE {
            let n = file.read(&mut data[filled..]).map_err(io_err("cannot read", path))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        data.truncate(filled);
        total += filled as u64;
        if filled == 0 {
            return Ok(total);
        }
        send(tx, Segment { file: idx, seq, data, chunk: PIECE })?;
        seq += 1;
        if filled < PIECE {
            return Ok(total);
        }
    }
}

fn work(
    rx: Arc<Mutex<Receiver<Segment>>>,
    tx: SyncSender<Frames>,
    shared: &Shared,
    key: &DataKey,
    exists: &Known,
) -> Vec<SegmentDone> {
    let mut sealer = Sealer::new(key);
    let mut out = Vec::new();
    loop {
        let msg = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(_) => break,
        };
        let Ok(seg) = msg else { break };
        let mut done = SegmentDone {
            file: seg.file,
            seq: seg.seq,
            extents: Vec::with_capacity(seg.data.len() / seg.chunk + 1),
            logical: seg.data.len() as u64,
            zero: 0,
            dedup: 0,
        };
        let mut frames =
            Frames { bytes: Vec::with_capacity(seg.data.len() + seg.data.len() / 32), chunks: Vec::new() };
        // Memory that did not compress is usually followed by more of the same (random data,
        // compressed or encrypted buffers): after a run of failures, stop trying for a while.
        let mut incompressible_run = 0u32;
        for chunk in seg.data.chunks(seg.chunk) {
            let len = chunk.len() as u32;
            if is_zero(chunk) {
                done.zero += u64::from(len);
                push_zero(&mut done.extents, u64::from(len));
                continue;
            }
            let id = shared.keys.chunk_id(chunk);
            let stored = exists.find(&id, &|k| shared.usable.contains(k)).is_some();
            let fresh = !stored && shared.known.lock().map(|mut k| k.insert(id)).unwrap_or(false);
            if fresh {
                let start = frames.bytes.len();
                let try_compress =
                    incompressible_run < SKIP_AFTER || incompressible_run.is_multiple_of(PROBE_EVERY);
                let compressed = sealer.seal_with(&id, chunk, &mut frames.bytes, try_compress);
                incompressible_run = if compressed { 0 } else { incompressible_run + 1 };
                frames.chunks.push((id, (frames.bytes.len() - start) as u32));
            } else {
                done.dedup += u64::from(len);
            }
            done.extents.push(Extent::Chunk { id, len });
        }
        if !frames.chunks.is_empty() && tx.send(frames).is_err() {
            break;
        }
        out.push(done);
    }
    out
}

fn push_zero(extents: &mut Vec<Extent>, len: u64) {
    if let Some(Extent::Zero { len: prev }) = extents.last_mut() {
        *prev += len;
    } else {
        extents.push(Extent::Zero { len });
    }
}

fn is_zero(b: &[u8]) -> bool {
    let words = b.chunks_exact(8);
    let tail = words.remainder();
    words.into_iter().all(|w| w.iter().fold(0u8, |acc, x| acc | x) == 0) && tail.iter().all(|x| *x == 0)
}

fn write_frames(
    rx: Receiver<Frames>,
    dir: &Path,
    key: KeyId,
    mut tap: Option<Tap>,
    durable: bool,
) -> Result<Written, StoreError> {
    let create = || PackWriter::create(dir, key).map(|w| if durable { w } else { w.volatile() });
    let mut finished = Vec::new();
    let mut writer = create()?;
    let (mut chunks, mut bytes) = (0u64, 0u64);
    for batch in rx {
        writer.append_batch(&batch.bytes, &batch.chunks)?;
        chunks += batch.chunks.len() as u64;
        bytes += batch.bytes.len() as u64;
        if let Some(t) = &tap {
            let copy = TappedFrames { key, bytes: batch.bytes, chunks: batch.chunks };
            if let Err(TrySendError::Disconnected(_)) = t.0.try_send(copy) {
                tap = None;
            }
        }
        if writer.size() >= PACK_TARGET {
            let full = std::mem::replace(&mut writer, create()?);
            finished.push(full.finish()?);
        }
    }
    let last = writer.finish()?;
    if !last.entries.is_empty() {
        finished.push(last);
    }
    Ok((finished, chunks, bytes))
}

/// Orders each file's segments and joins their extents.
fn assemble(
    names: &[String],
    sizes: &BTreeMap<usize, u64>,
    done: Vec<SegmentDone>,
) -> Result<(Vec<FileRecord>, IngestStats), StoreError> {
    let mut per_file: BTreeMap<usize, BTreeMap<u64, Vec<Extent>>> = BTreeMap::new();
    let mut stats = IngestStats::default();
    for d in done {
        stats.logical_bytes += d.logical;
        stats.zero_bytes += d.zero;
        stats.dedup_bytes += d.dedup;
        per_file.entry(d.file).or_default().insert(d.seq, d.extents);
    }
    let mut files = Vec::new();
    for (idx, name) in names.iter().enumerate() {
        let size = sizes.get(&idx).copied().unwrap_or(0);
        let mut extents: Vec<Extent> = Vec::new();
        for (_, seg) in per_file.remove(&idx).unwrap_or_default() {
            for e in seg {
                match e {
                    Extent::Zero { len } => push_zero(&mut extents, len),
                    chunk => extents.push(chunk),
                }
            }
        }
        let covered: u64 = extents
            .iter()
            .map(|e| match e {
                Extent::Chunk { len, .. } => u64::from(*len),
                Extent::Zero { len } => *len,
            })
            .sum();
        if covered != size {
            return Err(StoreError::Io {
                action: "image changed while it was ingested:",
                path: PathBuf::from(name),
                source: io::Error::other(format!("{covered} bytes chunked, file has {size}")),
            });
        }
        files.push(FileRecord { name: name.clone(), size, extents });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((files, stats))
}

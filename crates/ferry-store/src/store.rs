//! The secure store: checkpoints as signed manifests over encrypted, deduplicated chunks.
//!
//! Layout under the root (directories 0700, files 0600):
//! ```text
//! keys/                 node keys and recipients (keys.rs)
//! packs/                sealed chunk frames and their indexes (packs.rs)
//! manifests/NAME.fmf    signed manifests (manifest.rs)
//! slots/ID.slots        the data keys of manifest ID, wrapped for each recipient (seal.rs)
//! hints/ID.ws           pages a lazy restore of manifest ID faulted on (working_set.rs)
//! catalog               signed name -> (manifest, generation) map (catalog.rs)
//! logs/                 CRIU logs
//! tmp/NAME.PID.N/       private tmpfs mounts holding plaintext images while they are used
//! ```
//! Order of writes for a checkpoint: packs (synced, indexed) → slots → manifest → catalog. A
//! crash at any point leaves at worst unreferenced packs, which `gc` removes; never a manifest
//! that names a missing chunk.

use std::collections::{BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_sys::PrivateTmpfs;

use crate::catalog::{read_capped, Catalog, CatalogEntry};
use crate::error::io_err;
use crate::fsutil::{lock_file, private_dir, random_bytes, shred, sync_dir, write_atomic};
use crate::keys::{self, ChunkId, NodeKeys};
use crate::manifest::{
    decode_verified, encode_signed, Extent, FileRecord, HostInfo, ManifestBody, MAX_MANIFEST,
};
use crate::packs::{hex, Entry, KeyId, Location, PackReader, PackSet, PackWriter};
use crate::pipeline::{IngestStats, Pipeline};
use crate::progress::{Progress, Silent};
use crate::reader::ImageReader;
use crate::seal::{unwrap_key, wrap_key, DataKey, KeyRing, Opener, Slots, MAX_SLOTS_FILE};
use crate::{validate_name, StoreError};

/// Sealing and verifying threads: one per core (at least 2, at most 16); the hashing and
/// sealing of every page is what a checkpoint's and a restore's time is made of.
fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 16)
}

/// Verified checkpoints, and the names that failed verification with why.
pub type Listing = (Vec<Checkpoint>, Vec<(String, StoreError)>);

/// A store rooted at one directory.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    keys: Arc<NodeKeys>,
    packs: LazyPacks,
    _lock: File,
}

/// The pack index, read on a thread of its own from the store's open on, and taken by its first
/// user: a restore reads and checks its manifest meanwhile, and commands that need no chunk
/// (`list`, `keys`) never wait for it. A store of 530 000 chunks takes 0.05-0.1 s to index.
#[derive(Debug)]
struct LazyPacks {
    dir: PathBuf,
    ready: std::sync::OnceLock<Mutex<PackSet>>,
    loading: Mutex<Option<std::thread::JoinHandle<Result<PackSet, StoreError>>>>,
}

impl LazyPacks {
    fn start(dir: PathBuf) -> LazyPacks {
        let reader = dir.clone();
        // Without a thread, the first user reads the index itself.
        let loading =
            std::thread::Builder::new().name("ferry-index".into()).spawn(move || PackSet::open(&reader)).ok();
        LazyPacks { dir, ready: std::sync::OnceLock::new(), loading: Mutex::new(loading) }
    }

    fn get(&self) -> Result<&Mutex<PackSet>, StoreError> {
        if let Some(set) = self.ready.get() {
            return Ok(set);
        }
        let mut loading = self.loading.lock().map_err(|_| StoreError::Busy)?;
        if let Some(set) = self.ready.get() {
            return Ok(set);
        }
        // A failed or panicked load is read again here, so that every caller gets its error.
        let set = match loading.take().map(|h| h.join()) {
            Some(Ok(Ok(set))) => set,
            _ => PackSet::open(&self.dir)?,
        };
        Ok(self.ready.get_or_init(|| Mutex::new(set)))
    }
}

/// What a checkpoint records besides its files.
#[derive(Debug, Clone, Default)]
pub struct CheckpointInfo {
    pub source: String,
    pub host: HostInfo,
    pub spec: String,
    pub tcp_established: bool,
    pub leave_running: bool,
    pub network_lock_tables: Vec<String>,
    pub dump_seconds: f64,
}

/// A checkpoint being written into a private tmpfs. Dropped without commit, it leaves nothing.
#[derive(Debug)]
pub struct Pending {
    name: String,
    tmpfs: PrivateTmpfs,
    data_key: Arc<DataKey>,
    /// Whether the packs are synced before the commit (see [`Pending::volatile`]).
    durable: bool,
}

/// A verified manifest (signature and catalog checked).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub manifest: ManifestBody,
    pub signer: [u8; 32],
}

/// Result of a commit.
#[derive(Debug, Clone)]
pub struct Committed {
    pub checkpoint: Checkpoint,
    pub stats: IngestStats,
    /// The packs this checkpoint's new chunks were written to.
    pub packs: Vec<crate::packs::PackId>,
}

/// Result of `verify`.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyReport {
    pub files: usize,
    pub chunks: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct GcReport {
    pub packs_deleted: usize,
    pub packs_rewritten: usize,
    pub chunks_removed: usize,
    pub bytes_freed: u64,
    pub leftovers_removed: usize,
}

/// Sizes of what a checkpoint occupies.
#[derive(Debug, Clone, Copy, Default)]
pub struct Footprint {
    /// Size of the images as CRIU wrote them.
    pub logical: u64,
    /// Bytes of all-zero pages.
    pub zero: u64,
    /// Distinct chunks and their sealed size in the store.
    pub chunks: u64,
    pub stored: u64,
    /// Of those, bytes also referenced by other checkpoints.
    pub shared: u64,
}

impl Store {
    /// Opens (creating if needed) the store at `root`, with this node's keys (created on first
    /// use), and removes what interrupted checkpoints left.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        Store::open_with(root.into(), false)
    }

    /// Opens the store for maintenance (gc): fails if any other ferry uses it.
    pub fn open_exclusive(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        Store::open_with(root.into(), true)
    }

    fn open_with(root: PathBuf, exclusive: bool) -> Result<Store, StoreError> {
        for d in ["", "keys", "packs", "manifests", "slots", "logs", "tmp"] {
            private_dir(&root.join(d))?;
        }
        // Mount points are compared with /proc/self/mountinfo, which has absolute paths.
        let root = fs::canonicalize(&root).map_err(io_err("cannot resolve", &root))?;
        let lock_path = root.join("lock");
        let lock = lock_file(&lock_path)?;
        if exclusive {
            lock.try_lock().map_err(|_| StoreError::Busy)?;
        } else {
            lock.lock_shared().map_err(io_err("cannot lock", &lock_path))?;
        }
        let keys = NodeKeys::load_or_init(&root.join("keys"))?;
        let store =
            Store { packs: LazyPacks::start(root.join("packs")), keys: Arc::new(keys), root, _lock: lock };
        store.sweep_tmp();
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    pub fn keys_dir(&self) -> PathBuf {
        self.root.join("keys")
    }

    pub fn keys(&self) -> &NodeKeys {
        &self.keys
    }

    pub(crate) fn manifest_path(&self, name: &str) -> PathBuf {
        self.root.join("manifests").join(format!("{name}.fmf"))
    }

    fn working_set_path(&self, manifest_id: &[u8; 16]) -> PathBuf {
        self.root.join("hints").join(format!("{}.ws", hex(manifest_id)))
    }

    /// The working set a lazy restore of `c` recorded (`working_set`): empty when there is
    /// none, or when the file is not one this ferry takes (logged; it is only a hint).
    pub fn working_set(&self, c: &Checkpoint) -> Vec<crate::working_set::Run> {
        let path = self.working_set_path(&c.manifest.id);
        if !path.exists() {
            return Vec::new();
        }
        let read = crate::catalog::read_capped(&path, crate::working_set::MAX_WS_BYTES)
            .map_err(|e| e.to_string())
            .and_then(|data| crate::working_set::decode(&data, &c.manifest.id));
        read.unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "a working-set hint that is not taken");
            Vec::new()
        })
    }

    /// Records `runs` as the working set of `c` (replacing what was), atomically.
    pub fn record_working_set(
        &self,
        c: &Checkpoint,
        runs: &[crate::working_set::Run],
    ) -> Result<(), StoreError> {
        let dir = self.root.join("hints");
        private_dir(&dir)?;
        write_atomic(
            &self.working_set_path(&c.manifest.id),
            &crate::working_set::encode(&c.manifest.id, runs),
        )
    }

    pub(crate) fn slots_path(&self, manifest_id: &[u8; 16]) -> PathBuf {
        self.root.join("slots").join(format!("{}.slots", hex(manifest_id)))
    }

    fn catalog_path(&self) -> PathBuf {
        self.root.join("catalog")
    }

    pub(crate) fn packs(&self) -> Result<MutexGuard<'_, PackSet>, StoreError> {
        self.packs.get()?.lock().map_err(|_| StoreError::Busy)
    }

    pub(crate) fn trusted(&self) -> Result<Vec<[u8; 32]>, StoreError> {
        Ok(keys::trusted_signers(&self.keys_dir())?)
    }

    fn catalog(&self) -> Result<Catalog, StoreError> {
        Catalog::load(&self.catalog_path(), &self.trusted()?)
    }

    /// Applies `change` to the catalog under an exclusive lock, and saves it.
    fn update_catalog(&self, change: impl FnOnce(&mut Catalog)) -> Result<(), StoreError> {
        let lock_path = self.root.join("catalog.lock");
        let lock = lock_file(&lock_path)?;
        lock.lock().map_err(io_err("cannot lock", &lock_path))?;
        let mut catalog = self.catalog()?;
        change(&mut catalog);
        catalog.save(&self.catalog_path(), &self.keys)
    }

    /// True if the catalog has a live entry for `name`.
    pub(crate) fn catalog_live(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.catalog()?.live(name).is_some())
    }

    /// Records `entry` as `name`'s current manifest; refuses to go back to an older
    /// generation than the catalog has seen for the name.
    pub(crate) fn put_catalog_entry(&self, name: &str, entry: CatalogEntry) -> Result<(), StoreError> {
        let mut stale = None;
        self.update_catalog(|c| match c.entries.get(name) {
            Some(old) if old.generation >= entry.generation => stale = Some(old.generation),
            _ => {
                c.entries.insert(name.to_owned(), entry.clone());
            }
        })?;
        match stale {
            Some(g) => Err(StoreError::Tampered {
                file: format!("manifests/{name}.fmf"),
                detail: format!(
                    "generation {} is not newer than the {g} this store has seen for the name",
                    entry.generation
                ),
            }),
            None => Ok(()),
        }
    }

    /// Starts a checkpoint named `name`: a private tmpfs for CRIU's images.
    pub fn begin(&self, name: &str) -> Result<Pending, StoreError> {
        validate_name(name)?;
        if self.manifest_path(name).exists() || self.catalog()?.live(name).is_some() {
            return Err(StoreError::Exists(name.to_owned()));
        }
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let dir = self.root.join("tmp").join(format!("{name}.{}.{nanos}", std::process::id()));
        let tmpfs = PrivateTmpfs::mount(&dir, tmpfs_size())
            .map_err(io_err("cannot mount a private tmpfs at", &dir))?;
        private_dir(&tmpfs.path().join("images"))?;
        Ok(Pending { name: name.to_owned(), tmpfs, data_key: Arc::new(DataKey::generate()), durable: true })
    }

    /// The checkpoint named `name`, its signature and place in the catalog verified.
    pub fn get(&self, name: &str) -> Result<Checkpoint, StoreError> {
        validate_name(name)?;
        let path = self.manifest_path(name);
        let catalog = self.catalog()?;
        if !path.exists() {
            return match catalog.live(name) {
                Some(_) => Err(StoreError::Tampered {
                    file: format!("manifests/{name}.fmf"),
                    detail: "the catalog lists it but the file is gone".into(),
                }),
                None => Err(StoreError::NotFound(name.to_owned())),
            };
        }
        let tampered =
            |detail: String| StoreError::Tampered { file: format!("manifests/{name}.fmf"), detail };
        let bytes = read_capped(&path, MAX_MANIFEST)?;
        let (manifest, signer) =
            decode_verified(&bytes, &self.trusted()?).map_err(|e| tampered(e.to_string()))?;
        if manifest.name != name {
            return Err(tampered(format!("it describes '{}'", manifest.name)));
        }
        match catalog.live(name) {
            Some(CatalogEntry { manifest: id, generation, .. })
                if *id == hex(&manifest.id) && *generation == manifest.generation => {}
            Some(entry) => {
                return Err(tampered(format!(
                    "generation {} is not the current one ({}): an older or foreign manifest was put in its place",
                    manifest.generation, entry.generation
                )))
            }
            None => return Err(tampered("the catalog does not list it (removed, or copied in)".into())),
        }
        Ok(Checkpoint { manifest, signer })
    }

    /// Verified checkpoints, oldest first; the others are reported by name with their error.
    pub fn list(&self) -> Result<Listing, StoreError> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for name in self.manifest_names()? {
            match self.get(&name) {
                Ok(c) => good.push(c),
                Err(e) => bad.push((name, e)),
            }
        }
        good.sort_by(|a, b| {
            (a.manifest.created, &a.manifest.name).cmp(&(b.manifest.created, &b.manifest.name))
        });
        Ok((good, bad))
    }

    fn manifest_names(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join("manifests");
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("cannot read", &dir))? {
            let entry = entry.map_err(io_err("cannot read", &dir))?;
            let file = entry.file_name().to_string_lossy().into_owned();
            if let Some(name) = file.strip_suffix(".fmf") {
                if validate_name(name).is_ok() {
                    names.push(name.to_owned());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// Removes a checkpoint. With `shred`, its data key is destroyed first, so every copy of its
    /// manifest and chunks becomes unreadable; refused while other checkpoints share that key.
    pub fn remove(&self, name: &str, shred_key: bool) -> Result<(), StoreError> {
        validate_name(name)?;
        let path = self.manifest_path(name);
        if !path.exists() {
            return Err(StoreError::NotFound(name.to_owned()));
        }
        // A tampered manifest can still be removed; its slots are then found by its id if readable.
        let own = self.get(name).ok();
        if let Some(c) = &own {
            let hint = self.working_set_path(&c.manifest.id);
            if hint.exists() {
                fs::remove_file(&hint).map_err(io_err("cannot remove", &hint))?;
            }
            let slots = self.slots_path(&c.manifest.id);
            if shred_key {
                let own_key = c.manifest.key_ids.first().copied();
                let sharers = self.sharers_of(name, own_key)?;
                if !sharers.is_empty() {
                    return Err(StoreError::KeyShared { name: name.to_owned(), others: sharers });
                }
                if slots.exists() {
                    shred(&slots)?;
                }
            } else if slots.exists() {
                fs::remove_file(&slots).map_err(io_err("cannot remove", &slots))?;
            }
        } else if shred_key {
            return Err(StoreError::NoKey {
                name: name.to_owned(),
                detail: "its manifest does not verify, so its key cannot be found to shred".into(),
            });
        }
        fs::remove_file(&path).map_err(io_err("cannot remove", &path))?;
        sync_dir(&self.root.join("manifests"))?;
        self.update_catalog(|c| {
            if let Some(e) = c.entries.get_mut(name) {
                e.removed = true;
            }
        })
    }

    /// Other checkpoints whose key slots hold `key`.
    fn sharers_of(&self, name: &str, key: Option<KeyId>) -> Result<Vec<String>, StoreError> {
        let Some(key) = key else { return Ok(Vec::new()) };
        let (all, _) = self.list()?;
        Ok(all
            .into_iter()
            .filter(|c| c.manifest.name != name && c.manifest.key_ids.contains(&key))
            .map(|c| c.manifest.name)
            .collect())
    }

    /// Removes unreferenced chunks, rewriting packs that are partly live, and the leftovers of
    /// interrupted writers. Needs the store to itself ([`Store::open_exclusive`]).
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let mut live: BTreeSet<ChunkId> = BTreeSet::new();
        let mut live_keys: BTreeSet<KeyId> = BTreeSet::new();
        let mut live_manifests = BTreeSet::new();
        let trusted = self.trusted()?;
        for name in self.manifest_names()? {
            let bytes = read_capped(&self.manifest_path(&name), MAX_MANIFEST)?;
            // Chunks of any manifest that decodes are kept, verified or not: gc never destroys
            // data a human may still want to look at.
            if let Ok((m, _)) = decode_verified(&bytes, &trusted) {
                live_manifests.insert(hex(&m.id));
                live_keys.extend(m.key_ids.iter().copied());
                for f in &m.files {
                    for e in &f.extents {
                        if let Extent::Chunk { id, .. } = e {
                            live.insert(*id);
                        }
                    }
                }
            }
        }
        let mut report = GcReport::default();
        let mut packs = self.packs()?;
        let plan: Vec<crate::packs::PackId> = packs.packs().copied().collect();
        for pack in plan {
            let ids = packs.entries(&pack)?;
            // A copy is live if some manifest names the chunk and holds the key that sealed it.
            let live_here: Vec<Entry> =
                ids.iter().filter(|e| live.contains(&e.id) && live_keys.contains(&e.key)).copied().collect();
            if live_here.len() == ids.len() {
                continue;
            }
            let size = fs::metadata(packs.pack_path(&pack, "pack")).map(|m| m.len()).unwrap_or(0);
            if !live_here.is_empty() {
                rewrite_pack(&mut packs, &pack, &live_here)?;
                report.packs_rewritten += 1;
            } else {
                report.packs_deleted += 1;
            }
            report.chunks_removed += ids.len() - live_here.len();
            packs.delete(&pack)?;
            report.bytes_freed += size;
        }
        for orphan in packs.orphans()? {
            report.bytes_freed += fs::metadata(&orphan).map(|m| m.len()).unwrap_or(0);
            fs::remove_file(&orphan).map_err(io_err("cannot remove", &orphan))?;
            report.leftovers_removed += 1;
        }
        let slots_dir = self.root.join("slots");
        for entry in fs::read_dir(&slots_dir).map_err(io_err("cannot read", &slots_dir))? {
            let entry = entry.map_err(io_err("cannot read", &slots_dir))?;
            let file = entry.file_name().to_string_lossy().into_owned();
            let id = file.strip_suffix(".slots").unwrap_or(&file);
            if !live_manifests.contains(id) {
                shred(&entry.path())?;
                report.leftovers_removed += 1;
            }
        }
        // Working-set hints of checkpoints that are gone.
        let hints_dir = self.root.join("hints");
        for entry in fs::read_dir(&hints_dir).into_iter().flatten().flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            if !live_manifests.contains(file.strip_suffix(".ws").unwrap_or(&file)) {
                fs::remove_file(entry.path()).map_err(io_err("cannot remove", &entry.path()))?;
                report.leftovers_removed += 1;
            }
        }
        Ok(report)
    }

    /// Every distinct chunk checkpoint `c` uses, in the order its manifest first uses it, with
    /// where this store holds a copy sealed under one of the checkpoint's keys.
    pub(crate) fn chunk_locations(&self, c: &Checkpoint) -> Result<Vec<(ChunkId, Location)>, StoreError> {
        let packs = self.packs()?;
        let mut seen = crate::packs::IdSet::default();
        let mut out = Vec::new();
        for f in &c.manifest.files {
            for e in &f.extents {
                if let Extent::Chunk { id, .. } = e {
                    if seen.insert(*id) {
                        let loc = packs.find(id, &|k| c.manifest.key_ids.contains(k)).ok_or_else(|| {
                            StoreError::Damaged {
                                name: c.manifest.name.clone(),
                                file: f.name.clone(),
                                detail: format!("chunk {} is missing from the store", hex(&id[..8])),
                            }
                        })?;
                        out.push((*id, loc));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Deletes those of `packs` that hold no chunk a manifest of the store uses (what a finished
    /// or abandoned migration wrote): unlike [`Store::gc`] it needs no exclusive lock, since it
    /// touches only packs the caller wrote and knows to be done with. Returns the bytes freed.
    pub fn release_packs(&self, packs: &[crate::packs::PackId]) -> Result<u64, StoreError> {
        if packs.is_empty() {
            return Ok(0);
        }
        let mut live: BTreeSet<ChunkId> = BTreeSet::new();
        let trusted = self.trusted()?;
        for name in self.manifest_names()? {
            let bytes = read_capped(&self.manifest_path(&name), MAX_MANIFEST)?;
            if let Ok((m, _)) = decode_verified(&bytes, &trusted) {
                for f in &m.files {
                    for e in &f.extents {
                        if let Extent::Chunk { id, .. } = e {
                            live.insert(*id);
                        }
                    }
                }
            }
        }
        let mut set = self.packs()?;
        let mut freed = 0;
        for pack in packs {
            if !set.packs().any(|p| p == pack) {
                continue;
            }
            let entries = set.entries(pack)?;
            if entries.iter().any(|e| live.contains(&e.id)) {
                continue;
            }
            freed += fs::metadata(set.pack_path(pack, "pack")).map(|m| m.len()).unwrap_or(0);
            set.delete(pack)?;
        }
        Ok(freed)
    }

    /// Unmounts and removes tmp/ entries whose writer is gone.
    fn sweep_tmp(&self) {
        let tmp = self.root.join("tmp");
        let Ok(entries) = fs::read_dir(&tmp) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let writer = name.split('.').rev().nth(1).and_then(|p| p.parse::<i32>().ok());
            let alive =
                writer.is_some_and(|pid| pid as u32 != std::process::id() && ferry_sys::process_exists(pid));
            if alive {
                continue;
            }
            tracing::info!(leftover = %name, "removing what an interrupted checkpoint or restore left");
            if is_mount_point(&entry.path()) {
                let _ = ferry_sys::unmount(&entry.path());
            }
            let _ = fs::remove_dir_all(entry.path());
        }
    }

    /// Where a restore's plaintext images go: a fresh private tmpfs.
    pub fn scratch(&self, label: &str) -> Result<PrivateTmpfs, StoreError> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let dir = self.root.join("tmp").join(format!("{label}.{}.{nanos}", std::process::id()));
        PrivateTmpfs::mount(&dir, tmpfs_size()).map_err(io_err("cannot mount a private tmpfs at", &dir))
    }
}

fn rewrite_pack(packs: &mut PackSet, pack: &[u8; 16], live: &[Entry]) -> Result<(), StoreError> {
    let mut reader = packs.reader();
    let mut writer = PackWriter::create(packs.dir(), [0; 16])?;
    let mut buf = Vec::new();
    for e in live {
        reader.read_at(Location { pack: *pack, key: e.key, offset: e.offset, len: e.len }, &mut buf)?;
        writer.append_sealed_by(&e.id, e.key, &buf)?;
    }
    // The rewritten pack is durable and indexed before the caller deletes the old one.
    packs.absorb(writer.finish()?);
    Ok(())
}

fn is_mount_point(path: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = path.to_string_lossy();
    info.lines().any(|l| l.split_whitespace().nth(4) == Some(&p))
}

/// tmpfs pages are allocated as written; the cap only bounds a runaway writer.
fn tmpfs_size() -> u64 {
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(16 << 30, |kb| kb * 1024)
}

impl Pending {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The checkpoint's packs are not synced to disk ([`PackWriter::volatile`]); its manifest,
    /// slots and the packs' indexes still are. For a migration's checkpoint only.
    pub fn volatile(mut self) -> Pending {
        self.durable = false;
        self
    }

    /// Where CRIU writes the images (inside the private tmpfs).
    pub fn images_dir(&self) -> PathBuf {
        self.tmpfs.path().join("images")
    }

    /// Starts sealing images into the store as CRIU writes them.
    pub fn start_ingest(&self, store: &Store) -> Result<Pipeline, StoreError> {
        self.start_ingest_tapped(store, None)
    }

    /// Like [`Pending::start_ingest`], with a copy of each batch of new frames sent to `tap`.
    pub fn start_ingest_tapped(
        &self,
        store: &Store,
        tap: Option<crate::pipeline::Tap>,
    ) -> Result<Pipeline, StoreError> {
        self.start_ingest_with(store, tap, true, crate::progress::silent())
    }

    /// Like [`Pending::start_ingest_tapped`]; without `follow` the page images are not tailed
    /// while CRIU writes them: the caller gives them with [`Pipeline::feed`]. With it, the
    /// bytes tailed are reported to `progress` (CRIU's own writing: no total is known).
    pub fn start_ingest_with(
        &self,
        store: &Store,
        tap: Option<crate::pipeline::Tap>,
        follow: bool,
        progress: crate::progress::SharedProgress,
    ) -> Result<Pipeline, StoreError> {
        let usable = store.usable_keys()?;
        let packs = store.packs()?;
        Pipeline::start(
            self.images_dir(),
            store.keys.clone(),
            self.data_key.clone(),
            &packs,
            usable,
            threads(),
            tap,
            follow,
            self.durable,
            progress,
        )
    }

    /// Finishes the ingest and writes slots, manifest and catalog entry, in that order.
    pub fn commit(
        self,
        store: &Store,
        info: CheckpointInfo,
        pipeline: Pipeline,
    ) -> Result<Committed, StoreError> {
        let ingested = pipeline.finish()?;
        let usable = store.usable_keys()?;
        let own = self.data_key.id();
        let mut key_ids: Vec<KeyId> = vec![own];
        let written: Vec<crate::packs::PackId> =
            ingested.packs.iter().filter(|p| !p.entries.is_empty()).map(|p| p.pack).collect();
        {
            let mut packs = store.packs()?;
            for p in ingested.packs {
                packs.absorb(p);
            }
            let mut seen: BTreeSet<KeyId> = BTreeSet::from([own]);
            let mut reused: BTreeSet<crate::packs::PackId> = BTreeSet::new();
            for f in &ingested.files {
                for e in &f.extents {
                    if let Extent::Chunk { id, .. } = e {
                        let loc = packs.find(id, &|k| *k == own || usable.contains(k)).ok_or_else(|| {
                            StoreError::Damaged {
                                name: self.name.clone(),
                                file: f.name.clone(),
                                detail: "a chunk vanished while the checkpoint was written".into(),
                            }
                        })?;
                        if seen.insert(loc.key) {
                            key_ids.push(loc.key);
                        }
                        if !written.contains(&loc.pack) {
                            reused.insert(loc.pack);
                        }
                    }
                }
            }
            if self.durable {
                packs.sync(&reused)?;
            }
        }
        let mut ring: HashMap<KeyId, Arc<DataKey>> = HashMap::from([(own, self.data_key.clone())]);
        for key in &key_ids[1..] {
            ring.insert(*key, Arc::new(store.find_key(key)?));
        }
        let mut recipients = vec![store.keys.public().x25519];
        for (_, r) in keys::recipients(&store.keys_dir())? {
            if !recipients.contains(&r.x25519) {
                recipients.push(r.x25519);
            }
        }
        let id = random_bytes()?;
        let slots = Slots {
            entries: key_ids
                .iter()
                .map(|k| (*k, recipients.iter().map(|r| wrap_key(&ring[k], r)).collect()))
                .collect(),
        };
        write_atomic(&store.slots_path(&id), &slots.encode())?;

        let generation = store.catalog()?.next_generation(&self.name);
        let manifest = ManifestBody {
            id,
            name: self.name.clone(),
            created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            generation,
            source: info.source,
            host: info.host,
            spec: info.spec,
            tcp_established: info.tcp_established,
            leave_running: info.leave_running,
            network_lock_tables: info.network_lock_tables,
            dump_seconds: info.dump_seconds,
            key_ids,
            recipients,
            files: ingested.files,
        };
        let signed = encode_signed(&manifest, &store.keys).map_err(|e| StoreError::Tampered {
            file: format!("manifests/{}.fmf", self.name),
            detail: format!("cannot write: {e}"),
        })?;
        write_atomic(&store.manifest_path(&self.name), &signed)?;
        let entry = CatalogEntry { manifest: hex(&id), generation, removed: false };
        store.update_catalog(|c| {
            c.entries.insert(self.name.clone(), entry);
        })?;
        let signer = store.keys.public().ed25519;
        Ok(Committed { checkpoint: Checkpoint { manifest, signer }, stats: ingested.stats, packs: written })
    }
}

impl Store {
    /// Ids of the data keys that some checkpoint's slots still hold.
    pub(crate) fn usable_keys(&self) -> Result<std::collections::HashSet<KeyId>, StoreError> {
        let dir = self.root.join("slots");
        let mut out = std::collections::HashSet::new();
        for entry in fs::read_dir(&dir).map_err(io_err("cannot read", &dir))? {
            let entry = entry.map_err(io_err("cannot read", &dir))?;
            let Ok(bytes) = read_capped(&entry.path(), MAX_SLOTS_FILE) else { continue };
            if let Ok(slots) = Slots::decode(&bytes) {
                out.extend(slots.entries.iter().map(|(k, _)| *k));
            }
        }
        Ok(out)
    }

    /// A data key held in some checkpoint's slots, opened with this node's secret.
    fn find_key(&self, key: &KeyId) -> Result<DataKey, StoreError> {
        let dir = self.root.join("slots");
        for entry in fs::read_dir(&dir).map_err(io_err("cannot read", &dir))? {
            let entry = entry.map_err(io_err("cannot read", &dir))?;
            let Ok(bytes) = read_capped(&entry.path(), MAX_SLOTS_FILE) else { continue };
            let Ok(slots) = Slots::decode(&bytes) else { continue };
            for (kid, wrapped) in &slots.entries {
                if kid != key {
                    continue;
                }
                for w in wrapped {
                    if let Ok(dk) = unwrap_key(w, kid, self.keys.x25519_secret()) {
                        return Ok(dk);
                    }
                }
            }
        }
        Err(StoreError::NoKey {
            name: hex(key),
            detail: "no checkpoint holds this data key for this node (shredded?)".into(),
        })
    }
}

impl Checkpoint {
    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// Size of the images as CRIU wrote them.
    pub fn logical_size(&self) -> u64 {
        self.manifest.files.iter().map(|f| f.size).sum()
    }

    /// The data keys, opened with this node's secret.
    pub fn key_ring(&self, store: &Store) -> Result<KeyRing, StoreError> {
        let no_key = |detail: String| StoreError::NoKey { name: self.manifest.name.clone(), detail };
        let path = store.slots_path(&self.manifest.id);
        let bytes = read_capped(&path, MAX_SLOTS_FILE)
            .map_err(|_| no_key("its key slots are gone (removed with --shred?)".into()))?;
        let slots = Slots::decode(&bytes).map_err(|e| no_key(e.to_string()))?;
        let ring = slots
            .open_all(store.keys.x25519_secret())
            .map_err(|e| no_key(format!("this node cannot open them: {e}")))?;
        for k in &self.manifest.key_ids {
            if ring.get(k).is_none() {
                return Err(no_key(format!("key {} has no slot", hex(k))));
            }
        }
        Ok(ring)
    }

    /// Opens and checks every chunk without writing anything.
    pub fn verify(&self, store: &Store) -> Result<VerifyReport, StoreError> {
        self.for_each_chunk(store, None, &|_| false, &Silent)
    }

    /// Writes the images into `dir`, checking every chunk on the way. On error `dir` holds a
    /// partial copy that the caller must discard (it is a tmpfs that is dropped).
    pub fn materialize(&self, store: &Store, dir: &Path) -> Result<VerifyReport, StoreError> {
        self.for_each_chunk(store, Some(dir), &|_| false, &Silent)
    }

    /// As [`materialize`](Self::materialize), except that the files `skip` names are created
    /// at their size but left empty (holes): the caller fills what it needs of them from an
    /// [`ImageReader`].
    pub fn materialize_except(
        &self,
        store: &Store,
        dir: &Path,
        skip: &dyn Fn(&str) -> bool,
    ) -> Result<VerifyReport, StoreError> {
        self.for_each_chunk(store, Some(dir), skip, &Silent)
    }

    /// As [`materialize_except`](Self::materialize_except), with the bytes checked and
    /// written reported to `progress` (stage "verify").
    pub fn materialize_reporting(
        &self,
        store: &Store,
        dir: &Path,
        skip: &dyn Fn(&str) -> bool,
        progress: &dyn Progress,
    ) -> Result<VerifyReport, StoreError> {
        self.for_each_chunk(store, Some(dir), skip, progress)
    }

    /// Random access to the checkpoint's files, every chunk checked as it is read.
    pub fn image_reader(&self, store: &Store) -> Result<ImageReader, StoreError> {
        let ring = self.key_ring(store)?;
        let (known, dir) = {
            let packs = store.packs()?;
            (packs.known(), packs.dir().to_path_buf())
        };
        Ok(ImageReader::new(&self.manifest, ring, *store.keys.hash_key(), known, dir))
    }

    fn for_each_chunk(
        &self,
        store: &Store,
        out: Option<&Path>,
        skip: &dyn Fn(&str) -> bool,
        progress: &dyn Progress,
    ) -> Result<VerifyReport, StoreError> {
        let ring = self.key_ring(store)?;
        let (known, dir) = {
            let packs = store.packs()?;
            (packs.known(), packs.dir().to_path_buf())
        };
        let mut files = Vec::new();
        if let Some(out) = out {
            for f in &self.manifest.files {
                let path = out.join(&f.name);
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(io_err("cannot create", &path))?;
                // Zero extents stay holes: a tmpfs stores nothing for them.
                file.set_len(f.size).map_err(io_err("cannot size", &path))?;
                files.push(file);
            }
        }
        let work = work_list(&self.manifest.files, skip);
        let total_bytes: u64 = work.iter().map(|w| u64::from(w.len)).sum();
        progress.stage("verify", Some(total_bytes));
        let parts = split_work(&work, threads());
        let hash_key = store.keys.hash_key();
        let name = &self.manifest.name;
        let result: Result<(), StoreError> = thread::scope(|s| {
            let handles: Vec<_> = parts
                .into_iter()
                .map(|part| {
                    let known = known.clone();
                    let dir = dir.clone();
                    let ring = &ring;
                    let files = &files;
                    let manifest = &self.manifest;
                    s.spawn(move || {
                        let reader = PackReader::new(&dir, known);
                        let mut job = Materializer {
                            name,
                            manifest,
                            files,
                            reader,
                            opener: Opener::new(ring, hash_key),
                            usable: &|k: &KeyId| ring.get(k).is_some(),
                            span: Vec::new(),
                            pending: Vec::new(),
                            pending_at: None,
                            progress,
                        };
                        job.run(part)
                    })
                })
                .collect();
            handles.into_iter().try_for_each(|h| h.join().unwrap_or(Err(StoreError::Busy)))
        });
        result?;
        Ok(VerifyReport { files: self.manifest.files.len(), chunks: work.len() as u64, bytes: total_bytes })
    }

    /// Logical, zero, stored and shared sizes (shared: chunks other checkpoints also use).
    pub fn footprint(&self, store: &Store, others: &[Checkpoint]) -> Result<Footprint, StoreError> {
        let mut fp = Footprint { logical: self.logical_size(), ..Default::default() };
        let mut mine: BTreeSet<ChunkId> = BTreeSet::new();
        for f in &self.manifest.files {
            for e in &f.extents {
                match e {
                    Extent::Zero { len } => fp.zero += len,
                    Extent::Chunk { id, .. } => {
                        mine.insert(*id);
                    }
                }
            }
        }
        let theirs: BTreeSet<ChunkId> = others
            .iter()
            .filter(|o| o.manifest.id != self.manifest.id)
            .flat_map(|o| o.manifest.files.iter().flat_map(|f| f.extents.iter()))
            .filter_map(|e| if let Extent::Chunk { id, .. } = e { Some(*id) } else { None })
            .collect();
        let packs = store.packs()?;
        for id in &mine {
            if let Some(loc) = packs.find(id, &|k| self.manifest.key_ids.contains(k)) {
                fp.chunks += 1;
                fp.stored += u64::from(loc.len);
                if theirs.contains(id) {
                    fp.shared += u64::from(loc.len);
                }
            }
        }
        Ok(fp)
    }
}

/// Bytes read from a pack, or written to an image, per system call at most.
const SPAN: u64 = 4 << 20;

/// One thread's share of a restore or verify: frames are read in contiguous spans of the pack
/// and plaintext written in contiguous runs, not one system call per 4 KiB page.
struct Materializer<'a> {
    name: &'a str,
    manifest: &'a ManifestBody,
    files: &'a [File],
    reader: PackReader,
    opener: Opener<'a>,
    usable: &'a dyn Fn(&KeyId) -> bool,
    span: Vec<u8>,
    pending: Vec<u8>,
    /// (file index, offset) where `pending` goes.
    pending_at: Option<(usize, u64)>,
    progress: &'a dyn Progress,
}

impl Materializer<'_> {
    fn damaged(&self, w: &Work, detail: String) -> StoreError {
        StoreError::Damaged {
            name: self.name.to_owned(),
            file: format!("{} at offset {}", self.manifest.files[w.file].name, w.offset),
            detail,
        }
    }

    fn locate(&self, w: &Work) -> Result<Location, StoreError> {
        self.reader
            .find(&w.id, self.usable)
            .ok_or_else(|| self.damaged(w, format!("chunk {} is missing from the store", hex(&w.id[..8]))))
    }

    fn run(&mut self, part: &[Work]) -> Result<(), StoreError> {
        let mut i = 0;
        while i < part.len() {
            let first = self.locate(&part[i])?;
            let mut locs = vec![first];
            let mut end = first.offset + u64::from(first.len);
            while let Some(w) = part.get(i + locs.len()) {
                let l = self.locate(w)?;
                if l.pack != first.pack || l.offset != end || end - first.offset >= SPAN {
                    break;
                }
                end += u64::from(l.len);
                locs.push(l);
            }
            let span_loc = Location { len: (end - first.offset) as u32, ..first };
            let mut span = std::mem::take(&mut self.span);
            self.reader.read_span(span_loc, &mut span).map_err(|e| {
                let detail = match e {
                    StoreError::Damaged { file, detail, .. } => format!("{file}: {detail}"),
                    other => other.to_string(),
                };
                self.damaged(&part[i], format!("chunk {}: {detail}", hex(&part[i].id[..8])))
            })?;
            for (k, l) in locs.iter().enumerate() {
                let w = &part[i + k];
                let at = (l.offset - first.offset) as usize;
                let frame = &span[at..at + l.len as usize];
                let plain = self
                    .opener
                    .open(&w.id, frame)
                    .map_err(|e| self.damaged(w, format!("chunk {}: {e}", hex(&w.id[..8]))))?;
                if plain.len() != w.len as usize {
                    let detail = format!(
                        "chunk {} has {} bytes, the manifest says {}",
                        hex(&w.id[..8]),
                        plain.len(),
                        w.len
                    );
                    return Err(self.damaged(w, detail));
                }
                self.write(w, &plain)?;
            }
            self.span = span;
            self.progress.advance(part[i..i + locs.len()].iter().map(|w| u64::from(w.len)).sum());
            i += locs.len();
        }
        self.flush()
    }

    fn write(&mut self, w: &Work, plain: &[u8]) -> Result<(), StoreError> {
        if self.files.is_empty() {
            return Ok(());
        }
        let follows = self
            .pending_at
            .is_some_and(|(f, off)| f == w.file && off + self.pending.len() as u64 == w.offset);
        if !follows || self.pending.len() as u64 >= SPAN {
            self.flush()?;
            self.pending_at = Some((w.file, w.offset));
        }
        self.pending.extend_from_slice(plain);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if let Some((f, off)) = self.pending_at.take() {
            let name = &self.manifest.files[f].name;
            self.files[f].write_all_at(&self.pending, off).map_err(io_err("cannot write", name))?;
        }
        self.pending.clear();
        Ok(())
    }
}

struct Work {
    file: usize,
    offset: u64,
    id: ChunkId,
    len: u32,
}

/// The chunks of every file but those `skip` names, in file order.
fn work_list(files: &[FileRecord], skip: &dyn Fn(&str) -> bool) -> Vec<Work> {
    let mut out = Vec::new();
    for (file, f) in files.iter().enumerate().filter(|(_, f)| !skip(&f.name)) {
        let mut offset = 0u64;
        for e in &f.extents {
            match e {
                Extent::Zero { len } => offset += len,
                Extent::Chunk { id, len } => {
                    out.push(Work { file, offset, id: *id, len: *len });
                    offset += u64::from(*len);
                }
            }
        }
    }
    out
}

/// Contiguous parts of about equal bytes: each thread reads packs mostly sequentially.
fn split_work(work: &[Work], parts: usize) -> Vec<&[Work]> {
    let total: u64 = work.iter().map(|w| u64::from(w.len)).sum();
    let per = total / parts.max(1) as u64 + 1;
    let mut out = Vec::new();
    let (mut start, mut acc) = (0, 0u64);
    for (i, w) in work.iter().enumerate() {
        acc += u64::from(w.len);
        if acc >= per {
            out.push(&work[start..=i]);
            start = i + 1;
            acc = 0;
        }
    }
    if start < work.len() {
        out.push(&work[start..]);
    }
    out
}

/// Replaces this node's signing and X25519 keys (the hash key stays, so deduplication goes on).
/// Every checkpoint's data keys are re-wrapped for the new X25519 key while the old secret is
/// still in memory; old manifests keep verifying through the retired public keys.
pub fn rotate_keys(root: &Path) -> Result<keys::NodePublic, StoreError> {
    let store = Store::open_exclusive(root)?;
    let new = NodeKeys::rotate(&store.keys_dir())?;
    let new_x25519 = new.public().x25519;
    let dir = store.root.join("slots");
    for entry in fs::read_dir(&dir).map_err(io_err("cannot read", &dir))? {
        let entry = entry.map_err(io_err("cannot read", &dir))?;
        let path = entry.path();
        let bytes = read_capped(&path, MAX_SLOTS_FILE)?;
        let mut slots = Slots::decode(&bytes)
            .map_err(|e| StoreError::Tampered { file: path.display().to_string(), detail: e.to_string() })?;
        slots.add_recipient(store.keys.x25519_secret(), &new_x25519).map_err(|e| StoreError::NoKey {
            name: path.display().to_string(),
            detail: format!("cannot re-wrap for the new key: {e}"),
        })?;
        write_atomic(&path, &slots.encode())?;
    }
    Ok(new.public())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing test should stop right there
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::archive::{export, import, ExportMode};
    use crate::testutil::{checkpoint, frame_versions, materialized, peer_store, random, reseal_as_format_1};

    /// Pages of which the first differs with `seed`, four equal compressible ones, a core file.
    fn images(seed: u64) -> Vec<(&'static str, Vec<u8>)> {
        let mut pages = random(4096, 100 + seed);
        pages.extend(random(31 * 4096, 1));
        pages.extend(vec![7u8; 4 * 4096]);
        vec![("pages-1.img", pages), ("core-1.img", random(900, 2))]
    }

    fn expected(seed: u64) -> BTreeMap<String, Vec<u8>> {
        images(seed).into_iter().map(|(n, d)| (n.to_owned(), d)).collect()
    }

    /// A restore's verify stage counts to the bytes it announced: every chunk it wrote, and
    /// nothing of the files it skips.
    #[test]
    fn materializing_reports_each_written_chunk_against_its_total() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        checkpoint(&store, "m", &images(0));
        let c = store.get("m").unwrap();
        for (skip_pages, out) in [(false, "all"), (true, "no-pages")] {
            let tally = crate::progress::Tally::default();
            let target = dir.path().join(out);
            fs::create_dir(&target).unwrap();
            let skip = move |n: &str| skip_pages && n.starts_with("pages-");
            let report = c.materialize_reporting(&store, &target, &skip, &tally).unwrap();
            let stages = tally.stages();
            assert_eq!(stages, vec![("verify".to_owned(), Some(report.bytes), report.bytes)]);
            // Without the pages: the core file alone.
            assert!(if skip_pages { report.bytes == 900 } else { report.bytes > 900 }, "{out}: {report:?}");
        }
    }

    /// Any range of any file reads back as written, across chunk and zero extents, each chunk
    /// checked; a damaged chunk fails its read and hands out nothing of it.
    #[test]
    fn image_reader_reads_any_range_and_checks_every_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let mut pages = random(8 * 4096, 5);
        pages.extend(vec![0u8; 4096]);
        pages.extend(random(3 * 4096, 6));
        checkpoint(&store, "r", &[("pages-1.img", pages.clone()), ("core-1.img", random(900, 2))]);
        let reader = store.get("r").unwrap().image_reader(&store).unwrap();
        let file = reader.file("pages-1.img").unwrap();
        assert_eq!(reader.size(file), pages.len() as u64);
        assert_eq!(reader.file("nope.img"), None);
        let mut cur = reader.cursor();
        for (at, len) in
            [(0usize, pages.len()), (100, 5000), (4096, 4096), (7 * 4096 + 17, 3 * 4096), (8 * 4096, 4096)]
        {
            let mut out = vec![0xAAu8; len];
            cur.read(file, at as u64, &mut out).unwrap();
            assert_eq!(out, pages[at..at + len], "range {at}+{len}");
        }
        let mut past = vec![0u8; 10];
        assert!(cur.read(file, pages.len() as u64 - 5, &mut past).is_err(), "a read past the end");

        // One byte of one sealed page flipped: its read fails, its neighbours still read.
        let packs = store.packs().unwrap();
        let pack = *packs.packs().next().unwrap();
        let entries = packs.entries(&pack).unwrap();
        let path = packs.pack_path(&pack, "pack");
        drop(packs);
        let victim = entries.iter().max_by_key(|e| e.len).unwrap();
        let at = victim.offset + u64::from(victim.len) / 2;
        let file_bytes = fs::read(&path).unwrap();
        let mut flipped = file_bytes.clone();
        flipped[at as usize] ^= 0x55;
        fs::write(&path, &flipped).unwrap();
        let mut whole = vec![0u8; pages.len()];
        let err = reader.cursor().read(file, 0, &mut whole).unwrap_err();
        assert!(matches!(err, StoreError::Damaged { .. }), "{err}");
        fs::write(&path, &file_bytes).unwrap();
        reader.cursor().read(file, 0, &mut whole).unwrap();
        assert_eq!(whole, pages);
    }

    /// A page image fed by the caller (no file in the images directory, or one it replaces)
    /// is stored as if CRIU had written it.
    #[test]
    fn fed_page_images_are_stored_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let pending = store.begin("fed").unwrap();
        fs::write(pending.images_dir().join("core-1.img"), random(900, 2)).unwrap();
        // What CRIU's lazy dump left: replaced by the fed one of the same name.
        fs::write(pending.images_dir().join("pages-1.img"), random(4096, 9)).unwrap();
        let pipeline = pending.start_ingest_with(&store, None, false, crate::progress::silent()).unwrap();
        let mut pages = random(300 * 1024, 7);
        pages.extend(vec![0u8; 8192]);
        let mut feed = pipeline.feed("pages-1.img").unwrap();
        feed.write(&pages[..5000]).unwrap();
        feed.write_owned(pages[5000..].to_vec()).unwrap();
        assert_eq!(feed.finish().unwrap(), pages.len() as u64);
        assert!(pipeline.feed("pages-1.img").is_err(), "a name fed twice");
        let committed = pending.commit(&store, CheckpointInfo::default(), pipeline).unwrap();
        assert_eq!(committed.stats.zero_bytes, 8192);
        let got = materialized(&store, "fed");
        assert_eq!(got["pages-1.img"], pages);
        assert_eq!(got["core-1.img"], random(900, 2));
    }

    /// The page images the pipeline tails while CRIU writes them are reported as read (a
    /// container's checkpoint: no total is known), the other images not.
    #[test]
    fn tailed_page_images_are_reported_as_they_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let pending = store.begin("tailed").unwrap();
        let tally = std::sync::Arc::new(crate::progress::Tally::default());
        tally.stage("dump", None);
        let pipeline = pending.start_ingest_with(&store, None, true, tally.clone()).unwrap();
        let pages = random(300 * 4096, 4);
        fs::write(pending.images_dir().join("pages-1.img"), &pages).unwrap();
        fs::write(pending.images_dir().join("core-1.img"), random(900, 2)).unwrap();
        pending.commit(&store, CheckpointInfo::default(), pipeline).unwrap();
        assert_eq!(tally.stages(), vec![("dump".to_owned(), None, pages.len() as u64)]);
        assert_eq!(materialized(&store, "tailed")["pages-1.img"], pages);
    }

    /// A store written before frame format 2: its checkpoints verify and restore, a new
    /// checkpoint dedups against their chunks, migration ships them as they are, and an
    /// import seals them again in the new format.
    #[test]
    fn format_1_checkpoints_are_read_and_shared_with_format_2() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(dir.path().join("a")).unwrap();
        checkpoint(&a, "old", &images(0));
        let n = reseal_as_format_1(&a, "old");
        assert_eq!(frame_versions(&a, "old"), BTreeMap::from([(1, n)]));
        a.get("old").unwrap().verify(&a).unwrap();
        assert_eq!(materialized(&a, "old"), expected(0));

        // One page changed: one new chunk, in the new format; the rest is the old frames.
        let new = checkpoint(&a, "new", &images(1));
        assert_eq!(new.stats.new_chunks, 1);
        let new_version = crate::seal::FrameFormat::preferred().version();
        assert_eq!(frame_versions(&a, "new"), BTreeMap::from([(1, n - 1), (new_version, 1)]));
        assert_eq!(new.checkpoint.manifest.key_ids.len(), 2, "carries the old data key");
        assert_eq!(materialized(&a, "new"), expected(1));

        // Migration: the frames cross as they are sealed, both formats.
        let b = peer_store(&dir.path().join("b"), &a);
        let shipment = a.shipment("new", &b.keys().public().x25519).unwrap();
        let mut reader = a.chunk_reader().unwrap();
        let mut rx = b.receiver().unwrap();
        let mut buf = Vec::new();
        for i in b.lacking(&shipment.chunks).unwrap() {
            let c = shipment.chunks[i as usize];
            reader.read(&c, &mut buf).unwrap();
            rx.add(c, &buf).unwrap();
        }
        rx.finish(&shipment).unwrap();
        assert_eq!(frame_versions(&b, "new"), frame_versions(&a, "new"));
        assert_eq!(materialized(&b, "new"), expected(1));

        // Export and import: opened, then sealed again under the importer's fresh data key.
        let c = peer_store(&dir.path().join("c"), &a);
        let out = dir.path().join("old.tar");
        export(&a, "old", &out, ExportMode::Encrypted { recipients: vec![c.keys().public().x25519] })
            .unwrap();
        import(&c, &out, None).unwrap();
        assert_eq!(frame_versions(&c, "old"), BTreeMap::from([(new_version, n)]));
        assert_eq!(materialized(&c, "old"), expected(0));
    }
}

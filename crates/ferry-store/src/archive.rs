//! `ferry export` and `ferry import`: a checkpoint as one tar file, laid out like the
//! checkpoint archives of Podman and CRI-O, with ferry's signed manifest beside.
//!
//! Encrypted (the default): nothing in it is plaintext.
//! ```text
//! ferry/                 directory
//! ferry/VERSION          "1\n": the archive format
//! ferry/manifest.fmf     the signed manifest, byte for byte as stored
//! ferry/slots            a slots file: the checkpoint's data keys, wrapped for the recipients
//! ferry/chunks.idx       a pack index (FRYX, as packs/*.idx) of chunks.pack, offsets in order
//! ferry/chunks.pack      the frame of every chunk the manifest references, once, as sealed
//! ```
//! There is no `checkpoint/` entry at all: tools that look for one say that this is not a
//! plaintext checkpoint archive instead of showing an empty one.
//!
//! Plaintext (`--plaintext`): what checkpointctl reads, and (for a container) what `podman
//! container restore --import` restores.
//! ```text
//! ferry/                 directory
//! ferry/VERSION          "1\n"
//! ferry/manifest.fmf     the signed manifest (it names every image, and its chunk ids)
//! ferry/<own>.json       images of ferry's own that are not CRIU's (ferry-container.json)
//! config.dump            Podman's container config   } written by an [`ExportLayout`]
//! spec.dump              the OCI runtime spec        } (a container's; none for a process)
//! checkpoint/            directory
//! checkpoint/<image>     every CRIU image file, in the manifest's order
//! rootfs-diff.tar        a container's root file system changes (images the layout puts at
//! deleted.files            the top, where Podman and CRI-O have them)
//! stats-dump             CRIU's stats-dump if the checkpoint holds one, else empty
//! ```
//! Entries are GNU tar (long names as `L` entries), uncompressed, files 0600, directories
//! 0700, owner 0, mtime the checkpoint's creation time. An OCI checkpoint image
//! ([`ExportMode::OciImage`], `oci.rs`) carries exactly this archive as its one layer.
//!
//! Import reads the archive twice. The first pass checks every header before anything is
//! written: a member count cap, size caps per member and in total, only regular files and
//! directories, relative paths without `.` or `..` components, no setuid/setgid bits, names
//! only where this layout, Podman's or CRI-O's puts them, an end-of-archive marker (so a
//! truncated archive is refused even when cut between two members), nothing but zeros after
//! it. The small ferry files and the container metadata (`config.dump`, `spec.dump`,
//! `network.status`) are kept from that pass; the second pass streams the images or the pack
//! and refuses an archive that changed in between. Plaintext only ever goes into the private
//! tmpfs of a [`Pending`], which is dropped on any error: nothing outside the store is
//! written, and a refused archive leaves nothing listed. Archives may be zstd-compressed
//! (as Podman writes them by default); gzip is refused with a hint. What the images and the
//! metadata mean for a container is for an [`ImportHook`] to check (ferry-runtime's), before
//! anything is sealed; without one, an archive with root file system changes is refused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use tar::{Builder, EntryType, Header, PaxExtensions};

use crate::catalog::read_capped;
use crate::error::io_err;
use crate::fsutil::{create_private, sync_dir};
use crate::keys::{hex, ChunkId};
use crate::manifest::{decode_verified, Extent, ManifestBody, MAX_FILES, MAX_MANIFEST_FILE};
use crate::packs::{decode_idx, KeyId, Location, PackReader, MAX_FRAME};
use crate::progress::{Counted, Progress, Silent};
use crate::seal::{KeyRing, Opener, SealError, Slots, MAX_SLOTS_FILE};
use crate::store::{Checkpoint, CheckpointInfo, Committed, Pending, Store};
use crate::StoreError;
use ferry_sys::PrivateTmpfs;

/// Largest member an archive may hold (an image or the pack of sealed chunks).
pub const MAX_ARCHIVE_ENTRY: u64 = 256 << 30;
/// Largest sum of the members of an archive.
pub const MAX_ARCHIVE_TOTAL: u64 = 1 << 40;
/// Most members (files and directories) an archive may hold: as many images as a manifest
/// may list, and the few other files.
pub const MAX_ARCHIVE_ENTRIES: usize = MAX_FILES + 16;

/// The archive format written in `ferry/VERSION`.
const FORMAT: &[u8] = b"1\n";
const BLOCK: usize = 512;
/// Caps of the tar extension headers (GNU long name, PAX): read into memory.
const MAX_LONG_NAME: u64 = 4096;
const MAX_PAX: u64 = 64 << 10;
/// Podman's and CRI-O's container metadata at the top (`config.dump`, `spec.dump`,
/// `network.status`): kept in memory for the [`ImportHook`]. Real ones are a few KiB.
pub const MAX_METADATA_FILE: u64 = 1 << 20;
/// ferry's own image files under `ferry/` (`*.json`).
const MAX_OWN_FILE: u64 = 16 << 20;
/// `deleted.files`: a JSON list of paths.
const MAX_DELETED_FILE: u64 = 64 << 20;
/// The files Podman and CRI-O write beside the metadata: logs, statistics, `/dev/shm`'s
/// content. Read through, never kept.
const SKIPPED_TOP: &[&str] = &[
    "stats-dump",
    "ctr.log",
    "dump.log",
    "restore.log",
    "devshm-checkpoint.tar",
    "bind.mounts",
    "io.kubernetes.cri-o.LogPath",
    "pod.options",
    "status",
];
/// The metadata files kept for the hook.
pub const METADATA_FILES: &[&str] = &["config.dump", "spec.dump", "network.status"];
/// Images Podman and CRI-O keep at the top rather than under `checkpoint/`.
pub const TOP_IMAGES: &[&str] = &["rootfs-diff.tar", "deleted.files"];
const MAX_VERSION_FILE: u64 = 16;
/// Size of an index entry and header in `ferry/chunks.idx` (docs/store-format.md).
const IDX_HEADER: usize = 12;
const IDX_ENTRY: usize = 60;
const MAX_IDX_FILE: u64 = (IDX_HEADER + IDX_ENTRY * (1 << 24)) as u64;
/// Zeros tolerated after the end-of-archive marker (tar pads to its record size).
const MAX_TRAILER: u64 = 1 << 20;
/// Images and plaintext archive members are copied in pieces of this size.
const COPY_BUF: usize = 1 << 20;

/// How to export.
#[derive(Debug, Clone)]
pub enum ExportMode {
    /// Sealed chunks and the data keys wrapped for exactly these X25519 public keys (the CLI
    /// passes this node's and its recipients').
    Encrypted { recipients: Vec<[u8; 32]> },
    /// The images in the clear, as checkpointctl and Podman read them.
    Plaintext,
    /// An OCI image layout whose one layer is the plaintext archive (`oci.rs`): a tar of
    /// the layout, or the layout itself as a directory.
    OciImage {
        /// The image's name (`org.opencontainers.image.ref.name`), e.g. `localhost/web:latest`.
        reference: String,
        /// Write the layout as a directory (it must not exist) rather than a tar.
        directory: bool,
    },
}

/// How a plaintext export lays out what is not a CRIU image. The store knows nothing of
/// containers: ferry-runtime decides, from the materialized images.
pub trait ExportLayout {
    /// `images` holds the checkpoint's verified images (in a private tmpfs).
    fn layout(&self, images: &Path, manifest: &ManifestBody) -> Result<Layout, StoreError>;
}

/// What an [`ExportLayout`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// Files written at the top, before `checkpoint/`: one of [`METADATA_FILES`] each.
    pub metadata: Vec<(String, Vec<u8>)>,
    /// Images written at the top instead of under `checkpoint/`: of [`TOP_IMAGES`].
    pub top: Vec<String>,
    /// Images written under `ferry/` instead (ferry's own files): `*.json`.
    pub own: Vec<String>,
    /// Annotations of an OCI checkpoint image (its manifest's and index entry's).
    pub annotations: BTreeMap<String, String>,
}

impl Layout {
    /// Where image `name` goes in the archive.
    fn path_of(&self, name: &str) -> String {
        if self.top.iter().any(|t| t == name) {
            name.to_owned()
        } else if self.own.iter().any(|o| o == name) {
            format!("ferry/{name}")
        } else {
            format!("checkpoint/{name}")
        }
    }

    fn check(&self, m: &ManifestBody) -> Result<(), StoreError> {
        let bad = |detail: String| StoreError::Damaged {
            name: m.name.clone(),
            file: "export layout".into(),
            detail,
        };
        for (n, data) in &self.metadata {
            if !METADATA_FILES.contains(&n.as_str()) || data.len() as u64 > MAX_METADATA_FILE {
                return Err(bad(format!("{n} cannot be written at the top")));
            }
        }
        for t in &self.top {
            if !TOP_IMAGES.contains(&t.as_str()) {
                return Err(bad(format!("{t} cannot be written at the top")));
            }
        }
        for o in &self.own {
            if !o.ends_with(".json") || o == "VERSION" {
                return Err(bad(format!("{o} cannot be written under ferry/")));
            }
        }
        for name in self.top.iter().chain(&self.own) {
            if !m.files.iter().any(|f| &f.name == name) {
                return Err(bad(format!("{name} is not an image of the checkpoint")));
            }
        }
        Ok(())
    }
}

/// The layout of a checkpoint that is not a container's: every image under `checkpoint/`.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainImages;

impl ExportLayout for PlainImages {
    fn layout(&self, _images: &Path, _manifest: &ManifestBody) -> Result<Layout, StoreError> {
        Ok(Layout::default())
    }
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportReport {
    /// Size of the archive file.
    pub bytes: u64,
    /// Image files of the checkpoint.
    pub files: usize,
    /// `"encrypted"`, `"plaintext"` or `"OCI image"`.
    pub mode: &'static str,
    /// An OCI image's id (the digest of its config, as container engines name images).
    pub image_id: Option<String>,
}

/// Writes checkpoint `name` to `out` (replaced if it exists) through a temporary file in the
/// same directory that is renamed into place; the file is 0600. Every image goes under
/// `checkpoint/`; [`export_with`] lets a layout place the rest.
pub fn export(store: &Store, name: &str, out: &Path, mode: ExportMode) -> Result<ExportReport, StoreError> {
    export_with(store, name, out, mode, &PlainImages, &Silent)
}

/// [`export`], with `layout` deciding where a plaintext export puts what is not a CRIU image,
/// and the bytes written reported to `progress`.
pub fn export_with(
    store: &Store,
    name: &str,
    out: &Path,
    mode: ExportMode,
    layout: &dyn ExportLayout,
    progress: &dyn Progress,
) -> Result<ExportReport, StoreError> {
    let c = store.get(name)?;
    let manifest = signed_manifest(store, &c)?;
    if let ExportMode::OciImage { reference, directory } = &mode {
        let plain = PlainSource::prepare(store, &c, manifest, layout, progress)?;
        let (bytes, image_id) = crate::oci::write(&plain, reference, out, *directory)?;
        let files = c.manifest.files.len();
        return Ok(ExportReport { bytes, files, mode: "OCI image", image_id: Some(image_id) });
    }
    let mut tmp = TempOut::create(out)?;
    let file = tmp.file.try_clone().map_err(io_err("cannot open", &tmp.path))?;
    let werr = |e: io::Error| StoreError::Io { action: "cannot write", path: tmp.path.clone(), source: e };
    let mode_name = match mode {
        ExportMode::Encrypted { recipients } => {
            let mut tar = Builder::new(BufWriter::with_capacity(COPY_BUF, file));
            put_ferry_header(&mut tar, &c, &manifest).map_err(werr)?;
            write_sealed(&mut tar, store, &c, &recipients, &tmp.path, progress)?;
            finish_tar(tar).map_err(werr)?;
            "encrypted"
        }
        ExportMode::Plaintext => {
            let plain = PlainSource::prepare(store, &c, manifest, layout, progress)?;
            let buffered = plain.write(BufWriter::with_capacity(COPY_BUF, file), &tmp.path)?;
            let file = buffered.into_inner().map_err(|e| werr(e.into_error()))?;
            file.sync_all().map_err(werr)?;
            "plaintext"
        }
        ExportMode::OciImage { .. } => unreachable!("handled above"),
    };
    let bytes = tmp.file.metadata().map_err(io_err("cannot stat", &tmp.path))?.len();
    tmp.persist(out)?;
    Ok(ExportReport { bytes, files: c.manifest.files.len(), mode: mode_name, image_id: None })
}

/// `ferry/`, `ferry/VERSION` and `ferry/manifest.fmf`, which every archive starts with.
fn put_ferry_header<W: Write>(tar: &mut Builder<W>, c: &Checkpoint, manifest: &[u8]) -> io::Result<()> {
    let mtime = c.manifest.created;
    put(tar, "ferry/", EntryType::Directory, 0, mtime, io::empty())?;
    put(tar, "ferry/VERSION", EntryType::Regular, FORMAT.len() as u64, mtime, FORMAT)?;
    put(tar, "ferry/manifest.fmf", EntryType::Regular, manifest.len() as u64, mtime, manifest)
}

/// Ends the archive and syncs the file under it.
fn finish_tar(tar: Builder<BufWriter<File>>) -> io::Result<()> {
    let buffered = tar.into_inner()?;
    let file = buffered.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
}

/// Imports the checkpoint in `archive` (encrypted or plaintext, found from its content) as
/// `name`, or under the name its verified manifest gives. It becomes a local checkpoint:
/// sealed under a fresh data key of this store (chunks the store already holds are shared)
/// and signed by this node. An archive with a container's root file system changes needs
/// [`import_with`] and a hook that checks them.
pub fn import(store: &Store, archive: &Path, name: Option<&str>) -> Result<Committed, StoreError> {
    import_inner(store, archive, name, None, &Silent)
}

/// [`import`], with `hook` checking (and completing) what a container's archive holds, and
/// each pass over the archive reported to `progress`.
pub fn import_with(
    store: &Store,
    archive: &Path,
    name: Option<&str>,
    hook: &dyn ImportHook,
    progress: &dyn Progress,
) -> Result<Committed, StoreError> {
    import_inner(store, archive, name, Some(hook), progress)
}

/// What the container metadata of an archive means: ferry-runtime's business. Both calls
/// get hostile input; an `Err` refuses the archive (nothing is kept).
pub trait ImportHook {
    /// A name for the checkpoint when none is given and no verified manifest has one.
    fn default_name(&self, meta: &ArchiveMeta) -> Option<String>;

    /// Checks the images now written into `images` (a private tmpfs), and may add files of
    /// ferry's own there (a container's record, made from the metadata) when `verified` is
    /// false. Returns the checkpoint's source and spec if it knows them.
    fn finish(&self, images: &Path, meta: &ArchiveMeta, verified: bool) -> Result<Option<Origin>, HookError>;
}

/// The container metadata an archive carried at its top (each at most [`MAX_METADATA_FILE`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveMeta {
    /// The archive's file name (for messages and the default source).
    pub archive: String,
    /// `config.dump`, `spec.dump`, `network.status`, as found.
    pub files: BTreeMap<String, Vec<u8>>,
}

/// What the manifest of an imported checkpoint says of where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The workload, e.g. `podman:web`.
    pub source: String,
    /// The spec summary `ferry list` and `inspect` show (JSON text).
    pub spec: String,
}

/// Why a hook refused an archive: the member at fault and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookError {
    pub entry: String,
    pub detail: String,
}

fn import_inner(
    store: &Store,
    archive: &Path,
    name: Option<&str>,
    hook: Option<&dyn ImportHook>,
    progress: &dyn Progress,
) -> Result<Committed, StoreError> {
    let label = archive.display().to_string();
    // Non-blocking, so that a FIFO given as the archive is refused rather than waited on.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(archive)
        .map_err(io_err("cannot open", archive))?;
    let md = file.metadata().map_err(io_err("cannot stat", archive))?;
    if !md.is_file() {
        return Err(refused(&label, "", "not a regular file"));
    }
    let rules = Rules { rootfs: hook.is_some() };
    // Two passes over the file: one checks it all, the other imports what was checked.
    progress.stage("check", Some(md.len()));
    let scan = {
        let mut tar = TarIn::new(open_stream(&file, &label, archive, progress)?, &label);
        scan(&mut tar, rules)?
    };
    let src = Source { file: &file, label: &label, path: archive, scan: &scan, rules, progress };
    if scan.encrypted() {
        import_sealed(store, &src, name)
    } else {
        import_plain(store, &src, name, hook)
    }
}

// ---------------------------------------------------------------------------------------------
// Export

/// The manifest's bytes as stored, checked to be the one `c` was verified from.
fn signed_manifest(store: &Store, c: &Checkpoint) -> Result<Vec<u8>, StoreError> {
    let path = store.manifest_path(&c.manifest.name);
    let bytes = read_capped(&path, MAX_MANIFEST_FILE)?;
    let tampered =
        |detail: String| StoreError::Tampered { file: format!("manifests/{}.fmf", c.manifest.name), detail };
    let (m, _) = decode_verified(&bytes, &store.trusted()?).map_err(|e| tampered(e.to_string()))?;
    if m.id != c.manifest.id || m.generation != c.manifest.generation {
        return Err(tampered("it changed while being exported".into()));
    }
    Ok(bytes)
}

fn write_sealed<W: Write>(
    tar: &mut Builder<W>,
    store: &Store,
    c: &Checkpoint,
    recipients: &[[u8; 32]],
    tmp: &Path,
    progress: &dyn Progress,
) -> Result<(), StoreError> {
    let name = &c.manifest.name;
    let ring = c.key_ring(store)?;
    let mut unique: Vec<[u8; 32]> = Vec::with_capacity(recipients.len());
    for r in recipients {
        if !unique.contains(r) {
            unique.push(*r);
        }
    }
    let keys = c
        .manifest
        .key_ids
        .iter()
        .map(|k| ring.get(k).ok_or_else(|| no_key(name, format!("key {} is not in its slots", hex(k)))))
        .collect::<Result<Vec<_>, _>>()?;
    let slots = Slots::wrap(&keys, &unique)
        .map_err(|e| no_key(name, format!("cannot wrap its data keys for the recipients: {e}")))?
        .encode();

    // Every chunk once, in the order the manifest first uses it.
    let work = store.chunk_locations(c)?;
    let mut reader = store.packs()?.reader();
    let mut entries = Vec::with_capacity(work.len());
    let mut offset = 0u64;
    for (id, loc) in &work {
        entries.push((*id, loc.key, offset, loc.len));
        offset += u64::from(loc.len);
    }
    let idx = encode_index(&entries);
    let mtime = c.manifest.created;
    let werr = |e: io::Error| StoreError::Io { action: "cannot write", path: tmp.to_path_buf(), source: e };
    put(tar, "ferry/slots", EntryType::Regular, slots.len() as u64, mtime, &slots[..]).map_err(werr)?;
    put(tar, "ferry/chunks.idx", EntryType::Regular, idx.len() as u64, mtime, &idx[..]).map_err(werr)?;
    let mut frames = FrameStream {
        name,
        reader: &mut reader,
        opener: Opener::new(&ring, store.keys().hash_key()),
        work: &work,
        next: 0,
        buf: Vec::new(),
        pos: 0,
        error: None,
    };
    progress.stage("export", Some(offset));
    let written =
        put(tar, "ferry/chunks.pack", EntryType::Regular, offset, mtime, Counted::new(&mut frames, progress));
    if let Some(e) = frames.error.take() {
        return Err(e);
    }
    written.map_err(werr)
}

/// The frames of `work`, read from the packs and checked (opened) on the way.
struct FrameStream<'a, 'r> {
    name: &'a str,
    reader: &'a mut PackReader,
    opener: Opener<'r>,
    work: &'a [(ChunkId, Location)],
    next: usize,
    buf: Vec<u8>,
    pos: usize,
    error: Option<StoreError>,
}

impl FrameStream<'_, '_> {
    fn refill(&mut self) -> Result<bool, StoreError> {
        let Some((id, loc)) = self.work.get(self.next) else { return Ok(false) };
        self.next += 1;
        self.reader.read_at(*loc, &mut self.buf)?;
        self.opener.open(id, &self.buf).map_err(|e| StoreError::Damaged {
            name: self.name.to_owned(),
            file: format!("packs/{}.pack", hex(&loc.pack)),
            detail: format!("chunk {}: {e}", hex(&id[..8])),
        })?;
        self.pos = 0;
        Ok(true)
    }
}

impl Read for FrameStream<'_, '_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.refill() {
                Ok(true) => {}
                Ok(false) => return Ok(0),
                Err(e) => {
                    let msg = e.to_string();
                    self.error = Some(e);
                    return Err(io::Error::other(msg));
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// A checkpoint's images materialized in a private tmpfs, and where a plaintext archive puts
/// each: what a plaintext export and an OCI image's layer are written from.
pub(crate) struct PlainSource<'a> {
    c: &'a Checkpoint,
    manifest: Vec<u8>,
    scratch: PrivateTmpfs,
    pub(crate) layout: Layout,
    progress: &'a dyn Progress,
}

impl<'a> PlainSource<'a> {
    fn prepare(
        store: &Store,
        c: &'a Checkpoint,
        manifest: Vec<u8>,
        layout: &dyn ExportLayout,
        progress: &'a dyn Progress,
    ) -> Result<PlainSource<'a>, StoreError> {
        let scratch = store.scratch(&format!("export-{}", c.manifest.name))?;
        c.materialize(store, scratch.path())?;
        for f in &c.manifest.files {
            let path = scratch.path().join(&f.name);
            let len = fs::metadata(&path).map_err(io_err("cannot stat", &path))?.len();
            if len != f.size {
                return Err(StoreError::Damaged {
                    name: c.manifest.name.clone(),
                    file: f.name.clone(),
                    detail: format!("materialized as {len} bytes, the manifest says {}", f.size),
                });
            }
        }
        let layout = layout.layout(scratch.path(), &c.manifest)?;
        layout.check(&c.manifest)?;
        Ok(PlainSource { c, manifest, scratch, layout, progress })
    }

    pub(crate) fn manifest(&self) -> &ManifestBody {
        &self.c.manifest
    }

    /// Writes the whole plaintext archive (with its end marker) into `w` and returns `w`;
    /// `target` names what is written, for errors. The same source always gives the same bytes.
    pub(crate) fn write<W: Write>(&self, w: W, target: &Path) -> Result<W, StoreError> {
        let werr =
            |e: io::Error| StoreError::Io { action: "cannot write", path: target.to_path_buf(), source: e };
        let mut tar = Builder::new(w);
        let m = &self.c.manifest;
        let mtime = m.created;
        // The images are the bulk: what `put_image` reports (an OCI image writes them twice,
        // once to hash them).
        self.progress.stage("export", Some(m.files.iter().map(|f| f.size).sum()));
        put_ferry_header(&mut tar, self.c, &self.manifest).map_err(werr)?;
        for name in &self.layout.own {
            self.put_image(&mut tar, name, &format!("ferry/{name}")).map_err(werr)?;
        }
        for (n, data) in &self.layout.metadata {
            put(&mut tar, n, EntryType::Regular, data.len() as u64, mtime, &data[..]).map_err(werr)?;
        }
        put(&mut tar, "checkpoint/", EntryType::Directory, 0, mtime, io::empty()).map_err(werr)?;
        for f in &m.files {
            let at = self.layout.path_of(&f.name);
            if at.starts_with("checkpoint/") {
                self.put_image(&mut tar, &f.name, &at).map_err(werr)?;
            }
        }
        for name in &self.layout.top {
            self.put_image(&mut tar, name, name).map_err(werr)?;
        }
        match m.files.iter().find(|f| f.name == "stats-dump") {
            Some(_) => self.put_image(&mut tar, "stats-dump", "stats-dump").map_err(werr)?,
            None => put(&mut tar, "stats-dump", EntryType::Regular, 0, mtime, io::empty()).map_err(werr)?,
        }
        tar.into_inner().map_err(werr)
    }

    /// Image `name` as member `at`: exactly the manifest's size, even if the file changed.
    fn put_image<W: Write>(&self, tar: &mut Builder<W>, name: &str, at: &str) -> io::Result<()> {
        let size = self.c.manifest.files.iter().find(|f| f.name == name).map_or(0, |f| f.size);
        let path = self.scratch.path().join(name);
        let file = File::open(&path)?;
        let data = Counted::new(BufReader::with_capacity(COPY_BUF, file).take(size), self.progress);
        put(tar, at, EntryType::Regular, size, self.c.manifest.created, data)
    }
}

/// Appends one member; `data` must yield exactly `size` bytes.
pub(crate) fn put<W: Write>(
    tar: &mut Builder<W>,
    path: &str,
    kind: EntryType,
    size: u64,
    mtime: u64,
    data: impl Read,
) -> io::Result<()> {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(if kind == EntryType::Directory { 0o700 } else { 0o600 });
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    tar.append_data(&mut h, path, data)
}

/// A pack index (docs/store-format.md) of `(id, key, offset, len)`.
fn encode_index(entries: &[(ChunkId, KeyId, u64, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(IDX_HEADER + entries.len() * IDX_ENTRY);
    out.extend_from_slice(b"FRYX");
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&u32::try_from(entries.len()).unwrap_or(u32::MAX).to_le_bytes());
    for (id, key, offset, len) in entries {
        out.extend_from_slice(id);
        out.extend_from_slice(key);
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
    }
    out
}

/// The archive being written: removed unless renamed into place.
pub(crate) struct TempOut {
    path: PathBuf,
    file: File,
    done: bool,
}

impl TempOut {
    pub(crate) fn create(out: &Path) -> Result<TempOut, StoreError> {
        let dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let base = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path = dir.join(format!(".{base}.ferry-tmp.{}.{nanos}", std::process::id()));
        let file = create_private(&path)?;
        Ok(TempOut { path, file, done: false })
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn persist(&mut self, out: &Path) -> Result<(), StoreError> {
        fs::rename(&self.path, out).map_err(io_err("cannot rename into", out))?;
        self.done = true;
        match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
            _ => sync_dir(Path::new(".")),
        }
    }
}

impl Drop for TempOut {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading tar, strictly

/// A tar stream read member by member, refusing everything but plain files and directories.
/// The data of the current member is read through `Read`; what is left of it is skipped by
/// the next call to [`TarIn::next`].
struct TarIn<'l, R> {
    inner: R,
    label: &'l str,
    /// The current member: its path (for messages), data left, padding after it.
    current: String,
    remaining: u64,
    pad: u64,
    members: usize,
    total: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
}

#[derive(Debug)]
struct Member {
    /// Relative, normalized: no leading `./`, no trailing `/`, no empty, `.` or `..` parts;
    /// empty for the archive's root directory.
    path: String,
    kind: Kind,
    size: u64,
}

impl<'l, R: Read> TarIn<'l, R> {
    fn new(inner: R, label: &'l str) -> Self {
        TarIn { inner, label, current: String::new(), remaining: 0, pad: 0, members: 0, total: 0 }
    }

    fn refuse(&self, entry: &str, detail: impl Into<String>) -> StoreError {
        refused(self.label, entry, detail)
    }

    fn read_err(&self, e: io::Error) -> StoreError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            self.refuse(&self.current, "the archive ends inside this entry (truncated)")
        } else {
            StoreError::Io { action: "cannot read", path: PathBuf::from(self.label), source: e }
        }
    }

    /// Fills `buf`, or reports a clean end of stream (`false`) if nothing was left.
    fn block(&mut self, buf: &mut [u8; BLOCK]) -> Result<bool, StoreError> {
        let mut filled = 0;
        while filled < BLOCK {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => return Err(self.refuse("", "the archive ends inside a header (truncated)")),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.read_err(e)),
            }
        }
        Ok(true)
    }

    /// Skips what is left of the current member and its padding.
    fn skip_rest(&mut self) -> Result<(), StoreError> {
        let left = self.remaining + self.pad;
        self.pad = 0;
        if left > 0 {
            let mut rest = (&mut self.inner).take(left);
            let n = io::copy(&mut rest, &mut io::sink()).map_err(|e| self.read_err(e))?;
            self.remaining = 0;
            if n != left {
                return Err(
                    self.refuse(&self.current.clone(), "the archive ends inside this entry (truncated)")
                );
            }
        }
        Ok(())
    }

    /// Reads the data of an extension header (capped before the call).
    fn read_small(&mut self, size: u64) -> Result<Vec<u8>, StoreError> {
        let mut data = vec![0u8; usize::try_from(size).unwrap_or(0)];
        self.remaining = size;
        self.pad = padding(size);
        self.read_exact(&mut data).map_err(|e| self.read_err(e))?;
        self.skip_rest()?;
        Ok(data)
    }

    /// The next member, checked; `None` after the end-of-archive marker (required).
    fn next(&mut self) -> Result<Option<Member>, StoreError> {
        self.skip_rest()?;
        self.current.clear();
        let mut long_name: Option<Vec<u8>> = None;
        let mut pax_path: Option<Vec<u8>> = None;
        let mut pax_size: Option<u64> = None;
        let mut pax_seen = false;
        loop {
            let mut block = [0u8; BLOCK];
            if !self.block(&mut block)? {
                return Err(self.refuse("", "the archive has no end-of-archive marker (truncated)"));
            }
            if block.iter().all(|b| *b == 0) {
                if long_name.is_some() || pax_seen {
                    return Err(self.refuse("", "an extension header describes no entry"));
                }
                self.trailer()?;
                return Ok(None);
            }
            let h = Header::from_byte_slice(&block);
            let sum: u32 =
                block[..148].iter().chain(&block[156..]).map(|b| u32::from(*b)).sum::<u32>() + 8 * 32;
            if h.cksum().ok() != Some(sum) {
                return Err(
                    self.refuse("", "a header checksum does not match (not a tar archive, or damaged)")
                );
            }
            let raw_path =
                pax_path.clone().or_else(|| long_name.clone()).unwrap_or_else(|| h.path_bytes().into_owned());
            let shown_path = shown(&raw_path);
            let size = match pax_size {
                Some(s) => s,
                None => {
                    h.entry_size().map_err(|_| self.refuse(&shown_path, "its size field is malformed"))?
                }
            };
            let kind = match h.entry_type() {
                EntryType::GNULongName => {
                    if long_name.is_some() {
                        return Err(self.refuse(&shown_path, "two long names for one entry"));
                    }
                    if size > MAX_LONG_NAME {
                        return Err(self.refuse(&shown_path, format!("a long name of {size} bytes")));
                    }
                    let mut name = self.read_small(size)?;
                    while name.last() == Some(&0) {
                        name.pop();
                    }
                    long_name = Some(name);
                    continue;
                }
                EntryType::XHeader => {
                    if pax_seen {
                        return Err(self.refuse(&shown_path, "two PAX headers for one entry"));
                    }
                    if size > MAX_PAX {
                        return Err(self.refuse(&shown_path, format!("a PAX header of {size} bytes")));
                    }
                    pax_seen = true;
                    let data = self.read_small(size)?;
                    (pax_path, pax_size) = self.pax(&data)?;
                    continue;
                }
                EntryType::Regular => Kind::File,
                EntryType::Directory => Kind::Dir,
                other => {
                    let what = match other {
                        EntryType::Symlink => "a symbolic link",
                        EntryType::Link => "a hard link",
                        EntryType::Char => "a character device",
                        EntryType::Block => "a block device",
                        EntryType::Fifo => "a FIFO",
                        EntryType::GNUSparse => "a sparse file",
                        EntryType::XGlobalHeader => "a global PAX header",
                        EntryType::GNULongLink => "a long link name",
                        _ => "of an unknown type",
                    };
                    return Err(self.refuse(
                        &shown_path,
                        format!("it is {what}: only regular files and directories are accepted"),
                    ));
                }
            };
            let mode = h.mode().map_err(|_| self.refuse(&shown_path, "its mode field is malformed"))?;
            if mode & 0o6000 != 0 {
                return Err(
                    self.refuse(&shown_path, format!("it has the setuid or setgid bit (mode {mode:o})"))
                );
            }
            if kind == Kind::Dir && size != 0 {
                return Err(self.refuse(&shown_path, "a directory with content"));
            }
            let path =
                normalize(&raw_path, kind == Kind::Dir).map_err(|why| self.refuse(&shown_path, why))?;
            self.members += 1;
            if self.members > MAX_ARCHIVE_ENTRIES {
                return Err(self.refuse(
                    &shown_path,
                    format!("the archive has more than {MAX_ARCHIVE_ENTRIES} entries"),
                ));
            }
            if size > MAX_ARCHIVE_ENTRY {
                return Err(self.refuse(
                    &shown_path,
                    format!("it claims {size} bytes, over the {MAX_ARCHIVE_ENTRY} byte cap"),
                ));
            }
            self.total = self.total.saturating_add(size);
            if self.total > MAX_ARCHIVE_TOTAL {
                return Err(
                    self.refuse(&shown_path, format!("the archive holds over {MAX_ARCHIVE_TOTAL} bytes"))
                );
            }
            self.current = shown_path;
            self.remaining = size;
            self.pad = padding(size);
            return Ok(Some(Member { path, kind, size }));
        }
    }

    /// The `path` and `size` of a PAX header; refuses what could make this reader and others
    /// see different archives (sparse maps).
    #[allow(clippy::type_complexity)]
    fn pax(&self, data: &[u8]) -> Result<(Option<Vec<u8>>, Option<u64>), StoreError> {
        let mut path = None;
        let mut size = None;
        for ext in PaxExtensions::new(data) {
            let ext = ext.map_err(|_| self.refuse("", "a malformed PAX header"))?;
            let key = ext.key().map_err(|_| self.refuse("", "a PAX key is not UTF-8"))?;
            match key {
                "path" => path = Some(ext.value_bytes().to_vec()),
                "size" => {
                    let v = ext.value().ok().and_then(|v| v.parse::<u64>().ok());
                    size = Some(v.ok_or_else(|| self.refuse("", "a malformed PAX size"))?);
                }
                k if k.starts_with("GNU.sparse") => {
                    return Err(self.refuse("", "a sparse file (PAX): only regular files are accepted"))
                }
                _ => {}
            }
        }
        Ok((path, size))
    }

    /// After the end-of-archive marker: only zeros, and not too many.
    fn trailer(&mut self) -> Result<(), StoreError> {
        let mut rest = Vec::new();
        (&mut self.inner).take(MAX_TRAILER + 1).read_to_end(&mut rest).map_err(|e| self.read_err(e))?;
        if rest.len() as u64 > MAX_TRAILER || rest.iter().any(|b| *b != 0) {
            return Err(self.refuse("", "data after the end-of-archive marker"));
        }
        Ok(())
    }
}

impl<R: Read> Read for TarIn<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let n = usize::try_from(self.remaining).map_or(buf.len(), |r| r.min(buf.len()));
        let got = self.inner.read(&mut buf[..n])?;
        if got == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "truncated entry"));
        }
        self.remaining -= got as u64;
        Ok(got)
    }
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// A member's path, made relative and plain, or why not.
fn normalize(raw: &[u8], dir: bool) -> Result<String, String> {
    let s = std::str::from_utf8(raw).map_err(|_| "its path is not UTF-8".to_owned())?;
    if s.is_empty() {
        return Err("its path is empty".into());
    }
    if s.chars().any(char::is_control) {
        return Err("its path contains control characters".into());
    }
    if s.starts_with('/') {
        return Err("its path is absolute".into());
    }
    let s = s.strip_prefix("./").unwrap_or(s);
    let s = if dir { s.strip_suffix('/').unwrap_or(s) } else { s };
    if dir && (s.is_empty() || s == ".") {
        return Ok(String::new());
    }
    for part in s.split('/') {
        match part {
            "" => return Err("its path has an empty component".into()),
            "." => return Err("its path has a '.' component".into()),
            ".." => return Err("its path has a '..' component".into()),
            _ => {}
        }
    }
    Ok(s.to_owned())
}

/// A hostile path, printable and short.
fn shown(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).chars().take(120).flat_map(char::escape_debug).collect()
}

fn refused(label: &str, entry: &str, detail: impl Into<String>) -> StoreError {
    let file = if entry.is_empty() { label.to_owned() } else { format!("{label} entry \"{entry}\"") };
    StoreError::Tampered { file, detail: detail.into() }
}

fn no_key(name: &str, detail: String) -> StoreError {
    StoreError::NoKey { name: name.to_owned(), detail }
}

/// The archive, decompressed if it is zstd, from its start.
/// The archive's members' bytes, decompressed; the file's bytes read are reported to `progress`.
fn open_stream<'f>(
    file: &'f File,
    label: &str,
    path: &Path,
    progress: &'f dyn Progress,
) -> Result<Box<dyn Read + 'f>, StoreError> {
    let mut magic = [0u8; 4];
    let n = file.read_at(&mut magic, 0).map_err(io_err("cannot read", path))?;
    let mut f = file;
    f.seek(SeekFrom::Start(0)).map_err(io_err("cannot read", path))?;
    if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        return Err(refused(
            label,
            "",
            "gzip-compressed archives are not supported: gunzip it first (zstd and none are)",
        ));
    }
    let f = Counted::new(f, progress);
    if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
        let d = zstd::stream::read::Decoder::new(f).map_err(io_err("cannot decompress", path))?;
        return Ok(Box::new(d));
    }
    Ok(Box::new(BufReader::with_capacity(COPY_BUF, f)))
}

// ---------------------------------------------------------------------------------------------
// Import

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FerryFile {
    Version,
    Manifest,
    Slots,
    Index,
    Pack,
}

/// Where a member belongs.
#[derive(Debug)]
enum Place {
    Dir,
    /// An image file (CRIU's under `checkpoint/`, a container's root file system changes at
    /// the top, ferry's own `*.json` under `ferry/`), by its name in the checkpoint.
    Image(String),
    Ferry(FerryFile),
    /// Container metadata kept for the hook (`config.dump`, `spec.dump`, `network.status`).
    Metadata(String),
    /// Podman's and CRI-O's logs and statistics: checked, then left out.
    Skipped,
}

/// What an import accepts beyond ferry's own layout.
#[derive(Debug, Clone, Copy)]
struct Rules {
    /// Root file system changes (a hook checks them).
    rootfs: bool,
}

fn place(label: &str, m: &Member, rules: Rules) -> Result<Place, StoreError> {
    let refuse = |why: String| refused(label, &m.path, why);
    let parts: Vec<&str> = m.path.split('/').collect();
    let (place, cap) = match (m.kind, parts.as_slice()) {
        (Kind::Dir, [""] | ["checkpoint"] | ["ferry"] | ["artifacts"]) => (Place::Dir, 0),
        (Kind::Dir, ["volumes"]) | (Kind::File, ["volumes", ..]) => {
            return Err(refuse(
                "the archive carries the content of volumes, which ferry does not import \
                 (checkpoint with podman's --ignore-volumes)"
                    .into(),
            ))
        }
        (Kind::Dir, _) => return Err(refuse("a directory this layout does not have".into())),
        (Kind::File, ["checkpoint", image]) => {
            if image.len() > 255 {
                return Err(refuse("an image name longer than 255 bytes".into()));
            }
            (Place::Image((*image).to_owned()), MAX_ARCHIVE_ENTRY)
        }
        (Kind::File, ["ferry", f]) => match *f {
            "VERSION" => (Place::Ferry(FerryFile::Version), MAX_VERSION_FILE),
            "manifest.fmf" => (Place::Ferry(FerryFile::Manifest), MAX_MANIFEST_FILE as u64),
            "slots" => (Place::Ferry(FerryFile::Slots), MAX_SLOTS_FILE as u64),
            "chunks.idx" => (Place::Ferry(FerryFile::Index), MAX_IDX_FILE),
            "chunks.pack" => (Place::Ferry(FerryFile::Pack), MAX_ARCHIVE_ENTRY),
            own if own.ends_with(".json") && own.len() <= 255 => (Place::Image(own.to_owned()), MAX_OWN_FILE),
            _ => return Err(refuse("a file ferry does not know in ferry/".into())),
        },
        (Kind::File, [top]) if METADATA_FILES.contains(top) => {
            (Place::Metadata((*top).to_owned()), MAX_METADATA_FILE)
        }
        (Kind::File, [top]) if SKIPPED_TOP.contains(top) => (Place::Skipped, MAX_ARCHIVE_ENTRY),
        (Kind::File, ["artifacts", _]) => (Place::Skipped, MAX_METADATA_FILE),
        (Kind::File, [top]) if TOP_IMAGES.contains(top) => {
            if !rules.rootfs {
                return Err(refuse(
                    "changes to a container's root file system need a container-aware import \
                     (export with --ignore-rootfs)"
                        .into(),
                ));
            }
            let cap = if *top == "deleted.files" { MAX_DELETED_FILE } else { MAX_ARCHIVE_ENTRY };
            (Place::Image((*top).to_owned()), cap)
        }
        (Kind::File, _) => return Err(refuse("a file where this layout has none".into())),
    };
    if m.size > cap {
        return Err(refuse(format!("{} bytes, over the {cap} byte cap for it", m.size)));
    }
    Ok(place)
}

/// What the first pass found.
#[derive(Debug, Default)]
struct Scan {
    /// Every member, in order, as (path, size): the second pass must see the same.
    members: Vec<(String, u64)>,
    version: Option<Vec<u8>>,
    manifest: Option<Vec<u8>>,
    slots: Option<Vec<u8>>,
    idx: Option<Vec<u8>>,
    pack: Option<u64>,
    /// Image files by their name in the checkpoint, and sizes.
    images: Vec<(String, u64)>,
    /// Container metadata for the hook.
    metadata: BTreeMap<String, Vec<u8>>,
    /// Bytes of Podman's `devshm-checkpoint.tar` (the container's `/dev/shm`), left out.
    devshm: u64,
}

impl Scan {
    fn encrypted(&self) -> bool {
        self.slots.is_some() || self.idx.is_some() || self.pack.is_some()
    }
}

fn scan<R: Read>(tar: &mut TarIn<'_, R>, rules: Rules) -> Result<Scan, StoreError> {
    let label = tar.label;
    let mut s = Scan::default();
    let mut seen = HashSet::new();
    let mut image_names = HashSet::new();
    while let Some(m) = tar.next()? {
        if !seen.insert(m.path.clone()) {
            return Err(refused(label, &m.path, "it appears twice"));
        }
        match place(label, &m, rules)? {
            Place::Dir => {}
            Place::Skipped => {
                if m.path == "devshm-checkpoint.tar" {
                    s.devshm = m.size;
                }
            }
            Place::Image(name) => {
                if !image_names.insert(name.clone()) {
                    return Err(refused(label, &m.path, format!("a second image named {name}")));
                }
                s.images.push((name, m.size));
            }
            Place::Ferry(FerryFile::Pack) => s.pack = Some(m.size),
            Place::Metadata(name) => {
                let data = read_member(tar, &m)?;
                s.metadata.insert(name, data);
            }
            Place::Ferry(f) => {
                let data = read_member(tar, &m)?;
                let slot = match f {
                    FerryFile::Version => &mut s.version,
                    FerryFile::Manifest => &mut s.manifest,
                    FerryFile::Slots => &mut s.slots,
                    // (The pack is streamed by the second pass, never held.)
                    FerryFile::Index | FerryFile::Pack => &mut s.idx,
                };
                *slot = Some(data);
            }
        }
        s.members.push((m.path, m.size));
    }
    if let Some(v) = &s.version {
        if v != FORMAT && v != &FORMAT[..1] {
            return Err(refused(
                label,
                "ferry/VERSION",
                format!("archive format {:?} is not supported (this ferry reads 1)", shown(v)),
            ));
        }
    }
    if s.encrypted() {
        if !s.images.is_empty() {
            return Err(refused(label, "checkpoint", "plaintext images beside an encrypted checkpoint"));
        }
        for (have, what) in [
            (s.version.is_some(), "ferry/VERSION"),
            (s.manifest.is_some(), "ferry/manifest.fmf"),
            (s.slots.is_some(), "ferry/slots"),
            (s.idx.is_some(), "ferry/chunks.idx"),
            (s.pack.is_some(), "ferry/chunks.pack"),
        ] {
            if !have {
                return Err(refused(label, what, "missing from an encrypted archive"));
            }
        }
    } else {
        if s.images.is_empty() {
            return Err(refused(label, "checkpoint", "the archive holds no checkpoint images"));
        }
        if s.images.len() > MAX_FILES {
            return Err(refused(label, "checkpoint", format!("more than {MAX_FILES} images")));
        }
    }
    Ok(s)
}

/// The data of the current member (capped by [`place`] before the call).
fn read_member<R: Read>(tar: &mut TarIn<'_, R>, m: &Member) -> Result<Vec<u8>, StoreError> {
    // Grown as data arrives: a truncated archive cannot make it allocate its claim.
    let mut data = Vec::with_capacity(usize::try_from(m.size.min(1 << 20)).unwrap_or(0));
    tar.read_to_end(&mut data).map_err(|e| tar.read_err(e))?;
    Ok(data)
}

/// The archive being imported, and what its first pass found.
struct Source<'a> {
    file: &'a File,
    label: &'a str,
    path: &'a Path,
    scan: &'a Scan,
    rules: Rules,
    progress: &'a dyn Progress,
}

impl Source<'_> {
    /// The second pass: calls `each` on every member whose data it wants, after checking that
    /// the archive still holds what the first pass saw.
    fn replay(
        &self,
        mut each: impl FnMut(&mut TarIn<'_, Box<dyn Read + '_>>, &Member, &Place) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let size = self.file.metadata().map_err(io_err("cannot stat", self.path))?.len();
        self.progress.stage("import", Some(size));
        let mut tar = TarIn::new(open_stream(self.file, self.label, self.path, self.progress)?, self.label);
        let mut i = 0;
        while let Some(m) = tar.next()? {
            if self.scan.members.get(i) != Some(&(m.path.clone(), m.size)) {
                return Err(refused(self.label, &m.path, "the archive changed while it was read"));
            }
            i += 1;
            let place = place(self.label, &m, self.rules)?;
            each(&mut tar, &m, &place)?;
        }
        if i != self.scan.members.len() {
            return Err(refused(self.label, "", "the archive changed while it was read"));
        }
        Ok(())
    }

    fn refuse(&self, entry: &str, detail: impl Into<String>) -> StoreError {
        refused(self.label, entry, detail)
    }
}

/// Where one chunk's plaintext goes.
struct Target {
    file: usize,
    offset: u64,
    len: u32,
}

fn import_sealed(store: &Store, src: &Source<'_>, name: Option<&str>) -> Result<Committed, StoreError> {
    let s = src.scan;
    let (Some(manifest), Some(slots), Some(idx), Some(pack_size)) = (&s.manifest, &s.slots, &s.idx, s.pack)
    else {
        return Err(src.refuse("ferry", "incomplete encrypted archive"));
    };
    let (m, _signer) = decode_verified(manifest, &store.trusted()?)
        .map_err(|e| src.refuse("ferry/manifest.fmf", e.to_string()))?;
    let name = name.unwrap_or(&m.name).to_owned();
    crate::validate_name(&name)?;

    let slots = Slots::decode(slots).map_err(|e| src.refuse("ferry/slots", e.to_string()))?;
    let ring: KeyRing = slots.open_all(store.keys().x25519_secret()).map_err(|e| {
        no_key(
            &name,
            format!("this node cannot open the archive's key slots (was it exported for this node?): {e}"),
        )
    })?;
    for k in &m.key_ids {
        if ring.get(k).is_none() {
            return Err(no_key(&name, format!("the archive has no slot for data key {}", hex(k))));
        }
    }

    // Every chunk the manifest references, and where its plaintext goes.
    let mut refs: HashMap<ChunkId, Vec<Target>> = HashMap::new();
    let mut logical = 0u64;
    for (fi, f) in m.files.iter().enumerate() {
        logical = logical.saturating_add(f.size);
        let mut offset = 0u64;
        for e in &f.extents {
            if let Extent::Chunk { id, len } = e {
                refs.entry(*id).or_default().push(Target { file: fi, offset, len: *len });
            }
            offset += e.len();
        }
    }
    if logical > MAX_ARCHIVE_TOTAL {
        return Err(src.refuse("ferry/manifest.fmf", format!("its images total {logical} bytes")));
    }
    let mut entries = decode_idx(idx).map_err(|e| src.refuse("ferry/chunks.idx", e))?;
    entries.sort_by_key(|e| e.offset);
    let mut expected = 0u64;
    let mut listed = HashSet::with_capacity(entries.len());
    for e in &entries {
        let bad = |why: &str| src.refuse("ferry/chunks.idx", format!("chunk {}: {why}", hex(&e.id[..8])));
        if !listed.insert(e.id) {
            return Err(bad("listed twice"));
        }
        if !refs.contains_key(&e.id) {
            return Err(bad("the manifest does not use it"));
        }
        if !m.key_ids.contains(&e.key) {
            return Err(bad("sealed under a key the manifest does not list"));
        }
        if e.offset != expected || e.len > MAX_FRAME {
            return Err(bad("the pack is not a sequence of whole frames"));
        }
        expected += u64::from(e.len);
    }
    if expected != pack_size {
        return Err(
            src.refuse("ferry/chunks.pack", format!("{pack_size} bytes, the index covers {expected}"))
        );
    }
    if let Some(missing) = refs.keys().find(|id| !listed.contains(*id)) {
        return Err(src
            .refuse("ferry/chunks.idx", format!("chunk {} of the manifest is missing", hex(&missing[..8]))));
    }

    let pending = store.begin(&name)?;
    let files = create_images(&pending, &m)?;
    let mut opener = Opener::new(&ring, store.keys().hash_key());
    let mut frame = Vec::new();
    src.replay(|tar, _m, place| {
        if !matches!(place, Place::Ferry(FerryFile::Pack)) {
            return Ok(());
        }
        for e in &entries {
            frame.resize(e.len as usize, 0);
            tar.read_exact(&mut frame).map_err(|err| tar.read_err(err))?;
            let plain = opener.open(&e.id, &frame).map_err(|err| {
                let hint = if matches!(err, SealError::HashMismatch) {
                    " (the sending node has another hash key? nodes that migrate to each other share it)"
                } else {
                    ""
                };
                src.refuse("ferry/chunks.pack", format!("chunk {}: {err}{hint}", hex(&e.id[..8])))
            })?;
            for t in refs.get(&e.id).map(Vec::as_slice).unwrap_or_default() {
                if plain.len() != t.len as usize {
                    return Err(src.refuse(
                        "ferry/chunks.pack",
                        format!(
                            "chunk {} has {} bytes, the manifest says {}",
                            hex(&e.id[..8]),
                            plain.len(),
                            t.len
                        ),
                    ));
                }
                let (file, path) = &files[t.file];
                file.write_all_at(&plain, t.offset).map_err(io_err("cannot write", path))?;
            }
        }
        Ok(())
    })?;
    drop(files);
    commit(store, pending, info_from(&m))
}

/// The manifest's files, empty and sized (zero extents stay holes), in the images dir.
fn create_images(pending: &Pending, m: &ManifestBody) -> Result<Vec<(File, PathBuf)>, StoreError> {
    let dir = pending.images_dir();
    let mut out = Vec::with_capacity(m.files.len());
    for f in &m.files {
        let path = dir.join(&f.name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("cannot create", &path))?;
        file.set_len(f.size).map_err(io_err("cannot size", &path))?;
        out.push((file, path));
    }
    Ok(out)
}

fn import_plain(
    store: &Store,
    src: &Source<'_>,
    name: Option<&str>,
    hook: Option<&dyn ImportHook>,
) -> Result<Committed, StoreError> {
    let s = src.scan;
    let manifest = match &s.manifest {
        Some(bytes) => match decode_verified(bytes, &store.trusted()?) {
            Ok((m, _)) => Some(m),
            Err(e) => {
                tracing::warn!(archive = %src.label, "the archive's ferry manifest does not verify ({e})");
                None
            }
        },
        None => None,
    };
    // (An empty directory's tar is 1536 bytes.)
    if s.devshm > 1536 {
        tracing::warn!(archive = %src.label, bytes = s.devshm, "devshm-checkpoint.tar is not imported: the container's /dev/shm starts empty");
    }
    let meta = ArchiveMeta {
        archive: src.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        files: s.metadata.clone(),
    };
    if manifest.is_none() && s.metadata.is_empty() {
        tracing::warn!(archive = %src.label, "importing the images with default metadata");
    }
    let name = match (name, &manifest) {
        (Some(n), _) => n.to_owned(),
        (None, Some(m)) => m.name.clone(),
        (None, None) => hook.and_then(|h| h.default_name(&meta)).ok_or(StoreError::InvalidName {
            name: String::new(),
            why: "the archive carries no verified ferry manifest to take a name from: give one",
        })?,
    };
    crate::validate_name(&name)?;
    if let Some(m) = &manifest {
        // A verified manifest names exactly these images, with these sizes.
        let mut want: Vec<(&str, u64)> = m.files.iter().map(|f| (f.name.as_str(), f.size)).collect();
        let mut have: Vec<(&str, u64)> = s.images.iter().map(|(n, z)| (n.as_str(), *z)).collect();
        want.sort_unstable();
        have.sort_unstable();
        if want != have {
            return Err(src.refuse("checkpoint", "the images are not the ones its signed manifest lists"));
        }
    }

    let pending = store.begin(&name)?;
    let dir = pending.images_dir();
    let mut buf = vec![0u8; COPY_BUF];
    src.replay(|tar, m, place| {
        let Place::Image(image) = place else { return Ok(()) };
        let path = dir.join(image);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("cannot create", &path))?;
        let mut copied = 0u64;
        loop {
            let n = tar.read(&mut buf).map_err(|e| tar.read_err(e))?;
            if n == 0 {
                break;
            }
            file.write_all(&buf[..n]).map_err(io_err("cannot write", &path))?;
            copied += n as u64;
        }
        if copied != m.size {
            return Err(src.refuse(&m.path, "the archive ends inside this entry (truncated)"));
        }
        Ok(())
    })?;
    let mut info = match &manifest {
        Some(m) => {
            check_against(store, src, &dir, m)?;
            info_from(m)
        }
        None => CheckpointInfo { source: format!("archive:{}", meta.archive), ..CheckpointInfo::default() },
    };
    if let Some(h) = hook {
        let origin = h.finish(&dir, &meta, manifest.is_some()).map_err(|e| src.refuse(&e.entry, e.detail))?;
        if let (Some(o), None) = (origin, &manifest) {
            info.source = o.source;
            info.spec = o.spec;
        }
    }
    commit(store, pending, info)
}

/// The images in `dir` are those `m` describes: every chunk hashes to its id (keyed with this
/// store's hash key), every zero extent is zeros.
fn check_against(store: &Store, src: &Source<'_>, dir: &Path, m: &ManifestBody) -> Result<(), StoreError> {
    let mut buf = Vec::new();
    for f in &m.files {
        let path = dir.join(&f.name);
        let mut file =
            BufReader::with_capacity(COPY_BUF, File::open(&path).map_err(io_err("cannot open", &path))?);
        let entry = format!("checkpoint/{}", f.name);
        let mut offset = 0u64;
        for e in &f.extents {
            let ok = match e {
                Extent::Chunk { id, len } => {
                    buf.resize(*len as usize, 0);
                    file.read_exact(&mut buf).map_err(io_err("cannot read", &path))?;
                    store.keys().chunk_id(&buf) == *id
                }
                Extent::Zero { len } => {
                    buf.resize(COPY_BUF, 0);
                    let mut left = *len;
                    let mut zero = true;
                    while left > 0 && zero {
                        let n = usize::try_from(left).map_or(COPY_BUF, |l| l.min(COPY_BUF));
                        file.read_exact(&mut buf[..n]).map_err(io_err("cannot read", &path))?;
                        zero = buf[..n].iter().all(|b| *b == 0);
                        left -= n as u64;
                    }
                    zero
                }
            };
            if !ok {
                return Err(src.refuse(
                    &entry,
                    format!(
                        "at offset {offset} it differs from what its signed manifest says \
                         (or the signing node has another hash key)"
                    ),
                ));
            }
            offset += e.len();
        }
    }
    Ok(())
}

fn info_from(m: &ManifestBody) -> CheckpointInfo {
    CheckpointInfo {
        source: m.source.clone(),
        host: m.host.clone(),
        spec: m.spec.clone(),
        tcp_established: m.tcp_established,
        leave_running: m.leave_running,
        network_lock_tables: m.network_lock_tables.clone(),
        dump_seconds: m.dump_seconds,
    }
}

/// Seals the images now complete in `pending` and commits them.
fn commit(store: &Store, pending: Pending, info: CheckpointInfo) -> Result<Committed, StoreError> {
    let pipeline = pending.start_ingest(store)?;
    pending.commit(store, info, pipeline)
}

/// The first pass of [`import`] over archive bytes held in memory: every header, path, type,
/// size and the ferry files' placement checked, nothing written. For fuzzing the tar reader.
pub fn check_archive(data: &[u8]) -> Result<(), StoreError> {
    let mut tar = TarIn::new(data, "fuzz input");
    scan(&mut tar, Rules { rootfs: true }).map(drop)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing test should stop right there
mod tests {
    use super::*;
    use crate::testutil::{checkpoint, materialized, peer_store, random};
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;
    use tempfile::TempDir;

    struct Fixture {
        dir: TempDir,
        store: Store,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path().join("store")).unwrap();
            Fixture { dir, store }
        }

        /// A store whose node shares `other`'s hash key and trusts it.
        fn peer_of(other: &Store) -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let store = peer_store(&dir.path().join("store"), other);
            Fixture { dir, store }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        /// Nothing listed, no plaintext mount, nothing left in tmp/, no new packs.
        fn assert_untouched(&self, packs_before: usize) {
            let (good, bad) = self.store.list().unwrap();
            assert!(good.is_empty() && bad.is_empty(), "listed: {good:?} {bad:?}");
            let root = self.store.root().to_string_lossy().into_owned();
            let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
            assert!(
                !mounts.lines().filter_map(|l| l.split_whitespace().nth(4)).any(|p| p.starts_with(&root)),
                "a mount is left under the store"
            );
            assert_eq!(fs::read_dir(self.store.root().join("tmp")).unwrap().count(), 0);
            assert_eq!(count(&self.store.root().join("packs")), packs_before);
            assert!(!self.dir.path().join("evil").exists());
            assert!(!self.store.root().join("evil").exists());
        }
    }

    fn count(dir: &Path) -> usize {
        fs::read_dir(dir).unwrap().count()
    }

    fn images() -> Vec<(&'static str, Vec<u8>)> {
        let mut pages = Vec::new();
        pages.extend(random(3 * 4096, 1));
        pages.extend(vec![0u8; 8192]); // zero pages
        pages.extend(random(4096, 2));
        pages.extend(random(4096, 2)); // a repeated page
        pages.extend(vec![7u8; 4096]); // compressible
        vec![
            ("pages-1.img", pages),
            ("core-1.img", random(700, 3)),
            ("inventory.img", b"inventory".to_vec()),
            ("files.img", random(3 << 20, 4)), // several pieces
            ("empty.img", Vec::new()),
        ]
    }

    fn expected() -> BTreeMap<String, Vec<u8>> {
        images().into_iter().map(|(n, d)| (n.to_owned(), d)).collect()
    }

    /// (path, type, size, mode) of every entry, as any tar reader sees them.
    fn listing(path: &Path) -> Vec<(String, EntryType, u64, u32)> {
        let mut a = tar::Archive::new(File::open(path).unwrap());
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    String::from_utf8(e.path_bytes().into_owned()).unwrap(),
                    h.entry_type(),
                    e.size(),
                    h.mode().unwrap(),
                )
            })
            .collect()
    }

    fn entry_data(path: &Path, name: &str) -> Vec<u8> {
        let mut a = tar::Archive::new(File::open(path).unwrap());
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            if e.path_bytes().as_ref() == name.as_bytes() {
                let mut v = Vec::new();
                e.read_to_end(&mut v).unwrap();
                return v;
            }
        }
        panic!("no {name}");
    }

    #[test]
    fn export_and_import_report_every_byte_against_the_total_they_announce() {
        use crate::progress::Tally;
        let f = Fixture::new();
        checkpoint(&f.store, "web", &images());
        let b = Fixture::peer_of(&f.store);
        let peer = b.store.keys().public().x25519;
        for (mode, file) in [
            (ExportMode::Encrypted { recipients: vec![peer] }, "web.tar"),
            (ExportMode::Plaintext, "plain.tar"),
        ] {
            let out = f.path(file);
            let tally = Tally::default();
            export_with(&f.store, "web", &out, mode, &PlainImages, &tally).unwrap();
            let stages = tally.stages();
            assert_eq!(stages.len(), 1, "{stages:?}");
            let (label, total, done) = &stages[0];
            assert_eq!(label, "export");
            assert_eq!(Some(*done), *total, "{file}: the bar ends full");
            assert!(*done > 0);

            // Import reads the file twice (check, then import): each pass counts it whole.
            let tally = Tally::default();
            import_with(&b.store, &out, Some(&format!("in-{file}")), &NoHook, &tally).unwrap();
            let size = fs::metadata(&out).unwrap().len();
            let want = vec![("check".to_owned(), Some(size), size), ("import".to_owned(), Some(size), size)];
            assert_eq!(tally.stages(), want, "{file}");
        }
    }

    /// Accepts an archive as it is.
    struct NoHook;

    impl ImportHook for NoHook {
        fn default_name(&self, _meta: &ArchiveMeta) -> Option<String> {
            None
        }

        fn finish(&self, _: &Path, _: &ArchiveMeta, _: bool) -> Result<Option<Origin>, HookError> {
            Ok(None)
        }
    }

    #[test]
    fn encrypted_round_trip_in_one_store() {
        let f = Fixture::new();
        let c = checkpoint(&f.store, "web", &images());
        let out = f.path("web.tar");
        let own = f.store.keys().public().x25519;
        let r = export(&f.store, "web", &out, ExportMode::Encrypted { recipients: vec![own, own] }).unwrap();
        assert_eq!(r.mode, "encrypted");
        assert_eq!(r.files, 5);
        assert_eq!(r.bytes, fs::metadata(&out).unwrap().len());
        assert_eq!(fs::metadata(&out).unwrap().permissions().mode() & 0o7777, 0o600);
        assert_eq!(count(f.dir.path()), 2, "the temporary file is gone");

        let names: Vec<_> = listing(&out).into_iter().map(|(p, t, _, _)| (p, t)).collect();
        assert_eq!(
            names,
            [
                ("ferry/".to_owned(), EntryType::Directory),
                ("ferry/VERSION".to_owned(), EntryType::Regular),
                ("ferry/manifest.fmf".to_owned(), EntryType::Regular),
                ("ferry/slots".to_owned(), EntryType::Regular),
                ("ferry/chunks.idx".to_owned(), EntryType::Regular),
                ("ferry/chunks.pack".to_owned(), EntryType::Regular),
            ]
        );
        assert_eq!(entry_data(&out, "ferry/manifest.fmf"), fs::read(f.store.manifest_path("web")).unwrap());
        assert_eq!(entry_data(&out, "ferry/VERSION"), b"1\n");
        // No plaintext: no sample of the (incompressible) images appears in the archive.
        let raw = fs::read(&out).unwrap();
        let all = images();
        let samples = [
            &all[0].1[100..164],
            &all[0].1[5 * 4096..5 * 4096 + 64],
            &all[1].1[..64],
            &all[3].1[(2 << 20)..(2 << 20) + 64],
        ];
        for s in samples {
            assert!(!raw.windows(64).any(|w| w == s), "plaintext in the encrypted archive");
        }
        let slots = Slots::decode(&entry_data(&out, "ferry/slots")).unwrap();
        assert_eq!(slots.entries.len(), c.checkpoint.manifest.key_ids.len());
        assert_eq!(slots.entries[0].1.len(), 1, "recipients deduplicated");

        let imported = import(&f.store, &out, Some("web-copy")).unwrap();
        assert_eq!(imported.checkpoint.manifest.name, "web-copy");
        assert_eq!(imported.checkpoint.manifest.source, "pid:4242");
        assert_eq!(imported.checkpoint.manifest.host.hostname, "node-a");
        assert_eq!(materialized(&f.store, "web-copy"), expected());
        assert_eq!(materialized(&f.store, "web"), expected());
        // The name is taken now.
        assert!(matches!(import(&f.store, &out, None), Err(StoreError::Exists(n)) if n == "web"));
        assert!(matches!(import(&f.store, &out, Some("web-copy")), Err(StoreError::Exists(_))));
    }

    #[test]
    fn encrypted_archive_moves_between_nodes_and_only_to_its_recipients() {
        let a = Fixture::new();
        let b = Fixture::peer_of(&a.store);
        checkpoint(&a.store, "job", &images());
        let out = a.path("job.tar");
        let bx = b.store.keys().public().x25519;
        export(&a.store, "job", &out, ExportMode::Encrypted { recipients: vec![bx] }).unwrap();

        // A made it for B only: A cannot open it.
        let packs = count(&a.store.root().join("packs"));
        assert!(matches!(import(&a.store, &out, Some("again")), Err(StoreError::NoKey { .. })));
        assert_eq!(count(&a.store.root().join("packs")), packs);

        // A node that does not trust A refuses the manifest.
        let c = Fixture::new();
        let err = import(&c.store, &out, None).unwrap_err();
        assert!(
            matches!(&err, StoreError::Tampered { detail, .. } if detail.contains("not a trusted key")),
            "{err}"
        );
        c.assert_untouched(0);

        let got = import(&b.store, &out, None).unwrap();
        let m = &got.checkpoint.manifest;
        assert_eq!(m.name, "job");
        assert_eq!(got.checkpoint.signer, b.store.keys().public().ed25519);
        assert_eq!(m.key_ids.len(), 1, "re-sealed under one fresh local key");
        assert_eq!(materialized(&b.store, "job"), expected());
        b.store.get("job").unwrap().verify(&b.store).unwrap();
    }

    #[test]
    fn plaintext_round_trip_and_layout() {
        let f = Fixture::new();
        let mut files = images();
        files.push(("stats-dump", random(60, 9)));
        checkpoint(&f.store, "db", &files);
        let out = f.path("db.tar");
        let r = export(&f.store, "db", &out, ExportMode::Plaintext).unwrap();
        assert_eq!((r.mode, r.files), ("plaintext", 6));
        let l = listing(&out);
        let names: Vec<_> = l.iter().map(|(p, _, _, _)| p.as_str()).collect();
        assert_eq!(
            names,
            [
                "ferry/",
                "ferry/VERSION",
                "ferry/manifest.fmf",
                "checkpoint/",
                "checkpoint/core-1.img",
                "checkpoint/empty.img",
                "checkpoint/files.img",
                "checkpoint/inventory.img",
                "checkpoint/pages-1.img",
                "checkpoint/stats-dump",
                "stats-dump",
            ]
        );
        assert!(l.iter().all(|(_, t, _, m)| *m == if *t == EntryType::Directory { 0o700 } else { 0o600 }));
        assert_eq!(entry_data(&out, "checkpoint/pages-1.img"), images()[0].1);
        assert_eq!(entry_data(&out, "stats-dump"), random(60, 9));

        let got = import(&f.store, &out, Some("db2")).unwrap();
        assert_eq!(got.checkpoint.manifest.source, "pid:4242");
        let mut want = expected();
        want.insert("stats-dump".into(), random(60, 9));
        assert_eq!(materialized(&f.store, "db2"), want);

        // Without CRIU's stats-dump, an empty one.
        checkpoint(&f.store, "small", &images());
        let out2 = f.path("small.tar");
        export(&f.store, "small", &out2, ExportMode::Plaintext).unwrap();
        assert_eq!(entry_data(&out2, "stats-dump"), b"");
        // Under the manifest's own name, in another store that trusts this node.
        let b = Fixture::peer_of(&f.store);
        let got = import(&b.store, &out2, None).unwrap();
        assert_eq!(got.checkpoint.manifest.name, "small");
        assert_eq!(materialized(&b.store, "small"), expected());
    }

    #[test]
    fn podman_style_archive_without_ferry_manifest() {
        let f = Fixture::new();
        let out = f.path("podman.tar.zst");
        let mut t = Builder::new(Vec::new());
        put(&mut t, "./", EntryType::Directory, 0, 0, io::empty()).unwrap();
        for (p, d) in [
            ("config.dump", &b"{}"[..]),
            ("spec.dump", b"{}"),
            ("network.status", b"[]"),
            ("stats-dump", b"x"),
        ] {
            put(&mut t, p, EntryType::Regular, d.len() as u64, 0, d).unwrap();
        }
        put(&mut t, "checkpoint", EntryType::Directory, 0, 0, io::empty()).unwrap();
        for (n, d) in images() {
            put(&mut t, &format!("checkpoint/{n}"), EntryType::Regular, d.len() as u64, 0, &d[..]).unwrap();
        }
        let bytes = t.into_inner().unwrap();
        fs::write(&out, zstd::encode_all(&bytes[..], 3).unwrap()).unwrap();

        assert!(matches!(import(&f.store, &out, None), Err(StoreError::InvalidName { .. })));
        f.assert_untouched(0);
        let got = import(&f.store, &out, Some("ctr")).unwrap();
        assert_eq!(got.checkpoint.manifest.source, "archive:podman.tar.zst");
        assert_eq!(materialized(&f.store, "ctr"), expected());
    }

    /// A container's checkpoint: CRIU's images, runc's descriptors, ferry's record and the
    /// root file system changes.
    fn container_images() -> Vec<(&'static str, Vec<u8>)> {
        let mut v = images();
        v.push(("descriptors.json", b"[\"/dev/null\"]".to_vec()));
        v.push(("ferry-container.json", b"{\"kind\":\"test\"}".to_vec()));
        v.push(("rootfs-diff.tar", random(10_000, 7)));
        v.push(("deleted.files", b"[\"/etc/motd\"]".to_vec()));
        v
    }

    /// Places like ferry-runtime does for a container; writes two metadata files.
    struct TestLayout;

    impl ExportLayout for TestLayout {
        fn layout(&self, images: &Path, m: &ManifestBody) -> Result<Layout, StoreError> {
            assert!(images.join("ferry-container.json").exists());
            let mut annotations = BTreeMap::new();
            annotations.insert("io.podman.annotations.checkpoint.name".to_owned(), m.name.clone());
            Ok(Layout {
                metadata: vec![
                    ("config.dump".into(), b"{\"id\":\"x\"}".to_vec()),
                    ("spec.dump".into(), b"{}".to_vec()),
                ],
                top: vec!["rootfs-diff.tar".into(), "deleted.files".into()],
                own: vec!["ferry-container.json".into()],
                annotations,
            })
        }
    }

    /// Records what it saw; adds a record when the archive had none (or refuses).
    #[derive(Default)]
    struct TestHook {
        refuse: bool,
        seen: std::cell::RefCell<Vec<(ArchiveMeta, bool)>>,
    }

    impl ImportHook for TestHook {
        fn default_name(&self, meta: &ArchiveMeta) -> Option<String> {
            meta.files.contains_key("config.dump").then(|| "from-config".to_owned())
        }

        fn finish(
            &self,
            images: &Path,
            meta: &ArchiveMeta,
            verified: bool,
        ) -> Result<Option<Origin>, HookError> {
            self.seen.borrow_mut().push((meta.clone(), verified));
            if self.refuse {
                return Err(HookError {
                    entry: "rootfs-diff.tar".into(),
                    detail: "a path leaves the root".into(),
                });
            }
            if !verified && !images.join("ferry-container.json").exists() {
                fs::write(images.join("ferry-container.json"), b"{\"made\":1}").unwrap();
            }
            Ok(Some(Origin { source: "podman:web".into(), spec: "{}".into() }))
        }
    }

    #[test]
    fn a_layout_places_container_files_and_import_puts_them_back() {
        let f = Fixture::new();
        checkpoint(&f.store, "ctr", &container_images());
        let out = f.path("ctr.tar");
        let r = export_with(&f.store, "ctr", &out, ExportMode::Plaintext, &TestLayout, &Silent).unwrap();
        assert_eq!(r.mode, "plaintext");
        let names: Vec<String> = listing(&out).into_iter().map(|(p, _, _, _)| p).collect();
        assert_eq!(
            &names[..5],
            ["ferry/", "ferry/VERSION", "ferry/manifest.fmf", "ferry/ferry-container.json", "config.dump"]
        );
        for top in
            ["spec.dump", "rootfs-diff.tar", "deleted.files", "stats-dump", "checkpoint/descriptors.json"]
        {
            assert!(names.iter().any(|n| n == top), "{top} in {names:?}");
        }
        for gone in
            ["checkpoint/ferry-container.json", "checkpoint/rootfs-diff.tar", "checkpoint/deleted.files"]
        {
            assert!(!names.iter().any(|n| n == gone), "{gone} in {names:?}");
        }
        assert_eq!(entry_data(&out, "config.dump"), b"{\"id\":\"x\"}");

        // Without a container-aware hook, root file system changes are refused.
        let b = Fixture::peer_of(&f.store);
        let err = import(&b.store, &out, None).unwrap_err();
        assert!(err.to_string().contains("root file system"), "{err}");
        b.assert_untouched(0);

        // With one: the verified manifest's images, every one back in place.
        let hook = TestHook::default();
        let got = import_with(&b.store, &out, None, &hook, &Silent).unwrap();
        assert_eq!(got.checkpoint.manifest.name, "ctr");
        assert_eq!(got.checkpoint.manifest.source, "pid:4242", "a verified manifest's source stays");
        let want: BTreeMap<String, Vec<u8>> =
            container_images().into_iter().map(|(n, d)| (n.to_owned(), d)).collect();
        assert_eq!(materialized(&b.store, "ctr"), want);
        let seen = hook.seen.borrow();
        assert!(seen[0].1, "verified");
        assert_eq!(seen[0].0.files.keys().collect::<Vec<_>>(), ["config.dump", "spec.dump"]);
    }

    /// A Podman export (`podman container checkpoint --export`), member for member.
    fn podman_export() -> Vec<u8> {
        let mut t = Builder::new(Vec::new());
        put(&mut t, "artifacts/", EntryType::Directory, 0, 0, io::empty()).unwrap();
        for (p, d) in [
            ("devshm-checkpoint.tar", &[0u8; 1536][..]),
            ("config.dump", b"{\"id\":\"abc\",\"name\":\"web\"}"),
            ("spec.dump", b"{\"ociVersion\":\"1.0.2\"}"),
            ("network.status", b"null"),
            ("stats-dump", b"x"),
            ("ctr.log", b"log"),
        ] {
            put(&mut t, p, EntryType::Regular, d.len() as u64, 0, d).unwrap();
        }
        put(&mut t, "checkpoint/", EntryType::Directory, 0, 0, io::empty()).unwrap();
        for (n, d) in images() {
            put(&mut t, &format!("checkpoint/{n}"), EntryType::Regular, d.len() as u64, 0, &d[..]).unwrap();
        }
        let diff = random(3000, 5);
        put(&mut t, "rootfs-diff.tar", EntryType::Regular, diff.len() as u64, 0, &diff[..]).unwrap();
        put(&mut t, "deleted.files", EntryType::Regular, 2, 0, &b"[]"[..]).unwrap();
        t.into_inner().unwrap()
    }

    #[test]
    fn a_podman_export_imports_through_the_hook() {
        let f = Fixture::new();
        let out = f.path("web.tar.zst");
        fs::write(&out, zstd::encode_all(&podman_export()[..], 3).unwrap()).unwrap();
        let hook = TestHook::default();
        let got = import_with(&f.store, &out, None, &hook, &Silent).unwrap();
        let m = &got.checkpoint.manifest;
        assert_eq!((m.name.as_str(), m.source.as_str()), ("from-config", "podman:web"));
        let files = materialized(&f.store, "from-config");
        assert_eq!(files["ferry-container.json"], b"{\"made\":1}");
        assert_eq!(files["rootfs-diff.tar"], random(3000, 5));
        assert_eq!(files["deleted.files"], b"[]");
        assert!(!files.contains_key("ctr.log") && !files.contains_key("config.dump"));
        let seen = hook.seen.borrow();
        assert!(!seen[0].1);
        assert_eq!(seen[0].0.archive, "web.tar.zst");
        assert_eq!(seen[0].0.files["network.status"], b"null");

        // A hook's refusal leaves nothing.
        let g = Fixture::new();
        let refusing = TestHook { refuse: true, ..TestHook::default() };
        let err = import_with(&g.store, &out, Some("x"), &refusing, &Silent).unwrap_err();
        assert!(
            matches!(&err, StoreError::Tampered { file, detail } if file.contains("rootfs-diff.tar") && detail.contains("leaves")),
            "{err}"
        );
        g.assert_untouched(0);
    }

    #[test]
    fn container_archives_that_do_not_fit_are_refused() {
        let f = Fixture::new();
        let hook = TestHook::default();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("volumes", with(|t| file(t, "volumes/data.tar", b"x")), "volumes"),
            (
                "big spec",
                with(|t| raw(t, b"spec.dump", EntryType::Regular, 0o644, MAX_METADATA_FILE + 1, b"", b"")),
                "cap",
            ),
            (
                "two diffs",
                with(|t| {
                    file(t, "rootfs-diff.tar", b"x");
                    file(t, "checkpoint/rootfs-diff.tar", b"y");
                }),
                "second image",
            ),
            ("odd ferry file", with(|t| file(t, "ferry/x.img", b"x")), "ferry does not know"),
        ];
        for (label, bytes, why) in cases {
            let p = f.path("hostile.tar");
            fs::write(&p, &bytes).unwrap();
            let err = import_with(&f.store, &p, Some("victim"), &hook, &Silent).expect_err(label);
            assert!(err.to_string().contains(why), "{label}: {err}");
            f.assert_untouched(0);
        }
    }

    /// The members of a tar held in memory.
    fn members(bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
        let mut a = tar::Archive::new(bytes);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let mut v = Vec::new();
                e.read_to_end(&mut v).unwrap();
                (String::from_utf8(e.path_bytes().into_owned()).unwrap(), v)
            })
            .collect()
    }

    fn sha256(b: &[u8]) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
    }

    /// Follows index.json to the manifest, its config and its one layer, checking digests.
    fn check_oci(
        blobs: &BTreeMap<String, Vec<u8>>,
        index: &[u8],
        name: &str,
    ) -> (serde_json::Value, Vec<u8>) {
        let index: serde_json::Value = serde_json::from_slice(index).unwrap();
        let entry = &index["manifests"][0];
        assert_eq!(entry["annotations"]["org.opencontainers.image.ref.name"], "localhost/ferry/ctr:latest");
        assert_eq!(entry["annotations"]["io.podman.annotations.checkpoint.name"], name);
        let blob = |d: &serde_json::Value| {
            let d = d.as_str().unwrap().strip_prefix("sha256:").unwrap();
            let b = blobs[d].clone();
            assert_eq!(sha256(&b), d);
            b
        };
        let manifest: serde_json::Value = serde_json::from_slice(&blob(&entry["digest"])).unwrap();
        assert_eq!(manifest["annotations"]["io.podman.annotations.checkpoint.name"], name);
        let config: serde_json::Value = serde_json::from_slice(&blob(&manifest["config"]["digest"])).unwrap();
        let layer = blob(&manifest["layers"][0]["digest"]);
        assert_eq!(manifest["layers"][0]["mediaType"], "application/vnd.oci.image.layer.v1.tar");
        assert_eq!(config["rootfs"]["diff_ids"][0], manifest["layers"][0]["digest"]);
        (manifest, layer)
    }

    #[test]
    fn an_oci_image_carries_the_plaintext_archive_as_its_layer() {
        let f = Fixture::new();
        checkpoint(&f.store, "ctr", &container_images());
        let plain = f.path("ctr.tar");
        export_with(&f.store, "ctr", &plain, ExportMode::Plaintext, &TestLayout, &Silent).unwrap();
        let want_layer = fs::read(&plain).unwrap();

        let out = f.path("ctr.oci.tar");
        let mode = ExportMode::OciImage { reference: "localhost/ferry/ctr:latest".into(), directory: false };
        let r = export_with(&f.store, "ctr", &out, mode, &TestLayout, &Silent).unwrap();
        assert_eq!((r.mode, r.bytes), ("OCI image", fs::metadata(&out).unwrap().len()));
        let all = members(&fs::read(&out).unwrap());
        assert_eq!(all["oci-layout"], br#"{"imageLayoutVersion":"1.0.0"}"#);
        let blobs: BTreeMap<String, Vec<u8>> = all
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("blobs/sha256/")?.to_owned(), v.clone())))
            .filter(|(k, _)| !k.is_empty())
            .collect();
        let (manifest, layer) = check_oci(&blobs, &all["index.json"], "ctr");
        assert_eq!(layer, want_layer, "the layer is the plaintext archive");
        let config_digest = manifest["config"]["digest"].as_str().unwrap().trim_start_matches("sha256:");
        assert_eq!(r.image_id.as_deref(), Some(config_digest), "an image's id is its config's digest");

        // As a directory.
        let dir = f.path("ctr-layout");
        let mode = ExportMode::OciImage { reference: "localhost/ferry/ctr:latest".into(), directory: true };
        export_with(&f.store, "ctr", &dir, mode.clone(), &TestLayout, &Silent).unwrap();
        let blobs: BTreeMap<String, Vec<u8>> = fs::read_dir(dir.join("blobs/sha256"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().to_string_lossy().into_owned(), fs::read(e.path()).unwrap())
            })
            .collect();
        assert_eq!(blobs.len(), 3);
        let (_, layer) = check_oci(&blobs, &fs::read(dir.join("index.json")).unwrap(), "ctr");
        assert_eq!(layer, want_layer);
        assert_eq!(fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        // Never into an existing directory; nothing left behind by the refusal.
        assert!(export_with(&f.store, "ctr", &dir, mode, &TestLayout, &Silent).is_err());
        assert_eq!(count(f.dir.path()), 4, "store, ctr.tar, ctr.oci.tar, ctr-layout: no temporary left");
        // A bad image name is refused before anything is written.
        let bad = ExportMode::OciImage { reference: "Not Valid".into(), directory: false };
        assert!(matches!(
            export_with(&f.store, "ctr", &f.path("bad.tar"), bad, &TestLayout, &Silent),
            Err(StoreError::InvalidName { .. })
        ));
        assert!(!f.path("bad.tar").exists());
    }

    #[test]
    fn plaintext_images_must_match_a_verified_manifest() {
        let f = Fixture::new();
        checkpoint(&f.store, "app", &images());
        let out = f.path("app.tar");
        export(&f.store, "app", &out, ExportMode::Plaintext).unwrap();
        let mut raw = fs::read(&out).unwrap();
        // Flip one byte of pages-1.img's data.
        let page = images()[0].1[..64].to_vec();
        let at = raw.windows(64).position(|w| w == page.as_slice()).unwrap();
        raw[at + 10] ^= 1;
        let bad = f.path("bad.tar");
        fs::write(&bad, &raw).unwrap();
        let fresh = Fixture::peer_of(&f.store);
        let err = import(&fresh.store, &bad, None).unwrap_err();
        assert!(
            matches!(&err, StoreError::Tampered { file, .. } if file.contains("checkpoint/pages-1.img")),
            "{err}"
        );
        fresh.assert_untouched(0);
    }

    #[test]
    fn a_damaged_pack_or_index_is_refused() {
        let a = Fixture::new();
        let b = Fixture::peer_of(&a.store);
        checkpoint(&a.store, "x", &images());
        let out = a.path("x.tar");
        export(
            &a.store,
            "x",
            &out,
            ExportMode::Encrypted { recipients: vec![b.store.keys().public().x25519] },
        )
        .unwrap();
        let raw = fs::read(&out).unwrap();
        let pack = entry_data(&out, "ferry/chunks.pack");
        let start = raw.windows(pack.len()).position(|w| w == pack.as_slice()).unwrap();
        for at in [start + 100, start + pack.len() - 1] {
            let mut bad = raw.clone();
            bad[at] ^= 0x40;
            let p = b.path("bad.tar");
            fs::write(&p, &bad).unwrap();
            let err = import(&b.store, &p, None).unwrap_err();
            assert!(
                matches!(&err, StoreError::Tampered { file, .. } if file.contains("chunks.pack")),
                "{err}"
            );
            b.assert_untouched(0);
        }
        // An index listing a chunk twice.
        let idx = entry_data(&out, "ferry/chunks.idx");
        let istart = raw.windows(idx.len()).position(|w| w == idx.as_slice()).unwrap();
        let mut bad = raw.clone();
        bad.copy_within(istart + IDX_HEADER..istart + IDX_HEADER + 32, istart + IDX_HEADER + IDX_ENTRY);
        let p = b.path("bad.tar");
        fs::write(&p, &bad).unwrap();
        assert!(import(&b.store, &p, None).is_err());
        b.assert_untouched(0);
    }

    #[test]
    fn index_encoding_matches_the_pack_index_format() {
        let e = vec![([1u8; 32], [2u8; 16], 0u64, 100u32), ([3u8; 32], [4u8; 16], 100, 5)];
        let back = decode_idx(&encode_index(&e)).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!((back[1].id, back[1].key, back[1].offset, back[1].len), e[1]);
    }

    // --- hostile archives ---------------------------------------------------------------------

    /// An entry with its header written by hand: any name, type, mode and claimed size.
    fn raw(
        t: &mut Builder<Vec<u8>>,
        name: &[u8],
        kind: EntryType,
        mode: u32,
        size: u64,
        data: &[u8],
        link: &[u8],
    ) {
        let mut h = Header::new_gnu();
        {
            let g = h.as_gnu_mut().unwrap();
            g.name[..name.len()].copy_from_slice(name);
            g.linkname[..link.len()].copy_from_slice(link);
        }
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_cksum();
        t.get_mut().extend_from_slice(h.as_bytes());
        t.get_mut().extend_from_slice(data);
        let pad = padding(data.len() as u64) as usize;
        t.get_mut().extend_from_slice(&vec![0u8; pad]);
    }

    /// One PAX record: "LEN key=value\n", LEN counting itself.
    fn pax_record(key: &str, value: &str) -> Vec<u8> {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        while format!("{len}").len() + body.len() != len {
            len += 1;
        }
        format!("{len}{body}").into_bytes()
    }

    fn file(t: &mut Builder<Vec<u8>>, name: &str, data: &[u8]) {
        raw(t, name.as_bytes(), EntryType::Regular, 0o644, data.len() as u64, data, b"");
    }

    /// A minimal valid plaintext archive, with `extra` inserted before its last image.
    fn with(extra: impl FnOnce(&mut Builder<Vec<u8>>)) -> Vec<u8> {
        let mut t = Builder::new(Vec::new());
        raw(&mut t, b"checkpoint/", EntryType::Directory, 0o755, 0, b"", b"");
        file(&mut t, "checkpoint/core-1.img", b"core");
        extra(&mut t);
        file(&mut t, "checkpoint/pages-1.img", &[5u8; 4096]);
        t.into_inner().unwrap()
    }

    fn refuse(f: &Fixture, label: &str, bytes: &[u8], why: &str) {
        let p = f.path("hostile.tar");
        fs::write(&p, bytes).unwrap();
        let err = import(&f.store, &p, Some("victim")).expect_err(label);
        let text = err.to_string();
        assert!(matches!(err, StoreError::Tampered { .. }), "{label}: {text}");
        assert!(text.contains(why), "{label}: {text}");
        f.assert_untouched(0);
    }

    #[test]
    fn the_control_archive_imports() {
        let f = Fixture::new();
        let p = f.path("ok.tar");
        fs::write(&p, with(|_| {})).unwrap();
        import(&f.store, &p, Some("ok")).unwrap();
        assert_eq!(materialized(&f.store, "ok").len(), 2);
    }

    #[test]
    fn hostile_archives_are_refused_and_leave_nothing() {
        let f = Fixture::new();
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("dot-dot", with(|t| file(t, "checkpoint/../../evil", b"x")), "'..'"),
            ("dot-dot top", with(|t| file(t, "../evil", b"x")), "'..'"),
            ("absolute", with(|t| file(t, "/tmp/evil", b"x")), "absolute"),
            (
                "symlink",
                with(|t| raw(t, b"checkpoint/evil", EntryType::Symlink, 0o777, 0, b"", b"/etc/shadow")),
                "symbolic link",
            ),
            (
                "hardlink",
                with(|t| raw(t, b"checkpoint/evil", EntryType::Link, 0o644, 0, b"", b"/etc/passwd")),
                "hard link",
            ),
            (
                "char device",
                with(|t| raw(t, b"checkpoint/tty", EntryType::Char, 0o666, 0, b"", b"")),
                "character device",
            ),
            (
                "block device",
                with(|t| raw(t, b"checkpoint/sda", EntryType::Block, 0o666, 0, b"", b"")),
                "block device",
            ),
            ("fifo", with(|t| raw(t, b"checkpoint/fifo", EntryType::Fifo, 0o666, 0, b"", b"")), "FIFO"),
            (
                "setuid",
                with(|t| raw(t, b"checkpoint/suid.img", EntryType::Regular, 0o4755, 1, b"x", b"")),
                "setuid",
            ),
            (
                "setgid dir",
                with(|t| raw(t, b"ferry/", EntryType::Directory, 0o2755, 0, b"", b"")),
                "setuid or setgid",
            ),
            (
                "huge",
                with(|t| {
                    raw(
                        t,
                        b"checkpoint/big.img",
                        EntryType::Regular,
                        0o644,
                        MAX_ARCHIVE_ENTRY + 1,
                        b"abc",
                        b"",
                    )
                }),
                "over the",
            ),
            ("unknown top-level", with(|t| file(t, "evil", b"x")), "where this layout has none"),
            ("unknown under ferry", with(|t| file(t, "ferry/evil", b"x")), "ferry does not know"),
            ("nested image", with(|t| file(t, "checkpoint/sub/x.img", b"x")), "where this layout has none"),
            (
                "subdirectory",
                with(|t| raw(t, b"checkpoint/sub/", EntryType::Directory, 0o755, 0, b"", b"")),
                "directory",
            ),
            ("rootfs diff", with(|t| file(t, "rootfs-diff.tar", b"x")), "root file system"),
            ("duplicate", with(|t| file(t, "checkpoint/core-1.img", b"other")), "twice"),
            (
                "big config",
                with(|t| raw(t, b"config.dump", EntryType::Regular, 0o644, MAX_METADATA_FILE + 1, b"", b"")),
                "cap",
            ),
            (
                "pax path smuggles ..",
                with(|t| {
                    let rec = pax_record("path", "../../evil.sh");
                    raw(t, b"PaxHeaders/x", EntryType::XHeader, 0o644, rec.len() as u64, &rec, b"");
                    file(t, "checkpoint/harmless", b"x");
                }),
                "'..'",
            ),
            (
                "huge long name",
                with(|t| raw(t, b"././@LongLink", EntryType::GNULongName, 0o644, 1 << 30, b"a", b"")),
                "long name",
            ),
            ("empty component", with(|t| file(t, "checkpoint//x", b"x")), "empty component"),
            ("dot component", with(|t| file(t, "checkpoint/./x", b"x")), "'.'"),
            ("control char", with(|t| file(t, "checkpoint/a\nb", b"x")), "control"),
            (
                "no images",
                with(|_| {})[..BLOCK].iter().copied().chain([0u8; 1024]).collect(),
                "no checkpoint images",
            ),
            ("gzip", [&[0x1f, 0x8b, 8, 0][..], &[0u8; 600]].concat(), "gzip"),
            ("not tar", vec![b'x'; 2048], "checksum"),
            ("empty", Vec::new(), "end-of-archive"),
        ];
        for (label, bytes, why) in cases {
            refuse(&f, label, &bytes, why);
        }
    }

    #[test]
    fn truncated_archives_are_refused() {
        let f = Fixture::new();
        let good = with(|_| {});
        // Cut inside the last image, inside a header, and exactly between members (the
        // end-of-archive marker is missing).
        let last_data = good.len() - 1024 - 4096;
        for (label, cut, why) in [
            ("inside data", last_data + 100, "truncated"),
            ("inside a header", last_data - 200, "truncated"),
            ("between members", good.len() - 1024, "end-of-archive"),
            ("partial marker", good.len() - 1024 + 100, "truncated"),
        ] {
            refuse(&f, label, &good[..cut], why);
        }
        // Garbage after the end.
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"surprise");
        refuse(&f, "trailing", &trailing, "after the end-of-archive marker");
        // A truncated encrypted archive too.
        checkpoint(&f.store, "enc", &images());
        let out = f.path("enc.tar");
        let own = f.store.keys().public().x25519;
        export(&f.store, "enc", &out, ExportMode::Encrypted { recipients: vec![own] }).unwrap();
        let raw = fs::read(&out).unwrap();
        let p = f.path("cut.tar");
        fs::write(&p, &raw[..raw.len() / 2]).unwrap();
        let packs = count(&f.store.root().join("packs"));
        assert!(matches!(import(&f.store, &p, Some("cut")), Err(StoreError::Tampered { .. })));
        assert_eq!(f.store.list().unwrap().0.len(), 1);
        assert_eq!(count(&f.store.root().join("packs")), packs);
    }

    #[test]
    fn only_a_regular_file_is_read_as_an_archive() {
        let f = Fixture::new();
        let fifo = f.path("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        for p in [fifo.as_path(), f.dir.path()] {
            let err = import(&f.store, p, Some("x")).unwrap_err();
            assert!(err.to_string().contains("not a regular file"), "{err}");
        }
        f.assert_untouched(0);
    }

    #[test]
    fn too_many_entries_are_refused() {
        let f = Fixture::new();
        let mut t = Builder::new(Vec::with_capacity((MAX_ARCHIVE_ENTRIES + 2) * BLOCK + 4096));
        for i in 0..=MAX_ARCHIVE_ENTRIES {
            raw(&mut t, format!("checkpoint/{i}").as_bytes(), EntryType::Regular, 0o644, 0, b"", b"");
        }
        refuse(&f, "too many", &t.into_inner().unwrap(), "more than");
    }

    #[test]
    fn export_refuses_no_recipients_and_leaves_no_file() {
        let f = Fixture::new();
        checkpoint(&f.store, "n", &images());
        let out = f.path("n.tar");
        let err = export(&f.store, "n", &out, ExportMode::Encrypted { recipients: vec![] }).unwrap_err();
        assert!(matches!(err, StoreError::NoKey { .. }), "{err}");
        assert!(!out.exists());
        assert_eq!(count(f.dir.path()), 1);
        assert!(matches!(
            export(&f.store, "missing", &out, ExportMode::Plaintext),
            Err(StoreError::NotFound(_))
        ));
    }
}

//! The store directory: create, commit, list, open and remove checkpoints.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::io_err;
use crate::ingest::{hash_file, Ingest};
use crate::meta::{CheckpointMeta, MAX_META_BYTES};
use crate::{validate_name, StoreError};

const META_FILE: &str = "meta.json";
const IMAGES_DIR: &str = "images";

/// A store rooted at one directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// A checkpoint in the store.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    dir: PathBuf,
    pub meta: CheckpointMeta,
}

/// A checkpoint being written. Dropped without [`Pending::commit`], it is removed: a failed
/// checkpoint leaves nothing in the store.
#[derive(Debug)]
pub struct Pending {
    name: String,
    dir: PathBuf,
    final_dir: PathBuf,
    committed: bool,
}

impl Store {
    /// Opens (creating if needed) the store at `root`, and removes leftovers of checkpoints
    /// whose writer died.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let store = Store { root: root.into() };
        for dir in [
            store.root.clone(),
            store.checkpoints_dir(),
            store.logs_dir(),
            store.tmp_dir(),
        ] {
            private_dir(&dir)?;
        }
        store.sweep_tmp();
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where CRIU logs of this store's operations go.
    pub fn logs_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    fn checkpoints_dir(&self) -> PathBuf {
        self.root.join("checkpoints")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Starts a checkpoint named `name`.
    pub fn begin(&self, name: &str) -> Result<Pending, StoreError> {
        validate_name(name)?;
        let final_dir = self.checkpoints_dir().join(name);
        if final_dir.exists() {
            return Err(StoreError::Exists(name.to_owned()));
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = self
            .tmp_dir()
            .join(format!("{name}.{}.{nanos}", std::process::id()));
        private_dir(&dir)?;
        let pending = Pending {
            name: name.to_owned(),
            dir,
            final_dir,
            committed: false,
        };
        private_dir(&pending.images_dir())?;
        Ok(pending)
    }

    /// The checkpoint named `name`.
    pub fn get(&self, name: &str) -> Result<Checkpoint, StoreError> {
        validate_name(name)?;
        let dir = self.checkpoints_dir().join(name);
        if !dir.is_dir() {
            return Err(StoreError::NotFound(name.to_owned()));
        }
        let meta_path = dir.join(META_FILE);
        let meta = read_meta(&meta_path)?;
        if meta.name != name {
            return Err(StoreError::BadMeta {
                path: meta_path,
                detail: format!("it describes '{}', not '{name}'", meta.name),
            });
        }
        Ok(Checkpoint { dir, meta })
    }

    /// All readable checkpoints, oldest first. Unreadable ones are skipped with a warning.
    pub fn list(&self) -> Result<Vec<Checkpoint>, StoreError> {
        let dir = self.checkpoints_dir();
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("cannot read", &dir))? {
            let entry = entry.map_err(io_err("cannot read", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            match self.get(&name) {
                Ok(c) => out.push(c),
                Err(e) => tracing::warn!(%name, error = %e, "skipping unreadable checkpoint"),
            }
        }
        out.sort_by(|a, b| (a.meta.created, &a.meta.name).cmp(&(b.meta.created, &b.meta.name)));
        Ok(out)
    }

    /// Removes the checkpoint named `name`.
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        validate_name(name)?;
        let dir = self.checkpoints_dir().join(name);
        if !dir.is_dir() {
            return Err(StoreError::NotFound(name.to_owned()));
        }
        // Rename first so a half-removed checkpoint is never listed.
        let doomed = self
            .tmp_dir()
            .join(format!("{name}.removing.{}", std::process::id()));
        fs::rename(&dir, &doomed).map_err(io_err("cannot move aside", &dir))?;
        fs::remove_dir_all(&doomed).map_err(io_err("cannot remove", &doomed))
    }

    /// Removes directories in tmp/ left by writers that no longer run.
    fn sweep_tmp(&self) {
        let Ok(entries) = fs::read_dir(self.tmp_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let writer = name.split('.').rev().nth(1).and_then(|p| p.parse::<i32>().ok());
            let alive =
                writer.is_some_and(|pid| pid as u32 != std::process::id() && ferry_sys::process_exists(pid));
            if !alive {
                tracing::info!(leftover = %name, "removing an interrupted checkpoint");
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

impl Pending {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where CRIU writes the images.
    pub fn images_dir(&self) -> PathBuf {
        self.dir.join(IMAGES_DIR)
    }

    /// Starts hashing the images as they are written; pass the result to [`Pending::commit`].
    pub fn start_ingest(&self) -> Ingest {
        Ingest::start(self.images_dir())
    }

    /// Completes the hashes, writes `meta.json` durably and moves the checkpoint into place.
    pub fn commit(mut self, mut meta: CheckpointMeta, ingest: Ingest) -> Result<Checkpoint, StoreError> {
        meta.name = self.name.clone();
        meta.files = ingest.finish(&self.images_dir())?;
        let meta_path = self.dir.join(META_FILE);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&meta_path)
            .map_err(io_err("cannot create", &meta_path))?;
        file.write_all(&meta.to_json())
            .and_then(|_| file.sync_all())
            .map_err(io_err("cannot write", &meta_path))?;
        sync_dir(&self.dir)?;
        if self.final_dir.exists() {
            return Err(StoreError::Exists(self.name.clone()));
        }
        fs::rename(&self.dir, &self.final_dir).map_err(io_err("cannot move into place", &self.final_dir))?;
        if let Some(parent) = self.final_dir.parent() {
            sync_dir(parent)?;
        }
        self.committed = true;
        Ok(Checkpoint {
            dir: self.final_dir.clone(),
            meta,
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

impl Checkpoint {
    pub fn name(&self) -> &str {
        &self.meta.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn images_dir(&self) -> PathBuf {
        self.dir.join(IMAGES_DIR)
    }

    /// Checks that every image file listed in the metadata is present, a regular file, and of
    /// the recorded size, and that no file was added. Content checks come with the secure store.
    pub fn verify(&self) -> Result<(), StoreError> {
        let damaged = |file: &str, detail: String| StoreError::Damaged {
            name: self.meta.name.clone(),
            file: format!("images/{file}"),
            detail,
        };
        let images = self.images_dir();
        for f in &self.meta.files {
            let path = images.join(&f.name);
            let md = fs::symlink_metadata(&path).map_err(|e| damaged(&f.name, format!("missing ({e})")))?;
            if !md.file_type().is_file() {
                return Err(damaged(&f.name, "not a regular file".into()));
            }
            if md.len() != f.size {
                return Err(damaged(
                    &f.name,
                    format!("{} bytes, expected {}", md.len(), f.size),
                ));
            }
        }
        let now = list_images(&images)?;
        if let Some(extra) = now
            .iter()
            .find(|n| !self.meta.files.iter().any(|f| f.name == **n))
        {
            return Err(damaged(extra, "not part of the checkpoint".into()));
        }
        Ok(())
    }

    /// Hashes every image and compares with the metadata: the content check that
    /// [`Checkpoint::verify`] leaves out. Reads every byte, so restore runs it beside CRIU.
    pub fn verify_content(&self) -> Result<(), StoreError> {
        let images = self.images_dir();
        for f in &self.meta.files {
            let path = images.join(&f.name);
            let actual = hash_file(&path).map_err(io_err("cannot read", &path))?;
            if actual != f.blake3 {
                return Err(StoreError::Damaged {
                    name: self.meta.name.clone(),
                    file: format!("images/{}", f.name),
                    detail: "content differs from what was checkpointed (hash mismatch)".into(),
                });
            }
        }
        Ok(())
    }
}

fn read_meta(path: &Path) -> Result<CheckpointMeta, StoreError> {
    let md = fs::symlink_metadata(path).map_err(|e| StoreError::BadMeta {
        path: path.to_path_buf(),
        detail: format!("cannot read: {e}"),
    })?;
    if !md.file_type().is_file() || md.len() > MAX_META_BYTES {
        return Err(StoreError::BadMeta {
            path: path.to_path_buf(),
            detail: "not a regular file of reasonable size".into(),
        });
    }
    let bytes = fs::read(path).map_err(io_err("cannot read", path))?;
    CheckpointMeta::parse(&bytes, path)
}

/// Names in an images directory, sorted. Anything but a regular file is refused.
fn list_images(dir: &Path) -> Result<Vec<String>, StoreError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("cannot read", dir))? {
        let entry = entry.map_err(io_err("cannot read", dir))?;
        let ft = entry.file_type().map_err(io_err("cannot stat", entry.path()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !ft.is_file() {
            return Err(StoreError::Damaged {
                name: String::new(),
                file: name,
                detail: "the images directory holds something other than a regular file".into(),
            });
        }
        names.push(name);
    }
    names.sort();
    Ok(names)
}

fn private_dir(path: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_err("cannot create", path))?;
    let md = fs::metadata(path).map_err(io_err("cannot stat", path))?;
    if md.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io_err("cannot chmod", path))?;
    }
    Ok(())
}

fn sync_dir(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot sync", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{HostFacts, FORMAT_VERSION};

    fn meta() -> CheckpointMeta {
        CheckpointMeta {
            format: FORMAT_VERSION,
            name: String::new(),
            source: "pid:1".into(),
            pid: 1,
            created: 1,
            host: HostFacts::default(),
            tcp_established: false,
            leave_running: false,
            network_lock_tables: vec![],
            dump_seconds: 0.0,
            files: vec![],
        }
    }

    fn write_checkpoint(store: &Store, name: &str) -> Checkpoint {
        let p = store.begin(name).expect("begin");
        fs::write(p.images_dir().join("core-1.img"), b"core").expect("write");
        fs::write(p.images_dir().join("pages-1.img"), vec![1u8; 8192]).expect("write");
        let ingest = p.start_ingest();
        p.commit(meta(), ingest).expect("commit")
    }

    #[test]
    fn commit_list_get_remove() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(tmp.path().join("s")).expect("open");
        let c = write_checkpoint(&store, "one");
        assert_eq!(c.meta.size_bytes(), 8196);
        c.verify().expect("verify");
        assert!(matches!(store.begin("one"), Err(StoreError::Exists(_))));
        let listed = store.list().expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(store.get("one").expect("get").meta.files.len(), 2);
        store.remove("one").expect("rm");
        assert!(matches!(store.get("one"), Err(StoreError::NotFound(_))));
        assert!(matches!(store.remove("one"), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn abandoned_checkpoint_leaves_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(tmp.path()).expect("open");
        let p = store.begin("gone").expect("begin");
        fs::write(p.images_dir().join("x.img"), b"x").expect("write");
        drop(p);
        assert_eq!(fs::read_dir(tmp.path().join("tmp")).expect("tmp").count(), 0);
        assert!(store.list().expect("list").is_empty());
    }

    #[test]
    fn verify_finds_truncation_and_extras() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(tmp.path()).expect("open");
        let c = write_checkpoint(&store, "c");
        fs::write(c.images_dir().join("pages-1.img"), b"short").expect("truncate");
        let err = c.verify().expect_err("truncated");
        assert!(err.to_string().contains("pages-1.img"), "{err}");
        fs::write(c.images_dir().join("pages-1.img"), vec![1u8; 8192]).expect("restore");
        c.verify().expect("verify again");
        fs::write(c.images_dir().join("evil.img"), b"x").expect("extra");
        assert!(c.verify().is_err());
    }

    #[test]
    fn verify_content_finds_a_flipped_byte() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(tmp.path()).expect("open");
        let c = write_checkpoint(&store, "c");
        c.verify_content().expect("intact");
        let mut pages = vec![1u8; 8192];
        pages[4100] ^= 0x01;
        fs::write(c.images_dir().join("pages-1.img"), pages).expect("flip");
        c.verify().expect("same size: the structural check passes");
        let err = c.verify_content().expect_err("flipped");
        assert!(err.to_string().contains("pages-1.img"), "{err}");
    }

    #[test]
    fn store_dirs_are_private_and_leftovers_swept() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("s");
        let store = Store::open(&root).expect("open");
        assert_eq!(
            fs::metadata(&root).expect("stat").permissions().mode() & 0o777,
            0o700
        );
        // A writer PID that cannot exist marks the leftover of a crashed checkpoint.
        fs::create_dir_all(store.tmp_dir().join(format!("dead.{}.1", i32::MAX))).expect("mkdir");
        Store::open(&root).expect("reopen");
        assert_eq!(fs::read_dir(store.tmp_dir()).expect("tmp").count(), 0);
    }

    #[test]
    fn names_are_checked_everywhere() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = Store::open(tmp.path()).expect("open");
        assert!(matches!(store.begin("../x"), Err(StoreError::InvalidName { .. })));
        assert!(matches!(
            store.get("../../etc"),
            Err(StoreError::InvalidName { .. })
        ));
        assert!(matches!(store.remove("/"), Err(StoreError::InvalidName { .. })));
    }
}

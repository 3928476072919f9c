//! Hashing image files while CRIU writes them, so that a checkpoint's content hashes cost
//! (almost) no time after the dump: CRIU fills files sequentially, and a second thread follows
//! behind it on the other core.
//!
//! Small files are hashed again from the start once the dump is over, so a file CRIU rewrites
//! in place is still hashed as it ends up; large files (page data) are only ever appended to.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::error::io_err;
use crate::meta::FileEntry;
use crate::StoreError;

/// Files up to this size are rehashed whole after the dump.
const REHASH_BELOW: u64 = 1 << 20;
const READ_BUF: usize = 1 << 20;
const IDLE_SLEEP: Duration = Duration::from_millis(5);

/// A running hasher over one images directory; [`Ingest::finish`] once the writer is done.
#[derive(Debug)]
pub struct Ingest {
    stop: Arc<AtomicBool>,
    worker: Option<JoinHandle<Result<Vec<FileEntry>, StoreError>>>,
}

struct Followed {
    file: File,
    hashed: u64,
    hasher: blake3::Hasher,
}

impl Ingest {
    /// Starts following the files of `dir`.
    pub fn start(dir: PathBuf) -> Ingest {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let worker = thread::Builder::new()
            .name("ferry-ingest".into())
            .spawn(move || follow(&dir, &flag))
            .map_err(
                |e| tracing::warn!(error = %e, "cannot start the hashing thread; hashing after the dump"),
            )
            .ok();
        Ingest { stop, worker }
    }

    /// Waits for the last bytes, checks and syncs every file, and returns the entries.
    pub fn finish(mut self, dir: &Path) -> Result<Vec<FileEntry>, StoreError> {
        self.stop.store(true, Ordering::Release);
        match self.worker.take() {
            Some(w) => w.join().unwrap_or_else(|_| follow_after(dir)),
            None => follow_after(dir),
        }
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn follow_after(dir: &Path) -> Result<Vec<FileEntry>, StoreError> {
    follow(dir, &AtomicBool::new(true))
}

/// Follows `dir` until `stop`, then drains and completes every file.
fn follow(dir: &Path, stop: &AtomicBool) -> Result<Vec<FileEntry>, StoreError> {
    let mut files: BTreeMap<String, Followed> = BTreeMap::new();
    let mut buf = vec![0u8; READ_BUF];
    loop {
        let finishing = stop.load(Ordering::Acquire);
        let progressed = scan(dir, &mut files, &mut buf)?;
        if finishing {
            break;
        }
        if !progressed {
            thread::sleep(IDLE_SLEEP);
        }
    }
    files
        .into_iter()
        .map(|(name, f)| complete(dir, name, f, &mut buf))
        .collect()
}

/// One pass over the directory: opens new files and hashes what was appended. True if any
/// byte was read.
fn scan(dir: &Path, files: &mut BTreeMap<String, Followed>, buf: &mut [u8]) -> Result<bool, StoreError> {
    let mut progressed = false;
    for entry in fs::read_dir(dir).map_err(io_err("cannot read", dir))? {
        let entry = entry.map_err(io_err("cannot read", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !files.contains_key(&name) {
            let ft = entry.file_type().map_err(io_err("cannot stat", entry.path()))?;
            if !ft.is_file() {
                return Err(StoreError::Damaged {
                    name: String::new(),
                    file: name,
                    detail: "the images directory holds something other than a regular file".into(),
                });
            }
            let Ok(file) = File::open(entry.path()) else {
                continue;
            };
            files.insert(
                name.clone(),
                Followed {
                    file,
                    hashed: 0,
                    hasher: blake3::Hasher::new(),
                },
            );
        }
        if let Some(f) = files.get_mut(&name) {
            progressed |= catch_up(f, buf).map_err(io_err("cannot read", entry.path()))? > 0;
        }
    }
    Ok(progressed)
}

fn catch_up(f: &mut Followed, buf: &mut [u8]) -> io::Result<u64> {
    let mut total = 0;
    loop {
        let n = f.file.read(buf)?;
        if n == 0 {
            return Ok(total);
        }
        f.hasher.update(&buf[..n]);
        f.hashed += n as u64;
        total += n as u64;
    }
}

fn complete(dir: &Path, name: String, mut f: Followed, buf: &mut [u8]) -> Result<FileEntry, StoreError> {
    let path = dir.join(&name);
    let size = f.file.metadata().map_err(io_err("cannot stat", &path))?.len();
    if size < REHASH_BELOW || size != f.hashed {
        f.file
            .seek(SeekFrom::Start(0))
            .map_err(io_err("cannot read", &path))?;
        f.hasher = blake3::Hasher::new();
        f.hashed = 0;
        catch_up(&mut f, buf).map_err(io_err("cannot read", &path))?;
    }
    if f.hashed != size {
        return Err(StoreError::Io {
            action: "file changed while being hashed:",
            path,
            source: io::Error::other("size moved"),
        });
    }
    f.file.sync_all().map_err(io_err("cannot sync", &path))?;
    Ok(FileEntry {
        name,
        size,
        blake3: f.hasher.finalize().to_hex().to_string(),
    })
}

/// The BLAKE3 hash of a whole file, hex.
pub(crate) fn hash_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; READ_BUF];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hasher.finalize().to_hex().to_string());
        }
        hasher.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn follows_files_as_they_grow() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ingest = Ingest::start(tmp.path().to_path_buf());
        let mut big = File::create(tmp.path().join("pages-1.img")).expect("create");
        let block = vec![0xabu8; 256 << 10];
        for _ in 0..16 {
            big.write_all(&block).expect("write");
            thread::sleep(Duration::from_millis(2));
        }
        fs::write(tmp.path().join("core-1.img"), b"first").expect("write");
        // A small file rewritten in place must be hashed as it ends up.
        fs::write(tmp.path().join("core-1.img"), b"again").expect("rewrite");
        drop(big);
        let entries = ingest.finish(tmp.path()).expect("finish");
        assert_eq!(entries.len(), 2);
        for e in &entries {
            let expect = hash_file(&tmp.path().join(&e.name)).expect("hash");
            assert_eq!(e.blake3, expect, "{}", e.name);
        }
        assert_eq!(
            entries.iter().find(|e| e.name == "pages-1.img").map(|e| e.size),
            Some(4 << 20)
        );
    }

    #[test]
    fn refuses_links_in_the_images_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        std::os::unix::fs::symlink("/etc/passwd", tmp.path().join("evil.img")).expect("symlink");
        let ingest = Ingest::start(tmp.path().to_path_buf());
        assert!(matches!(
            ingest.finish(tmp.path()),
            Err(StoreError::Damaged { .. })
        ));
    }
}

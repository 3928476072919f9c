//! Durable, private file operations shared by the store's writers.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::error::io_err;
use crate::StoreError;

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one:
/// temporary file (0600), fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("cannot create", &tmp))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io_err("cannot write", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("cannot rename into", path))?;
    sync_dir(dir)
}

/// Creates `path`, which must not exist, mode 0600, for writing.
pub fn create_private(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("cannot create", path))
}

/// Opens (creating) a lock file, mode 0600.
pub fn lock_file(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("cannot open", path))
}

/// Random bytes from the kernel, for ids that must not collide.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], StoreError> {
    let mut out = [0u8; N];
    File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut out))
        .map_err(io_err("cannot read", "/dev/urandom"))?;
    Ok(out)
}

pub fn sync_dir(path: &Path) -> Result<(), StoreError> {
    File::open(path).and_then(|d| d.sync_all()).map_err(io_err("cannot sync", path))
}

/// Creates `path` (and parents) mode 0700, tightening an existing directory that is looser.
pub fn private_dir(path: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(io_err("cannot create", path))?;
    let md = fs::metadata(path).map_err(io_err("cannot stat", path))?;
    if md.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io_err("cannot chmod", path))?;
    }
    Ok(())
}

/// Overwrites a file's bytes with zeros, syncs, and removes it: for key material.
pub fn shred(path: &Path) -> Result<(), StoreError> {
    let len = fs::metadata(path).map_err(io_err("cannot stat", path))?.len();
    let mut f = OpenOptions::new().write(true).open(path).map_err(io_err("cannot open", path))?;
    f.write_all(&vec![0u8; len as usize])
        .and_then(|_| f.sync_all())
        .map_err(io_err("cannot overwrite", path))?;
    fs::remove_file(path).map_err(io_err("cannot remove", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let p = tmp.path().join("f");
        write_atomic(&p, b"one").expect("write");
        write_atomic(&p, b"two").expect("rewrite");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        assert_eq!(fs::read_dir(tmp.path()).expect("ls").count(), 1);
        assert_eq!(fs::metadata(&p).expect("stat").permissions().mode() & 0o777, 0o600);
        shred(&p).expect("shred");
        assert!(!p.exists());
    }
}

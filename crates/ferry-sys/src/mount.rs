//! Private tmpfs mounts: where plaintext checkpoint images live, and nowhere else.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A tmpfs mounted at a directory, mode 0700; unmounted (lazily, so a busy mount cannot
/// linger) and its directory removed on drop.
#[derive(Debug)]
pub struct PrivateTmpfs {
    path: PathBuf,
    mounted: bool,
}

impl PrivateTmpfs {
    /// Creates `path` (which must not exist) and mounts a tmpfs of at most `size_bytes` on it.
    pub fn mount(path: &Path, size_bytes: u64) -> io::Result<PrivateTmpfs> {
        std::fs::create_dir(path)?;
        let mut guard = PrivateTmpfs { path: path.to_path_buf(), mounted: false };
        let target = cstring(path)?;
        let data = CString::new(format!("mode=0700,size={size_bytes}")).map_err(io::Error::other)?;
        // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; the
        // flags forbid devices, setuid and execution from the mount.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        guard.mounted = true;
        Ok(guard)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateTmpfs {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = unmount(&self.path) {
                eprintln!("warning: cannot unmount {}: {e}", self.path.display());
                return;
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// Frees the storage of `len` bytes at `offset` of `file` (the file keeps its size and reads
/// zeros there): page images are dropped from the tmpfs as soon as they are sealed, so a
/// checkpoint needs about one copy of the memory, not two.
pub fn punch_hole(file: &std::fs::File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::other("range too large"));
    };
    // SAFETY: fallocate(2) on a descriptor we own, with plain integer arguments.
    let rc = unsafe {
        libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, n)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Detaches the mount at `path`.
pub fn unmount(path: &Path) -> io::Result<()> {
    let target = cstring(path)?;
    // SAFETY: `target` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::other("path contains NUL"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_mounted(path: &Path) -> bool {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let p = path.to_string_lossy();
        info.lines().any(|l| l.split_whitespace().nth(4) == Some(&p))
    }

    #[test]
    fn mounts_private_and_cleans_up() {
        if !crate::is_root() {
            eprintln!("skipped: mounting needs root");
            assert!(std::env::var("CI").is_err(), "CI runs as root");
            return;
        }
        let base = std::env::temp_dir().join(format!("ferry-sys-tmpfs-{}", std::process::id()));
        {
            let t = PrivateTmpfs::mount(&base, 1 << 20).expect("mount");
            assert!(is_mounted(t.path()));
            let mode = std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(t.path()).expect("stat").permissions(),
            );
            assert_eq!(mode & 0o777, 0o700);
            std::fs::write(t.path().join("x"), b"secret").expect("write");
        }
        assert!(!is_mounted(&base));
        assert!(!base.exists());
    }
}

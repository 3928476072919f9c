//! One CRIU dump at a time per working directory of tasks in another pid namespace.
//!
//! For a task whose `/proc` is not its own pid namespace's, CRIU's parasite mounts a proc at
//! `proc.crtools` in the task's working directory (mkdir, mount, detach, rmdir). Two dumps at
//! once of such tasks sharing that directory collide there: the second mkdir fails with EEXIST
//! ("Can't create a directory (-17)") and that dump fails. Every dump ferry runs therefore holds
//! an exclusive `flock` on that directory (`/run/ferry/dump-locks/DEV-INODE`) while CRIU runs.
//! CRIU does this only for the tree's root task, and only when it is in another pid namespace
//! than CRIU; other dumps lock nothing.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where the lock files live. Each is removed by the dump that held it, while it still holds it;
/// a dump that got the lock of a file removed meanwhile takes a fresh one.
pub const LOCK_DIR: &str = "/run/ferry/dump-locks";

/// The most times a lock is retried after its file was replaced under it.
const MAX_RETRIES: usize = 64;

/// Locks held for one dump; dropping it removes their files and releases them.
#[derive(Debug, Default)]
pub struct CwdLocks {
    held: Vec<(PathBuf, File)>,
}

impl CwdLocks {
    /// Locks the working directory of the tree's root `pid` if it is in another pid namespace
    /// than this process, waiting for another dump that holds it. Best effort: a task that is
    /// gone or a lock that cannot be opened is skipped (the dump then runs as it would without
    /// ferry), with a debug line.
    pub fn take(pid: i32) -> CwdLocks {
        let dirs: BTreeSet<(u64, u64)> = foreign_pidns_cwd(pid).into_iter().collect();
        CwdLocks::take_dirs(Path::new(LOCK_DIR), &dirs)
    }

    /// Locks `dirs` (device, inode) under `lock_dir`, in order.
    pub fn take_dirs(lock_dir: &Path, dirs: &BTreeSet<(u64, u64)>) -> CwdLocks {
        let mut held = Vec::new();
        if dirs.is_empty() {
            return CwdLocks { held };
        }
        if let Err(e) = fs::DirBuilder::new().recursive(true).mode(0o700).create(lock_dir) {
            tracing::debug!(dir = %lock_dir.display(), error = %e, "no dump locks");
            return CwdLocks { held };
        }
        for (dev, ino) in dirs {
            let path = lock_dir.join(format!("{dev:x}-{ino:x}"));
            match lock_one(&path) {
                Ok(file) => held.push((path, file)),
                Err(e) => tracing::debug!(path = %path.display(), error = %e, "cannot take a dump lock"),
            }
        }
        CwdLocks { held }
    }

    /// How many directories are locked.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

impl Drop for CwdLocks {
    fn drop(&mut self) {
        // Removed while still locked: a waiter then finds its file gone and takes a fresh one.
        for (path, file) in self.held.drain(..) {
            let _ = fs::remove_file(&path);
            drop(file);
        }
    }
}

/// Opens (creating) and locks `path`, waiting for its holder; retried when the file was
/// removed or replaced between the open and the lock.
fn lock_one(path: &Path) -> std::io::Result<File> {
    let mut said = false;
    for _ in 0..MAX_RETRIES {
        let file = OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(path)?;
        if file.try_lock().is_err() {
            if !said {
                tracing::info!(
                    lock = %path.display(),
                    "waiting for another checkpoint of a task with the same working directory"
                );
                said = true;
            }
            file.lock()?;
        }
        let ours = file.metadata()?;
        match fs::metadata(path) {
            Ok(now) if now.dev() == ours.dev() && now.ino() == ours.ino() => return Ok(file),
            _ => continue,
        }
    }
    Err(std::io::Error::other("the lock file kept being replaced"))
}

/// The working directory (device, inode) of the tree's root task, if that task is in another
/// pid namespace than this process: only then does CRIU's parasite mount a proc in it, and only
/// in the root task (cr-dump.c: `root_ns_mask & CLONE_NEWPID && root_item == item`).
fn foreign_pidns_cwd(pid: i32) -> Option<(u64, u64)> {
    let ours = fs::metadata("/proc/self/ns/pid").ok()?.ino();
    let proc = PathBuf::from(format!("/proc/{pid}"));
    if fs::metadata(proc.join("ns/pid")).ok()?.ino() == ours {
        return None;
    }
    let cwd = fs::metadata(proc.join("cwd")).ok()?;
    Some((cwd.dev(), cwd.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_dump_of_the_same_directory_waits_for_the_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dirs = BTreeSet::from([(1, 2), (1, 3)]);
        let first = CwdLocks::take_dirs(dir.path(), &dirs);
        assert_eq!(first.len(), 2);
        let (tx, rx) = std::sync::mpsc::channel();
        let lock_dir = dir.path().to_path_buf();
        let waiter = std::thread::spawn(move || {
            let second = CwdLocks::take_dirs(&lock_dir, &BTreeSet::from([(1, 3)]));
            tx.send(second.len()).expect("send");
        });
        // The second cannot have its lock while the first holds it.
        let probe = File::open(dir.path().join("1-3")).expect("lock file");
        assert!(probe.try_lock().is_err(), "the first dump holds the lock");
        assert!(rx.try_recv().is_err(), "the second dump waits");
        drop(first);
        assert_eq!(rx.recv().expect("the second dump goes on"), 1);
        waiter.join().expect("waiter");
        assert_eq!(
            fs::read_dir(dir.path()).expect("lock dir").count(),
            0,
            "each dump removes its lock files"
        );
    }

    #[test]
    fn a_tree_in_our_own_pid_namespace_locks_nothing() {
        let own = std::process::id() as i32;
        assert_eq!(foreign_pidns_cwd(own), None);
        assert!(CwdLocks::take(own).is_empty());
    }
}

//! The journal: one small file per migration in progress, written (and synced) before each
//! step that the other side relies on, so that an agent restarted after a crash knows what it
//! had done and finishes or undoes it (see `recover`). Both sides record the same
//! [`Phase`]s (`phase` has the protocol).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::{OnFailure, Strategy, DEFAULT_RECOVER_TIMEOUT_S};
pub use crate::phase::{Phase, Role};
use crate::MigrateError;

/// Cap on a journal file: a few hundred bytes in practice.
const MAX_ENTRY: u64 = 64 << 10;

/// The source's frozen tree, held in a freezer cgroup of ferry's from the switch on (see
/// `holder`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The freezer cgroup (a directory under the freezer hierarchy).
    pub cgroup: PathBuf,
    /// The freezer cgroup the tree was in before (relative to the hierarchy's root), where it
    /// goes back if it is resumed.
    pub origin: String,
    /// The held processes: host pid and start time.
    #[serde(default)]
    pub pids: Vec<(i32, u64)>,
}

/// One migration's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub migration: String,
    pub role: Role,
    pub phase: Phase,
    /// The other node.
    pub peer: String,
    pub strategy: Strategy,
    /// Source: the tree's root; target: the restored root (pid and start time, so that a
    /// reused pid is never killed).
    pub pid: i32,
    pub start_time: u64,
    /// Lab workload number (source: the old one; target: the arriving one).
    pub lab_workload: Option<u64>,
    /// Checkpoints made for this migration, removed at the end.
    pub checkpoints: Vec<String>,
    /// Packs written for them, released at the end.
    #[serde(default)]
    pub packs: Vec<[u8; 16]>,
    /// A container's `KIND:NAME` (source: the one leaving; target: the one restored), which
    /// its runtime must forget when the migration ends that way.
    #[serde(default)]
    pub container: Option<String>,
    /// Source: where the frozen tree is held from the switch on.
    #[serde(default)]
    pub held: Option<Held>,
    /// How long a lost peer is waited for after the switch.
    #[serde(default = "default_recover")]
    pub recover_timeout_s: u32,
    /// Source: what a migration that cannot finish does.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Lost: why, and at which point.
    #[serde(default)]
    pub lost: Option<String>,
}

fn default_recover() -> u32 {
    DEFAULT_RECOVER_TIMEOUT_S
}

impl Entry {
    /// A fresh record of `migration` with `peer`.
    pub fn new(migration: &str, role: Role, peer: &str, strategy: Strategy) -> Entry {
        Entry {
            migration: migration.to_owned(),
            role,
            phase: Phase::Prepare,
            peer: peer.to_owned(),
            strategy,
            pid: 0,
            start_time: 0,
            lab_workload: None,
            checkpoints: Vec::new(),
            packs: Vec::new(),
            container: None,
            held: None,
            recover_timeout_s: DEFAULT_RECOVER_TIMEOUT_S,
            on_failure: OnFailure::Lost,
            lost: None,
        }
    }

    /// The recover timeout as a duration.
    pub fn recover_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.recover_timeout_s.max(1)))
    }

    pub fn post_copy(&self) -> bool {
        self.strategy == Strategy::PostCopy
    }
}

/// The journal directory of an agent.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    pub fn open(dir: impl Into<PathBuf>) -> Result<Journal, MigrateError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        Ok(Journal { dir })
    }

    fn path(&self, migration: &str) -> PathBuf {
        self.dir.join(format!("{migration}.json"))
    }

    /// Writes `entry` durably (temp file, fsync, rename, fsync of the directory).
    pub fn write(&self, entry: &Entry) -> Result<(), MigrateError> {
        let path = self.path(&entry.migration);
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec(entry).map_err(|e| MigrateError::protocol(e.to_string()))?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.write_all(&bytes).and_then(|_| f.sync_all()).map_err(io("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("rename", &path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io("sync", &self.dir))?;
        Ok(())
    }

    pub fn read(&self, migration: &str) -> Option<Entry> {
        read_entry(&self.path(migration))
    }

    /// Forgets a finished migration.
    pub fn remove(&self, migration: &str) {
        let _ = fs::remove_file(self.path(migration));
    }

    /// Every entry left (what a crash interrupted).
    pub fn entries(&self) -> Vec<Entry> {
        let Ok(dir) = fs::read_dir(&self.dir) else { return Vec::new() };
        dir.flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| read_entry(&e.path()))
            .collect()
    }
}

fn read_entry(path: &Path) -> Option<Entry> {
    let md = fs::metadata(path).ok()?;
    if md.len() > MAX_ENTRY {
        tracing::warn!(path = %path.display(), "journal entry over its size cap: ignored");
        return None;
    }
    let bytes = fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "damaged journal entry: ignored");
            None
        }
    }
}

fn io<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> MigrateError + 'p {
    move |source| MigrateError::Io { action, path: path.to_path_buf(), source }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_and_damaged_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let e = Entry {
            phase: Phase::Transfer,
            pid: 42,
            start_time: 7,
            lab_workload: Some(3),
            checkpoints: vec!["m1".into()],
            packs: vec![[1; 16]],
            container: Some("runc:web".into()),
            held: Some(Held {
                cgroup: "/sys/fs/cgroup/freezer/x".into(),
                origin: "/".into(),
                pids: vec![(42, 7)],
            }),
            ..Entry::new("m1", Role::Source, "node2", Strategy::PostCopy)
        };
        j.write(&e).unwrap();
        j.write(&Entry { phase: Phase::Switched, ..e.clone() }).unwrap();
        fs::write(dir.path().join("bad.json"), b"{not json").unwrap();
        let all = Journal::open(dir.path()).unwrap().entries();
        assert_eq!(all, vec![Entry { phase: Phase::Switched, ..e }]);
        j.remove("m1");
        assert!(j.read("m1").is_none());
    }
}

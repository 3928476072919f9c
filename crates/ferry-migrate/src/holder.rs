//! The source's hold on its frozen tree from the switch on: a cgroup v1 freezer cgroup of
//! ferry's (`/sys/fs/cgroup/freezer/ferry-hold/MIGRATION`), FROZEN, with the tree in it.
//!
//! CRIU holds a dumped tree stopped (ptrace) only while it waits at post-dump, and lets it go
//! when the agent answers, or when the agent's end of its socket closes (a crash): then it
//! resumes the tree. In the freezer the tree cannot run whatever CRIU does: a resumed task
//! stays frozen, and so does a task with a SIGKILL pending (measured on this kernel: CRIU's
//! `PTRACE_DETACH` and its kill both leave the task frozen with its memory, which
//! `/proc/PID/mem` still reads; thawed, the first runs on and the second dies). So a
//! source agent that dies after the switch leaves the tree frozen with every page the target
//! still needs, and the agent that starts again finds it here (its journal names the
//! cgroup) and serves those pages.
//!
//! Ends: [`kill`] (SIGKILL to every held process while frozen, then thawed: they die
//! without running an instruction of theirs), or [`release`] (back into the cgroup they came
//! from, which thaws them: they run again, if CRIU no longer holds them). Both remove the
//! cgroup. Moving a few processes and freezing them takes 0.1 to 0.3 ms (12 ms the first time
//! after a while: the kernel's cgroup lock); it runs while the checkpoint crosses.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::journal::Held;
use crate::MigrateError;

/// The cgroup v1 freezer hierarchy.
pub(crate) const FREEZER: &str = "/sys/fs/cgroup/freezer";
/// ferry's holders, under it.
pub(crate) const HOLD_DIR: &str = "ferry-hold";
/// How long freezing, or waiting for killed processes to go, may take.
const WAIT: Duration = Duration::from_secs(10);

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MigrateError {
    let path = path.to_path_buf();
    move |source| MigrateError::Io { action, path, source }
}

/// True if this host has the cgroup v1 freezer (the hold needs it).
pub(crate) fn available() -> bool {
    Path::new(FREEZER).join("cgroup.procs").exists()
}

/// The holder `migration` will use for the tree rooted at `root` (nothing is created): its
/// cgroup, and the freezer cgroup the root is in now (where the tree goes back if resumed).
pub(crate) fn plan(migration: &str, root: i32) -> Held {
    Held {
        cgroup: Path::new(FREEZER).join(HOLD_DIR).join(migration),
        origin: freezer_cgroup_of(root).unwrap_or_else(|| "/".into()),
        pids: Vec::new(),
    }
}

/// Moves the tree rooted at `root` (every process, with all its threads) into `held`'s
/// cgroup and freezes it; returns the processes held, with their start times.
pub(crate) fn hold(held: &Held, root: i32) -> Result<Vec<(i32, u64)>, MigrateError> {
    let t = Instant::now();
    let parent = held.cgroup.parent().unwrap_or(Path::new(FREEZER));
    // The parent is removed by whoever empties it last: it may go between the two steps.
    for attempt in 0..3 {
        fs::create_dir_all(parent).map_err(io("create", parent))?;
        match fs::create_dir(&held.cgroup) {
            Err(e) if e.kind() == ErrorKind::NotFound && attempt < 2 => continue,
            Err(e) if e.kind() != ErrorKind::AlreadyExists => return Err(io("create", &held.cgroup)(e)),
            _ => break,
        }
    }
    let tree = tree_of(root);
    let procs = held.cgroup.join("cgroup.procs");
    let mut pids = Vec::with_capacity(tree.len());
    for pid in tree {
        fs::write(&procs, pid.to_string()).map_err(io("write", &procs))?;
        pids.push((pid, ferry_lab::start_time(pid).unwrap_or(0)));
    }
    set_state(&held.cgroup, "FROZEN")?;
    wait_state(&held.cgroup, "FROZEN")?;
    tracing::debug!(cgroup = %held.cgroup.display(), processes = pids.len(), seconds = t.elapsed().as_secs_f64(), "the frozen tree is held");
    Ok(pids)
}

/// True while `held`'s cgroup exists.
pub(crate) fn exists(held: &Held) -> bool {
    held.cgroup.is_dir()
}

/// The processes (thread group ids) in `held`'s cgroup.
pub(crate) fn members(held: &Held) -> Vec<i32> {
    members_of(&held.cgroup)
}

fn members_of(cgroup: &Path) -> Vec<i32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// True if `pid` is in `held`'s cgroup.
#[cfg(test)]
pub(crate) fn holds(held: &Held, pid: i32) -> bool {
    let Ok(rel) = held.cgroup.strip_prefix(FREEZER) else { return false };
    freezer_cgroup_of(pid).is_some_and(|c| Path::new(&c) == Path::new("/").join(rel))
}

/// Starts killing the held tree and returns: SIGKILL to each process while it is frozen, then
/// thawed, so that it dies without running an instruction of its own. [`kill`] then waits for
/// it and removes the holder (while CRIU still holds the tree, CRIU reaps it first).
pub(crate) fn doom(held: &Held) -> Result<(), MigrateError> {
    if !exists(held) {
        return Ok(());
    }
    for pid in members(held) {
        let _ = ferry_sys::kill(pid, ferry_sys::Signal::Kill);
    }
    set_state(&held.cgroup, "THAWED")
}

/// Kills the held tree: SIGKILL to each process while it is frozen, then thawed so that it
/// dies; waits until the cgroup is empty and removes it. Nothing of the tree runs again.
pub(crate) fn kill(held: &Held) -> Result<(), MigrateError> {
    if !exists(held) {
        return Ok(());
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let left = members(held);
        if left.is_empty() {
            break;
        }
        for pid in &left {
            let _ = ferry_sys::kill(*pid, ferry_sys::Signal::Kill);
        }
        set_state(&held.cgroup, "THAWED")?;
        if Instant::now() >= deadline {
            return Err(MigrateError::Refused(format!(
                "processes {left:?} held in {} would not die",
                held.cgroup.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    remove(&held.cgroup)
}

/// Lets the held tree go: every process back into the cgroup it came from (which thaws it),
/// then the holder removed. It runs again unless CRIU still holds it stopped (then CRIU's
/// resume lets it run).
pub(crate) fn release(held: &Held) -> Result<(), MigrateError> {
    if !exists(held) {
        return Ok(());
    }
    let origin = Path::new(FREEZER).join(held.origin.trim_start_matches('/'));
    let origin = if origin.join("cgroup.procs").exists() { origin } else { PathBuf::from(FREEZER) };
    let procs = origin.join("cgroup.procs");
    for pid in members(held) {
        if let Err(e) = fs::write(&procs, pid.to_string()) {
            tracing::warn!(pid, error = %e, "could not move a held process back: thawing it where it is");
        }
    }
    set_state(&held.cgroup, "THAWED")?;
    let deadline = Instant::now() + WAIT;
    while !members(held).is_empty() {
        if Instant::now() >= deadline {
            // Thawed where they are: they run; the empty holder is for `ferry lab down` or
            // the next recovery to remove.
            tracing::warn!(cgroup = %held.cgroup.display(), "held processes stayed in the holder (thawed)");
            return Ok(());
        }
        let procs_now = members(held);
        for pid in procs_now {
            let _ = fs::write(&procs, pid.to_string());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    remove(&held.cgroup)
}

/// Removes a holder's cgroup (empty), retrying while the kernel still counts dying tasks.
fn remove(cgroup: &Path) -> Result<(), MigrateError> {
    let deadline = Instant::now() + WAIT;
    loop {
        let removed = fs::remove_dir(cgroup);
        if !cgroup.exists() {
            // `ferry-hold` itself goes with its last holder (it stays while others hold).
            if let Some(parent) = cgroup.parent() {
                let _ = fs::remove_dir(parent);
            }
            return Ok(());
        }
        if let Err(e) = removed {
            if Instant::now() >= deadline {
                return Err(io("remove", cgroup)(e));
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn set_state(cgroup: &Path, state: &str) -> Result<(), MigrateError> {
    let f = cgroup.join("freezer.state");
    fs::write(&f, state).map_err(io("write", &f))
}

fn wait_state(cgroup: &Path, state: &str) -> Result<(), MigrateError> {
    let f = cgroup.join("freezer.state");
    let deadline = Instant::now() + WAIT;
    loop {
        let now = fs::read_to_string(&f).map_err(io("read", &f))?;
        if now.trim() == state {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(MigrateError::Refused(format!(
                "{} stays {} (not {state})",
                cgroup.display(),
                now.trim()
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The freezer cgroup of `pid`, relative to the hierarchy's root (`/`, `/ferry-runc/x`, ...).
fn freezer_cgroup_of(pid: i32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == "freezer").then(|| path.to_owned())
    })
}

/// `root` and every process below it.
pub(crate) fn tree_of(root: i32) -> Vec<i32> {
    ferry_sys::process_tree(root)
}

/// Holders left on this host whose processes are all gone (a crash between a kill and the
/// removal): removed. Those still holding processes are kept (a journal names them).
pub(crate) fn sweep_empty() {
    let dir = Path::new(FREEZER).join(HOLD_DIR);
    let Ok(entries) = fs::read_dir(&dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() && members_of(&p).is_empty() {
            let _ = fs::remove_dir(&p);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A stopped child is held (it stays frozen through SIGCONT), released (it runs), held
    /// again and killed (SIGKILL while frozen, then gone).
    #[test]
    fn hold_release_and_kill_a_process() {
        if !ferry_testkit::require_privileged() || !available() {
            return;
        }
        let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
        let pid = child.id() as i32;
        let migration = format!("test-hold-{pid}");
        let held = plan(&migration, pid);
        assert!(!exists(&held));
        let pids = hold(&held, pid).unwrap();
        assert_eq!(pids.len(), 1);
        assert!(holds(&held, pid));
        assert_eq!(ferry_sys::process_state(pid), Some('D'), "frozen");
        release(&held).unwrap();
        assert!(!exists(&held));
        assert!(!holds(&held, pid));
        assert_eq!(ferry_sys::process_state(pid), Some('S'), "runs again");
        hold(&held, pid).unwrap();
        ferry_sys::kill(pid, ferry_sys::Signal::Kill).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(ferry_sys::process_state(pid), Some('D'), "killed, but frozen: still there");
        kill(&held).unwrap();
        assert!(!exists(&held));
        let status = child.wait().unwrap();
        assert!(!status.success());
    }
}

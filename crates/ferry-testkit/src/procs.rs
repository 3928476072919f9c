//! Process identities and trees, read from /proc.

use std::fs;

use ferry_sys::{kill, process_exists, Signal};

/// A process as it was when first seen: its pid plus its start time, so that a pid the kernel
/// has since given to another process (perhaps another test's) is never signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcId {
    pub pid: i32,
    pub start: u64,
}

impl ProcId {
    /// The process now running as `pid`, or `None` if there is none.
    pub fn of(pid: i32) -> Option<ProcId> {
        start_time(pid).map(|start| ProcId { pid, start })
    }

    /// True while this very process exists and is not a zombie.
    pub fn alive(&self) -> bool {
        process_exists(self.pid) && start_time(self.pid) == Some(self.start)
    }

    /// SIGKILLs this process and everything below it, if it is still the same process.
    pub fn kill_tree(&self) {
        if !self.alive() {
            return;
        }
        // Collected before the root dies: once it does, its children move to another parent.
        let below = descendants(self.pid);
        let _ = kill(self.pid, Signal::Kill);
        for pid in below {
            let _ = kill(pid, Signal::Kill);
        }
    }
}

/// The start time of `pid` (field 22 of /proc/PID/stat, in clock ticks since boot).
pub fn start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields resume after the last ')'.
    // After it come field 3 (state) onwards, so field 22 is the 20th.
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(19)?.parse().ok()
}

/// Sends the signal named `name` (`STOP`, `CONT`, `USR2`, ...) to `pid` with kill(1), for the
/// signals [`Signal`] does not name.
pub fn signal_by_name(pid: i32, name: &str) -> std::io::Result<()> {
    let status = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("kill -{name} {pid} failed: {status}")))
    }
}

/// The one-word name of `pid` (`/proc/PID/comm`), if it exists.
pub fn comm(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|c| c.trim_end().to_string())
}

/// The direct children of `pid`, over all its threads.
pub fn children(pid: i32) -> Vec<i32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        if let Ok(list) = fs::read_to_string(task.path().join("children")) {
            out.extend(list.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    out
}

/// All processes below `pid`, depth first.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = children(pid);
    while let Some(p) = todo.pop() {
        if !out.contains(&p) {
            todo.extend(children(p));
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    #[test]
    fn own_identity_is_stable() {
        let me = std::process::id() as i32;
        let id = ProcId::of(me).expect("own stat");
        assert!(id.alive());
        assert_eq!(ProcId::of(me), Some(id));
        assert_eq!(ProcId::of(i32::MAX), None);
    }

    #[test]
    fn a_reused_pid_is_not_the_same_process() {
        let me = std::process::id() as i32;
        let stale = ProcId { pid: me, start: start_time(me).expect("own stat") + 1 };
        // kill_tree must refuse: were it to signal, this test process would die.
        assert!(!stale.alive());
        stale.kill_tree();
    }

    #[test]
    fn tree_is_found_and_killed() {
        let mut sh =
            Command::new("sh").args(["-c", "sleep 1000 & sleep 1000 & wait"]).spawn().expect("spawn sh");
        let root = sh.id() as i32;
        let below = crate::poll(crate::WAIT, "two sleeps", || {
            let d = descendants(root);
            (d.len() == 2).then_some(d)
        });
        ProcId::of(root).expect("sh running").kill_tree();
        sh.wait().expect("reap sh");
        // The sleeps were reparented and reaped elsewhere; they must at least be dead.
        crate::poll(crate::WAIT, "sleeps to die", || below.iter().all(|p| !process_exists(*p)).then_some(()));
    }
}

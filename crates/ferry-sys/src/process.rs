//! Processes: signals, liveness, reaping, privileges, and keeping one descriptor across exec.

use crate::retry::retry_eintr;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Signals ferry sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Kill,
    Term,
    Cont,
    Usr1,
    /// Signal 0: checks that the process exists and may be signalled.
    Probe,
}

impl Signal {
    fn raw(self) -> libc::c_int {
        match self {
            Signal::Kill => libc::SIGKILL,
            Signal::Term => libc::SIGTERM,
            Signal::Cont => libc::SIGCONT,
            Signal::Usr1 => libc::SIGUSR1,
            Signal::Probe => 0,
        }
    }
}

/// Sends signal number `sig` (1-64, e.g. one the user named) to `pid`.
pub fn kill_raw(pid: i32, sig: i32) -> io::Result<()> {
    if pid <= 0 || !(1..=64).contains(&sig) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "pid must be positive and the signal 1-64"));
    }
    // SAFETY: kill(2) takes plain integers; a positive pid addresses exactly one process.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `sig` to `pid`.
pub fn kill(pid: i32, sig: Signal) -> io::Result<()> {
    if pid <= 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "pid must be positive"));
    }
    // SAFETY: kill(2) takes plain integers; a positive pid addresses exactly one process.
    let rc = unsafe { libc::kill(pid, sig.raw()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `root` and every process below it (its threads' children, recursively), root first.
pub fn process_tree(root: i32) -> Vec<i32> {
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let pid = tree[i];
        if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                let text = fs::read_to_string(t.path().join("children")).unwrap_or_default();
                for c in text.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
                    if !tree.contains(&c) {
                        tree.push(c);
                    }
                }
            }
        }
        i += 1;
    }
    tree
}

/// The start time of `pid` (clock ticks after boot, field 22 of `/proc/PID/stat`): with the
/// pid, it names one process even after the pid is reused.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields resume after the last ')'.
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(19)?.parse().ok()
}

/// True while the process `pid` started at `start` runs (not a zombie).
pub fn process_is(pid: i32, start: u64) -> bool {
    pid > 0 && process_exists(pid) && process_start_time(pid) == Some(start)
}

/// True while `/proc/PID` exists and the process is not a zombie.
pub fn process_exists(pid: i32) -> bool {
    matches!(process_state(pid), Some(s) if s != 'Z' && s != 'X')
}

/// The one-letter state of `pid` from `/proc/PID/stat` (`R`, `S`, `T`, `Z`, ...), or `None`.
pub fn process_state(pid: i32) -> Option<char> {
    if pid <= 0 {
        return None;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: the state follows the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().next()?.chars().next()
}

/// How a reaped child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    Exited(i32),
    Signaled(i32),
}

impl ChildExit {
    /// The exit code a shell would report: the status, or 128 + signal.
    pub fn shell_code(self) -> i32 {
        match self {
            ChildExit::Exited(c) => c,
            ChildExit::Signaled(s) => 128 + s,
        }
    }
}

/// Waits for `pid`, which must be a child of this process (for example a tree CRIU restored as
/// our sibling with `rst_sibling`), and reaps it.
pub fn wait_child(pid: i32) -> io::Result<ChildExit> {
    let mut status: libc::c_int = 0;
    // SAFETY: `status` is a valid out-pointer; waitpid only writes an int through it.
    retry_eintr(|| unsafe { libc::waitpid(pid, &mut status, 0) })?;
    if libc::WIFEXITED(status) {
        Ok(ChildExit::Exited(libc::WEXITSTATUS(status)))
    } else {
        Ok(ChildExit::Signaled(libc::WTERMSIG(status)))
    }
}

/// Makes every file this process (and its children, CRIU among them) creates private to its
/// owner. Restored tasks get back their own umask from the checkpoint.
pub fn private_umask() {
    // SAFETY: umask(2) only sets the process's file mode creation mask and cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

/// Moves the calling thread to the idle scheduling class (`SCHED_IDLE`): it then runs only
/// on CPU time nothing else wants. For background transfers that must not slow the workload
/// they serve.
pub fn idle_priority_for_this_thread() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid, initialized sched_param that outlives the call; pid 0 names
    // the calling thread, and the kernel only reads through the pointer.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The effective user id of this process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// True when running with effective uid 0.
pub fn is_root() -> bool {
    effective_uid() == 0
}

/// Makes `fd` survive `exec` in the child `cmd` spawns, at the same number, without touching
/// the parent's copy (which stays close-on-exec, so no other child inherits it).
pub fn inherit_fd_in_child(cmd: &mut Command, fd: BorrowedFd<'_>) {
    let raw = fd.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and calls only fcntl(2), which is
    // async-signal-safe; `raw` stays open in the child because the parent holds it while spawning.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(raw, libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_running() {
        let me = std::process::id() as i32;
        assert!(process_exists(me));
        assert!(matches!(process_state(me), Some('R') | Some('S')));
        kill(me, Signal::Probe).expect("probe self");
    }

    #[test]
    fn missing_process_is_reported() {
        // PIDs above pid_max never exist.
        assert!(!process_exists(i32::MAX));
        assert!(kill(i32::MAX, Signal::Probe).is_err());
        assert!(kill(0, Signal::Kill).is_err());
    }

    #[test]
    #[allow(clippy::zombie_processes)] // reaped by wait_child, which is what is tested
    fn child_exit_codes() {
        let child = Command::new("sh").args(["-c", "exit 7"]).spawn().expect("spawn sh");
        assert_eq!(wait_child(child.id() as i32).expect("wait"), ChildExit::Exited(7));
        let child = Command::new("sleep").arg("30").spawn().expect("spawn sleep");
        kill(child.id() as i32, Signal::Kill).expect("kill");
        let exit = wait_child(child.id() as i32).expect("wait");
        assert_eq!(exit, ChildExit::Signaled(libc::SIGKILL));
        assert_eq!(exit.shell_code(), 137);
    }
}

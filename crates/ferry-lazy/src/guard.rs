//! A lazy restore's guard: a small process of its own (`ferryd guard MIGRATION` for a
//! post-copy arrival, `ferry guard NAME` for `ferry restore --lazy`) that outlives the process
//! serving the pages (the target's agent, or `ferry restore`) and kills the restored workload
//! if that process dies before the workload has all its pages. Below, "the agent" is that
//! process.
//!
//! Why: the pager, inside the agent, holds the restored processes' userfaultfds.
//! When the last copy of a userfaultfd closes, the kernel serves the pages still missing as
//! zero pages: a workload whose agent died would run on with zeros where its memory was (a
//! Python heap crashes; plain data is silently wrong). The guard holds a copy of every
//! userfaultfd too (the pager hands each one over as it comes: the restore's, and a forked
//! child's), so that when the agent dies the faulting threads keep waiting instead; it sees
//! its end of the agent's socket close, kills the arriving processes (the restored root, with
//! its start time, and everything in the arriving namespace), waits until they are gone, and
//! only then exits, closing its copies. When the pages are all in (or the arrival is undone
//! by the agent itself) the agent tells it to go quietly.
//!
//! The guard's command line carries no socket path: an operator (or a test) stopping the
//! agent by its socket does not stop its guards. It runs in a process group of its own.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Keeper, LazyError};

/// Every message: a tag byte, padding, two u64 (little-endian).
const MSG: usize = 24;
/// A userfaultfd to keep (attached by `SCM_RIGHTS`).
const KEEP: u8 = b'U';
/// A process to kill if abandoned: pid, start time.
const WATCH: u8 = b'P';
/// A network namespace whose processes to kill if abandoned: device, inode.
const NETNS: u8 = b'N';
/// The arrival is over: exit without killing anything.
const RELEASE: u8 = b'R';
/// How long the guard keeps killing before it gives up.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// The agent's end of a guard.
#[derive(Debug)]
pub struct Guard {
    sock: Mutex<UnixStream>,
    /// The guard process, until it is released.
    child: Mutex<Option<Child>>,
    migration: String,
}

impl Guard {
    /// Starts `program` (its first element the executable) with `migration` appended.
    pub fn spawn(program: &[String], migration: &str) -> Result<Arc<Guard>, LazyError> {
        let io = |source| LazyError::Io { what: format!("start the guard {}", program[0]), source };
        let (ours, theirs) = UnixStream::pair().map_err(io)?;
        let mut cmd = Command::new(&program[0]);
        cmd.args(&program[1..])
            .arg(migration)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .process_group(0);
        let child = cmd.spawn().map_err(io)?;
        tracing::debug!(%migration, pid = child.id(), "guard started");
        Ok(Arc::new(Guard {
            sock: Mutex::new(ours),
            child: Mutex::new(Some(child)),
            migration: migration.into(),
        }))
    }

    fn send(&self, tag: u8, a: u64, b: u64, fd: Option<BorrowedFd<'_>>) {
        let mut m = [0u8; MSG];
        m[0] = tag;
        m[8..16].copy_from_slice(&a.to_le_bytes());
        m[16..24].copy_from_slice(&b.to_le_bytes());
        let Ok(mut sock) = self.sock.lock() else { return };
        let sent = match fd {
            Some(fd) => ferry_sys::send_with_fd(&sock, &m, fd),
            None => sock.write_all(&m),
        };
        if let Err(e) = sent {
            tracing::warn!(migration = %self.migration, error = %e, "the arrival's guard did not get a message");
        }
    }

    /// What the pager hands each userfaultfd to.
    pub fn keeper(self: &Arc<Self>) -> Keeper {
        let g = self.clone();
        Keeper(Arc::new(move |fd| g.send(KEEP, 0, 0, Some(fd))))
    }

    /// A process the guard kills if it is abandoned (checked by its start time).
    pub fn watch(&self, pid: i32, start_time: u64) {
        self.send(WATCH, pid as u64, start_time, None);
    }

    /// A network namespace whose processes the guard kills if it is abandoned.
    pub fn watch_netns(&self, path: &Path) {
        match std::fs::metadata(path) {
            Ok(md) => self.send(NETNS, md.dev(), md.ino(), None),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "the guard cannot watch the namespace")
            }
        }
    }

    /// The arrival no longer needs guarding (every page is in, or the agent undid it): the
    /// guard closes its copies and exits.
    pub fn release(&self) {
        let Some(mut child) = self.child.lock().ok().and_then(|mut c| c.take()) else { return };
        self.send(RELEASE, 0, 0, None);
        let _ = child.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.release();
    }
}

/// The guard process (`ferryd guard MIGRATION`, `ferry guard NAME`), its stdin the agent's socket.
pub fn run(migration: &str) -> ExitCode {
    let sock = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => UnixStream::from(fd),
        Err(e) => {
            eprintln!("guard {migration}: no socket on stdin: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut kept: Vec<OwnedFd> = Vec::new();
    let mut pids: Vec<(i32, u64)> = Vec::new();
    let mut namespaces: Vec<(u64, u64)> = Vec::new();
    loop {
        let mut m = [0u8; MSG];
        match ferry_sys::recv_with_fd(&sock, &mut m) {
            Ok(Some(fd)) => {
                let a = u64::from_le_bytes(m[8..16].try_into().unwrap_or_default());
                let b = u64::from_le_bytes(m[16..24].try_into().unwrap_or_default());
                match m[0] {
                    KEEP => kept.extend(fd),
                    WATCH => pids.push((a as i32, b)),
                    NETNS => namespaces.push((a, b)),
                    RELEASE => return ExitCode::SUCCESS,
                    _ => {}
                }
            }
            // The agent is gone (its end closed with it).
            Ok(None) | Err(_) => break,
        }
    }
    eprintln!(
        "guard {migration}: the process serving its pages died before the workload had all its pages: killing it ({} processes watched, {} namespaces; its missing pages can no longer come)",
        pids.len(),
        namespaces.len()
    );
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let victims = victims(&pids, &namespaces);
        if victims.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            eprintln!("guard {migration}: processes {victims:?} would not die");
            break;
        }
        for pid in victims {
            let _ = ferry_sys::kill(pid, ferry_sys::Signal::Kill);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Only now may the userfaultfds close.
    drop(kept);
    ExitCode::SUCCESS
}

/// The watched processes still alive, their descendants, and every process in a watched
/// namespace.
fn victims(pids: &[(i32, u64)], namespaces: &[(u64, u64)]) -> Vec<i32> {
    let mut out = Vec::new();
    for &(pid, start) in pids {
        if ferry_sys::process_is(pid, start) {
            out.extend(ferry_sys::process_tree(pid));
        }
    }
    if !namespaces.is_empty() {
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
                let Ok(md) = std::fs::metadata(format!("/proc/{pid}/ns/net")) else { continue };
                if namespaces.contains(&(md.dev(), md.ino())) && !out.contains(&pid) {
                    out.push(pid);
                }
            }
        }
    }
    let me = std::process::id() as i32;
    out.retain(|p| *p != me && ferry_sys::process_state(*p).is_some_and(|s| s != 'Z'));
    out
}

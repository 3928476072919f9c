//! The source side: pages read from the frozen tree while CRIU waits at post-dump.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::images::{lazy_ranges, tree_pids, LazyRanges};
use super::proto::PAGE_SIZE;
use super::{LazyError, MAX_REQUEST_PAGES};

/// At most this many processes are looked at while mapping the tree's pids.
const MAX_WALK: usize = 1 << 16;

#[derive(Debug)]
struct Task {
    host_pid: i32,
    ranges: LazyRanges,
    /// `/proc/<host pid>/mem`, opened once: it stays bound to that task's memory even if the
    /// pid were reused later.
    mem: File,
}

/// Serves the lazy pages of a dumped tree that CRIU holds frozen (between post-dump and the
/// end of its page-server session). Knows from the images which ranges are lazy and refuses
/// every other request; reads them from `/proc/<host pid>/mem`. Shareable between threads.
#[derive(Debug)]
pub struct PageSource {
    tasks: BTreeMap<u32, Task>,
    bytes: AtomicU64,
    requests: AtomicU64,
    /// When a request was last served.
    last: Mutex<Option<Instant>>,
}

/// Who holds the tree frozen, which [`PageSource::open_with`] checks of every process.
#[derive(Debug, Clone, Copy)]
pub enum HeldBy<'a> {
    /// CRIU, at post-dump (the tasks are ptrace-stopped: state `t`).
    Criu,
    /// A freezer cgroup (this directory of the hierarchy, which every process must be in).
    Freezer(&'a Path),
}

impl PageSource {
    /// Opens the source for the lazy dump in `images_dir` of the tree rooted at host pid
    /// `root_host_pid`. Call it at post-dump: the images are complete and the tasks frozen.
    pub fn open(images_dir: &Path, root_host_pid: i32) -> Result<PageSource, LazyError> {
        Self::open_with(images_dir, root_host_pid, HeldBy::Criu)
    }

    /// As [`open`](Self::open), for a tree held frozen by `held` (an agent that restarted
    /// finds the tree of a migration in its freezer cgroup, no longer stopped by CRIU).
    pub fn open_with(
        images_dir: &Path,
        root_host_pid: i32,
        held: HeldBy<'_>,
    ) -> Result<PageSource, LazyError> {
        let pids = tree_pids(images_dir)?;
        let host = host_pids_by_ns_pid(root_host_pid)?;
        let root = pids[0];
        if host.get(&root) != Some(&root_host_pid) {
            return Err(LazyError::Tree(format!(
                "pstree.img's root is pid {root}, host pid {root_host_pid} is not it in its namespace"
            )));
        }
        let mut tasks = BTreeMap::new();
        for pid in pids {
            let ranges = lazy_ranges(images_dir, pid)?;
            if ranges.is_empty() {
                continue;
            }
            let host_pid = *host.get(&pid).ok_or_else(|| {
                LazyError::Tree(format!("process {pid} of the images is not in the tree of {root_host_pid}"))
            })?;
            match held {
                HeldBy::Criu => {
                    let state = process_state(host_pid);
                    if state != Some('t') {
                        return Err(LazyError::Tree(format!(
                            "process {pid} (host {host_pid}) is not frozen by CRIU (state {state:?})"
                        )));
                    }
                }
                HeldBy::Freezer(cgroup) => {
                    if !in_cgroup(host_pid, cgroup) {
                        return Err(LazyError::Tree(format!(
                            "process {pid} (host {host_pid}) is not held in {}",
                            cgroup.display()
                        )));
                    }
                }
            }
            let mem = File::open(format!("/proc/{host_pid}/mem"))
                .map_err(|e| LazyError::Io { what: format!("open /proc/{host_pid}/mem"), source: e })?;
            tasks.insert(pid, Task { host_pid, ranges, mem });
        }
        Ok(PageSource {
            tasks,
            bytes: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            last: Mutex::new(None),
        })
    }

    /// Reads `nr_pages` pages at `vaddr` of process `pid` (its pid in the images) into `out`
    /// (replacing its content). Refuses anything outside the process's lazy ranges.
    pub fn read(&self, pid: u32, vaddr: u64, nr_pages: u32, out: &mut Vec<u8>) -> Result<(), LazyError> {
        let refused = |why: &str| LazyError::Refused { pid, vaddr, nr_pages, why: why.to_string() };
        if nr_pages == 0 || nr_pages > MAX_REQUEST_PAGES {
            return Err(refused("page count out of bounds"));
        }
        if !vaddr.is_multiple_of(PAGE_SIZE) {
            return Err(refused("address not page aligned"));
        }
        let task = self.tasks.get(&pid).ok_or_else(|| refused("no such process with lazy pages"))?;
        let len = u64::from(nr_pages) * PAGE_SIZE;
        let end = vaddr.checked_add(len).ok_or_else(|| refused("range wraps"))?;
        if !task.ranges.covers(vaddr, end) {
            return Err(refused("not a lazy range of the images"));
        }
        // Every byte is overwritten below: only growth needs filling (buffers are reused).
        out.truncate(len as usize);
        out.resize(len as usize, 0);
        let mut done = 0usize;
        while done < out.len() {
            match task.mem.read_at(&mut out[done..], vaddr + done as u64) {
                Ok(0) => {
                    return Err(LazyError::Io {
                        what: format!("read {len} bytes at {vaddr:#x} of host pid {}", task.host_pid),
                        source: std::io::ErrorKind::UnexpectedEof.into(),
                    })
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(LazyError::Io {
                        what: format!("read {len} bytes at {vaddr:#x} of host pid {}", task.host_pid),
                        source: e,
                    })
                }
            }
        }
        self.bytes.fetch_add(len, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last.lock() {
            *last = Some(Instant::now());
        }
        Ok(())
    }

    /// When a request was last served (the target was heard of then).
    pub fn last_served(&self) -> Option<Instant> {
        self.last.lock().ok().and_then(|l| *l)
    }

    /// Bytes served so far.
    pub fn bytes_served(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Requests served so far.
    pub fn requests_served(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Bytes of all lazy ranges of the tree.
    pub fn lazy_bytes(&self) -> u64 {
        self.tasks.values().map(|t| t.ranges.bytes()).sum()
    }

    /// Every lazy range of the tree: (pid in the images, start, end), in pid and address order.
    pub fn ranges(&self) -> Vec<(u32, u64, u64)> {
        self.tasks.iter().flat_map(|(pid, t)| t.ranges.iter().map(move |(s, e)| (*pid, s, e))).collect()
    }

    /// Host pid of the process `pid` of the images, if it has lazy pages.
    pub fn host_pid(&self, pid: u32) -> Option<i32> {
        self.tasks.get(&pid).map(|t| t.host_pid)
    }
}

/// Pids of the tree under `root` (itself included), keyed by their pid in the root's pid
/// namespace (the pids CRIU writes into the images).
fn host_pids_by_ns_pid(root: i32) -> Result<BTreeMap<u32, i32>, LazyError> {
    let level = ns_pids(root)
        .ok_or_else(|| LazyError::Tree(format!("no process {root} (or no NSpid in its status)")))?
        .len();
    let mut out = BTreeMap::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        if out.len() >= MAX_WALK {
            return Err(LazyError::Tree(format!("more than {MAX_WALK} processes under {root}")));
        }
        // A process of the tree sees the root's namespace at the same level (or deeper).
        let Some(ns) = ns_pids(pid) else { continue };
        let Some(&inner) = ns.get(level - 1) else { continue };
        out.insert(inner, pid);
        todo.extend(children_of(pid));
    }
    Ok(out)
}

/// The `NSpid` line of a process: its pid in each pid namespace, outermost first.
fn ns_pids(pid: i32) -> Option<Vec<u32>> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    let pids: Option<Vec<u32>> = line.split_whitespace().map(|p| p.parse().ok()).collect();
    pids.filter(|p| !p.is_empty())
}

/// Children of every thread of `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for t in tasks.flatten() {
        let text = fs::read_to_string(t.path().join("children")).unwrap_or_default();
        out.extend(text.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
    }
    out
}

/// True if `pid` is in the freezer cgroup at `cgroup` (a directory of the hierarchy).
fn in_cgroup(pid: i32, cgroup: &Path) -> bool {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .map(|procs| procs.split_whitespace().any(|p| p.parse() == Ok(pid)))
        .unwrap_or(false)
}

/// The state letter of `/proc/<pid>/stat`.
fn process_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

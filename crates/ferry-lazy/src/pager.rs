//! The target side of post-copy: ferry fills the restored tree's missing pages itself.
//!
//! `criu restore --lazy-pages` hands each restored process's userfaultfd to a lazy-pages
//! daemon: it connects to `lazy-pages.socket` in its work directory and sends, per process,
//! the process's pid in the images (an `int`) and then the descriptor (`SCM_RIGHTS`, with one
//! dummy byte); a zombie sends its pid negated and no descriptor; the end of the restore is the
//! `int` `RESTORE_FINISHED` (criu/uffd.c). [`LazyPager`] is that daemon, inside ferry:
//!
//! - a fault is read from the userfaultfd and its page asked of the source at once (faults
//!   read together are asked together), then copied in (`UFFDIO_COPY`);
//! - pages the source pushes ahead of demand ([`PageFeeder`]) are copied in as they arrive,
//!   straight from the frame they came in, in runs of up to 1 MiB;
//! - what is still missing once the push has ended (or if there is none) is fetched in 1 MiB
//!   pieces between faults: a process that forked after the switch needs the pages its parent
//!   was still missing too, and a push may stop early;
//! - the processes' `fork`, `mremap`, `munmap` and `madvise(DONTNEED)` events (which CRIU's
//!   restore asks the kernel for) move or drop what they still miss.
//!
//! CRIU's own daemon, which ferry ran before, sat between every fault and the source (one
//! more process and socket hop per page) and answered faults only after its own background
//! request of up to 4 MiB: a workload rewriting its memory waited longest there.
//!
//! While the pager lives, a process touching a missing page waits for it; once its
//! userfaultfd is closed, the kernel gives it zeros instead. So on failure: kill the restored
//! tree first, then stop the pager.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use ferry_sys::{Fill, Uffd, UffdEvent};

use super::images::{lazy_iovs, tree_pids};
use super::proto::PAGE_SIZE;
use super::{chain, LazyError, LazyStats, PageFetcher, MAX_REQUEST_PAGES};

/// The socket's name in the restore's work directory (`LAZY_PAGES_SOCK_NAME`).
const LAZY_SOCKET: &str = "lazy-pages.socket";
/// What the restore sends once every process runs (`LAZY_PAGES_RESTORE_FINISHED`).
const RESTORE_FINISHED: i32 = 0x5253_5446;
/// Pages per background request (1 MiB): short enough that a fault waits little behind one.
const SWEEP_PAGES: usize = 256;
/// Pages fetched for one fault: the missing ones of its aligned 64 KiB block.
const FAULT_AROUND: usize = 16;
/// Pages fetched for one fault of a sequential reader at most (1 MiB).
const MAX_AHEAD: usize = 256;
/// How often the loop looks at its stop flag while nothing happens.
const TICK_MS: i32 = 50;
/// How long `stop` waits for a loop that is busy in its fetcher.
const STOP_JOIN: Duration = Duration::from_secs(2);
/// Longest wait for the rest of a message from the restore.
const RESTORE_READ: Duration = Duration::from_secs(10);

const PAGE: usize = PAGE_SIZE as usize;

/// Turns an I/O error into the pager's, saying what it was doing.
fn io(what: &str) -> impl FnOnce(std::io::Error) -> LazyError {
    let what = what.to_string();
    move |source| LazyError::Io { what, source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Page {
    Missing,
    /// Asked of the source for a fault or the sweep.
    Requested,
    /// Being copied in.
    Copying,
    Present,
}

/// A run of lazy pages at `start` (now), `img` (in the images: what the source knows).
#[derive(Debug, Clone)]
struct Range {
    start: u64,
    img: u64,
    pages: Vec<Page>,
}

impl Range {
    fn len(&self) -> u64 {
        self.pages.len() as u64 * PAGE_SIZE
    }

    fn end(&self) -> u64 {
        self.start + self.len()
    }

    /// Splits off the part from `at` (strictly inside) on.
    fn split_off(&mut self, at: u64) -> Range {
        let i = ((at - self.start) / PAGE_SIZE) as usize;
        Range { start: at, img: self.img + (at - self.start), pages: self.pages.split_off(i) }
    }

    fn not_present(&self) -> usize {
        self.pages.iter().filter(|p| **p != Page::Present).count()
    }
}

/// One userfaultfd: a restored process, or a child it forked since.
#[derive(Debug)]
struct Task {
    /// Whose pages these are, as the images name the process (a forked child: its parent's).
    pid: u32,
    uffd: Arc<Uffd>,
    /// Sorted by `start`, disjoint.
    ranges: Vec<Range>,
    /// Pages not present yet.
    left: usize,
    gone: bool,
    /// Where the last fault's fetch ended (image address) and how many pages it took: a fault
    /// there is a sequential reader, whose next fetch doubles (readahead).
    ahead: Option<(u64, usize)>,
}

impl Task {
    fn new(pid: u32, uffd: Uffd, iovs: &[(u64, u64)]) -> Task {
        let ranges: Vec<Range> = iovs
            .iter()
            .map(|&(s, e)| Range {
                start: s,
                img: s,
                pages: vec![Page::Missing; ((e - s) / PAGE_SIZE) as usize],
            })
            .collect();
        let left = ranges.iter().map(|r| r.pages.len()).sum();
        Task { pid, uffd: Arc::new(uffd), ranges, left, gone: false, ahead: None }
    }

    /// The range and page index at address `addr` (now).
    fn find(&self, addr: u64) -> Option<(usize, usize)> {
        let i = self.ranges.partition_point(|r| r.start <= addr).checked_sub(1)?;
        let r = &self.ranges[i];
        (addr < r.end()).then(|| (i, ((addr - r.start) / PAGE_SIZE) as usize))
    }

    /// The range and page index of image address `img`.
    fn find_img(&self, img: u64) -> Option<(usize, usize)> {
        self.ranges
            .iter()
            .position(|r| r.img <= img && img < r.img + r.len())
            .map(|i| (i, ((img - self.ranges[i].img) / PAGE_SIZE) as usize))
    }

    /// As [`find_img`](Self::find_img), looking in range `hint` first: the pages of a run lie
    /// in one range unless an event cut it meanwhile.
    fn find_img_near(&self, img: u64, hint: Option<usize>) -> Option<(usize, usize)> {
        hint.and_then(|ri| {
            let r = self.ranges.get(ri)?;
            (r.img <= img && img < r.img + r.len()).then(|| (ri, ((img - r.img) / PAGE_SIZE) as usize))
        })
        .or_else(|| self.find_img(img))
    }

    fn set(&mut self, (ri, pi): (usize, usize), to: Page) {
        let page = &mut self.ranges[ri].pages[pi];
        match (*page == Page::Present, to == Page::Present) {
            (false, true) => self.left -= 1,
            (true, false) => self.left += 1,
            _ => {}
        }
        *page = to;
    }

    /// Takes `[start, end)` out of the ranges; returns the pieces taken, in address order.
    fn cut(&mut self, start: u64, end: u64) -> Vec<Range> {
        let mut taken = Vec::new();
        let mut kept = Vec::with_capacity(self.ranges.len() + 1);
        for mut r in self.ranges.drain(..) {
            if r.end() <= start || r.start >= end {
                kept.push(r);
                continue;
            }
            if r.start < start {
                let tail = r.split_off(start);
                kept.push(r);
                r = tail;
            }
            if r.end() > end {
                kept.push(r.split_off(end));
            }
            taken.push(r);
        }
        kept.sort_by_key(|r| r.start);
        self.ranges = kept;
        self.left -= taken.iter().map(Range::not_present).sum::<usize>();
        taken
    }

    fn insert(&mut self, r: Range) {
        self.left += r.not_present();
        let at = self.ranges.partition_point(|x| x.start < r.start);
        self.ranges.insert(at, r);
    }

    fn forget(&mut self) {
        self.gone = true;
        self.ranges.clear();
        self.left = 0;
    }

    fn done(&self) -> bool {
        self.gone || self.left == 0
    }
}

/// Something that keeps a copy of each userfaultfd the pager gets (a restored process's, or a
/// forked child's): while any copy is open, a fault on a missing page waits rather than reads
/// zeros. The target's guard is one: it outlives an agent that dies, and kills the tree
/// before the userfaultfds close (see `guard`).
#[derive(Clone)]
pub struct Keeper(pub Arc<dyn Fn(BorrowedFd<'_>) + Send + Sync>);

impl Keeper {
    fn keep(&self, fd: BorrowedFd<'_>) {
        (self.0)(fd)
    }
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keeper")
    }
}

/// Whether pages are pushed, which decides when the pager fetches the rest itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Push {
    /// No push: fetch the rest once the restore is over.
    None,
    /// A push will come or is coming: leave the rest to it.
    Expected,
    /// The push is over (complete or not): fetch what it left.
    Ended,
}

#[derive(Debug)]
struct State {
    tasks: Vec<Task>,
    /// Is handed every userfaultfd as it comes (see [`Keeper`]).
    keeper: Option<Keeper>,
    restore_finished: bool,
    push: Push,
    /// The push may start (the workload runs here, its network up).
    push_allowed: bool,
    /// The loop ended (done, failed or stopped): nothing more is copied.
    closed: bool,
    stats: LazyStats,
    /// The requests faults made, in order (the first [`MAX_DEMAND_RECORDED`]): the restored
    /// tree's working set, for the next restore to prefetch.
    demand: Vec<(u32, u64, u32)>,
}

/// At most this many fault requests are remembered ([`LazyPager::take_demand`]).
pub const MAX_DEMAND_RECORDED: usize = 32 * 1024;

impl State {
    fn complete(&self) -> bool {
        self.restore_finished && self.tasks.iter().all(Task::done)
    }
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A piece of work for `UFFDIO_COPY`, found under the lock and done outside it.
struct Job {
    task: usize,
    uffd: Arc<Uffd>,
    /// Where the pages go now, and their address in the images.
    at: u64,
    img: u64,
    /// Offset in the data and page count.
    offset: usize,
    pages: usize,
}

/// Copies `data`, pages of process `pid` (in the images) at image address `img`, into every
/// task still missing them. With `demand`, pages asked for are filled too (the push leaves
/// those to the answer that was asked for). Returns the bytes copied.
fn fill(shared: &Shared, pid: u32, img: u64, data: &[u8], demand: bool) -> Result<u64, LazyError> {
    let end = img + data.len() as u64;
    let mut jobs = Vec::new();
    {
        let mut st = shared.lock();
        if st.closed {
            return Ok(0);
        }
        for (ti, t) in st.tasks.iter_mut().enumerate() {
            if t.gone || t.pid != pid {
                continue;
            }
            for r in &mut t.ranges {
                let lo = img.max(r.img);
                let hi = end.min(r.img + r.len());
                if lo >= hi {
                    continue;
                }
                let first = ((lo - r.img) / PAGE_SIZE) as usize;
                let last = ((hi - r.img) / PAGE_SIZE) as usize;
                let mut i = first;
                while i < last {
                    let wanted = |p: Page| p == Page::Missing || (demand && p == Page::Requested);
                    if !wanted(r.pages[i]) {
                        i += 1;
                        continue;
                    }
                    let from = i;
                    while i < last && wanted(r.pages[i]) {
                        r.pages[i] = Page::Copying;
                        i += 1;
                    }
                    let page_img = r.img + from as u64 * PAGE_SIZE;
                    jobs.push(Job {
                        task: ti,
                        uffd: t.uffd.clone(),
                        at: r.start + from as u64 * PAGE_SIZE,
                        img: page_img,
                        offset: (page_img - img) as usize,
                        pages: i - from,
                    });
                }
            }
        }
    }
    // (task, image address, pages, outcome) of every run copied or given up.
    let mut outcomes: Vec<(usize, u64, usize, Page)> = Vec::new();
    let mut gone: Vec<usize> = Vec::new();
    let started = Instant::now();
    let mut copied = 0u64;
    let mut failure = None;
    for job in &jobs {
        let mut k = 0usize;
        // One page per copy from the first refusal of a longer run on: the process may have
        // split the mapping since (mprotect, mlock, madvise: no event says so), and a copy
        // fills within one mapping only.
        let mut by_page = false;
        while k < job.pages {
            let end = if by_page { k + 1 } else { job.pages };
            let bytes = &data[job.offset + k * PAGE..job.offset + end * PAGE];
            let at = job.at + (k * PAGE) as u64;
            let img_at = job.img + (k * PAGE) as u64;
            match job.uffd.copy(at, bytes) {
                Ok(Fill::Done) => {
                    outcomes.push((job.task, img_at, end - k, Page::Present));
                    copied += bytes.len() as u64;
                    k = end;
                }
                Ok(Fill::Exists { filled }) => {
                    // The page after those filled is there already: count it as present.
                    let n = (filled / PAGE_SIZE) as usize + 1;
                    outcomes.push((job.task, img_at, n, Page::Present));
                    copied += filled;
                    k += n;
                }
                Ok(Fill::Retry { filled }) if filled > 0 => {
                    let n = (filled / PAGE_SIZE) as usize;
                    outcomes.push((job.task, img_at, n, Page::Present));
                    copied += filled;
                    k += n;
                }
                Ok(Fill::Retry { .. }) if !by_page && end - k > 1 => by_page = true,
                Ok(Fill::Retry { .. }) => {
                    // The mapping is moving: the page goes back to missing, and a thread
                    // waiting on it is woken so that it faults again where it is now.
                    outcomes.push((job.task, img_at, job.pages - k, Page::Missing));
                    k = job.pages;
                }
                Ok(Fill::Gone) => {
                    gone.push(job.task);
                    k = job.pages;
                }
                Err(e) => {
                    outcomes.push((job.task, img_at, job.pages - k, Page::Missing));
                    failure.get_or_insert(LazyError::Io {
                        what: format!("copy {} pages to {at:#x}", job.pages - k),
                        source: e,
                    });
                    k = job.pages;
                }
            }
        }
    }
    let mut wakes = Vec::new();
    {
        let mut st = shared.lock();
        let spent = started.elapsed();
        for (ti, img_at, n, to) in outcomes {
            let t = &mut st.tasks[ti];
            let mut hint: Option<usize> = None;
            for p in 0..n {
                let Some(pos) = t.find_img_near(img_at + (p * PAGE) as u64, hint) else { continue };
                hint = Some(pos.0);
                if t.ranges[pos.0].pages[pos.1] != Page::Copying {
                    continue;
                }
                t.set(pos, to);
                if to == Page::Missing {
                    let r = &t.ranges[pos.0];
                    wakes.push((t.uffd.clone(), r.start + (pos.1 * PAGE) as u64));
                }
            }
        }
        for ti in gone {
            st.tasks[ti].forget();
        }
        st.stats.bytes += copied;
        st.stats.copying += spent;
    }
    shared.changed.notify_all();
    for (uffd, at) in wakes {
        let _ = uffd.wake(at, PAGE_SIZE);
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(copied),
    }
}

/// What the loop does for one page fault, decided under the lock.
enum FaultAction {
    Fetch { pid: u32, img: u64 },
    Zero(Arc<Uffd>, u64),
    Wake(Arc<Uffd>, u64),
}

/// Applies the events read from task `ti`'s userfaultfd.
fn handle_events(st: &mut State, ti: usize, events: Vec<UffdEvent>, actions: &mut Vec<FaultAction>) {
    for ev in events {
        if matches!(ev, UffdEvent::PageFault { .. }) {
            st.stats.faults += 1;
        }
        let t = &mut st.tasks[ti];
        match ev {
            UffdEvent::PageFault { address, .. } => {
                let page = address & !(PAGE_SIZE - 1);
                match t.find(page) {
                    // Registered but not lazy: a page that was never touched before the dump.
                    None => actions.push(FaultAction::Zero(t.uffd.clone(), page)),
                    Some(pos) => match t.ranges[pos.0].pages[pos.1] {
                        Page::Missing => {
                            // The missing pages of the aligned block around it come along
                            // (the kernel's own fault-around for files): a workload reading
                            // a buffer or a model's weights faults once a block, not a page.
                            // A fault where the last fetch ended is a sequential reader: its
                            // fetch doubles, up to MAX_AHEAD (the kernel's readahead).
                            let r = &mut t.ranges[pos.0];
                            let from = pos.1 - pos.1 % FAULT_AROUND;
                            let from_img = r.img + (from * PAGE) as u64;
                            let window = match t.ahead {
                                Some((next, n)) if next == from_img => (2 * n).min(MAX_AHEAD),
                                _ => FAULT_AROUND,
                            };
                            let to = (from + window).min(r.pages.len());
                            t.ahead = Some((r.img + (to * PAGE) as u64, window));
                            for i in from..to {
                                if r.pages[i] == Page::Missing {
                                    r.pages[i] = Page::Requested;
                                    actions.push(FaultAction::Fetch {
                                        pid: t.pid,
                                        img: r.img + (i * PAGE) as u64,
                                    });
                                }
                            }
                        }
                        // Its copy is under way and wakes it.
                        Page::Requested | Page::Copying => {}
                        Page::Present => actions.push(FaultAction::Wake(t.uffd.clone(), page)),
                    },
                }
            }
            UffdEvent::Fork { uffd } => {
                // The child has what its parent had; the rest it must be given too. Pages
                // being copied to the parent count as missing (a copy that finds them is a no-op).
                let ranges: Vec<Range> = t
                    .ranges
                    .iter()
                    .map(|r| {
                        let mut c = r.clone();
                        for p in &mut c.pages {
                            if *p != Page::Present {
                                *p = Page::Missing;
                            }
                        }
                        c
                    })
                    .collect();
                let left = ranges.iter().map(Range::not_present).sum();
                let child = Task { pid: t.pid, uffd: Arc::new(uffd), ranges, left, gone: false, ahead: None };
                tracing::debug!(pid = t.pid, left, "a restored process forked");
                if let Some(k) = &st.keeper {
                    k.keep(child.uffd.as_fd());
                }
                st.tasks.push(child);
            }
            UffdEvent::Remap { from, to, len } => {
                let _ = t.cut(to, to.saturating_add(len));
                for mut r in t.cut(from, from.saturating_add(len)) {
                    r.start = r.start - from + to;
                    t.insert(r);
                }
            }
            UffdEvent::Remove { start, end } => {
                // The range stays mapped: without this, its next touch would come here for a
                // page that is no longer wanted; unregistered, the kernel gives zeros itself.
                let _ = t.cut(start, end);
                if let Err(e) = t.uffd.unregister(start, end.saturating_sub(start)) {
                    if e.kind() == std::io::ErrorKind::OutOfMemory {
                        t.forget();
                    } else {
                        tracing::warn!(error = %e, start, end, "could not unregister a removed range");
                    }
                }
            }
            UffdEvent::Unmap { start, end } => {
                let _ = t.cut(start, end);
            }
            UffdEvent::Other(kind) => tracing::warn!(kind, "unknown userfaultfd event"),
        }
    }
}

/// ferry's lazy-pages daemon for one restore; see the module's documentation. Dropping it
/// (or [`stop`](Self::stop)) closes the userfaultfds.
#[derive(Debug)]
pub struct LazyPager {
    shared: Arc<Shared>,
    /// Bytes of every lazy range of the images.
    total: u64,
    done: mpsc::Receiver<Result<(), LazyError>>,
    outcome: Option<Result<(), String>>,
    /// The outcome was the restore hanging up early (CRIU failed; its error says why).
    restore_ended: bool,
    thread: Option<thread::JoinHandle<()>>,
    socket: PathBuf,
    stopped: bool,
}

/// The way in for pages pushed ahead of demand.
#[derive(Debug, Clone)]
pub struct PageFeeder {
    shared: Arc<Shared>,
}

impl PageFeeder {
    /// Lets the push start (call it once the workload runs here).
    pub fn allow(&self) {
        self.shared.lock().push_allowed = true;
        self.shared.changed.notify_all();
    }

    /// Waits until [`allow`](Self::allow) and until the pager has every process of the
    /// restore (a page pushed for a process it does not know yet would be dropped and asked
    /// for again); false if the pager ended first.
    pub fn wait_allowed(&self) -> bool {
        let mut st = self.shared.lock();
        while !(st.closed || (st.push_allowed && st.restore_finished)) {
            st = match self.shared.changed.wait_timeout(st, Duration::from_millis(200)) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        !st.closed
    }

    /// Waits until the restore has handed over the userfaultfd of every process of `pids`
    /// (pids in the images), so that pages pushed before the restore finishes (its tasks
    /// restored but not yet let run) reach each of them; false if the pager ended first.
    pub fn wait_handed_over(&self, pids: &[u32]) -> bool {
        let mut st = self.shared.lock();
        while !(st.closed || pids.iter().all(|p| st.tasks.iter().any(|t| t.pid == *p))) {
            st = match self.shared.changed.wait_timeout(st, Duration::from_millis(200)) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        !st.closed
    }

    /// Copies pushed pages (process `pid` in the images, image address `vaddr`) into the
    /// processes still missing them. False once the pager has ended: stop pushing.
    pub fn feed(&self, pid: u32, vaddr: u64, pages: &[u8]) -> bool {
        if !vaddr.is_multiple_of(PAGE_SIZE) || !pages.len().is_multiple_of(PAGE) {
            return false;
        }
        match fill(&self.shared, pid, vaddr, pages, false) {
            Ok(n) => {
                let mut st = self.shared.lock();
                st.stats.pushed += n;
                !st.closed
            }
            Err(e) => {
                tracing::warn!(error = %e, "pushed pages could not be copied in; they come on demand");
                false
            }
        }
    }

    /// The push is over (whole or not): the pager fetches what is still missing.
    pub fn end(&self) {
        let mut st = self.shared.lock();
        if st.push == Push::Expected {
            st.push = Push::Ended;
        }
    }
}

impl LazyPager {
    /// Listens for the lazy restore of the images in `images_dir`, whose work directory is
    /// `work_dir` (ferry-criu's log directory), and serves it with `fetcher`.
    pub fn start(
        images_dir: &Path,
        work_dir: &Path,
        fetcher: Box<dyn PageFetcher + Send>,
    ) -> Result<LazyPager, LazyError> {
        Self::start_kept(images_dir, work_dir, fetcher, None)
    }

    /// As [`start`](Self::start), handing every userfaultfd to `keeper` as it comes.
    pub fn start_kept(
        images_dir: &Path,
        work_dir: &Path,
        fetcher: Box<dyn PageFetcher + Send>,
        keeper: Option<Keeper>,
    ) -> Result<LazyPager, LazyError> {
        let mut lazy = Vec::new();
        for pid in tree_pids(images_dir)? {
            lazy.push((pid, lazy_iovs(images_dir, pid)?));
        }
        Self::serve(lazy, work_dir, fetcher, keeper)
    }

    /// As [`start`](Self::start), with the lazy ranges of each process given (pid in the
    /// images, its ranges sorted, disjoint, each inside one mapping the restore registers).
    pub fn start_ranges(
        lazy: Vec<(u32, Vec<(u64, u64)>)>,
        work_dir: &Path,
        fetcher: Box<dyn PageFetcher + Send>,
        keeper: Option<Keeper>,
    ) -> Result<LazyPager, LazyError> {
        Self::serve(lazy, work_dir, fetcher, keeper)
    }

    fn serve(
        lazy: Vec<(u32, Vec<(u64, u64)>)>,
        work_dir: &Path,
        fetcher: Box<dyn PageFetcher + Send>,
        keeper: Option<Keeper>,
    ) -> Result<LazyPager, LazyError> {
        std::fs::create_dir_all(work_dir).map_err(io("create the restore's work directory"))?;
        let total = lazy.iter().flat_map(|(_, iovs)| iovs.iter()).map(|(s, e)| e - s).sum();
        let socket = work_dir.join(LAZY_SOCKET);
        match std::fs::remove_file(&socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(LazyError::Io { what: "remove a stale lazy-pages.socket".into(), source: e })
            }
            _ => {}
        }
        // A socket's path has at most 107 bytes and work directories can be longer: bind
        // through the directory's descriptor (CRIU itself connects from inside it).
        let dir = std::fs::File::open(work_dir).map_err(io("open the restore's work directory"))?;
        let short = format!("/proc/self/fd/{}/{LAZY_SOCKET}", std::os::fd::AsRawFd::as_raw_fd(&dir));
        let listener = UnixListener::bind(&short).map_err(io("listen on lazy-pages.socket"))?;
        drop(dir);
        listener.set_nonblocking(true).map_err(io("make the listener non-blocking"))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                tasks: Vec::new(),
                keeper,
                restore_finished: false,
                push: Push::None,
                push_allowed: false,
                closed: false,
                stats: LazyStats::default(),
                demand: Vec::new(),
            }),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let (tx, done) = mpsc::channel();
        let looping = shared.clone();
        let thread = thread::Builder::new()
            .name("ferry-lazy-pager".into())
            .spawn(move || {
                let r = Loop { shared: looping.clone(), lazy, fetcher, sweep_at: (0, 0) }.run(listener);
                {
                    let mut st = looping.lock();
                    st.closed = true;
                    if r.is_ok() && st.complete() {
                        st.stats.finished = Some(Instant::now());
                        // Every lazy page is in: what else faults in those mappings (pages
                        // never touched before the dump) is the kernel's to zero-fill.
                        st.tasks.clear();
                    }
                }
                looping.changed.notify_all();
                let _ = tx.send(r);
            })
            .map_err(io("start the pager thread"))?;
        Ok(LazyPager {
            shared,
            total,
            done,
            outcome: None,
            restore_ended: false,
            thread: Some(thread),
            socket,
            stopped: false,
        })
    }

    /// The way in for pushed pages. From now on the pager leaves missing pages to the push
    /// until [`PageFeeder::end`].
    pub fn feeder(&self) -> PageFeeder {
        let mut st = self.shared.lock();
        if st.push == Push::None {
            st.push = Push::Expected;
        }
        PageFeeder { shared: self.shared.clone() }
    }

    /// Bytes of every lazy range of the images (what the pager fills, at most).
    pub fn lazy_bytes(&self) -> u64 {
        self.total
    }

    /// What was done so far.
    pub fn stats(&self) -> LazyStats {
        self.shared.lock().stats.clone()
    }

    /// The pages faults asked for so far, `(pid, image address, pages)` in the order asked
    /// (what the pager fetched for them: a fault's block and readahead included).
    pub fn take_demand(&self) -> Vec<(u32, u64, u32)> {
        std::mem::take(&mut self.shared.lock().demand)
    }

    /// Waits until every page is in (every process has all it had, or is gone), or until
    /// serving failed. After a failure the userfaultfds stay open, so the restored tasks wait
    /// for their pages rather than read zeros: kill the restored tree, then [`stop`](Self::stop).
    pub fn wait_done(&mut self, timeout: Duration) -> Result<LazyStats, LazyError> {
        if self.outcome.is_none() {
            match self.done.recv_timeout(timeout) {
                Ok(r) => {
                    if let Some(t) = self.thread.take() {
                        let _ = t.join();
                    }
                    self.restore_ended = matches!(r, Err(LazyError::RestoreEnded));
                    self.outcome = Some(r.map_err(|e| chain(&e)));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => return Err(LazyError::Timeout(timeout)),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.outcome = Some(Err("the pager thread died".into()));
                }
            }
        }
        match &self.outcome {
            Some(Err(_)) if self.restore_ended => Err(LazyError::RestoreEnded),
            Some(Err(why)) => Err(LazyError::Serve(why.clone())),
            _ if self.stopped => Err(LazyError::Serve("stopped".into())),
            _ => Ok(self.stats()),
        }
    }

    /// Ends serving, closes the userfaultfds (missing pages then read as zeros: kill the tree
    /// first if it is not complete) and returns what was done.
    pub fn stop(mut self) -> LazyStats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // A fetch stuck in a remote call cannot be interrupted from here: leave it.
            if self.outcome.is_some() || self.done.recv_timeout(STOP_JOIN).is_ok() {
                let _ = t.join();
            }
        }
        {
            let mut st = self.shared.lock();
            st.closed = true;
            st.tasks.clear();
        }
        self.shared.changed.notify_all();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for LazyPager {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Loop {
    shared: Arc<Shared>,
    /// Per process of the images, its lazy ranges cut at mapping ends.
    lazy: Vec<(u32, Vec<(u64, u64)>)>,
    fetcher: Box<dyn PageFetcher + Send>,
    /// Where the sweep goes on: task index, address (now).
    sweep_at: (usize, u64),
}

impl Loop {
    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed)
    }

    fn run(mut self, listener: UnixListener) -> Result<(), LazyError> {
        // The restore connects first thing.
        let conn = loop {
            if self.stopping() {
                return Ok(());
            }
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    ferry_sys::poll_readable(&[listener.as_fd()], TICK_MS)
                        .map_err(io("wait for the restore"))?;
                }
                Err(e) => return Err(LazyError::Io { what: "accept the restore".into(), source: e }),
            }
        };
        drop(listener);
        conn.set_nonblocking(false).map_err(io("set up the restore's connection"))?;
        conn.set_read_timeout(Some(RESTORE_READ)).map_err(io("set up the restore's connection"))?;
        let mut restore = Some(conn);
        let mut events = Vec::new();
        let mut actions = Vec::new();
        loop {
            if self.stopping() {
                return Ok(());
            }
            let (uffds, idle) = {
                let st = self.shared.lock();
                if st.complete() {
                    return Ok(());
                }
                let live: Vec<(usize, Arc<Uffd>)> = st
                    .tasks
                    .iter()
                    .enumerate()
                    // Done ones too: a page never touched before the dump faults as well.
                    .filter(|(_, t)| !t.gone)
                    .map(|(i, t)| (i, t.uffd.clone()))
                    .collect();
                let sweep = st.restore_finished && st.push != Push::Expected;
                (live, !sweep)
            };
            let mut fds = Vec::with_capacity(uffds.len() + 1);
            if let Some(c) = &restore {
                fds.push(c.as_fd());
            }
            fds.extend(uffds.iter().map(|(_, u)| u.as_fd()));
            let ready = ferry_sys::poll_readable(&fds, if idle { TICK_MS } else { 0 })
                .map_err(io("wait for page faults"))?;
            drop(fds);
            let mut ready = ready.into_iter();
            if restore.is_some() && ready.next() == Some(true) {
                if let Some(c) = restore.take() {
                    if self.read_restore(&c)? {
                        restore = Some(c);
                    }
                }
            }
            for ((ti, uffd), is_ready) in uffds.iter().zip(ready) {
                if !is_ready {
                    continue;
                }
                // Read and applied under the lock: a page copied in after a fork was read
                // must be given to the child too, and is (it is not present for it yet).
                let mut st = self.shared.lock();
                if let Err(e) = uffd.read_events(&mut events) {
                    tracing::debug!(error = %e, task = ti, "userfaultfd read failed: the process is gone");
                    st.tasks[*ti].forget();
                    continue;
                }
                handle_events(&mut st, *ti, std::mem::take(&mut events), &mut actions);
            }
            let mut fetch = BTreeSet::new();
            for action in actions.drain(..) {
                match action {
                    FaultAction::Fetch { pid, img } => {
                        fetch.insert((pid, img));
                    }
                    FaultAction::Zero(uffd, at) => {
                        if let Ok(Fill::Gone) = uffd.zero(at, PAGE_SIZE) {
                            tracing::debug!("a process went away while given a zero page");
                        }
                    }
                    FaultAction::Wake(uffd, at) => {
                        let _ = uffd.wake(at, PAGE_SIZE);
                    }
                }
            }
            if !fetch.is_empty() {
                self.fetch_faults(fetch)?;
            } else if !idle {
                self.sweep()?;
            }
        }
    }

    /// Reads what the restore sent; false once it closed its connection.
    fn read_restore(&mut self, conn: &UnixStream) -> Result<bool, LazyError> {
        let mut word = [0u8; 4];
        let Some(_) = ferry_sys::recv_with_fd(conn, &mut word).map_err(io("read from the restore"))? else {
            let st = self.shared.lock();
            if !st.restore_finished {
                return Err(LazyError::RestoreEnded);
            }
            return Ok(false);
        };
        let pid = i32::from_ne_bytes(word);
        if pid == RESTORE_FINISHED {
            let mut st = self.shared.lock();
            st.restore_finished = true;
            tracing::debug!(tasks = st.tasks.len(), "lazy restore finished");
            drop(st);
            self.shared.changed.notify_all();
            return Ok(true);
        }
        if pid <= 0 {
            // A zombie: no memory, no descriptor.
            return Ok(true);
        }
        let mut dummy = [0u8; 1];
        let fd = ferry_sys::recv_with_fd(conn, &mut dummy)
            .map_err(io("receive a userfaultfd"))?
            .flatten()
            .ok_or_else(|| LazyError::Protocol(format!("no userfaultfd came for process {pid}")))?;
        let pid = pid as u32;
        let iovs =
            self.lazy.iter().find(|(p, _)| *p == pid).map(|(_, iovs)| iovs.clone()).ok_or_else(|| {
                LazyError::Protocol(format!("the restore sent process {pid}, which the images lack"))
            })?;
        let mut st = self.shared.lock();
        if st.tasks.iter().any(|t| t.pid == pid) {
            return Err(LazyError::Protocol(format!("the restore sent process {pid} twice")));
        }
        let task = Task::new(pid, Uffd::from_fd(fd), &iovs);
        if let Some(k) = &st.keeper {
            k.keep(task.uffd.as_fd());
        }
        st.tasks.push(task);
        drop(st);
        self.shared.changed.notify_all();
        Ok(true)
    }

    /// Asks the source for the pages faulted on (adjacent ones together) and copies them in.
    fn fetch_faults(&mut self, pages: BTreeSet<(u32, u64)>) -> Result<(), LazyError> {
        let mut reqs: Vec<(u32, u64, u32)> = Vec::new();
        for (pid, img) in pages {
            match reqs.last_mut() {
                Some((p, start, n))
                    if *p == pid && *start + u64::from(*n) * PAGE_SIZE == img && *n < MAX_REQUEST_PAGES =>
                {
                    *n += 1
                }
                _ => reqs.push((pid, img, 1)),
            }
        }
        {
            let mut st = self.shared.lock();
            let room = MAX_DEMAND_RECORDED.saturating_sub(st.demand.len());
            st.demand.extend(reqs.iter().take(room));
        }
        self.fetch_and_fill(&reqs)
    }

    fn fetch_and_fill(&mut self, reqs: &[(u32, u64, u32)]) -> Result<(), LazyError> {
        let started = Instant::now();
        {
            let mut st = self.shared.lock();
            st.stats.first_request.get_or_insert(started);
            st.stats.requests += reqs.len() as u64;
        }
        let mut data = Vec::new();
        self.fetcher.fetch_many(reqs, &mut data)?;
        let want: u64 = reqs.iter().map(|r| u64::from(r.2) * PAGE_SIZE).sum();
        if data.len() as u64 != want {
            return Err(LazyError::Protocol(format!("the fetcher returned {} bytes for {want}", data.len())));
        }
        self.shared.lock().stats.fetching += started.elapsed();
        let mut at = 0usize;
        for &(pid, img, n) in reqs {
            let len = n as usize * PAGE;
            fill(&self.shared, pid, img, &data[at..at + len], true)?;
            at += len;
        }
        Ok(())
    }

    /// Fetches the next run of missing pages (at most [`SWEEP_PAGES`]), if any.
    fn sweep(&mut self) -> Result<(), LazyError> {
        let req = {
            let mut st = self.shared.lock();
            let n = st.tasks.len();
            let mut found = None;
            // From where the last sweep stopped, around once (back to that task's beginning).
            for step in 0..=n {
                let ti = (self.sweep_at.0 + step) % n.max(1);
                let Some(t) = st.tasks.get_mut(ti) else { break };
                if t.done() {
                    continue;
                }
                let from = if step == 0 { self.sweep_at.1 } else { 0 };
                'ranges: for r in t.ranges.iter_mut().filter(|r| r.end() > from) {
                    let skip = if r.start < from { ((from - r.start) / PAGE_SIZE) as usize } else { 0 };
                    let Some(first) = (skip..r.pages.len()).find(|&i| r.pages[i] == Page::Missing) else {
                        continue;
                    };
                    let mut last = first;
                    while last < r.pages.len() && last - first < SWEEP_PAGES && r.pages[last] == Page::Missing
                    {
                        r.pages[last] = Page::Requested;
                        last += 1;
                    }
                    found = Some((ti, t.pid, r.img + (first * PAGE) as u64, (last - first) as u32));
                    self.sweep_at = (ti, r.start + (last * PAGE) as u64);
                    break 'ranges;
                }
                if found.is_some() {
                    break;
                }
            }
            found
        };
        match req {
            Some((_, pid, img, n)) => self.fetch_and_fill(&[(pid, img, n)]),
            None => {
                // Nothing missing that is not being copied: wait for those copies.
                self.sweep_at = (0, 0);
                let st = self.shared.lock();
                let _ = self.shared.changed.wait_timeout(st, Duration::from_millis(TICK_MS as u64));
                Ok(())
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn task(ranges: &[(u64, u64)]) -> Task {
        let uffd = Uffd::from_fd(std::fs::File::open("/dev/null").unwrap().into());
        Task::new(7, uffd, ranges)
    }

    const P: u64 = PAGE_SIZE;

    /// Pages of a fake source: page i of process 1 holds the byte (i * 7 + 3) everywhere.
    struct Pattern {
        base: u64,
        asked: Arc<Mutex<Vec<(u64, u32)>>>,
    }

    fn pattern_page(i: u64) -> Vec<u8> {
        vec![(i * 7 + 3) as u8; PAGE]
    }

    impl PageFetcher for Pattern {
        fn fetch(&mut self, pid: u32, vaddr: u64, n: u32, out: &mut Vec<u8>) -> Result<(), LazyError> {
            assert_eq!(pid, 1);
            self.asked.lock().unwrap().push((vaddr, n));
            out.clear();
            for k in 0..u64::from(n) {
                out.extend_from_slice(&pattern_page((vaddr - self.base) / P + k));
            }
            Ok(())
        }
    }

    /// This process stands in for a restored one: its own mapping registered with a
    /// userfaultfd that is handed to the pager the way `criu restore` does.
    #[test]
    fn faults_pushes_and_the_sweep_fill_every_page_once() {
        // userfaultfd for this process's own memory needs root here (fails under CI=true without).
        if !ferry_testkit::require_privileged() {
            return;
        }
        let pages = 64u64;
        let map = Arc::new(ferry_sys::AnonMapping::new((pages * P) as usize).unwrap());
        let features = ferry_sys::UFFD_FEATURE_EVENT_FORK
            | ferry_sys::UFFD_FEATURE_EVENT_REMAP
            | ferry_sys::UFFD_FEATURE_EVENT_REMOVE
            | ferry_sys::UFFD_FEATURE_EVENT_UNMAP;
        let uffd = Uffd::open(features).unwrap();
        uffd.register_missing(map.addr(), pages * P).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        // The last 8 pages are not lazy: a fault there gets a zero page.
        let lazy = vec![(1u32, vec![(map.addr(), map.addr() + (pages - 8) * P)])];
        let mut pager = LazyPager::serve(
            lazy,
            dir.path(),
            Box::new(Pattern { base: map.addr(), asked: asked.clone() }),
            None,
        )
        .unwrap();
        let feeder = pager.feeder();

        let restore = UnixStream::connect(dir.path().join(LAZY_SOCKET)).unwrap();
        std::io::Write::write_all(&mut &restore, &(-5i32).to_ne_bytes()).unwrap(); // a zombie
        std::io::Write::write_all(&mut &restore, &1i32.to_ne_bytes()).unwrap();
        ferry_sys::send_with_fd(&restore, &[0], uffd.as_fd()).unwrap();
        drop(uffd);

        // A fault before the restore finished is served at once, with its 64 KiB block.
        let mut b = [0u8; 2];
        map.read((10 * P) as usize, &mut b);
        assert_eq!(b, [73, 73]);
        // Pushed pages land without being asked for; those already in are left alone.
        let mut pushed = Vec::new();
        for i in 8..24 {
            pushed.extend_from_slice(&pattern_page(i));
        }
        assert!(feeder.feed(1, map.addr() + 8 * P, &pushed));
        std::io::Write::write_all(&mut &restore, &RESTORE_FINISHED.to_ne_bytes()).unwrap();
        drop(restore);
        map.read((60 * P) as usize, &mut b);
        assert_eq!(b, [0, 0], "not lazy: zeros");
        // The push ends early: the pager fetches the rest itself.
        feeder.end();
        let stats = pager.wait_done(Duration::from_secs(20)).unwrap();
        // Done: the kernel now fills what was never lazy, while the pager still exists.
        map.read((62 * P) as usize, &mut b);
        assert_eq!(b, [0, 0]);
        for i in 0..pages - 8 {
            let mut page = vec![0u8; PAGE];
            map.read((i * P) as usize, &mut page);
            assert_eq!(page, pattern_page(i), "page {i}");
        }
        let asked = asked.lock().unwrap().clone();
        // Page 10 was asked for by its fault, with the rest of pages 0-15, before the push;
        // the push skipped those; the sweep asked for the rest, nothing the push brought.
        assert_eq!(asked[0], (map.addr(), FAULT_AROUND as u32));
        assert!(
            !asked[1..]
                .iter()
                .any(|&(v, n)| v < map.addr() + 24 * P && v + u64::from(n) * P > map.addr() + 8 * P),
            "pushed pages were asked for again: {asked:?}"
        );
        assert_eq!(asked.iter().map(|r| u64::from(r.1)).sum::<u64>(), 16 + (pages - 8 - 24));
        assert_eq!(stats.bytes, (pages - 8) * P);
        assert_eq!(stats.pushed, 8 * P, "pages 8-15 were in already, with page 10's block");
        assert!(stats.faults >= 2);
        assert!(!feeder.feed(1, map.addr(), &pattern_page(0)), "ended: the push is turned away");
        drop(pager);
        assert!(!dir.path().join(LAZY_SOCKET).exists());
    }

    /// A pager over the first `pages` pages of `map` (all lazy), registered with a userfaultfd
    /// (with every event) that the test hands over: the userfaultfd, the pager's directory, the
    /// requests its source saw, the pager.
    #[allow(clippy::type_complexity)]
    fn pager_over(
        map: &ferry_sys::AnonMapping,
        pages: u64,
    ) -> (Uffd, tempfile::TempDir, Arc<Mutex<Vec<(u64, u32)>>>, LazyPager) {
        let features = ferry_sys::UFFD_FEATURE_EVENT_FORK
            | ferry_sys::UFFD_FEATURE_EVENT_REMAP
            | ferry_sys::UFFD_FEATURE_EVENT_REMOVE
            | ferry_sys::UFFD_FEATURE_EVENT_UNMAP;
        let uffd = Uffd::open(features).unwrap();
        uffd.register_missing(map.addr(), pages * P).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let lazy = vec![(1u32, vec![(map.addr(), map.addr() + pages * P)])];
        let source = Box::new(Pattern { base: map.addr(), asked: asked.clone() });
        let pager = LazyPager::serve(lazy, dir.path(), source, None).unwrap();
        (uffd, dir, asked, pager)
    }

    fn hand_over(dir: &Path, uffd: &Uffd) {
        let restore = UnixStream::connect(dir.join(LAZY_SOCKET)).unwrap();
        std::io::Write::write_all(&mut &restore, &1i32.to_ne_bytes()).unwrap();
        ferry_sys::send_with_fd(&restore, &[0], uffd.as_fd()).unwrap();
        std::io::Write::write_all(&mut &restore, &RESTORE_FINISHED.to_ne_bytes()).unwrap();
    }

    /// A reader going through memory in order faults where the last fetch ended: each fetch
    /// doubles, up to 1 MiB; a jump elsewhere starts again at one 64 KiB block.
    #[test]
    fn a_sequential_reader_gets_readahead() {
        if !ferry_testkit::require_privileged() {
            return;
        }
        let pages = 1024u64;
        let map = ferry_sys::AnonMapping::new((pages * P) as usize).unwrap();
        let (uffd, dir, asked, mut pager) = pager_over(&map, pages);
        let feeder = pager.feeder(); // no push, no sweep until the end: only faults fetch
        hand_over(dir.path(), &uffd);
        drop(uffd);
        let mut page = vec![0u8; PAGE];
        let mut at = 0u64;
        for _ in 0..6 {
            map.read((at * P) as usize, &mut page);
            assert_eq!(page, pattern_page(at), "page {at}");
            at += u64::from(asked.lock().unwrap().last().unwrap().1);
        }
        map.read(900 * PAGE, &mut page);
        assert_eq!(page, pattern_page(900));
        let sizes: Vec<u32> = asked.lock().unwrap().iter().map(|r| r.1).collect();
        assert_eq!(sizes, [16, 32, 64, 128, 256, 256, 16]);
        assert_eq!(asked.lock().unwrap()[6].0, map.addr() + 896 * P, "the aligned block of page 900");
        // Every fault's request is remembered, in order: the working set to prefetch next time.
        let demand: Vec<(u64, u32)> = pager.take_demand().iter().map(|d| (d.1, d.2)).collect();
        let expected: Vec<(u64, u32)> = asked.lock().unwrap().iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(demand, expected);
        feeder.end();
        pager.wait_done(Duration::from_secs(20)).unwrap();
    }

    /// The kernel's own remap and remove events, as a process causes them: pages moved by
    /// `mremap` are still fetched by their address in the images, pages dropped by `madvise`
    /// are no longer wanted (and read as zeros).
    #[test]
    fn moved_and_dropped_pages_follow_the_kernel_events() {
        if !ferry_testkit::require_privileged() {
            return;
        }
        let map = ferry_sys::AnonMapping::new((32 * P) as usize).unwrap();
        let elsewhere = ferry_sys::AnonMapping::new((16 * P) as usize).unwrap();
        let (uffd, dir, asked, mut pager) = pager_over(&map, 32);
        let feeder = pager.feeder(); // holds the sweep back until the end of the test's moves
        hand_over(dir.path(), &uffd);
        drop(uffd);
        let mut page = vec![0u8; PAGE];
        map.read(PAGE, &mut page);
        assert_eq!(page, pattern_page(1));
        // Pages 8..24 move; the first one read at its new place is image page 8.
        map.move_to(8 * PAGE, 16 * PAGE, &elsewhere, 0).unwrap();
        elsewhere.read(0, &mut page);
        assert_eq!(page, pattern_page(8));
        // Pages 24..28 are dropped: zeros, and never asked for.
        map.discard(24 * PAGE, 4 * PAGE).unwrap();
        map.read(25 * PAGE, &mut page);
        assert_eq!(page, vec![0u8; PAGE]);
        feeder.end();
        let stats = pager.wait_done(Duration::from_secs(20)).unwrap();
        for i in 0..8 {
            map.read(i * PAGE, &mut page);
            assert_eq!(page, pattern_page(i as u64), "page {i}");
        }
        for i in 0..16 {
            elsewhere.read(i * PAGE, &mut page);
            assert_eq!(page, pattern_page(8 + i as u64), "moved page {i}");
        }
        for i in 28..32 {
            map.read(i * PAGE, &mut page);
            assert_eq!(page, pattern_page(i as u64), "page {i}");
        }
        let asked = asked.lock().unwrap().clone();
        let dropped = map.addr() + 24 * P..map.addr() + 28 * P;
        assert!(
            !asked.iter().any(|&(v, n)| v < dropped.end && v + u64::from(n) * P > dropped.start),
            "dropped pages were asked for: {asked:?}"
        );
        assert_eq!(stats.bytes, 28 * P, "every page but the 4 dropped, once");
    }

    /// A process may split a mapping whose pages are still missing (`mprotect`, `mlock`, most
    /// `madvise` advice), and no event says so; `UFFDIO_COPY` fills within one mapping only. The
    /// runs that now cross a mapping end still go in, page by page, and nothing spins.
    #[test]
    fn a_mapping_split_while_pages_are_missing_is_filled() {
        if !ferry_testkit::require_privileged() {
            return;
        }
        let map = ferry_sys::AnonMapping::new((32 * P) as usize).unwrap();
        let (uffd, dir, _asked, mut pager) = pager_over(&map, 32);
        let feeder = pager.feeder(); // holds the sweep back until the split
        hand_over(dir.path(), &uffd);
        drop(uffd);
        // Three mappings now: pages 0..10, 10..12 (read-only), 12..32.
        map.read_only((10 * P) as usize, (2 * P) as usize).unwrap();
        // Pushed pages are for processes the pager knows: wait until it has read the hand-over.
        feeder.allow();
        assert!(feeder.wait_allowed());
        // One frame of pages 0..16 crosses both ends of the read-only part.
        let mut pushed = Vec::new();
        for i in 0..16 {
            pushed.extend_from_slice(&pattern_page(i));
        }
        assert!(feeder.feed(1, map.addr(), &pushed));
        feeder.end();
        let stats = pager.wait_done(Duration::from_secs(20)).unwrap();
        let mut page = vec![0u8; PAGE];
        for i in 0..32 {
            map.read(i * PAGE, &mut page);
            assert_eq!(page, pattern_page(i as u64), "page {i}");
        }
        assert_eq!(stats.bytes, 32 * P, "every page once");
        assert_eq!(stats.pushed, 16 * P, "the push's pages went in, across the split");
    }

    #[test]
    fn a_restore_that_hangs_up_early_fails_the_pager() {
        let top = tempfile::tempdir().unwrap();
        // Longer than a socket path may be: the pager binds through the directory.
        let dir = top.path().join("w".repeat(120));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let mut pager =
            LazyPager::serve(vec![(1, vec![])], &dir, Box::new(Pattern { base: 0, asked }), None).unwrap();
        assert!(dir.join(LAZY_SOCKET).exists());
        let d = std::fs::File::open(&dir).unwrap();
        let path = format!("/proc/self/fd/{}/{LAZY_SOCKET}", std::os::fd::AsRawFd::as_raw_fd(&d));
        let restore = UnixStream::connect(path).unwrap();
        drop(restore);
        let err = pager.wait_done(Duration::from_secs(10)).unwrap_err();
        assert!(matches!(err, LazyError::RestoreEnded), "{err}");
    }

    #[test]
    fn cut_splits_ranges_and_counts_what_is_left() {
        let mut t = task(&[(0x10 * P, 0x20 * P), (0x30 * P, 0x34 * P)]);
        assert_eq!(t.left, 0x14);
        let p = t.find(0x12 * P).unwrap();
        t.set(p, Page::Present);
        assert_eq!(t.left, 0x13);
        let taken = t.cut(0x11 * P, 0x31 * P);
        assert_eq!(taken.len(), 2);
        assert_eq!((taken[0].start, taken[0].end()), (0x11 * P, 0x20 * P));
        assert_eq!((taken[1].start, taken[1].img), (0x30 * P, 0x30 * P));
        assert_eq!(t.ranges.len(), 2);
        assert_eq!((t.ranges[0].start, t.ranges[0].end()), (0x10 * P, 0x11 * P));
        assert_eq!((t.ranges[1].start, t.ranges[1].end()), (0x31 * P, 0x34 * P));
        // 0x20 pages in all, one present: 1 + 3 missing are left.
        assert_eq!(t.left, 4);
    }

    #[test]
    fn a_remapped_range_keeps_its_image_address() {
        let mut t = task(&[(0x10 * P, 0x14 * P)]);
        let mut st = State {
            tasks: vec![],
            keeper: None,
            restore_finished: true,
            push: Push::None,
            push_allowed: false,
            closed: false,
            stats: LazyStats::default(),
            demand: Vec::new(),
        };
        t.set((0, 0), Page::Present);
        st.tasks.push(t);
        let mut actions = Vec::new();
        handle_events(
            &mut st,
            0,
            vec![UffdEvent::Remap { from: 0x12 * P, to: 0x80 * P, len: 2 * P }],
            &mut actions,
        );
        let t = &st.tasks[0];
        assert_eq!(t.left, 3);
        let (ri, pi) = t.find(0x81 * P).unwrap();
        assert_eq!(t.ranges[ri].img + pi as u64 * P, 0x13 * P);
        assert_eq!(t.find_img(0x13 * P), Some((ri, pi)));
        assert!(t.find(0x12 * P).is_none(), "moved away");
        // A fault there asks the source for the page at its image address.
        handle_events(
            &mut st,
            0,
            vec![UffdEvent::PageFault { address: 0x81 * P + 5, write: true }],
            &mut actions,
        );
        assert!(matches!(actions.last(), Some(FaultAction::Fetch { pid: 7, img }) if *img == 0x13 * P));
        handle_events(&mut st, 0, vec![UffdEvent::Unmap { start: 0, end: 0x100 * P }], &mut actions);
        assert!(st.tasks[0].done());
    }
}

//! A process tree's restore through ferry's pager: the anonymous pages never become an image
//! file. Everything else is verified and written into the private tmpfs as before; CRIU then
//! restores with lazy pages, handing each process's userfaultfd to ferry's pager
//! (`ferry-lazy`), and the pages go from the sealed chunks, each checked as it is opened,
//! straight into the processes (`UFFDIO_COPY`).
//!
//! A full dump marks the pages a lazy restore may leave to its daemon `PE_LAZY` as well as
//! `PE_PRESENT`: the pagemap says where each run lies in the pages image and which runs CRIU
//! will skip. The pages image is written as a sparse file holding only the runs CRIU reads
//! itself (pages of file mappings, locked memory, the current stack pages).
//!
//! Two modes:
//! - default: at CRIU's `pre-resume` (every task restored and stopped, nothing of the workload
//!   has run) every lazy page is opened, checked and copied in; only then does the tree run.
//!   A chunk whose check fails makes ferry answer `pre-resume` with an error, and CRIU kills
//!   the tree before it runs. So nothing of a tampered checkpoint ever runs.
//! - lazy: the tree runs at once; the pages are pushed in address order while the pager serves
//!   faults first. A chunk whose check fails is never copied in: ferry kills the tree and the
//!   restore fails.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_criu::{Notify, NotifyHandler};
use ferry_lazy::guard::Guard;
use ferry_lazy::{Keeper, LazyError, LazyPager, PageFeeder, PageFetcher, StoredPages, PAGE_SIZE};
use ferry_store::{Checkpoint, ImageReader, Progress, Silent, Store, StoreError};

use crate::Error;

/// Pushed in pieces of this size: big enough to cost one `UFFDIO_COPY` per piece.
const PIECE: u64 = 1 << 20;
/// A restore whose pages are not all in after this long has failed.
pub(crate) const COMPLETE_TIMEOUT: Duration = Duration::from_secs(3600);

/// The lazy pages of one checkpoint, where they are in its files.
#[derive(Debug)]
pub struct PagePlan {
    reader: Arc<ImageReader>,
    /// Per process (pid in the images): its pages image (file index) and where its pages are.
    procs: HashMap<u32, (usize, StoredPages)>,
    /// The pager's ranges per process.
    ranges: Vec<(u32, Vec<(u64, u64)>)>,
    /// Lazy bytes in all.
    bytes: u64,
    /// Every lazy page already checked and decrypted (shared by the restores of a clone): the
    /// pager and the push copy from it instead of the store.
    verified: Option<Arc<SharedPages>>,
    /// Pages to copy in before a lazy restore's tree runs (its recorded working set), in
    /// pieces `(pid, address, bytes)`.
    prefetch: Vec<(u32, u64, u64)>,
    before_run: Arc<BeforeRun>,
}

/// Fetches that failed before the tree ran. CRIU's restorer faults on lazy pages while it
/// restores (a task's rseq area, its stack): a fetch that fails then is answered with zeros
/// and recorded, and the tree is refused at `post-restore`, before any of it runs. Failing
/// the fetch instead would leave the restorer, and the restore, waiting forever.
#[derive(Debug, Default)]
struct BeforeRun {
    running: std::sync::atomic::AtomicBool,
    failed: Mutex<Option<String>>,
}

/// A working set is recorded and prefetched up to this much: the first requests' pages, not
/// everything a long run touched (the address-order push brings the rest anyway).
pub(crate) const MAX_PREFETCH: u64 = 128 << 20;

/// Every lazy page of a checkpoint, checked and decrypted once and held in memory, so that
/// several restores of it at once (a clone's copies) are served without each opening every
/// chunk again, and may run at once: nothing they can be given has failed its check.
pub struct VerifiedPages {
    /// `(pid, address, bytes)`, sorted; piece `i` is `data[starts[i]..starts[i + 1]]`.
    pieces: Vec<(u32, u64, u64)>,
    starts: Vec<usize>,
    /// False for a piece that is not all lazy pages (none should be): never served.
    held: Vec<bool>,
    data: Vec<u8>,
}

/// [`VerifiedPages`] made by one thread while several restores of the checkpoint run CRIU
/// (a clone's copies): each copy's pager serves from them, and each copy waits for them at
/// CRIU's `post-restore` (every task restored, none run), so that none runs before every
/// chunk passed its check, and none at all if one failed (CRIU kills a tree whose
/// `post-restore` fails).
#[derive(Debug, Default)]
pub struct SharedPages {
    state: Mutex<Option<Result<Arc<VerifiedPages>, String>>>,
    ready: std::sync::Condvar,
}

impl SharedPages {
    pub fn new() -> Arc<SharedPages> {
        Arc::default()
    }

    /// Checks and decrypts every lazy page of `checkpoint` ([`verify_pages`]); the restores
    /// waiting are let go, or refused with the reason. The error, for the caller to report.
    pub fn fill(&self, checkpoint: &Checkpoint, store: &Store) -> Result<(), Error> {
        // Should this thread die on the way, the restores waiting are refused, not left waiting.
        let _answered = Unanswered(self);
        let made = verify_pages(checkpoint, store, &Silent);
        let (state, out) = match made {
            Ok(Some(v)) => (Ok(v), Ok(())),
            Ok(None) => (Err("its images do not suit ferry's pager".to_owned()), Ok(())),
            Err(e) => (Err(format!("a chunk failed its check: {e}")), Err(e)),
        };
        if let Ok(mut st) = self.state.lock() {
            *st = Some(state);
        }
        self.ready.notify_all();
        out
    }

    /// Waits until [`fill`](Self::fill) is done.
    pub fn wait(&self) -> Result<Arc<VerifiedPages>, String> {
        let mut st = self.state.lock().map_err(|_| "the page check panicked".to_owned())?;
        loop {
            if let Some(r) = st.as_ref() {
                return r.clone();
            }
            st = self.ready.wait(st).map_err(|_| "the page check panicked".to_owned())?;
        }
    }
}

/// Refuses the restores waiting on a [`SharedPages`] that was never filled.
struct Unanswered<'a>(&'a SharedPages);

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Ok(mut st) = self.0.state.lock() {
            st.get_or_insert_with(|| Err("the page check ended without an answer".into()));
        }
        self.0.ready.notify_all();
    }
}

impl std::fmt::Debug for VerifiedPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedPages")
            .field("pieces", &self.pieces.len())
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl VerifiedPages {
    /// Page bytes held.
    pub fn bytes(&self) -> u64 {
        self.data.len() as u64
    }

    /// Piece `i`'s pages, if held.
    fn piece(&self, i: usize) -> Option<&[u8]> {
        self.held.get(i).filter(|&&h| h)?;
        self.data.get(self.starts[i]..self.starts[i + 1])
    }

    /// Copies `len` bytes at `vaddr` of `pid` into `out`; `None` if some of them are not held.
    fn copy(&self, pid: u32, vaddr: u64, out: &mut [u8]) -> Option<()> {
        let mut a = vaddr;
        let end = vaddr + out.len() as u64;
        while a < end {
            let i = self.pieces.partition_point(|&(p, s, _)| (p, s) <= (pid, a)).checked_sub(1)?;
            let (p, s, n) = self.pieces[i];
            if p != pid || a >= s + n {
                return None;
            }
            let hi = (s + n).min(end);
            let from = &self.piece(i)?[(a - s) as usize..(hi - s) as usize];
            out[(a - vaddr) as usize..(hi - vaddr) as usize].copy_from_slice(from);
            a = hi;
        }
        Some(())
    }
}

/// True for the files whose content a paged restore writes itself: the pages images.
pub(crate) fn is_pages_image(name: &str) -> bool {
    name.starts_with("pages-") && name.ends_with(".img")
}

impl PagePlan {
    /// Reads the plan from the images already written into `images` (every file but the pages
    /// images, which are holes of their size) and writes into the pages images what CRIU reads
    /// itself. `Ok(None)`: this checkpoint's images do not suit a restore through the pager
    /// (the reason is logged); the caller writes the images out instead.
    pub(crate) fn prepare(
        checkpoint: &Checkpoint,
        store: &Store,
        images: &Path,
    ) -> Result<Option<PagePlan>, Error> {
        let reader = Arc::new(checkpoint.image_reader(store)?);
        let pids = match ferry_lazy::tree_pids(images) {
            Ok(p) => p,
            Err(e) => return Ok(not_suited(&e)),
        };
        let mut procs = HashMap::new();
        let mut ranges = Vec::new();
        let mut bytes = 0u64;
        let mut own_pages = Vec::new();
        // The pages CRIU reads itself (not lazy: file mappings' private copies, shared memory):
        // written before it starts, on every core.
        let mut eager = Vec::new();
        for pid in pids {
            let plan = match ferry_lazy::stored_pages(images, pid) {
                Ok(Some(p)) => p,
                Ok(None) => continue,
                Err(e) => return Ok(not_suited(&e)),
            };
            let iovs = match ferry_lazy::stored_lazy_iovs(images, pid, &plan) {
                Ok(i) => i,
                Err(e) => return Ok(not_suited(&e)),
            };
            let Some(file) = reader.file(&plan.pages_file) else {
                if plan.lazy.is_empty() && plan.eager.is_empty() {
                    ranges.push((pid, Vec::new()));
                    continue;
                }
                return Err(StoreError::Damaged {
                    name: checkpoint.name().to_owned(),
                    file: plan.pages_file.clone(),
                    detail: format!("pagemap-{pid}.img names it, the checkpoint lacks it"),
                }
                .into());
            };
            let len = reader.size(file);
            if plan.lazy.iter().any(|&(_, n, o)| o + n > len) || plan.eager.iter().any(|&(o, n)| o + n > len)
            {
                return Err(StoreError::Damaged {
                    name: checkpoint.name().to_owned(),
                    file: plan.pages_file.clone(),
                    detail: format!("pagemap-{pid}.img points past its end ({len} bytes)"),
                }
                .into());
            }
            bytes += iovs.iter().map(|(s, e)| e - s).sum::<u64>();
            eager.push((file, plan.pages_file.clone(), plan.eager.clone()));
            own_pages.push(plan.pages_file.clone());
            ranges.push((pid, iovs));
            procs.insert(pid, (file, plan));
        }
        // Pages images no process pagemap names (shared memory's) are CRIU's to read whole.
        for name in std::fs::read_dir(images).map_err(io_error(images))?.flatten() {
            let name = name.file_name().to_string_lossy().into_owned();
            if is_pages_image(&name) && !own_pages.contains(&name) {
                if let Some(file) = reader.file(&name) {
                    eager.push((file, name, vec![(0, reader.size(file))]));
                }
            }
        }
        write_runs(&reader, images, &eager)?;
        Ok(Some(PagePlan {
            reader,
            procs,
            ranges,
            bytes,
            verified: None,
            prefetch: Vec::new(),
            before_run: Arc::default(),
        }))
    }

    /// The pager for this plan, serving the restore whose work directory is `work_dir`.
    pub(crate) fn start_pager(
        &self,
        work_dir: &Path,
        keeper: Option<Keeper>,
    ) -> Result<LazyPager, LazyError> {
        let fetcher: Box<dyn PageFetcher + Send> = match &self.verified {
            Some(shared) => Box::new(VerifiedFetcher(shared.clone())),
            None => Box::new(StoreFetcher {
                reader: self.reader.clone(),
                procs: self.procs.clone(),
                before_run: self.before_run.clone(),
            }),
        };
        LazyPager::start_ranges(self.ranges.clone(), work_dir, fetcher, keeper)
    }

    /// Opens, checks and decrypts every lazy page into memory, on `threads` threads: for
    /// several restores of this checkpoint to share ([`serve_from`](Self::serve_from)). Fails
    /// at the first chunk whose check fails.
    pub fn verify_all(&self, threads: usize, progress: &dyn Progress) -> Result<VerifiedPages, StoreError> {
        let mut pieces = self.pieces();
        pieces.sort_unstable();
        let mut starts = Vec::with_capacity(pieces.len() + 1);
        let mut total = 0usize;
        for &(_, _, len) in &pieces {
            starts.push(total);
            total += len as usize;
        }
        starts.push(total);
        // One allocation, left to the kernel's default pages: asking for huge pages here
        // (MADV_HUGEPAGE) made the copies answer later, not sooner, on a host whose memory was
        // mostly page cache (direct compaction on every 2 MiB first touch).
        let mut data = vec![0u8; total];
        let mut slots = Vec::with_capacity(pieces.len());
        let mut rest = &mut data[..];
        for (i, &(_, _, len)) in pieces.iter().enumerate() {
            let (this, after) = rest.split_at_mut(len as usize);
            slots.push((i, this));
            rest = after;
        }
        let queue = Mutex::new(slots.into_iter());
        let failed: Mutex<Option<StoreError>> = Mutex::new(None);
        // Pieces some process plan does not cover as lazy pages (none should be).
        let skipped = Mutex::new(Vec::new());
        progress.stage("verify", Some(self.bytes));
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                s.spawn(|| {
                    let mut cur = self.reader.cursor();
                    // The queue's lock is let go before the piece is read.
                    let take = || queue.lock().ok().and_then(|mut q| q.next());
                    while let Some((i, buf)) = take() {
                        if failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                            break;
                        }
                        let (pid, vaddr, len) = pieces[i];
                        let read = match self.procs.get(&pid) {
                            Some((file, plan)) => read_lazy(&mut cur, *file, plan, vaddr, buf),
                            None => Ok(false),
                        };
                        match read {
                            Ok(true) => progress.advance(len),
                            Ok(false) => {
                                if let Ok(mut v) = skipped.lock() {
                                    v.push(i);
                                }
                            }
                            Err(e) => {
                                if let Ok(mut f) = failed.lock() {
                                    f.get_or_insert(e);
                                }
                                break;
                            }
                        }
                    }
                });
            }
        });
        if let Ok(Some(e)) = failed.into_inner() {
            return Err(e);
        }
        let mut held = vec![true; pieces.len()];
        for i in skipped.into_inner().unwrap_or_default() {
            held[i] = false;
        }
        Ok(VerifiedPages { pieces, starts, held, data })
    }

    /// Pushes `hint`'s pages (a lazy restore's recorded working set) first once the tree runs,
    /// in the order it was recorded (what the last tree faulted on first comes first); what is
    /// no lazy page of this plan, or already named, is left out, and the rest up to
    /// [`MAX_PREFETCH`].
    pub(crate) fn set_prefetch(&mut self, hint: &[ferry_store::working_set::Run]) {
        let mut seen = std::collections::HashSet::new();
        let mut budget = MAX_PREFETCH;
        self.prefetch.clear();
        for r in hint {
            let Some((_, iovs)) = self.ranges.iter().find(|(p, _)| *p == r.pid) else { continue };
            let (s, e) = (r.vaddr, r.vaddr.saturating_add(u64::from(r.pages) * PAGE_SIZE));
            // Only what lies within the lazy ranges, in pieces of at most PIECE.
            for &(a, b) in iovs {
                let (lo, hi) = (s.max(a), e.min(b));
                let mut at = lo;
                while at < hi && budget > 0 {
                    let n = PIECE.min(hi - at).min(budget);
                    if seen.insert((r.pid, at)) {
                        self.prefetch.push((r.pid, at, n));
                        budget -= n;
                    }
                    at += n;
                }
            }
        }
    }

    /// The tree is let run: a fetch that fails from now on fails the restore.
    pub(crate) fn mark_running(&self) {
        self.before_run.running.store(true, Ordering::SeqCst);
    }

    /// At `post-restore`: an error if a page CRIU's restorer faulted on failed its check.
    fn refuse_if_fetch_failed(&self) -> Result<(), Error> {
        match self.before_run.failed.lock().ok().and_then(|f| f.clone()) {
            Some(why) => Err(Error::Pager(format!("a page the restore touched before the tree ran: {why}"))),
            None => Ok(()),
        }
    }

    /// Whether a working set is to be pushed first.
    pub(crate) fn has_prefetch(&self) -> bool {
        !self.prefetch.is_empty()
    }

    /// The pages [`set_prefetch`](Self::set_prefetch) named as runs, for recording again.
    pub(crate) fn prefetch_runs(&self) -> Vec<ferry_store::working_set::Run> {
        let max = u64::from(ferry_store::working_set::MAX_RUN_PAGES) * PAGE_SIZE;
        let mut out = Vec::new();
        for &(pid, vaddr, len) in &self.prefetch {
            let mut a = vaddr;
            while a < vaddr + len {
                let n = max.min(vaddr + len - a);
                out.push(ferry_store::working_set::Run { pid, vaddr: a, pages: (n / PAGE_SIZE) as u32 });
                a += n;
            }
        }
        out
    }

    /// Reads `buf.len()` bytes of lazy pages at `vaddr` of `pid`, each chunk checked (or from
    /// the verified pages). `Ok(false)`: not all of them are lazy pages.
    fn read_pages(
        &self,
        cur: &mut ferry_store::Cursor<'_>,
        pid: u32,
        vaddr: u64,
        buf: &mut [u8],
    ) -> Result<bool, StoreError> {
        if let Some(shared) = &self.verified {
            // Ready: the tree passed wait_verified before it ran.
            return Ok(shared.wait().ok().and_then(|v| v.copy(pid, vaddr, buf)).is_some());
        }
        let Some((file, plan)) = self.procs.get(&pid) else { return Ok(false) };
        read_lazy(cur, *file, plan, vaddr, buf)
    }

    /// Copies the prefetch pieces in through `feeder`, roughly in their order, on every core
    /// at normal priority (the tree runs and will fault on them soon): the bytes copied. A
    /// chunk that fails its check fails it.
    pub(crate) fn push_prefetch(&self, feeder: &PageFeeder) -> Result<u64, Error> {
        if !feeder.wait_handed_over(&self.pids()) {
            return Err(Error::Pager("the pager ended before the restore handed it every process".into()));
        }
        let next = AtomicUsize::new(0);
        let failed: Mutex<Option<StoreError>> = Mutex::new(None);
        let done = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..threads().min(self.prefetch.len()) {
                s.spawn(|| {
                    let mut cur = self.reader.cursor();
                    let mut buf = Vec::new();
                    while let Some(&(pid, vaddr, len)) =
                        self.prefetch.get(next.fetch_add(1, Ordering::Relaxed))
                    {
                        buf.resize(len as usize, 0);
                        match self.read_pages(&mut cur, pid, vaddr, &mut buf) {
                            Ok(true) => {}
                            Ok(false) => continue,
                            Err(e) => {
                                if let Ok(mut f) = failed.lock() {
                                    f.get_or_insert(e);
                                }
                                break;
                            }
                        }
                        if !feeder.feed(pid, vaddr, &buf) {
                            break;
                        }
                        done.fetch_add(len, Ordering::Relaxed);
                    }
                });
            }
        });
        match failed.into_inner() {
            Ok(Some(e)) => {
                // No push follows: the pager is told, or it would wait for one.
                feeder.end();
                Err(e.into())
            }
            _ => Ok(done.into_inner()),
        }
    }

    /// Serves this restore's pages from `shared` (the same checkpoint's, being checked).
    pub fn serve_from(&mut self, shared: Arc<SharedPages>) {
        self.verified = Some(shared);
    }

    /// With [`serve_from`](Self::serve_from): waits until the shared pages are checked, and
    /// makes sure they are this plan's. An error here must keep the tree from running.
    fn wait_verified(&self) -> Result<(), Error> {
        let Some(shared) = &self.verified else { return Ok(()) };
        let v = shared.wait().map_err(|why| Error::Pager(format!("the checkpoint's pages: {why}")))?;
        let mut mine = self.pieces();
        mine.sort_unstable();
        if mine != v.pieces {
            return Err(Error::Internal("the verified pages are not this checkpoint's".into()));
        }
        Ok(())
    }

    /// Every lazy page in pieces, in address order per process: (pid, address, bytes).
    fn pieces(&self) -> Vec<(u32, u64, u64)> {
        let mut out = Vec::new();
        for (pid, iovs) in &self.ranges {
            for &(s, e) in iovs {
                let mut a = s;
                while a < e {
                    let n = PIECE.min(e - a);
                    out.push((*pid, a, n));
                    a += n;
                }
            }
        }
        out
    }

    /// The processes whose pages the pager fills (pids in the images).
    pub(crate) fn pids(&self) -> Vec<u32> {
        self.ranges.iter().map(|(p, _)| *p).collect()
    }

    /// Opens every lazy page and copies it in through `feeder`, on `threads` threads. Stops at
    /// the first chunk that fails its check (nothing of it is copied) and returns its error.
    /// The caller has waited until the pager may take them. `behind_the_workload`: the tree
    /// runs meanwhile, so the threads take only CPU time it and the pager (serving its faults)
    /// leave.
    pub(crate) fn push(
        &self,
        feeder: &PageFeeder,
        threads: usize,
        behind_the_workload: bool,
        progress: &dyn Progress,
    ) -> Result<(), StoreError> {
        if let Some(shared) = &self.verified {
            // Ready: the tree passed wait_verified before it ran.
            if let Ok(v) = shared.wait() {
                push_verified(&v, feeder, threads, behind_the_workload, progress);
            } else {
                feeder.end();
            }
            return Ok(());
        }
        let pieces = self.pieces();
        let next = AtomicUsize::new(0);
        let failed: Mutex<Option<StoreError>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads.max(1) {
                s.spawn(|| {
                    push_thread_priority(behind_the_workload);
                    let mut cur = self.reader.cursor();
                    let mut buf = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(pid, vaddr, len)) = pieces.get(i) else { break };
                        if failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                            break;
                        }
                        let Some((file, plan)) = self.procs.get(&pid) else { continue };
                        let Some(off) = plan.offset_of(vaddr, len) else { continue };
                        buf.resize(len as usize, 0);
                        if let Err(e) = cur.read(*file, off, &mut buf) {
                            if let Ok(mut f) = failed.lock() {
                                f.get_or_insert(e);
                            }
                            break;
                        }
                        if !feeder.feed(pid, vaddr, &buf) {
                            break;
                        }
                        progress.advance(len);
                        // Tests: ferry dies while pages are still missing.
                        ferry_sys::failpoint::check("restore-push");
                    }
                });
            }
        });
        feeder.end();
        match failed.into_inner() {
            Ok(Some(e)) => Err(e),
            _ => Ok(()),
        }
    }
}

/// Checks and decrypts every lazy page of `checkpoint` into memory once, for several restores
/// of it to share ([`SharedPages`]). `Ok(None)`: its images do not suit the pager,
/// and each restore reads the images whole.
pub fn verify_pages(
    checkpoint: &Checkpoint,
    store: &Store,
    progress: &dyn Progress,
) -> Result<Option<Arc<VerifiedPages>>, Error> {
    let scratch = store.scratch(&format!("verify-{}", checkpoint.name()))?;
    let images = scratch.path().join("images");
    std::fs::create_dir(&images).map_err(io_error(&images))?;
    checkpoint.materialize_except(store, &images, &is_pages_image)?;
    let Some(plan) = PagePlan::prepare(checkpoint, store, &images)? else { return Ok(None) };
    let t = Instant::now();
    let verified = plan.verify_all(threads(), progress)?;
    tracing::info!(
        bytes = verified.bytes(),
        seconds = t.elapsed().as_secs_f64(),
        "every page checked and decrypted into memory"
    );
    Ok(Some(Arc::new(verified)))
}

/// A push thread behind a running workload takes only the CPU time it leaves.
fn push_thread_priority(behind_the_workload: bool) {
    if behind_the_workload {
        if let Err(e) = ferry_sys::idle_priority_for_this_thread() {
            tracing::debug!(error = %e, "the push runs at normal priority");
        }
    }
}

/// [`PagePlan::push`] from pages checked already: copies only.
fn push_verified(
    v: &VerifiedPages,
    feeder: &PageFeeder,
    threads: usize,
    behind_the_workload: bool,
    progress: &dyn Progress,
) {
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                push_thread_priority(behind_the_workload);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(pid, vaddr, len)) = v.pieces.get(i) else { break };
                    let Some(data) = v.piece(i) else { continue };
                    if !feeder.feed(pid, vaddr, data) {
                        break;
                    }
                    progress.advance(len);
                    ferry_sys::failpoint::check("restore-push");
                }
            });
        }
    });
    feeder.end();
}

/// Writes every pages image of `images` whole (a restore that does not go through the pager).
pub(crate) fn write_pages_images(checkpoint: &Checkpoint, store: &Store, images: &Path) -> Result<(), Error> {
    let reader = checkpoint.image_reader(store)?;
    let mut jobs = Vec::new();
    for f in &checkpoint.manifest.files {
        if let (true, Some(file)) = (is_pages_image(&f.name), reader.file(&f.name)) {
            jobs.push((file, f.name.clone(), vec![(0, f.size)]));
        }
    }
    write_runs(&reader, images, &jobs)
}

fn not_suited(e: &LazyError) -> Option<PagePlan> {
    tracing::info!(error = %e, "these images do not suit a restore through the pager: writing them out");
    None
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| StoreError::Io { action: "cannot write", path: path.to_path_buf(), source }.into()
}

/// An image (the reader's file number and its name) and the runs `(offset, bytes)` of it to write.
type ImageRuns = (usize, String, Vec<(u64, u64)>);

/// Writes runs `(offset, bytes)` of each image (reader's file, its name) into its hole in
/// `images`, in pieces of at most 4 MiB spread over [`threads`] threads (each chunk is checked
/// and decrypted on the way: a restore's time before CRIU starts).
fn write_runs(reader: &ImageReader, images: &Path, jobs: &[ImageRuns]) -> Result<(), Error> {
    const PIECE_BYTES: u64 = 4 << 20;
    let mut outs = Vec::with_capacity(jobs.len());
    let mut pieces = Vec::new();
    for (j, (file, name, runs)) in jobs.iter().enumerate() {
        if runs.is_empty() {
            outs.push(None);
            continue;
        }
        let path = images.join(name);
        outs.push(Some((OpenOptions::new().write(true).open(&path).map_err(io_error(&path))?, path)));
        for &(off, len) in runs {
            let mut at = off;
            while at < off + len {
                let n = (off + len - at).min(PIECE_BYTES);
                pieces.push((j, *file, at, n));
                at += n;
            }
        }
    }
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads().min(pieces.len()) {
            s.spawn(|| {
                let mut cur = reader.cursor();
                let mut buf = Vec::new();
                while let Some(&(j, file, at, n)) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) {
                    buf.resize(n as usize, 0);
                    let Some((out, path)) = &outs[j] else { continue };
                    let written = cur
                        .read(file, at, &mut buf)
                        .map_err(Error::from)
                        .and_then(|()| out.write_all_at(&buf, at).map_err(io_error(path)));
                    if let Err(e) = written {
                        if let Ok(mut f) = failed.lock() {
                            f.get_or_insert(e);
                        }
                        break;
                    }
                    if failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                        break;
                    }
                }
            });
        }
    });
    match failed.into_inner() {
        Ok(Some(e)) => Err(e),
        _ => Ok(()),
    }
}

/// The pager's way to pages it is asked for: read from the store, each chunk checked.
struct StoreFetcher {
    reader: Arc<ImageReader>,
    procs: HashMap<u32, (usize, StoredPages)>,
    before_run: Arc<BeforeRun>,
}

impl PageFetcher for StoreFetcher {
    fn fetch(&mut self, pid: u32, vaddr: u64, nr_pages: u32, out: &mut Vec<u8>) -> Result<(), LazyError> {
        self.fetch_many(&[(pid, vaddr, nr_pages)], out)
    }

    fn fetch_many(&mut self, reqs: &[(u32, u64, u32)], out: &mut Vec<u8>) -> Result<(), LazyError> {
        out.clear();
        let mut cur = self.reader.cursor();
        for &(pid, vaddr, n) in reqs {
            let len = u64::from(n) * PAGE_SIZE;
            let refused = |why: &str| LazyError::Refused { pid, vaddr, nr_pages: n, why: why.into() };
            let (file, plan) =
                self.procs.get(&pid).ok_or_else(|| refused("no such process in the images"))?;
            let start = out.len();
            out.resize(start + len as usize, 0);
            // Tests: a chunk that fails its check, wherever the fault comes from.
            let injected =
                ferry_sys::failpoint::check("restore-fetch") == Some(ferry_sys::failpoint::Action::Corrupt);
            let read = if injected {
                Err("chunk failed authentication (failpoint restore-fetch)".to_owned())
            } else {
                read_lazy(&mut cur, *file, plan, vaddr, &mut out[start..]).map_err(|e| e.to_string())
            };
            match read {
                Ok(true) => {}
                Ok(false) => return Err(refused("not a lazy page")),
                Err(why) if !self.before_run.running.load(Ordering::SeqCst) => {
                    // See BeforeRun: zeros for CRIU's restorer, and the tree refused.
                    tracing::warn!(pid, vaddr, error = %why, "a page the restore touched failed its check");
                    out[start..].fill(0);
                    if let Ok(mut f) = self.before_run.failed.lock() {
                        f.get_or_insert(why);
                    }
                }
                Err(why) => return Err(LazyError::Fetch(why)),
            }
        }
        Ok(())
    }
}

/// Reads the lazy pages at `vaddr` of one process (`file`: its pages image) into `out`, each
/// chunk checked. `Ok(false)`: some of them are not lazy pages.
fn read_lazy(
    cur: &mut ferry_store::Cursor<'_>,
    file: usize,
    plan: &StoredPages,
    vaddr: u64,
    out: &mut [u8],
) -> Result<bool, StoreError> {
    // A request may span runs that are adjacent in memory but not in the image.
    let end = vaddr + out.len() as u64;
    let mut a = vaddr;
    while a < end {
        let Some(i) = plan.lazy.partition_point(|&(s, _, _)| s <= a).checked_sub(1) else { return Ok(false) };
        let (s, l, o) = plan.lazy[i];
        if a >= s + l {
            return Ok(false);
        }
        let hi = (s + l).min(end);
        cur.read(file, o + (a - s), &mut out[(a - vaddr) as usize..(hi - vaddr) as usize])?;
        a = hi;
    }
    Ok(true)
}

/// The pager's way to pages when they were checked and decrypted already ([`SharedPages`]).
struct VerifiedFetcher(Arc<SharedPages>);

impl PageFetcher for VerifiedFetcher {
    fn fetch(&mut self, pid: u32, vaddr: u64, nr_pages: u32, out: &mut Vec<u8>) -> Result<(), LazyError> {
        out.clear();
        out.resize(u64::from(nr_pages) as usize * PAGE_SIZE as usize, 0);
        let Ok(v) = self.0.wait() else {
            // The check failed, so this tree is refused at `post-restore`, before any of it
            // runs: until then CRIU's restorer (its rseq area, its stack) gets zeros, never
            // a page of the checkpoint. Failing here instead would leave it waiting forever.
            out.fill(0);
            return Ok(());
        };
        v.copy(pid, vaddr, out).ok_or_else(|| LazyError::Refused {
            pid,
            vaddr,
            nr_pages,
            why: "not a lazy page".into(),
        })
    }
}

/// When the pages go in: before the tree may run, at CRIU's `post-restore` (default), or
/// from `pre-resume` on, while it runs (`lazy`).
pub(crate) struct PushAtRestore<'a> {
    pub(crate) plan: &'a PagePlan,
    pub(crate) feeder: PageFeeder,
    pub(crate) lazy: bool,
    /// The restored root, once CRIU names it.
    pub(crate) root: Option<i32>,
    /// A lazy restore's guard, told the root before it runs.
    pub(crate) guard: Option<Arc<Guard>>,
    /// Why the push failed (a chunk's check, or the pager).
    pub(crate) failure: Option<Error>,
    /// When the tree was let run.
    pub(crate) resumed: Option<Instant>,
    pub(crate) progress: &'a dyn Progress,
    /// The copy's host name, set before it runs.
    pub(crate) named: crate::restore::NameBeforeRun<'a>,
}

impl NotifyHandler for PushAtRestore<'_> {
    fn notify(&mut self, event: &Notify, pid: Option<i32>) -> Result<(), String> {
        if let (Notify::SetupNamespaces | Notify::PostRestore, Some(pid)) = (event, pid) {
            if self.root.is_none() {
                self.root = Some(pid);
                if let Some(g) = &self.guard {
                    g.watch(pid, ferry_sys::process_start_time(pid).unwrap_or(0));
                }
            }
        }
        self.named.at(event, pid)?;
        match event {
            // Every task is restored and waits; none has run. An error here makes CRIU kill
            // the tree (one at pre-resume would not: CRIU 4.2 only logs it and resumes).
            Notify::PostRestore if !self.lazy => push_before_run(self.plan, &self.feeder, self.progress)
                .map_err(|e| {
                    let text = format!("{e}: the restored tree is not let run");
                    self.failure = Some(e);
                    text
                }),
            // A clone's copy: none runs before the shared check of every chunk is done.
            Notify::PostRestore => {
                self.plan.wait_verified().and_then(|()| self.plan.refuse_if_fetch_failed()).map_err(|e| {
                    let text = format!("{e}: the restored tree is not let run");
                    self.failure = Some(e);
                    text
                })
            }
            Notify::PreResume => {
                self.plan.mark_running();
                self.feeder.allow();
                self.resumed = Some(Instant::now());
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// Writes `checkpoint`'s images into `images` for a restore through ferry's pager: every image
/// but the pages (which the pager copies in). `Ok(None)`: a container's checkpoint, or images
/// that do not suit the pager; then every image is written whole, for CRIU (or the runtime) to
/// read.
pub fn write_images_for_pager(
    checkpoint: &Checkpoint,
    store: &Store,
    images: &Path,
) -> Result<Option<PagePlan>, Error> {
    checkpoint.materialize_except(store, images, &is_pages_image)?;
    let container = checkpoint.manifest.files.iter().any(|f| f.name == crate::container::record::RECORD_FILE);
    let plan = if container { None } else { PagePlan::prepare(checkpoint, store, images)? };
    if plan.is_none() {
        write_pages_images(checkpoint, store, images)?;
    }
    Ok(plan)
}

/// A restore through ferry's pager driven by a caller that runs CRIU's restore itself (a
/// migration's target), every page in before the tree runs: start the pager, run the restore
/// with [`PagedRestore::handler`] around the caller's own handler (with lazy pages on), then
/// [`finish`](Self::finish) or [`abort`](Self::abort).
#[derive(Debug)]
pub struct PagedRestore<'a> {
    plan: &'a PagePlan,
    pager: LazyPager,
    feeder: PageFeeder,
    failure: Option<Error>,
}

impl PagePlan {
    /// Starts the pager for a restore whose work (log) directory is `work_dir`.
    pub fn start(&self, work_dir: &Path) -> Result<PagedRestore<'_>, Error> {
        let pager = self.start_pager(work_dir, None).map_err(|e| Error::Pager(e.to_string()))?;
        let feeder = pager.feeder();
        Ok(PagedRestore { plan: self, pager, feeder, failure: None })
    }

    /// Page bytes the pager fills.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl<'a> PagedRestore<'a> {
    /// `inner` with the pages pushed at `post-restore` first (an error there makes CRIU kill the
    /// tree before it ran).
    pub fn handler<'b>(&'b mut self, inner: &'b mut dyn NotifyHandler) -> PushFirst<'b, 'a> {
        PushFirst { paged: self, inner }
    }

    /// Why the push failed, if it did: the error to report rather than CRIU's echo of it.
    pub fn failure(&mut self) -> Option<Error> {
        self.failure.take()
    }

    /// After a successful restore: waits until the pager is done (every page is in already).
    pub fn finish(mut self) -> Result<ferry_lazy::LazyStats, Error> {
        let r = self.pager.wait_done(COMPLETE_TIMEOUT).map_err(|e| Error::Pager(e.to_string()));
        let stats = self.pager.stop();
        r.map(|_| stats)
    }

    /// After a failed restore.
    pub fn abort(self) {
        self.pager.stop();
    }
}

/// A caller's notification handler with the pages pushed at `post-restore` first.
pub struct PushFirst<'a, 'b> {
    paged: &'a mut PagedRestore<'b>,
    inner: &'a mut dyn NotifyHandler,
}

impl std::fmt::Debug for PushFirst<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushFirst").field("paged", &self.paged).finish_non_exhaustive()
    }
}

impl NotifyHandler for PushFirst<'_, '_> {
    fn notify(&mut self, event: &Notify, pid: Option<i32>) -> Result<(), String> {
        if *event == Notify::PostRestore {
            let p = &mut *self.paged;
            // A migration's target: its progress is the source's to report.
            if let Err(e) = push_before_run(p.plan, &p.feeder, &Silent) {
                let text = format!("{e}: the restored tree is not let run");
                p.failure = Some(e);
                return Err(text);
            }
        }
        if *event == Notify::PreResume {
            self.paged.plan.mark_running();
            self.paged.feeder.allow();
        }
        self.inner.notify(event, pid)
    }
}

/// At CRIU's `post-restore` (every task restored, none run): every page checked and copied in.
fn push_before_run(plan: &PagePlan, feeder: &PageFeeder, progress: &dyn Progress) -> Result<(), Error> {
    plan.refuse_if_fetch_failed()?;
    if !feeder.wait_handed_over(&plan.pids()) {
        return Err(Error::Pager("the pager ended before the restore handed it every process".into()));
    }
    let t = Instant::now();
    progress.stage("pages", Some(plan.bytes));
    plan.push(feeder, threads(), false, progress)?;
    tracing::info!(
        bytes = plan.bytes,
        seconds = t.elapsed().as_secs_f64(),
        "every page checked and copied in"
    );
    Ok(())
}

/// Push threads: one per core, at least one.
pub(crate) fn threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8)
}

/// Kills every process of the restored tree below and including `root` (the pager failed: its
/// pages cannot all come). A process forking meanwhile is caught by the next round.
pub(crate) fn kill_tree(root: i32) {
    for _ in 0..10 {
        let tree = ferry_sys::process_tree(root);
        let alive: Vec<i32> = tree.into_iter().filter(|&p| ferry_sys::process_exists(p)).collect();
        if alive.is_empty() {
            return;
        }
        for p in alive {
            let _ = ferry_sys::kill(p, ferry_sys::Signal::Kill);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The directory of one restore through the pager: CRIU's log and the pager's socket.
pub(crate) fn work_dir(logs: &Path, name: &str, stamp: u128) -> PathBuf {
    logs.join(format!("restore-{name}-{stamp}"))
}

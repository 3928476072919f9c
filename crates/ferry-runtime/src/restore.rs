//! `restore`: recreate a checkpointed tree from the store.
//!
//! Nothing from a checkpoint reaches CRIU unverified: the manifest's signature and catalog
//! entry are checked when it is opened, and every chunk's tag and hash while the images are
//! written into a private tmpfs; only then does CRIU read them. The tmpfs is gone when this
//! returns, on every path.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use std::path::Path;

use ferry_criu::{LogTarget, Notify, NotifyHandler, RestoreOptions, SharedOptions};

use crate::container::{ContainerRecord, CriuConfig, RestoreSpec, Restored};
use crate::paged::{self, PagePlan, PushAtRestore};
use crate::{Context, Error};

#[derive(Debug, Clone, Default)]
pub struct RestoreRequest {
    pub name: String,
    /// A container's name under its runtime (default: the name it had).
    pub new_name: Option<String>,
    /// Let the tree run before its memory is complete (the pages it touches first come first).
    pub lazy: bool,
    /// With `lazy`: the program (and its first arguments) of the guard that kills the tree if
    /// this process dies before every page is in (`ferry guard`; the checkpoint's name is
    /// appended). Without one, such a death leaves the tree reading zeros for missing pages.
    pub guard: Option<Vec<String>>,
    /// The network namespace for a tree whose own was declared external at the checkpoint
    /// ([`NETNS_KEY`]): a clone's, each with its own address.
    pub netns: Option<Arc<OwnedFd>>,
    /// Tells apart the logs and scratch of restores of one checkpoint that run at once (clones).
    pub instance: Option<String>,
    /// Established connections come back closed (a copy beside its original must not answer
    /// the original's peers).
    pub tcp_close: bool,
    /// Sets the host name of the tree's own UTS namespace before any task runs (at CRIU's
    /// `post-restore`); a tree in this host's UTS namespace is left alone.
    pub hostname: Option<String>,
    /// The checkpoint's pages, checked and decrypted once for several restores (a clone's
    /// copies), possibly still being checked: the tree waits for them before it runs, then its
    /// pages come from memory. With it, a `lazy` restore runs a tree none of whose pages can
    /// still fail a check.
    pub verified: Option<Arc<paged::SharedPages>>,
}

/// The key under which a workload's network namespace is declared external to CRIU
/// (`--external net[INODE]:KEY` at the checkpoint, `--inherit-fd fd[N]:KEY` at the restore).
pub const NETNS_KEY: &str = "ferry-net";

#[derive(Debug, Clone)]
pub struct RestoreReport {
    /// Host PID of the restored root; for a process tree, a child of this process (CRIU
    /// restores it as our sibling); a container's belongs to its runtime.
    pub pid: i32,
    /// The restored container (`KIND:NAME`), if the checkpoint is of one.
    pub container: Option<String>,
    /// Time to verify and decrypt the images (through the pager: every image but the pages).
    pub verify_seconds: f64,
    /// Until the restored tree runs.
    pub seconds: f64,
    /// Until its memory is complete (through the pager; otherwise as `seconds`).
    pub complete_seconds: f64,
    /// Page bytes copied in by ferry's pager (0: CRIU read the pages from the images).
    pub paged_bytes: u64,
    pub log: PathBuf,
}

pub fn restore(ctx: &Context, req: &RestoreRequest) -> Result<RestoreReport, Error> {
    restore_then(ctx, req, &mut |_| Ok(()))
}

/// [`restore`], calling `running` with the root's pid as soon as the tree runs: for a lazy
/// restore, before its memory is complete. An error from `running` kills the tree and is the
/// restore's.
pub fn restore_then(
    ctx: &Context,
    req: &RestoreRequest,
    running: &mut dyn FnMut(i32) -> Result<(), Error>,
) -> Result<RestoreReport, Error> {
    let checkpoint = ctx.store.get(&req.name)?;
    let started = Instant::now();
    let label = match &req.instance {
        Some(i) => format!("{}-{i}", req.name),
        None => req.name.clone(),
    };
    let scratch = ctx.store.scratch(&format!("restore-{label}"))?;
    let images = scratch.path().join("images");
    std::fs::create_dir(&images).map_err(|source| ferry_store::StoreError::Io {
        action: "cannot create",
        path: images.clone(),
        source,
    })?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    // A process tree's pages go through ferry's pager; a container's runtime reads images.
    let container = checkpoint.manifest.files.iter().any(|f| f.name == crate::container::record::RECORD_FILE);
    if !container {
        checkpoint.materialize_reporting(&ctx.store, &images, &paged::is_pages_image, &*ctx.progress)?;
        if let Some(mut plan) = PagePlan::prepare(&checkpoint, &ctx.store, &images)? {
            if let Some(v) = &req.verified {
                plan.serve_from(v.clone());
            }
            if req.lazy {
                plan.set_prefetch(&ctx.store.working_set(&checkpoint));
            }
            let paged = PagedArgs { label: &label, checkpoint: &checkpoint, images: &images, plan: &plan };
            return restore_paged(ctx, req, &paged, started, stamp, running);
        }
        // Not suited after all: the pages images in full, then CRIU reads them.
        paged::write_pages_images(&checkpoint, &ctx.store, &images)?;
    } else {
        checkpoint.materialize_reporting(&ctx.store, &images, &|_| false, &*ctx.progress)?;
    }
    let verify_seconds = started.elapsed().as_secs_f64();

    if let Some(record) = ContainerRecord::read_from(&images)? {
        let work_dir = ctx.store.logs_dir().join(format!("restore-{}-{stamp}", req.name));
        ctx.progress.stage("restore", None);
        let restored = restore_container(
            ctx,
            &ContainerRestore {
                record: &record,
                images: &images,
                name: req.new_name.as_deref(),
                netns: None,
                work_dir: &work_dir,
                lazy: false,
                tcp_established: checkpoint.manifest.tcp_established,
            },
        )?;
        drop(scratch);
        let seconds = started.elapsed().as_secs_f64();
        return Ok(RestoreReport {
            pid: restored.pid,
            container: Some(format!("{}:{}", record.kind, restored.name)),
            verify_seconds,
            seconds,
            complete_seconds: seconds,
            paged_bytes: 0,
            log: work_dir.join(crate::container::criu_conf::LOG_FILE),
        });
    }
    if req.new_name.is_some() {
        return Err(Error::InvalidWorkload {
            input: req.name.clone(),
            why: "--name renames containers; this checkpoint is of a process tree".into(),
        });
    }
    let log = LogTarget::new(ctx.store.logs_dir(), format!("restore-{label}-{stamp}.log"));
    let mut opts = RestoreOptions::new(&images, log.clone())
        .tcp_established(checkpoint.manifest.tcp_established)
        .restore_sibling(true);
    if let Some(fd) = &req.netns {
        opts = opts.inherit_fd(NETNS_KEY, fd.clone());
    }
    opts = opts.tcp_close(req.tcp_close);
    tracing::info!(name = %req.name, "restoring");
    ctx.progress.stage("restore", None);
    let mut named = NameBeforeRun { hostname: req.hostname.as_deref(), root: None };
    let outcome = ctx.criu.restore(&opts, &mut named)?;
    drop(scratch);
    let seconds = started.elapsed().as_secs_f64();
    if let Err(e) = running(outcome.pid) {
        paged::kill_tree(outcome.pid);
        let _ = ferry_sys::wait_child(outcome.pid);
        return Err(e);
    }
    Ok(RestoreReport {
        pid: outcome.pid,
        container: None,
        verify_seconds,
        seconds,
        complete_seconds: seconds,
        paged_bytes: 0,
        log: log.path(),
    })
}

/// Sets a restored tree's host name at `post-restore`, before any of its tasks runs.
pub(crate) struct NameBeforeRun<'a> {
    pub(crate) hostname: Option<&'a str>,
    pub(crate) root: Option<i32>,
}

impl NameBeforeRun<'_> {
    /// An error here makes CRIU kill the tree: no copy runs under its original's name.
    pub(crate) fn at(&mut self, event: &Notify, pid: Option<i32>) -> Result<(), String> {
        if let (Notify::SetupNamespaces | Notify::PostRestore, Some(pid), None) = (event, pid, self.root) {
            self.root = Some(pid);
        }
        match (event, self.hostname, self.root) {
            (Notify::PostRestore, Some(name), Some(root)) => {
                crate::clone::name_tree(root, name).map_err(|e| e.to_string())
            }
            _ => Ok(()),
        }
    }
}

impl NotifyHandler for NameBeforeRun<'_> {
    fn notify(&mut self, event: &Notify, pid: Option<i32>) -> Result<(), String> {
        self.at(event, pid)
    }
}

/// What a restore through the pager restores from.
struct PagedArgs<'a> {
    label: &'a str,
    checkpoint: &'a ferry_store::Checkpoint,
    images: &'a Path,
    plan: &'a PagePlan,
}

/// A process tree's restore whose pages go from the store through ferry's pager (`paged`).
fn restore_paged(
    ctx: &Context,
    req: &RestoreRequest,
    args: &PagedArgs<'_>,
    started: Instant,
    stamp: u128,
    running: &mut dyn FnMut(i32) -> Result<(), Error>,
) -> Result<RestoreReport, Error> {
    let PagedArgs { label, checkpoint, images, plan } = *args;
    if req.new_name.is_some() {
        return Err(Error::InvalidWorkload {
            input: req.name.clone(),
            why: "--name renames containers; this checkpoint is of a process tree".into(),
        });
    }
    let verify_seconds = started.elapsed().as_secs_f64();
    let work_dir = paged::work_dir(&ctx.store.logs_dir(), label, stamp);
    std::fs::create_dir_all(&work_dir).map_err(|source| ferry_store::StoreError::Io {
        action: "cannot create",
        path: work_dir.clone(),
        source,
    })?;
    let log = LogTarget::new(&work_dir, "restore.log");
    let with_log =
        |e: ferry_lazy::LazyError| Error::Pager(format!("{e} (CRIU's log: {})", log.path().display()));
    // Lazy: the tree runs before its pages are all in; should this process die meanwhile, the
    // guard keeps the userfaultfds open (no zeros) and kills the tree.
    let guard = match (&req.guard, req.lazy) {
        (Some(program), true) => Some(ferry_lazy::guard::Guard::spawn(program, &req.name).map_err(with_log)?),
        _ => None,
    };
    let mut pager = plan.start_pager(&work_dir, guard.as_ref().map(|g| g.keeper())).map_err(with_log)?;
    let feeder = pager.feeder();
    let mut opts = RestoreOptions::new(images, log.clone())
        .tcp_established(checkpoint.manifest.tcp_established)
        .restore_sibling(true)
        .lazy_pages(true);
    if let Some(fd) = &req.netns {
        opts = opts.inherit_fd(NETNS_KEY, fd.clone());
    }
    opts = opts.tcp_close(req.tcp_close);
    tracing::info!(name = %req.name, lazy = req.lazy, bytes = plan.bytes(), "restoring through the pager");
    let mut at_resume = PushAtRestore {
        plan,
        feeder: feeder.clone(),
        lazy: req.lazy,
        root: None,
        guard: guard.clone(),
        failure: None,
        resumed: None,
        progress: &*ctx.progress,
        named: NameBeforeRun { hostname: req.hostname.as_deref(), root: None },
    };
    // CRIU restores the tree; the pages follow at post-restore (or, lazy, once it runs).
    ctx.progress.stage("restore", None);
    let restored = ctx.criu.restore(&opts, &mut at_resume);
    let (failure, resumed) = (at_resume.failure.take(), at_resume.resumed);
    let outcome = match (restored, failure) {
        (Ok(o), _) => o,
        // The pager's or a chunk's failure is what the user needs to read, not CRIU's echo of it.
        (Err(_), Some(f)) => {
            pager.stop();
            return Err(f);
        }
        (Err(e), None) => {
            pager.stop();
            return Err(e.into());
        }
    };
    let seconds = resumed.map_or(started.elapsed(), |r| r - started).as_secs_f64();
    if let Err(e) = running(outcome.pid) {
        paged::kill_tree(outcome.pid);
        let _ = ferry_sys::wait_child(outcome.pid);
        pager.stop();
        return Err(e);
    }
    if req.lazy {
        // The tree runs: the pages it touches come first, the rest in address order.
        let pushed = std::thread::scope(|s| {
            let push = s.spawn(|| {
                if !feeder.wait_allowed() {
                    return Ok(());
                }
                // The pages the last lazy restore faulted on first, then the rest in address
                // order behind the workload; what the tree faults in meanwhile comes through
                // the pager, uncounted.
                if plan.has_prefetch() {
                    let t = Instant::now();
                    let bytes = plan.push_prefetch(&feeder)?;
                    tracing::info!(bytes, seconds = t.elapsed().as_secs_f64(), "working set prefetched");
                }
                ctx.progress.stage("pages", Some(plan.bytes()));
                plan.push(&feeder, paged::threads(), true, &*ctx.progress).map_err(Error::from)
            });
            let done = pager.wait_done(paged::COMPLETE_TIMEOUT);
            (push.join(), done)
        });
        let failed = match pushed {
            (Ok(Ok(())), Ok(_)) => None,
            (Ok(Err(e)), _) => Some(e),
            (_, Err(e)) => Some(Error::Pager(format!("{e} (CRIU's log: {})", log.path().display()))),
            (Err(_), _) => Some(Error::Pager("the push thread panicked".into())),
        };
        if let Some(e) = failed {
            // Its memory cannot be completed: the tree must not go on with pages missing.
            paged::kill_tree(outcome.pid);
            let _ = ferry_sys::wait_child(outcome.pid);
            pager.stop();
            return Err(e);
        }
    }
    // Default: every page went in before the tree ran; the pager ends once CRIU has said the
    // restore is over (it fetches anything the push missed, checked the same way).
    let completed = if req.lazy { Ok(()) } else { pager.wait_done(paged::COMPLETE_TIMEOUT).map(|_| ()) };
    if let Err(e) = completed {
        paged::kill_tree(outcome.pid);
        let _ = ferry_sys::wait_child(outcome.pid);
        pager.stop();
        return Err(Error::Pager(format!("{e} (CRIU's log: {})", log.path().display())));
    }
    let demand = pager.take_demand();
    let stats = pager.stop();
    if req.lazy && req.instance.is_none() && !demand.is_empty() {
        record_working_set(ctx, checkpoint, plan, &demand);
    }
    // Where a lazy restore's first requests waited: faults, and the pager's fetches for them.
    tracing::debug!(
        faults = stats.faults,
        requests = stats.requests,
        pushed = stats.pushed,
        bytes = stats.bytes,
        fetching_s = stats.fetching.as_secs_f64(),
        copying_s = stats.copying.as_secs_f64(),
        "pager done"
    );
    if let Some(g) = guard {
        g.release();
    }
    Ok(RestoreReport {
        pid: outcome.pid,
        container: None,
        verify_seconds,
        seconds,
        complete_seconds: started.elapsed().as_secs_f64(),
        paged_bytes: stats.bytes,
        log: log.path(),
    })
}

/// Records what a lazy restore faulted on, added to what it prefetched, as the checkpoint's
/// working set for its next lazy restore. Only a hint: a failure is logged, not the restore's.
fn record_working_set(
    ctx: &Context,
    checkpoint: &ferry_store::Checkpoint,
    plan: &PagePlan,
    demand: &[(u32, u64, u32)],
) {
    let mut runs = plan.prefetch_runs();
    let mut bytes: u64 = runs.iter().map(|r| u64::from(r.pages) * 4096).sum();
    for &(pid, vaddr, pages) in demand {
        if bytes >= paged::MAX_PREFETCH {
            break;
        }
        bytes += u64::from(pages) * 4096;
        runs.push(ferry_store::working_set::Run { pid, vaddr, pages });
    }
    match ctx.store.record_working_set(checkpoint, &runs) {
        Ok(()) => tracing::debug!(runs = runs.len(), "working set recorded"),
        Err(e) => tracing::warn!(error = %e, "the working set of this restore is not recorded"),
    }
}

/// A container's restore under its runtime, from verified images.
#[derive(Debug, Clone)]
pub struct ContainerRestore<'a> {
    pub record: &'a ContainerRecord,
    /// The verified images, in a private tmpfs that outlives the restore.
    pub images: &'a Path,
    /// Its name under the runtime (default: the recorded one).
    pub name: Option<&'a str>,
    /// The network namespace it joins (default: the recorded one).
    pub netns: Option<&'a Path>,
    /// ferry's directory for this restore: CRIU's configuration and log (and, for a lazy
    /// restore, the socket of ferry's pager).
    pub work_dir: &'a Path,
    pub lazy: bool,
    pub tcp_established: bool,
}

/// Recreates a container under its runtime and restores it; a failure leaves nothing behind.
pub fn restore_container(ctx: &Context, r: &ContainerRestore<'_>) -> Result<Restored, Error> {
    let t0 = Instant::now();
    let name = r.name.unwrap_or(&r.record.name);
    crate::container::record::validate_name("name", name, false)?;
    let rt = crate::container::open(&r.record.kind, &ctx.endpoints)?;
    let workload = format!("{}:{name}", r.record.kind);
    crate::container::preflight(&ctx.endpoints, r.record, name)?;
    std::fs::create_dir_all(r.work_dir)
        .map_err(|e| Error::Container(format!("cannot create {}: {e}", r.work_dir.display())))?;
    let conf = CriuConfig {
        images_dir: r.images.to_path_buf(),
        work_dir: r.work_dir.to_path_buf(),
        lazy_pages: r.lazy,
        tcp_established: r.tcp_established,
    };
    let conf_path = r.work_dir.join("criu.conf");
    conf.write(&conf_path)?;
    let spec = RestoreSpec {
        record: r.record,
        name,
        images: r.images,
        criu_config: &conf_path,
        log: &conf.log_path(),
        scratch: r.work_dir,
        netns: r.netns,
    };
    let t_checked = t0.elapsed();
    tracing::info!(%workload, "restoring a container");
    let restored = rt.restore(&spec).inspect_err(|e| {
        tracing::warn!(%workload, error = %e, "the restore failed: removing what it created");
        rt.discard(name);
    });
    // The spec keeps naming the file for the container's whole life, and runc hands it to every
    // later CRIU run (a `runc checkpoint`, a runtime's own checkpoint): gone, CRIU reads it as
    // empty, instead of pointing such a run at this restore's images.
    let _ = std::fs::remove_file(&conf_path);
    // Where a container's restore spends its time: ferry's checks, the runtime's restore, and
    // within it CRIU's (its log's last timestamp).
    tracing::info!(
        %workload,
        checks_s = t_checked.as_secs_f64(),
        runtime_s = (t0.elapsed() - t_checked).as_secs_f64(),
        criu_s = criu_log_seconds(&conf.log_path()).unwrap_or(-1.0),
        "container restore steps"
    );
    restored
}

/// The last timestamp of a CRIU log (`(SS.UUUUUU)` at the start of its lines): how long CRIU ran.
fn criu_log_seconds(log: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().rev().find_map(|l| l.strip_prefix('(')?.split_once(')')?.0.trim().parse().ok())
}

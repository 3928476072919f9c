//! `checkpoint`: dump a workload's process tree into the store.
//!
//! CRIU writes its images into a private tmpfs; the store's pipeline seals them into chunks on
//! the other core while CRIU is still writing. The plaintext tmpfs is gone when this returns.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ferry_criu::{DumpOptions, LogTarget, Notify, NotifyHandler, SharedOptions};
use ferry_store::pipeline::Pipeline;
use ferry_store::{CheckpointInfo, Committed, IngestStats, Pending};

use crate::container::record::{DELETED_FILES_FILE, DESCRIPTORS_FILE, ROOTFS_DIFF_FILE};
use crate::container::{Container, ContainerRuntime};
use crate::workload::{runtime_for, WorkloadId};
use crate::{host_facts, netlock, Context, Error};

/// What to checkpoint and how.
#[derive(Debug, Clone)]
pub struct CheckpointRequest {
    pub workload: WorkloadId,
    /// Defaults to `KIND-ID-UNIXTIME`.
    pub name: Option<String>,
    pub leave_running: bool,
    pub tcp_established: bool,
    /// Keep at most this many checkpoints of the same workload (oldest removed first).
    pub keep: Option<usize>,
    /// External resources declared to CRIU (`--external`), e.g. the workload's network
    /// namespace when another node will provide one.
    pub external: Vec<String>,
    /// Leave anonymous memory in the frozen tree, to be served lazily by the caller, from the
    /// tree's memory; CRIU's own page server will listen on this port after the post-dump
    /// notification and is only to be closed (with ferry's CRIU patch it holds no pages).
    pub lazy_pages: Option<u16>,
    /// How much CRIU logs (default: everything, `Debug`). At `Debug` CRIU writes a line per
    /// page-pipe entry, about 0.1 s per 4 GiB: a migration, which dumps while the workload is
    /// frozen, asks for `Info`.
    pub log_level: Option<ferry_criu::LogLevel>,
    /// Packs written without syncing their bytes to disk ([`ferry_store::Pending::volatile`]):
    /// for a migration's checkpoint, which no recovery reads from disk (a failure returns to
    /// the frozen tree) and which is removed when the migration ends.
    pub volatile: bool,
}

/// What a caller does while CRIU waits at post-dump (the tree frozen, its images written):
/// an error makes CRIU resume the tree, and the checkpoint fails. Both run only for
/// checkpoints that stop the tree.
pub trait PostDump {
    /// Before the images are committed into the store (they are in `images`).
    fn before_commit(&mut self, _images: &Path) -> Result<(), String> {
        Ok(())
    }

    /// After the checkpoint is committed; the tree is killed once this returns Ok.
    fn after_commit(&mut self, _committed: &Committed) -> Result<(), String> {
        Ok(())
    }

    /// After `after_commit` returned Ok and a container's runtime was told it stops, just
    /// before CRIU is answered and kills the tree: a caller that also holds the tree (a
    /// migration's freezer cgroup, in which CRIU's kill would wait forever) kills it here.
    fn before_kill(&mut self) {}

    /// Any other notification of CRIU's (e.g. `status-ready` of a lazy dump's page server).
    fn notify(&mut self, _event: &Notify, _pid: Option<i32>) -> Result<(), String> {
        Ok(())
    }

    /// Where a copy of the new sealed frames goes while CRIU dumps (asked once, before CRIU
    /// starts; a migration streams them to its target).
    fn tap(&mut self) -> Option<ferry_store::pipeline::Tap> {
        None
    }
}

/// Nothing to do at post-dump.
#[derive(Debug, Default)]
pub struct NoPostDump;

impl PostDump for NoPostDump {}

#[derive(Debug, Clone)]
pub struct CheckpointReport {
    pub name: String,
    pub pid: i32,
    /// Size of the images CRIU wrote.
    pub logical_bytes: u64,
    pub stats: IngestStats,
    pub dump_seconds: f64,
    /// With `leave_running`: how long the tree stayed frozen (CRIU's dump and ferry's copy of
    /// its pages), when ferry knows it.
    pub frozen_seconds: Option<f64>,
    pub seconds: f64,
    pub log: PathBuf,
    /// Older checkpoints removed by `keep`.
    pub pruned: Vec<String>,
    /// The packs its new chunks went to.
    pub packs: Vec<[u8; 16]>,
}

pub fn checkpoint(ctx: &Context, req: &CheckpointRequest) -> Result<CheckpointReport, Error> {
    checkpoint_with(ctx, req, &mut NoPostDump)
}

/// [`checkpoint`], with `hook` run while CRIU waits at post-dump.
pub fn checkpoint_with(
    ctx: &Context,
    req: &CheckpointRequest,
    hook: &mut dyn PostDump,
) -> Result<CheckpointReport, Error> {
    let subject = Subject::resolve(ctx, &req.workload)?;
    let created = unix_now();
    let name = req
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-{created}", req.workload.to_string().replace([':', '/'], "-")));
    let pending = ctx.store.begin(&name)?;
    let pending = if req.volatile { pending.volatile() } else { pending };
    let mut log = LogTarget::new(ctx.store.logs_dir(), format!("checkpoint-{name}-{created}.log"));
    if let Some(level) = req.log_level {
        log.level = level;
    }
    ctx.criu.cpuinfo_dump(&pending.images_dir(), &log)?;
    let pid = subject.pid();
    // A process tree's pages skip the images: ferry reads them from the frozen tree at
    // post-dump (`paged_dump`), through a lazy dump whose page server it closes at once.
    let paged_port = match (&subject, req.lazy_pages, pages_through_images()) {
        (Subject::Process(_), None, false) => {
            Some(ferry_lazy::pick_port().map_err(|e| Error::Internal(e.to_string()))?)
        }
        _ => None,
    };
    let lazy_port = req.lazy_pages.or(paged_port);
    let mut opts = DumpOptions::new(pid, pending.images_dir(), log.clone())
        .leave_running(req.leave_running)
        .lazy_pages(lazy_port)
        // Whoever asks for lazy pages serves them from the frozen tree (ferry-migrate does,
        // and so does a paged checkpoint), never through CRIU's page server.
        .lazy_pages_undrained(lazy_port.is_some())
        .tcp_established(req.tcp_established);
    opts = req.external.iter().fold(opts, |o, e| o.external(e.clone()));
    let spec = match &subject {
        Subject::Process(pid) => serde_json::json!({ "kind": "pid", "pid": pid }).to_string(),
        Subject::Container(_, c) => {
            opts = c.plan.external.iter().fold(opts, |o, e| o.external(e.clone()));
            opts = opts.container(Some(c.plan.dump.clone()));
            write_container_files(c, &pending.images_dir())?;
            container_summary(c)
        }
    };

    let was_stopped = is_stopped(pid);
    tracing::info!(pid, %name, workload = %req.workload, "checkpointing");
    let started = Instant::now();
    // Until post-dump CRIU works alone: how far it is, only its log says.
    ctx.progress.stage("dump", None);
    let pipeline =
        pending.start_ingest_with(&ctx.store, hook.tap(), paged_port.is_none(), ctx.progress.clone())?;
    subject.hold()?;
    let mut commit = CommitAtPostDump {
        ctx,
        started,
        leave_running: req.leave_running,
        info: CheckpointInfo {
            source: req.workload.to_string(),
            host: host_facts(&ctx.criu_version.to_string()),
            spec,
            tcp_established: req.tcp_established,
            leave_running: req.leave_running,
            ..Default::default()
        },
        subject: &subject,
        diff_written: false,
        work: Some((pending, pipeline)),
        outcome: None,
        hook,
        paged: paged_port.map(|_| pid),
        copy: None,
        frozen: None,
    };
    let (dumped, commit) = match paged_port {
        Some(port) => {
            let mut finisher = ferry_lazy::PageServerFinisher::new(port, commit);
            let dumped = ctx.criu.dump(&opts, &mut finisher);
            // CRIU's page server should have served ferry's session; had another client got
            // in first, it found no pages there (they are left out of CRIU's pipes).
            if dumped.is_ok() {
                if let Err(e) = finisher.finish() {
                    tracing::warn!(error = %e, "CRIU's page server was not closed by ferry's own session");
                }
            }
            (dumped, finisher.into_inner())
        }
        None => {
            let dumped = ctx.criu.dump(&opts, &mut commit);
            (dumped, commit)
        }
    };
    let frozen_seconds = commit.frozen;
    let outcome = commit.finish(dumped);
    if outcome.is_err() {
        resume_if_left_stopped(pid, was_stopped);
        subject.release();
    }
    let (committed, dump_seconds) = outcome?;
    if req.leave_running {
        // The container runs on: its runtime takes care of it again.
        subject.release();
    } else {
        // The container's processes are gone: its runtime forgets it (the checkpoint is it now).
        subject.remove();
    }
    let seconds = started.elapsed().as_secs_f64();
    let pruned = match req.keep {
        Some(keep) => prune(ctx, &req.workload.to_string(), keep)?,
        None => Vec::new(),
    };
    Ok(CheckpointReport {
        name,
        pid,
        logical_bytes: committed.checkpoint.logical_size(),
        stats: committed.stats,
        dump_seconds,
        frozen_seconds,
        seconds,
        log: log.path(),
        pruned,
        packs: committed.packs,
    })
}

/// What is dumped: a plain process tree, or a container of a runtime.
enum Subject {
    Process(i32),
    Container(Box<dyn ContainerRuntime>, Box<Container>),
}

impl Subject {
    fn resolve(ctx: &Context, workload: &WorkloadId) -> Result<Subject, Error> {
        match workload {
            WorkloadId::Pid(_) => Ok(Subject::Process(runtime_for(workload)?.resolve(workload)?.pid)),
            WorkloadId::Container { kind, id } => {
                let rt = crate::container::open(kind, &ctx.endpoints)?;
                let c = rt.inspect(id)?;
                Ok(Subject::Container(rt, Box::new(c)))
            }
        }
    }

    fn pid(&self) -> i32 {
        match self {
            Subject::Process(pid) => *pid,
            Subject::Container(_, c) => c.plan.init_pid,
        }
    }

    fn container(&self) -> Option<&Container> {
        match self {
            Subject::Process(_) => None,
            Subject::Container(_, c) => Some(c),
        }
    }

    /// The tree is stored and about to be killed by CRIU.
    fn stopping(&self) -> Result<(), Error> {
        match self {
            Subject::Process(_) => Ok(()),
            Subject::Container(rt, c) => rt.stopping(c),
        }
    }

    fn hold(&self) -> Result<(), Error> {
        match self {
            Subject::Process(_) => Ok(()),
            Subject::Container(rt, c) => rt.hold(c),
        }
    }

    fn release(&self) {
        if let Subject::Container(rt, c) = self {
            if let Err(e) = rt.release(c) {
                tracing::warn!(error = %e, "could not give the container back to its runtime's care");
            }
        }
    }

    fn remove(&self) {
        if let Subject::Container(rt, c) = self {
            if let Err(e) = rt.remove(&c.record) {
                tracing::warn!(error = %e, container = %c.record.workload(), "the checkpoint is stored, but the stopped container is still listed by its runtime");
            }
        }
    }
}

/// The record and runc's descriptors, written before CRIU runs.
fn write_container_files(c: &Container, images: &Path) -> Result<(), Error> {
    c.record.write_to(images)?;
    let descriptors = serde_json::to_vec(&c.plan.descriptors).map_err(|e| Error::Internal(e.to_string()))?;
    let path = images.join(DESCRIPTORS_FILE);
    std::fs::write(&path, descriptors)
        .map_err(|e| Error::Container(format!("cannot write {}: {e}", path.display())))
}

/// The root filesystem's changes, taken while the tree is frozen (files it holds open must
/// match what CRIU recorded).
fn write_rootfs_diff(c: &Container, images: &Path) -> Result<(), Error> {
    let Some(overlay) = &c.plan.overlay else { return Ok(()) };
    let t = Instant::now();
    let stats = crate::container::rootfs::write_diff(
        &overlay.upper,
        &overlay.lower,
        &c.plan.mount_points,
        &images.join(ROOTFS_DIFF_FILE),
        &images.join(DELETED_FILES_FILE),
    )?;
    tracing::info!(
        entries = stats.entries,
        bytes = stats.bytes,
        deleted = stats.deleted,
        seconds = t.elapsed().as_secs_f64(),
        "root filesystem changes"
    );
    Ok(())
}

/// What the manifest's `spec` says of a container (`ferry list` and `inspect` show it).
fn container_summary(c: &Container) -> String {
    let r = &c.record;
    serde_json::json!({
        "kind": r.kind,
        "id": r.id,
        "name": r.name,
        "image": r.image,
        "pid": c.plan.init_pid,
        "ip": r.network.as_ref().and_then(|n| n.ip),
    })
    .to_string()
}

/// Commits the checkpoint when CRIU reports the dump done, before CRIU kills the tree: if the
/// commit fails (or ferry dies), CRIU gets no success answer and resumes the tree instead, so a
/// workload is never lost to a checkpoint that was not stored.
struct CommitAtPostDump<'a> {
    ctx: &'a Context,
    started: Instant,
    leave_running: bool,
    info: CheckpointInfo,
    subject: &'a Subject,
    diff_written: bool,
    work: Option<(Pending, Pipeline)>,
    outcome: Option<Result<(Committed, f64), Error>>,
    hook: &'a mut dyn PostDump,
    /// A paged checkpoint: the host pid of the root whose pages ferry reads at post-dump.
    paged: Option<i32>,
    /// A paged `--leave-running` checkpoint: the pages copied while the tree was frozen.
    copy: Option<crate::paged_dump::MemoryCopy>,
    /// A paged `--leave-running` checkpoint: from the start until the tree was let run.
    frozen: Option<f64>,
}

impl CommitAtPostDump<'_> {
    /// A container's root filesystem changes, once (at post-dump, while the tree is frozen).
    fn write_rootfs_diff(&mut self) -> Result<(), Error> {
        if std::mem::replace(&mut self.diff_written, true) {
            return Ok(());
        }
        match (self.subject.container(), &self.work) {
            (Some(c), Some((pending, _))) => write_rootfs_diff(c, &pending.images_dir()),
            _ => Ok(()),
        }
    }

    fn commit(&mut self) -> Result<(Committed, f64), Error> {
        // Only if CRIU sent no post-dump: the tree runs again by now.
        self.write_rootfs_diff()?;
        let (pending, pipeline) =
            self.work.take().ok_or_else(|| Error::Internal("the checkpoint was committed twice".into()))?;
        let dump_seconds = self.started.elapsed().as_secs_f64();
        if let Some(copy) = self.copy.take() {
            crate::paged_dump::feed_copy(copy, &pipeline, &*self.ctx.progress)?;
        } else if let Some(root) = self.paged {
            let t = Instant::now();
            let bytes = crate::paged_dump::feed_from_frozen(
                &pending.images_dir(),
                root,
                &pipeline,
                &*self.ctx.progress,
            )?;
            tracing::info!(bytes, seconds = t.elapsed().as_secs_f64(), "pages read from the frozen tree");
        }
        if !self.leave_running {
            self.hook.before_commit(&pending.images_dir()).map_err(Error::PostDump)?;
        }
        let mut info = std::mem::take(&mut self.info);
        info.dump_seconds = dump_seconds;
        // A dump that stops the tree leaves CRIU's lock table in place until the restore (empty
        // without --tcp-established): record it so `ferry rm` can release it if that never comes.
        if !self.leave_running {
            info.network_lock_tables = netlock::tables_of_dump(&pending.images_dir());
        }
        self.ctx.progress.stage("commit", None);
        Ok((pending.commit(&self.ctx.store, info, pipeline)?, dump_seconds))
    }

    /// The checkpoint's outcome, given how CRIU's dump ended.
    fn finish(
        mut self,
        dumped: Result<ferry_criu::DumpOutcome, ferry_criu::CriuError>,
    ) -> Result<(Committed, f64), Error> {
        match (self.outcome.take(), dumped) {
            // Our own failure explains CRIU's ("post dump script failed") better.
            (Some(Err(e)), _) => Err(e),
            (_, Err(e)) => Err(e.into()),
            (Some(Ok(done)), Ok(_)) => Ok(done),
            // CRIU never sent post-dump (leave-running, or an older CRIU): commit now.
            (None, Ok(_)) => self.commit(),
        }
    }
}

impl NotifyHandler for CommitAtPostDump<'_> {
    fn notify(&mut self, event: &Notify, pid: Option<i32>) -> Result<(), String> {
        if *event != Notify::PostDump {
            return self.hook.notify(event, pid);
        }
        if let Err(e) = self.write_rootfs_diff() {
            let answer = e.to_string();
            self.outcome = Some(Err(e));
            return Err(answer);
        }
        // With --leave-running the tree runs on whatever happens: do not hold it frozen (a
        // paged checkpoint's pages are copied first; the copy is sealed once it runs again).
        if self.leave_running {
            if let (Some(root), Some((pending, _))) = (self.paged, &self.work) {
                match crate::paged_dump::copy_from_frozen(&pending.images_dir(), root, &*self.ctx.progress) {
                    Ok(copy) => self.copy = Some(copy),
                    Err(e) => {
                        let answer = e.to_string();
                        self.outcome = Some(Err(e));
                        return Err(answer);
                    }
                }
                self.frozen = Some(self.started.elapsed().as_secs_f64());
            }
            return Ok(());
        }
        let result = self.commit().and_then(|(committed, secs)| {
            self.hook.after_commit(&committed).map_err(Error::PostDump)?;
            // The runtime learns the container stops by ferry's doing (no restart), just before
            // CRIU kills it. Too late to fail: the checkpoint (or the target's copy) is the one.
            if let Err(e) = self.subject.stopping() {
                tracing::warn!(error = %e, "the container's runtime was not told it stops");
            }
            self.hook.before_kill();
            Ok((committed, secs))
        });
        let answer = result.as_ref().map(drop).map_err(|e| e.to_string());
        self.outcome = Some(result);
        answer
    }
}

/// Removes the oldest checkpoints of `source` beyond the newest `keep`.
fn prune(ctx: &Context, source: &str, keep: usize) -> Result<Vec<String>, Error> {
    let (all, _) = ctx.store.list()?;
    let mine: Vec<_> = all.iter().filter(|c| c.manifest.source == source).collect();
    let excess = mine.len().saturating_sub(keep.max(1));
    let mut pruned = Vec::new();
    for c in mine.into_iter().take(excess) {
        crate::remove(&ctx.store, c.name(), false)?;
        pruned.push(c.name().to_owned());
    }
    Ok(pruned)
}

fn is_stopped(pid: i32) -> bool {
    matches!(ferry_sys::process_state(pid), Some('T') | Some('t'))
}

/// CRIU resumes the tree when a dump fails; should it not (a crash), the tree must not stay
/// frozen because of us.
fn resume_if_left_stopped(pid: i32, was_stopped: bool) {
    if !was_stopped && is_stopped(pid) {
        tracing::warn!(pid, "the dump failed and left the process stopped: resuming it");
        let _ = ferry_sys::kill(pid, ferry_sys::Signal::Cont);
    }
}

/// `FERRY_PAGE_IMAGES=1`: a process tree's checkpoint has CRIU write its pages into image
/// files, as before paged checkpoints (for comparison, and as a way around a workload whose
/// lazy dump fails).
fn pages_through_images() -> bool {
    std::env::var_os("FERRY_PAGE_IMAGES").is_some_and(|v| v == "1")
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

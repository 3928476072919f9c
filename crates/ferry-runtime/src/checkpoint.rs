//! `checkpoint`: dump a workload's process tree into the store.

use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ferry_criu::{DumpOptions, LogTarget, RecordingNotify};
use ferry_store::{CheckpointMeta, FORMAT_VERSION};

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
}

#[derive(Debug, Clone)]
pub struct CheckpointReport {
    pub name: String,
    pub pid: i32,
    pub size_bytes: u64,
    pub seconds: f64,
    pub log: PathBuf,
}

pub fn checkpoint(ctx: &Context, req: &CheckpointRequest) -> Result<CheckpointReport, Error> {
    let root = runtime_for(&req.workload)?.resolve(&req.workload)?;
    let created = unix_now();
    let name = req
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-{created}", req.workload.to_string().replace(':', "-")));
    let pending = ctx.store.begin(&name)?;
    let log = LogTarget::new(ctx.store.logs_dir(), format!("checkpoint-{name}-{created}.log"));
    let opts = DumpOptions::new(root.pid, pending.images_dir(), log.clone())
        .leave_running(req.leave_running)
        .tcp_established(req.tcp_established);

    let was_stopped = is_stopped(root.pid);
    tracing::info!(pid = root.pid, %name, "checkpointing");
    let started = Instant::now();
    // Hashing follows CRIU's writes on the other core.
    let ingest = pending.start_ingest();
    let dumped = ctx.criu.dump(&opts, &mut RecordingNotify::default());
    let dump_seconds = started.elapsed().as_secs_f64();
    if let Err(e) = dumped {
        // `ingest` and `pending` are dropped here: the partial images go with them.
        resume_if_left_stopped(root.pid, was_stopped);
        return Err(e.into());
    }

    // A dump that stops the tree leaves CRIU's lock table in place until the restore (empty
    // without --tcp-established): record it so `ferry rm` can release it if that never comes.
    let network_lock_tables = if req.leave_running {
        Vec::new()
    } else {
        netlock::tables_of_dump(&pending.images_dir())
    };
    let meta = CheckpointMeta {
        format: FORMAT_VERSION,
        name: name.clone(),
        source: req.workload.to_string(),
        pid: root.pid,
        created,
        host: host_facts(&ctx.criu_version.to_string()),
        tcp_established: req.tcp_established,
        leave_running: req.leave_running,
        network_lock_tables,
        dump_seconds,
        files: Vec::new(),
    };
    let committed = pending.commit(meta, ingest)?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(CheckpointReport {
        name,
        pid: root.pid,
        size_bytes: committed.meta.size_bytes(),
        seconds,
        log: log.path(),
    })
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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

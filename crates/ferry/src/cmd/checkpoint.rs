use crate::output::outln;
use ferry_runtime::{CheckpointRequest, WorkloadId};

use super::{context, human_bytes};
use crate::cli::Cli;
use crate::progress::Bar;
use crate::Outcome;

pub struct Args {
    pub workload: String,
    pub name: Option<String>,
    pub leave_running: bool,
    pub tcp_established: bool,
    pub keep: Option<usize>,
    pub force: bool,
}

pub fn run(cli: &Cli, a: Args) -> Outcome {
    let what = || format!("checkpoint of {} failed", a.workload);
    let workload: WorkloadId = a.workload.parse().map_err(|e| (what(), e))?;
    let bar = Bar::new("checkpoint");
    let ctx = context(cli).map_err(|e| (what(), e))?.with_progress(bar.clone());
    if !a.force {
        // Before anything is frozen: a blocker is refused with its reasons (exit 11).
        super::check::refuse_not_ready(cli, &a.workload, Some(a.tcp_established), None)
            .map_err(|e| (what(), e))?;
    }
    let req = CheckpointRequest {
        workload: workload.clone(),
        name: a.name,
        leave_running: a.leave_running,
        tcp_established: a.tcp_established,
        keep: a.keep,
        external: Vec::new(),
        lazy_pages: None,
        log_level: None,
        volatile: false,
    };
    let r = ferry_runtime::checkpoint(&ctx, &req).map_err(|e| (what(), e))?;
    bar.finish();
    let state = match (a.leave_running, r.frozen_seconds) {
        (true, Some(f)) => format!("frozen for {f:.2}s, left running"),
        (true, None) => "left running".to_owned(),
        (false, _) => "stopped".to_owned(),
    };
    outln!(
        "checkpointed {workload} as {} in {:.2}s (dump {:.2}s, workload {state})",
        r.name,
        r.seconds,
        r.dump_seconds
    );
    let s = r.stats;
    outln!(
        "  {} of images: {} zero pages, {} already stored, {} new in {} chunks ({} on disk)",
        human_bytes(r.logical_bytes),
        human_bytes(s.zero_bytes),
        human_bytes(s.dedup_bytes),
        human_bytes(s.logical_bytes.saturating_sub(s.zero_bytes + s.dedup_bytes)),
        s.new_chunks,
        human_bytes(s.stored_bytes)
    );
    for old in &r.pruned {
        outln!("  removed older checkpoint {old} (--keep)");
    }
    crate::ok()
}

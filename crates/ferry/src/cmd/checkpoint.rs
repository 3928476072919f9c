use ferry_runtime::{CheckpointRequest, WorkloadId};

use super::{context, human_bytes};
use crate::cli::Cli;
use crate::Outcome;

pub fn run(
    cli: &Cli,
    workload: &str,
    name: Option<String>,
    leave_running: bool,
    tcp_established: bool,
) -> Outcome {
    let what = || format!("checkpoint of {workload} failed");
    let workload: WorkloadId = workload.parse().map_err(|e| (what(), e))?;
    let ctx = context(cli).map_err(|e| (what(), e))?;
    let req = CheckpointRequest {
        workload: workload.clone(),
        name,
        leave_running,
        tcp_established,
    };
    let report = ferry_runtime::checkpoint(&ctx, &req).map_err(|e| (what(), e))?;
    let state = if leave_running { "left running" } else { "stopped" };
    println!(
        "checkpointed {workload} as {} ({}, {:.2}s, workload {state})",
        report.name,
        human_bytes(report.size_bytes),
        report.seconds
    );
    crate::ok()
}

//! `ferry check`: will a workload survive a checkpoint? Also the gate `checkpoint` and
//! `migrate` pass before anything is frozen.

use ferry_criu::Criu;
use ferry_migrate::api::{Event, Request};
use ferry_runtime::check::{self, target, CheckEnv, CheckOptions, Report, Severity};
use ferry_runtime::container::Endpoints;
use ferry_runtime::{Error, WorkloadId};

use crate::cli::Cli;
use crate::exit::Exit;
use crate::Outcome;

pub(crate) fn report(cli: &Cli, workload: &WorkloadId, opts: CheckOptions) -> Result<Report, Error> {
    let criu = Criu::locate(cli.criu.as_deref()).map_err(|e| e.to_string());
    let endpoints = Endpoints::new(&cli.store).with(&cli.runtime_endpoints)?;
    let env = CheckEnv { criu: criu.as_ref().map_err(String::as_str), endpoints: &endpoints };
    Ok(check::check(workload, env, opts))
}

pub fn run(
    cli: &Cli,
    workload: &str,
    tcp_established: Option<bool>,
    to: Option<&str>,
    json: bool,
) -> Outcome {
    let what = || format!("check of {workload} failed");
    let id: WorkloadId = workload.parse().map_err(|e| (what(), e))?;
    let opts = CheckOptions { tcp_established, tree_needs: to.is_some() };
    let mut r = report(cli, &id, opts).map_err(|e| (what(), e))?;
    if let (Some(node), Some(pid)) = (to, r.pid) {
        r = with_target(cli, r, node, pid);
    }
    let text = if json {
        let mut t = serde_json::to_string_pretty(&r).map_err(|e| (what(), Error::Internal(e.to_string())))?;
        t.push('\n');
        t
    } else {
        render(&r)
    };
    // A reader that went away (`| head`) is no error of ours: the exit code still tells.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
    // A workload not found is the usual "not found"; one found with a blocker, "not ready".
    let code = match (r.pid, r.verdict) {
        (None, _) => Exit::NotFound,
        (_, check::Verdict::NotReady) => Exit::NotReady,
        _ => Exit::Ok,
    };
    Ok(code.into())
}

/// `report` with what target `node` says of itself (asked through this host's agent, or
/// `--node`'s), set against this host and the tree at `pid`.
fn with_target(cli: &Cli, r: Report, node: &str, pid: i32) -> Report {
    let started = std::time::Instant::now();
    let extra = target_reasons(cli, &r, node, pid).unwrap_or_else(|why| {
        vec![check::Reason {
            code: "target-agent",
            severity: Severity::Blocker,
            what: format!("cannot ask {node} about itself: {why}"),
            why: "a migration goes through the agents of both nodes".into(),
            fix: "start ferryd on both nodes (`ferry lab up` starts them in a lab) and check that they trust each other"
                .into(),
            pids: Vec::new(),
        }]
    });
    add_reasons(r, extra, started.elapsed().as_secs_f64())
}

fn add_reasons(r: Report, extra: Vec<check::Reason>, seconds: f64) -> Report {
    let seconds = r.seconds + seconds;
    let mut reasons = r.reasons;
    reasons.extend(extra);
    let mut out = Report::new(r.workload, r.pid, r.processes, reasons);
    out.seconds = seconds;
    out.container_record = r.container_record;
    out.tree_needs = r.tree_needs;
    out
}

/// What target `node`'s agent answers, as reasons for the tree at `pid`; `Err`: the agents
/// could not be asked.
fn target_reasons(cli: &Cli, r: &Report, node: &str, pid: i32) -> Result<Vec<check::Reason>, String> {
    let criu = Criu::locate(cli.criu.as_deref()).ok();
    // Without this host's cpuinfo.img the target compares CPU flags instead.
    let cpuinfo = criu.as_ref().and_then(|c| target::source_cpuinfo(c).ok());
    let memory = tree_rss(pid);
    let socket = super::migrate::agent_socket(cli).map_err(|e| e.to_string())?;
    let container = r.container_record.as_ref().and_then(|rec| serde_json::to_vec(rec).ok());
    let req = Request::TargetFacts { node: node.to_owned(), cpuinfo, container, tree: r.tree_needs.clone() };
    let facts = match ferry_migrate::client::call(&socket, &req, &mut |_| {}) {
        Ok(Event::TargetFacts(f)) => f,
        Ok(Event::Failed { message, .. }) => return Err(message),
        Ok(other) => return Err(format!("unexpected answer {other:?}")),
        Err(e) => return Err(format!("{e} (socket {})", socket.display())),
    };
    Ok(target::target_reasons(&target::SourceFacts::here(criu.as_ref(), memory), &facts))
}

/// Resident memory of the tree at `root`, in bytes.
fn tree_rss(root: i32) -> u64 {
    ferry_sys::process_tree(root)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum::<u64>()
        * 1024
}

fn render(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "{}: {} (score {}/100)", r.workload, r.verdict.as_str(), r.score);
    if let Some(pid) = r.pid {
        let _ =
            writeln!(out, "  tree: root pid {pid}, {} processes; checked in {:.3}s", r.processes, r.seconds);
    }
    for reason in &r.reasons {
        let tag = match reason.severity {
            Severity::Blocker => "BLOCKER",
            Severity::Caveat => "caveat",
            Severity::Info => "info",
        };
        let _ = writeln!(out, "\n{tag:<8} {}: {}", reason.code, reason.what);
        if reason.severity != Severity::Info || !reason.fix.is_empty() {
            let _ = writeln!(out, "         why: {}", reason.why);
        }
        if !reason.fix.is_empty() {
            let _ = writeln!(out, "         fix: {}", reason.fix);
        }
    }
    out
}

/// Runs the check before a checkpoint (`tcp_established`: whether it passes the flag) or a
/// migration to `to` (`tcp_established` `None`: it always moves connections; the target's
/// agent is asked as by `--to`): a blocker is an error naming the reasons.
/// A migration's container is left to its agent, whose runtime endpoints this CLI may not know.
pub fn refuse_not_ready(
    cli: &Cli,
    workload: &str,
    tcp_established: Option<bool>,
    to: Option<&str>,
) -> Result<(), Error> {
    let id: WorkloadId = workload.parse()?;
    if tcp_established.is_none() && !matches!(id, WorkloadId::Pid(_)) {
        return Ok(());
    }
    let opts =
        CheckOptions { tcp_established: Some(tcp_established.unwrap_or(true)), tree_needs: to.is_some() };
    let mut r = report(cli, &id, opts)?;
    if let (Some(node), Some(pid)) = (to, r.pid) {
        // An agent that cannot be asked is the migration's own error to report, not a reason.
        if let Ok(extra) = target_reasons(cli, &r, node, pid) {
            r = add_reasons(r, extra, 0.0);
        }
    }
    if r.verdict != check::Verdict::NotReady {
        return Ok(());
    }
    // A workload that cannot be found keeps the verb's own error (and exit code).
    if r.pid.is_none() {
        return Ok(());
    }
    let reasons = r.blockers().map(|b| format!("{}: {}", b.code, b.what)).collect();
    Err(Error::NotReady { workload: r.workload, reasons })
}

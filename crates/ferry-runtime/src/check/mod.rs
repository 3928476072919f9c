//! `check`: will this workload survive a checkpoint? Read from `/proc`, the kernel's sock_diag
//! interface and the container runtime only: nothing is frozen, traced or signalled.
//!
//! [`gather`] reads the facts of the workload's tree (its root and every descendant),
//! [`rules::evaluate`] turns facts into reasons, each with what it is, why it matters and the fix,
//! and [`Report::new`] scores them. `docs/check.md` lists every reason and the score's formula.

mod gather;
pub mod parse;
pub mod rules;
pub mod target;
pub mod unix_diag;

use std::time::Instant;

use ferry_criu::Criu;
use serde::Serialize;

pub use gather::{lock_holders, Facts, FdFacts, PathState, TaskFacts};

use crate::container::Endpoints;
use crate::WorkloadId;

/// How bad a reason is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing; no effect on the verdict.
    Info,
    /// The checkpoint works, with a limit or a risk worth knowing.
    Caveat,
    /// The checkpoint or the restore fails.
    Blocker,
}

/// The answer to "will it survive a checkpoint?".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Ready,
    ReadyWithCaveats,
    NotReady,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ready => "ready",
            Verdict::ReadyWithCaveats => "ready with caveats",
            Verdict::NotReady => "not ready",
        }
    }
}

/// One reason: what was found (with the tasks and descriptors concerned), why it matters to a
/// checkpoint, and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reason {
    /// Stable name of the reason (`docs/check.md` has one section per code).
    pub code: &'static str,
    pub severity: Severity,
    pub what: String,
    pub why: String,
    pub fix: String,
    /// Host PIDs of the tasks concerned (at most [`MAX_TASKS_NAMED`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pids: Vec<i32>,
}

/// How many tasks or descriptors a reason names before it says "and N more".
pub const MAX_TASKS_NAMED: usize = 8;

/// What the caller will do, when it matters to the verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckOptions {
    /// Whether the checkpoint will pass `--tcp-established`: `None` when unknown (`ferry
    /// check` without the flag): established connections are then a caveat, not a blocker.
    pub tcp_established: Option<bool>,
    /// Gather what a target must have for the tree (its paths and listening ports, for
    /// [`Report::tree_needs`]): only when a target will be asked (`--to`, a migration). It
    /// stats every path the tree holds, which a check without a target has no use for.
    pub tree_needs: bool,
}

/// The verdict, its score and every reason, worst first.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub workload: String,
    /// Host PID of the tree's root, when the workload was found.
    pub pid: Option<i32>,
    /// Processes in the tree.
    pub processes: usize,
    pub verdict: Verdict,
    pub score: u8,
    pub reasons: Vec<Reason>,
    /// How long the check took.
    pub seconds: f64,
    /// A container's record as its runtime gives it (what a target's runtime is asked about).
    #[serde(skip)]
    pub container_record: Option<Box<crate::container::ContainerRecord>>,
    /// A process tree's paths and listeners, for a target to check (`--to`).
    #[serde(skip)]
    pub tree_needs: Option<target::TreeNeeds>,
}

impl Report {
    /// Scores `reasons` (see `docs/check.md`): each code counts once, whatever the number of
    /// tasks or descriptors it names.
    pub fn new(workload: String, pid: Option<i32>, processes: usize, mut reasons: Vec<Reason>) -> Report {
        reasons.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.code.cmp(b.code)));
        let (verdict, score) = score(&reasons);
        Report {
            workload,
            pid,
            processes,
            verdict,
            score,
            reasons,
            seconds: 0.0,
            container_record: None,
            tree_needs: None,
        }
    }

    pub fn blockers(&self) -> impl Iterator<Item = &Reason> {
        self.reasons.iter().filter(|r| r.severity == Severity::Blocker)
    }
}

/// The verdict and score of a set of reasons:
/// - ready: 100;
/// - ready with caveats: 90 for one caveat, 10 less for each further one, at least 50;
/// - not ready: 40 for one blocker, 10 less for each further one and 5 less for each caveat,
///   at least 0.
pub fn score(reasons: &[Reason]) -> (Verdict, u8) {
    let codes = |s: Severity| {
        let mut c: Vec<&str> = reasons.iter().filter(|r| r.severity == s).map(|r| r.code).collect();
        c.sort_unstable();
        c.dedup();
        c.len() as i64
    };
    let (blockers, caveats) = (codes(Severity::Blocker), codes(Severity::Caveat));
    if blockers > 0 {
        (Verdict::NotReady, (40 - 10 * (blockers - 1) - 5 * caveats).clamp(0, 40) as u8)
    } else if caveats > 0 {
        (Verdict::ReadyWithCaveats, (90 - 10 * (caveats - 1)).clamp(50, 90) as u8)
    } else {
        (Verdict::Ready, 100)
    }
}

/// Where the check looks beyond `/proc`.
#[derive(Debug, Clone, Copy)]
pub struct CheckEnv<'a> {
    /// The CRIU ferry would use, or why there is none.
    pub criu: Result<&'a Criu, &'a str>,
    pub endpoints: &'a Endpoints,
}

/// Checks `workload`: resolves it (a container through its runtime), reads its tree's facts
/// and scores the reasons. Never fails: what cannot be found or read is itself a reason.
pub fn check(workload: &WorkloadId, env: CheckEnv<'_>, opts: CheckOptions) -> Report {
    let started = Instant::now();
    let mut reasons = Vec::new();
    let mut external_ns = Vec::new();
    let mut record = None;
    let root = match workload {
        WorkloadId::Pid(pid) => {
            if ferry_sys::process_exists(*pid) {
                Some(*pid)
            } else {
                reasons.push(rules::workload_missing(&format!("no process with PID {pid}")));
                None
            }
        }
        WorkloadId::Container { kind, id } => match rules::container(kind, id, env.endpoints, &mut reasons) {
            Some(found) => {
                external_ns = found.external;
                record = Some(Box::new(found.record));
                Some(found.init_pid)
            }
            None => None,
        },
    };
    reasons.extend(rules::host(&gather::host(env.criu)));
    let mut processes = 0;
    let mut tree_needs = None;
    if let Some(root) = root {
        let facts = gather::tree(root, &external_ns);
        processes = facts.tasks.len();
        reasons.extend(rules::evaluate(&facts, opts));
        // A container's files come with its record, its ports with its namespace.
        if record.is_none() && opts.tree_needs {
            tree_needs = Some(target::TreeNeeds::of(&facts));
        }
    }
    let mut report = Report::new(workload.to_string(), root, processes, reasons);
    report.seconds = started.elapsed().as_secs_f64();
    report.container_record = record;
    report.tree_needs = tree_needs;
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(code: &'static str, severity: Severity) -> Reason {
        Reason { code, severity, what: String::new(), why: String::new(), fix: String::new(), pids: vec![] }
    }

    #[test]
    fn scores_follow_the_documented_formula() {
        assert_eq!(score(&[]), (Verdict::Ready, 100));
        assert_eq!(score(&[reason("kernel", Severity::Info)]), (Verdict::Ready, 100));
        let c = |n| reason(n, Severity::Caveat);
        let b = |n| reason(n, Severity::Blocker);
        assert_eq!(score(&[c("a")]), (Verdict::ReadyWithCaveats, 90));
        // One code counts once, however many times it appears.
        assert_eq!(score(&[c("a"), c("a"), c("b")]), (Verdict::ReadyWithCaveats, 80));
        let many: Vec<Reason> = ["a", "b", "c", "d", "e", "f", "g"].into_iter().map(c).collect();
        assert_eq!(score(&many), (Verdict::ReadyWithCaveats, 50));
        assert_eq!(score(&[b("x")]), (Verdict::NotReady, 40));
        assert_eq!(score(&[b("x"), b("y"), c("a")]), (Verdict::NotReady, 25));
        let worst: Vec<Reason> = ["a", "b", "c", "d", "e"].into_iter().map(b).collect();
        assert_eq!(score(&worst), (Verdict::NotReady, 0));
    }

    #[test]
    fn reports_list_blockers_first_and_serialize() {
        let r = Report::new(
            "pid:42".into(),
            Some(42),
            1,
            vec![
                reason("kernel", Severity::Info),
                reason("io-uring", Severity::Blocker),
                reason("hugetlb", Severity::Caveat),
            ],
        );
        let codes: Vec<&str> = r.reasons.iter().map(|r| r.code).collect();
        assert_eq!(codes, ["io-uring", "hugetlb", "kernel"]);
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["verdict"], "not-ready");
        assert_eq!(json["score"], 35);
        assert_eq!(json["reasons"][0]["severity"], "blocker");
        assert!(json["reasons"][0].get("pids").is_none());
    }
}

//! The local API: what the CLI asks its node's agent over the Unix socket, and the events the
//! agent streams back (progress, then a report or an error). Framed with `ferry-wire`, the
//! payloads postcard-encoded.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Frame kind of every local API message.
pub const KIND_API: u16 = 0x4150;
/// Cap on a local API frame.
pub const API_CAP: u32 = 1 << 20;

/// How a migration moves memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// Pick one from memory size, dirty rate and link speed.
    Auto,
    /// Freeze, dump, ship, restore.
    StopCopy,
    /// Ship a checkpoint taken while the workload runs, then only the chunks that changed.
    PreCopy,
    /// Restore at once; pages follow on demand (userfaultfd), served by the source.
    PostCopy,
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Auto => "auto",
            Strategy::StopCopy => "stop-copy",
            Strategy::PreCopy => "pre-copy",
            Strategy::PostCopy => "post-copy",
        })
    }
}

impl FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Strategy, String> {
        Ok(match s {
            "auto" => Strategy::Auto,
            "stop-copy" => Strategy::StopCopy,
            "pre-copy" => Strategy::PreCopy,
            "post-copy" => Strategy::PostCopy,
            _ => return Err(format!("unknown strategy '{s}': auto, stop-copy, pre-copy or post-copy")),
        })
    }
}

/// What happens to a post-copy migration that cannot finish after the switch (the target's
/// copy could not get the rest of its memory and was killed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OnFailure {
    /// The workload is lost: the source's frozen copy is killed too. Nothing it did on the
    /// target is undone by running an older state of it.
    #[default]
    Lost,
    /// The source's frozen copy resumes, in the state it had at the freeze: whatever the
    /// workload did on the target since the switch (writes it acknowledged included) is lost.
    ResumeSource,
}

impl fmt::Display for OnFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnFailure::Lost => "lost",
            OnFailure::ResumeSource => "resume-source",
        })
    }
}

impl FromStr for OnFailure {
    type Err = String;
    fn from_str(s: &str) -> Result<OnFailure, String> {
        match s {
            "lost" => Ok(OnFailure::Lost),
            "resume-source" => Ok(OnFailure::ResumeSource),
            _ => Err(format!("unknown --on-failure '{s}': lost or resume-source")),
        }
    }
}

/// How long, by default, a post-copy migration that lost its link (or a restarting agent)
/// waits for it to come back before the workload is declared lost.
pub const DEFAULT_RECOVER_TIMEOUT_S: u32 = 60;

/// `ferry migrate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// `pid:PID` of the tree's root on this node, or a container (`KIND:NAME`).
    pub workload: String,
    /// The target node's name.
    pub to: String,
    pub strategy: Strategy,
    /// After the switch, how long the agents try to reach each other again (a lost link, a
    /// restarting agent) while the target's faulting threads wait, before the workload is
    /// declared lost.
    pub recover_timeout_s: u32,
    /// What a post-copy migration that cannot finish does.
    pub on_failure: OnFailure,
    /// Migrate a container even if `ferry check` finds it not ready (the agent checks a
    /// container before freezing it; the CLI checks a process tree itself).
    #[serde(default)]
    pub force: bool,
}

impl Default for MigrateRequest {
    fn default() -> MigrateRequest {
        MigrateRequest {
            workload: String::new(),
            to: String::new(),
            strategy: Strategy::Auto,
            recover_timeout_s: DEFAULT_RECOVER_TIMEOUT_S,
            on_failure: OnFailure::Lost,
            force: false,
        }
    }
}

/// A request on the local socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// The agent's name, address, peers and counters.
    Status,
    Migrate(MigrateRequest),
    /// What node `node` (this agent's peer, or this agent itself) says of itself as a
    /// target, with this host's `cpuinfo.img` for its CRIU to check; the link to it measured.
    TargetFacts {
        node: String,
        cpuinfo: Option<Vec<u8>>,
        /// A container's record, for the target's runtime to judge (`None`: a process tree).
        #[serde(default)]
        container: Option<Vec<u8>>,
        /// A process tree's paths and listeners, for the target to look for.
        #[serde(default)]
        tree: Option<ferry_runtime::check::target::TreeNeeds>,
    },
}

/// Progress of a long phase.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub phase: String,
    pub done: u64,
    pub total: u64,
}

/// One timed phase of a migration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PhaseTime {
    pub name: String,
    pub seconds: f64,
}

/// What a finished migration reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub migration: String,
    pub workload: String,
    pub from: String,
    pub to: String,
    pub strategy: Strategy,
    /// Why this strategy (for `auto`, what decided it).
    pub reason: String,
    pub phases: Vec<PhaseTime>,
    /// Bytes sent to the target (chunks, images, pages).
    pub bytes_sent: u64,
    /// Logical size of the checkpoint (CRIU's images).
    pub logical_bytes: u64,
    /// From the freeze to the workload running with its network on the target.
    pub downtime_s: f64,
    pub total_s: f64,
    /// The workload on the target: `pid:PID` there.
    pub new_workload: String,
    pub ip: Option<String>,
}

impl Report {
    /// The report as JSON (for `--report-json`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "migration": self.migration,
            "workload": self.workload,
            "from": self.from,
            "to": self.to,
            "strategy": self.strategy.to_string(),
            "reason": self.reason,
            "phases": self.phases.iter().map(|p| serde_json::json!({"name": p.name, "seconds": p.seconds})).collect::<Vec<_>>(),
            "bytes_sent": self.bytes_sent,
            "logical_bytes": self.logical_bytes,
            "downtime_s": self.downtime_s,
            "total_s": self.total_s,
            "new_workload": self.new_workload,
            "ip": self.ip,
        })
    }
}

/// The agent's state, for `Status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    pub name: String,
    pub listen: String,
    pub peers: Vec<String>,
    pub public_key: String,
    pub migrations_ok: u64,
    pub migrations_failed: u64,
    /// Workloads lost after the switch: migrations this node sent, and arrivals it killed.
    pub migrations_lost: u64,
    pub arrivals_lost: u64,
}

/// What the agent sends back.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum Event {
    Progress(Progress),
    /// A phase began (for the CLI's display).
    Phase(String),
    Report(Report),
    Status(NodeStatus),
    TargetFacts(ferry_runtime::check::target::TargetFacts),
    /// The request failed; `hint` says what to do.
    Failed {
        message: String,
        hint: Option<String>,
    },
    /// The migration passed the switch and then could not finish: the workload was lost (or,
    /// with `--on-failure=resume-source`, runs again at the source from its frozen state).
    Lost {
        message: String,
        /// The phase (and step) where it happened.
        at: String,
        /// The source's copy was resumed.
        resumed: bool,
    },
}

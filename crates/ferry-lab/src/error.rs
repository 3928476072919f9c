//! What can go wrong, said so that the reader knows what failed; [`LabError::hint`] says what
//! to do about it.

use std::io;
use std::path::PathBuf;

use crate::Subnet;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab needs root to create network namespaces and links (effective uid is {uid})")]
    NotRoot { uid: u32 },
    #[error("`{tool}` was not found in PATH, /usr/sbin, /sbin, /usr/bin or /bin")]
    ToolMissing { tool: &'static str, package: &'static str },
    #[error("invalid lab name {name:?}: {why}")]
    InvalidName { name: String, why: String },
    #[error("invalid subnet {input:?}: {why}")]
    InvalidSubnet { input: String, why: String },
    #[error("a lab of {requested} nodes does not fit: {subnet} holds 1 to {max}")]
    NodeCount { requested: usize, max: usize, subnet: Subnet },
    #[error("{lab} is already up ({nodes} nodes; state in {})", state.display())]
    AlreadyUp { lab: String, nodes: usize, state: PathBuf, select: String },
    #[error("{lab} is not up, but objects of an earlier one are still there: {}", objects.join(", "))]
    Leftovers { lab: String, objects: Vec<String>, select: String },
    #[error("{subnet} is in use on this machine: {what}")]
    SubnetInUse { subnet: Subnet, what: String },
    #[error("no free /24 left in 198.19.0.0/16 for {lab}")]
    NoFreeSubnet { lab: String },
    #[error("{lab} is not up (no state in {})", state.display())]
    NotUp { lab: String, state: PathBuf, select: String },
    #[error("no node {node:?} in the lab (its nodes: {})", known.join(", "))]
    UnknownNode { node: String, known: Vec<String> },
    #[error("no command to run was given")]
    EmptyCommand,
    #[error("command {program:?} was not found (searched PATH)")]
    CommandNotFound { program: String },
    #[error("node {node} has no workload address left (all {max} were handed out)")]
    AddressesExhausted { node: String, max: usize },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the lab state {} is damaged: {why}", path.display())]
    DamagedState { path: PathBuf, why: String },
    #[error("the workload on {node} did not show up in its namespaces within {secs} s")]
    WorkloadDidNotStart { node: String, secs: u64, log: Option<PathBuf> },
    #[error("the workload on {node} ended as soon as it started ({status})")]
    WorkloadExited { node: String, status: String, log: Option<PathBuf> },
    #[error("the container on {node} did not start: {detail}")]
    ContainerDidNotStart { node: String, detail: String },
    #[error("no workload of the lab has number {id}")]
    UnknownWorkload { id: u64 },
    #[error("lab down could not remove: {}", left.join(", "))]
    DownIncomplete { left: Vec<String> },
}

impl LabError {
    /// What the user can do about it. Errors naming a lab carry, as `select`, the arguments
    /// that pick that lab in the CLI (` --name NAME`, or nothing for the default lab).
    pub fn hint(&self) -> Option<String> {
        let hint = match self {
            LabError::NotRoot { .. } => "run it with sudo, or as root".into(),
            LabError::ToolMissing { package, .. } => format!("install it: apt-get install {package}"),
            LabError::InvalidName { .. } => "a lab name is 1 to 4 lowercase letters or digits".into(),
            LabError::InvalidSubnet { .. } => {
                "give a subnet inside 198.18.0.0/15 of length 16 to 24, e.g. 198.19.4.0/24".into()
            }
            LabError::NodeCount { .. } => "ask for fewer nodes, or give the lab a bigger --subnet".into(),
            LabError::AlreadyUp { select, .. } => {
                format!("use it as it is (`ferry lab status{select}`), or `ferry lab down{select}` first to start afresh")
            }
            LabError::Leftovers { select, .. } => {
                format!("`ferry lab down{select}` removes them (a crash left them behind)")
            }
            LabError::SubnetInUse { .. } => {
                "give the lab another --subnet inside 198.18.0.0/15, or remove what uses this one".into()
            }
            LabError::NoFreeSubnet { .. } => "give a --subnet, or take down labs you no longer need".into(),
            LabError::NotUp { select, .. } => format!("`ferry lab up{select}` creates it"),
            LabError::UnknownNode { .. } => "`ferry lab status` lists the nodes".into(),
            LabError::UnknownWorkload { .. } => "`ferry lab status` lists the workloads".into(),
            LabError::ContainerDidNotStart { .. } => {
                "check that the node's runtime is up and has the image (`ferry lab status`)".into()
            }
            LabError::EmptyCommand => "put the command after `--`: ferry lab exec node1 -- CMD ARGS...".into(),
            LabError::CommandNotFound { .. } => "give its full path, or install it".into(),
            LabError::AddressesExhausted { .. } => {
                "start it on another node, or `ferry lab down` and `up` again with a bigger --subnet".into()
            }
            LabError::Command { .. } | LabError::Spawn { .. } => {
                "`ferry lab down` removes what the lab created so far".into()
            }
            LabError::Io { .. } => "check that the state directory is writable by root".into(),
            LabError::DamagedState { .. } => {
                "`ferry lab down` still works without it: it finds the lab's objects by name".into()
            }
            LabError::WorkloadDidNotStart { log, .. } | LabError::WorkloadExited { log, .. } => match log {
                Some(log) => format!("its output is in {}", log.display()),
                None => "run it again with --log FILE to see its output".into(),
            },
            LabError::DownIncomplete { .. } => {
                "something else may hold them (a shell inside a namespace?); stop it and run `ferry lab down` again"
                    .into()
            }
        };
        Some(hint)
    }
}

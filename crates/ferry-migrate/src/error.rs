//! What can go wrong in a migration, said so that the user knows what failed and where the
//! workload is now.

use std::path::PathBuf;

/// A failed migration step.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot reach node {node} at {addr}: {detail}")]
    Connect { node: String, addr: String, detail: String },
    #[error("node {0} is not known to this agent")]
    UnknownNode(String),
    #[error("the peer broke the protocol: {0}")]
    Protocol(String),
    #[error("the connection to {node} was lost during {phase}")]
    Lost { node: String, phase: String },
    #[error(transparent)]
    Wire(#[from] ferry_wire::WireError),
    #[error(transparent)]
    Runtime(#[from] ferry_runtime::Error),
    #[error(transparent)]
    Store(#[from] ferry_store::StoreError),
    #[error(transparent)]
    Criu(#[from] ferry_criu::CriuError),
    #[error(transparent)]
    Lab(#[from] ferry_lab::LabError),
    #[error("node {node} failed: {message}")]
    Remote { node: String, message: String },
    #[error("refused: {0}")]
    Refused(String),
    /// Past the switch, the migration could not finish: the target's copy was killed.
    #[error("{}", lost_text(reason, at, *resumed))]
    WorkloadLost {
        /// Why (e.g. the source was unreachable past the recover timeout).
        reason: String,
        /// Where: the phase and step.
        at: String,
        /// The source's frozen copy was resumed (`--on-failure=resume-source`).
        resumed: bool,
    },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl MigrateError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        Some(match self {
            MigrateError::Connect { .. } => {
                "is ferryd running on that node, and is its address right?".into()
            }
            MigrateError::UnknownNode(_) => "add it to the agent's peers (config `peers`)".into(),
            MigrateError::Wire(_) => "pin the peer's key on both nodes with `ferry node trust`".into(),
            MigrateError::Runtime(e) => return e.hint(),
            MigrateError::Criu(e) => return e.hint(),
            MigrateError::Lab(e) => return e.hint(),
            MigrateError::WorkloadLost { resumed: false, .. } => {
                "restore it from a checkpoint of your own, or start it again; `--on-failure=resume-source` resumes the source's frozen copy instead (losing what happened since the switch)".into()
            }
            MigrateError::WorkloadLost { resumed: true, .. } => {
                "the workload runs again at the source, in its state at the freeze".into()
            }
            _ => return None,
        })
    }

    pub(crate) fn protocol(detail: impl Into<String>) -> MigrateError {
        MigrateError::Protocol(detail.into())
    }
}

fn lost_text(reason: &str, at: &str, resumed: bool) -> String {
    if resumed {
        format!(
            "the migration failed after the switch ({at}): {reason}; the source's copy was resumed from its state at the freeze: what the workload did on the target since the switch is lost"
        )
    } else {
        format!("THE WORKLOAD WAS LOST after the switch ({at}): {reason}")
    }
}

/// `e` and its sources, each once, joined by ": " (what a peer or the CLI is told).
pub use ferry_lazy::chain;

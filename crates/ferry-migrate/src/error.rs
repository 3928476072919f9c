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
            _ => return None,
        })
    }

    pub(crate) fn protocol(detail: impl Into<String>) -> MigrateError {
        MigrateError::Protocol(detail.into())
    }
}

/// `e` and its sources, each once, joined by ": " (what a peer or the CLI is told).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        src = s.source();
    }
    text
}

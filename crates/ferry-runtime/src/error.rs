use ferry_criu::CriuError;
use ferry_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ferry must run as root to checkpoint or restore (effective uid is {uid})")]
    NotRoot { uid: u32 },
    #[error("invalid workload '{input}': {why}")]
    InvalidWorkload { input: String, why: String },
    #[error("no process with PID {pid}")]
    ProcessNotFound { pid: i32 },
    #[error("{kind} workloads are not supported yet")]
    UnsupportedKind { kind: String },
    #[error("internal error: {0}")]
    Internal(String),
    #[error("the checkpoint was abandoned while the workload was frozen: {0}")]
    PostDump(String),
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Error {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::NotRoot { .. } => Some("run it with sudo, or as root".into()),
            Error::InvalidWorkload { .. } => Some("name a workload as KIND:ID, e.g. pid:1234".into()),
            Error::ProcessNotFound { .. } => {
                Some("check the PID with `ps`; the process may have exited".into())
            }
            Error::UnsupportedKind { .. } => Some("use pid:PID with the PID of the tree's root".into()),
            Error::Criu(e) => e.hint(),
            Error::PostDump(_) => Some("the workload was resumed where it was; nothing else changed".into()),
            Error::Internal(_) => Some("this is a bug in ferry; please report it with the log".into()),
            Error::Store(StoreError::NotFound(_)) => Some("`ferry list` shows the checkpoints".into()),
            Error::Store(StoreError::Exists(_)) => Some("choose another --name, or `ferry rm` the old one".into()),
            Error::Store(StoreError::Damaged { .. } | StoreError::Tampered { .. }) => {
                Some("nothing was restored from it; take a new checkpoint (`ferry verify` checks the others)".into())
            }
            Error::Store(StoreError::NoKey { .. }) => {
                Some("only a node it was encrypted for can restore it (`ferry keys add-recipient` before checkpointing)".into())
            }
            Error::Store(StoreError::Busy) => Some("wait for the other ferry command to finish".into()),
            Error::Store(StoreError::KeyShared { .. }) => {
                Some("shred those checkpoints too, or remove this one without --shred".into())
            }
            Error::Store(_) => None,
        }
    }
}

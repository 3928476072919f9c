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
    #[error("no container {workload} in {where_}")]
    ContainerNotFound { workload: String, where_: String },
    #[error("container {workload} is not running (it is {state})")]
    ContainerNotRunning { workload: String, state: String },
    #[error("{workload} already exists")]
    NameTaken { workload: String },
    #[error("{0}")]
    RuntimeUnavailable(Box<Unavailable>),
    #[error("{0}")]
    RuntimeFailed(Box<RuntimeFailure>),
    #[error("{0}")]
    Container(String),
    #[error("the checkpoint's container record is invalid: {0}")]
    BadContainerRecord(String),
    #[error("{workload} cannot be restored here: {}", reasons.join("; "))]
    ContainerRefused { workload: String, reasons: Vec<String> },
    #[error("{workload} is not ready for a checkpoint: {}", reasons.join("; "))]
    NotReady { workload: String, reasons: Vec<String> },
    /// Where copies were to go (a node, its addresses) could not take them.
    #[error("{detail}")]
    Placement { detail: String, hint: Option<String> },
    #[error("{what} cannot be cloned: {why}")]
    NotClonable { what: String, why: String },
    #[error("{0}")]
    Usage(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("ferry's pager could not fill the restored memory: {0}")]
    Pager(String),
    #[error("the checkpoint was abandoned while the workload was frozen: {0}")]
    PostDump(String),
    #[error(transparent)]
    Criu(#[from] CriuError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A container runtime that does not answer.
#[derive(Debug)]
pub struct Unavailable {
    pub kind: String,
    pub endpoint: std::path::PathBuf,
    pub detail: String,
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} cannot be reached at {}: {}", self.kind, self.endpoint.display(), self.detail)
    }
}

/// A container runtime's command or call that failed.
#[derive(Debug)]
pub struct RuntimeFailure {
    pub kind: String,
    pub action: String,
    pub detail: String,
    /// CRIU's log, when CRIU ran.
    pub log: Option<std::path::PathBuf>,
}

impl std::fmt::Display for RuntimeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {}", self.action, self.detail)
    }
}

impl Error {
    pub fn runtime_unavailable(
        kind: &str,
        endpoint: impl Into<std::path::PathBuf>,
        detail: impl Into<String>,
    ) -> Error {
        Error::RuntimeUnavailable(Box::new(Unavailable {
            kind: kind.to_owned(),
            endpoint: endpoint.into(),
            detail: detail.into(),
        }))
    }

    pub fn runtime_failed(
        kind: &str,
        action: impl Into<String>,
        detail: impl Into<String>,
        log: Option<std::path::PathBuf>,
    ) -> Error {
        Error::RuntimeFailed(Box::new(RuntimeFailure {
            kind: kind.to_owned(),
            action: action.into(),
            detail: detail.into(),
            log,
        }))
    }

    /// CRIU's log of the failed operation, if there is one.
    pub fn log_path(&self) -> Option<std::path::PathBuf> {
        match self {
            Error::Criu(c) => c.log_path().map(std::path::Path::to_path_buf),
            Error::RuntimeFailed(f) => f.log.clone(),
            _ => None,
        }
    }

    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::NotRoot { .. } => Some("run it with sudo, or as root".into()),
            Error::InvalidWorkload { .. } => Some("name a workload as KIND:ID, e.g. pid:1234".into()),
            Error::ProcessNotFound { .. } => {
                Some("check the PID with `ps`; the process may have exited".into())
            }
            Error::UnsupportedKind { .. } => {
                Some("KIND is one of pid, runc, podman, containerd, docker".into())
            }
            Error::ContainerNotFound { workload, .. } => Some(format!(
                "check the name with the runtime's own listing; `--runtime-endpoint {}=PATH` picks another instance",
                workload.split(':').next().unwrap_or("KIND")
            )),
            Error::ContainerNotRunning { .. } => Some("start it first; only running containers are checkpointed".into()),
            Error::RuntimeUnavailable(u) => Some(format!(
                "start {} (or its daemon), or point ferry at it with --runtime-endpoint {}=PATH",
                u.kind, u.kind
            )),
            Error::RuntimeFailed(f) if f.log.is_some() => {
                Some("CRIU's log (below) says what went wrong; nothing was left behind".into())
            }
            Error::RuntimeFailed(_) | Error::Container(_) => None,
            Error::BadContainerRecord(_) => Some("nothing was restored from it".into()),
            Error::NameTaken { .. } => Some("restore it under another name with --name NEW, or remove the other one".into()),
            Error::ContainerRefused { .. } => Some("fix the reasons above, or restore on another host".into()),
            Error::Criu(e) => e.hint(),
            Error::PostDump(_) => Some("the workload was resumed where it was; nothing else changed".into()),
            Error::Pager(_) => Some(
                "the restored tree was killed (it must not run with memory missing); `ferry verify NAME` checks the \
                 checkpoint"
                    .into(),
            ),
            Error::NotReady { workload, .. } => Some(format!(
                "nothing was frozen; `ferry check {workload}` explains each reason and its fix; --force tries anyway"
            )),
            Error::Placement { hint, .. } => hint.clone(),
            Error::NotClonable { .. } => Some(
                "clone a workload that is PID 1 of its own pid and network namespaces (`ferry lab exec` starts one), \
                 or a checkpoint `ferry clone` made of one"
                    .into(),
            ),
            Error::Usage(_) => None,
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

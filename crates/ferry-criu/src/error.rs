//! Errors of the CRIU client. A failed CRIU operation always carries the classified cause and
//! the path of the log that proves it.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::classify::Cause;
use crate::version::Version;

/// What ferry asked CRIU to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Dump,
    Restore,
    Check,
    FeatureCheck,
    Version,
    CpuinfoDump,
    CpuinfoCheck,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::Dump => "checkpoint",
            Operation::Restore => "restore",
            Operation::Check => "criu check",
            Operation::FeatureCheck => "criu feature check",
            Operation::Version => "criu version query",
            Operation::CpuinfoDump => "criu cpuinfo dump",
            Operation::CpuinfoCheck => "criu cpuinfo check",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    #[error("CRIU is not installed (no `criu` in {searched})")]
    NotFound { searched: String },
    #[error("CRIU {found} at {} is too old: ferry needs {need} or newer", path.display())]
    TooOld { found: Version, need: Version, path: PathBuf },
    #[error("could not start CRIU ({})", path.display())]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not open {what} {}", path.display())]
    Open {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("talking to CRIU failed during {op}: {detail}")]
    Protocol { op: Operation, detail: String, log: Option<PathBuf> },
    #[error("{op} did not finish within {}s: CRIU was stopped", after.as_secs())]
    TimedOut { op: Operation, after: Duration, log: Option<PathBuf> },
    #[error("{op} failed: {}", cause.summary())]
    Failed { op: Operation, cause: Cause, log: PathBuf, errno: Option<i32>, detail: Option<String> },
}

impl CriuError {
    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            CriuError::NotFound { .. } | CriuError::TooOld { .. } => Some(
                "run scripts/setup (builds CRIU >= 4.2 from Debian's source package), or pass --criu PATH"
                    .into(),
            ),
            CriuError::Spawn { .. } => {
                Some("check that the criu binary is executable, or pass --criu PATH".into())
            }
            CriuError::Protocol { .. } => Some("read CRIU's log; this may be a CRIU crash".into()),
            CriuError::Failed { cause, .. } => Some(cause.hint()),
            CriuError::TimedOut { .. } => {
                Some("read CRIU's log for where it stopped; raise the limit with --criu-timeout".into())
            }
            CriuError::Open { .. } => None,
        }
    }

    /// CRIU's log for the failed call, when there is one.
    pub fn log_path(&self) -> Option<&Path> {
        match self {
            CriuError::Failed { log, .. } => Some(log),
            CriuError::Protocol { log, .. } | CriuError::TimedOut { log, .. } => log.as_deref(),
            _ => None,
        }
    }

    /// The classified cause of a failed operation.
    pub fn cause(&self) -> Option<&Cause> {
        match self {
            CriuError::Failed { cause, .. } => Some(cause),
            _ => None,
        }
    }
}

//! Typed exit codes and the error report printed at the edge.

use std::process::ExitCode;

use ferry_criu::{Cause, CriuError};
use ferry_runtime::Error;
use ferry_store::StoreError;

/// Exit codes scripts can rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Ok = 0,
    Failure = 1,
    Usage = 2,
    NotFound = 3,
    NotPermitted = 4,
    Environment = 5,
    Damaged = 6,
    CriuFailed = 7,
    Conflict = 8,
    NoKey = 9,
    /// A migration failed after the switch: the workload was lost (or, asked for, runs again
    /// at the source from its state at the freeze).
    Lost = 10,
    /// `ferry check` found a blocker: the workload would not survive a checkpoint; checkpoint
    /// and migrate refuse such a workload (without --force) with the same code.
    NotReady = 11,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

/// The exit code for an error of the libraries.
pub fn classify(err: &Error) -> Exit {
    match err {
        Error::NotRoot { .. } => Exit::NotPermitted,
        Error::InvalidWorkload { .. } | Error::UnsupportedKind { .. } | Error::Usage(_) => Exit::Usage,
        Error::ProcessNotFound { .. } | Error::ContainerNotFound { .. } => Exit::NotFound,
        Error::ContainerNotRunning { .. } | Error::ContainerRefused { .. } => Exit::Failure,
        Error::NameTaken { .. } => Exit::Conflict,
        Error::RuntimeUnavailable(_) => Exit::Environment,
        Error::RuntimeFailed(_) => Exit::CriuFailed,
        Error::Container(_) => Exit::Failure,
        Error::BadContainerRecord(_) => Exit::Damaged,
        Error::Internal(_) | Error::PostDump(_) | Error::Pager(_) => Exit::Failure,
        Error::NotReady { .. } => Exit::NotReady,
        Error::NotClonable { .. } | Error::Placement { .. } => Exit::Failure,
        Error::Store(s) => match s {
            StoreError::NotFound(_) => Exit::NotFound,
            StoreError::Exists(_) | StoreError::Busy | StoreError::KeyShared { .. } => Exit::Conflict,
            StoreError::InvalidName { .. } => Exit::Usage,
            StoreError::Damaged { .. } | StoreError::Tampered { .. } => Exit::Damaged,
            StoreError::NoKey { .. } => Exit::NoKey,
            StoreError::Key(_) => Exit::NotPermitted,
            StoreError::Io { .. } => Exit::Failure,
        },
        Error::Criu(c) => match c {
            CriuError::NotFound { .. } | CriuError::TooOld { .. } | CriuError::Spawn { .. } => {
                Exit::Environment
            }
            CriuError::Failed { cause, .. } => match cause {
                Cause::PidInUse { .. } => Exit::Conflict,
                Cause::ProcessNotFound { .. } => Exit::NotFound,
                Cause::NotPermitted => Exit::NotPermitted,
                Cause::DamagedImage { .. } => Exit::Damaged,
                _ => Exit::CriuFailed,
            },
            CriuError::Open { .. } | CriuError::Protocol { .. } | CriuError::TimedOut { .. } => {
                Exit::CriuFailed
            }
        },
    }
}

/// Prints `error: WHAT`, then each cause once, then the hint and CRIU's log.
pub fn report(what: &str, err: &Error) {
    eprintln!("error: {what}");
    let mut source: Option<&dyn std::error::Error> = Some(err);
    let mut last = String::new();
    while let Some(e) = source {
        let line = e.to_string();
        if !line.is_empty() && !last.contains(&line) {
            eprintln!("  cause: {line}");
        }
        last = line;
        source = e.source();
    }
    if let Some(hint) = err.hint() {
        eprintln!("  hint: {hint}");
    }
    if let Some(log) = err.log_path() {
        eprintln!("  log: {}", log.display());
    }
}

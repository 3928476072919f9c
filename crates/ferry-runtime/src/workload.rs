//! Workload addresses (`KIND:ID`) and the trait each kind implements.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// A workload as the user names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadId {
    /// A process tree, by the host PID of its root.
    Pid(i32),
    /// A container of another runtime (`runc:ID`, `podman:ID`, ...), not handled yet.
    Container { kind: String, id: String },
}

impl FromStr for WorkloadId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid =
            |why: &str| Error::InvalidWorkload { input: s.chars().take(200).collect(), why: why.into() };
        let (kind, id) = s.split_once(':').ok_or_else(|| invalid("expected KIND:ID, e.g. pid:1234"))?;
        if id.is_empty() {
            return Err(invalid("the ID after ':' is empty"));
        }
        match kind {
            "pid" => {
                let pid: i32 = id.parse().map_err(|_| invalid("the PID must be a number"))?;
                if pid <= 1 {
                    return Err(invalid("the PID must be greater than 1"));
                }
                Ok(WorkloadId::Pid(pid))
            }
            k if crate::container::is_kind(k) => {
                Ok(WorkloadId::Container { kind: k.to_owned(), id: id.to_owned() })
            }
            _ => Err(invalid(&format!(
                "KIND must be one of pid, {}",
                crate::container::KINDS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
            ))),
        }
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkloadId::Pid(p) => write!(f, "pid:{p}"),
            WorkloadId::Container { kind, id } => write!(f, "{kind}:{id}"),
        }
    }
}

/// The process tree behind a workload, ready to be dumped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeRoot {
    pub pid: i32,
}

/// One kind of workload: finds its process tree and prepares it for CRIU.
pub trait Runtime {
    /// The `KIND` part of workload ids this runtime handles.
    fn kind(&self) -> &'static str;

    /// Finds the root of the tree to checkpoint, checking that it exists.
    fn resolve(&self, id: &WorkloadId) -> Result<TreeRoot, Error>;
}

/// The runtime that handles `id`.
pub fn runtime_for(id: &WorkloadId) -> Result<Box<dyn Runtime>, Error> {
    match id {
        WorkloadId::Pid(_) => Ok(Box::new(crate::ProcessRuntime)),
        WorkloadId::Container { kind, .. } => Err(Error::UnsupportedKind { kind: kind.clone() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pids_and_containers() {
        assert_eq!("pid:1234".parse::<WorkloadId>().expect("pid"), WorkloadId::Pid(1234));
        let c: WorkloadId = "runc:web1".parse().expect("runc");
        assert_eq!(c.to_string(), "runc:web1");
        assert!(matches!(runtime_for(&c), Err(Error::UnsupportedKind { .. })));
    }

    #[test]
    fn refuses_malformed_ids() {
        for bad in ["1234", "pid:", "pid:abc", "pid:-5", "pid:1", "vm:x", ":"] {
            assert!(matches!(bad.parse::<WorkloadId>(), Err(Error::InvalidWorkload { .. })), "{bad}");
        }
    }
}

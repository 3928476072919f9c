//! Plain process trees, addressed by the host PID of their root.

use crate::workload::{Runtime, TreeRoot, WorkloadId};
use crate::Error;

/// Handles `pid:PID` workloads.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessRuntime;

impl Runtime for ProcessRuntime {
    fn kind(&self) -> &'static str {
        "pid"
    }

    fn resolve(&self, id: &WorkloadId) -> Result<TreeRoot, Error> {
        let WorkloadId::Pid(pid) = id else {
            return Err(Error::UnsupportedKind { kind: id.to_string() });
        };
        if !ferry_sys::process_exists(*pid) {
            return Err(Error::ProcessNotFound { pid: *pid });
        }
        Ok(TreeRoot { pid: *pid })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_live_and_refuses_missing() {
        let me = std::process::id() as i32;
        assert_eq!(ProcessRuntime.resolve(&WorkloadId::Pid(me)).expect("self").pid, me);
        assert!(matches!(
            ProcessRuntime.resolve(&WorkloadId::Pid(i32::MAX)),
            Err(Error::ProcessNotFound { .. })
        ));
    }
}

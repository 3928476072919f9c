//! CRIU's notify messages: with `notify_scripts` set, CRIU stops at each action-script point
//! and waits for the caller's answer. Later layers hook network switching and resume here.

/// A point in CRIU's work at which it asks the caller to act.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notify {
    PreDump,
    PostDump,
    PreRestore,
    PostRestore,
    /// Connections are about to be (or must be) blocked.
    NetworkLock,
    /// Blocked connections may flow again.
    NetworkUnlock,
    SetupNamespaces,
    PostSetupNamespaces,
    /// The restored tree exists and is about to run.
    PreResume,
    PostResume,
    OrphanPtsMaster,
    /// A script name this version of ferry does not know: answered with success.
    Other(String),
}

impl Notify {
    pub fn from_script(name: &str) -> Notify {
        match name {
            "pre-dump" => Notify::PreDump,
            "post-dump" => Notify::PostDump,
            "pre-restore" => Notify::PreRestore,
            "post-restore" => Notify::PostRestore,
            "network-lock" => Notify::NetworkLock,
            "network-unlock" => Notify::NetworkUnlock,
            "setup-namespaces" => Notify::SetupNamespaces,
            "post-setup-namespaces" => Notify::PostSetupNamespaces,
            "pre-resume" => Notify::PreResume,
            "post-resume" => Notify::PostResume,
            "orphan-pts-master" => Notify::OrphanPtsMaster,
            other => Notify::Other(other.to_owned()),
        }
    }
}

/// Answers CRIU's notifications. Returning `Err` makes CRIU abort the operation (and, on dump,
/// resume the tree); the message is logged and reported with the failure.
pub trait NotifyHandler {
    fn notify(&mut self, event: &Notify, pid: Option<i32>) -> Result<(), String>;
}

/// Accepts every notification and records the sequence (useful for progress and tests).
#[derive(Debug, Default)]
pub struct RecordingNotify {
    pub events: Vec<(Notify, Option<i32>)>,
}

impl NotifyHandler for RecordingNotify {
    fn notify(&mut self, event: &Notify, pid: Option<i32>) -> Result<(), String> {
        tracing::debug!(?event, ?pid, "criu notify");
        self.events.push((event.clone(), pid));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_scripts() {
        assert_eq!(Notify::from_script("network-unlock"), Notify::NetworkUnlock);
        assert_eq!(Notify::from_script("pre-resume"), Notify::PreResume);
        assert_eq!(Notify::from_script("brand-new"), Notify::Other("brand-new".into()));
    }
}

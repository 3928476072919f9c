//! What an agent does at start with the journal a crash left: every migration ends with the
//! workload on exactly one node.

use crate::agent::Agent;
use crate::journal::Stage;
use crate::target::{ask_outcome, Arrival};

pub(crate) fn run(agent: &Agent) -> Vec<String> {
    let mut done = Vec::new();
    for entry in agent.journal.entries() {
        let m = entry.migration.clone();
        match entry.stage {
            Stage::Frozen => {
                // We died before letting go: CRIU resumed the workload when our end of its
                // socket closed. Bring its address back and forget the migration.
                if let (Some(lab), Some(id)) = (&agent.config.lab, entry.lab_workload) {
                    let _ = ferry_lab::set_port(lab, id, true);
                }
                crate::source::cleanup(agent, &entry);
                agent.journal.remove(&m);
                done.push(format!("{m}: not committed; the workload stays here"));
            }
            Stage::Committed => {
                // The target runs it. If CRIU resumed our copy (we died before answering it),
                // that copy must go.
                if entry.pid > 0 && ferry_lab::is_alive(entry.pid, entry.start_time) {
                    let _ = ferry_sys::kill(entry.pid, ferry_sys::Signal::Kill);
                }
                if let (Some(lab), Some(id)) = (&agent.config.lab, entry.lab_workload) {
                    let _ = ferry_lab::remove_workload(lab, id);
                }
                crate::source::cleanup(agent, &entry);
                // The entry stays: the target may still ask for the outcome.
                done.push(format!("{m}: committed; the source copy is gone"));
            }
            Stage::Arriving => {
                let outcome = if entry.pid == 0 { Some(false) } else { ask_outcome(agent, &entry) };
                let a = Arrival::from_entry(entry);
                match outcome {
                    Some(true) => match a.commit(agent) {
                        Ok(()) => done.push(format!("{m}: the source had committed; the workload runs here")),
                        Err(e) => done.push(format!("{m}: commit failed: {e}")),
                    },
                    Some(false) => {
                        a.abort(agent);
                        done.push(format!("{m}: not committed by the source; arrival undone"));
                    }
                    None => done.push(format!("{m}: the source cannot be reached; the workload stays held")),
                }
            }
            Stage::Arrived => {
                agent.journal.remove(&m);
            }
        }
    }
    done
}

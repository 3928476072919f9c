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
                // socket closed. Its address comes back once the target has let go of its
                // copy, if it made one (`settle`, after the agent serves its peers again).
                done.push(format!("{m}: not committed; the workload stays here"));
            }
            Stage::Committed => {
                // The target runs it. If CRIU resumed our copy (we died before answering it),
                // that copy must go.
                if entry.pid > 0 && ferry_lab::is_alive(entry.pid, entry.start_time) {
                    let _ = ferry_sys::kill(entry.pid, ferry_sys::Signal::Kill);
                }
                if let Some(c) = &entry.container {
                    crate::source::discard_container(agent, c);
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

/// For each migration the journal leaves `Frozen` (not committed; the source's copy resumed by
/// CRIU, its port still down): waits until the target holds no copy of it (the target asks
/// this agent for the outcome, hears "not committed" and undoes its arrival), then brings the
/// workload's port back up and forgets the migration. So the two copies never answer at the
/// same address. A target unreachable for `SETTLE_WAIT` is taken to hold nothing.
pub(crate) fn settle(agent: &Agent) {
    for entry in agent.journal.entries().into_iter().filter(|e| e.stage == Stage::Frozen) {
        let deadline = std::time::Instant::now() + SETTLE_WAIT;
        loop {
            match target_holds(agent, &entry) {
                Some(false) => break,
                None if std::time::Instant::now() >= deadline => {
                    tracing::warn!(migration = %entry.migration, "the target cannot be reached: bringing the workload's address back");
                    break;
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(200)),
            }
        }
        if let (Some(lab), Some(id)) = (&agent.config.lab, entry.lab_workload) {
            let _ = ferry_lab::set_port(lab, id, true);
        }
        crate::source::cleanup(agent, &entry);
        agent.journal.remove(&entry.migration);
        tracing::info!(migration = %entry.migration, "the workload stays here; its address is back");
    }
}

/// How long `settle` waits for an unreachable target.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether the target still journals an arrival for `entry`'s migration; `None` if unreachable.
fn target_holds(agent: &Agent, entry: &crate::journal::Entry) -> Option<bool> {
    let mut ch = agent.connect(&entry.peer).ok()?;
    match ch
        .call(&crate::proto::Msg::ArrivalStatus { migration: entry.migration.clone() }, "arrival status")
        .ok()?
    {
        crate::proto::Msg::ArrivalIs { holding } => Some(holding),
        _ => None,
    }
}

//! What an agent does at start with the journal a crash left, phase by phase (the table is in
//! docs/migration.md). Every migration ends with the workload on exactly one node, or
//! declared lost; a source's copy is never resumed once the target may have switched, unless
//! the target says its copy never ran or, lost, the user asked for it.
//!
//! [`run`] does what needs no peer, before the agent serves (a frozen tree whose pages a
//! target still needs is served again from the start); [`settle`] does the rest in the
//! background, asking the targets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::{OnFailure, Strategy};
use crate::journal::{Entry, Phase, Role};
use crate::lazy::{HeldBy, PageSource};
use crate::node::Node;
use crate::outcome::{await_verdict, forget_later, Verdict};
use crate::target::Arrival;
use crate::{holder, MigrateError};

/// How long `settle` waits for an unreachable target before it takes a workload that did not
/// reach the switch to be its own again.
const SETTLE_WAIT: Duration = Duration::from_secs(60);
/// How often a held tree whose target is silent (past a recover timeout) is asked about again.
const HELD_RETRY: Duration = Duration::from_secs(30);
/// How often a target that may have switched is asked how it stands.
const ASK_AGAIN: Duration = Duration::from_secs(1);

pub(crate) fn run(node: &Node) -> Vec<String> {
    holder::sweep_empty();
    let mut done = Vec::new();
    for entry in node.journal.entries() {
        let m = entry.migration.clone();
        let line = match (entry.role, entry.phase) {
            (Role::Source, Phase::Prepare) => {
                node.cleanup(&entry);
                node.journal.remove(&m);
                "nothing was frozen; forgotten".to_owned()
            }
            (Role::Source, Phase::Transfer) => {
                // We died before asking the target to restore: CRIU resumed the tree when our
                // end of its socket closed, into the holder if the tree was in it.
                if let Some(held) = &entry.held {
                    if let Err(e) = holder::release(held) {
                        tracing::error!(error = %e, "could not let the held tree go");
                    }
                }
                "not switched: the workload stays here (its address comes back once the target holds no copy)"
                    .to_owned()
            }
            (Role::Source, Phase::Switching) | (Role::Source, Phase::Switched)
                if entry.strategy == Strategy::PostCopy =>
            {
                match serve_again(node, &entry) {
                    Ok(bytes) => format!(
                        "{}: serving the {} MiB of lazy pages of the held tree again",
                        entry.phase,
                        bytes >> 20
                    ),
                    Err(e) => format!("{}: the held tree's pages cannot be served: {e}", entry.phase),
                }
            }
            (Role::Source, Phase::Switching) | (Role::Source, Phase::Switched) => {
                "the target may run it: the tree stays held until it says how it stands".into()
            }
            (Role::Source, Phase::Done) => {
                // The target has it all: the held tree goes.
                end_source(node, &entry, false);
                "done: the source's copy is gone".into()
            }
            (Role::Source, Phase::Lost) => {
                let resume = entry.on_failure == OnFailure::ResumeSource;
                end_source(node, &entry, resume);
                if resume {
                    "lost on the target: the source's copy resumed (--on-failure=resume-source)".into()
                } else {
                    "lost on the target: the source's copy is gone".into()
                }
            }
            (Role::Target, Phase::Prepare)
            | (Role::Target, Phase::Transfer)
            | (Role::Target, Phase::Switching) => {
                Arrival::from_entry(entry).abort(node);
                "not switched: arrival undone".into()
            }
            (Role::Target, Phase::Switched) if entry.strategy == Strategy::PostCopy => {
                Arrival::from_entry(entry).lost_with_agent(node);
                "switched, post-copy: its pager died with this agent: the workload was lost".into()
            }
            (Role::Target, Phase::Switched) => {
                let mut a = Arrival::from_entry(entry);
                if a.copy_runs(node) {
                    match a.keep(node) {
                        Ok(()) => "switched: the workload runs here".into(),
                        Err(e) => format!("switched: the workload runs here, but could not be recorded: {e}"),
                    }
                } else {
                    a.lost_with_agent(node);
                    "switched, but its copy does not run: the workload was lost here".into()
                }
            }
            (Role::Target, Phase::Done) | (Role::Target, Phase::Lost) => {
                "kept until the source says to forget it".into()
            }
        };
        done.push(format!("{m}: {line}"));
    }
    done
}

/// Post-copy, switching or switched: the held tree's pages are served again (the images come
/// from the checkpoint kept in the store). Returns the lazy bytes.
fn serve_again(node: &Node, entry: &Entry) -> Result<u64, MigrateError> {
    let held =
        entry.held.as_ref().ok_or_else(|| MigrateError::Refused("the journal names no holder".into()))?;
    if holder::members(held).is_empty() {
        return Err(MigrateError::Refused(format!("{} holds no process", held.cgroup.display())));
    }
    let name = &entry.migration;
    let store = &node.ctx.store;
    // The images are needed until the source is open (it reads them), not after.
    let (_scratch, images) =
        crate::node::images_in_scratch(store, &format!("serve-{name}"), &store.get(name)?)?;
    let source = PageSource::open_with(&images, entry.pid, HeldBy::Freezer(&held.cgroup))
        .map_err(|e| MigrateError::Refused(crate::chain(&e)))?;
    let bytes = source.lazy_bytes();
    node.serve_pages_of(name, Arc::new(source));
    Ok(bytes)
}

/// The source's part is over: the held tree killed (or, `resume`, let go, with its address
/// back), the old namespace and record removed (or kept), checkpoints released; the target
/// told to forget; the entry removed.
fn end_source(node: &Node, entry: &Entry, resume: bool) {
    node.stop_serving_pages_of(&entry.migration);
    if let Some(held) = &entry.held {
        let r = if resume { holder::release(held) } else { holder::kill(held) };
        if let Err(e) = r {
            tracing::error!(error = %e, "the holder");
        }
    } else if !resume && entry.pid > 0 && ferry_lab::is_alive(entry.pid, entry.start_time) {
        // No holder (no freezer on this host): CRIU may have resumed the copy.
        let _ = ferry_sys::kill(entry.pid, ferry_sys::Signal::Kill);
    }
    if !resume {
        if let Some(c) = &entry.container {
            node.discard_container(c);
        }
    }
    if let (Some(lab), Some(id)) = (&node.config.lab, entry.lab_workload) {
        if resume {
            let _ = ferry_lab::set_port(lab, id, true);
        } else {
            let _ = ferry_lab::remove_workload(lab, id);
        }
    }
    node.cleanup(entry);
    // Kept in the Done/Lost phase until the target heard that it may forget.
    let mut closing = entry.clone();
    if !matches!(closing.phase, Phase::Done | Phase::Lost) {
        closing.phase = Phase::Done;
    }
    if let Err(e) = node.journal.write(&closing) {
        tracing::warn!(error = %e, "could not journal the end");
    }
}

/// In the background, once the agent serves its peers: what needs the targets' answers.
pub(crate) fn settle(node: &Arc<Node>) {
    for entry in node.journal.entries().into_iter().filter(|e| e.role == Role::Source) {
        let node = node.clone();
        std::thread::spawn(move || settle_entry(&node, entry));
    }
}

/// Settles one migration of this (source) node with its target.
pub(crate) fn settle_entry(node: &Arc<Node>, mut entry: Entry) {
    let m = entry.migration.clone();
    loop {
        match entry.phase {
            Phase::Prepare | Phase::Transfer => {
                settle_unswitched(node, &entry);
                return;
            }
            Phase::Switched if entry.strategy == Strategy::PostCopy => {
                let source = node.page_source(&m);
                match await_verdict(node, &entry, source.as_deref()) {
                    Verdict::Done => {
                        tracing::info!(migration = %m, "the target has every page: the held tree goes");
                        end_source(node, &entry, false);
                        entry.phase = Phase::Done;
                    }
                    Verdict::Lost { at, reason } => {
                        tracing::error!(migration = %m, %at, %reason, "THE WORKLOAD WAS LOST after the switch (the target killed its copy)");
                        entry.phase = Phase::Lost;
                        entry.lost = Some(format!("{at}: {reason}"));
                        end_source(node, &entry, entry.on_failure == OnFailure::ResumeSource);
                    }
                    Verdict::Unreachable { reason } if entry.on_failure == OnFailure::ResumeSource => {
                        tracing::warn!(migration = %m, %reason, "the target cannot say whether its copy runs: the source's copy stays held");
                        std::thread::sleep(HELD_RETRY);
                    }
                    Verdict::Unreachable { reason } => {
                        tracing::error!(migration = %m, %reason, "THE WORKLOAD WAS LOST after the switch (presumed: the target stayed unreachable)");
                        entry.phase = Phase::Lost;
                        entry.lost = Some(format!("post-copy pages: {reason}"));
                        end_source(node, &entry, false);
                    }
                }
            }
            Phase::Switching | Phase::Switched => {
                match node.arrival_status(&entry) {
                    Ok((Some(Phase::Switched), _)) if entry.strategy == Strategy::PostCopy => {
                        // Switched: its pages are served from here (below).
                        entry.phase = Phase::Switched;
                        let _ = node.journal.write(&entry);
                    }
                    Ok((Some(Phase::Switched | Phase::Done), _)) => {
                        tracing::info!(migration = %m, "the target runs the workload: the held tree goes");
                        end_source(node, &entry, false);
                    }
                    Ok((Some(Phase::Lost), lost)) => {
                        tracing::error!(migration = %m, lost = ?lost, "THE WORKLOAD WAS LOST after the switch (the target's copy is gone)");
                        entry.phase = Phase::Lost;
                        entry.lost = lost;
                        end_source(node, &entry, entry.on_failure == OnFailure::ResumeSource);
                    }
                    Ok((None, _)) if entry.phase == Phase::Switching => {
                        tracing::warn!(migration = %m, "the target's copy never ran: the source's copy resumes");
                        node.stop_serving_pages_of(&m);
                        if let Some(held) = &entry.held {
                            if let Err(e) = holder::release(held) {
                                tracing::error!(error = %e, "could not let the held tree go");
                            }
                        }
                        settle_unswitched(node, &entry);
                        return;
                    }
                    Ok((None, _)) => {
                        // Switched, and the target keeps no record: it was told to forget (a
                        // crash here before this journal caught up).
                        end_source(node, &entry, false);
                    }
                    // Restoring (undecided), or unreachable: the tree stays held.
                    _ => std::thread::sleep(ASK_AGAIN),
                }
            }
            Phase::Done | Phase::Lost => {
                // Done with the tree (`run` or above): the target may forget.
                forget_then_remove(node, &entry);
                return;
            }
        }
        if let Some(e) = node.journal.read(&m) {
            entry = e;
        } else {
            return;
        }
    }
}

/// Tells the target it may forget the migration (until it listens), then forgets it here.
fn forget_then_remove(node: &Arc<Node>, entry: &Entry) {
    match node.tell_forget(&entry.peer, &entry.migration) {
        Ok(()) => {}
        Err(e) => {
            tracing::debug!(error = %e, "the target is told later");
            forget_later(node.clone(), entry.peer.clone(), entry.migration.clone());
        }
    }
    node.journal.remove(&entry.migration);
}

/// Not switched, the source's copy runs again (CRIU resumed it): waits until the target holds
/// no copy of it (the target undoes its arrival when it loses the source before the switch),
/// then brings the workload's port back up and forgets the migration. So the two copies never
/// answer at the same address. A target unreachable for `SETTLE_WAIT` is taken to hold nothing
/// (before the switch its copy, if any, never had its network up).
fn settle_unswitched(node: &Node, entry: &Entry) {
    let deadline = Instant::now() + SETTLE_WAIT;
    loop {
        match node.arrival_status(entry) {
            Ok((None, _)) => break,
            Err(_) if Instant::now() >= deadline => {
                tracing::warn!(migration = %entry.migration, "the target cannot be reached: bringing the workload's address back");
                break;
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    if let (Some(lab), Some(id)) = (&node.config.lab, entry.lab_workload) {
        let _ = ferry_lab::set_port(lab, id, true);
    }
    node.cleanup(entry);
    node.journal.remove(&entry.migration);
    tracing::info!(migration = %entry.migration, "the workload stays here; its address is back");
}

//! The source side of a migration, phase by phase (`phase` has the protocol):
//!
//! - [`prepare`]: the workload resolved, the target asked to make room, the strategy chosen;
//! - `Run::precopy` (pre-copy): a checkpoint of the running workload shipped first;
//! - `Run::freeze`: CRIU freezes and dumps the tree and holds it at post-dump, where the
//!   rest happens: `Run::transfer` (what the target lacks), the tree into ferry's freezer
//!   (`holder`), `Run::switch` (the target restores and runs it: the commit point), and for
//!   post-copy `Run::pages` (the target fetches the memory from the held tree);
//! - the end: `Run::finish` (moved), `Run::undo` (failed before the switch: the source's copy
//!   runs again), or `Run::lost` (failed after it).
//!
//! Before the switch any failure resumes the source's copy; after it the source never does so
//! on its own (see `phase`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_criu::{NotifyHandler, RecordingNotify};
use ferry_runtime::{CheckpointRequest, PostDump, WorkloadId};
use ferry_store::pipeline::Tap;
use ferry_store::Committed;

use crate::api::{Event, MigrateRequest, OnFailure, PhaseTime, Progress, Report, Strategy};
use crate::journal::{Entry, Phase, Role};
use crate::lazy::{PageServerFinisher, PageSource};
use crate::node::Node;
use crate::outcome::{await_verdict, forget_later, Verdict};
use crate::peer::{unexpected, Channel};
use crate::proto::{Msg, NETNS_KEY};
use crate::{auto, failpoint, holder, ship, MigrateError};

/// How often a source asks the target whether it switched.
const ASK_EVERY: Duration = Duration::from_millis(500);

pub(crate) fn migrate(
    node: &Arc<Node>,
    req: &MigrateRequest,
    events: &mut dyn FnMut(Event),
) -> Result<Report, MigrateError> {
    let started = Instant::now();
    let mut run = prepare(node, req, events)?;
    if run.strategy == Strategy::PreCopy {
        if let Err(e) = run.precopy() {
            run.undo();
            return Err(e);
        }
    }
    match run.freeze() {
        Ended::Moved { logical } => run.finish(logical, started),
        Ended::Undone(e) => {
            run.undo();
            Err(e)
        }
        Ended::Lost { reason, at, resumed } => {
            run.lost(resumed);
            Err(MigrateError::WorkloadLost { reason, at, resumed })
        }
        Ended::Held { reason, at } => {
            // Settled in the background (and at the next start, from the journal).
            let (node, entry) = (node.clone(), run.entry.clone());
            std::thread::spawn(move || crate::recover::settle_entry(&node, entry));
            Err(MigrateError::WorkloadLost { reason, at, resumed: false })
        }
    }
}

/// How the part from the freeze on ended.
enum Ended {
    /// Before the switch: the source's copy runs again (CRIU resumed it; the holder lets it
    /// go in `undo`).
    Undone(MigrateError),
    /// The target runs the workload with all its memory; the source's copy is gone.
    Moved { logical: u64 },
    /// Past the switch the workload could not be kept; `resumed`: the source's copy runs
    /// again (`--on-failure=resume-source`).
    Lost { reason: String, at: String, resumed: bool },
    /// The target cannot say what it did: the source's copy stays frozen in its holder, and
    /// the journal keeps the migration for recovery to settle with the target.
    Held { reason: String, at: String },
}

/// `ferry check` of a container with this agent's runtime instance, before anything is frozen
/// (the CLI, which may not reach that instance, checks process trees itself): a blocker
/// refuses the migration, naming the reasons.
fn refuse_not_ready(node: &Node, workload: &WorkloadId) -> Result<(), MigrateError> {
    use ferry_runtime::check::{self, CheckEnv, CheckOptions, Verdict};
    let env = CheckEnv { criu: Ok(&node.ctx.criu), endpoints: &node.ctx.endpoints };
    // A migration always moves established connections.
    let r = check::check(workload, env, CheckOptions { tcp_established: Some(true), tree_needs: false });
    // A container that cannot be found keeps the runtime's own error, below.
    if r.verdict != Verdict::NotReady || r.pid.is_none() {
        return Ok(());
    }
    let reasons = r.blockers().map(|b| format!("{}: {}", b.code, b.what)).collect();
    Err(ferry_runtime::Error::NotReady { workload: r.workload, reasons }.into())
}

/// The Prepare phase: resolves the workload, connects, chooses the strategy, and has the
/// target make room for it.
fn prepare<'a>(
    node: &'a Arc<Node>,
    req: &'a MigrateRequest,
    events: &'a mut dyn FnMut(Event),
) -> Result<Run<'a>, MigrateError> {
    let workload: WorkloadId = req.workload.parse()?;
    // A container's tree is its init process's; its own namespaces (runc's keys) are declared
    // external by the checkpoint itself.
    let (pid, container, record) = match &workload {
        WorkloadId::Pid(pid) => (*pid, None, None),
        WorkloadId::Container { kind, id } => {
            if !req.force {
                refuse_not_ready(node, &workload)?;
            }
            let c = ferry_runtime::container::open(kind, &node.ctx.endpoints)?.inspect(id)?;
            let record = serde_json::to_vec(&c.record).map_err(|e| MigrateError::protocol(e.to_string()))?;
            (c.plan.init_pid, Some(c.record.workload()), Some(record))
        }
    };
    if !ferry_sys::process_exists(pid) {
        return Err(ferry_runtime::Error::ProcessNotFound { pid }.into());
    }
    if req.to == node.config.name {
        return Err(MigrateError::Refused(format!("{} already runs on {}", req.workload, req.to)));
    }
    let lab_workload = match &node.config.lab {
        Some(lab) => ferry_lab::workload_by_pid(lab, pid)?,
        None => None,
    };
    let external_net = if container.is_some() { None } else { own_netns(pid) };
    let memory = tree_rss(pid);
    let migration = format!("mig-{}-{pid}", unix_ms());

    events(Event::Phase(format!("connecting to {}", req.to)));
    let mut ch = node.connect(&req.to)?;
    let (strategy, reason) = match req.strategy {
        Strategy::Auto => {
            events(Event::Phase("measuring memory, dirty rate and link".into()));
            let measured = auto::Measured {
                memory,
                dirty_per_s: auto::dirty_rate(pid),
                link_bytes_per_s: probe_link(&mut ch)?,
            };
            auto::decide(&measured)
        }
        s => (s, format!("asked for {s}")),
    };
    if strategy == Strategy::PostCopy && !holder::available() {
        return Err(MigrateError::Refused(format!(
            "post-copy holds the frozen tree in a cgroup v1 freezer until the target has every page, and this host has none at {}",
            holder::FREEZER
        )));
    }
    tracing::info!(%migration, pid, to = %req.to, %strategy, %reason, "migrating");
    let prepare = Msg::Prepare {
        migration: migration.clone(),
        workload: req.workload.clone(),
        ip: lab_workload.as_ref().map(|w| w.ip),
        lab_workload: lab_workload.as_ref().map(|w| w.id),
        neighbours: match (&node.config.lab, &lab_workload) {
            (Some(lab), Some(w)) => ferry_lab::neighbours(lab, w.id).unwrap_or_default(),
            _ => Vec::new(),
        },
        strategy,
        container: record,
        recover_timeout_s: req.recover_timeout_s,
    };
    let recipient = match ch.call(&prepare, "prepare")? {
        Msg::Prepared { x25519 } => x25519,
        other => return Err(unexpected("prepare", &other)),
    };
    let trusted =
        ferry_store::keys::recipients(&node.ctx.store.keys_dir()).map_err(ferry_store::StoreError::from)?;
    if !trusted.iter().any(|(_, p)| p.x25519 == recipient) {
        return Err(MigrateError::Refused(format!(
            "node {}'s key is not trusted here: `ferry node trust {} KEY` (its `ferry keys show`)",
            req.to, req.to
        )));
    }
    let entry = Entry {
        pid,
        start_time: ferry_lab::start_time(pid).unwrap_or(0),
        lab_workload: lab_workload.as_ref().map(|w| w.id),
        container,
        recover_timeout_s: req.recover_timeout_s,
        on_failure: req.on_failure,
        ..Entry::new(&migration, Role::Source, &req.to, strategy)
    };
    Ok(Run {
        node,
        req,
        ch,
        ch_ok: true,
        events,
        workload,
        strategy,
        reason,
        recipient,
        entry,
        external_net,
        lab_ip: lab_workload.map(|w| w.ip.to_string()),
        phases: Vec::new(),
        bytes: 0,
        frozen_at: None,
        committed_at: None,
        port_down: false,
        running: None,
        running_container: None,
    })
}

/// A migration under way on the source.
struct Run<'a> {
    node: &'a Arc<Node>,
    req: &'a MigrateRequest,
    ch: Channel,
    /// False once the control connection failed: after the switch the rest goes through
    /// connections of their own.
    ch_ok: bool,
    events: &'a mut dyn FnMut(Event),
    workload: WorkloadId,
    strategy: Strategy,
    reason: String,
    recipient: [u8; 32],
    entry: Entry,
    /// The inode of the workload's own network namespace, which stays behind.
    external_net: Option<u64>,
    lab_ip: Option<String>,
    phases: Vec<PhaseTime>,
    bytes: u64,
    frozen_at: Option<Instant>,
    /// Post-copy: the target confirmed the commit (at this instant) before the pages moved.
    committed_at: Option<Instant>,
    port_down: bool,
    running: Option<i32>,
    /// The container the target restored (`KIND:NAME`).
    running_container: Option<String>,
}

impl Run<'_> {
    fn write_journal(&self) -> Result<(), MigrateError> {
        self.node.journal.write(&self.entry)
    }

    fn external(&self) -> Vec<String> {
        self.external_net.map(|ino| format!("net[{ino}]:{NETNS_KEY}")).into_iter().collect()
    }

    /// Pre-copy: a checkpoint taken while the workload runs crosses first.
    fn precopy(&mut self) -> Result<(), MigrateError> {
        let t = Instant::now();
        (self.events)(Event::Phase("pre-copy: checkpoint while running".into()));
        let name = format!("{}-pre", self.entry.migration);
        self.entry.checkpoints.push(name.clone());
        self.write_journal()?;
        let req = CheckpointRequest {
            workload: self.workload.clone(),
            name: Some(name.clone()),
            leave_running: true,
            tcp_established: true,
            keep: None,
            external: self.external(),
            lazy_pages: None,
            log_level: Some(ferry_criu::LogLevel::Info),
            volatile: true,
        };
        let report = ferry_runtime::checkpoint(&self.node.ctx, &req)?;
        self.entry.packs.extend(report.packs);
        (self.events)(Event::Phase("pre-copy: transfer".into()));
        let checkpoint = self.node.ctx.store.get(&name)?;
        let shipped = ship::send(
            &self.node.ctx.store,
            &mut self.ch,
            &checkpoint,
            &self.recipient,
            "pre-copy",
            self.events,
        )?;
        self.bytes += shipped.bytes;
        self.phases.push(PhaseTime { name: "pre-copy".into(), seconds: t.elapsed().as_secs_f64() });
        Ok(())
    }

    /// The Transfer phase and everything after it, which happens while CRIU holds the frozen
    /// tree at post-dump (`AtPostDump`).
    fn freeze(&mut self) -> Ended {
        let migration = self.entry.migration.clone();
        self.entry.phase = Phase::Transfer;
        self.entry.checkpoints.push(migration.clone());
        self.entry.held = holder::available().then(|| holder::plan(&migration, self.entry.pid));
        if self.entry.held.is_none() {
            tracing::warn!("no cgroup v1 freezer: a source agent that dies while the target restores lets CRIU resume the workload");
        }
        if let Err(e) = self.write_journal() {
            return Ended::Undone(e);
        }
        let lazy = self.strategy == Strategy::PostCopy;
        let port = if lazy {
            match crate::lazy::pick_port() {
                Ok(p) => Some(p),
                Err(e) => return Ended::Undone(MigrateError::protocol(e.to_string())),
            }
        } else {
            None
        };
        let req = CheckpointRequest {
            workload: self.workload.clone(),
            name: Some(migration.clone()),
            leave_running: false,
            tcp_established: true,
            keep: None,
            external: self.external(),
            lazy_pages: port,
            // The workload is frozen while CRIU writes its log: no line per page-pipe entry.
            log_level: Some(ferry_criu::LogLevel::Info),
            // Its packs' fsync (0.3-0.5 s per GiB here) would be downtime that buys nothing.
            volatile: true,
        };
        // Stop-copy and pre-copy: what the dump seals goes to the target at once, on a
        // connection of its own. Post-copy dumps hardly any pages: nothing worth streaming.
        // FERRY_STREAM=off in the agent's environment turns it off (to measure what it buys).
        let stream = !lazy && std::env::var("FERRY_STREAM").map_or(true, |v| v != "off");
        let (tap, streamer) = if stream { self.start_stream(&migration) } else { (None, None) };
        (self.events)(Event::Phase("freeze and dump".into()));
        self.frozen_at = Some(Instant::now());
        let ctx = &self.node.ctx;
        let mut hooks = AtPostDump {
            run: self,
            finisher: port.map(|p| PageServerFinisher::new(p, RecordingNotify::default())),
            tap,
            streamer,
            hold: None,
            ended: None,
            logical: 0,
        };
        let result = ferry_runtime::checkpoint_with(ctx, &req, &mut hooks);
        // A dump that failed before post-dump: let the stream end before the abort, so that
        // the target has stored (and can release) what it got.
        hooks.finish_stream();
        if let Some(f) = hooks.finisher.as_mut() {
            match f.finish() {
                Ok(r) => tracing::debug!(exposed = ?r.exposed, "CRIU's lazy page server closed"),
                Err(e) => tracing::warn!(error = %e, "CRIU's lazy page server"),
            }
        }
        let (ended, logical) = (hooks.ended.take(), hooks.logical);
        if let Some(h) = hooks.hold.take() {
            // Post-dump never came to where it is joined: whatever it held is let go in undo.
            let _ = h.join();
        }
        if !matches!(ended, Some(Ended::Held { .. })) {
            self.node.stop_serving_pages_of(&migration);
        }
        match (ended, result) {
            (None, Ok(report)) => Ended::Moved { logical: report.logical_bytes },
            (None, Err(e)) => Ended::Undone(e.into()),
            (Some(Ended::Moved { .. }), Err(e)) => {
                // The tree was killed before CRIU was answered; what failed after is CRIU's.
                tracing::warn!(error = %e, "CRIU failed after the switch (the workload runs on the target)");
                Ended::Moved { logical }
            }
            (Some(Ended::Moved { .. }), Ok(report)) => Ended::Moved { logical: report.logical_bytes },
            (Some(other), _) => other,
        }
    }

    /// Opens the chunk stream to the target; without one (it could not connect) the chunks
    /// all go after the dump, as the offer asks for them.
    fn start_stream(&mut self, migration: &str) -> (Option<Tap>, Option<ship::Streamer>) {
        let opened = self.node.connect(&self.ch.node).and_then(|ch| {
            let (tap, frames) = Tap::new(STREAM_QUEUE);
            ship::Streamer::start(ch, migration.to_owned(), frames).map(|s| (tap, s))
        });
        match opened {
            Ok((tap, streamer)) => (Some(tap), Some(streamer)),
            Err(e) => {
                tracing::warn!(error = %e, "no chunk stream: the chunks follow the dump");
                (None, None)
            }
        }
    }

    /// At post-dump, the checkpoint committed: the rest of the migration. Before the switch
    /// an error resumes the source's copy; after it, nothing does on its own.
    fn after_dump(&mut self, committed: &Committed, hold: Option<JoinHandle<HoldResult>>) -> Ended {
        // Transfer: what the target lacks crosses.
        if let Err(e) = self.transfer(committed) {
            return Ended::Undone(e);
        }
        // The frozen tree into ferry's freezer before the target may run its copy: from here
        // on neither CRIU (on a failure, or when this agent dies) nor anyone else can resume it.
        if let Some(h) = hold {
            match h.join() {
                Ok(Ok(pids)) => {
                    if let Some(held) = self.entry.held.as_mut() {
                        held.pids = pids;
                    }
                }
                Ok(Err(e)) => return Ended::Undone(e),
                Err(_) => return Ended::Undone(MigrateError::protocol("the holder thread panicked")),
            }
        }
        failpoint::check("source-before-switch");
        if let Err(e) = self.switch() {
            match self.switched_after_all(&e) {
                Some(true) => {
                    tracing::warn!(error = %e, "the control connection failed, but the target switched: going on");
                    self.ch_ok = false;
                }
                Some(false) => return Ended::Undone(e),
                None => {
                    return Ended::Held {
                        reason: format!(
                            "{} cannot be reached to say whether its copy runs ({}): the source's copy stays frozen here until it can",
                            self.entry.peer,
                            crate::chain(&e)
                        ),
                        at: "switching".into(),
                    }
                }
            }
        }
        // Switched: the target's copy is the workload.
        self.entry.phase = Phase::Switched;
        if self.strategy != Strategy::PostCopy {
            if let Err(e) = self.write_journal() {
                // The journal still says Switching: a restart asks the target, which says Switched.
                tracing::error!(error = %e, "could not journal the switch");
            }
            failpoint::check("source-after-commit");
            // The held tree dies just before CRIU is answered (`AtPostDump::before_kill`).
            return Ended::Moved { logical: committed.checkpoint.logical_size() };
        }
        self.commit_post_copy();
        failpoint::check("source-after-commit");
        let verdict = self.pages();
        self.conclude(verdict, committed.checkpoint.logical_size())
    }

    /// Transfer: ships what the target lacks (after the chunk stream's end).
    fn transfer(&mut self, committed: &Committed) -> Result<(), MigrateError> {
        self.entry.packs.extend(committed.packs.iter().copied());
        if let (Some(lab), Some(id)) = (&self.node.config.lab, self.entry.lab_workload) {
            ferry_lab::set_port(lab, id, false)?;
            self.port_down = true;
        }
        if failpoint::check("source-before-transfer") == Some(failpoint::Action::Cut) {
            return Err(MigrateError::Lost {
                node: self.ch.node.clone(),
                phase: "transfer (failpoint)".into(),
            });
        }
        let t = Instant::now();
        (self.events)(Event::Phase("transfer".into()));
        let shipped = ship::send(
            &self.node.ctx.store,
            &mut self.ch,
            &committed.checkpoint,
            &self.recipient,
            "transfer",
            self.events,
        )?;
        self.bytes += shipped.bytes;
        self.phases.push(PhaseTime { name: "transfer".into(), seconds: t.elapsed().as_secs_f64() });
        Ok(())
    }

    /// Switching: asks the target to restore; journals that the target may switch (while the
    /// target materializes and restores: the target waits for `SwitchRecorded` before its copy
    /// runs, so the write costs the freeze nothing); the target's `Running` says it switched.
    fn switch(&mut self) -> Result<(), MigrateError> {
        let t = Instant::now();
        (self.events)(Event::Phase("restore on the target".into()));
        let restore = Msg::Restore {
            name: self.entry.migration.clone(),
            tcp_established: true,
            lazy: self.strategy == Strategy::PostCopy,
            external_net: self.external_net.is_some(),
        };
        self.ch.send(&restore)?;
        self.entry.phase = Phase::Switching;
        if let Err(e) = self.write_journal() {
            // The target must not switch: it fails its restore on anything but our word.
            let _ = self.ch.send(&Msg::Abort { reason: format!("the source cannot journal: {e}") });
            return Err(e);
        }
        self.ch.send(&Msg::SwitchRecorded)?;
        match self.ch.recv("restore")? {
            Msg::Running { pid, container, .. } => {
                self.running = Some(pid);
                self.running_container = container;
            }
            other => return Err(unexpected("restore", &other)),
        }
        self.phases.push(PhaseTime { name: "restore".into(), seconds: t.elapsed().as_secs_f64() });
        failpoint::check("source-before-commit");
        Ok(())
    }

    /// The control connection failed while the target restored: did it switch? Its journal
    /// says (it records the switch before its copy runs, and keeps the record): `Some(true)`
    /// it did, `Some(false)` it never did (no record: it undid its arrival), `None` it could
    /// not be reached within the recover timeout.
    fn switched_after_all(&mut self, e: &MigrateError) -> Option<bool> {
        tracing::warn!(error = %e, "the restore on the target failed or was cut: asking it whether it switched");
        let deadline = Instant::now() + self.entry.recover_timeout();
        loop {
            match self.node.arrival_status(&self.entry) {
                Ok((None, _)) => return Some(false),
                Ok((Some(p), _)) if p.past_switch() => return Some(true),
                // Still restoring: it decides soon.
                Ok((Some(_), _)) => {}
                Err(e) => tracing::debug!(error = %e, "the target cannot be asked yet"),
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(ASK_EVERY);
        }
    }

    /// Post-copy, switched: the target records the workload as its own and starts pulling its
    /// memory (its network is up since the switch: the downtime ends at its answer).
    fn commit_post_copy(&mut self) {
        let sent = self.ch_ok && self.ch.send(&Msg::Commit).is_ok();
        // The journal write overlaps the target's work.
        if let Err(e) = self.write_journal() {
            tracing::error!(error = %e, "could not journal the switch (the journal says Switching: a restart asks the target)");
        }
        if !sent {
            self.ch_ok = false;
            return;
        }
        match self.ch.recv("commit") {
            Ok(Msg::Committed) => self.committed_at = Some(Instant::now()),
            Ok(other) => {
                tracing::warn!(error = %unexpected("commit", &other), "going on without the control connection");
                self.ch_ok = false;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the target did not confirm the commit; going on without the control connection");
                self.ch_ok = false;
            }
        }
    }

    /// Switched, post-copy: the target pulls the memory from the held tree (pages served by
    /// `pages` on connections of their own) and reports on the control connection; without
    /// it, the target is asked how it stands until it says, or until it has been silent past
    /// the recover timeout.
    fn pages(&mut self) -> Verdict {
        let t = Instant::now();
        (self.events)(Event::Phase("post-copy: pages".into()));
        let migration = self.entry.migration.clone();
        let source = self.node.page_source(&migration);
        let total = source.as_ref().map(|s| s.lazy_bytes());
        if self.ch_ok {
            // The target reports every PROGRESS_EVERY: a longer silence is a cut link (or a
            // dead agent), noticed in seconds rather than after the peer timeout.
            let silence = (crate::target::PROGRESS_EVERY * 3).min(self.node.config.peer_timeout);
            self.ch.set_read_timeout(silence);
            loop {
                match self.ch.recv("post-copy pages") {
                    Ok(Msg::PagesProgress { bytes }) => {
                        (self.events)(Event::Progress(Progress {
                            phase: "post-copy pages".into(),
                            done: bytes,
                            total: total.unwrap_or(bytes),
                        }));
                    }
                    Ok(Msg::PagesDone { bytes, requests }) => {
                        tracing::info!(bytes, requests, "the target has every page");
                        self.bytes += bytes;
                        self.phases
                            .push(PhaseTime { name: "pages".into(), seconds: t.elapsed().as_secs_f64() });
                        return Verdict::Done;
                    }
                    Ok(Msg::PagesLost { at, reason }) => return Verdict::Lost { at, reason },
                    Ok(other) => {
                        tracing::warn!(error = %unexpected("post-copy pages", &other), "ignoring the control connection");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, peer = %self.entry.peer, "the control connection is gone during the pages phase: the target's faulting threads wait while it reconnects");
                        break;
                    }
                }
            }
            self.ch_ok = false;
        }
        (self.events)(Event::Phase(format!("post-copy: pages (reconnecting with {})", self.entry.peer)));
        let verdict = await_verdict(self.node, &self.entry, source.as_deref());
        if let (Verdict::Done, Some(s)) = (&verdict, &source) {
            self.bytes += s.bytes_served();
        }
        self.phases.push(PhaseTime { name: "pages".into(), seconds: t.elapsed().as_secs_f64() });
        verdict
    }

    /// Acts on the target's verdict: the journal first, then the held tree killed (done, or
    /// lost), resumed after CRIU lets it go (lost, with `--on-failure=resume-source`), or kept
    /// frozen (the target silent, and resuming asked for: it may still run its copy).
    fn conclude(&mut self, verdict: Verdict, logical: u64) -> Ended {
        match verdict {
            Verdict::Done => {
                self.entry.phase = Phase::Done;
                if let Err(e) = self.write_journal() {
                    tracing::error!(error = %e, "could not journal the end of the pages phase");
                }
                Ended::Moved { logical }
            }
            Verdict::Lost { at, reason } => {
                let reason = format!("{} could not get every page and killed its copy: {reason}", self.entry.peer);
                self.lost_after_switch(reason, at)
            }
            Verdict::Unreachable { reason } if self.entry.on_failure == OnFailure::ResumeSource => {
                Ended::Held { reason: format!("{reason}; the source's copy stays frozen here until {} says whether its copy still runs (then it is resumed or dropped)", self.entry.peer), at: "post-copy pages".into() }
            }
            Verdict::Unreachable { reason } => {
                let reason = format!(
                    "{reason}: unless it had every page by then (the workload then runs there), it has killed its copy"
                );
                self.lost_after_switch(reason, "post-copy pages".into())
            }
        }
    }

    fn lost_after_switch(&mut self, reason: String, at: String) -> Ended {
        tracing::error!(migration = %self.entry.migration, %at, %reason, "THE WORKLOAD WAS LOST after the switch");
        self.entry.phase = Phase::Lost;
        self.entry.lost = Some(format!("{at}: {reason}"));
        if let Err(e) = self.write_journal() {
            tracing::error!(error = %e, "could not journal the loss");
        }
        if self.entry.on_failure == OnFailure::ResumeSource && self.entry.held.is_some() {
            // Answered with an error, CRIU unlocks the connections and lets the tree go (into
            // the freezer); `lost` then takes it out.
            return Ended::Lost { reason, at, resumed: true };
        }
        Ended::Lost { reason, at, resumed: false }
    }

    /// Moved: the report; the source's leftovers go.
    fn finish(mut self, logical: u64, started: Instant) -> Result<Report, MigrateError> {
        let migration = self.entry.migration.clone();
        let downtime = match (self.committed_at, self.frozen_at) {
            // Post-copy committed before the pages moved: the downtime ended there.
            (Some(c), Some(f)) => c.duration_since(f).as_secs_f64(),
            _ => {
                let t_commit = Instant::now();
                let committed = if self.ch_ok {
                    self.ch.call(&Msg::Commit, "commit")
                } else {
                    Err(lost(&self.entry.peer, "commit"))
                };
                let downtime = self.frozen_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
                match committed {
                    Ok(Msg::Committed) => {}
                    other => {
                        // The target switched and keeps its record until told to forget it.
                        let e = match other {
                            Ok(m) => unexpected("commit", &m),
                            Err(e) => e,
                        };
                        tracing::error!(%migration, error = %e, "the target did not confirm the commit; it runs the workload and is told later");
                        self.leave(false);
                        forget_later(self.node.clone(), self.entry.peer.clone(), migration);
                        return Err(e);
                    }
                }
                self.phases
                    .push(PhaseTime { name: "commit".into(), seconds: t_commit.elapsed().as_secs_f64() });
                downtime
            }
        };
        let told = self.strategy != Strategy::PostCopy || (self.ch_ok && self.forget_on_control());
        self.leave(false);
        if !told {
            forget_later(self.node.clone(), self.entry.peer.clone(), migration.clone());
        }
        Ok(Report {
            migration,
            workload: self.req.workload.clone(),
            from: self.node.config.name.clone(),
            to: self.req.to.clone(),
            strategy: self.strategy,
            reason: self.reason.clone(),
            phases: std::mem::take(&mut self.phases),
            bytes_sent: self.bytes,
            logical_bytes: logical,
            downtime_s: downtime,
            total_s: started.elapsed().as_secs_f64(),
            new_workload: self
                .running_container
                .take()
                .unwrap_or_else(|| format!("pid:{}", self.running.unwrap_or(0))),
            ip: self.lab_ip.clone(),
        })
    }

    /// `Forget` on the control connection; false if it could not be said there.
    fn forget_on_control(&mut self) -> bool {
        let forget = Msg::Forget { migration: self.entry.migration.clone() };
        matches!(self.ch.call(&forget, "forget"), Ok(Msg::Forgotten))
    }

    /// The source's part of a migration past the switch is over: the held tree's cgroup, the
    /// old namespace (its port down since the transfer) and record, the checkpoints, the
    /// journal entry. With `resumed` the source's copy runs again instead, with its address.
    fn leave(&mut self, resumed: bool) {
        if let Some(held) = &self.entry.held {
            let done = if resumed { holder::release(held) } else { holder::kill(held) };
            if let Err(e) = done {
                tracing::error!(error = %e, "the holder");
            }
        }
        if let (Some(lab), Some(id)) = (&self.node.config.lab, self.entry.lab_workload) {
            if resumed {
                let _ = ferry_lab::set_port(lab, id, true);
            } else {
                let _ = ferry_lab::remove_workload(lab, id);
            }
        }
        self.node.cleanup(&self.entry);
        self.node.journal.remove(&self.entry.migration);
    }

    /// Failed before the switch: the source's copy runs again (CRIU resumed it; the holder, if
    /// it got it, lets it go), the target undoes its arrival, the address comes back.
    fn undo(&mut self) {
        if let Some(held) = &self.entry.held {
            if let Err(e) = holder::release(held) {
                tracing::error!(error = %e, "could not let the held tree go");
            }
        }
        if self.ch_ok {
            let _ = self.ch.send(&Msg::Abort { reason: "the source gave up".into() });
        }
        if self.port_down {
            if let (Some(lab), Some(id)) = (&self.node.config.lab, self.entry.lab_workload) {
                let _ = ferry_lab::set_port(lab, id, true);
            }
        }
        self.node.cleanup(&self.entry);
        self.node.journal.remove(&self.entry.migration);
    }

    /// Lost after the switch: the target's copy is gone; the source's either (killed) or runs
    /// again (resumed). The target is told it may forget the migration.
    fn lost(&mut self, resumed: bool) {
        if !(self.ch_ok && self.forget_on_control()) {
            forget_later(self.node.clone(), self.entry.peer.clone(), self.entry.migration.clone());
        }
        self.leave(resumed);
    }
}

/// The result of the holder's thread: the processes it froze.
type HoldResult = Result<Vec<(i32, u64)>, MigrateError>;

fn lost(node: &str, phase: &str) -> MigrateError {
    MigrateError::Lost { node: node.to_owned(), phase: phase.to_owned() }
}

/// Batches (about 1 MiB each) of sealed frames that may wait for the chunk stream; when the
/// link is slower than the dump, those beyond it go after the dump instead.
const STREAM_QUEUE: usize = 64;

/// What runs while CRIU holds the frozen tree at post-dump.
struct AtPostDump<'r, 'a> {
    run: &'r mut Run<'a>,
    /// Post-copy: ends CRIU's own lazy page server (ferry served the pages).
    finisher: Option<PageServerFinisher<RecordingNotify>>,
    /// The chunk stream's end of the pipeline, handed over when CRIU starts.
    tap: Option<Tap>,
    streamer: Option<ship::Streamer>,
    /// The holder's thread, started at post-dump, joined before the switch.
    hold: Option<JoinHandle<HoldResult>>,
    /// How it ended, decided at post-dump.
    ended: Option<Ended>,
    /// The checkpoint's logical size.
    logical: u64,
}

impl AtPostDump<'_, '_> {
    /// Waits for the chunk stream to end (the pipeline has finished: nothing more comes).
    fn finish_stream(&mut self) {
        self.tap = None;
        let Some(streamer) = self.streamer.take() else { return };
        let t = Instant::now();
        match streamer.finish() {
            Ok(s) => {
                tracing::info!(chunks = s.chunks, bytes = s.bytes, "streamed during the dump");
                self.run.bytes += s.bytes;
            }
            // Not fatal: what the target lacks still follows through the offer.
            Err(e) => tracing::warn!(error = %e, "the chunk stream failed; the offer sends the rest"),
        }
        self.run.phases.push(PhaseTime { name: "stream".into(), seconds: t.elapsed().as_secs_f64() });
    }
}

impl PostDump for AtPostDump<'_, '_> {
    fn before_commit(&mut self, images: &Path) -> Result<(), String> {
        // The frozen tree's pages are served from here until the target has them all. Opened
        // before the hold: it checks that CRIU stops every task (state `t`), and a task the
        // freezer has taken reads as `D`.
        let source = match self.finisher {
            Some(_) => Some(PageSource::open(images, self.run.entry.pid).map_err(|e| e.to_string())?),
            None => None,
        };
        // The tree goes into the holder while the checkpoint crosses.
        if let Some(held) = self.run.entry.held.clone() {
            let root = self.run.entry.pid;
            let spawned = std::thread::Builder::new()
                .name("ferry-hold".into())
                .spawn(move || holder::hold(&held, root))
                .map_err(|e| e.to_string())?;
            self.hold = Some(spawned);
        }
        if let Some(source) = source {
            self.run.node.serve_pages_of(&self.run.entry.migration, Arc::new(source));
        }
        Ok(())
    }

    fn notify(&mut self, event: &ferry_criu::Notify, pid: Option<i32>) -> Result<(), String> {
        if *event == ferry_criu::Notify::NetworkLock {
            // CRIU has just frozen the tree and is locking its network: the downtime starts
            // here (the time before went to starting CRIU, which the workload did not notice).
            self.run.frozen_at = Some(Instant::now());
        }
        match self.finisher.as_mut() {
            Some(f) => f.notify(event, pid),
            None => Ok(()),
        }
    }

    fn tap(&mut self) -> Option<Tap> {
        self.tap.take()
    }

    fn before_kill(&mut self) {
        // Moved, or lost without resuming: the held tree dies while CRIU still holds it
        // (SIGKILL while frozen, then thawed); CRIU reaps it when answered.
        if let Some(held) = &self.run.entry.held {
            if let Err(e) = holder::doom(held) {
                tracing::error!(error = %e, "could not kill the held tree");
            }
        }
    }

    fn after_commit(&mut self, committed: &Committed) -> Result<(), String> {
        let dumped = self.run.frozen_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
        self.run.phases.push(PhaseTime { name: "dump".into(), seconds: dumped });
        self.finish_stream();
        self.logical = committed.checkpoint.logical_size();
        let hold = self.hold.take();
        let ended = self.run.after_dump(committed, hold);
        // CRIU's answer: success lets it kill the tree (dead already, when held); an error
        // resumes it, which the freezer keeps from running where it must not.
        let answer = match &ended {
            Ended::Moved { .. } | Ended::Lost { resumed: false, .. } => Ok(()),
            Ended::Undone(e) => Err(e.to_string()),
            Ended::Lost { resumed: true, reason, .. } => Err(format!("resuming the source: {reason}")),
            Ended::Held { reason, .. } => Err(format!("holding the source: {reason}")),
        };
        self.ended = Some(ended);
        answer
    }
}

/// The inode of `pid`'s network namespace if it is not this agent's (it then stays behind
/// and the target provides one with the same address).
fn own_netns(pid: i32) -> Option<u64> {
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok()?;
    let ours = std::fs::metadata("/proc/self/ns/net").ok()?;
    (theirs.ino() != ours.ino() || theirs.dev() != ours.dev()).then_some(theirs.ino())
}

/// Resident memory of the tree rooted at `root`, in bytes.
pub(crate) fn tree_rss(root: i32) -> u64 {
    holder::tree_of(root)
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .sum::<u64>()
        * 1024
}

/// Bytes per second to the target: 4 MiB echoed over the control channel.
pub(crate) fn probe_link(ch: &mut Channel) -> Result<f64, MigrateError> {
    let data = vec![0x5au8; 4 << 20];
    let t = Instant::now();
    ferry_wire::frame::write_frame(&mut ch.conn, crate::proto::KIND_PROBE, &data)?;
    match ch.recv("link probe")? {
        Msg::ProbeAck { len } => Ok(len as f64 / t.elapsed().as_secs_f64().max(1e-6)),
        other => Err(unexpected("link probe", &other)),
    }
}

fn unix_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

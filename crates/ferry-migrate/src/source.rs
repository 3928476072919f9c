//! The source side of a migration: choose the strategy, ship a running checkpoint first
//! (pre-copy), freeze and dump; while CRIU waits at post-dump, ship what the target lacks and
//! have it restore; only when the target runs the workload is the source's copy let go.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use ferry_criu::{NotifyHandler, RecordingNotify};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ferry_runtime::{CheckpointRequest, PostDump, WorkloadId};
use ferry_store::pipeline::Tap;
use ferry_store::Committed;

use crate::agent::{unexpected, Agent, Channel};
use crate::api::{Event, MigrateRequest, PhaseTime, Progress, Report, Strategy};
use crate::journal::{Entry, Stage};
use crate::lazy::{PageServerFinisher, PageSource};
use crate::proto::Msg;
use crate::{auto, failpoint, ship, MigrateError};

/// Key under which the workload's network namespace is declared external to CRIU.
pub(crate) const NETNS_KEY: &str = "ferry-net";

pub(crate) fn migrate(
    agent: &Agent,
    req: &MigrateRequest,
    events: &mut dyn FnMut(Event),
) -> Result<Report, MigrateError> {
    let started = Instant::now();
    let workload: WorkloadId = req.workload.parse()?;
    // A container's tree is its init process's; its own namespaces (runc's keys) are declared
    // external by the checkpoint itself.
    let (pid, container, record) = match &workload {
        WorkloadId::Pid(pid) => (*pid, None, None),
        WorkloadId::Container { kind, id } => {
            let c = ferry_runtime::container::open(kind, &agent.ctx.endpoints)?.inspect(id)?;
            let record = serde_json::to_vec(&c.record).map_err(|e| MigrateError::protocol(e.to_string()))?;
            (c.plan.init_pid, Some(c.record.workload()), Some(record))
        }
    };
    if !ferry_sys::process_exists(pid) {
        return Err(ferry_runtime::Error::ProcessNotFound { pid }.into());
    }
    if req.to == agent.config.name {
        return Err(MigrateError::Refused(format!("{} already runs on {}", req.workload, req.to)));
    }
    let lab_workload = match &agent.config.lab {
        Some(lab) => ferry_lab::workload_by_pid(lab, pid)?,
        None => None,
    };
    let external_net = if container.is_some() { None } else { own_netns(pid) };
    let memory = tree_rss(pid);
    let migration = format!("mig-{}-{pid}", unix_ms());

    events(Event::Phase(format!("connecting to {}", req.to)));
    let mut ch = agent.connect(&req.to)?;
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
    tracing::info!(%migration, pid, to = %req.to, %strategy, %reason, "migrating");
    let prepare = Msg::Prepare {
        migration: migration.clone(),
        workload: req.workload.clone(),
        ip: lab_workload.as_ref().map(|w| w.ip),
        lab_workload: lab_workload.as_ref().map(|w| w.id),
        neighbours: match (&agent.config.lab, &lab_workload) {
            (Some(lab), Some(w)) => ferry_lab::neighbours(lab, w.id).unwrap_or_default(),
            _ => Vec::new(),
        },
        strategy,
        container: record,
    };
    let recipient = match ch.call(&prepare, "prepare")? {
        Msg::Prepared { x25519 } => x25519,
        other => return Err(unexpected("prepare", &other)),
    };
    let trusted =
        ferry_store::keys::recipients(&agent.ctx.store.keys_dir()).map_err(ferry_store::StoreError::from)?;
    if !trusted.iter().any(|(_, p)| p.x25519 == recipient) {
        return Err(MigrateError::Refused(format!(
            "node {}'s key is not trusted here: `ferry node trust {} KEY` (its `ferry keys show`)",
            req.to, req.to
        )));
    }

    let mut entry = Entry {
        migration: migration.clone(),
        stage: Stage::Frozen,
        peer: req.to.clone(),
        pid,
        start_time: ferry_lab::start_time(pid).unwrap_or(0),
        lab_workload: lab_workload.as_ref().map(|w| w.id),
        checkpoints: Vec::new(),
        packs: Vec::new(),
        container: container.clone(),
    };
    let mut run = Run {
        agent,
        ch: &mut ch,
        events,
        recipient,
        entry: &mut entry,
        phases: Vec::new(),
        bytes: 0,
        frozen_at: None,
        port_down: false,
        running: None,
        running_container: None,
        committed_at: None,
        pid,
    };
    let result = run.go(&workload, strategy, external_net);
    let phases = std::mem::take(&mut run.phases);
    let bytes = run.bytes;
    let frozen_at = run.frozen_at;
    let new_pid = run.running;
    let new_container = run.running_container.take();
    let port_down = run.port_down;
    let committed_at = run.committed_at;
    drop(run);
    let logical = match result {
        Ok(l) => l,
        Err(e) => {
            // CRIU resumed the workload (or never stopped it): undo the rest.
            let _ = ch.send(&Msg::Abort { reason: e.to_string() });
            if port_down {
                if let (Some(lab), Some(id)) = (&agent.config.lab, entry.lab_workload) {
                    let _ = ferry_lab::set_port(lab, id, true);
                }
            }
            cleanup(agent, &entry);
            agent.journal.remove(&migration);
            return Err(e);
        }
    };
    let mut phases = phases;
    let downtime = match (committed_at, frozen_at) {
        // Post-copy committed before the pages moved: the downtime ended there.
        (Some(c), Some(f)) => c.duration_since(f).as_secs_f64(),
        _ => {
            // The source tree is gone; the target holds the workload with its network down.
            let t_commit = Instant::now();
            let committed = ch.call(&Msg::Commit, "commit");
            let downtime = frozen_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
            if let Err(e) = committed {
                // The journal says committed: the target learns it when it asks (`Outcome`).
                tracing::error!(%migration, error = %e, "the target did not confirm the commit; it will ask again");
                return Err(e);
            }
            phases.push(PhaseTime { name: "commit".into(), seconds: t_commit.elapsed().as_secs_f64() });
            downtime
        }
    };
    if let (Some(lab), Some(id)) = (&agent.config.lab, entry.lab_workload) {
        let _ = ferry_lab::remove_workload(lab, id);
    }
    cleanup(agent, &entry);
    agent.journal.remove(&migration);
    let total = started.elapsed().as_secs_f64();
    Ok(Report {
        migration,
        workload: req.workload.clone(),
        from: agent.config.name.clone(),
        to: req.to.clone(),
        strategy,
        reason,
        phases,
        bytes_sent: bytes,
        logical_bytes: logical,
        downtime_s: downtime,
        total_s: total,
        new_workload: new_container.unwrap_or_else(|| format!("pid:{}", new_pid.unwrap_or(0))),
        ip: lab_workload.map(|w| w.ip.to_string()),
    })
}

/// Removes the checkpoints made for the migration from this node's store, and the packs
/// written for them.
pub(crate) fn cleanup(agent: &Agent, entry: &Entry) {
    for name in &entry.checkpoints {
        if let Err(e) = ferry_runtime::remove(&agent.ctx.store, name, false) {
            tracing::debug!(%name, error = %e, "could not remove a migration checkpoint");
        }
    }
    match agent.ctx.store.release_packs(&entry.packs) {
        Ok(freed) => tracing::debug!(freed, "released the migration's packs"),
        Err(e) => tracing::warn!(error = %e, "could not release the migration's packs (`ferry gc` will)"),
    }
}

/// Has the runtime of container `workload` (`KIND:NAME`) kill and forget it.
pub(crate) fn discard_container(agent: &Agent, workload: &str) {
    let Some((kind, name)) = workload.split_once(':') else { return };
    match ferry_runtime::container::open(kind, &agent.ctx.endpoints) {
        Ok(rt) => rt.discard(name),
        Err(e) => tracing::warn!(%workload, error = %e, "cannot remove the container"),
    }
}

/// A migration under way on the source.
struct Run<'a> {
    agent: &'a Agent,
    ch: &'a mut Channel,
    events: &'a mut dyn FnMut(Event),
    recipient: [u8; 32],
    entry: &'a mut Entry,
    phases: Vec<PhaseTime>,
    bytes: u64,
    frozen_at: Option<Instant>,
    port_down: bool,
    running: Option<i32>,
    /// The container the target restored (`KIND:NAME`).
    running_container: Option<String>,
    /// Post-copy: the target confirmed the commit (at this instant) before the pages moved.
    committed_at: Option<Instant>,
    /// Host pid of the tree's root.
    pid: i32,
}

impl Run<'_> {
    /// Returns the logical size of the final checkpoint.
    fn go(
        &mut self,
        workload: &WorkloadId,
        strategy: Strategy,
        external_net: Option<u64>,
    ) -> Result<u64, MigrateError> {
        let migration = self.entry.migration.clone();
        let external: Vec<String> =
            external_net.map(|ino| format!("net[{ino}]:{NETNS_KEY}")).into_iter().collect();
        if strategy == Strategy::PreCopy {
            let t = Instant::now();
            (self.events)(Event::Phase("pre-copy: checkpoint while running".into()));
            let name = format!("{migration}-pre");
            self.entry.checkpoints.push(name.clone());
            self.agent.journal.write(self.entry)?;
            let req = CheckpointRequest {
                workload: workload.clone(),
                name: Some(name.clone()),
                leave_running: true,
                tcp_established: true,
                keep: None,
                external: external.clone(),
                lazy_pages: None,
                log_level: Some(ferry_criu::LogLevel::Info),
            };
            let report = ferry_runtime::checkpoint(&self.agent.ctx, &req)?;
            self.entry.packs.extend(report.packs);
            (self.events)(Event::Phase("pre-copy: transfer".into()));
            let shipped =
                ship::send(&self.agent.ctx.store, self.ch, &name, &self.recipient, "pre-copy", self.events)?;
            self.bytes += shipped.bytes;
            self.phases.push(PhaseTime { name: "pre-copy".into(), seconds: t.elapsed().as_secs_f64() });
        }
        self.entry.checkpoints.push(migration.clone());
        self.agent.journal.write(self.entry)?;
        let req = CheckpointRequest {
            workload: workload.clone(),
            name: Some(migration.clone()),
            leave_running: false,
            tcp_established: true,
            keep: None,
            external,
            lazy_pages: None,
            // The workload is frozen while CRIU writes its log: no line per page-pipe entry.
            log_level: Some(ferry_criu::LogLevel::Info),
        };
        let lazy = strategy == Strategy::PostCopy;
        let port = if lazy {
            Some(crate::lazy::pick_port().map_err(|e| MigrateError::protocol(e.to_string()))?)
        } else {
            None
        };
        let req = CheckpointRequest { lazy_pages: port, ..req };
        // Stop-copy and pre-copy: what the dump seals goes to the target at once, on a
        // connection of its own. Post-copy dumps hardly any pages: nothing worth streaming.
        // FERRY_STREAM=off in the agent's environment turns it off (to measure what it buys).
        let stream = !lazy && std::env::var("FERRY_STREAM").map_or(true, |v| v != "off");
        let (tap, streamer) = if stream { self.start_stream(&migration) } else { (None, None) };
        (self.events)(Event::Phase("freeze and dump".into()));
        self.frozen_at = Some(Instant::now());
        let finisher = port.map(|p| PageServerFinisher::new(p, RecordingNotify::default()));
        let mut switch = Switch {
            run: self,
            external_net: external_net.is_some(),
            error: None,
            finisher,
            pid: 0,
            tap,
            streamer,
        };
        switch.pid = switch.run.pid;
        let result = ferry_runtime::checkpoint_with(&switch.run.agent.ctx, &req, &mut switch);
        let hook_error = switch.error.take();
        // A dump that failed before post-dump: let the stream end before the abort, so that
        // the target has stored (and can release) what it got.
        switch.finish_stream();
        if let Ok(mut pages) = switch.run.agent.pages.lock() {
            pages.remove(&migration);
        }
        if let Some(f) = switch.finisher.as_mut() {
            match f.finish() {
                Ok(r) => tracing::debug!(exposed = ?r.exposed, "CRIU's lazy page server closed"),
                Err(e) => tracing::warn!(error = %e, "CRIU's lazy page server"),
            }
        }
        match (result, hook_error) {
            (Ok(report), _) => Ok(report.logical_bytes),
            (Err(_), Some(e)) => Err(e),
            (Err(e), None) => Err(e.into()),
        }
    }

    /// Opens the chunk stream to the target; without one (it could not connect) the chunks
    /// all go after the dump, as the offer asks for them.
    fn start_stream(&mut self, migration: &str) -> (Option<Tap>, Option<ship::Streamer>) {
        let opened = self.agent.connect(&self.ch.node).and_then(|ch| {
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
}

/// Batches (about 1 MiB each) of sealed frames that may wait for the chunk stream; when the
/// link is slower than the dump, those beyond it go after the dump instead.
const STREAM_QUEUE: usize = 64;

/// What runs while CRIU holds the frozen tree at post-dump.
struct Switch<'r, 'a> {
    run: &'r mut Run<'a>,
    external_net: bool,
    error: Option<MigrateError>,
    /// Post-copy: ends CRIU's own lazy page server (ferry served the pages).
    finisher: Option<PageServerFinisher<RecordingNotify>>,
    /// Host pid of the tree's root.
    pid: i32,
    /// The chunk stream's end of the pipeline, handed over when CRIU starts.
    tap: Option<Tap>,
    streamer: Option<ship::Streamer>,
}

impl Switch<'_, '_> {
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

    fn switch(&mut self, committed: &Committed) -> Result<(), MigrateError> {
        let dumped = self.run.frozen_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
        self.run.phases.push(PhaseTime { name: "dump".into(), seconds: dumped });
        self.finish_stream();
        let run = &mut *self.run;
        run.entry.packs.extend(committed.packs.iter().copied());
        if let (Some(lab), Some(id)) = (&run.agent.config.lab, run.entry.lab_workload) {
            ferry_lab::set_port(lab, id, false)?;
            run.port_down = true;
        }
        if failpoint::check("source-before-transfer") == Some(failpoint::Action::Cut) {
            return Err(MigrateError::Lost {
                node: run.ch.node.clone(),
                phase: "transfer (failpoint)".into(),
            });
        }
        let t = Instant::now();
        (run.events)(Event::Phase("transfer".into()));
        let name = committed.checkpoint.name().to_owned();
        let shipped =
            ship::send(&run.agent.ctx.store, run.ch, &name, &run.recipient, "transfer", run.events)?;
        run.bytes += shipped.bytes;
        run.phases.push(PhaseTime { name: "transfer".into(), seconds: t.elapsed().as_secs_f64() });
        let t = Instant::now();
        (run.events)(Event::Phase("restore on the target".into()));
        let lazy = self.finisher.is_some();
        let restore = Msg::Restore { name, tcp_established: true, lazy, external_net: self.external_net };
        match run.ch.call(&restore, "restore")? {
            Msg::Running { pid, container, .. } => {
                run.running = Some(pid);
                run.running_container = container;
            }
            other => return Err(unexpected("restore", &other)),
        }
        run.phases.push(PhaseTime { name: "restore".into(), seconds: t.elapsed().as_secs_f64() });
        failpoint::check("source-before-commit");
        if !lazy {
            // From here on the target's copy is the one to keep, even if this agent dies now.
            run.entry.stage = Stage::Committed;
            run.agent.journal.write(run.entry)?;
            failpoint::check("source-after-commit");
            return Ok(());
        }
        // Post-copy: the target runs the workload now, its memory still here (frozen). Its
        // network goes up at once; the pages follow on demand and in the background.
        match run.ch.call(&Msg::Commit, "commit")? {
            Msg::Committed => run.committed_at = Some(Instant::now()),
            other => return Err(unexpected("commit", &other)),
        }
        let t = Instant::now();
        (run.events)(Event::Phase("post-copy: pages".into()));
        let total =
            run.agent.pages.lock().ok().and_then(|p| p.get(&run.entry.migration).map(|s| s.lazy_bytes()));
        loop {
            match run.ch.recv("post-copy pages")? {
                Msg::PagesProgress { bytes } => {
                    let total = total.unwrap_or(bytes);
                    (run.events)(Event::Progress(Progress {
                        phase: "post-copy pages".into(),
                        done: bytes,
                        total,
                    }));
                }
                Msg::PagesDone { bytes, requests } => {
                    tracing::info!(bytes, requests, "the target has every page");
                    run.bytes += bytes;
                    break;
                }
                other => return Err(unexpected("post-copy pages", &other)),
            }
        }
        run.phases.push(PhaseTime { name: "pages".into(), seconds: t.elapsed().as_secs_f64() });
        run.entry.stage = Stage::Committed;
        run.agent.journal.write(run.entry)?;
        Ok(())
    }
}

impl PostDump for Switch<'_, '_> {
    fn before_commit(&mut self, images: &Path) -> Result<(), String> {
        if self.finisher.is_none() {
            return Ok(());
        }
        // The frozen tree's pages are served from here until the target has them all.
        let source = PageSource::open(images, self.pid).map_err(|e| e.to_string())?;
        let mut pages = self.run.agent.pages.lock().map_err(|_| "page registry poisoned".to_string())?;
        pages.insert(self.run.entry.migration.clone(), Arc::new(source));
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

    fn after_commit(&mut self, committed: &Committed) -> Result<(), String> {
        self.switch(committed).map_err(|e| {
            let text = e.to_string();
            self.error = Some(e);
            text
        })
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
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            let ppid =
                stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<i32>().ok());
            if let Some(ppid) = ppid {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree.iter()
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
fn probe_link(ch: &mut Channel) -> Result<f64, MigrateError> {
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

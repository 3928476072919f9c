//! The target side: take the checkpoint, give the workload a network namespace with its
//! address (its bridge port down), restore it there, and release its network only when the
//! source confirms it let go of its copy. Anything else undoes the arrival.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ferry_criu::{LogTarget, Notify, NotifyHandler, RestoreOptions, SharedOptions};

use ferry_runtime::container::ContainerRecord;
use ferry_sys::PrivateTmpfs;

use crate::agent::{unexpected, Agent, Channel, COMMIT_WAIT};
use crate::journal::{Entry, Stage};
use crate::lazy::{LazyPager, PageFeeder};
use crate::pages::RemotePages;
use crate::proto::{Msg, PROTOCOL};
use crate::source::NETNS_KEY;
use crate::{ship, MigrateError};

/// How long a post-copy target waits for all pages.
const PAGES_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);
/// How often a post-copy target tells the source how far the pages are.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

pub(crate) fn serve(agent: &Agent, mut ch: Channel) -> Result<(), MigrateError> {
    match ch.recv("hello")? {
        Msg::Hello { protocol, ed25519, x25519, .. } if protocol == PROTOCOL => {
            if let Err(e) = agent.learn_peer(&ch, ed25519, x25519) {
                let _ = ch.send(&Msg::Error { message: e.to_string() });
                return Err(e);
            }
            ch.send(&agent.hello())?;
        }
        Msg::Hello { protocol, .. } => {
            ch.send(&Msg::Error {
                message: format!("this node speaks migration protocol {PROTOCOL}, not {protocol}"),
            })?;
            return Ok(());
        }
        other => return Err(unexpected("hello", &other)),
    }
    let mut arrival: Option<Arrival> = None;
    loop {
        let msg = match ch.next("a migration") {
            Ok(Ok(m)) => m,
            Ok(Err(frame)) if frame.kind == crate::proto::KIND_PROBE => {
                ch.send(&Msg::ProbeAck { len: frame.payload.len() as u64 })?;
                continue;
            }
            Ok(Err(frame)) => {
                let e = MigrateError::protocol(format!("unexpected frame kind {:#x}", frame.kind));
                return fail(agent, &mut ch, arrival, e);
            }
            Err(e) => {
                if let Some(a) = arrival {
                    a.connection_lost(agent);
                }
                return match e {
                    MigrateError::Lost { .. } => Ok(()),
                    e => Err(e),
                };
            }
        };
        match msg {
            Msg::Prepare { migration, ip, lab_workload, neighbours, container, .. } => {
                if ferry_store::validate_name(&migration).is_err() {
                    return fail(agent, &mut ch, arrival, MigrateError::protocol("bad migration id"));
                }
                if let Some(record) = container {
                    if let Err(e) = preflight_container(agent, &record) {
                        return fail(agent, &mut ch, arrival, e);
                    }
                }
                let mut a = Arrival::new(&migration, &ch.node, ip);
                a.from = lab_workload;
                a.neighbours = neighbours;
                if let Err(e) = agent.journal.write(&a.entry) {
                    return fail(agent, &mut ch, Some(a), e);
                }
                if let (Some(lab), Some(ip)) = (agent.config.lab.clone(), ip) {
                    if let Err(e) = a.prepare_network(agent, &lab, ip) {
                        return fail(agent, &mut ch, Some(a), e);
                    }
                }
                arrival = Some(a);
                ch.send(&Msg::Prepared { x25519: agent.ctx.store.keys().public().x25519 })?;
            }
            Msg::Offer { name, manifest_len, slots, total } => {
                let Some(a) = arrival.as_mut() else {
                    return fail(agent, &mut ch, None, MigrateError::protocol("offer before prepare"));
                };
                a.entry.checkpoints.push(name.clone());
                // Chunks streamed during the dump are already here: recorded, so that undoing
                // the arrival releases them too.
                for pack in agent.take_streamed(&a.entry.migration) {
                    if !a.entry.packs.contains(&pack) {
                        a.entry.packs.push(pack);
                    }
                }
                if let Err(e) = agent.journal.write(&a.entry) {
                    return fail(agent, &mut ch, arrival, e);
                }
                let mut packs = Vec::new();
                let received =
                    ship::receive(&agent.ctx.store, &mut ch, name, manifest_len, slots, total, &mut packs);
                a.entry.packs.extend(packs);
                match received {
                    Ok(bytes) => {
                        agent.metrics.bytes_received.fetch_add(bytes, Ordering::Relaxed);
                    }
                    Err(e) => return fail(agent, &mut ch, arrival, e),
                }
            }
            Msg::Restore { name, tcp_established, external_net, lazy } => {
                let Some(a) = arrival.as_mut() else {
                    return fail(agent, &mut ch, None, MigrateError::protocol("restore before prepare"));
                };
                let t = Instant::now();
                match a.restore(agent, &name, tcp_established, external_net, lazy) {
                    Ok(pid) => {
                        let container = a.entry.container.clone();
                        ch.send(&Msg::Running { pid, restore_s: t.elapsed().as_secs_f64(), container })?;
                        crate::failpoint::check("target-after-running");
                    }
                    Err(e) => return fail(agent, &mut ch, arrival, e),
                }
            }
            Msg::Commit => {
                let Some(mut a) = arrival.take() else {
                    return fail(agent, &mut ch, None, MigrateError::protocol("commit before prepare"));
                };
                if a.lazy.is_none() {
                    a.release(agent)?;
                    // The answer first: removing the checkpoint and its packs (a second or
                    // more for large ones) is no business of the source's.
                    let answered = ch.send(&Msg::Committed);
                    a.finish(agent);
                    return answered;
                }
                // Post-copy: the workload goes live now; its pages keep coming from the source.
                if let Err(e) = a.release(agent) {
                    return fail(agent, &mut ch, Some(a), e);
                }
                ch.send(&Msg::Committed)?;
                if let Some(push) = &a.push {
                    push.allow();
                }
                let started = Instant::now();
                loop {
                    match a.wait_pages(PROGRESS_EVERY) {
                        Ok(Some(stats)) => {
                            tracing::info!(
                                bytes = stats.bytes,
                                pushed = stats.pushed,
                                requests = stats.requests,
                                faults = stats.faults,
                                fetching_s = stats.fetching.as_secs_f64(),
                                copying_s = stats.copying.as_secs_f64(),
                                seconds = started.elapsed().as_secs_f64(),
                                "every page is in"
                            );
                            agent.metrics.bytes_received.fetch_add(stats.bytes, Ordering::Relaxed);
                            ch.send(&Msg::PagesDone { bytes: stats.bytes, requests: stats.requests })?;
                            a.finish(agent);
                            return Ok(());
                        }
                        Ok(None) if started.elapsed() < PAGES_WAIT => {
                            let bytes = a.pages_so_far();
                            if let Err(e) = ch.send(&Msg::PagesProgress { bytes }) {
                                // The source is unreachable; the pages may still come (they use
                                // their own connection): wait for them as long as they flow.
                                tracing::warn!(error = %e, "the source's control connection is gone");
                            }
                        }
                        Ok(None) => {
                            let e = MigrateError::Refused(format!(
                                "the pages did not all arrive in {PAGES_WAIT:?}"
                            ));
                            return fail(agent, &mut ch, Some(a), e);
                        }
                        Err(e) => return fail(agent, &mut ch, Some(a), e),
                    }
                }
            }
            Msg::Pages { migration } => return crate::pages::serve(agent, &mut ch, &migration),
            Msg::PagesPush { migration } => return crate::pages::push(agent, &mut ch, &migration),
            Msg::Stream { migration } => return ship::receive_stream(agent, &mut ch, &migration),
            Msg::ArrivalStatus { migration } => {
                let holding = agent.journal.read(&migration).is_some_and(|e| e.stage == Stage::Arriving);
                ch.send(&Msg::ArrivalIs { holding })?;
            }
            Msg::Abort { reason } => {
                tracing::warn!(%reason, "the source abandoned the migration");
                if let Some(a) = arrival.take() {
                    a.abort(agent);
                }
                let _ = ch.send(&Msg::Aborted);
                return Ok(());
            }
            Msg::Outcome { migration } => {
                let answer = match agent.journal.read(&migration) {
                    Some(e) if e.stage == Stage::Committed => Msg::OutcomeIs { committed: true, known: true },
                    Some(e) if e.stage == Stage::Frozen => Msg::OutcomeIs { committed: false, known: true },
                    _ => Msg::OutcomeIs { committed: false, known: false },
                };
                ch.send(&answer)?;
            }
            other => return fail(agent, &mut ch, arrival, unexpected("a migration", &other)),
        }
    }
}

/// Whether a container could be restored here, asked before the source freezes it.
fn preflight_container(agent: &Agent, record: &[u8]) -> Result<(), MigrateError> {
    let record = ContainerRecord::parse(record)?;
    ferry_runtime::container::preflight(&agent.ctx.endpoints, &record, &record.name)?;
    Ok(())
}

/// Tells the source why, and undoes the arrival.
fn fail(
    agent: &Agent,
    ch: &mut Channel,
    arrival: Option<Arrival>,
    e: MigrateError,
) -> Result<(), MigrateError> {
    tracing::error!(error = %e, "arrival failed");
    if let Some(a) = arrival {
        a.abort(agent);
    }
    let _ = ch.send(&Msg::Error { message: crate::chain(&e) });
    Err(e)
}

/// A workload arriving on this node.
pub(crate) struct Arrival {
    pub(crate) entry: Entry,
    ip: Option<std::net::Ipv4Addr>,
    /// The source's lab record of the workload.
    from: Option<u64>,
    /// Post-copy: ferry's lazy-pages daemon and the images it reads.
    lazy: Option<(LazyPager, PrivateTmpfs)>,
    /// The workload's neighbour entries at the source.
    neighbours: Vec<(std::net::Ipv4Addr, String)>,
    /// Its network namespace here, once made.
    netns: Option<std::path::PathBuf>,
    /// Post-copy: the way in for pages pushed ahead of demand; the push starts once the
    /// workload runs here.
    push: Option<PageFeeder>,
}

impl Arrival {
    fn new(migration: &str, source: &str, ip: Option<std::net::Ipv4Addr>) -> Arrival {
        Arrival {
            entry: Entry {
                migration: migration.to_owned(),
                stage: Stage::Arriving,
                peer: source.to_owned(),
                pid: 0,
                start_time: 0,
                lab_workload: None,
                checkpoints: Vec::new(),
                packs: Vec::new(),
                container: None,
            },
            ip,
            from: None,
            lazy: None,
            neighbours: Vec::new(),
            netns: None,
            push: None,
        }
    }

    pub(crate) fn from_entry(entry: Entry) -> Arrival {
        Arrival { entry, ip: None, from: None, lazy: None, neighbours: Vec::new(), netns: None, push: None }
    }

    fn restore(
        &mut self,
        agent: &Agent,
        name: &str,
        tcp_established: bool,
        external_net: bool,
        lazy: bool,
    ) -> Result<i32, MigrateError> {
        let t0 = Instant::now();
        let store = &agent.ctx.store;
        let checkpoint = store.get(name)?;
        let netns: Option<Arc<OwnedFd>> = if external_net {
            let (Some(lab), Some(ip)) = (&agent.config.lab, self.ip) else {
                return Err(MigrateError::Refused(
                    "the workload has a network namespace of its own and this node can provide one only in a lab"
                        .into(),
                ));
            };
            let path = match &self.netns {
                Some(path) => path.clone(),
                None => self.prepare_network(agent, lab, ip)?,
            };
            let f = File::open(&path).map_err(|source| MigrateError::Io { action: "open", path, source })?;
            Some(Arc::new(OwnedFd::from(f)))
        } else {
            None
        };
        let scratch = store.scratch(&format!("arrive-{name}"))?;
        let images = scratch.path().join("images");
        std::fs::create_dir(&images).map_err(|source| MigrateError::Io {
            action: "create",
            path: images.clone(),
            source,
        })?;
        checkpoint.materialize(store, &images)?;
        if let Some(record) = ContainerRecord::read_from(&images)? {
            return self.restore_container(agent, name, record, scratch, tcp_established, lazy);
        }
        let t_images = t0.elapsed();
        if !lazy && has_lazy_pages(&images)? {
            // CRIU would spin forever reading pages that are not in the images.
            return Err(MigrateError::Refused(format!(
                "checkpoint {name} was dumped with lazy pages: it can only be restored with them (post-copy)"
            )));
        }
        let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        // Lazy restore finds the daemon's socket in its work (log) directory: one per arrival.
        let log_dir = store.logs_dir().join(format!("arrive-{name}-{stamp}"));
        let log = LogTarget::new(&log_dir, "restore.log");
        let server = if lazy {
            let fetcher = RemotePages::open(agent, &self.entry.peer, &self.entry.migration)?;
            let pager = LazyPager::start(&images, &log_dir, Box::new(fetcher))
                .map_err(|e| MigrateError::Refused(crate::chain(&e)))?;
            // FERRY_PUSH=off in the target agent's environment: pages on demand and fetched
            // by the pager alone (to measure what the push buys).
            if std::env::var("FERRY_PUSH").map_or(true, |v| v != "off") {
                let feeder = pager.feeder();
                crate::pages::start_push(agent, &self.entry.peer, &self.entry.migration, feeder.clone());
                self.push = Some(feeder);
            }
            Some(pager)
        } else {
            None
        };
        let t_daemon = t0.elapsed();
        let mut opts = RestoreOptions::new(&images, log)
            .tcp_established(tcp_established)
            .restore_sibling(true)
            .lazy_pages(lazy);
        if let Some(fd) = netns {
            opts = opts.inherit_fd(NETNS_KEY, fd);
        }
        let outcome = match server {
            None => {
                let mut resume = PortAtResume::new(agent, self.entry.lab_workload);
                let outcome = agent.ctx.criu.restore(&opts, &mut resume);
                drop(scratch);
                outcome?
            }
            Some(server) => {
                // The restore itself may fault on lazy pages: if they stop coming, it would wait
                // forever. A watcher ends it by killing what is being restored.
                let victim = agent.config.lab.clone().zip(self.entry.lab_workload);
                let watch = LazyWatch::start(server, victim);
                let mut resume = PortAtResume::new(agent, self.entry.lab_workload);
                let outcome = agent.ctx.criu.restore(&opts, &mut resume);
                let (server, failed) = watch.stop();
                self.lazy = Some((server, scratch));
                match failed {
                    // CRIU failed and hung up on the pager: its own error says why.
                    Some(crate::lazy::LazyError::RestoreEnded) => outcome?,
                    Some(e) => {
                        return Err(MigrateError::Refused(format!(
                            "the pages stopped coming during the restore: {}",
                            crate::chain(&e)
                        )))
                    }
                    None => outcome?,
                }
            }
        };
        tracing::debug!(
            images_s = t_images.as_secs_f64(),
            daemon_s = (t_daemon - t_images).as_secs_f64(),
            criu_s = (t0.elapsed() - t_daemon).as_secs_f64(),
            "restore steps"
        );
        let pid = outcome.pid;
        // The restored root is our child: reap it whenever it ends.
        std::thread::spawn(move || {
            let _ = ferry_sys::wait_child(pid);
        });
        self.entry.pid = pid;
        self.entry.start_time = ferry_lab::start_time(pid).unwrap_or(0);
        agent.journal.write(&self.entry)?;
        Ok(pid)
    }

    /// A container's arrival: its runtime recreates it and restores it from the verified
    /// images (through ferry's pager for post-copy). The runtime gives no hook just before the
    /// tree runs (a process tree's port comes up at CRIU's pre-resume): the port comes up before
    /// the restore, with the namespace's TCP resets held back until it returns, so that a
    /// client's early packet is dropped rather than reset, and what the restored sockets send
    /// when they run (a window probe as they leave repair mode, a reply) leaves at once.
    fn restore_container(
        &mut self,
        agent: &Agent,
        name: &str,
        record: ContainerRecord,
        scratch: PrivateTmpfs,
        tcp_established: bool,
        lazy: bool,
    ) -> Result<i32, MigrateError> {
        let images = scratch.path().join("images");
        let netns = match (record.network.as_ref().is_some_and(|n| n.external), &agent.config.lab, self.ip) {
            (false, _, _) => None,
            (true, Some(lab), Some(ip)) => Some(match &self.netns {
                Some(path) => path.clone(),
                None => self.prepare_network(agent, lab, ip)?,
            }),
            (true, _, _) => return Err(MigrateError::Refused(
                "the container's network namespace stays behind and this node can provide one only in a lab"
                    .into(),
            )),
        };
        let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let work_dir = agent.ctx.store.logs_dir().join(format!("arrive-{name}-{stamp}"));
        std::fs::create_dir_all(&work_dir).map_err(|source| MigrateError::Io {
            action: "create",
            path: work_dir.clone(),
            source,
        })?;
        // Recorded before the runtime knows it: a crash from here on still removes it.
        self.entry.container = Some(record.workload());
        agent.journal.write(&self.entry)?;
        let req = ferry_runtime::ContainerRestore {
            record: &record,
            images: &images,
            name: None,
            netns: netns.as_deref(),
            work_dir: &work_dir,
            lazy,
            tcp_established,
        };
        let guarded = match (&agent.config.lab, self.entry.lab_workload) {
            (Some(lab), Some(id)) => {
                ferry_lab::guard_resets(lab, id, true)?;
                ferry_lab::set_port(lab, id, true)?;
                Some((lab.clone(), id))
            }
            _ => None,
        };
        let restored = self.restore_container_in(agent, &req, scratch, lazy);
        if let Some((lab, id)) = &guarded {
            if let Err(e) = ferry_lab::guard_resets(lab, *id, false) {
                tracing::warn!(error = %e, "could not remove the reset guard of the arriving container");
            }
            if restored.is_err() {
                let _ = ferry_lab::set_port(lab, *id, false);
            }
        }
        let restored = restored?;
        self.entry.pid = restored.pid;
        self.entry.start_time = ferry_lab::start_time(restored.pid).unwrap_or(0);
        self.entry.container = Some(format!("{}:{}", record.kind, restored.name));
        agent.journal.write(&self.entry)?;
        Ok(restored.pid)
    }

    /// The runtime's restore, with ferry's pager for post-copy.
    fn restore_container_in(
        &mut self,
        agent: &Agent,
        req: &ferry_runtime::ContainerRestore<'_>,
        scratch: PrivateTmpfs,
        lazy: bool,
    ) -> Result<ferry_runtime::container::Restored, MigrateError> {
        let images = req.images;
        let work_dir = req.work_dir;
        let restored = if lazy {
            let fetcher = RemotePages::open(agent, &self.entry.peer, &self.entry.migration)?;
            let pager = LazyPager::start(images, work_dir, Box::new(fetcher))
                .map_err(|e| MigrateError::Refused(crate::chain(&e)))?;
            if std::env::var("FERRY_PUSH").map_or(true, |v| v != "off") {
                let feeder = pager.feeder();
                crate::pages::start_push(agent, &self.entry.peer, &self.entry.migration, feeder.clone());
                self.push = Some(feeder);
            }
            let victim = agent.config.lab.clone().zip(self.entry.lab_workload);
            let watch = LazyWatch::start(pager, victim);
            let restored = ferry_runtime::restore_container(&agent.ctx, req);
            let (pager, failed) = watch.stop();
            self.lazy = Some((pager, scratch));
            match failed {
                Some(crate::lazy::LazyError::RestoreEnded) | None => restored?,
                Some(e) => {
                    return Err(MigrateError::Refused(format!(
                        "the pages stopped coming during the restore: {}",
                        crate::chain(&e)
                    )))
                }
            }
        } else {
            let restored = ferry_runtime::restore_container(&agent.ctx, req);
            drop(scratch);
            restored?
        };
        Ok(restored)
    }

    /// A namespace for the workload's address (its bridge port down), with the source's
    /// neighbour entries. Made at `Prepare`, while the workload still runs at the source, so
    /// that the freeze does not wait for it.
    fn prepare_network(
        &mut self,
        agent: &Agent,
        lab: &ferry_lab::LabConfig,
        ip: std::net::Ipv4Addr,
    ) -> Result<std::path::PathBuf, MigrateError> {
        let w = ferry_lab::prepare_arrival(lab, &agent.config.name, ip)?;
        self.entry.lab_workload = Some(w.id);
        agent.journal.write(&self.entry)?;
        if let Err(e) = ferry_lab::set_neighbours(lab, w.id, &self.neighbours) {
            tracing::warn!(error = %e, "could not carry the workload's neighbour entries over");
        }
        self.netns = Some(w.netns_path());
        Ok(w.netns_path())
    }

    /// The source let go: bring the workload's network up and record it here.
    pub(crate) fn commit(self, agent: &Agent) -> Result<(), MigrateError> {
        self.release(agent)?;
        self.finish(agent);
        Ok(())
    }

    /// Brings the workload's network up and records it as this node's.
    fn release(&self, agent: &Agent) -> Result<(), MigrateError> {
        if let (Some(lab), Some(id)) = (&agent.config.lab, self.entry.lab_workload) {
            ferry_lab::set_port(lab, id, true)?;
            ferry_lab::arrived(lab, id, self.entry.pid, self.from, self.entry.container.clone())?;
        }
        Ok(())
    }

    /// Post-copy: waits up to `step` for every page to be in; `None` if not yet.
    fn wait_pages(
        &mut self,
        step: std::time::Duration,
    ) -> Result<Option<crate::lazy::LazyStats>, MigrateError> {
        let Some((server, _)) = self.lazy.as_mut() else { return Ok(Some(Default::default())) };
        match server.wait_done(step) {
            Ok(stats) => Ok(Some(stats)),
            Err(crate::lazy::LazyError::Timeout(_)) => Ok(None),
            Err(e) => Err(MigrateError::Refused(crate::chain(&e))),
        }
    }

    fn pages_so_far(&self) -> u64 {
        self.lazy.as_ref().map_or(0, |(server, _)| server.stats().bytes)
    }

    /// Forgets a finished arrival.
    fn finish(mut self, agent: &Agent) {
        if let Some((server, scratch)) = self.lazy.take() {
            server.stop();
            drop(scratch);
        }
        self.forget(agent);
        agent.metrics.arrivals_ok.fetch_add(1, Ordering::Relaxed);
        tracing::info!(migration = %self.entry.migration, pid = self.entry.pid, "arrived");
    }

    /// Kills what was restored, removes its namespace and checkpoints.
    pub(crate) fn abort(mut self, agent: &Agent) {
        if let Some(c) = &self.entry.container {
            // Its runtime kills it and forgets it (nothing half created stays listed).
            crate::source::discard_container(agent, c);
        } else if self.entry.pid > 0 && ferry_lab::is_alive(self.entry.pid, self.entry.start_time) {
            let _ = ferry_sys::kill(self.entry.pid, ferry_sys::Signal::Kill);
        }
        // Only after the tree is dead: without its pager it would read zeros for its pages.
        if let Some((server, scratch)) = self.lazy.take() {
            server.stop();
            drop(scratch);
        }
        if let (Some(lab), Some(id)) = (&agent.config.lab, self.entry.lab_workload) {
            if let Err(e) = ferry_lab::remove_workload(lab, id) {
                tracing::warn!(error = %e, "could not remove the arriving workload's namespace");
            }
        }
        self.forget(agent);
        agent.metrics.arrivals_failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(migration = %self.entry.migration, "arrival undone");
    }

    fn forget(&mut self, agent: &Agent) {
        // The push ends once the pager is stopped: its feeds are turned away.
        self.push = None;
        // Streamed packs no offer took in (the migration ended before it).
        for pack in agent.take_streamed(&self.entry.migration) {
            if !self.entry.packs.contains(&pack) {
                self.entry.packs.push(pack);
            }
        }
        crate::source::cleanup(agent, &self.entry);
        agent.journal.remove(&self.entry.migration);
    }

    /// The source went silent. Before it ran here, undo; after, ask the source what it did
    /// (its journal knows) and follow it; never guess while the answer may be "committed".
    pub(crate) fn connection_lost(self, agent: &Agent) {
        if self.entry.pid == 0 {
            self.abort(agent);
            return;
        }
        let deadline = Instant::now() + COMMIT_WAIT;
        while Instant::now() < deadline {
            match ask_outcome(agent, &self.entry) {
                Some(true) => {
                    if let Err(e) = self.commit(agent) {
                        tracing::error!(error = %e, "commit after reconnecting failed");
                    }
                    return;
                }
                Some(false) => {
                    self.abort(agent);
                    return;
                }
                None => std::thread::sleep(std::time::Duration::from_millis(500)),
            }
        }
        tracing::error!(
            migration = %self.entry.migration,
            "the source cannot say whether it let go of the workload: keeping it held here; the next start retries"
        );
    }
}

/// `Some(committed)` if the source could tell; `None` if it cannot be reached yet.
pub(crate) fn ask_outcome(agent: &Agent, entry: &Entry) -> Option<bool> {
    let mut ch = agent.connect(&entry.peer).ok()?;
    match ch.call(&Msg::Outcome { migration: entry.migration.clone() }, "outcome").ok()? {
        Msg::OutcomeIs { committed, known: true } => Some(committed),
        // The source has no record: it never committed (it writes that before letting go).
        Msg::OutcomeIs { known: false, .. } => Some(false),
        _ => None,
    }
}

/// True if the images leave some memory to be served lazily.
fn has_lazy_pages(images: &std::path::Path) -> Result<bool, MigrateError> {
    let refused = |e: crate::lazy::LazyError| MigrateError::Refused(crate::chain(&e));
    for pid in crate::lazy::tree_pids(images).map_err(refused)? {
        if !crate::lazy::lazy_ranges(images, pid).map_err(refused)?.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Watches the pager while CRIU restores: if serving fails, the half-restored tree
/// (everything in the arriving workload's namespace) is killed so that the restore returns.
struct LazyWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(LazyPager, Option<crate::lazy::LazyError>)>,
}

impl LazyWatch {
    fn start(mut server: LazyPager, victim: Option<(ferry_lab::LabConfig, u64)>) -> LazyWatch {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || loop {
            if flag.load(Ordering::Relaxed) {
                return (server, None);
            }
            match server.wait_done(std::time::Duration::from_millis(50)) {
                Err(crate::lazy::LazyError::Timeout(_)) => {}
                Ok(_) => return (server, None),
                Err(e) => {
                    tracing::error!(error = %e, "lazy pages failed during the restore: killing the restored tree");
                    if let Some((lab, id)) = &victim {
                        let _ = ferry_lab::remove_workload(lab, *id);
                    }
                    return (server, Some(e));
                }
            }
        });
        LazyWatch { stop, thread }
    }

    fn stop(self) -> (LazyPager, Option<crate::lazy::LazyError>) {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.join() {
            Ok(r) => r,
            Err(_) => std::panic::resume_unwind(Box::new("lazy watcher panicked")),
        }
    }
}

/// Brings the arriving workload's bridge port up just before CRIU lets the restored tree run
/// (`pre-resume`). Its first packets (a reply it owed a client, say) then leave at once: a
/// restored socket starts with a one-second retransmission timeout, so a reply dropped at a
/// port still down would cost a client a whole second. The source's copy is frozen and cut off
/// by then; the only way back after this point is the source failing in the few milliseconds
/// before it commits, and then this copy is killed and the source resumed.
struct PortAtResume<'a> {
    agent: &'a Agent,
    lab_workload: Option<u64>,
}

impl<'a> PortAtResume<'a> {
    fn new(agent: &'a Agent, lab_workload: Option<u64>) -> Self {
        PortAtResume { agent, lab_workload }
    }
}

impl NotifyHandler for PortAtResume<'_> {
    fn notify(&mut self, event: &Notify, _pid: Option<i32>) -> Result<(), String> {
        if *event != Notify::PreResume {
            return Ok(());
        }
        if let (Some(lab), Some(id)) = (&self.agent.config.lab, self.lab_workload) {
            ferry_lab::set_port(lab, id, true).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

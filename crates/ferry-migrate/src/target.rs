//! The target side of a migration, phase by phase (`phase` has the protocol):
//!
//! - `prepare`: a namespace with the workload's address (its bridge port down);
//! - `receive`: the checkpoint, checked before CRIU reads a byte;
//! - `restore`: CRIU restores it there; at CRIU's `pre-resume`, just before the restored
//!   tree runs, the switch is journaled and the port comes up (`SwitchAtResume`): from then
//!   on this copy is the workload;
//! - `commit`: the workload recorded as this node's; post-copy goes on with `pages` until
//!   every page is in (`Done`) or the source stays unreachable past the recover timeout
//!   (`Lost`: the copy is killed, loudly);
//! - `forget`: the source has acted on the outcome.
//!
//! Before the switch anything going wrong undoes the arrival (the source resumes its copy);
//! after it nothing does, not even a lost control connection.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_criu::{LogTarget, Notify, NotifyHandler, RestoreOptions, SharedOptions};
use ferry_runtime::container::ContainerRecord;
use ferry_sys::PrivateTmpfs;

use crate::api::Strategy;
use crate::guard::Guard;
use crate::journal::{Entry, Phase, Role};
use crate::lazy::{LazyPager, PageFeeder};
use crate::node::Node;
use crate::pages::RemotePages;
use crate::peer::{unexpected, Channel};
use crate::proto::{Msg, NETNS_KEY, PROTOCOL};
use crate::{ship, MigrateError};

/// How long a post-copy target waits for all pages while the source answers.
const PAGES_WAIT: Duration = Duration::from_secs(3600);
/// How often a post-copy target tells the source how far the pages are.
pub(crate) const PROGRESS_EVERY: Duration = Duration::from_secs(2);

pub(crate) fn serve(node: &Node, mut ch: Channel) -> Result<(), MigrateError> {
    if !hello(node, &mut ch)? {
        return Ok(());
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
                return fail(node, &mut ch, arrival, e);
            }
            Err(e) => {
                if let Some(a) = arrival {
                    a.source_gone(node);
                }
                return match e {
                    MigrateError::Lost { .. } => Ok(()),
                    e => Err(e),
                };
            }
        };
        match msg {
            Msg::FactsQuery { cpuinfo, container, tree } if arrival.is_none() => {
                let facts =
                    crate::agent::target_facts(node, cpuinfo.as_deref(), container.as_deref(), tree.as_ref());
                return ch.send(&Msg::TargetFacts(facts));
            }
            Msg::Prepare {
                migration,
                ip,
                lab_workload,
                neighbours,
                container,
                strategy,
                recover_timeout_s,
                ..
            } => {
                if ferry_store::validate_name(&migration).is_err() {
                    return fail(node, &mut ch, arrival, MigrateError::protocol("bad migration id"));
                }
                if let Some(record) = &container {
                    if let Err(e) = preflight_container(node, record) {
                        return fail(node, &mut ch, arrival, e);
                    }
                }
                let mut a = Arrival::new(&migration, &ch.node, ip, strategy, recover_timeout_s);
                a.container_arrival = container.is_some();
                a.from = lab_workload;
                a.neighbours = neighbours;
                if let Err(e) = a.prepare(node) {
                    return fail(node, &mut ch, Some(a), e);
                }
                arrival = Some(a);
                ch.send(&Msg::Prepared { x25519: node.ctx.store.keys().public().x25519 })?;
            }
            Msg::Offer { name, manifest_len, slots, total } => {
                let Some(a) = arrival.as_mut() else {
                    return fail(node, &mut ch, None, MigrateError::protocol("offer before prepare"));
                };
                if let Err(e) = a.receive(node, &mut ch, name, manifest_len, slots, total) {
                    return fail(node, &mut ch, arrival, e);
                }
            }
            Msg::Restore { name, tcp_established, external_net, lazy } => {
                let Some(a) = arrival.as_mut() else {
                    return fail(node, &mut ch, None, MigrateError::protocol("restore before prepare"));
                };
                let t = Instant::now();
                match a.restore(node, &mut ch, &name, tcp_established, external_net, lazy) {
                    Ok(pid) => {
                        let container = a.entry.container.clone();
                        let running = Msg::Running { pid, restore_s: t.elapsed().as_secs_f64(), container };
                        if let Err(e) = ch.send(&running) {
                            // Switched: this copy is the workload whatever the source heard.
                            if let Some(a) = arrival.take() {
                                a.source_gone(node);
                            }
                            return Err(e);
                        }
                        crate::failpoint::check("target-after-running");
                    }
                    Err(e) => return fail(node, &mut ch, arrival, e),
                }
            }
            Msg::Commit => {
                let Some(a) = arrival.take() else {
                    return fail(node, &mut ch, None, MigrateError::protocol("commit before prepare"));
                };
                if !a.entry.phase.past_switch() {
                    return fail(node, &mut ch, Some(a), MigrateError::protocol("commit before the switch"));
                }
                return a.commit(node, &mut ch);
            }
            Msg::Pages { migration } => return crate::pages::serve(node, &mut ch, &migration),
            Msg::PagesPush { migration } => return crate::pages::push(node, &mut ch, &migration),
            Msg::Stream { migration } => return ship::receive_stream(node, &mut ch, &migration),
            Msg::ArrivalStatus { migration } => {
                let entry = arrival_of(node, &migration, &ch.node);
                let phase = entry.as_ref().map(|e| e.phase);
                ch.send(&Msg::ArrivalIs { phase, lost: entry.and_then(|e| e.lost) })?;
            }
            Msg::Forget { migration } => {
                forget(node, &migration, &ch.node);
                ch.send(&Msg::Forgotten)?;
            }
            Msg::Abort { reason } => {
                match arrival.take() {
                    Some(a) if a.entry.phase.past_switch() => {
                        // Never happens with a source of this version: it aborts only before.
                        tracing::error!(%reason, "the source asked to undo an arrival past the switch: refused, the workload stays here");
                        a.source_gone(node);
                    }
                    Some(a) => {
                        tracing::warn!(%reason, "the source abandoned the migration");
                        a.abort(node);
                    }
                    None => {}
                }
                let _ = ch.send(&Msg::Aborted);
                return Ok(());
            }
            other => return fail(node, &mut ch, arrival, unexpected("a migration", &other)),
        }
    }
}

/// Exchanges hellos; false if the peer speaks another protocol version (it was told).
fn hello(node: &Node, ch: &mut Channel) -> Result<bool, MigrateError> {
    match ch.recv("hello")? {
        Msg::Hello { protocol, ed25519, x25519, .. } if protocol == PROTOCOL => {
            if let Err(e) = node.learn_peer(ch, ed25519, x25519) {
                let _ = ch.send(&Msg::Error { message: e.to_string() });
                return Err(e);
            }
            ch.send(&node.hello())?;
            Ok(true)
        }
        Msg::Hello { protocol, .. } => {
            ch.send(&Msg::Error {
                message: format!("this node speaks migration protocol {PROTOCOL}, not {protocol}"),
            })?;
            Ok(false)
        }
        other => Err(unexpected("hello", &other)),
    }
}

/// This node's record of `migration` arriving from `source`, if any.
fn arrival_of(node: &Node, migration: &str, source: &str) -> Option<Entry> {
    node.journal.read(migration).filter(|e| e.role == Role::Target && e.peer == source)
}

/// The source has acted on the outcome of a migration past the switch: its record goes.
pub(crate) fn forget(node: &Node, migration: &str, source: &str) {
    let Some(entry) = arrival_of(node, migration, source) else { return };
    if !entry.phase.past_switch() {
        tracing::warn!(%migration, phase = %entry.phase, "asked to forget an arrival before its switch: kept");
        return;
    }
    node.cleanup(&entry);
    node.journal.remove(migration);
    tracing::info!(%migration, phase = %entry.phase, "the source has acted on the outcome: forgotten");
}

/// Whether a container could be restored here, asked before the source freezes it.
fn preflight_container(node: &Node, record: &[u8]) -> Result<(), MigrateError> {
    let record = ContainerRecord::parse(record)?;
    ferry_runtime::container::preflight(&node.ctx.endpoints, &record, &record.name)?;
    Ok(())
}

/// Tells the source why, and undoes the arrival (before the switch; after it the arrival
/// stays: see `Arrival::source_gone`).
fn fail(
    node: &Node,
    ch: &mut Channel,
    arrival: Option<Arrival>,
    e: MigrateError,
) -> Result<(), MigrateError> {
    tracing::error!(error = %e, "arrival failed");
    match arrival {
        Some(a) if a.entry.phase.past_switch() => a.source_gone(node),
        Some(a) => a.abort(node),
        None => {}
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
    /// Recorded as this node's workload (lab record updated).
    released: bool,
    /// Post-copy: kills the workload if this agent dies before it has all its pages.
    guard: Option<Arc<Guard>>,
    /// The source announced a container (its record came with `Prepare`).
    container_arrival: bool,
}

impl Arrival {
    fn new(
        migration: &str,
        source: &str,
        ip: Option<std::net::Ipv4Addr>,
        strategy: Strategy,
        recover_timeout_s: u32,
    ) -> Arrival {
        let entry = Entry { recover_timeout_s, ..Entry::new(migration, Role::Target, source, strategy) };
        Arrival { ip, ..Arrival::from_entry(entry) }
    }

    pub(crate) fn from_entry(entry: Entry) -> Arrival {
        Arrival {
            entry,
            ip: None,
            from: None,
            lazy: None,
            neighbours: Vec::new(),
            netns: None,
            push: None,
            released: false,
            guard: None,
            container_arrival: false,
        }
    }

    /// Prepare: the record, then a namespace for the workload's address (made now, while
    /// the workload still runs at the source, so that the freeze does not wait for it).
    fn prepare(&mut self, node: &Node) -> Result<(), MigrateError> {
        node.journal.write(&self.entry)?;
        if let (Some(lab), Some(ip)) = (node.config.lab.clone(), self.ip) {
            self.prepare_network(node, &lab, ip)?;
        }
        // Post-copy: the arrival's guard, started now (a process start is no business of the
        // freeze).
        if let (Strategy::PostCopy, Some(program)) = (self.entry.strategy, &node.config.guard) {
            match Guard::spawn(program, &self.entry.migration) {
                Ok(g) => {
                    if let Some(netns) = &self.netns {
                        g.watch_netns(netns);
                    }
                    self.guard = Some(g);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no guard: if this agent dies before every page is in, the workload reads zeros for the rest until it is killed at the next start")
                }
            }
        }
        Ok(())
    }

    /// Transfer: takes the offered checkpoint in (chunks streamed during the dump are here
    /// already, and recorded, so that undoing the arrival releases them too).
    fn receive(
        &mut self,
        node: &Node,
        ch: &mut Channel,
        name: String,
        manifest_len: u64,
        slots: Vec<u8>,
        total: u32,
    ) -> Result<(), MigrateError> {
        self.entry.phase = Phase::Transfer;
        self.entry.checkpoints.push(name.clone());
        for pack in node.take_streamed(&self.entry.migration) {
            if !self.entry.packs.contains(&pack) {
                self.entry.packs.push(pack);
            }
        }
        node.journal.write(&self.entry)?;
        let mut packs = Vec::new();
        let received = ship::receive(&node.ctx.store, ch, name, manifest_len, slots, total, &mut packs);
        self.entry.packs.extend(packs);
        let bytes = received?;
        node.metrics.bytes_received.inc_by(bytes);
        Ok(())
    }

    /// Restore; the switch happens inside (`SwitchAtResume`). Returns the restored root.
    fn restore(
        &mut self,
        node: &Node,
        ch: &mut Channel,
        name: &str,
        tcp_established: bool,
        external_net: bool,
        lazy: bool,
    ) -> Result<i32, MigrateError> {
        let t0 = Instant::now();
        let store = &node.ctx.store;
        let checkpoint = store.get(name)?;
        let netns: Option<Arc<OwnedFd>> = if external_net {
            let (Some(lab), Some(ip)) = (&node.config.lab, self.ip) else {
                return Err(MigrateError::Refused(
                    "the workload has a network namespace of its own and this node can provide one only in a lab"
                        .into(),
                ));
            };
            let path = match &self.netns {
                Some(path) => path.clone(),
                None => self.prepare_network(node, lab, ip)?,
            };
            let f = File::open(&path).map_err(|source| MigrateError::Io { action: "open", path, source })?;
            Some(Arc::new(OwnedFd::from(f)))
        } else {
            None
        };
        // Stop-copy and pre-copy: the pages go from the store through ferry's pager, all of
        // them before the copy runs (`docs/page-path.md`); post-copy's come from the source.
        let (scratch, images, plan) = if lazy {
            let (s, i) = crate::node::images_in_scratch(store, &format!("arrive-{name}"), &checkpoint)?;
            (s, i, None)
        } else {
            crate::node::images_for_pager(store, &format!("arrive-{name}"), &checkpoint)?
        };
        if let Some(record) = ContainerRecord::read_from(&images)? {
            return self.restore_container(node, ch, name, record, scratch, tcp_established, lazy);
        }
        let t_images = t0.elapsed();
        if !lazy && has_lazy_pages(&images)? {
            // CRIU would spin forever reading pages that are not in the images.
            return Err(MigrateError::Refused(format!(
                "checkpoint {name} was dumped with lazy pages: it can only be restored with them (post-copy)"
            )));
        }
        // Lazy restore finds the daemon's socket in its work (log) directory: one per arrival.
        let log_dir = store.logs_dir().join(format!("arrive-{name}-{}", unix_ms()));
        let log = LogTarget::new(&log_dir, "restore.log");
        let server = if lazy { Some(self.start_pager(node, &images, &log_dir)?) } else { None };
        let mut paged = match &plan {
            Some(p) => Some(p.start(&log_dir)?),
            None => None,
        };
        let t_daemon = t0.elapsed();
        let mut opts = RestoreOptions::new(&images, log)
            .tcp_established(tcp_established)
            .restore_sibling(true)
            .lazy_pages(lazy || paged.is_some());
        if let Some(fd) = netns {
            opts = opts.inherit_fd(NETNS_KEY, fd);
        }
        let mut switch = SwitchAtResume::new(node, ch, &self.entry, self.guard.clone());
        let outcome = match server {
            None => {
                let outcome = match paged.as_mut() {
                    Some(p) => {
                        let outcome = node.ctx.criu.restore(&opts, &mut p.handler(&mut switch));
                        // A chunk that failed its check explains CRIU's failure better.
                        match (outcome, p.failure()) {
                            (Err(_), Some(f)) => Err(MigrateError::from(f)),
                            (o, _) => o.map_err(MigrateError::from),
                        }
                    }
                    None => node.ctx.criu.restore(&opts, &mut switch).map_err(MigrateError::from),
                };
                drop(scratch);
                // Every page went in before the copy ran; a pager that failed even so fails
                // the restore (the copy is killed and the switch taken back below).
                match (paged.take(), outcome) {
                    (Some(p), Ok(o)) => p.finish().map(|_| o).map_err(MigrateError::from),
                    (Some(p), Err(e)) => {
                        p.abort();
                        Err(e)
                    }
                    (None, o) => o,
                }
            }
            Some(server) => {
                // The restore itself may fault on lazy pages: if they stop coming, it would wait
                // forever. A watcher ends it by killing what is being restored.
                let victim = node.config.lab.clone().zip(self.entry.lab_workload);
                let watch = LazyWatch::start(server, victim);
                let outcome = node.ctx.criu.restore(&opts, &mut switch);
                let (server, failed) = watch.stop();
                self.lazy = Some((server, scratch));
                match failed {
                    // CRIU failed and hung up on the pager: its own error says why.
                    Some(crate::lazy::LazyError::RestoreEnded) | None => outcome.map_err(MigrateError::from),
                    Some(e) => Err(MigrateError::Refused(format!(
                        "the pages stopped coming during the restore: {}",
                        crate::chain(&e)
                    ))),
                }
            }
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                if switch.switched {
                    // CRIU failed after its pre-resume: the tree may have run for a moment.
                    // It never got far: it is killed and the switch taken back.
                    tracing::error!(error = %e, "the restore failed after the switch was journaled: taking it back");
                    if let (Some(lab), Some(id)) = (&node.config.lab, self.entry.lab_workload) {
                        let _ = ferry_lab::set_port(lab, id, false);
                    }
                    self.kill_copy(node);
                    self.entry.phase = Phase::Transfer;
                    node.journal.write(&self.entry)?;
                }
                return Err(e);
            }
        };
        tracing::debug!(
            images_s = t_images.as_secs_f64(),
            daemon_s = (t_daemon - t_images).as_secs_f64(),
            criu_s = (t0.elapsed() - t_daemon).as_secs_f64(),
            "restore steps"
        );
        let pid = outcome.pid;
        if let Some(g) = &self.guard {
            g.watch(pid, ferry_lab::start_time(pid).unwrap_or(0));
        }
        // The restored root is our child: reap it whenever it ends.
        std::thread::spawn(move || {
            let _ = ferry_sys::wait_child(pid);
        });
        self.entry.pid = pid;
        self.entry.start_time = ferry_lab::start_time(pid).unwrap_or(0);
        if !switch.switched {
            // No pre-resume came (an older CRIU): the switch is now.
            drop(switch);
            self.switch_now(node, ch)?;
        }
        self.entry.phase = Phase::Switched;
        if let Err(e) = node.journal.write(&self.entry) {
            // Switched already (journaled without the pid): the copy stays the workload.
            tracing::error!(error = %e, "could not journal the restored pid");
        }
        Ok(pid)
    }

    /// Post-copy: ferry's pager for the restore (it takes the userfaultfds from CRIU), and the
    /// push that follows the switch.
    fn start_pager(
        &mut self,
        node: &Node,
        images: &std::path::Path,
        work_dir: &std::path::Path,
    ) -> Result<LazyPager, MigrateError> {
        let fetcher =
            RemotePages::open(node, &self.entry.peer, &self.entry.migration, self.entry.recover_timeout())?;
        // The guard (started at Prepare) must hold every userfaultfd the restore hands over.
        let keeper = self.guard.as_ref().map(Guard::keeper);
        let pager = LazyPager::start_kept(images, work_dir, Box::new(fetcher), keeper)
            .map_err(|e| MigrateError::Refused(crate::chain(&e)))?;
        // FERRY_PUSH=off in the target agent's environment: pages on demand and fetched by the
        // pager alone (to measure what the push buys).
        if std::env::var("FERRY_PUSH").map_or(true, |v| v != "off") {
            let feeder = pager.feeder();
            crate::pages::start_push(node, &self.entry.peer, &self.entry.migration, feeder.clone());
            self.push = Some(feeder);
        }
        Ok(pager)
    }

    /// The switch, where no pre-resume hook came: once the source has recorded it may happen,
    /// journaled, then the port up.
    fn switch_now(&mut self, node: &Node, ch: &mut Channel) -> Result<(), MigrateError> {
        source_recorded_the_switch(ch)?;
        self.entry.phase = Phase::Switched;
        node.journal.write(&self.entry)?;
        if let (Some(lab), Some(id)) = (&node.config.lab, self.entry.lab_workload) {
            ferry_lab::set_port(lab, id, true)?;
        }
        Ok(())
    }

    /// A container's arrival: its runtime recreates it and restores it from the verified
    /// images (through ferry's pager for post-copy). The runtime gives no hook just before the
    /// tree runs (a process tree's switch comes at CRIU's pre-resume): once the source has
    /// recorded that it may happen, the switch is journaled and the port comes up before the
    /// restore, with the namespace's TCP resets held back until it returns, so that a client's
    /// early packet is dropped rather than reset, and what the restored sockets send when they
    /// run (a window probe as they leave repair mode, a reply) leaves at once. A restore that
    /// fails takes the switch back (its copy is discarded).
    #[allow(clippy::too_many_arguments)]
    fn restore_container(
        &mut self,
        node: &Node,
        ch: &mut Channel,
        name: &str,
        record: ContainerRecord,
        scratch: PrivateTmpfs,
        tcp_established: bool,
        lazy: bool,
    ) -> Result<i32, MigrateError> {
        let images = scratch.path().join("images");
        let netns = match (record.network.as_ref().is_some_and(|n| n.external), &node.config.lab, self.ip) {
            (false, _, _) => None,
            (true, Some(lab), Some(ip)) => Some(match &self.netns {
                Some(path) => path.clone(),
                None => self.prepare_network(node, lab, ip)?,
            }),
            (true, _, _) => return Err(MigrateError::Refused(
                "the container's network namespace stays behind and this node can provide one only in a lab"
                    .into(),
            )),
        };
        let work_dir = node.ctx.store.logs_dir().join(format!("arrive-{name}-{}", unix_ms()));
        std::fs::create_dir_all(&work_dir).map_err(|source| MigrateError::Io {
            action: "create",
            path: work_dir.clone(),
            source,
        })?;
        // Recorded before the runtime knows it: a crash from here on still removes it.
        self.entry.container = Some(record.workload());
        node.journal.write(&self.entry)?;
        let req = ferry_runtime::ContainerRestore {
            record: &record,
            images: &images,
            name: None,
            netns: netns.as_deref(),
            work_dir: &work_dir,
            lazy,
            tcp_established,
        };
        let guarded = match (&node.config.lab, self.entry.lab_workload) {
            (Some(lab), Some(id)) => {
                source_recorded_the_switch(ch)?;
                if !self.container_arrival {
                    // A container the source did not announce at Prepare: the guard now, then.
                    ferry_lab::guard_resets(lab, id, true)?;
                }
                let switched =
                    ferry_lab::set_port(lab, id, true).map_err(MigrateError::from).and_then(|()| {
                        self.entry.phase = Phase::Switched;
                        node.journal.write(&self.entry)
                    });
                if let Err(e) = switched {
                    self.take_back_switch(node, lab, id);
                    return Err(e);
                }
                Some((lab.clone(), id))
            }
            _ => None,
        };
        let restored = self.restore_container_in(node, &req, scratch, lazy);
        if let Some((lab, id)) = &guarded {
            if let Err(e) = ferry_lab::guard_resets(lab, *id, false) {
                tracing::warn!(error = %e, "could not remove the reset guard of the arriving container");
            }
            if restored.is_err() {
                self.take_back_switch(node, lab, *id);
            }
        }
        let restored = restored?;
        self.entry.pid = restored.pid;
        self.entry.start_time = ferry_lab::start_time(restored.pid).unwrap_or(0);
        if let Some(g) = &self.guard {
            g.watch(self.entry.pid, self.entry.start_time);
        }
        self.entry.container = Some(format!("{}:{}", record.kind, restored.name));
        if guarded.is_none() {
            self.switch_now(node, ch)?;
        } else if let Err(e) = node.journal.write(&self.entry) {
            // Switched already: the copy stays the workload.
            tracing::error!(error = %e, "could not journal the restored container");
        }
        Ok(restored.pid)
    }

    /// A container's switch that did not happen (its restore failed, or the record could not
    /// be written): its port down again, the record back to `Transfer`.
    fn take_back_switch(&mut self, node: &Node, lab: &ferry_lab::LabConfig, id: u64) {
        let _ = ferry_lab::guard_resets(lab, id, false);
        let _ = ferry_lab::set_port(lab, id, false);
        if self.entry.phase == Phase::Switched {
            self.entry.phase = Phase::Transfer;
            if let Err(e) = node.journal.write(&self.entry) {
                tracing::error!(error = %e, "could not take the switch back in the journal");
            }
        }
    }

    /// The runtime's restore, with ferry's pager for post-copy.
    fn restore_container_in(
        &mut self,
        node: &Node,
        req: &ferry_runtime::ContainerRestore<'_>,
        scratch: PrivateTmpfs,
        lazy: bool,
    ) -> Result<ferry_runtime::container::Restored, MigrateError> {
        if !lazy {
            let restored = ferry_runtime::restore_container(&node.ctx, req);
            drop(scratch);
            return Ok(restored?);
        }
        let pager = self.start_pager(node, req.images, req.work_dir)?;
        let victim = node.config.lab.clone().zip(self.entry.lab_workload);
        let watch = LazyWatch::start(pager, victim);
        let restored = ferry_runtime::restore_container(&node.ctx, req);
        let (pager, failed) = watch.stop();
        self.lazy = Some((pager, scratch));
        match failed {
            Some(crate::lazy::LazyError::RestoreEnded) | None => Ok(restored?),
            Some(e) => Err(MigrateError::Refused(format!(
                "the pages stopped coming during the restore: {}",
                crate::chain(&e)
            ))),
        }
    }

    /// A namespace for the workload's address (its bridge port down), with the source's
    /// neighbour entries.
    fn prepare_network(
        &mut self,
        node: &Node,
        lab: &ferry_lab::LabConfig,
        ip: std::net::Ipv4Addr,
    ) -> Result<std::path::PathBuf, MigrateError> {
        let w = ferry_lab::prepare_arrival(lab, &node.config.name, ip)?;
        self.entry.lab_workload = Some(w.id);
        node.journal.write(&self.entry)?;
        if let Err(e) = ferry_lab::set_neighbours(lab, w.id, &self.neighbours) {
            tracing::warn!(error = %e, "could not carry the workload's neighbour entries over");
        }
        // A container's port comes up before its runtime restores it, with resets held back
        // (`restore_container`): the guard goes in now, so that the freeze does not wait for it.
        if self.container_arrival {
            ferry_lab::guard_resets(lab, w.id, true)?;
        }
        self.netns = Some(w.netns_path());
        Ok(w.netns_path())
    }

    /// Commit (switched): the workload recorded as this node's. Stop-copy and pre-copy end
    /// here (the source journaled the switch before it sent `Commit`); post-copy goes on with
    /// the pages.
    fn commit(mut self, node: &Node, ch: &mut Channel) -> Result<(), MigrateError> {
        if let Err(e) = self.release(node) {
            tracing::error!(error = %e, "could not record the workload as this node's");
        }
        if self.entry.strategy != Strategy::PostCopy {
            // The answer first: removing the checkpoint and its packs (a second or more for
            // large ones) is no business of the source's.
            let answered = ch.send(&Msg::Committed);
            self.done(node);
            self.forget(node);
            return answered;
        }
        let answered = ch.send(&Msg::Committed);
        self.pages(node, answered.is_ok().then_some(ch));
        Ok(())
    }

    /// Brings the workload's network up (it is since the switch) and records it as this
    /// node's; lets the page push start.
    fn release(&mut self, node: &Node) -> Result<(), MigrateError> {
        if let Some(push) = &self.push {
            push.allow();
        }
        if self.released {
            return Ok(());
        }
        if let (Some(lab), Some(id)) = (&node.config.lab, self.entry.lab_workload) {
            ferry_lab::set_port(lab, id, true)?;
            ferry_lab::arrived(lab, id, self.entry.pid, self.from, self.entry.container.clone())?;
        }
        self.released = true;
        Ok(())
    }

    /// Switched, post-copy: waits for every page, telling the source how far they are (on
    /// `ch` while it works); then `Done`, or, if the pager gave up (the source unreachable
    /// past the recover timeout, or a failure copying pages in), `Lost`. The record stays
    /// until the source says to forget it.
    fn pages(mut self, node: &Node, mut ch: Option<&mut Channel>) {
        let started = Instant::now();
        if let Some(c) = ch.as_deref_mut() {
            // The source reads our reports; it may take its time with the forget.
            c.set_read_timeout(node.config.peer_timeout);
        }
        loop {
            match self.wait_pages(PROGRESS_EVERY) {
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
                    node.metrics.bytes_received.inc_by(stats.bytes);
                    self.entry.phase = Phase::Done;
                    if let Err(e) = node.journal.write(&self.entry) {
                        tracing::error!(error = %e, "could not journal the end of the pages phase");
                    }
                    self.done(node);
                    let told = ch.as_deref_mut().is_some_and(|c| {
                        c.send(&Msg::PagesDone { bytes: stats.bytes, requests: stats.requests }).is_ok()
                    });
                    if told {
                        self.await_forget(node, ch);
                    }
                    return;
                }
                Ok(None) if started.elapsed() < PAGES_WAIT => {
                    let bytes = self.pages_so_far();
                    if let Some(c) = ch.as_deref_mut() {
                        if let Err(e) = c.send(&Msg::PagesProgress { bytes }) {
                            // The pages use their own connections; the source asks later.
                            tracing::warn!(error = %e, "the source's control connection is gone");
                            ch = None;
                        }
                    }
                }
                Ok(None) => {
                    let reason = format!("the pages did not all arrive in {} s", PAGES_WAIT.as_secs());
                    return self.lost(node, ch, reason);
                }
                Err(e) => return self.lost(node, ch, crate::chain(&e)),
            }
        }
    }

    /// Lost after the switch: the copy killed (its missing pages will never come), said
    /// loudly with the point, journaled (kept for the source), the source told if it listens.
    fn lost(mut self, node: &Node, mut ch: Option<&mut Channel>, reason: String) {
        let at = match self.lazy_total() {
            Some(total) => {
                format!("post-copy pages, {} of {} MiB in", self.pages_so_far() >> 20, total >> 20)
            }
            None => "post-copy pages".to_owned(),
        };
        tracing::error!(
            migration = %self.entry.migration,
            workload = ?self.entry.container.clone().unwrap_or_else(|| format!("pid:{}", self.entry.pid)),
            %at,
            %reason,
            "THE WORKLOAD WAS LOST after the switch: its copy here is killed"
        );
        self.kill_copy(node);
        if let (Some(lab), Some(id)) = (&node.config.lab, self.entry.lab_workload) {
            if let Err(e) = ferry_lab::remove_workload(lab, id) {
                tracing::warn!(error = %e, "could not remove the lost workload's namespace");
            }
        }
        self.entry.phase = Phase::Lost;
        self.entry.lost = Some(format!("{at}: {reason}"));
        // Counted before it is journaled: whoever reads `Lost` in the journal sees it counted.
        node.metrics.arrivals_lost.inc();
        if let Err(e) = node.journal.write(&self.entry) {
            tracing::error!(error = %e, "could not journal the loss");
        }
        node.cleanup(&self.entry);
        let told = ch.as_deref_mut().is_some_and(|c| c.send(&Msg::PagesLost { at, reason }).is_ok());
        if told {
            self.await_forget(node, ch);
        }
    }

    /// Reads the source's `Forget` on the control connection, once it has acted.
    fn await_forget(&self, node: &Node, ch: Option<&mut Channel>) {
        let Some(ch) = ch else { return };
        match ch.recv("forget") {
            Ok(Msg::Forget { migration }) if migration == self.entry.migration => {
                forget(node, &migration, &ch.node);
                let _ = ch.send(&Msg::Forgotten);
            }
            Ok(other) => {
                tracing::warn!(error = %unexpected("forget", &other), "the record stays until the source says")
            }
            Err(e) => {
                tracing::warn!(error = %e, "the source did not say to forget the migration: its record stays")
            }
        }
    }

    /// The source's control connection is gone. Before the switch: undo. After it the copy is
    /// the workload: recorded as this node's, and post-copy waits for its pages (the source,
    /// or its restarted agent, reconnects to serve them, for up to the recover timeout).
    pub(crate) fn source_gone(mut self, node: &Node) {
        if !self.entry.phase.past_switch() {
            self.abort(node);
            return;
        }
        tracing::warn!(migration = %self.entry.migration, "the source's control connection is gone after the switch: the workload stays here");
        if let Err(e) = self.release(node) {
            tracing::error!(error = %e, "could not record the workload as this node's");
        }
        if self.entry.strategy == Strategy::PostCopy && self.entry.phase == Phase::Switched {
            self.pages(node, None);
        } else {
            // The record stays until the source says to forget it.
            self.done(node);
            node.cleanup(&self.entry);
        }
    }

    /// Post-copy: waits up to `step` for every page to be in; `None` if not yet.
    fn wait_pages(&mut self, step: Duration) -> Result<Option<crate::lazy::LazyStats>, MigrateError> {
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

    fn lazy_total(&self) -> Option<u64> {
        self.lazy.as_ref().map(|(server, _)| server.lazy_bytes())
    }

    /// The workload has everything it needs: the pager, its guard and the images go.
    fn done(&mut self, node: &Node) {
        self.push = None;
        if let Some((server, scratch)) = self.lazy.take() {
            server.stop();
            drop(scratch);
        }
        if let Some(g) = self.guard.take() {
            g.release();
        }
        node.metrics.arrivals_ok.inc();
        tracing::info!(migration = %self.entry.migration, pid = self.entry.pid, "arrived");
    }

    /// Kills what was restored (a container through its runtime), then stops the pager
    /// (without it the copy would read zeros for its missing pages).
    fn kill_copy(&mut self, node: &Node) {
        if let Some(c) = &self.entry.container {
            // Its runtime kills it and forgets it (nothing half created stays listed).
            node.discard_container(c);
        } else if self.entry.pid > 0 && ferry_lab::is_alive(self.entry.pid, self.entry.start_time) {
            let _ = ferry_sys::kill(self.entry.pid, ferry_sys::Signal::Kill);
        }
        self.push = None;
        if let Some((server, scratch)) = self.lazy.take() {
            server.stop();
            drop(scratch);
        }
        if let Some(g) = self.guard.take() {
            g.release();
        }
    }

    /// Undoes an arrival before the switch: kills what was restored, removes its namespace,
    /// checkpoints and record.
    pub(crate) fn abort(mut self, node: &Node) {
        self.kill_copy(node);
        if let (Some(lab), Some(id)) = (&node.config.lab, self.entry.lab_workload) {
            if let Err(e) = ferry_lab::remove_workload(lab, id) {
                tracing::warn!(error = %e, "could not remove the arriving workload's namespace");
            }
        }
        self.forget(node);
        node.metrics.arrivals_failed.inc();
        tracing::warn!(migration = %self.entry.migration, "arrival undone");
    }

    /// Removes the record, the checkpoints and the packs (streamed ones included).
    fn forget(&mut self, node: &Node) {
        for pack in node.take_streamed(&self.entry.migration) {
            if !self.entry.packs.contains(&pack) {
                self.entry.packs.push(pack);
            }
        }
        node.cleanup(&self.entry);
        node.journal.remove(&self.entry.migration);
    }

    /// Recovery: whether the switched copy runs (the journaled root, with its start time; a
    /// container whose restore was under way is asked of its runtime).
    pub(crate) fn copy_runs(&mut self, node: &Node) -> bool {
        if self.entry.pid > 0 {
            return ferry_lab::is_alive(self.entry.pid, self.entry.start_time);
        }
        let Some((kind, name)) = self.entry.container.as_deref().and_then(|c| c.split_once(':')) else {
            return false;
        };
        let pid = ferry_runtime::container::open(kind, &node.ctx.endpoints)
            .and_then(|rt| rt.inspect(name))
            .map(|c| c.plan.init_pid);
        match pid {
            Ok(pid) if pid > 0 => {
                self.entry.pid = pid;
                self.entry.start_time = ferry_lab::start_time(pid).unwrap_or(0);
                let _ = node.journal.write(&self.entry);
                true
            }
            _ => false,
        }
    }

    /// Recovery, switched (stop-copy or pre-copy): the copy runs; it is recorded as this
    /// node's, and the record stays until the source says to forget it.
    pub(crate) fn keep(mut self, node: &Node) -> Result<(), MigrateError> {
        self.release(node)?;
        node.cleanup(&self.entry);
        Ok(())
    }

    /// Recovery, switched: post-copy, the pager died with the agent that ran it, so the copy's
    /// missing pages can never be filled: it is killed (if its guard has not) and the workload
    /// declared lost; any strategy, a copy that does not run (it died, or its restore never
    /// finished) is lost too. The source then kills its held copy, or resumes it if asked to.
    pub(crate) fn lost_with_agent(self, node: &Node) {
        let reason = if self.entry.strategy == Strategy::PostCopy {
            "the target's agent stopped during the pages phase: the pages it had not received can no longer be filled in"
        } else {
            "the target's copy was not running when its agent started again"
        };
        self.lost(node, None, reason.into());
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
            match server.wait_done(Duration::from_millis(50)) {
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

/// Waits for the source's word that it has journaled `Switching` (it sends it right after
/// `Restore`, its journal write overlapping the restore here: normally it is in by now). Only
/// then may this node switch: a source that died first would resume its copy.
fn source_recorded_the_switch(ch: &mut Channel) -> Result<(), MigrateError> {
    match ch.recv("switching")? {
        Msg::SwitchRecorded => Ok(()),
        other => Err(unexpected("switching", &other)),
    }
}

/// The switch, at CRIU's `pre-resume` (just before the restored tree runs): once the source
/// has recorded that it may happen, journaled, then the workload's bridge port up. Its first
/// packets (a reply it owed a client, say) then leave at once: a restored socket starts with a
/// one-second retransmission timeout, so a reply dropped at a port still down would cost a
/// client a whole second. The journal write (a few milliseconds) is what makes this the commit
/// point: a source that lost sight of this node asks it, and never resumes its copy while this
/// record says `Switched`.
struct SwitchAtResume<'a> {
    node: &'a Node,
    ch: &'a mut Channel,
    entry: Entry,
    /// The switch was journaled (and the port brought up).
    switched: bool,
    /// Post-copy: told the restored root as soon as it exists (`setup-namespaces`).
    guard: Option<Arc<Guard>>,
}

impl<'a> SwitchAtResume<'a> {
    fn new(node: &'a Node, ch: &'a mut Channel, entry: &Entry, guard: Option<Arc<Guard>>) -> Self {
        SwitchAtResume { node, ch, entry: entry.clone(), switched: false, guard }
    }
}

impl NotifyHandler for SwitchAtResume<'_> {
    fn notify(&mut self, event: &Notify, pid: Option<i32>) -> Result<(), String> {
        if let (Notify::SetupNamespaces, Some(pid)) = (event, pid) {
            // The restored root: in the switch's record, and watched by the guard.
            self.entry.pid = pid;
            self.entry.start_time = ferry_lab::start_time(pid).unwrap_or(0);
            if let Some(g) = &self.guard {
                g.watch(pid, self.entry.start_time);
            }
        }
        if *event != Notify::PreResume {
            return Ok(());
        }
        source_recorded_the_switch(self.ch).map_err(|e| e.to_string())?;
        self.entry.phase = Phase::Switched;
        self.node.journal.write(&self.entry).map_err(|e| e.to_string())?;
        self.switched = true;
        if let (Some(lab), Some(id)) = (&self.node.config.lab, self.entry.lab_workload) {
            if let Err(e) = ferry_lab::set_port(lab, id, true) {
                // CRIU kills the tree when answered so: no switch after all.
                self.entry.phase = Phase::Transfer;
                let _ = self.node.journal.write(&self.entry);
                self.switched = false;
                return Err(e.to_string());
            }
        }
        Ok(())
    }
}

fn unix_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

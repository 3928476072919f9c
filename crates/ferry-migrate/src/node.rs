//! What an agent holds for the migrations it takes part in, whichever side: its configuration,
//! store, journal, peers and counters, and the registries the connections of one migration
//! share (frozen trees serving pages, chunks streamed ahead of an offer). The phases of
//! `source`, `target`, `pages` and `recover` work on a [`Node`]; the public entry points are
//! in `agent`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferry_lab::LabConfig;
use ferry_runtime::Context;

use crate::api::Report;
use crate::journal::Journal;
use crate::lazy::PageSource;
use crate::peer::{connect_with, Channel, Dialer};
use crate::proto::{Msg, PROTOCOL};
use crate::MigrateError;

/// How the agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node's name (in a lab, the lab's node name).
    pub name: String,
    /// The peer address others reach this node at (for status).
    pub listen: String,
    /// Peers by name.
    pub peers: BTreeMap<String, SocketAddr>,
    /// Where journal entries go.
    pub journal: PathBuf,
    /// The lab whose workloads' addresses move with them, if the node is in one.
    pub lab: Option<LabConfig>,
    /// The program (and its first arguments) that runs a post-copy arrival's guard: a process
    /// that outlives this agent and kills the arriving workload if the agent dies before it
    /// has all its pages (ferryd: itself with `guard`). None: no guard (see `guard`).
    pub guard: Option<Vec<String>>,
    /// How long a peer may stay silent before its connection is given up (ferryd's
    /// `--peer-timeout`); post-copy's page channels wait less (see `pages`).
    pub peer_timeout: std::time::Duration,
}

/// Counters for the metrics endpoint.
#[derive(Debug, Default)]
pub struct Metrics {
    pub migrations_ok: AtomicU64,
    pub migrations_failed: AtomicU64,
    /// Migrations this node sent whose workload was lost after the switch.
    pub migrations_lost: AtomicU64,
    pub arrivals_ok: AtomicU64,
    pub arrivals_failed: AtomicU64,
    /// Arrivals killed after the switch (the workload lost).
    pub arrivals_lost: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Sum of seconds per phase name, and the last downtime.
    pub phases: Mutex<BTreeMap<String, (f64, u64)>>,
    pub last_downtime_s: Mutex<f64>,
}

impl Metrics {
    pub(crate) fn record(&self, report: &Report) {
        for p in &report.phases {
            if let Ok(mut m) = self.phases.lock() {
                let e = m.entry(p.name.clone()).or_insert((0.0, 0));
                e.0 += p.seconds;
                e.1 += 1;
            }
        }
        if let Ok(mut d) = self.last_downtime_s.lock() {
            *d = report.downtime_s;
        }
        self.bytes_sent.fetch_add(report.bytes_sent, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of the counters.
    pub fn render(&self, node: &str) -> String {
        let mut out = String::new();
        let c = |out: &mut String, name: &str, help: &str, v: u64| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{node=\"{node}\"}} {v}\n"
            ));
        };
        c(
            &mut out,
            "ferry_migrations_total",
            "Migrations this node sent that completed.",
            load(&self.migrations_ok),
        );
        c(
            &mut out,
            "ferry_migration_failures_total",
            "Migrations this node sent that failed.",
            load(&self.migrations_failed),
        );
        c(
            &mut out,
            "ferry_migrations_lost_total",
            "Migrations this node sent whose workload was lost after the switch.",
            load(&self.migrations_lost),
        );
        c(&mut out, "ferry_arrivals_total", "Workloads this node received.", load(&self.arrivals_ok));
        c(&mut out, "ferry_arrival_failures_total", "Arrivals undone.", load(&self.arrivals_failed));
        c(
            &mut out,
            "ferry_arrivals_lost_total",
            "Arrivals killed after the switch (the workload lost).",
            load(&self.arrivals_lost),
        );
        c(&mut out, "ferry_sent_bytes_total", "Bytes sent to other nodes.", load(&self.bytes_sent));
        c(
            &mut out,
            "ferry_received_bytes_total",
            "Bytes received from other nodes.",
            load(&self.bytes_received),
        );
        out.push_str("# HELP ferry_phase_seconds_total Time spent per migration phase.\n# TYPE ferry_phase_seconds_total counter\n");
        out.push_str("# HELP ferry_phase_count_total Phases run.\n# TYPE ferry_phase_count_total counter\n");
        if let Ok(m) = self.phases.lock() {
            for (phase, (secs, n)) in m.iter() {
                out.push_str(&format!(
                    "ferry_phase_seconds_total{{node=\"{node}\",phase=\"{phase}\"}} {secs}\n"
                ));
                out.push_str(&format!("ferry_phase_count_total{{node=\"{node}\",phase=\"{phase}\"}} {n}\n"));
            }
        }
        let d = self.last_downtime_s.lock().map(|d| *d).unwrap_or(0.0);
        out.push_str(&format!(
            "# HELP ferry_last_downtime_seconds Downtime of the last migration sent.\n# TYPE ferry_last_downtime_seconds gauge\nferry_last_downtime_seconds{{node=\"{node}\"}} {d}\n"
        ));
        out
    }
}

pub(crate) fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// One agent's state, shared by the threads serving its migrations.
pub(crate) struct Node {
    pub(crate) config: AgentConfig,
    pub(crate) ctx: Context,
    pub(crate) dialer: Arc<dyn Dialer>,
    pub(crate) journal: Journal,
    pub(crate) metrics: Metrics,
    /// One migration at a time per node: CRIU and the store are shared.
    pub(crate) busy: Mutex<()>,
    /// Frozen trees whose pages are being served (post-copy), by migration.
    pub(crate) pages: Mutex<HashMap<String, Arc<PageSource>>>,
    /// Packs of chunks streamed to this node ahead of their offer, by migration (the arrival
    /// takes them into its journal entry at the offer, or releases them when undone).
    pub(crate) streamed: Mutex<HashMap<String, Vec<[u8; 16]>>>,
}

impl Node {
    pub(crate) fn new(
        config: AgentConfig,
        ctx: Context,
        dialer: Box<dyn Dialer>,
    ) -> Result<Node, MigrateError> {
        let journal = Journal::open(&config.journal)?;
        Ok(Node {
            config,
            ctx,
            dialer: Arc::from(dialer),
            journal,
            metrics: Metrics::default(),
            busy: Mutex::new(()),
            pages: Mutex::new(HashMap::new()),
            streamed: Mutex::new(HashMap::new()),
        })
    }

    /// Takes the packs streamed to this node for `migration`.
    pub(crate) fn take_streamed(&self, migration: &str) -> Vec<[u8; 16]> {
        self.streamed.lock().ok().and_then(|mut s| s.remove(migration)).unwrap_or_default()
    }

    /// The frozen tree serving `migration`'s pages, if any.
    pub(crate) fn page_source(&self, migration: &str) -> Option<Arc<PageSource>> {
        self.pages.lock().ok()?.get(migration).cloned()
    }

    pub(crate) fn serve_pages_of(&self, migration: &str, source: Arc<PageSource>) {
        if let Ok(mut p) = self.pages.lock() {
            p.insert(migration.to_owned(), source);
        }
    }

    pub(crate) fn stop_serving_pages_of(&self, migration: &str) {
        if let Ok(mut p) = self.pages.lock() {
            p.remove(migration);
        }
    }

    /// This node's hello.
    pub(crate) fn hello(&self) -> Msg {
        let public = self.ctx.store.keys().public();
        Msg::Hello {
            protocol: PROTOCOL,
            node: self.config.name.clone(),
            ed25519: public.ed25519,
            x25519: public.x25519,
        }
    }

    /// Checks a peer's hello against the key its connection was authenticated by, and
    /// remembers a peer the cluster CA admitted (its key was not pinned) as a recipient, so
    /// that checkpoints can be encrypted for it and its manifests verified, as with a pin.
    pub(crate) fn learn_peer(
        &self,
        ch: &Channel,
        ed25519: [u8; 32],
        x25519: [u8; 32],
    ) -> Result<(), MigrateError> {
        if ch.peer_key.is_some_and(|k| k != ed25519) {
            return Err(MigrateError::Refused(format!(
                "{} says hello with a key other than its certificate's",
                ch.node
            )));
        }
        let dir = self.ctx.store.keys_dir();
        let known = ferry_store::keys::recipients(&dir).map_err(ferry_store::StoreError::from)?;
        if known.iter().any(|(_, p)| p.ed25519 == ed25519 && p.x25519 == x25519) || ch.peer_key.is_none() {
            return Ok(());
        }
        let public = ferry_store::keys::NodePublic { ed25519, x25519 };
        match ferry_store::keys::add_recipient(&dir, &ch.node, &public) {
            Ok(()) => {
                tracing::info!(peer = %ch.node, "trusting the key of a peer the cluster CA admitted (keys/recipients/{}.pub)", ch.node);
                Ok(())
            }
            Err(e) => {
                // A different key pinned under that name: the pin wins; the migration will say so.
                tracing::warn!(peer = %ch.node, error = %e, "not remembering the CA-admitted peer's key");
                Ok(())
            }
        }
    }

    /// Opens a control channel to `node` and says hello.
    pub(crate) fn connect(&self, node: &str) -> Result<Channel, MigrateError> {
        let (ch, ed25519, x25519) = self.connector_with_keys(node)()?;
        self.learn_peer(&ch, ed25519, x25519)?;
        Ok(ch)
    }

    /// [`Node::connect`] to `node`, to be called later, on another thread, as often as
    /// needed (the peer is known by then).
    pub(crate) fn connector(
        &self,
        node: &str,
    ) -> impl Fn() -> Result<Channel, MigrateError> + Send + Sync + 'static {
        let dialer = self.dialer.clone();
        let addr = self.config.peers.get(node).copied();
        let node = node.to_owned();
        let hello = self.hello();
        move || connect_with(&*dialer, addr, &node, &hello).map(|(ch, _, _)| ch)
    }

    /// A connection to `node` and its hello's keys, on call.
    fn connector_with_keys(
        &self,
        node: &str,
    ) -> impl FnOnce() -> Result<(Channel, [u8; 32], [u8; 32]), MigrateError> + Send + 'static {
        let dialer = self.dialer.clone();
        let addr = self.config.peers.get(node).copied();
        let node = node.to_owned();
        let hello = self.hello();
        move || connect_with(&*dialer, addr, &node, &hello)
    }

    /// Removes the checkpoints made for a migration from this node's store, and the packs
    /// written for them.
    pub(crate) fn cleanup(&self, entry: &crate::journal::Entry) {
        for name in &entry.checkpoints {
            if let Err(e) = ferry_runtime::remove(&self.ctx.store, name, false) {
                tracing::debug!(%name, error = %e, "could not remove a migration checkpoint");
            }
        }
        match self.ctx.store.release_packs(&entry.packs) {
            Ok(freed) => tracing::debug!(freed, "released the migration's packs"),
            Err(e) => tracing::warn!(error = %e, "could not release the migration's packs (`ferry gc` will)"),
        }
    }

    /// Has the runtime of container `workload` (`KIND:NAME`) kill and forget it.
    pub(crate) fn discard_container(&self, workload: &str) {
        let Some((kind, name)) = workload.split_once(':') else { return };
        match ferry_runtime::container::open(kind, &self.ctx.endpoints) {
            Ok(rt) => rt.discard(name),
            Err(e) => tracing::warn!(%workload, error = %e, "cannot remove the container"),
        }
    }

    /// Where the target stands with `entry`'s migration (its journaled phase, and for `Lost`
    /// why), or an error if it cannot be asked now.
    pub(crate) fn arrival_status(
        &self,
        entry: &crate::journal::Entry,
    ) -> Result<(Option<crate::phase::Phase>, Option<String>), MigrateError> {
        let mut ch = self.connect(&entry.peer)?;
        match ch.call(&Msg::ArrivalStatus { migration: entry.migration.clone() }, "arrival status")? {
            Msg::ArrivalIs { phase, lost } => Ok((phase, lost)),
            other => Err(crate::peer::unexpected("arrival status", &other)),
        }
    }

    /// Tells the target it may forget `migration` (the source has acted on its outcome).
    pub(crate) fn tell_forget(&self, peer: &str, migration: &str) -> Result<(), MigrateError> {
        let mut ch = self.connect(peer)?;
        ch.send(&Msg::Forget { migration: migration.to_owned() })?;
        // Its answer tells that it was read (or an error that it could not be).
        match ch.recv("forget")? {
            Msg::Forgotten => Ok(()),
            other => Err(crate::peer::unexpected("forget", &other)),
        }
    }
}

/// As [`images_in_scratch`], for a restore through ferry's pager: every image but the pages
/// (`ferry_runtime::write_images_for_pager`), and the pages' plan; without a plan (a container,
/// or images that do not suit the pager) every image is written.
pub(crate) fn images_for_pager(
    store: &ferry_store::Store,
    label: &str,
    checkpoint: &ferry_store::Checkpoint,
) -> Result<(ferry_sys::PrivateTmpfs, PathBuf, Option<ferry_runtime::PagePlan>), MigrateError> {
    let (scratch, images) = scratch_images(store, label)?;
    let plan = ferry_runtime::write_images_for_pager(checkpoint, store, &images)?;
    Ok((scratch, images, plan))
}

/// A checkpoint's images, verified, in a private tmpfs of the store's (named after `label`):
/// what a restore (`target`) and a restarted source serving pages (`recover`) read.
pub(crate) fn images_in_scratch(
    store: &ferry_store::Store,
    label: &str,
    checkpoint: &ferry_store::Checkpoint,
) -> Result<(ferry_sys::PrivateTmpfs, PathBuf), MigrateError> {
    let (scratch, images) = scratch_images(store, label)?;
    checkpoint.materialize(store, &images)?;
    Ok((scratch, images))
}

/// A private tmpfs of the store's (named after `label`) with an empty `images` directory.
fn scratch_images(
    store: &ferry_store::Store,
    label: &str,
) -> Result<(ferry_sys::PrivateTmpfs, PathBuf), MigrateError> {
    let scratch = store.scratch(label)?;
    let images = scratch.path().join("images");
    std::fs::create_dir(&images).map_err(|source| MigrateError::Io {
        action: "create",
        path: images.clone(),
        source,
    })?;
    Ok((scratch, images))
}

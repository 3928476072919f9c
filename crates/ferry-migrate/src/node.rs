//! What an agent holds for the migrations it takes part in, whichever side: its configuration,
//! store, journal, peers and counters, and the registries the connections of one migration
//! share (frozen trees serving pages, chunks streamed ahead of an offer). The phases of
//! `source`, `target`, `pages` and `recover` work on a [`Node`]; the public entry points are
//! in `agent`.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use ferry_lab::LabConfig;
use ferry_runtime::Context;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

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

/// Label of the phase histogram: the phase's name as the report gives it.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

/// From 1 ms to about 9 min, doubling: a phase ranges from a commit's milliseconds to the
/// transfer of many GiB.
fn phase_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// What the metrics endpoint exposes, as the Prometheus client's types (shared atomics inside:
/// a registry made at each scrape holds handles to them).
#[derive(Debug)]
pub struct Metrics {
    pub migrations_ok: Counter,
    pub migrations_failed: Counter,
    /// Migrations this node sent whose workload was lost after the switch.
    pub migrations_lost: Counter,
    pub arrivals_ok: Counter,
    pub arrivals_failed: Counter,
    /// Arrivals killed after the switch (the workload lost).
    pub arrivals_lost: Counter,
    pub bytes_sent: Counter,
    pub bytes_received: Counter,
    /// Seconds per phase of the migrations this node sent.
    phases: Family<PhaseLabel, Histogram, fn() -> Histogram>,
    /// Downtime of the migrations this node sent.
    downtime: Histogram,
    last_downtime_s: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            migrations_ok: Counter::default(),
            migrations_failed: Counter::default(),
            migrations_lost: Counter::default(),
            arrivals_ok: Counter::default(),
            arrivals_failed: Counter::default(),
            arrivals_lost: Counter::default(),
            bytes_sent: Counter::default(),
            bytes_received: Counter::default(),
            phases: Family::new_with_constructor(phase_buckets),
            // From 1 ms to about 65 s, doubling: downtime targets are sub-second.
            downtime: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            last_downtime_s: Gauge::default(),
        }
    }
}

impl Metrics {
    pub(crate) fn record(&self, report: &Report) {
        for p in &report.phases {
            self.phases.get_or_create(&PhaseLabel { phase: p.name.clone() }).observe(p.seconds);
        }
        self.downtime.observe(report.downtime_s);
        self.last_downtime_s.set(report.downtime_s);
        self.bytes_sent.inc_by(report.bytes_sent);
    }

    /// The OpenMetrics text exposition (which Prometheus reads), every sample labelled with
    /// `node`. Counter names get their `_total` from the encoder.
    pub fn render(&self, node: &str) -> String {
        let mut r =
            Registry::with_labels(std::iter::once((Cow::Borrowed("node"), Cow::Owned(node.to_owned()))));
        let counters: [(&str, &str, &Counter); 8] = [
            ("ferry_migrations", "Migrations this node sent that completed", &self.migrations_ok),
            ("ferry_migration_failures", "Migrations this node sent that failed", &self.migrations_failed),
            (
                "ferry_migrations_lost",
                "Migrations this node sent whose workload was lost after the switch",
                &self.migrations_lost,
            ),
            ("ferry_arrivals", "Workloads this node received", &self.arrivals_ok),
            ("ferry_arrival_failures", "Arrivals undone", &self.arrivals_failed),
            (
                "ferry_arrivals_lost",
                "Arrivals killed after the switch (the workload lost)",
                &self.arrivals_lost,
            ),
            ("ferry_sent_bytes", "Bytes sent to other nodes", &self.bytes_sent),
            ("ferry_received_bytes", "Bytes received from other nodes", &self.bytes_received),
        ];
        for (name, help, value) in counters {
            r.register(name, help, value.clone());
        }
        r.register_with_unit(
            "ferry_phase_duration",
            "Time spent per phase of the migrations this node sent",
            Unit::Seconds,
            self.phases.clone(),
        );
        r.register_with_unit(
            "ferry_downtime",
            "Downtime of the migrations this node sent (freeze to running on the target)",
            Unit::Seconds,
            self.downtime.clone(),
        );
        r.register_with_unit(
            "ferry_last_downtime",
            "Downtime of the last migration this node sent",
            Unit::Seconds,
            self.last_downtime_s.clone(),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing test should stop right there
mod tests {
    use super::*;
    use crate::api::{PhaseTime, Strategy};
    use ferry_testkit::{metric, parse_metrics};

    fn report(downtime_s: f64, transfer_s: f64) -> Report {
        Report {
            migration: "m".into(),
            workload: "pid:1".into(),
            from: "a".into(),
            to: "b".into(),
            strategy: Strategy::StopCopy,
            reason: String::new(),
            phases: vec![
                PhaseTime { name: "dump".into(), seconds: 0.25 },
                PhaseTime { name: "transfer".into(), seconds: transfer_s },
            ],
            bytes_sent: 1000,
            logical_bytes: 2000,
            downtime_s,
            total_s: 3.0,
            new_workload: "pid:2".into(),
            ip: None,
        }
    }

    #[test]
    fn the_exposition_has_counters_and_histograms_of_phases_and_downtime() {
        let m = Metrics::default();
        m.migrations_ok.inc();
        m.bytes_received.inc_by(7);
        m.record(&report(0.003, 1.5));
        m.record(&report(0.5, 3.0));
        let text = m.render("n1");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# TYPE ferry_phase_duration_seconds histogram"), "{text}");
        assert!(text.contains("# TYPE ferry_downtime_seconds histogram"), "{text}");
        let s = parse_metrics(&text).unwrap();
        assert!(s.iter().all(|s| s.labels.get("node").map(String::as_str) == Some("n1")), "{text}");
        let get = |name: &str, labels: &[(&str, &str)]| metric(&s, name, labels);
        assert_eq!(get("ferry_migrations_total", &[]), Some(1.0), "{text}");
        assert_eq!(get("ferry_migration_failures_total", &[]), Some(0.0));
        assert_eq!(get("ferry_sent_bytes_total", &[]), Some(2000.0));
        assert_eq!(get("ferry_received_bytes_total", &[]), Some(7.0));
        let transfer = [("phase", "transfer")];
        assert_eq!(get("ferry_phase_duration_seconds_count", &transfer), Some(2.0));
        assert_eq!(get("ferry_phase_duration_seconds_sum", &transfer), Some(4.5));
        // Buckets are cumulative: 1.5 s is in le=2.048, not in le=1.024; both in +Inf.
        let bucket =
            |le: &str| get("ferry_phase_duration_seconds_bucket", &[("phase", "transfer"), ("le", le)]);
        assert_eq!((bucket("1.024"), bucket("2.048"), bucket("+Inf")), (Some(0.0), Some(1.0), Some(2.0)));
        assert_eq!(get("ferry_phase_duration_seconds_count", &[("phase", "dump")]), Some(2.0));
        assert_eq!(get("ferry_downtime_seconds_count", &[]), Some(2.0));
        assert_eq!(get("ferry_downtime_seconds_bucket", &[("le", "0.004")]), Some(1.0));
        assert_eq!(get("ferry_last_downtime_seconds", &[]), Some(0.5));
    }
}

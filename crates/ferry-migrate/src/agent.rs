//! The agent's side of migration: configuration, connections to peers, counters, and the
//! entry points ferryd calls (a migration asked for locally, a connection from a peer, and
//! recovery at start).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ferry_lab::LabConfig;
use ferry_runtime::Context;

use crate::api::{Event, MigrateRequest, NodeStatus, Report};
use crate::journal::Journal;
use crate::proto::{Msg, KIND_MSG, PEER_CAP, PROTOCOL};
use crate::MigrateError;

/// A byte stream to a peer (mutual TLS in ferryd; anything in tests).
pub trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// Opens authenticated connections to peers.
pub trait Dialer: Send + Sync {
    /// A connection to `node` at `addr`, and the Ed25519 key its peer was authenticated by.
    fn dial(&self, node: &str, addr: SocketAddr) -> Result<(Box<dyn Conn>, [u8; 32]), MigrateError>;
}

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
}

/// Counters for the metrics endpoint.
#[derive(Debug, Default)]
pub struct Metrics {
    pub migrations_ok: AtomicU64,
    pub migrations_failed: AtomicU64,
    pub arrivals_ok: AtomicU64,
    pub arrivals_failed: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    /// Sum of seconds per phase name, and the last downtime.
    pub phases: Mutex<BTreeMap<String, (f64, u64)>>,
    pub last_downtime_s: Mutex<f64>,
}

impl Metrics {
    fn record(&self, report: &Report) {
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
        c(&mut out, "ferry_arrivals_total", "Workloads this node received.", load(&self.arrivals_ok));
        c(&mut out, "ferry_arrival_failures_total", "Arrivals undone.", load(&self.arrivals_failed));
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

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

/// A node's migration agent.
pub struct Agent {
    pub(crate) config: AgentConfig,
    pub(crate) ctx: Context,
    pub(crate) dialer: std::sync::Arc<dyn Dialer>,
    pub(crate) journal: Journal,
    pub metrics: Metrics,
    /// One migration at a time per node: CRIU and the store are shared.
    pub(crate) busy: Mutex<()>,
    /// Frozen trees whose pages are being served (post-copy), by migration.
    pub(crate) pages: Mutex<std::collections::HashMap<String, std::sync::Arc<crate::lazy::PageSource>>>,
    /// Packs of chunks streamed to this node ahead of their offer, by migration (the arrival
    /// takes them into its journal entry at the offer, or releases them when undone).
    pub(crate) streamed: Mutex<std::collections::HashMap<String, Vec<[u8; 16]>>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("name", &self.config.name).finish_non_exhaustive()
    }
}

impl Agent {
    pub fn new(config: AgentConfig, ctx: Context, dialer: Box<dyn Dialer>) -> Result<Agent, MigrateError> {
        let journal = Journal::open(&config.journal)?;
        Ok(Agent {
            config,
            ctx,
            dialer: std::sync::Arc::from(dialer),
            journal,
            metrics: Metrics::default(),
            busy: Mutex::new(()),
            pages: Mutex::new(Default::default()),
            streamed: Mutex::new(Default::default()),
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Takes the packs streamed to this node for `migration`.
    pub(crate) fn take_streamed(&self, migration: &str) -> Vec<[u8; 16]> {
        self.streamed.lock().ok().and_then(|mut s| s.remove(migration)).unwrap_or_default()
    }

    pub fn status(&self) -> NodeStatus {
        NodeStatus {
            name: self.config.name.clone(),
            listen: self.config.listen.clone(),
            peers: self.config.peers.keys().cloned().collect(),
            public_key: self.ctx.store.keys().public().to_text(),
            migrations_ok: load(&self.metrics.migrations_ok),
            migrations_failed: load(&self.metrics.migrations_failed),
        }
    }

    /// Migrates a workload of this node (the source side), streaming events to `events`.
    pub fn migrate(
        &self,
        req: &MigrateRequest,
        events: &mut dyn FnMut(Event),
    ) -> Result<Report, MigrateError> {
        let _one = self.busy.lock().map_err(|_| MigrateError::protocol("agent lock poisoned"))?;
        let result = crate::source::migrate(self, req, events);
        match &result {
            Ok(r) => {
                self.metrics.migrations_ok.fetch_add(1, Ordering::Relaxed);
                self.metrics.record(r);
            }
            Err(_) => {
                self.metrics.migrations_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }

    /// Serves one connection from an authenticated peer (the target side, or an outcome query).
    /// `peer_key`: the Ed25519 key the connection's peer was authenticated by.
    pub fn serve_peer(
        &self,
        conn: Box<dyn Conn>,
        peer: &str,
        peer_key: [u8; 32],
    ) -> Result<(), MigrateError> {
        let mut ch = Channel::new(conn, peer);
        ch.peer_key = Some(peer_key);
        crate::target::serve(self, ch)
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

    /// Finishes or undoes what a crash interrupted (run at start, before serving).
    pub fn recover(&self) -> Vec<String> {
        crate::recover::run(self)
    }

    /// After `recover`, once this agent serves its peers: brings back the addresses of
    /// workloads whose migration was not committed, when their targets hold no copy (in the
    /// background).
    pub fn settle(self: &std::sync::Arc<Self>) {
        let agent = self.clone();
        std::thread::spawn(move || crate::recover::settle(&agent));
    }

    /// Opens a control channel to `node` and says hello.
    pub(crate) fn connect(&self, node: &str) -> Result<Channel, MigrateError> {
        let (ch, ed25519, x25519) = self.connector_with_keys(node)()?;
        self.learn_peer(&ch, ed25519, x25519)?;
        Ok(ch)
    }

    /// [`Agent::connect`] to `node`, to be called later, on another thread (the peer is known
    /// by then).
    pub(crate) fn connector(
        &self,
        node: &str,
    ) -> impl FnOnce() -> Result<Channel, MigrateError> + Send + 'static {
        let connect = self.connector_with_keys(node);
        move || connect().map(|(ch, _, _)| ch)
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
}

fn connect_with(
    dialer: &dyn Dialer,
    addr: Option<SocketAddr>,
    node: &str,
    hello: &Msg,
) -> Result<(Channel, [u8; 32], [u8; 32]), MigrateError> {
    let addr = addr.ok_or_else(|| MigrateError::UnknownNode(node.into()))?;
    let (conn, peer_key) = dialer.dial(node, addr)?;
    let mut ch = Channel::new(conn, node);
    ch.peer_key = Some(peer_key);
    ch.send(hello)?;
    match ch.recv("hello")? {
        Msg::Hello { protocol, ed25519, x25519, .. } if protocol == PROTOCOL => {
            if ed25519 != peer_key {
                return Err(MigrateError::Refused(format!(
                    "{node} says hello with a key other than its certificate's"
                )));
            }
            Ok((ch, ed25519, x25519))
        }
        Msg::Hello { protocol, .. } => Err(MigrateError::Refused(format!(
            "node {node} speaks migration protocol {protocol}, this node {PROTOCOL}: run the same ferry version"
        ))),
        other => Err(unexpected("hello", &other)),
    }
}

/// A control connection: postcard messages in frames, and chunk batches.
pub(crate) struct Channel {
    pub(crate) conn: Box<dyn Conn>,
    pub(crate) node: String,
    /// The Ed25519 key the peer was authenticated by (TLS), when known.
    pub(crate) peer_key: Option<[u8; 32]>,
}

impl Channel {
    pub(crate) fn new(conn: Box<dyn Conn>, node: &str) -> Channel {
        Channel { conn, node: node.to_owned(), peer_key: None }
    }

    pub(crate) fn send(&mut self, msg: &Msg) -> Result<(), MigrateError> {
        ferry_wire::frame::send(&mut self.conn, KIND_MSG, msg)?;
        self.conn.flush().map_err(|e| MigrateError::Wire(e.into()))
    }

    /// The next frame: a message, or (kind, payload) of another kind. EOF is an error.
    pub(crate) fn next(
        &mut self,
        phase: &str,
    ) -> Result<Result<Msg, ferry_wire::frame::Frame>, MigrateError> {
        let frame = ferry_wire::frame::read_frame(&mut self.conn, PEER_CAP)?
            .ok_or_else(|| MigrateError::Lost { node: self.node.clone(), phase: phase.into() })?;
        if frame.kind != KIND_MSG {
            return Ok(Err(frame));
        }
        Ok(Ok(ferry_wire::frame::decode_payload(&frame)?))
    }

    /// The next message; a peer's `Error` becomes [`MigrateError::Remote`].
    pub(crate) fn recv(&mut self, phase: &str) -> Result<Msg, MigrateError> {
        match self.next(phase)? {
            Ok(Msg::Error { message }) => Err(MigrateError::Remote { node: self.node.clone(), message }),
            Ok(m) => Ok(m),
            Err(f) => {
                Err(MigrateError::protocol(format!("unexpected frame of kind {:#x} during {phase}", f.kind)))
            }
        }
    }

    /// Sends `msg` and reads the answer.
    pub(crate) fn call(&mut self, msg: &Msg, phase: &str) -> Result<Msg, MigrateError> {
        self.send(msg)?;
        self.recv(phase)
    }
}

pub(crate) fn unexpected(phase: &str, msg: &Msg) -> MigrateError {
    let name = format!("{msg:?}");
    let name: String = name.chars().take_while(|c| c.is_alphanumeric()).collect();
    MigrateError::protocol(format!("unexpected message {name} during {phase}"))
}

/// How long a target waits for the source's next message once it runs the workload.
pub(crate) const COMMIT_WAIT: Duration = Duration::from_secs(60);

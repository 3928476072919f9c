//! ferryd: the node agent. A local API on a Unix socket (root only) for the CLI, a peer API
//! over mutual TLS for other agents, a Prometheus metrics endpoint, and the journal recovered
//! at start.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use serde::Deserialize;

use ferry_migrate::api::{Event, Request, API_CAP, KIND_API};
use ferry_migrate::{Agent, AgentConfig, Conn, Dialer, MigrateError};
use ferry_wire::tls::{CaCert, Endpoint, Identity, Trust};

/// ferry's node agent.
#[derive(Debug, Parser)]
#[command(name = "ferryd", version, about, max_term_width = 100)]
struct Cli {
    /// Config file (TOML); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's name.
    #[arg(long)]
    name: Option<String>,
    /// Address of the peer API (mutual TLS), e.g. 198.18.1.1:7711.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Local API socket.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Checkpoint store.
    #[arg(long)]
    store: Option<PathBuf>,
    /// Address of the Prometheus metrics endpoint.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// A peer, as NAME=ADDR (repeatable).
    #[arg(long = "peer", value_name = "NAME=ADDR")]
    peers: Vec<String>,
    /// State directory of the lab whose workloads' addresses move with them.
    #[arg(long)]
    lab_state: Option<PathBuf>,
    /// CRIU binary.
    #[arg(long)]
    criu: Option<PathBuf>,
    /// Where a container runtime is reached, as KIND=PATH (repeatable): runc's state
    /// directory or the API socket of podman, containerd or docker.
    #[arg(long = "runtime-endpoint", value_name = "KIND=PATH")]
    runtime_endpoints: Vec<String>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Seconds a peer may stay silent (or not take our data) before its connection is given up:
    /// a cut link then fails the migration (the source resumes) instead of hanging it.
    #[arg(long, env = "FERRY_PEER_TIMEOUT", default_value_t = 120)]
    peer_timeout: u64,
}

/// The config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: Option<String>,
    listen: Option<SocketAddr>,
    socket: Option<PathBuf>,
    store: Option<PathBuf>,
    metrics: Option<SocketAddr>,
    #[serde(default)]
    peers: BTreeMap<String, SocketAddr>,
    lab_state: Option<PathBuf>,
    criu: Option<PathBuf>,
    /// PEM of a cluster CA whose certificates are admitted besides pinned keys.
    cluster_ca: Option<PathBuf>,
    /// Container runtimes' endpoints by kind (`runc = "/run/runc"`).
    #[serde(default)]
    runtimes: BTreeMap<String, PathBuf>,
}

/// Largest config file read.
const MAX_CONFIG: u64 = 1 << 20;

struct Settings {
    name: String,
    listen: SocketAddr,
    socket: PathBuf,
    store: PathBuf,
    metrics: Option<SocketAddr>,
    peers: BTreeMap<String, SocketAddr>,
    lab_state: Option<PathBuf>,
    criu: Option<PathBuf>,
    cluster_ca: Option<PathBuf>,
    peer_timeout: u64,
    runtime_endpoints: Vec<String>,
}

fn settings(cli: Cli) -> Result<Settings> {
    let file = match &cli.config {
        Some(path) => {
            let md = fs::metadata(path).with_context(|| format!("cannot read config {}", path.display()))?;
            if md.len() > MAX_CONFIG {
                bail!("config {} is larger than {MAX_CONFIG} bytes", path.display());
            }
            let text =
                fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
            toml::from_str::<FileConfig>(&text)
                .with_context(|| format!("config {} is invalid", path.display()))?
        }
        None => FileConfig::default(),
    };
    let mut peers = file.peers;
    for p in &cli.peers {
        let (name, addr) = p.split_once('=').with_context(|| format!("--peer {p}: expected NAME=ADDR"))?;
        let addr: SocketAddr = addr.parse().with_context(|| format!("--peer {p}: bad address"))?;
        peers.insert(name.to_owned(), addr);
    }
    let name = cli.name.or(file.name).context("no node name: give --name or `name` in the config")?;
    let listen =
        cli.listen.or(file.listen).context("no peer address: give --listen or `listen` in the config")?;
    Ok(Settings {
        name,
        listen,
        socket: cli.socket.or(file.socket).unwrap_or_else(|| PathBuf::from("/run/ferry/ferryd.sock")),
        store: cli.store.or(file.store).unwrap_or_else(|| PathBuf::from("/var/lib/ferry")),
        metrics: cli.metrics.or(file.metrics),
        peers,
        lab_state: cli.lab_state.or(file.lab_state),
        criu: cli.criu.or(file.criu),
        cluster_ca: file.cluster_ca,
        peer_timeout: cli.peer_timeout,
        runtime_endpoints: file
            .runtimes
            .iter()
            .map(|(k, p)| format!("{k}={}", p.display()))
            .chain(cli.runtime_endpoints)
            .collect(),
    })
}

/// Dials peers over mutual TLS.
struct TlsDialer {
    endpoint: Arc<Endpoint>,
    timeout: Duration,
    keys_dir: PathBuf,
}

/// Pins in force for the next handshake: `ferry node trust` (a file in the store's keys)
/// takes effect without a restart, and so does removing a pin.
fn refresh_pins(endpoint: &Endpoint, keys_dir: &Path) {
    match ferry_store::keys::recipients(keys_dir) {
        Ok(r) => endpoint.set_pinned(r.into_iter().map(|(_, p)| p.ed25519).collect()),
        Err(e) => tracing::warn!(error = %e, "cannot read the trusted nodes; keeping the pins in force"),
    }
}

impl Dialer for TlsDialer {
    fn dial(&self, node: &str, addr: SocketAddr) -> Result<(Box<dyn Conn>, [u8; 32]), MigrateError> {
        refresh_pins(&self.endpoint, &self.keys_dir);
        let (stream, peer) = self.endpoint.connect(addr, Duration::from_secs(5)).map_err(|e| {
            MigrateError::Connect { node: node.into(), addr: addr.to_string(), detail: e.to_string() }
        })?;
        tracing::debug!(node, peer = %peer.name, "connected");
        with_timeouts(&stream, self.timeout);
        Ok((Box::new(stream), peer.key))
    }
}

/// A peer that stays silent, or stops taking data, this long is given up.
fn with_timeouts(stream: &ferry_wire::TlsStream, timeout: Duration) {
    if let Err(e) =
        stream.set_read_timeout(Some(timeout)).and_then(|()| stream.set_write_timeout(Some(timeout)))
    {
        tracing::warn!("cannot set the peer connection's timeouts: {e}");
    }
}

fn main() -> std::process::ExitCode {
    // `ferryd guard MIGRATION`: a post-copy arrival's guard, started by the agent itself.
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[1] == "guard" {
        return ferry_migrate::guard::run(&args[2]);
    }
    let cli = Cli::parse();
    init_logs(cli.log_json);
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ferryd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn run(cli: Cli) -> Result<()> {
    let s = settings(cli)?;
    let criu = ferry_criu::Criu::locate(s.criu.as_deref()).context("CRIU not found")?;
    let store = ferry_store::Store::open(&s.store)
        .with_context(|| format!("cannot open the store {}", s.store.display()))?;
    let ctx = ferry_runtime::Context::new(criu, store)
        .and_then(|c| c.with_endpoints(&s.runtime_endpoints))
        .context("this node cannot checkpoint")?;
    let keys_dir = ctx.store.keys_dir();
    let (identity, trust) =
        peer_trust(&keys_dir, &s.name, s.cluster_ca.as_deref(), &ctx.store.keys().identity_seed())?;
    let endpoint = Arc::new(Endpoint::new(&identity, trust).context("cannot set up TLS")?);
    let lab = match &s.lab_state {
        Some(d) => {
            let config = ferry_lab::LabConfig::from_state_dir(d).context("cannot read the lab's state")?;
            // This agent runs inside its node's namespace; the bridge is in the host's.
            ferry_lab::use_host_netns(config.host_netns_file());
            Some(config)
        }
        None => None,
    };
    let journal = s.store.join("journal");
    let peer_timeout = Duration::from_secs(s.peer_timeout.max(1));
    let config = AgentConfig {
        name: s.name.clone(),
        listen: s.listen.to_string(),
        peers: s.peers.clone(),
        journal,
        lab,
        guard: std::env::current_exe().ok().map(|exe| vec![exe.display().to_string(), "guard".to_owned()]),
        peer_timeout,
    };
    let dialer = TlsDialer { endpoint: endpoint.clone(), timeout: peer_timeout, keys_dir: keys_dir.clone() };
    let agent = Arc::new(Agent::new(config, ctx, Box::new(dialer))?);
    for line in agent.recover() {
        tracing::warn!("recovered: {line}");
    }

    let peers = TcpListener::bind(s.listen).with_context(|| format!("cannot listen on {}", s.listen))?;
    let local = bind_local(&s.socket)?;
    if let Some(addr) = s.metrics {
        let l = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr} for metrics"))?;
        let a = agent.clone();
        std::thread::spawn(move || serve_metrics(l, &a));
    }
    tracing::info!(node = %s.name, listen = %s.listen, socket = %s.socket.display(), "ferryd ready");
    {
        let a = agent.clone();
        std::thread::spawn(move || {
            for conn in local.incoming().flatten() {
                let a = a.clone();
                std::thread::spawn(move || serve_local(conn, &a));
            }
        });
    }
    agent.settle();
    for tcp in peers.incoming() {
        let Ok(tcp) = tcp else { continue };
        let a = agent.clone();
        let e = endpoint.clone();
        let k = keys_dir.clone();
        std::thread::spawn(move || {
            refresh_pins(&e, &k);
            serve_tcp(tcp, &e, &a, peer_timeout)
        });
    }
    Ok(())
}

/// This node's certificate, issued by the cluster CA (`ferry node ca issue`), if present.
const NODE_CERT_FILE: &str = "node-cert.pem";
/// The cluster CA this node trusts (`ferry node ca issue`), if present.
const CLUSTER_CA_FILE: &str = "cluster-ca.pem";
/// Largest certificate file read.
const MAX_CERT: u64 = 64 << 10;

/// This node's TLS identity and whom it admits. The identity: `keys/node-cert.pem` (issued
/// by the cluster CA for this node's key) if it exists, else a self-signed certificate. The
/// trust: the pinned keys (`ferry node trust`) and the cluster CA of the config's
/// `cluster_ca`, else of `keys/cluster-ca.pem`, if either exists.
fn peer_trust(
    keys_dir: &Path,
    name: &str,
    configured_ca: Option<&Path>,
    seed: &[u8; 32],
) -> Result<(Identity, Trust)> {
    let cert_file = keys_dir.join(NODE_CERT_FILE);
    let identity = match read_small(&cert_file)? {
        Some(cert) => Identity::from_cert(seed, &cert)
            .with_context(|| format!("cannot use this node's certificate {}", cert_file.display()))?,
        None => Identity::self_signed(seed, name).context("cannot make this node's TLS identity")?,
    };
    let pinned: Vec<[u8; 32]> = ferry_store::keys::recipients(keys_dir)
        .context("cannot read the trusted nodes")?
        .into_iter()
        .map(|(_, p)| p.ed25519)
        .collect();
    let in_store = keys_dir.join(CLUSTER_CA_FILE);
    let ca_file = match configured_ca {
        Some(p) => Some(p.to_path_buf()),
        None => in_store.exists().then_some(in_store.clone()),
    };
    let ca = match &ca_file {
        Some(p) => {
            let bytes =
                read_small(p)?.with_context(|| format!("the cluster CA {} does not exist", p.display()))?;
            let ca = CaCert::parse(&bytes)
                .with_context(|| format!("cannot use the cluster CA {}", p.display()))?;
            if configured_ca.is_some() && in_store.exists() {
                let stored = read_small(&in_store)?.and_then(|b| CaCert::parse(&b).ok());
                if stored.as_ref().map(|c| &c.der) != Some(&ca.der) {
                    tracing::warn!(
                        configured = %p.display(),
                        ignored = %in_store.display(),
                        "the config's cluster_ca is trusted, not the other CA in the store"
                    );
                }
            }
            Some(ca)
        }
        None => None,
    };
    let certificate = match identity.issuer() {
        Some(issuer) => format!("{} (issued by {issuer:?})", cert_file.display()),
        None => "self-signed".to_owned(),
    };
    match &ca {
        Some(ca) => tracing::info!(
            pinned = pinned.len(),
            cluster_ca = %ca.name,
            ca_file = %ca_file.as_deref().unwrap_or(Path::new("")).display(),
            %certificate,
            "peers admitted: pinned keys, and nodes the cluster CA issued certificates for"
        ),
        None => tracing::info!(pinned = pinned.len(), %certificate, "peers admitted: pinned keys only"),
    }
    if let (Some(ca), Some(_)) = (&ca, identity.issuer()) {
        if let Err(why) = ca.check_issued(&identity) {
            tracing::warn!(
                "peers that trust the cluster CA {:?} will refuse this node's certificate {}: {why}",
                ca.name,
                cert_file.display()
            );
        }
    }
    Ok((identity, Trust { pinned, ca: ca.map(|c| c.der) }))
}

/// A small file's bytes; `None` if it does not exist.
fn read_small(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::metadata(path) {
        Ok(md) if md.len() > MAX_CERT => bail!("{} is larger than {MAX_CERT} bytes", path.display()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    fs::read(path).map(Some).with_context(|| format!("cannot read {}", path.display()))
}

fn bind_local(socket: &Path) -> Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    if UnixStream::connect(socket).is_ok() {
        bail!("another ferryd answers on {}", socket.display());
    }
    let _ = fs::remove_file(socket);
    let l = UnixListener::bind(socket).with_context(|| format!("cannot bind {}", socket.display()))?;
    // Root only: the local API can move any workload of this node.
    fs::set_permissions(socket, fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

fn serve_tcp(tcp: TcpStream, endpoint: &Endpoint, agent: &Agent, timeout: Duration) {
    let from = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    match endpoint.accept(tcp) {
        Ok((stream, peer)) => {
            with_timeouts(&stream, timeout);
            tracing::info!(%from, peer = %peer.name, "peer connected");
            if let Err(e) = agent.serve_peer(Box::new(stream), &peer.name, peer.key) {
                tracing::error!(peer = %peer.name, "{e}");
            }
        }
        Err(e) => tracing::warn!(%from, "refused a peer: {e}"),
    }
}

fn serve_local(mut conn: UnixStream, agent: &Agent) {
    let req: Request = match ferry_wire::frame::recv(&mut conn, API_CAP) {
        Ok(Some((_, r))) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!("bad local request: {e}");
            return;
        }
    };
    let mut out = conn.try_clone();
    let mut send = |ev: &Event| {
        if let Ok(w) = out.as_mut() {
            let _ = ferry_wire::frame::send(w, KIND_API, ev);
        }
    };
    match req {
        Request::Status => send(&Event::Status(agent.status())),
        Request::TargetFacts { node, cpuinfo, container, tree } => {
            match agent.target_facts(&node, cpuinfo.as_deref(), container.as_deref(), tree.as_ref()) {
                Ok(facts) => send(&Event::TargetFacts(facts)),
                Err(e) => send(&Event::Failed { message: ferry_migrate::chain(&e), hint: e.hint() }),
            }
        }
        Request::Migrate(m) => {
            let result = agent.migrate(&m, &mut |ev| send(&ev));
            match result {
                Ok(report) => send(&Event::Report(report)),
                Err(ferry_migrate::MigrateError::WorkloadLost { reason, at, resumed }) => {
                    send(&Event::Lost { message: reason, at, resumed })
                }
                Err(e) => send(&Event::Failed { message: ferry_migrate::chain(&e), hint: e.hint() }),
            }
        }
    }
}

/// A minimal HTTP responder for Prometheus: any GET gets the metrics, in the OpenMetrics text
/// format the Prometheus client library writes.
fn serve_metrics(l: TcpListener, agent: &Agent) {
    for conn in l.incoming().flatten() {
        let mut conn = conn;
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf);
        let body = agent.metrics().render(agent.name());
        let _ = write!(
            conn,
            "HTTP/1.0 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    }
}

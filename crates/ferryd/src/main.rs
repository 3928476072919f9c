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
use ferry_wire::tls::{Endpoint, Identity, Trust};

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
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
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
    })
}

/// Dials peers over mutual TLS.
struct TlsDialer {
    endpoint: Arc<Endpoint>,
}

impl Dialer for TlsDialer {
    fn dial(&self, node: &str, addr: SocketAddr) -> Result<Box<dyn Conn>, MigrateError> {
        let (stream, peer) = self.endpoint.connect(addr, Duration::from_secs(5)).map_err(|e| {
            MigrateError::Connect { node: node.into(), addr: addr.to_string(), detail: e.to_string() }
        })?;
        tracing::debug!(node, peer = %peer.name, "connected");
        Ok(Box::new(stream))
    }
}

fn main() -> std::process::ExitCode {
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
    let ctx = ferry_runtime::Context::new(criu, store).context("this node cannot checkpoint")?;
    let keys_dir = ctx.store.keys_dir();
    let identity = Identity::self_signed(&ctx.store.keys().identity_seed(), &s.name)
        .context("cannot make this node's TLS identity")?;
    let pinned = ferry_store::keys::recipients(&keys_dir)
        .context("cannot read the trusted nodes")?
        .into_iter()
        .map(|(_, p)| p.ed25519)
        .collect();
    let ca = match &s.cluster_ca {
        Some(p) => Some(fs::read(p).with_context(|| format!("cannot read the cluster CA {}", p.display()))?),
        None => None,
    };
    let endpoint = Arc::new(Endpoint::new(&identity, Trust { pinned, ca }).context("cannot set up TLS")?);
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
    let config = AgentConfig {
        name: s.name.clone(),
        listen: s.listen.to_string(),
        peers: s.peers.clone(),
        journal,
        lab,
    };
    let agent = Arc::new(Agent::new(config, ctx, Box::new(TlsDialer { endpoint: endpoint.clone() }))?);
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
    for tcp in peers.incoming() {
        let Ok(tcp) = tcp else { continue };
        let a = agent.clone();
        let e = endpoint.clone();
        std::thread::spawn(move || serve_tcp(tcp, &e, &a));
    }
    Ok(())
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

fn serve_tcp(tcp: TcpStream, endpoint: &Endpoint, agent: &Agent) {
    let from = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    match endpoint.accept(tcp) {
        Ok((stream, peer)) => {
            tracing::info!(%from, peer = %peer.name, "peer connected");
            if let Err(e) = agent.serve_peer(Box::new(stream), &peer.name) {
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
        Request::Migrate(m) => {
            let result = agent.migrate(&m, &mut |ev| send(&ev));
            match result {
                Ok(report) => send(&Event::Report(report)),
                Err(e) => send(&Event::Failed { message: ferry_migrate::chain(&e), hint: e.hint() }),
            }
        }
    }
}

/// A minimal HTTP responder for Prometheus: any GET gets the counters.
fn serve_metrics(l: TcpListener, agent: &Agent) {
    for conn in l.incoming().flatten() {
        let mut conn = conn;
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf);
        let body = agent.metrics.render(agent.name());
        let _ = write!(
            conn,
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    }
}

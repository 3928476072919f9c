//! Agents for the nodes of a lab: each node gets a store (keys sharing one hashing key, every
//! node trusting every other), and a ferryd in its network namespace listening on the node's
//! address. `ferry lab up` and the tests use this same code.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_lab::Lab;
use ferry_store::keys::{add_recipient, NodeKeys};

use crate::MigrateError;

/// Port of the peer API on every lab node.
pub const PEER_PORT: u16 = 7711;
/// Port of the metrics endpoint on every lab node.
pub const METRICS_PORT: u16 = 9711;

/// Where node `node`'s agent keeps its store and log in the lab whose state is in `state_dir`
/// (on disk: see [`ferry_lab::data_dir`]).
pub fn node_dir(state_dir: &Path, node: &str) -> PathBuf {
    ferry_lab::data_dir(state_dir).join("nodes").join(node)
}

/// The local API socket of `node`'s agent (beside the lab's state).
pub fn agent_socket(state_dir: &Path, node: &str) -> PathBuf {
    state_dir.join("nodes").join(node).join("ferryd.sock")
}

/// Where `node`'s private instance of each container runtime keeps its state (its data
/// beside the node's store, its sockets beside the agent's).
pub fn runtime_dirs(lab: &Lab, node: &str) -> Result<ferry_runtime::container::InstanceDirs, MigrateError> {
    let state_dir = lab.config().state_dir();
    let n = lab.node(node)?;
    Ok(ferry_runtime::container::InstanceDirs {
        data: node_dir(state_dir, node).join("runtimes"),
        run: state_dir.join("nodes").join(node).join("rt"),
        netns: Some(n.netns_path()),
        cgroup_parent: format!("/ferry-lab/{}/{node}", lab.config().name().unwrap_or("default")),
    })
}

/// `KIND=PATH` for every container runtime of `node` (whether its instance runs or not).
pub fn runtime_endpoints(lab: &Lab, node: &str) -> Result<Vec<String>, MigrateError> {
    let dirs = runtime_dirs(lab, node)?;
    let mut out = Vec::new();
    for k in ferry_runtime::container::KINDS {
        let path = ferry_runtime::container::instance_endpoint(k.name, &dirs)?;
        out.push(format!("{}={}", k.name, path.display()));
    }
    Ok(out)
}

/// Starts `node`'s instance of runtime `kind` unless it runs; returns its endpoint.
pub fn start_runtime(lab: &Lab, node: &str, kind: &str) -> Result<PathBuf, MigrateError> {
    let dirs = runtime_dirs(lab, node)?;
    Ok(ferry_runtime::container::start_instance(kind, &dirs)?)
}

/// Stops every runtime instance of every node (their containers, daemons and mounts).
pub fn stop_runtimes(lab: &Lab) {
    for node in lab.nodes() {
        if let Ok(dirs) = runtime_dirs(lab, &node.name) {
            for k in ferry_runtime::container::KINDS {
                ferry_runtime::container::stop_instance(k.name, &dirs);
            }
        }
    }
}

/// Starts `node`'s agent (its store prepared by [`start_agents`]), with `env` added to its
/// environment; does not wait for it.
pub fn spawn_agent(
    lab: &Lab,
    node: &str,
    ferryd: &Path,
    criu: Option<&Path>,
    env: &[(&str, &str)],
) -> Result<PathBuf, MigrateError> {
    let state_dir = lab.config().state_dir().to_path_buf();
    let nodes = lab.nodes();
    let node = lab.node(node)?;
    let dir = node_dir(&state_dir, &node.name);
    let socket = agent_socket(&state_dir, &node.name);
    let _ = fs::remove_file(&socket);
    let log = dir.join("ferryd.log");
    let out = OpenOptions::new().create(true).append(true).open(&log).map_err(|source| MigrateError::Io {
        action: "open",
        path: log.clone(),
        source,
    })?;
    let err =
        out.try_clone().map_err(|source| MigrateError::Io { action: "open", path: log.clone(), source })?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", node.netns_path().display()))
        .arg("--")
        .arg("setsid")
        .arg(ferryd)
        .args(["--name", &node.name])
        .arg("--listen")
        .arg(format!("{}:{PEER_PORT}", node.ip))
        .arg("--metrics")
        .arg(format!("{}:{METRICS_PORT}", node.ip))
        .arg("--socket")
        .arg(&socket)
        .arg("--store")
        .arg(dir.join("store"))
        .arg("--lab-state")
        .arg(&state_dir);
    if let Some(criu) = criu {
        cmd.arg("--criu").arg(criu);
    }
    for other in nodes.iter().filter(|o| o.name != node.name) {
        cmd.arg("--peer").arg(format!("{}={}:{PEER_PORT}", other.name, other.ip));
    }
    for endpoint in runtime_endpoints(lab, &node.name)? {
        cmd.arg("--runtime-endpoint").arg(endpoint);
    }
    cmd.envs(env.iter().copied());
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    cmd.spawn().map_err(|source| MigrateError::Io { action: "start", path: ferryd.to_path_buf(), source })?;
    Ok(socket)
}

/// Waits until the agent at `socket` answers, for up to `limit`.
pub fn wait_agent(socket: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if crate::client::call(socket, &crate::api::Request::Status, &mut |_| {}).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Prepares every node's store and starts its agent (`ferryd` at `ferryd`); returns once
/// every agent answers on its socket.
pub fn start_agents(lab: &Lab, ferryd: &Path, criu: Option<&Path>) -> Result<Vec<PathBuf>, MigrateError> {
    prepare_stores(lab)?;
    let state_dir = lab.config().state_dir().to_path_buf();
    let nodes = lab.nodes();
    let mut sockets = Vec::new();
    for node in nodes {
        sockets.push(spawn_agent(lab, &node.name, ferryd, criu, &[])?);
    }
    for (socket, node) in sockets.iter().zip(nodes) {
        if !wait_agent(socket, Duration::from_secs(20)) {
            let log = node_dir(&state_dir, &node.name).join("ferryd.log");
            let tail = fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            return Err(MigrateError::Connect {
                node: node.name.clone(),
                addr: socket.display().to_string(),
                detail: format!("its agent did not start (log {}: {})", log.display(), tail.join(" | ")),
            });
        }
    }
    Ok(sockets)
}

/// Every node's store: keys sharing one hashing key (so chunk ids match across the nodes),
/// each node trusting every other.
pub fn prepare_stores(lab: &Lab) -> Result<(), MigrateError> {
    let state_dir = lab.config().state_dir().to_path_buf();
    let nodes = lab.nodes();
    let mut hash_key: Option<[u8; 32]> = None;
    let mut publics = Vec::new();
    for node in nodes {
        let store_dir = node_dir(&state_dir, &node.name).join("store");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&store_dir)
            .map_err(|source| MigrateError::Io { action: "create", path: store_dir.clone(), source })?;
        let keys_dir = store_dir.join("keys");
        let keys = match hash_key {
            None => NodeKeys::load_or_init(&keys_dir),
            Some(k) if !keys_dir.join("node.key").exists() => NodeKeys::init_with_hash_key(&keys_dir, &k),
            Some(_) => NodeKeys::load(&keys_dir),
        }
        .map_err(ferry_store::StoreError::from)?;
        hash_key.get_or_insert(*keys.hash_key());
        publics.push((node.name.clone(), keys_dir, keys.public()));
    }
    for (name, dir, _) in &publics {
        for (other, _, public) in &publics {
            if other != name {
                add_recipient(dir, other, public).map_err(ferry_store::StoreError::from)?;
            }
        }
    }
    Ok(())
}

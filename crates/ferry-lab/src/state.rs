//! The state file: what a lab created, written before each object is created so that a crash
//! at any point leaves a record `lab down` can follow (it also sweeps by name, for the case
//! where the file itself is lost).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{LabConfig, LabError, Subnet};

const VERSION: u32 = 1;

/// The bridge in the root namespace that joins nodes, workloads and this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bridge {
    pub name: String,
    /// Its address: this machine's address in the lab.
    pub ip: Ipv4Addr,
}

/// A node: a network namespace with one veth on the bridge, where an agent will run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// `node1`, `node2`, ...
    pub name: String,
    /// 1-based number, which picks the node's block of addresses.
    pub index: usize,
    /// Its network namespace (`/run/netns/NETNS`).
    pub netns: String,
    /// The root-namespace end of its veth pair (the other end is `eth0` inside).
    pub veth: String,
    pub ip: Ipv4Addr,
    /// Workload addresses handed out so far (never reused while the lab is up, so that no
    /// neighbour cache holds an old MAC for a new workload).
    #[serde(default)]
    pub(crate) workloads_started: usize,
}

impl Node {
    /// `/run/netns/NETNS`, for `nsenter --net=`.
    pub fn netns_path(&self) -> PathBuf {
        crate::sys::netns_path(&self.netns)
    }
}

/// A workload started by `exec`: a process tree that is PID 1 of its own pid namespace, in
/// a network namespace of its own with one veth on the bridge (like a pod), so that its
/// address can later move to another node with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Lab-wide number; names the namespace and veth.
    pub id: u64,
    /// The node it was started on.
    pub node: String,
    /// Host pid of its root (0 while it is being started).
    pub pid: i32,
    /// Start time of the root (/proc/PID/stat field 22), so that a reused pid is never taken
    /// for it.
    pub start_time: u64,
    pub ip: Ipv4Addr,
    pub netns: String,
    pub veth: String,
    pub command: Vec<String>,
    /// Where its stdout and stderr go; `None` for /dev/null.
    pub log: Option<PathBuf>,
    /// A container's `KIND:NAME`, when a container runtime runs it (its root is then the
    /// container's init process).
    #[serde(default)]
    pub container: Option<String>,
}

impl Workload {
    /// How ferry names it: `pid:HOSTPID`, or the container's `KIND:NAME`.
    pub fn workload_id(&self) -> String {
        match &self.container {
            Some(c) => c.clone(),
            None => format!("pid:{}", self.pid),
        }
    }

    /// True while its root process runs.
    pub fn is_running(&self) -> bool {
        crate::sys::is_alive(self.pid, self.start_time)
    }

    /// `/run/netns/NETNS`.
    pub fn netns_path(&self) -> PathBuf {
        crate::sys::netns_path(&self.netns)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct State {
    pub version: u32,
    pub name: Option<String>,
    pub subnet: Subnet,
    pub bridge: Bridge,
    pub nodes: Vec<Node>,
    pub workloads: Vec<Workload>,
    pub next_workload: u64,
}

impl State {
    pub fn new(config: &LabConfig, subnet: Subnet, nodes: Vec<Node>) -> State {
        State {
            version: VERSION,
            name: config.name().map(str::to_string),
            subnet,
            bridge: Bridge { name: config.bridge_name(), ip: subnet.bridge_ip() },
            nodes,
            workloads: Vec::new(),
            next_workload: 1,
        }
    }

    /// The state of `config`'s lab, `None` if there is no state file.
    pub fn load(config: &LabConfig) -> Result<Option<State>, LabError> {
        let path = config.state_file();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(LabError::Io { action: "cannot read", path, source }),
        };
        let state: State = serde_json::from_str(&text)
            .map_err(|e| LabError::DamagedState { path: path.clone(), why: e.to_string() })?;
        if state.version != VERSION {
            let why = format!("version {} (this ferry reads {VERSION})", state.version);
            return Err(LabError::DamagedState { path, why });
        }
        Ok(Some(state))
    }

    /// Replaces the state file whole (write, sync, rename): a reader never sees half of it.
    pub fn save(&self, config: &LabConfig) -> Result<(), LabError> {
        let path = config.state_file();
        let tmp = path.with_extension("json.tmp");
        let io_err = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| LabError::Io { action, path, source }
        };
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| LabError::DamagedState { path: path.clone(), why: format!("cannot encode: {e}") })?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("cannot create", &tmp))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_err("cannot write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("cannot replace", &path))
    }

    pub fn remove(config: &LabConfig) -> Result<(), LabError> {
        let path = config.state_file();
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(LabError::Io { action: "cannot remove", path, source: e })
            }
            _ => Ok(()),
        }
    }

    pub fn node(&self, name: &str) -> Result<&Node, LabError> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| LabError::UnknownNode {
            node: name.into(),
            known: self.nodes.iter().map(|n| n.name.clone()).collect(),
        })
    }
}

/// Opens (creating, mode 0600) a file that is only ever used for `flock`.
pub(crate) fn open_lock_file(path: &std::path::Path) -> Result<File, LabError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|source| LabError::Io { action: "cannot open", path: path.to_path_buf(), source })
}

/// Exclusive hold on a lab's state for one operation: `exec`s and `up`/`down` running at
/// the same time never hand out one address twice or lose a record.
#[derive(Debug)]
pub(crate) struct StateLock {
    _file: File,
    path: PathBuf,
}

impl StateLock {
    pub fn acquire(config: &LabConfig) -> Result<StateLock, LabError> {
        let dir = config.state_dir();
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(|source| LabError::Io {
            action: "cannot create the state directory",
            path: dir.to_path_buf(),
            source,
        })?;
        let path = config.lock_file();
        let file = open_lock_file(&path)?;
        file.lock().map_err(|source| LabError::Io { action: "cannot lock", path: path.clone(), source })?;
        Ok(StateLock { _file: file, path })
    }

    /// After `down`: the lock file and the state directory go too, if nothing else is in it
    /// (a user's `--log` file may be).
    pub fn remove_with_dir(self) {
        let _ = fs::remove_file(&self.path);
        if let Some(dir) = self.path.parent() {
            let _ = fs::remove_dir(dir);
        }
    }
}

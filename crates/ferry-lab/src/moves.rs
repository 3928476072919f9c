//! A workload's address moving to another node with it (what a migration agent does): the
//! target gets a namespace of its own with the same address and MAC whose bridge port stays
//! down until the workload is restored in it; the source's port goes down while the workload
//! is frozen, and its namespace is removed once the move is committed (or its port comes back
//! up if the move is abandoned). Every step is recorded in the lab's state under its lock.

use crate::lab::{attach_with_port, remove_workload};
use crate::state::{State, StateLock};
use crate::sys::{self, ip};
use crate::{LabConfig, LabError, Workload};

/// The workload whose root process is `pid` (as started by `exec` or moved here).
pub fn workload_by_pid(config: &LabConfig, pid: i32) -> Result<Option<Workload>, LabError> {
    let state = load(config)?;
    Ok(state.workloads.into_iter().find(|w| w.pid == pid && w.is_running()))
}

/// The workload recorded on `node` at `ip`, whether running, arriving or exited: its namespace
/// holds the address on the node's segment.
pub fn workload_at(
    config: &LabConfig,
    node: &str,
    ip: std::net::Ipv4Addr,
) -> Result<Option<Workload>, LabError> {
    let state = load(config)?;
    Ok(state.workloads.into_iter().find(|w| w.node == node && w.ip == ip))
}

/// Prepares `node` to receive a workload at `ip`: a new namespace with that address (and its
/// MAC), its bridge port down. Returns the new workload record (pid 0 until [`arrived`]).
pub fn prepare_arrival(
    config: &LabConfig,
    node: &str,
    addr: std::net::Ipv4Addr,
) -> Result<Workload, LabError> {
    prepare(config, node, Some(addr))
}

/// Prepares a namespace on `node` with the node's next address, its bridge port up, for a
/// workload restored into it (a clone): the record has pid 0 until [`arrived`], and
/// [`remove`](crate::remove_workload) takes it back if the restore fails.
pub fn prepare_workload(config: &LabConfig, node: &str) -> Result<Workload, LabError> {
    prepare(config, node, None)
}

/// A new workload namespace on `node`: at `addr` with its port down (a move, whose port comes
/// up at the switch), or at the node's next address with its port up.
fn prepare(config: &LabConfig, node: &str, addr: Option<std::net::Ipv4Addr>) -> Result<Workload, LabError> {
    sys::preflight()?;
    let _lock = StateLock::acquire(config)?;
    let mut state = load(config)?;
    let (k, n) = {
        let node = state.node(node)?;
        (node.index, node.workloads_started)
    };
    let ip = match addr {
        Some(a) => a,
        None => state.subnet.workload_ip(k, n).ok_or_else(|| LabError::AddressesExhausted {
            node: node.into(),
            max: state.subnet.max_workloads_per_node(),
        })?,
    };
    if addr.is_none() {
        if let Some(node) = state.nodes.iter_mut().find(|x| x.index == k) {
            node.workloads_started += 1;
        }
    }
    let id = state.next_workload;
    let w = Workload {
        id,
        node: node.into(),
        pid: 0,
        start_time: 0,
        ip,
        netns: config.workload_netns(id),
        veth: config.workload_veth(id)?,
        command: vec!["(arriving)".into()],
        log: None,
        container: None,
    };
    state.next_workload += 1;
    state.workloads.push(w.clone());
    // Recorded before the namespace exists: a crash from here on leaves a record for `down`.
    state.save(config)?;
    if let Err(e) = attach_with_port(&w.netns, &w.veth, ip, &state, addr.is_none()) {
        remove_workload(&w);
        state.workloads.retain(|x| x.id != id);
        state.save(config)?;
        return Err(e);
    }
    Ok(w)
}

/// The neighbour (ARP) entries of workload `id`'s namespace that have a link-layer address:
/// what it knows of its peers, so that the namespace it moves to can talk at once instead of
/// resolving every peer again (and losing the first packets while the port comes up).
pub fn neighbours(config: &LabConfig, id: u64) -> Result<Vec<(std::net::Ipv4Addr, String)>, LabError> {
    let state = load(config)?;
    let w = state.workloads.iter().find(|w| w.id == id).ok_or(LabError::UnknownWorkload { id })?;
    let out = ip(&["-j", "-n", &w.netns, "-4", "neigh", "show", "dev", "eth0"])?;
    let entries: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
    Ok(entries
        .iter()
        .filter_map(|e| {
            let dst = e.get("dst")?.as_str()?.parse().ok()?;
            let mac = e.get("lladdr")?.as_str()?;
            valid_mac(mac).then(|| (dst, mac.to_owned()))
        })
        .collect())
}

/// Installs `entries` (from [`neighbours`]) in workload `id`'s namespace, as stale entries:
/// used at once, confirmed by the kernel later.
pub fn set_neighbours(
    config: &LabConfig,
    id: u64,
    entries: &[(std::net::Ipv4Addr, String)],
) -> Result<(), LabError> {
    let state = load(config)?;
    let w = state.workloads.iter().find(|w| w.id == id).ok_or(LabError::UnknownWorkload { id })?;
    for (dst, mac) in entries.iter().filter(|(dst, mac)| state.subnet.contains(*dst) && valid_mac(mac)) {
        let dst = dst.to_string();
        ip(&["-n", &w.netns, "neigh", "replace", &dst, "lladdr", mac, "dev", "eth0", "nud", "stale"])?;
    }
    Ok(())
}

/// `xx:xx:xx:xx:xx:xx`, hex: nothing else is passed to `ip`.
fn valid_mac(mac: &str) -> bool {
    mac.len() == 17
        && mac.split(':').count() == 6
        && mac.split(':').all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Name of the nftables table that [`guard_resets`] puts in a workload's namespace.
const RESET_GUARD: &str = "ferry_restore_guard";

/// While `on`, workload `id`'s namespace sends no TCP reset: its port can then be up while
/// its connections are being restored (a client's packet that arrives before its socket is
/// back is dropped, not answered with a reset that would end the connection), so that what
/// the restored tree sends the moment it runs goes out at once. Off removes the table.
pub fn guard_resets(config: &LabConfig, id: u64, on: bool) -> Result<(), LabError> {
    let state = load(config)?;
    let w = state.workloads.iter().find(|w| w.id == id).ok_or(LabError::UnknownWorkload { id })?;
    let mut cmd = std::process::Command::new(sys::tool("nsenter")?);
    cmd.arg(format!("--net={}", w.netns_path().display())).arg("--").arg(sys::tool("nft")?);
    if on {
        cmd.args(["-f", "-"]);
        let rules = format!(
            "table inet {RESET_GUARD} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    tcp flags & rst == rst drop\n  }}\n}}\n"
        );
        return sys::run_with_input(cmd, rules.as_bytes()).map(drop);
    }
    cmd.args(["delete", "table", "inet", RESET_GUARD]);
    match sys::run(cmd) {
        Ok(_) => Ok(()),
        Err(LabError::Command { stderr, .. }) if stderr.contains("No such file") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Brings the bridge port of workload `id` up or down.
pub fn set_port(config: &LabConfig, id: u64, up: bool) -> Result<(), LabError> {
    let state = load(config)?;
    let w = state.workloads.iter().find(|w| w.id == id).ok_or(LabError::UnknownWorkload { id })?;
    ip(&["link", "set", &w.veth, if up { "up" } else { "down" }]).map(drop)
}

/// Records that workload `id` now runs as `pid` (its start time read now), with the command
/// line of `from` (the record it moved from; the source removes that one when it let go);
/// `container` is its `KIND:NAME` if a container runtime runs it here.
pub fn arrived(
    config: &LabConfig,
    id: u64,
    pid: i32,
    from: Option<u64>,
    container: Option<String>,
) -> Result<Workload, LabError> {
    let _lock = StateLock::acquire(config)?;
    let mut state = load(config)?;
    let old = from.and_then(|f| state.workloads.iter().find(|w| w.id == f).cloned());
    let w = state.workloads.iter_mut().find(|w| w.id == id).ok_or(LabError::UnknownWorkload { id })?;
    w.pid = pid;
    w.start_time = sys::start_time(pid).unwrap_or(0);
    w.container = container;
    if let Some(old) = &old {
        w.command = old.command.clone();
        w.log = old.log.clone();
    }
    let moved = w.clone();
    state.save(config)?;
    Ok(moved)
}

/// Renames the container workload `id` runs (its `KIND:NAME`, once the runtime named it).
pub fn rename_container(config: &LabConfig, id: u64, container: &str) -> Result<Workload, LabError> {
    let _lock = StateLock::acquire(config)?;
    let mut state = load(config)?;
    let w = state.workloads.iter_mut().find(|w| w.id == id).ok_or(LabError::UnknownWorkload { id })?;
    w.container = Some(container.to_owned());
    let renamed = w.clone();
    state.save(config)?;
    Ok(renamed)
}

/// Removes workload `id`'s namespace (killing what runs in it) and its record.
pub fn remove(config: &LabConfig, id: u64) -> Result<(), LabError> {
    let _lock = StateLock::acquire(config)?;
    let mut state = load(config)?;
    if let Some(w) = state.workloads.iter().find(|w| w.id == id).cloned() {
        state.workloads.retain(|x| x.id != id);
        state.save(config)?;
        remove_workload(&w);
    }
    Ok(())
}

fn load(config: &LabConfig) -> Result<State, LabError> {
    State::load(config)?.ok_or_else(|| LabError::NotUp {
        lab: config.describe(),
        state: config.state_file(),
        select: config.cli_select(),
    })
}

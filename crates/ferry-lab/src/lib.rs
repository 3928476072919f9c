//! Several ferry nodes on one machine, for tests and for anyone trying ferry.
//!
//! [`Lab::up`] creates a bridge in the root namespace (`fl-br0`, 198.18.0.1/16) and N nodes,
//! each a network namespace (`ferry-lab-nodeK`) whose `eth0` is a veth on the bridge
//! (198.18.K.1/16). [`Lab::exec`] starts a workload the way a pod runs: PID 1 of a new pid
//! namespace, in a network namespace of its own with its own veth on the bridge and the next
//! address of the node's block (198.18.K.10, .11, ...), so that the address can later move
//! with the workload to another node. The bridge's address makes this machine a member of the
//! lab: a client outside every namespace reaches every node and workload directly.
//!
//! Only 198.18.0.0/15 is used, on the lab's own links: no default route inside, no forwarding
//! enabled, no NAT, no firewall rules, no IPv6 link-local addresses. Traffic between members
//! crosses the bridge; where `br_netfilter` is loaded (`net.bridge.bridge-nf-call-iptables=1`)
//! it passes the iptables FORWARD chain, so a FORWARD policy of DROP (as Docker sets) would cut
//! members off from each other (not from this machine).
//!
//! What a lab created is recorded in its state file (`/run/ferry-lab/state.json`, 0600)
//! before it is created; [`Lab::down`] removes that, kills every process in the lab's
//! namespaces, and also finds the lab's objects by name when the file is gone. [`TestLab`]
//! gives each test a lab of its own (its own name, state directory and subnet) and takes it
//! down on drop.
//!
//! Everything goes through `ip` (iproute2), `nsenter`, `unshare` and `setsid` (util-linux):
//! no unsafe code here.
#![forbid(unsafe_code)]

mod config;
mod error;
mod guard;
mod lab;
mod moves;
mod state;
mod subnet;
mod sys;

pub use config::{data_dir, LabConfig, DEFAULT_STATE_DIR};
pub use error::LabError;
pub use guard::{TestLab, CLAIMS_DIR};
pub use lab::{mac_of, DownReport, ExecOptions, Lab};
pub use moves::{
    arrived, guard_resets, neighbours, prepare_arrival, prepare_workload, remove as remove_workload,
    rename_container, set_neighbours, set_port, workload_at, workload_by_pid,
};
pub use state::{Bridge, Node, Workload};
pub use subnet::{Subnet, LAB_RANGE};
pub use sys::{is_alive, ns_pids, start_time, use_host_netns};

/// Why no lab can be made here (not root, a tool missing), or `None` if one can.
pub fn missing_prerequisites() -> Option<LabError> {
    sys::preflight().err()
}

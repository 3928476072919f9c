//! Test kit of ferry: sample workloads to checkpoint, a runner for the `ferry` binary, the
//! root-and-CRIU check privileged tests start with, and assertions that a failure left nothing
//! behind (stopped tasks, CRIU firewall rules, mounts), and a reader of the agent's metrics.
//!
//! Everything a test starts through the kit is killed when its handle drops, panics included.
#![forbid(unsafe_code)]

mod clean;
mod metrics;
mod net;
mod poll;
mod privileged;
mod procs;
mod runner;
mod store_files;
mod workload;

pub use clean::{
    assert_no_criu_rules_for_port, assert_no_mounts_under, assert_not_stopped, criu_firewall_rules,
    criu_lock_tables_of, delete_lock_table, mounts_under, present_lock_tables, remove_criu_rules_for_port,
    rules_for_port, FirewallGuard,
};
pub use ferry_sys::Signal;
pub use metrics::{metric, parse_metrics, Sample as MetricSample};
pub use net::{fetch_greeting, free_port, LineClient, Probe};
pub use poll::{poll, try_poll, WAIT};
pub use privileged::{
    criu_path, criu_version, parse_criu_version, privileged_missing, require_privileged, CRIU_MIN,
};
pub use procs::{children, comm, descendants, signal_by_name, start_time, ProcId};
pub use runner::{read_pid, wait_pidfile, Ferry, Outcome, Running, FERRY_TIMEOUT};
pub use store_files::{
    contains_bytes, copy_tree, dir_names, files_containing, files_under, flip_byte, hex, indexed_packs,
    packs_by_size, read_index, replace_tree, swap_index_locations, swap_ranges, tree_size, IndexEntry,
    PackFiles, FRAME_HEADER, IDX_ENTRY, IDX_HEADER, IDX_MAGIC,
};
pub use workload::{Isolation, Sample, Workload, PYTHON};

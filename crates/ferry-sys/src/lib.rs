//! The only crate of ferry allowed to use `unsafe`: small wrappers over the Linux calls the
//! rest of the workspace needs, each returning owned file descriptors and `io::Result`.
//! Every other crate carries `#![forbid(unsafe_code)]`.
#![allow(unsafe_code)]

pub mod failpoint;
mod memory;
mod mount;
mod process;
mod retry;
mod seqpacket;
mod socket_probe;
mod uffd;

pub use memory::prefer_huge_pages;
pub use mount::{punch_hole, unmount, PrivateTmpfs};
pub use process::{
    effective_uid, idle_priority_for_this_thread, inherit_fd_in_child, is_root, kill, kill_raw,
    private_umask, process_exists, process_is, process_start_time, process_state, process_tree, wait_child,
    ChildExit, Signal,
};
pub use seqpacket::SeqPacket;
pub use socket_probe::{probe_tcp_socket, TcpProbe};
pub use uffd::{
    poll_readable, recv_with_fd, send_with_fd, AnonMapping, Fill, Uffd, UffdEvent, UFFD_FEATURE_EVENT_FORK,
    UFFD_FEATURE_EVENT_REMAP, UFFD_FEATURE_EVENT_REMOVE, UFFD_FEATURE_EVENT_UNMAP,
};

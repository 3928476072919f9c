//! `ferry-runc`: the runc wrapper that lets ferry restore Docker containers from its own
//! images (and post-copy them), and put containers into a network namespace of its choice.
//!
//! Registered in a dockerd's `daemon.json` as a runtime (see docs/containers.md, Docker), it is
//! called by containerd's shim exactly like runc. For `create` and `restore` of a container
//! ferry left a request for, it rewrites the bundle's `config.json` (the CRIU configuration
//! annotation, the network namespace's path); then it runs the real runc (the first `runc` on
//! `PATH`) with the same arguments. The logic is `ferry_runtime::container::docker::wrapper`.

#![forbid(unsafe_code)]

use std::os::unix::process::CommandExt;
use std::process::Command;

use ferry_runtime::container::docker::wrapper;

fn main() {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let inv = wrapper::parse(&args);
    if let Err(e) = wrapper::prepare(&inv) {
        wrapper::report(&inv, &e);
        std::process::exit(1);
    }
    let runc = wrapper::real_runc();
    let err = Command::new(&runc).arg0("runc").args(&inv.runc_args).exec();
    wrapper::report(&inv, &format!("cannot run {}: {err}", runc.display()));
    std::process::exit(127);
}

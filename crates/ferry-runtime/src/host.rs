//! Facts about this host that a checkpoint records.

use std::fs;

use ferry_store::HostFacts;

pub fn host_facts(criu_version: &str) -> HostFacts {
    let read = |p: &str| {
        fs::read_to_string(p)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    HostFacts {
        hostname: read("/proc/sys/kernel/hostname"),
        kernel: read("/proc/sys/kernel/osrelease"),
        criu_version: criu_version.to_owned(),
    }
}

//! Facts about this host that a checkpoint records.

use std::fs;

use ferry_store::HostInfo;

pub fn host_facts(criu_version: &str) -> HostInfo {
    let read = |p: &str| fs::read_to_string(p).map(|s| s.trim().to_owned()).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu_flags = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("flags").and_then(|r| r.split_once(':')).map(|(_, f)| f.trim().to_owned())
        })
        .unwrap_or_default();
    HostInfo {
        hostname: read("/proc/sys/kernel/hostname"),
        kernel: read("/proc/sys/kernel/osrelease"),
        criu_version: criu_version.to_owned(),
        cpu_flags,
    }
}

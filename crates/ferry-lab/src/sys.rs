//! The host, through iproute2, util-linux and /proc: no unsafe code, no netlink of our own.

use std::collections::BTreeSet;
use std::env;
use std::ffi::OsStr;
use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::subnet::parse_prefix;
use crate::{LabError, Subnet};

/// Where `ip netns add` puts its namespaces.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// The programs the lab runs, with the package that ships each.
pub(crate) const TOOLS: [(&str, &str); 6] = [
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("unshare", "util-linux"),
    ("setsid", "util-linux"),
    ("mount", "mount"),
    ("umount", "mount"),
];

/// Finds `name` in PATH, then in the system directories root's PATH may lack under sudo or cargo.
pub(crate) fn which(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// True if the workload's `program` would be found when exec'd: a path to a file, or a file
/// in PATH (which the workload inherits).
pub(crate) fn program_exists(program: &OsStr) -> bool {
    let p = Path::new(program);
    if program.as_bytes().contains(&b'/') {
        return p.is_file();
    }
    env::var_os("PATH").is_some_and(|path| env::split_paths(&path).any(|d| d.join(p).is_file()))
}

pub(crate) fn tool(name: &'static str) -> Result<PathBuf, LabError> {
    which(name).ok_or_else(|| LabError::ToolMissing {
        tool: name,
        package: TOOLS.iter().find(|(t, _)| *t == name).map_or(name, |(_, p)| p),
    })
}

/// Descriptors above 2 that a child of ours would inherit (no close-on-exec): whatever
/// started us passed them on (a CI runner's pipe, say).
pub(crate) fn inheritable_fds() -> Vec<i32> {
    const O_CLOEXEC: u32 = 0o2_000_000;
    let fds: Vec<i32> = fs::read_dir("/proc/self/fd")
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    fds.into_iter()
        .filter(|&fd| fd > 2)
        .filter(|fd| {
            let info = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
            let flags = info.lines().find_map(|l| l.strip_prefix("flags:")).map(str::trim);
            flags.and_then(|f| u32::from_str_radix(f, 8).ok()).is_some_and(|f| f & O_CLOEXEC == 0)
        })
        .collect()
}

/// Root and every tool: what any lab operation needs.
pub(crate) fn preflight() -> Result<(), LabError> {
    if !ferry_sys::is_root() {
        return Err(LabError::NotRoot { uid: ferry_sys::effective_uid() });
    }
    for (name, _) in TOOLS {
        tool(name)?;
    }
    Ok(())
}

/// `cmd` as a shell would show it, for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let name = |s: &OsStr| s.to_string_lossy().into_owned();
    let program = Path::new(cmd.get_program()).file_name().map_or_else(|| name(cmd.get_program()), name);
    std::iter::once(program).chain(cmd.get_args().map(name)).collect::<Vec<_>>().join(" ")
}

/// Runs `cmd` to completion; its stdout on success, else an error with its stderr.
pub(crate) fn run(mut cmd: Command) -> Result<String, LabError> {
    let command = describe(&cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn { command: command.clone(), source })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let mut stderr = String::from_utf8_lossy(&out.stderr).trim().replace('\n', "; ");
    if stderr.is_empty() {
        stderr = format!("exit status {}", out.status);
    }
    Err(LabError::Command { command, stderr })
}

/// [`run`] with `input` on the command's standard input.
pub(crate) fn run_with_input(mut cmd: Command, input: &[u8]) -> Result<String, LabError> {
    use std::io::Write;
    let command = describe(&cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn { command: command.clone(), source })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    let out =
        child.wait_with_output().map_err(|source| LabError::Spawn { command: command.clone(), source })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().replace('\n', "; ");
    Err(LabError::Command { command, stderr })
}

/// The host's network namespace (where the bridge is), for processes that run in a node's
/// namespace (the agents of lab nodes): set once, from the lab's reference to it.
static HOST_NETNS: OnceLock<PathBuf> = OnceLock::new();

/// Makes this process run its `ip` commands in the namespace `path` refers to (the lab's
/// `host-netns` file), wherever the process itself runs.
pub fn use_host_netns(path: PathBuf) {
    let _ = HOST_NETNS.set(path);
}

/// `ip ARGS...`, in the host's network namespace (see [`use_host_netns`]).
pub(crate) fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<String, LabError> {
    let mut cmd = match HOST_NETNS.get().filter(|p| !is_own_netns(p)) {
        None => Command::new(tool("ip")?),
        Some(host) => {
            let mut c = Command::new(tool("nsenter")?);
            c.arg(format!("--net={}", host.display())).arg("--").arg(tool("ip")?);
            c
        }
    };
    cmd.args(args);
    run(cmd)
}

/// True if the namespace file `path` is this process's network namespace.
fn is_own_netns(path: &Path) -> bool {
    let id = |p: &Path| fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    id(path).is_some() && id(path) == id(Path::new("/proc/self/ns/net"))
}

/// `ip -n NETNS ARGS...`: iproute2 enters the namespace only for its own short life.
pub(crate) fn ip_in(netns: &str, args: &[&str]) -> Result<String, LabError> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    ip(&all)
}

/// Names of the network namespaces `ip netns` knows.
pub(crate) fn netns_names() -> Vec<String> {
    fs::read_dir(NETNS_DIR)
        .map(|d| d.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default()
}

pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Identity of a network namespace: device and inode of its nsfs file.
pub(crate) type NsId = (u64, u64);

/// The namespace `/run/netns/NAME` holds, if it is there.
pub(crate) fn netns_id(name: &str) -> Option<NsId> {
    let m = fs::metadata(netns_path(name)).ok()?;
    // A name whose bind mount is gone (a crash inside `ip netns add`) is a plain empty file on
    // the /run tmpfs, not a namespace: nothing can be in it.
    (m.dev() != fs::metadata(NETNS_DIR).ok()?.dev()).then(|| (m.dev(), m.ino()))
}

/// The network namespace of `pid`; `None` for zombies and vanished processes.
pub(crate) fn netns_of(pid: i32) -> Option<NsId> {
    let m = fs::metadata(format!("/proc/{pid}/ns/net")).ok()?;
    Some((m.dev(), m.ino()))
}

/// Every live process, by pid.
pub(crate) fn all_pids() -> Vec<i32> {
    fs::read_dir("/proc")
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// Live processes in any of the namespaces `ids`.
pub(crate) fn pids_in_netns(ids: &BTreeSet<NsId>) -> Vec<i32> {
    if ids.is_empty() {
        return Vec::new();
    }
    all_pids().into_iter().filter(|&pid| netns_of(pid).is_some_and(|ns| ids.contains(&ns))).collect()
}

/// The pids of `pid` in each pid namespace it belongs to, outermost first (`NSpid`).
pub fn ns_pids(pid: i32) -> Option<Vec<i32>> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_ns_pids(&status)
}

fn parse_ns_pids(status: &str) -> Option<Vec<i32>> {
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().map(|p| p.parse().ok()).collect()
}

/// The start time of `pid` (field 22 of /proc/PID/stat): with the pid, it names one process
/// for good, so that a pid reused later is never signalled.
pub fn start_time(pid: i32) -> Option<u64> {
    ferry_sys::process_start_time(pid)
}

/// True while the process `pid` started at `start` runs (not a zombie).
pub fn is_alive(pid: i32, start: u64) -> bool {
    ferry_sys::process_is(pid, start)
}

/// Interfaces of the root namespace.
pub(crate) fn link_names() -> Result<Vec<String>, LabError> {
    let out = ip(&["-j", "link", "show"])?;
    Ok(json_list(&out, "link show")?
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect())
}

/// The IPv4 addresses and routes of the root namespace, to tell which subnets are free.
#[derive(Debug)]
pub(crate) struct Usage {
    addresses: Vec<(Ipv4Addr, String)>,
    routes: Vec<(Ipv4Addr, u8, String)>,
}

impl Usage {
    pub fn read() -> Result<Usage, LabError> {
        let mut addresses = Vec::new();
        for a in json_list(&ip(&["-j", "-4", "addr", "show"])?, "-4 addr show")? {
            let dev = a["ifname"].as_str().unwrap_or("?").to_string();
            for info in a["addr_info"].as_array().into_iter().flatten() {
                if let Some(addr) = info["local"].as_str().and_then(|l| l.parse().ok()) {
                    addresses.push((addr, dev.clone()));
                }
            }
        }
        let mut routes = Vec::new();
        for r in json_list(&ip(&["-j", "-4", "route", "show", "table", "all"])?, "-4 route show table all")? {
            if let Some((addr, len)) = r["dst"].as_str().and_then(parse_prefix) {
                routes.push((addr, len, r["dev"].as_str().unwrap_or("?").to_string()));
            }
        }
        Ok(Usage { addresses, routes })
    }

    /// What already uses part of `subnet`: an address inside it, or a route at least as
    /// specific (a less specific one, such as the default route, loses to the lab's).
    pub fn users_of(&self, subnet: &Subnet) -> Vec<String> {
        let mut users: Vec<String> = self
            .addresses
            .iter()
            .filter(|(a, _)| subnet.contains(*a))
            .map(|(a, dev)| format!("address {a} on {dev}"))
            .collect();
        users.extend(
            self.routes
                .iter()
                .filter(|(a, len, _)| *len >= subnet.prefix_len() && subnet.overlaps(*a, *len))
                .map(|(a, len, dev)| format!("route {a}/{len} dev {dev}")),
        );
        users.dedup();
        users
    }
}

/// The array `ip -j ... show` prints.
fn json_list(text: &str, args: &str) -> Result<Vec<serde_json::Value>, LabError> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Array(items)) => Ok(items),
        _ => Err(LabError::Command {
            command: format!("ip -j {args}"),
            stderr: "printed no JSON array; iproute2 with JSON output (-j) is needed".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nspid_lists_every_level() {
        assert_eq!(parse_ns_pids("Name:\tx\nNSpid:\t4242\t1\n"), Some(vec![4242, 1]));
        assert_eq!(parse_ns_pids("NSpid:\t7\n"), Some(vec![7]));
        assert_eq!(parse_ns_pids("Name:\tx\n"), None);
    }

    #[test]
    fn this_process_is_seen() {
        let me = std::process::id() as i32;
        let start = start_time(me).expect("own start time");
        assert!(is_alive(me, start));
        assert!(!is_alive(me, start + 1), "another start time is another process");
        assert!(all_pids().contains(&me));
        assert_eq!(ns_pids(me).expect("NSpid").last(), Some(&me));
    }

    #[test]
    fn our_own_files_are_not_inherited() {
        let file = fs::File::open("/proc/self/status").expect("open");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        assert!(!inheritable_fds().contains(&fd), "std opens files close-on-exec");
    }

    #[test]
    fn commands_fail_with_their_stderr() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo oops >&2; exit 3"]);
        match run(cmd) {
            Err(LabError::Command { command, stderr }) => {
                assert_eq!(command, "sh -c echo oops >&2; exit 3");
                assert_eq!(stderr, "oops");
            }
            other => panic!("expected a command error, got {other:?}"),
        }
    }
}

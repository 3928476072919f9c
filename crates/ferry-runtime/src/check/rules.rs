//! From facts to reasons: pure functions, each rule what CRIU 4.2 does with what it finds
//! (`docs/check.md` cites where). No I/O here but [`container`], which asks the runtime.

use std::collections::BTreeSet;

use ferry_criu::MIN_VERSION;

use super::gather::{Facts, HostFacts, PathState, TaskFacts};
use super::parse::{FdKind, TcpState};
use super::{CheckOptions, Reason, Severity, MAX_TASKS_NAMED};
use crate::container::Endpoints;

/// CRIU's default limit on a deleted file it copies into the images (`--ghost-limit`, 1 MiB),
/// against the space the file takes on disk (CRIU 4.2 compares `st_blocks`).
pub const GHOST_LIMIT: u64 = 1 << 20;

fn reason(code: &'static str, severity: Severity, what: String, why: &str, fix: &str) -> Reason {
    Reason { code, severity, what, why: why.to_owned(), fix: fix.to_owned(), pids: Vec::new() }
}

/// Instances of one reason: "pid 12 (nginx) fd 4", at most [`MAX_TASKS_NAMED`] named.
#[derive(Debug, Default)]
struct Found {
    items: Vec<String>,
    pids: BTreeSet<i32>,
    more: usize,
}

impl Found {
    fn add(&mut self, pid: i32, item: String) {
        self.pids.insert(pid);
        if self.items.len() < MAX_TASKS_NAMED {
            self.items.push(item);
        } else {
            self.more += 1;
        }
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn list(&self) -> String {
        let mut s = self.items.join("; ");
        if self.more > 0 {
            s.push_str(&format!("; and {} more", self.more));
        }
        s
    }

    fn into_reason(
        self,
        code: &'static str,
        severity: Severity,
        what: &str,
        why: &str,
        fix: &str,
    ) -> Option<Reason> {
        if self.is_empty() {
            return None;
        }
        let mut r = reason(code, severity, format!("{what}: {}", self.list()), why, fix);
        r.pids = self.pids.into_iter().take(MAX_TASKS_NAMED).collect();
        Some(r)
    }
}

fn who(t: &TaskFacts) -> String {
    format!("pid {} ({})", t.pid, t.comm)
}

pub fn workload_missing(detail: &str) -> Reason {
    reason(
        "workload",
        Severity::Blocker,
        detail.to_owned(),
        "there is nothing to checkpoint",
        "check the workload's name (`ps`, or the runtime's own listing)",
    )
}

/// The container through its runtime: reachable, existing, running, and restorable here.
/// A container found running under its runtime.
#[derive(Debug)]
pub struct FoundContainer {
    pub init_pid: i32,
    /// The namespaces the runtime declares external (kind, inode).
    pub external: Vec<(String, u64)>,
    pub record: crate::container::ContainerRecord,
}

/// Returns its init's host PID, the namespaces the runtime declares external and its record.
pub fn container(
    kind: &str,
    id: &str,
    endpoints: &Endpoints,
    reasons: &mut Vec<Reason>,
) -> Option<FoundContainer> {
    let rt = match crate::container::open(kind, endpoints) {
        Ok(rt) => rt,
        Err(e) => {
            reasons.push(workload_missing(&e.to_string()));
            return None;
        }
    };
    let c = match rt.inspect(id) {
        Ok(c) => c,
        Err(e) => {
            let mut r = reason(
                "container",
                Severity::Blocker,
                format!("{kind}:{id}: {e}"),
                "ferry reads the container's state and process tree from its runtime",
                "",
            );
            r.fix = e.hint().unwrap_or_else(|| "start the runtime and the container".into());
            reasons.push(r);
            return None;
        }
    };
    reasons.push(reason(
        "container",
        Severity::Info,
        format!(
            "{kind}:{id} runs (init pid {}) and its runtime answers at {}",
            c.plan.init_pid,
            endpoints.get(kind).display()
        ),
        "the runtime recreates the container at restore",
        "",
    ));
    let mut problems = rt.preflight(&c.record, &c.record.name);
    problems.extend(crate::container::missing_bind_sources(&c.record, &rt.own_bind_sources(&c.record)));
    problems.extend(crate::container::missing_devices(&c.record));
    for p in problems {
        reasons.push(reason(
            "container-restore",
            Severity::Blocker,
            p,
            "the container is recreated by its runtime from its record at restore: this host could not",
            "see the sentence before; a restore elsewhere needs the same there",
        ));
    }
    let external = c.plan.external.iter().filter_map(|e| external_ns(e)).collect();
    Some(FoundContainer { init_pid: c.plan.init_pid, external, record: c.record })
}

/// `net[4026532000]:extRootNetNS` as (`net`, 4026532000).
fn external_ns(entry: &str) -> Option<(String, u64)> {
    let (kind, rest) = entry.split_once('[')?;
    let ino = rest.split_once(']')?.0.parse().ok()?;
    Some((kind.to_owned(), ino))
}

pub fn host(h: &HostFacts) -> Vec<Reason> {
    let mut out = vec![reason(
        "kernel",
        Severity::Info,
        format!("Linux {}", if h.kernel.is_empty() { "(unknown release)" } else { h.kernel.as_str() }),
        "CRIU's support of some objects depends on the kernel; a restore needs a kernel at least as capable",
        "",
    )];
    match &h.criu {
        Some(Ok(v)) if *v >= MIN_VERSION => out.push(reason(
            "criu",
            Severity::Info,
            format!("CRIU {v}"),
            "the reasons below are what this CRIU does",
            "",
        )),
        Some(Ok(v)) => out.push(reason(
            "criu",
            Severity::Blocker,
            format!("CRIU {v} is older than {MIN_VERSION}"),
            "older releases fail on this kernel (docs/criu.md)",
            "run scripts/setup, or point --criu at CRIU 4.2 or newer",
        )),
        Some(Err(e)) => out.push(reason(
            "criu",
            Severity::Blocker,
            format!("no working CRIU: {e}"),
            "CRIU does the checkpoint",
            "run scripts/setup, or point --criu at CRIU 4.2 or newer",
        )),
        None => {}
    }
    out
}

/// Every reason the tree's facts give.
pub fn evaluate(f: &Facts, opts: CheckOptions) -> Vec<Reason> {
    let mut out = Vec::new();
    out.extend(reading(f));
    out.extend(descriptors(f));
    out.extend(unix_sockets(f));
    out.extend(pipes(f));
    out.extend(tcp(f, opts));
    out.extend(terminal(f));
    out.extend(deleted(f));
    out.extend(ipc_and_memory(f));
    out.extend(tasks(f));
    out.extend(namespaces(f));
    out
}

fn reading(f: &Facts) -> Vec<Reason> {
    let mut out = Vec::new();
    if f.truncated || !f.unreadable.is_empty() || f.tasks.iter().any(|t| t.fds_truncated) {
        let mut what: Vec<String> = f.unreadable.iter().take(MAX_TASKS_NAMED).cloned().collect();
        if f.truncated {
            what.push(format!(
                "the tree has more than {} processes; the rest was not read",
                super::gather::MAX_PROCESSES
            ));
        }
        if f.tasks.iter().any(|t| t.fds_truncated) {
            what.push(format!(
                "a process has more than {} descriptors; the rest were not read",
                super::gather::MAX_FDS
            ));
        }
        out.push(reason(
            "unreadable",
            Severity::Caveat,
            what.join("; "),
            "what was not read was not judged: the verdict may miss a blocker",
            "run `ferry check` as root (it reads other users' /proc entries)",
        ));
    }
    out
}

/// Major numbers of character devices CRIU dumps: memory devices (1: null, zero, full, random,
/// urandom...), ttys and ptys (4, 5, 136-143), and of misc (10) only tun (200) and autofs (235).
fn device_supported(major: u32, minor: u32) -> bool {
    matches!(major, 1 | 4 | 5 | 136..=143) || (major == 10 && matches!(minor, 200 | 235))
}

fn descriptors(f: &Facts) -> Vec<Reason> {
    let (mut uring, mut perf, mut bpf, mut fanotify, mut other_anon, mut devices) = (
        Found::default(),
        Found::default(),
        Found::default(),
        Found::default(),
        Found::default(),
        Found::default(),
    );
    let (mut tun, mut proc_pid) = (Found::default(), Found::default());
    let pids = f.pids();
    for t in &f.tasks {
        // A task in a pid namespace of its own that sees our /proc names its tree's processes
        // there by their host pids, which the restore changes (CRIU restores the namespace's
        // own pids): a file open under /proc/PID of one of them is then missing.
        let host_proc_in_pidns =
            t.ns.get("pid") != f.own_ns.get("pid") && t.ns.get("mnt") == f.own_ns.get("mnt");
        for fd in &t.fds {
            let at = |what: &str| match what {
                "" => format!("{} fd {}", who(t), fd.fd),
                w => format!("{} fd {} {w}", who(t), fd.fd),
            };
            match &fd.kind {
                FdKind::Anon(name) => match name.as_str() {
                    "io_uring" => uring.add(t.pid, at("")),
                    "perf_event" => perf.add(t.pid, at("")),
                    n if n.starts_with("bpf") => bpf.add(t.pid, at(n)),
                    "fanotify" => fanotify.add(t.pid, at("")),
                    // What CRIU 4.2 dumps (files.c: dump_one_file).
                    "eventfd" | "eventpoll" | "inotify" | "signalfd" | "timerfd" | "pidfd" => {}
                    n => other_anon.add(t.pid, at(&format!("anon_inode:{n}"))),
                },
                FdKind::Path { path, deleted: false } => {
                    let proc_pid_of = path
                        .strip_prefix("/proc/")
                        .and_then(|rest| rest.split('/').next())
                        .and_then(|n| n.parse::<i32>().ok());
                    if host_proc_in_pidns && proc_pid_of.is_some_and(|p| pids.contains(&p)) {
                        proc_pid.add(t.pid, at(path));
                    }
                    if let Some((major, minor)) = fd.rdev {
                        if !device_supported(major, minor) {
                            devices.add(t.pid, at(&format!("{path} ({major}:{minor})")));
                        } else if (major, minor) == (10, 200) && t.ns.get("net") == f.own_ns.get("net") {
                            tun.add(t.pid, at(path));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    let mut push = |found: Found, code, sev, what: &str, why: &str, fix: &str| {
        out.extend(found.into_reason(code, sev, what, why, fix));
    };
    push(
        uring,
        "io-uring",
        Severity::Blocker,
        "io_uring instances",
        "CRIU cannot dump io_uring (its rings and in-flight requests live in the kernel): the dump fails",
        "let the application fall back to epoll or threads (e.g. disable its io_uring backend) before checkpointing",
    );
    push(
        perf,
        "perf-event",
        Severity::Blocker,
        "perf event descriptors",
        "CRIU cannot dump perf events: the dump fails",
        "stop the profiler or the in-process perf counters (perf_event_open) before checkpointing",
    );
    push(
        bpf,
        "bpf",
        Severity::Blocker,
        "BPF objects",
        "CRIU cannot dump BPF programs or links, and BPF maps only when built with libbpf (ferry's build is not)",
        "unload the BPF program or let the application re-create it after a restart; pin maps to bpffs",
    );
    push(
        other_anon,
        "anon-inode",
        Severity::Blocker,
        "descriptors of a kind CRIU does not know",
        "CRIU dumps only eventfd, epoll, inotify, fanotify, signalfd, timerfd, pidfd and (with libbpf) BPF maps among anonymous inodes: the dump fails on the others (userfaultfd, KVM, DMA buffers, sync files...)",
        "close them before checkpointing",
    );
    push(
        devices,
        "device",
        Severity::Blocker,
        "character devices CRIU does not dump",
        "CRIU restores only memory devices (/dev/null, zero, random...), terminals and /dev/net/tun; a device's state (a GPU's memory, a VM's) is in the driver: the dump fails",
        "release the device before checkpointing (for GPUs: NVIDIA's cuda-checkpoint first, then CRIU with its plugin, which ferry does not drive)",
    );
    push(
        tun,
        "tun",
        Severity::Blocker,
        "/dev/net/tun descriptors in the host's network namespace",
        "CRIU dumps a tun descriptor with its interface, and the interface only with a network namespace it dumps; in the host's (ferry's) it refuses (\"Net namespace is required to dump tun link\"): the dump fails",
        "run the workload in a network namespace of its own (a container, or unshare --net), which CRIU dumps with its tun interfaces",
    );
    push(
        proc_pid,
        "proc-pid-file",
        Severity::Blocker,
        "files open under /proc/PID of the tree's own tasks, by host pids, from a pid namespace of its own",
        "the tree sees the host's /proc (its mount namespace is ferry's), so these paths carry host pids; CRIU restores the pid namespace's own pids, under new host pids, and reopens the same path: the file is missing and the restore fails (\"Can't open file proc/PID/... on restore\")",
        "open /proc/self/... (or close the file) before checkpointing, or give the pid namespace a mount namespace with its own /proc",
    );
    push(
        fanotify,
        "fanotify",
        Severity::Caveat,
        "fanotify groups",
        "CRIU restores fanotify groups and their marks, not the events queued at the checkpoint; inode marks are found again by file handle, so the marked files must exist on the target",
        "checkpoint when no events are pending, and restore where the marked files exist",
    );
    out
}

fn unix_sockets(f: &Facts) -> Vec<Reason> {
    let inodes = f.socket_inodes();
    let all = &f.unix;
    if let Some(e) = &f.unix_error {
        if !inodes.is_empty() {
            return vec![reason(
                "unix-unknown",
                Severity::Caveat,
                format!("the peers of the tree's unix sockets could not be listed ({e})"),
                "a unix socket connected outside the tree makes the dump fail; this one could not be checked",
                "run `ferry check` as root",
            )];
        }
    }
    let mut outside = Found::default();
    for t in &f.tasks {
        for fd in &t.fds {
            let FdKind::Socket(ino) = fd.kind else { continue };
            let Some(sock) = all.get(&ino) else { continue };
            let Some(peer) = sock.peer else { continue };
            if inodes.contains(&peer) {
                continue;
            }
            let name =
                all.get(&peer).and_then(|p| p.name.clone()).unwrap_or_else(|| format!("socket {peer}"));
            outside.add(t.pid, format!("{} fd {} connected to {name}", who(t), fd.fd));
        }
    }
    outside
        .into_reason(
            "unix-external",
            Severity::Blocker,
            "unix sockets connected outside the tree",
            "CRIU dumps both ends of a unix connection or neither; ferry does not mark outside peers external (--ext-unix-sk), so the dump fails",
            "close the connection before checkpointing, or checkpoint the peer in the same tree (e.g. a syslog socket: log to a file or stdout instead)",
        )
        .into_iter()
        .collect()
}

fn pipes(f: &Facts) -> Vec<Reason> {
    // For each pipe the tree holds: whether it holds its read end, its write end.
    let mut ends: std::collections::HashMap<u64, (bool, bool)> = std::collections::HashMap::new();
    for (inode, write) in f.tasks.iter().flat_map(|t| &t.fds).filter_map(|fd| fd.pipe) {
        let e = ends.entry(inode).or_default();
        if write {
            e.1 = true;
        } else {
            e.0 = true;
        }
    }
    let mut one_end = Found::default();
    for t in &f.tasks {
        for fd in &t.fds {
            let Some((inode, write)) = fd.pipe else { continue };
            if ends.get(&inode).is_some_and(|(r, w)| r != w) {
                let how = if write { "writes to" } else { "reads from" };
                one_end.add(t.pid, format!("{} fd {} {how} pipe:[{inode}]", who(t), fd.fd));
            }
        }
    }
    one_end
        .into_reason(
            "pipe-external",
            Severity::Caveat,
            "pipes whose other end is outside the tree (or closed)",
            "CRIU restores such a pipe as a new one with no process at its other end: writes to it then fail (SIGPIPE, which kills a process that does not handle it) and reads see end of file; a logger reading the workload's output no longer gets it",
            "have the workload log to a file or a socket it reconnects, or checkpoint the reader in the same tree",
        )
        .into_iter()
        .collect()
}

fn tcp(f: &Facts, opts: CheckOptions) -> Vec<Reason> {
    // By inode: a busy server holds thousands of connections.
    let by_inode: std::collections::HashMap<u64, &super::parse::TcpSocket> =
        f.tcp.iter().map(|s| (s.inode, s)).collect();
    let (mut established, mut transient, mut queued) = (Found::default(), Found::default(), Found::default());
    let mut closed = Found::default();
    for t in &f.tasks {
        for fd in &t.fds {
            let FdKind::Socket(ino) = fd.kind else { continue };
            if f.tcp_closed.contains(&ino) {
                closed.add(t.pid, format!("{} fd {} (socket:[{ino}])", who(t), fd.fd));
                continue;
            }
            let Some(s) = by_inode.get(&ino) else { continue };
            let item = format!("{} fd {} {} {}", who(t), fd.fd, s.state.name(), s.endpoints);
            match s.state {
                TcpState::Established => established.add(t.pid, item),
                TcpState::Listen if s.rx_queue > 0 => {
                    queued.add(t.pid, format!("{item} with {} waiting", s.rx_queue))
                }
                TcpState::Listen | TcpState::Close => {}
                _ => transient.add(t.pid, item),
            }
        }
    }
    let mut out = Vec::new();
    let (sev, why, fix) = match opts.tcp_established {
        Some(true) => (
            Severity::Caveat,
            "CRIU dumps them with --tcp-established and holds their traffic until the restore; a peer that waits longer than its timeout gives up",
            "keep the time between checkpoint and restore short",
        ),
        Some(false) => (
            Severity::Blocker,
            "CRIU refuses connected TCP sockets without --tcp-established: the dump fails",
            "checkpoint with --tcp-established",
        ),
        None => (
            Severity::Caveat,
            "the checkpoint needs --tcp-established (without it CRIU refuses them), and then holds their traffic until the restore",
            "checkpoint with --tcp-established",
        ),
    };
    out.extend(established.into_reason("tcp-established", sev, "established TCP connections", why, fix));
    out.extend(transient.into_reason(
        "tcp-transient",
        if opts.tcp_established == Some(false) { Severity::Blocker } else { Severity::Caveat },
        "TCP connections opening or closing",
        "CRIU 4.2 dumps SYN_SENT, FIN_WAIT, CLOSE_WAIT, LAST_ACK and CLOSING sockets as it dumps established ones (only with --tcp-established); their state may change while the tree freezes, and a closing one's peer may be gone at restore",
        "checkpoint with --tcp-established, preferably when no connection is being set up or torn down",
    ));
    // CRIU dumps a closed connection's socket whatever the flags (can_dump_inet_sk lets
    // TCP_CLOSE through) but its restore refuses a socket with a peer address without
    // --tcp-established ("Connected TCP socket in image", sk-inet.c): the checkpoint succeeds
    // and cannot be restored. With the flag it restores (zdtm's socket-tcp-close2).
    let (sev, why) = match opts.tcp_established {
        Some(true) => (
            Severity::Info,
            "CRIU dumps them and, with --tcp-established, restores them closed as they were",
        ),
        Some(false) => (
            Severity::Blocker,
            "CRIU dumps them, but its restore refuses a TCP socket that names a peer without --tcp-established (\"Connected TCP socket in image\"): the checkpoint succeeds and cannot be restored",
        ),
        None => (
            Severity::Caveat,
            "the checkpoint needs --tcp-established: without it CRIU dumps them but its restore refuses them (\"Connected TCP socket in image\")",
        ),
    };
    out.extend(closed.into_reason(
        "tcp-closed",
        sev,
        "TCP connections closed on both sides whose sockets are still open",
        why,
        "checkpoint with --tcp-established, or let the application close the sockets",
    ));
    out.extend(queued.into_reason(
        "tcp-accept-queue",
        Severity::Blocker,
        "listening sockets with connections not yet accepted",
        "CRIU refuses a listener whose accept queue holds connections (\"In-flight connection\") unless told to drop them (--tcp-skip-in-flight, which ferry does not pass): a dump now fails",
        "retry in a moment: the queue drains as the application accepts (one that stays full is an application that does not accept)",
    ));
    out
}

fn terminal(f: &Facts) -> Vec<Reason> {
    let pids = f.pids();
    let masters: BTreeSet<u32> = f.tasks.iter().flat_map(|t| &t.fds).filter_map(|fd| fd.ptmx_index).collect();
    let devices: BTreeSet<(u32, u32)> =
        f.tasks.iter().flat_map(|t| &t.fds).filter_map(|fd| fd.rdev).collect();
    let (mut tty, mut session) = (Found::default(), Found::default());
    for t in &f.tasks {
        if t.stat.tty_nr != 0 {
            let (major, minor) = super::parse::dev_major_minor(u64::from(t.stat.tty_nr));
            // A pty whose master the tree holds travels with the tree.
            let pty_inside = (136..=143).contains(&major) && masters.contains(&((major - 136) * 256 + minor));
            // A virtual terminal or serial line (major 4) or the console (5:1) that the tree
            // holds open: CRIU dumps it as a terminal of its own and its session leader sets it
            // again at restore (tty.c: the vt, serial and console drivers; zdtm's vt).
            let device_inside = (major == 4 || (major, minor) == (5, 1)) && devices.contains(&(major, minor));
            let inside = pty_inside || device_inside;
            if !inside {
                tty.add(t.pid, format!("{} on tty {major}:{minor}", who(t)));
            }
        }
        // Session ids in /proc/PID/stat are in our pid namespace: host pids, like the tree's.
        if t.stat.session > 0 && !pids.contains(&t.stat.session) {
            session.add(t.pid, format!("{} in session {}", who(t), t.stat.session));
        }
    }
    let mut out = Vec::new();
    out.extend(tty.into_reason(
        "terminal",
        Severity::Blocker,
        "a controlling terminal outside the tree",
        "CRIU restores a terminal only with --shell-job, which ferry does not pass: the dump fails",
        "start the workload detached from any terminal (setsid, a service manager, stdin/stdout not a tty)",
    ));
    out.extend(session.into_reason(
        "session",
        Severity::Blocker,
        "tasks in a session whose leader is outside the tree",
        "CRIU restores sessions only whole (or with --shell-job, which ferry does not pass): the dump fails",
        "start the workload with setsid so that it leads its own session",
    ));
    out
}

fn deleted(f: &Facts) -> Vec<Reason> {
    let (mut small, mut large) = (Found::default(), Found::default());
    let (mut cwd_gone, mut cwd_gone_proc) = (Found::default(), Found::default());
    let (mut memfd_exe, mut linked) = (Found::default(), Found::default());
    let mut sort = |pid: i32, what: String, bytes: u64, still_linked: bool| {
        if still_linked {
            linked.add(pid, what);
        } else if bytes > GHOST_LIMIT {
            large.add(pid, format!("{what} ({} KiB)", bytes / 1024));
        } else {
            small.add(pid, what);
        }
    };
    for t in &f.tasks {
        // A zombie has no working directory, executable or descriptors left (its links do not
        // read): CRIU dumps it as a zombie, nothing to judge (zdtm's zombie00).
        if t.stat.state == 'Z' {
            continue;
        }
        // In a pid namespace of its own that still sees our /proc (its mount namespace is
        // ours), CRIU's parasite mounts a proc of its namespace at `proc.crtools` in the task's
        // working directory (parasite.c: parasite_get_proc_fd): a deleted one fails the dump.
        // Only in the tree's root task (cr-dump.c: `root_item == item`; zdtm's cwd01, whose
        // deleted working directory is a child's, passes).
        let mounts_proc_in_cwd = t.pid == f.root
            && t.ns.get("pid") != f.own_ns.get("pid")
            && t.ns.get("mnt") == f.own_ns.get("mnt");
        let gone = if mounts_proc_in_cwd { &mut cwd_gone_proc } else { &mut cwd_gone };
        match &t.cwd {
            Some(PathState::Deleted { path, .. }) => gone.add(t.pid, format!("{} in {path}", who(t))),
            Some(PathState::Unreadable(e)) => gone.add(t.pid, format!("{}: {e}", who(t))),
            _ => {}
        }
        if let Some(PathState::Deleted { path, bytes, .. }) = &t.exe {
            // A memfd is dumped as one, whatever its size; as an executable its restore fails.
            if path.starts_with("/memfd:") {
                memfd_exe.add(t.pid, format!("{} runs {path}", who(t)));
            } else {
                sort(t.pid, format!("{} runs deleted {path}", who(t)), *bytes, false);
            }
        }
        for fd in &t.fds {
            if let FdKind::Path { path, deleted: true } = &fd.kind {
                // memfd and SysV shm are never on a file system: CRIU dumps them otherwise.
                if !path.starts_with("/memfd:") && !path.starts_with("/SYSV") {
                    let what = format!("{} fd {} {path}", who(t), fd.fd);
                    sort(t.pid, what, fd.deleted_bytes.unwrap_or(0), fd.deleted_linked);
                }
            }
        }
        for m in t.maps.iter().filter(|m| m.deleted) {
            let special = m.path.starts_with("/memfd:")
                || m.path.starts_with("/SYSV")
                || m.path == "/anon_hugepage"
                || m.path == "/dev/zero"
                // io_setup's ring: CRIU dumps and remaps it as an aio ring (zdtm's aio00).
                || m.path == "/[aio]";
            let exe = matches!(&t.exe, Some(PathState::Deleted { path, .. }) if *path == m.path);
            if !special && !exe {
                sort(
                    t.pid,
                    format!("{} maps {path}", who(t), path = m.path),
                    t.deleted_map_bytes.get(&m.path).copied().unwrap_or(0),
                    t.deleted_map_linked.contains(&m.path),
                );
            }
        }
    }
    let mut out = Vec::new();
    out.extend(cwd_gone.into_reason(
        "cwd-deleted",
        Severity::Caveat,
        "working directories deleted or unreachable",
        "CRIU recreates a deleted working directory as an empty \"ghost\" directory at restore and removes it again; the process keeps working, but nothing that was in it comes back",
        "let the process change to a directory that exists",
    ));
    out.extend(cwd_gone_proc.into_reason(
        "cwd-deleted-pidns",
        Severity::Blocker,
        "working directories deleted, in a pid namespace that sees the host's /proc",
        "CRIU's parasite mounts a proc of the task's pid namespace at proc.crtools in its working directory; in a deleted one it cannot (\"Can't create a directory\"): the dump fails",
        "let the process change to a directory that exists, or give its pid namespace a mount namespace with its own /proc",
    ));
    out.extend(memfd_exe.into_reason(
        "exe-memfd",
        Severity::Blocker,
        "tasks running an executable from a memfd",
        "CRIU 4.2.1 dumps the memfd, but its restore looks the executable up among regular files and fails (\"No entry for reg-file-ID\")",
        "run the program from a file on disk",
    ));
    out.extend(linked.into_reason(
        "deleted-file-linked",
        Severity::Blocker,
        "files open or mapped under a name since removed, still linked under another",
        "CRIU copies only files with no link left (ghost files); one still linked elsewhere it dumps by linking it under a new name (\"link remap\"), only with --link-remap, which ferry does not pass: the dump fails (\"Can't create link remap ... Use link-remap option\")",
        "reopen the file under the name it has now (or close it) before checkpointing",
    ));
    out.extend(small.into_reason(
        "deleted-file",
        Severity::Caveat,
        "deleted files still open or mapped",
        "CRIU copies a deleted file (up to 1 MiB on disk) into the checkpoint and recreates it, deleted again, at restore: it works, and the checkpoint carries the file's content",
        "nothing to do; close them first if their content must not travel",
    ));
    out.extend(large.into_reason(
        "deleted-file-large",
        Severity::Blocker,
        "deleted files over 1 MiB still open, mapped or executed",
        "CRIU copies deleted files only up to its ghost limit (1 MiB), which ferry does not raise: the dump fails (\"Can't dump ghost file\")",
        "restart the process so that it runs from and opens files that exist (after a package upgrade, restart it)",
    ));
    out
}

fn ipc_and_memory(f: &Facts) -> Vec<Reason> {
    let pids = f.pids();
    let mut out = Vec::new();
    let (mut attached, mut related, mut huge) = (Found::default(), Found::default(), Found::default());
    for t in &f.tasks {
        for m in &t.maps {
            if m.path.starts_with("/SYSV") {
                attached.add(t.pid, format!("{} attaches {}", who(t), m.path));
            } else if m.path == "/anon_hugepage"
                || f.hugetlbfs.iter().any(|d| m.path.starts_with(&format!("{d}/")))
            {
                huge.add(t.pid, format!("{} maps {} at {}", who(t), m.path, m.range));
            }
        }
    }
    match &f.shm {
        // The host's IPC namespace (ferry's), which CRIU does not dump.
        Some(segments) => {
            out.extend(attached.into_reason(
                "sysv-shm-attached",
                Severity::Blocker,
                "SysV shared memory attached in the host's IPC namespace",
                "CRIU dumps SysV segments only with an IPC namespace of the tree's own; it refuses a mapping of one that lives in the host's (\"doesn't live in IPC ns\"): the dump fails",
                "run the workload in an IPC namespace of its own (a container, or unshare --ipc) so that its segments travel with it, or use POSIX shared memory (/dev/shm files)",
            ));
            for s in segments.iter().filter(|s| pids.contains(&s.cpid) || pids.contains(&s.lpid)) {
                let pid = if pids.contains(&s.cpid) { s.cpid } else { s.lpid };
                related.add(
                    pid,
                    format!("segment {} (key {}, {} bytes, {} attached)", s.shmid, s.key, s.size, s.nattch),
                );
            }
            out.extend(related.into_reason(
                "sysv-ipc",
                Severity::Caveat,
                "SysV shared memory segments the tree created or last used, in the host's IPC namespace",
                "they are not part of the checkpoint: a restore elsewhere (or after they are removed) finds them missing",
                "run the workload in an IPC namespace of its own so that they travel with it",
            ));
        }
        // Its own IPC namespace: CRIU dumps it whole, segments included.
        None => out.extend(attached.into_reason(
            "sysv-ipc",
            Severity::Info,
            "SysV shared memory in the tree's own IPC namespace",
            "CRIU dumps the IPC namespace with its segments",
            "",
        )),
    }
    out.extend(huge.into_reason(
        "hugetlb",
        Severity::Caveat,
        "hugetlb mappings",
        "CRIU dumps hugetlb memory (through memfd on this kernel), but the restore needs free huge pages of the same size on the target: without them it fails",
        "reserve huge pages on the target (vm.nr_hugepages) before restoring",
    ));
    let rss_kib: u64 = f.tasks.iter().map(|t| t.status.rss_kib).sum();
    if let Some(avail) = f.mem_available_kib {
        let mib = |k: u64| k / 1024;
        let what = format!(
            "the tree's resident memory is at most {} MiB; {} MiB is available",
            mib(rss_kib),
            mib(avail)
        );
        let why = "the images are written to a tmpfs (RAM) before they are sealed into the store, and the restore needs the memory again";
        if rss_kib > avail {
            out.push(reason(
                "memory",
                Severity::Blocker,
                what,
                why,
                "free memory (or add swap) before checkpointing",
            ));
        } else if rss_kib > avail / 2 {
            out.push(reason("memory", Severity::Caveat, what, why, "free memory before checkpointing"));
        } else {
            out.push(reason("memory", Severity::Info, what, why, ""));
        }
    }
    out
}

fn tasks(f: &Facts) -> Vec<Reason> {
    let (mut traced, mut vfork, mut locks) = (Found::default(), Found::default(), Found::default());
    let (mut stuck, mut foreign) = (Found::default(), Found::default());
    // CRIU reads each task's rlimits with prlimit(2), which the kernel allows on a process
    // whose real, effective and saved uids and gids are not all the caller's only with
    // CAP_SYS_RESOURCE over its user namespace (kernel/sys.c: check_prlimit_permission).
    let own = &f.own_status;
    let may_prlimit_others = own.cap_eff & super::parse::CAP_SYS_RESOURCE != 0;
    for t in &f.tasks {
        let ours = t.status.uids == [own.uids[0]; 3] && t.status.gids == [own.gids[0]; 3];
        // Zombies' limits are not read (CRIU dumps little of them).
        let zombie = t.stat.state == 'Z';
        if !may_prlimit_others && !ours && !zombie && t.ns.get("user") == f.own_ns.get("user") {
            foreign.add(t.pid, format!("{} runs as uid {:?} gid {:?}", who(t), t.status.uids, t.status.gids));
        }
        for (tid, tracer) in &t.traced {
            traced.add(t.pid, format!("{} thread {tid} traced by {tracer}", who(t)));
        }
        if t.vfork {
            vfork.add(t.pid, format!("{} waits in vfork", who(t)));
        }
        if t.uninterruptible {
            stuck.add(t.pid, who(t));
        }
        if f.lock_holders.contains(&t.pid) {
            locks.add(t.pid, who(t));
        }
    }
    let mut out = Vec::new();
    out.extend(traced.into_reason(
        "traced",
        Severity::Blocker,
        "traced tasks",
        "CRIU seizes every task with ptrace; a task already traced (a debugger, strace) cannot be seized: the dump fails",
        "detach the debugger or tracer first",
    ));
    out.extend(vfork.into_reason(
        "vfork",
        Severity::Blocker,
        "tasks in vfork (seen in /proc/PID/syscall or the wait channel)",
        "a vfork parent sleeps uninterruptibly (state D) until its child execs or exits; CRIU cannot seize it and gives up after 10 s (\"Unseizable non-zombie ... state D\"): the dump fails",
        "retry once the child has exec'd (normally at once; a child that never execs keeps its parent stuck)",
    ));
    out.extend(stuck.into_reason(
        "uninterruptible",
        Severity::Caveat,
        "tasks in uninterruptible sleep (state D)",
        "CRIU cannot seize a task in state D; if it stays so for 10 s (slow storage, a hung NFS server) the dump fails",
        "retry when the I/O it waits for completes",
    ));
    out.extend(foreign.into_reason(
        "credentials",
        Severity::Blocker,
        "tasks whose user or group ids are not CRIU's, which lacks CAP_SYS_RESOURCE",
        "CRIU reads every task's resource limits (prlimit), which the kernel refuses on another user's process without CAP_SYS_RESOURCE, withheld here even from root: the dump fails (\"Can't get rlimit 0: Operation not permitted\")",
        "run the workload with ferry's user and group ids, or run ferry with CAP_SYS_RESOURCE",
    ));
    out.extend(locks.into_reason(
        "file-locks",
        Severity::Blocker,
        "tasks holding file locks (/proc/locks)",
        "CRIU dumps file locks only with --file-locks, which ferry does not pass: the dump fails",
        "release the locks before checkpointing",
    ));
    out
}

fn namespaces(f: &Facts) -> Vec<Reason> {
    let mut out = Vec::new();
    if let Some(root) = f.tasks.first() {
        let own_pid_ns = root.ns.get("pid") == f.own_ns.get("pid");
        if !own_pid_ns && root.status.ns_pids.last().is_some_and(|p| *p != 1) {
            let mut r = reason(
                "pid-namespace",
                Severity::Blocker,
                format!(
                    "{} is pid {} of its pid namespace, not its init",
                    who(root),
                    root.status.ns_pids.last().copied().unwrap_or(0)
                ),
                "CRIU dumps a pid namespace only from its init (pid 1): the dump fails",
                "checkpoint the namespace's init (its pid 1) instead",
            );
            r.pids = vec![root.pid];
            out.push(r);
        }
    }
    // The root's parent, when the root is the init of a pid namespace that parent made (`unshare
    // --pid --fork`, the lab's launcher): it only waits for the tree, and what CRIU does to the
    // namespaces it shares takes nothing from it that the tree used.
    let launcher = f
        .tasks
        .first()
        .filter(|root| root.ns.get("pid") != f.own_ns.get("pid") && root.status.ns_pids.last() == Some(&1))
        .map(|root| root.stat.ppid);
    let mut launcher_kinds = Vec::new();
    for (kind, others) in &f.ns_shared_with {
        let others: Vec<i32> = others.iter().copied().filter(|p| Some(*p) != launcher).collect();
        if others.len() < f.ns_shared_with[kind].len() {
            launcher_kinds.push(kind.as_str());
        }
        if others.is_empty() {
            continue;
        }
        let pids: Vec<String> = others.iter().map(i32::to_string).collect();
        out.push(reason(
            "shared-namespace",
            Severity::Caveat,
            format!("the tree's {kind} namespace is shared with processes outside it (pids {})", pids.join(", ")),
            "CRIU dumps the namespace with the tree and restores a new one: the restored tree no longer shares it with them (and with the original still running, both hold the same addresses or names)",
            "checkpoint the whole group (the pod, or the processes that share it), or run the workload in namespaces of its own",
        ));
    }
    if let (Some(pid), false) = (launcher, launcher_kinds.is_empty()) {
        out.push(reason(
            "namespace-launcher",
            Severity::Info,
            format!("the tree's {} namespace is also its launcher's (pid {pid}, the parent of its pid namespace's init)", launcher_kinds.join(", ")),
            "a launcher that made the tree's pid namespace and waits for it is left behind; the restored tree gets new namespaces of its own",
            "",
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::super::gather::FdFacts;
    use super::super::parse::{self, Mapping, TcpSocket};
    use super::super::unix_diag::UnixSocket;
    use super::*;

    fn task(pid: i32) -> TaskFacts {
        TaskFacts {
            pid,
            comm: "app".into(),
            stat: parse::Stat { state: 'S', ppid: 1, session: pid, tty_nr: 0 },
            ns: BTreeMap::from([("pid".to_owned(), 1), ("net".to_owned(), 2), ("ipc".to_owned(), 3)]),
            cwd: Some(PathState::Present("/srv".into())),
            exe: Some(PathState::Present("/usr/bin/app".into())),
            ..Default::default()
        }
    }

    fn facts(tasks: Vec<TaskFacts>) -> Facts {
        Facts {
            root: tasks[0].pid,
            own_ns: tasks[0].ns.clone(),
            tasks,
            mem_available_kib: Some(1 << 20),
            ..Default::default()
        }
    }

    fn fd(fd: i32, link: &str) -> FdFacts {
        FdFacts {
            fd,
            kind: parse::fd_kind(link),
            rdev: None,
            deleted_bytes: None,
            deleted_linked: false,
            ptmx_index: None,
            pipe: None,
        }
    }

    #[test]
    fn pipes_with_one_end_in_the_tree() {
        let mut t = task(10);
        t.fds = vec![fd(1, "pipe:[5]"), fd(3, "pipe:[6]"), fd(4, "pipe:[6]")];
        t.fds[0].pipe = Some((5, true));
        t.fds[1].pipe = Some((6, false));
        t.fds[2].pipe = Some((6, true));
        let r = evaluate(&facts(vec![t]), CheckOptions::default());
        let p: Vec<&Reason> = r.iter().filter(|r| r.code == "pipe-external").collect();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].severity, Severity::Caveat);
        assert!(
            p[0].what.contains("fd 1 writes to pipe:[5]") && !p[0].what.contains("pipe:[6]"),
            "{}",
            p[0].what
        );
    }

    fn codes(f: &Facts, opts: CheckOptions) -> Vec<(&'static str, Severity)> {
        let mut c: Vec<_> = evaluate(f, opts)
            .into_iter()
            .filter(|r| r.severity != Severity::Info)
            .map(|r| (r.code, r.severity))
            .collect();
        c.sort();
        c
    }

    #[test]
    fn a_plain_tree_has_no_caveat() {
        let mut t = task(10);
        t.fds = vec![
            fd(0, "/dev/null"),
            fd(1, "pipe:[4]"),
            fd(3, "anon_inode:[eventpoll]"),
            fd(4, "anon_inode:[eventfd]"),
        ];
        t.fds[0].rdev = Some((1, 3));
        assert_eq!(codes(&facts(vec![t, task(11)]), CheckOptions::default()), vec![]);
    }

    #[test]
    fn unsupported_descriptors_block() {
        let mut t = task(10);
        t.fds = vec![
            fd(3, "anon_inode:[io_uring]"),
            fd(4, "anon_inode:[perf_event]"),
            fd(5, "anon_inode:bpf-prog"),
            fd(6, "anon_inode:[userfaultfd]"),
            fd(7, "/dev/nvidia0"),
            fd(8, "/dev/net/tun"),
            fd(9, "anon_inode:[fanotify]"),
        ];
        t.fds[4].rdev = Some((195, 0));
        t.fds[5].rdev = Some((10, 200));
        let c = codes(&facts(vec![t]), CheckOptions::default());
        assert_eq!(
            c,
            vec![
                ("anon-inode", Severity::Blocker),
                ("bpf", Severity::Blocker),
                ("device", Severity::Blocker),
                ("fanotify", Severity::Caveat),
                ("io-uring", Severity::Blocker),
                ("perf-event", Severity::Blocker),
                ("tun", Severity::Blocker),
            ]
        );
        let r = evaluate(&facts(vec![task(10)]), CheckOptions::default());
        assert!(r.iter().all(|r| r.code != "device"));
    }

    #[test]
    fn unix_peers_outside_the_tree_block() {
        let mut a = task(10);
        a.fds = vec![fd(3, "socket:[100]"), fd(4, "socket:[101]")];
        let mut b = task(11);
        b.fds = vec![fd(3, "socket:[102]")];
        let mut f = facts(vec![a, b]);
        let sock =
            |inode, peer, name: Option<&str>| UnixSocket { inode, kind: 1, name: name.map(Into::into), peer };
        // 100-102 is a pair inside the tree; 101's peer 900 is the journal's.
        f.unix = HashMap::from([
            (100, sock(100, Some(102), None)),
            (102, sock(102, Some(100), None)),
            (101, sock(101, Some(900), None)),
            (900, sock(900, Some(101), Some("/run/systemd/journal/stdout"))),
        ]);
        let r = evaluate(&f, CheckOptions::default());
        let ext: Vec<&Reason> = r.iter().filter(|r| r.code == "unix-external").collect();
        assert_eq!(ext.len(), 1);
        assert!(
            ext[0].what.contains("pid 10 (app) fd 4 connected to /run/systemd/journal/stdout"),
            "{}",
            ext[0].what
        );
        assert_eq!(ext[0].pids, vec![10]);
        f.unix_error = Some("no permission".into());
        assert_eq!(codes(&f, CheckOptions::default()), vec![("unix-unknown", Severity::Caveat)]);
    }

    #[test]
    fn tcp_states_by_option() {
        let mut t = task(10);
        t.fds = vec![fd(3, "socket:[1]"), fd(4, "socket:[2]"), fd(5, "socket:[3]"), fd(6, "socket:[4]")];
        let mut f = facts(vec![t]);
        let s = |inode, state, rx_queue| TcpSocket { inode, state, endpoints: "a -> b".into(), rx_queue };
        f.tcp = vec![
            s(1, TcpState::Listen, 0),
            s(2, TcpState::Established, 0),
            s(3, TcpState::FinWait1, 0),
            s(4, TcpState::Listen, 3),
            s(99, TcpState::Established, 0),
        ];
        let unknown = codes(&f, CheckOptions { tcp_established: None, tree_needs: false });
        assert_eq!(
            unknown,
            vec![
                ("tcp-accept-queue", Severity::Blocker),
                ("tcp-established", Severity::Caveat),
                ("tcp-transient", Severity::Caveat)
            ]
        );
        let refused = codes(&f, CheckOptions { tcp_established: Some(false), tree_needs: false });
        assert!(refused.contains(&("tcp-established", Severity::Blocker)));
        assert!(refused.contains(&("tcp-transient", Severity::Blocker)));
        let asked = codes(&f, CheckOptions { tcp_established: Some(true), tree_needs: false });
        assert!(asked.contains(&("tcp-established", Severity::Caveat)));
    }

    #[test]
    fn closed_connections_fail_the_restore_without_the_flag() {
        // zdtm's socket-tcp-close2: both ends shut down, both sockets still open, in no table.
        let mut t = task(10);
        t.fds = vec![fd(5, "socket:[7]"), fd(6, "socket:[8]"), fd(7, "socket:[9]")];
        let mut f = facts(vec![t]);
        f.tcp_closed = BTreeSet::from([7, 8]);
        let by = |tcp_established| codes(&f, CheckOptions { tcp_established, tree_needs: false });
        assert_eq!(by(Some(false)), vec![("tcp-closed", Severity::Blocker)]);
        assert_eq!(by(None), vec![("tcp-closed", Severity::Caveat)]);
        // With the flag CRIU restores them: worth knowing only.
        assert_eq!(by(Some(true)), vec![]);
        let r = evaluate(&f, CheckOptions { tcp_established: Some(true), tree_needs: false });
        let closed = r.iter().find(|r| r.code == "tcp-closed").expect("reason");
        assert_eq!(closed.severity, Severity::Info);
        assert!(
            closed.what.contains("fd 5") && closed.what.contains("fd 6") && !closed.what.contains("fd 7")
        );
    }

    #[test]
    fn terminals_and_sessions() {
        let mut t = task(10);
        t.stat.tty_nr = 34816 + 5; // /dev/pts/5
        t.stat.session = 3;
        let f = facts(vec![t.clone()]);
        assert_eq!(
            codes(&f, CheckOptions::default()),
            vec![("session", Severity::Blocker), ("terminal", Severity::Blocker)]
        );
        // The tree holds the master of pts/5 and leads its session: fine.
        t.stat.session = 10;
        t.fds = vec![fd(3, "/dev/ptmx")];
        t.fds[0].ptmx_index = Some(5);
        assert_eq!(codes(&facts(vec![t.clone()]), CheckOptions::default()), vec![]);
        // A virtual terminal (4:5) the tree holds open, made with mknod anywhere (zdtm's vt):
        // CRIU dumps it and the session leader sets it again.
        t.stat.tty_nr = (4 << 8) | 5;
        t.fds = vec![fd(3, "/srv/vt5")];
        assert_eq!(
            codes(&facts(vec![t.clone()]), CheckOptions::default()),
            vec![("terminal", Severity::Blocker)]
        );
        t.fds[0].rdev = Some((4, 5));
        assert_eq!(codes(&facts(vec![t.clone()]), CheckOptions::default()), vec![]);
        // A pty slave held without its master is still outside.
        t.stat.tty_nr = 34816 + 5;
        t.fds[0].rdev = Some((136, 5));
        assert_eq!(codes(&facts(vec![t]), CheckOptions::default()), vec![("terminal", Severity::Blocker)]);
    }

    #[test]
    fn deleted_things_by_size() {
        let mut t = task(10);
        t.cwd = Some(PathState::Deleted { path: "/tmp/gone".into(), bytes: 0, dir: true });
        t.fds = vec![fd(3, "/tmp/small (deleted)"), fd(4, "/tmp/big (deleted)"), fd(5, "/memfd:x (deleted)")];
        t.fds[0].deleted_bytes = Some(4096);
        t.fds[1].deleted_bytes = Some(8 << 20);
        let f = facts(vec![t.clone()]);
        assert_eq!(
            codes(&f, CheckOptions::default()),
            vec![
                ("cwd-deleted", Severity::Caveat),
                ("deleted-file", Severity::Caveat),
                ("deleted-file-large", Severity::Blocker)
            ]
        );
        // The same directory, seen from a pid namespace of its own sharing our /proc.
        let mut p = t.clone();
        p.ns.insert("pid".into(), 99);
        let mut f = facts(vec![p]);
        f.own_ns = task(1).ns;
        assert!(codes(&f, CheckOptions::default()).contains(&("cwd-deleted-pidns", Severity::Blocker)));
        // CRIU mounts that proc in the root task's directory only: a child's is a caveat
        // (zdtm's cwd01).
        let mut root = task(9);
        root.ns.insert("pid".into(), 99);
        f.tasks.insert(0, root);
        f.root = 9;
        let c = codes(&f, CheckOptions::default());
        assert!(
            c.contains(&("cwd-deleted", Severity::Caveat)) && !c.iter().any(|c| c.0 == "cwd-deleted-pidns")
        );
        let mut m = task(10);
        m.exe = Some(PathState::Deleted { path: "/memfd:runc_cloned".into(), bytes: 12 << 20, dir: false });
        m.maps = vec![Mapping { range: "1-2".into(), path: "/memfd:runc_cloned".into(), deleted: true }];
        // Not a ghost file (no size limit), but an executable CRIU cannot restore.
        assert_eq!(codes(&facts(vec![m]), CheckOptions::default()), vec![("exe-memfd", Severity::Blocker)]);
        let mut u = task(10);
        u.exe = Some(PathState::Deleted { path: "/usr/bin/app".into(), bytes: 30 << 20, dir: false });
        u.maps = vec![Mapping { range: "1-2".into(), path: "/usr/bin/app".into(), deleted: true }];
        let r = evaluate(&facts(vec![u]), CheckOptions::default());
        let large: Vec<&Reason> = r.iter().filter(|r| r.code == "deleted-file-large").collect();
        // The executable's own mapping is not counted twice.
        assert_eq!(large.len(), 1);
        assert!(large[0].what.contains("runs deleted /usr/bin/app") && !large[0].what.contains("maps"));
    }

    #[test]
    fn proc_files_of_the_tree_by_host_pid_in_a_pid_namespace() {
        // zdtm's fanotify00 in the sweep: it keeps /proc/self/fdinfo/4 open, which reads as
        // its host pid when the namespace shares our /proc.
        let mut t = task(10);
        t.ns.insert("pid".into(), 99);
        t.ns.insert("mnt".into(), 5);
        t.fds = vec![fd(3, "/proc/10/fdinfo/4"), fd(4, "/proc/1/status"), fd(5, "/proc/meminfo")];
        let mut f = facts(vec![t]);
        f.own_ns.insert("pid".into(), 1);
        assert_eq!(codes(&f, CheckOptions::default()), vec![("proc-pid-file", Severity::Blocker)]);
        let r = evaluate(&f, CheckOptions::default());
        let p = r.iter().find(|r| r.code == "proc-pid-file").expect("reason");
        assert!(p.what.contains("/proc/10/fdinfo/4") && !p.what.contains("/proc/1/status"));
        // In our pid namespace CRIU restores the same pids: the path stays right.
        f.own_ns.insert("pid".into(), 99);
        assert_eq!(codes(&f, CheckOptions::default()), vec![]);
        // With a mount namespace (and /proc) of its own, the path holds the namespace's pid.
        f.own_ns.insert("pid".into(), 1);
        f.own_ns.insert("mnt".into(), 6);
        assert_eq!(codes(&f, CheckOptions::default()), vec![]);
    }

    #[test]
    fn zombies_have_nothing_to_judge() {
        let mut z = task(11);
        z.stat.state = 'Z';
        z.cwd = Some(PathState::Unreadable("No such file or directory".into()));
        z.exe = Some(PathState::Unreadable("No such file or directory".into()));
        assert_eq!(codes(&facts(vec![task(10), z]), CheckOptions::default()), vec![]);
    }

    #[test]
    fn other_users_tasks_block_without_cap_sys_resource() {
        // zdtm's pid00: a child with uids 1, 2, 3. CRIU's prlimit on it fails here.
        let mut child = task(11);
        child.status.uids = [1, 2, 3];
        let mut f = facts(vec![task(10), child]);
        assert_eq!(codes(&f, CheckOptions::default()), vec![("credentials", Severity::Blocker)]);
        let r = evaluate(&f, CheckOptions::default());
        let c = r.iter().find(|r| r.code == "credentials").expect("reason");
        assert_eq!(c.pids, vec![11]);
        // Only the gids differing is as bad.
        f.tasks[1].status.uids = [0; 3];
        f.tasks[1].status.gids = [0, 6, 0];
        assert_eq!(codes(&f, CheckOptions::default()), vec![("credentials", Severity::Blocker)]);
        // With CAP_SYS_RESOURCE, or in a user namespace of its own, the kernel lets CRIU.
        f.own_status.cap_eff = parse::CAP_SYS_RESOURCE;
        assert_eq!(codes(&f, CheckOptions::default()), vec![]);
        f.own_status.cap_eff = 0;
        f.tasks[1].ns.insert("user".into(), 77);
        assert!(!codes(&f, CheckOptions::default()).contains(&("credentials", Severity::Blocker)));
    }

    #[test]
    fn a_removed_name_still_linked_elsewhere_needs_link_remap() {
        // zdtm's unlink_fstat03: open, link under a second name, unlink the first. Small, but
        // no ghost file: CRIU wants --link-remap.
        let mut t = task(10);
        t.fds = vec![fd(3, "/srv/data (deleted)"), fd(4, "/srv/gone (deleted)")];
        t.fds[0].deleted_bytes = Some(4096);
        t.fds[0].deleted_linked = true;
        t.fds[1].deleted_bytes = Some(4096);
        t.maps = vec![Mapping { range: "1-2".into(), path: "/srv/lib.so".into(), deleted: true }];
        t.deleted_map_linked.insert("/srv/lib.so".into());
        let f = facts(vec![t]);
        assert_eq!(
            codes(&f, CheckOptions::default()),
            vec![("deleted-file", Severity::Caveat), ("deleted-file-linked", Severity::Blocker)]
        );
        let r = evaluate(&f, CheckOptions::default());
        let linked = r.iter().find(|r| r.code == "deleted-file-linked").expect("reason");
        assert!(linked.what.contains("fd 3 /srv/data") && linked.what.contains("maps /srv/lib.so"));
        assert!(!linked.what.contains("gone"));
    }

    #[test]
    fn the_aio_ring_is_no_deleted_file() {
        // zdtm's aio00: io_setup maps `/[aio] (deleted)`, which CRIU dumps as an aio ring.
        let mut t = task(10);
        t.maps = vec![Mapping { range: "1-2".into(), path: "/[aio]".into(), deleted: true }];
        t.deleted_map_linked.insert("/[aio]".into());
        assert_eq!(codes(&facts(vec![t]), CheckOptions::default()), vec![]);
    }

    #[test]
    fn shm_hugetlb_tracing_vfork_locks_memory() {
        let mut t = task(10);
        t.maps = vec![
            Mapping { range: "a-b".into(), path: "/SYSV00000000".into(), deleted: true },
            Mapping { range: "c-d".into(), path: "/anon_hugepage".into(), deleted: true },
            Mapping { range: "e-f".into(), path: "/dev/hugepages/x".into(), deleted: false },
        ];
        t.traced = vec![(12, 999)];
        t.vfork = true;
        t.uninterruptible = true;
        t.status.rss_kib = 3 << 20;
        let mut f = facts(vec![t]);
        f.hugetlbfs = vec!["/dev/hugepages".into()];
        f.shm = Some(vec![]);
        f.lock_holders = vec![10];
        assert_eq!(
            codes(&f, CheckOptions::default()),
            vec![
                ("file-locks", Severity::Blocker),
                ("hugetlb", Severity::Caveat),
                ("memory", Severity::Blocker),
                ("sysv-shm-attached", Severity::Blocker),
                ("traced", Severity::Blocker),
                ("uninterruptible", Severity::Caveat),
                ("vfork", Severity::Blocker),
            ]
        );
        // In its own IPC namespace the segment travels: information only.
        f.shm = None;
        assert!(!codes(&f, CheckOptions::default()).iter().any(|(c, _)| c.starts_with("sysv")));
        // Segments it made but does not attach stay behind: a caveat.
        f.tasks[0].maps.clear();
        f.shm = Some(vec![parse::ShmSegment { key: 0, shmid: 3, size: 4096, cpid: 10, lpid: 10, nattch: 0 }]);
        assert!(codes(&f, CheckOptions::default()).contains(&("sysv-ipc", Severity::Caveat)));
    }

    #[test]
    fn namespaces_shared_and_pid_init() {
        let mut t = task(10);
        t.ns.insert("pid".into(), 77);
        t.status.ns_pids = vec![10, 4];
        let mut f = facts(vec![t]);
        f.own_ns.insert("pid".into(), 1);
        f.ns_shared_with = BTreeMap::from([("net".to_owned(), vec![5, 6])]);
        assert_eq!(
            codes(&f, CheckOptions::default()),
            vec![("pid-namespace", Severity::Blocker), ("shared-namespace", Severity::Caveat)]
        );
        // The init's parent (its launcher) sharing the net namespace is no caveat; another
        // process still is.
        f.tasks[0].status.ns_pids = vec![10, 1];
        f.tasks[0].stat.ppid = 5;
        let launcher = |f: &Facts| {
            evaluate(f, CheckOptions::default())
                .into_iter()
                .find(|r| r.code == "namespace-launcher")
                .map(|r| (r.severity, r.what))
        };
        assert_eq!(codes(&f, CheckOptions::default()), vec![("shared-namespace", Severity::Caveat)]);
        assert!(launcher(&f).is_some_and(|(s, w)| s == Severity::Info && w.contains("net namespace")));
        f.ns_shared_with = BTreeMap::from([("net".to_owned(), vec![5]), ("uts".to_owned(), vec![5])]);
        assert_eq!(codes(&f, CheckOptions::default()), vec![]);
        assert!(launcher(&f).is_some_and(|(_, w)| w.contains("net, uts namespace") && w.contains("pid 5")));
        // A root in ferry's own pid namespace has no launcher: its parent is any other process.
        f.tasks[0].ns.insert("pid".into(), 1);
        assert_eq!(
            codes(&f, CheckOptions::default()),
            vec![("shared-namespace", Severity::Caveat), ("shared-namespace", Severity::Caveat)]
        );
        assert_eq!(launcher(&f), None);
        f.ns_shared_with.clear();
        assert_eq!(codes(&f, CheckOptions::default()), vec![]);
    }

    #[test]
    fn instances_are_capped() {
        let mut t = task(10);
        t.fds = (0..20).map(|i| fd(i, "anon_inode:[io_uring]")).collect();
        let r = evaluate(&facts(vec![t]), CheckOptions::default());
        let uring = r.iter().find(|r| r.code == "io-uring").expect("io-uring");
        assert!(uring.what.ends_with("and 12 more"), "{}", uring.what);
    }

    #[test]
    fn host_reasons() {
        let old = HostFacts {
            kernel: "6.1".into(),
            criu: Some(Ok(ferry_criu::Version { major: 4, minor: 1, sublevel: 0 })),
        };
        assert!(host(&old).iter().any(|r| r.code == "criu" && r.severity == Severity::Blocker));
        let none = HostFacts { kernel: String::new(), criu: Some(Err("not found".into())) };
        assert!(host(&none).iter().any(|r| r.code == "criu" && r.severity == Severity::Blocker));
        assert_eq!(external_ns("net[4026532000]:extRootNetNS"), Some(("net".into(), 4026532000)));
        assert_eq!(external_ns("garbage"), None);
    }
}

//! Reads the facts the rules judge from `/proc` (and the options of sockets no table lists,
//! through a copy of their descriptor): reads only, no ptrace, no signal. Every file
//! is read with a cap, and the tree, its threads and its descriptors are counted with caps
//! too, so a hostile or huge tree costs a bounded time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use ferry_criu::{Criu, Version};

use super::parse::{self, FdKind, Mapping, ShmSegment, Stat, Status, TcpSocket, TcpState};
use super::unix_diag::{self, UnixSocket};

/// At most this many processes of a tree are read (a reason says when there were more).
pub const MAX_PROCESSES: usize = 4096;
/// Descriptors read per process.
pub const MAX_FDS: usize = 65536;
/// Threads read per process.
const MAX_THREADS: usize = 4096;
/// Bytes read of a `/proc` file with one line per entry (maps, net tables, locks).
const MAX_TABLE: u64 = 16 << 20;
/// Bytes read of a small `/proc` file (stat, status).
const MAX_SMALL: u64 = 64 << 10;
/// Processes of the host scanned for namespace sharing.
const MAX_HOST_PROCESSES: usize = 1 << 17;
/// Sockets in no table probed through `pidfd_getfd` (each costs a handful of syscalls).
const MAX_SOCKET_PROBES: usize = 1024;

/// The namespaces CRIU knows, by their name under `/proc/PID/ns`.
pub const NAMESPACES: [&str; 8] = ["pid", "net", "ipc", "uts", "mnt", "user", "cgroup", "time"];

/// A path a task holds (its working directory, executable, an open file or a mapping).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathState {
    Present(String),
    /// Deleted, with the space it takes (what CRIU copies into a "ghost" file).
    Deleted {
        path: String,
        bytes: u64,
        dir: bool,
    },
    /// Could not be read (the task exited, or no permission).
    Unreadable(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdFacts {
    pub fd: i32,
    pub kind: FdKind,
    /// A character device's major and minor.
    pub rdev: Option<(u32, u32)>,
    /// A deleted file's allocated bytes.
    pub deleted_bytes: Option<u64>,
    /// A deleted file that still has links (`st_nlink` > 0): unlinked from the path the task
    /// opened, linked under another name.
    pub deleted_linked: bool,
    /// A `/dev/ptmx` master's pty index.
    pub ptmx_index: Option<u32>,
    /// A pipe's inode and whether this is its write end.
    pub pipe: Option<(u64, bool)>,
}

/// One process of the tree.
#[derive(Debug, Clone, Default)]
pub struct TaskFacts {
    pub pid: i32,
    pub comm: String,
    pub stat: Stat,
    pub status: Status,
    /// Threads (tids) traced, with their tracer.
    pub traced: Vec<(i32, i32)>,
    /// In a vfork: waiting for its child to exec or exit.
    pub vfork: bool,
    /// A thread in uninterruptible sleep (state D) for another reason.
    pub uninterruptible: bool,
    pub ns: BTreeMap<String, u64>,
    pub cwd: Option<PathState>,
    pub exe: Option<PathState>,
    pub fds: Vec<FdFacts>,
    pub fds_truncated: bool,
    pub maps: Vec<Mapping>,
    /// Allocated bytes of each deleted mapped file, by path.
    pub deleted_map_bytes: BTreeMap<String, u64>,
    /// Deleted mapped files that still have links elsewhere, by path.
    pub deleted_map_linked: BTreeSet<String>,
}

/// Facts of the host, not of the workload.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    pub kernel: String,
    pub criu: Option<Result<Version, String>>,
}

/// Everything the rules judge about a tree.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub root: i32,
    pub tasks: Vec<TaskFacts>,
    /// More processes than [`MAX_PROCESSES`]: the rest was not read.
    pub truncated: bool,
    /// What could not be read, and why.
    pub unreadable: Vec<String>,
    /// The namespaces of ferry itself (those CRIU runs in, which it does not dump).
    pub own_ns: BTreeMap<String, u64>,
    /// Ferry's own ids and capabilities (CRIU runs with them), from `/proc/self/status`.
    pub own_status: Status,
    /// Namespaces the runtime declares external to CRIU (`net[INODE]`): not dumped.
    pub external_ns: Vec<(String, u64)>,
    /// For each namespace kind of the tree that is not ferry's: processes outside the tree in it.
    pub ns_shared_with: BTreeMap<String, Vec<i32>>,
    /// TCP sockets of the tree's network namespaces.
    pub tcp: Vec<TcpSocket>,
    /// Inodes of the tree's TCP sockets in the close state that still name a peer: connections
    /// closed on both sides whose descriptor is still open. No table lists them (the kernel
    /// unhashes a closed socket); a probe of the descriptor finds them.
    pub tcp_closed: BTreeSet<u64>,
    /// Unix sockets of the tree's network namespaces.
    pub unix: HashMap<u64, UnixSocket>,
    /// Why they could not all be listed.
    pub unix_error: Option<String>,
    /// SysV shared memory segments of the tree's IPC namespace, when it is ferry's.
    pub shm: Option<Vec<ShmSegment>>,
    /// Mount points of hugetlbfs (as the root sees them).
    pub hugetlbfs: Vec<String>,
    /// Pids holding a file lock (`/proc/locks`).
    pub lock_holders: Vec<i32>,
    pub mem_available_kib: Option<u64>,
}

impl Facts {
    pub fn pids(&self) -> BTreeSet<i32> {
        self.tasks.iter().map(|t| t.pid).collect()
    }

    /// Inodes of the sockets the tree holds.
    pub fn socket_inodes(&self) -> BTreeSet<u64> {
        self.tasks
            .iter()
            .flat_map(|t| &t.fds)
            .filter_map(|f| match f.kind {
                FdKind::Socket(i) => Some(i),
                _ => None,
            })
            .collect()
    }
}

/// `path`'s first `cap` bytes as text (invalid UTF-8 replaced).
pub fn read_head(path: impl AsRef<Path>, cap: u64) -> io::Result<String> {
    let mut buf = Vec::new();
    fs::File::open(path)?.take(cap).read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn read_link(path: impl AsRef<Path>) -> io::Result<String> {
    // Links under /proc are at most PATH_MAX; lossy: paths need not be UTF-8.
    Ok(fs::read_link(path)?.to_string_lossy().chars().take(4096).collect())
}

pub fn host(criu: Result<&Criu, &str>) -> HostFacts {
    HostFacts {
        kernel: read_head("/proc/sys/kernel/osrelease", 256).unwrap_or_default().trim().to_owned(),
        criu: Some(match criu {
            Ok(c) => c.version().map_err(|e| e.to_string()),
            Err(why) => Err(why.to_owned()),
        }),
    }
}

/// The tree under `root`: its processes, by `/proc/PID/task/TID/children`, breadth first.
fn tree_pids(root: i32, unreadable: &mut Vec<String>) -> (Vec<i32>, bool) {
    let mut pids = vec![root];
    let mut seen: BTreeSet<i32> = pids.iter().copied().collect();
    let mut next = 0;
    while next < pids.len() {
        let pid = pids[next];
        next += 1;
        let tasks = match fs::read_dir(format!("/proc/{pid}/task")) {
            Ok(d) => d,
            Err(e) => {
                unreadable.push(format!("/proc/{pid}/task: {e}"));
                continue;
            }
        };
        for tid in tasks.flatten().take(MAX_THREADS) {
            let children = read_head(tid.path().join("children"), MAX_SMALL).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse::<i32>().ok()) {
                if seen.insert(child) {
                    if pids.len() >= MAX_PROCESSES {
                        return (pids, true);
                    }
                    pids.push(child);
                }
            }
        }
    }
    (pids, false)
}

/// Reads the facts of the tree under `root`.
pub fn tree(root: i32, external_ns: &[(String, u64)]) -> Facts {
    let mut f = Facts { root, external_ns: external_ns.to_vec(), ..Default::default() };
    let (pids, truncated) = tree_pids(root, &mut f.unreadable);
    f.truncated = truncated;
    f.own_ns = namespaces("self");
    f.own_status = parse::status(&read_head("/proc/self/status", MAX_SMALL).unwrap_or_default());
    let hugetlbfs = read_head(format!("/proc/{root}/mounts"), MAX_TABLE).unwrap_or_default();
    f.hugetlbfs = parse::hugetlbfs_mounts(&hugetlbfs);
    for pid in pids {
        match task(pid) {
            Ok(t) => f.tasks.push(t),
            // A task that exited meanwhile is no reason.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => f.unreadable.push(format!("/proc/{pid}: {e}")),
        }
    }
    f.ns_shared_with = shared_namespaces(&f);
    sockets(&mut f);
    let ipc_is_ours = f.tasks.first().and_then(|t| t.ns.get("ipc")) == f.own_ns.get("ipc");
    if ipc_is_ours {
        f.shm = Some(parse::sysvipc_shm(&read_head("/proc/sysvipc/shm", MAX_TABLE).unwrap_or_default()));
    }
    let locks = read_head("/proc/locks", MAX_TABLE).unwrap_or_default();
    f.lock_holders = lock_holders(&locks);
    f.mem_available_kib =
        parse::mem_available_kib(&read_head("/proc/meminfo", MAX_SMALL).unwrap_or_default());
    f
}

/// Pids in `/proc/locks` (`1: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE START END`; OFD locks
/// have no pid: -1). Blocked waiters (`->`) are the same pids again.
pub fn lock_holders(locks: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = locks
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().filter(|w| *w != "->").take(6).collect();
            f.get(4)?.parse().ok()
        })
        .filter(|p| *p > 0)
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn namespaces(pid: &str) -> BTreeMap<String, u64> {
    NAMESPACES
        .iter()
        .filter_map(|ns| {
            let link = read_link(format!("/proc/{pid}/ns/{ns}")).ok()?;
            Some(((*ns).to_owned(), parse::ns_inode(&link)?))
        })
        .collect()
}

fn path_state(link: io::Result<String>, target: &Path) -> PathState {
    match link {
        Err(e) => PathState::Unreadable(e.to_string()),
        Ok(l) => match l.strip_suffix(" (deleted)") {
            None => PathState::Present(l),
            Some(path) => {
                // The link still reaches the inode: its size is what a ghost copy costs.
                let (bytes, dir) =
                    fs::metadata(target).map(|m| (m.blocks() * 512, m.is_dir())).unwrap_or((0, false));
                PathState::Deleted { path: path.to_owned(), bytes, dir }
            }
        },
    }
}

fn task(pid: i32) -> io::Result<TaskFacts> {
    let dir = format!("/proc/{pid}");
    let stat_text = read_head(format!("{dir}/stat"), MAX_SMALL)?;
    let stat =
        parse::stat(&stat_text).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad stat"))?;
    let mut t = TaskFacts {
        pid,
        comm: parse::stat_comm(&stat_text),
        stat,
        status: parse::status(&read_head(format!("{dir}/status"), MAX_SMALL)?),
        ns: namespaces(&pid.to_string()),
        ..Default::default()
    };
    for tid in fs::read_dir(format!("{dir}/task"))?.flatten().take(MAX_THREADS) {
        let Some(tid_n) = tid.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let s = parse::status(&read_head(tid.path().join("status"), MAX_SMALL).unwrap_or_default());
        if s.tracer_pid != 0 {
            t.traced.push((tid_n, s.tracer_pid));
        }
        // A vfork parent sleeps uninterruptibly: only such threads are worth the syscall file.
        let tstat = parse::stat(&read_head(tid.path().join("stat"), MAX_SMALL).unwrap_or_default());
        if tstat.is_some_and(|s| s.state == 'D') {
            let sc = read_head(tid.path().join("syscall"), 512).unwrap_or_default();
            let wchan = read_head(tid.path().join("wchan"), 128).unwrap_or_default();
            // kernel_clone's only sleep is the vfork wait (wait_for_vfork_done is inlined
            // there); the wait channel also catches clone3's vfork, which syscall cannot show.
            let vfork =
                parse::syscall_is_vfork(&sc) || wchan.contains("vfork") || wchan.trim() == "kernel_clone";
            t.vfork |= vfork;
            t.uninterruptible |= !vfork;
        }
    }
    t.cwd = Some(path_state(read_link(format!("{dir}/cwd")), Path::new(&format!("{dir}/cwd"))));
    t.exe = Some(path_state(read_link(format!("{dir}/exe")), Path::new(&format!("{dir}/exe"))));
    match fs::read_dir(format!("{dir}/fd")) {
        Ok(entries) => {
            for (i, e) in entries.flatten().enumerate() {
                if i >= MAX_FDS {
                    t.fds_truncated = true;
                    break;
                }
                let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
                let Ok(link) = read_link(e.path()) else { continue };
                t.fds.push(fd_facts(&dir, fd, &link, t.stat.tty_nr != 0));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Err(e),
        Err(_) => {}
    }
    t.maps = parse::maps(&read_head(format!("{dir}/maps"), MAX_TABLE).unwrap_or_default());
    for m in t.maps.iter().filter(|m| m.deleted) {
        // map_files needs CAP_SYS_ADMIN; without it the size stays unknown (0).
        let md = fs::metadata(format!("{dir}/map_files/{}", m.range));
        t.deleted_map_bytes.insert(m.path.clone(), md.as_ref().map(|md| md.blocks() * 512).unwrap_or(0));
        if md.is_ok_and(|md| still_linked(&md)) {
            t.deleted_map_linked.insert(m.path.clone());
        }
    }
    Ok(t)
}

/// A deleted regular file that has a link left under another name. Pseudo files that read
/// as deleted (the aio ring `/[aio]`, anonymous inodes) have a link count of 1 and no file type
/// (mode 0600): they are no file CRIU links or copies.
fn still_linked(m: &fs::Metadata) -> bool {
    m.file_type().is_file() && m.nlink() > 0
}

/// `has_ctty`: the task has a controlling terminal, which may be a device node anywhere (a
/// virtual terminal made with mknod, zdtm's `vt`): its device paths outside `/dev` are read too,
/// to find whether the tree holds the terminal.
fn fd_facts(dir: &str, fd: i32, link: &str, has_ctty: bool) -> FdFacts {
    let kind = parse::fd_kind(link);
    let mut f = FdFacts {
        fd,
        kind,
        rdev: None,
        deleted_bytes: None,
        deleted_linked: false,
        ptmx_index: None,
        pipe: None,
    };
    if let Some(inode) = parse::pipe_inode(link) {
        // O_ACCMODE tells the ends apart: both have the same link.
        let info = read_head(format!("{dir}/fdinfo/{fd}"), MAX_SMALL).unwrap_or_default();
        f.pipe = parse::fdinfo_flags(&info).map(|flags| (inode, flags & 3 == 1));
    }
    if let FdKind::Path { path, deleted } = &f.kind {
        let target = format!("{dir}/fd/{fd}");
        if *deleted {
            let m = fs::metadata(&target).ok();
            f.deleted_bytes = m.as_ref().map(|m| m.blocks() * 512);
            f.deleted_linked = m.is_some_and(|m| still_linked(&m));
        } else if path.starts_with("/dev/") || has_ctty {
            if let Ok(m) = fs::metadata(&target) {
                use std::os::unix::fs::FileTypeExt;
                if m.file_type().is_char_device() {
                    f.rdev = Some(parse::dev_major_minor(m.rdev()));
                    if f.rdev == Some((5, 2)) || path.ends_with("/ptmx") {
                        let info = read_head(format!("{dir}/fdinfo/{fd}"), MAX_SMALL).unwrap_or_default();
                        f.ptmx_index = parse::ptmx_index(&info);
                    }
                }
            }
        }
    }
    f
}

/// For each namespace of the tree's root that is not ferry's (nor declared external), the
/// processes outside the tree in it (a few of them).
fn shared_namespaces(f: &Facts) -> BTreeMap<String, Vec<i32>> {
    let Some(root) = f.tasks.first() else { return BTreeMap::new() };
    let kinds: Vec<(&String, &u64)> = root
        .ns
        .iter()
        .filter(|(k, ino)| {
            f.own_ns.get(k.as_str()) != Some(*ino)
                && !f.external_ns.iter().any(|(ek, ei)| ek == *k && ei == *ino)
        })
        .collect();
    let mut out: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    if kinds.is_empty() {
        return out;
    }
    let tree = f.pids();
    let Ok(entries) = fs::read_dir("/proc") else { return out };
    for e in entries.flatten().take(MAX_HOST_PROCESSES) {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if tree.contains(&pid) {
            continue;
        }
        for (kind, ino) in &kinds {
            let shared = read_link(format!("/proc/{pid}/ns/{kind}")).ok().and_then(|l| parse::ns_inode(&l));
            if shared == Some(**ino) {
                let v = out.entry((*kind).clone()).or_default();
                if v.len() < super::MAX_TASKS_NAMED {
                    v.push(pid);
                }
            }
        }
    }
    out
}

/// TCP and unix sockets of each network namespace the tree uses.
fn sockets(f: &mut Facts) {
    let mut by_netns: BTreeMap<u64, i32> = BTreeMap::new();
    for t in &f.tasks {
        if let Some(ino) = t.ns.get("net") {
            by_netns.entry(*ino).or_insert(t.pid);
        }
    }
    let has_sockets = !f.socket_inodes().is_empty();
    for pid in by_netns.values() {
        for table in ["tcp", "tcp6"] {
            let text = read_head(format!("/proc/{pid}/net/{table}"), MAX_TABLE).unwrap_or_default();
            f.tcp.extend(parse::tcp_table(&text));
        }
        if has_sockets {
            match unix_diag::query(Path::new(&format!("/proc/{pid}/ns/net"))) {
                Ok(m) => f.unix.extend(m),
                Err(e) => f.unix_error = Some(format!("sock_diag in the network namespace of {pid}: {e}")),
            }
        }
    }
    closed_tcp(f);
}

/// Finds the tree's closed TCP connections (see [`Facts::tcp_closed`]): each socket in neither
/// table is probed through a copy of its descriptor (`pidfd_getfd`: the task is not stopped,
/// traced or signalled). A probe that fails (no permission, the descriptor just closed) finds
/// nothing: a fresh or bound socket is what such a socket usually is.
fn closed_tcp(f: &mut Facts) {
    let known: BTreeSet<u64> = f.tcp.iter().map(|s| s.inode).chain(f.unix.keys().copied()).collect();
    let mut probes = 0;
    for t in &f.tasks {
        for fd in &t.fds {
            let FdKind::Socket(ino) = fd.kind else { continue };
            if known.contains(&ino) || f.tcp_closed.contains(&ino) {
                continue;
            }
            if probes == MAX_SOCKET_PROBES {
                return;
            }
            probes += 1;
            if let Ok(Some(p)) = ferry_sys::probe_tcp_socket(t.pid, fd.fd) {
                if TcpState::from_number(p.state) == TcpState::Close && p.has_peer {
                    f.tcp_closed.insert(ino);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_lines() {
        let locks = "1: POSIX  ADVISORY  WRITE 4242 fd:01:1234 0 EOF
2: FLOCK  ADVISORY  WRITE 77 00:2a:99 0 EOF
2: -> FLOCK  ADVISORY  WRITE 78 00:2a:99 0 EOF
3: OFDLCK ADVISORY  READ  -1 00:05:11 0 EOF
garbage";
        assert_eq!(lock_holders(locks), vec![77, 78, 4242]);
    }

    #[test]
    fn this_process_reads_as_a_tree() {
        // Unprivileged and read-only: our own process is a tree of one.
        let me = std::process::id() as i32;
        let f = tree(me, &[]);
        assert_eq!(f.tasks.first().map(|t| t.pid), Some(me));
        let t = &f.tasks[0];
        assert!(!t.fds.is_empty() && !t.maps.is_empty());
        assert_eq!(t.ns, f.own_ns);
        assert!(matches!(t.cwd, Some(PathState::Present(_))));
    }

    #[test]
    fn a_removed_name_is_still_linked_only_while_another_link_is_left() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (first, second, only) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
        fs::write(&first, b"x").expect("write");
        fs::write(&only, b"y").expect("write");
        let linked = fs::File::open(&first).expect("open");
        let ghost = fs::File::open(&only).expect("open");
        fs::hard_link(&first, &second).expect("link");
        fs::remove_file(&first).expect("unlink");
        fs::remove_file(&only).expect("unlink");
        let f = tree(std::process::id() as i32, &[]);
        let fact = |file: &fs::File| {
            use std::os::fd::AsRawFd;
            let fd = f.tasks[0].fds.iter().find(|d| d.fd == file.as_raw_fd()).expect("fd");
            (matches!(fd.kind, FdKind::Path { deleted: true, .. }), fd.deleted_linked)
        };
        assert_eq!(fact(&linked), (true, true));
        assert_eq!(fact(&ghost), (true, false));
    }
}

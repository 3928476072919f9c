//! Parsers of what `/proc` says about a task, kept free of I/O so that fakes test them. Every
//! input is untrusted text: malformed lines are skipped, never a panic.

/// The fields of `/proc/PID/stat` the check uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stat {
    pub state: char,
    pub ppid: i32,
    pub session: i32,
    /// The controlling terminal's device number (0: none).
    pub tty_nr: u32,
}

/// Parses `/proc/PID/stat`. The command name may hold spaces and parentheses: the fields
/// start after its last `)`.
pub fn stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let _pgrp: i64 = f.next()?.parse().ok()?;
    let session = f.next()?.parse().ok()?;
    let tty_nr: i64 = f.next()?.parse().ok()?;
    Some(Stat { state, ppid, session, tty_nr: u32::try_from(tty_nr).unwrap_or(0) })
}

/// The command name in `/proc/PID/stat` (between the first `(` and the last `)`), at most
/// 64 characters.
pub fn stat_comm(text: &str) -> String {
    match (text.find('('), text.rfind(')')) {
        (Some(a), Some(b)) if b > a => text[a + 1..b].chars().take(64).collect(),
        _ => String::new(),
    }
}

/// Major and minor of a device number as the kernel encodes it (`new_encode_dev`).
pub fn dev_major_minor(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// The fields of `/proc/PID/status` the check uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    pub tracer_pid: i32,
    pub rss_kib: u64,
    /// The pid in each pid namespace, outermost first.
    pub ns_pids: Vec<i32>,
    /// Real, effective and saved user ids (`Uid:`; the file system one is left out).
    pub uids: [u32; 3],
    /// Real, effective and saved group ids.
    pub gids: [u32; 3],
    /// Effective capabilities (`CapEff`, a bit per capability).
    pub cap_eff: u64,
}

/// Capability bit of CAP_SYS_RESOURCE (`linux/capability.h`).
pub const CAP_SYS_RESOURCE: u64 = 1 << 24;

/// The first three ids of a `Uid:` or `Gid:` line.
fn ids(value: &str) -> [u32; 3] {
    let mut out = [0; 3];
    for (slot, v) in out.iter_mut().zip(value.split_whitespace()) {
        *slot = v.parse().unwrap_or(0);
    }
    out
}

pub fn status(text: &str) -> Status {
    let mut s = Status::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match key {
            "TracerPid" => s.tracer_pid = value.parse().unwrap_or(0),
            "VmRSS" => s.rss_kib = value.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0),
            "NSpid" => s.ns_pids = value.split_whitespace().take(64).filter_map(|p| p.parse().ok()).collect(),
            "Uid" => s.uids = ids(value),
            "Gid" => s.gids = ids(value),
            "CapEff" => s.cap_eff = u64::from_str_radix(value, 16).unwrap_or(0),
            _ => {}
        }
    }
    s
}

/// The inode in a namespace link (`net:[4026531840]`).
pub fn ns_inode(link: &str) -> Option<u64> {
    link.rsplit_once('[')?.1.strip_suffix(']')?.parse().ok()
}

/// The inode of a socket descriptor's link (`socket:[12345]`).
pub fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// What a descriptor's link names, as far as CRIU cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdKind {
    Socket(u64),
    /// `anon_inode:NAME` (the name without brackets: `io_uring`, `bpf-map`, `eventfd`).
    Anon(String),
    /// A path; `deleted` when the link ends in ` (deleted)` (the suffix removed).
    Path {
        path: String,
        deleted: bool,
    },
    /// Pipes and other pseudo files (`pipe:[N]`), which CRIU handles.
    Other(String),
}

pub fn fd_kind(link: &str) -> FdKind {
    if let Some(ino) = socket_inode(link) {
        return FdKind::Socket(ino);
    }
    if let Some(name) = link.strip_prefix("anon_inode:") {
        let name = name.trim_start_matches('[').trim_end_matches(']');
        return FdKind::Anon(name.to_owned());
    }
    if link.starts_with('/') {
        return match link.strip_suffix(" (deleted)") {
            Some(p) => FdKind::Path { path: p.to_owned(), deleted: true },
            None => FdKind::Path { path: link.to_owned(), deleted: false },
        };
    }
    FdKind::Other(link.to_owned())
}

/// The inode of a pipe descriptor's link (`pipe:[12345]`).
pub fn pipe_inode(link: &str) -> Option<u64> {
    link.strip_prefix("pipe:[")?.strip_suffix(']')?.parse().ok()
}

/// The open flags of an fdinfo (`flags:` in octal).
pub fn fdinfo_flags(fdinfo: &str) -> Option<u32> {
    fdinfo.lines().find_map(|l| l.strip_prefix("flags:")).and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
}

/// The `tty-index:` line of a `/dev/ptmx` descriptor's fdinfo: the pty it is the master of.
pub fn ptmx_index(fdinfo: &str) -> Option<u32> {
    fdinfo.lines().find_map(|l| l.strip_prefix("tty-index:")).and_then(|v| v.trim().parse().ok())
}

/// A memory mapping worth a reason: its address range and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub range: String,
    pub path: String,
    pub deleted: bool,
}

/// The file-backed mappings of `/proc/PID/maps` (anonymous ones and `[heap]`-like pseudo
/// paths left out), each path once.
pub fn maps(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for line in text.lines() {
        // range perms offset dev inode path (the path may hold spaces).
        let mut f = line.splitn(6, ' ');
        let (Some(range), Some(_), Some(_), Some(_), Some(_), Some(path)) =
            (f.next(), f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let path = path.trim_start();
        if !path.starts_with('/') {
            continue;
        }
        let (path, deleted) = match path.strip_suffix(" (deleted)") {
            Some(p) => (p, true),
            None => (path, false),
        };
        if !seen.insert(path) {
            continue;
        }
        out.push(Mapping { range: range.to_owned(), path: path.to_owned(), deleted });
    }
    out
}

/// Mount points of hugetlbfs in `/proc/PID/mounts`.
pub fn hugetlbfs_mounts(mounts: &str) -> Vec<String> {
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "hugetlbfs").then(|| dir.replace("\\040", " "))
        })
        .collect()
}

/// TCP states as `/proc/net/tcp` numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    Unknown,
}

impl TcpState {
    fn from_hex(s: &str) -> TcpState {
        TcpState::from_number(u8::from_str_radix(s, 16).unwrap_or(0))
    }

    /// The kernel's number of a state (`include/net/tcp_states.h`, `TCP_INFO`'s `tcpi_state`).
    pub fn from_number(n: u8) -> TcpState {
        match n {
            1 => TcpState::Established,
            2 => TcpState::SynSent,
            3 => TcpState::SynRecv,
            4 => TcpState::FinWait1,
            5 => TcpState::FinWait2,
            6 => TcpState::TimeWait,
            7 => TcpState::Close,
            8 => TcpState::CloseWait,
            9 => TcpState::LastAck,
            10 => TcpState::Listen,
            11 => TcpState::Closing,
            _ => TcpState::Unknown,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TcpState::Established => "ESTABLISHED",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Listen => "LISTEN",
            TcpState::Closing => "CLOSING",
            TcpState::Unknown => "UNKNOWN",
        }
    }
}

/// One line of `/proc/net/tcp` or `tcp6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSocket {
    pub inode: u64,
    pub state: TcpState,
    /// `local -> remote`, as hex `ADDR:PORT` pairs (ports in decimal).
    pub endpoints: String,
    /// For a listener: connections waiting in its accept queue.
    pub rx_queue: u64,
}

pub fn tcp_table(text: &str) -> Vec<TcpSocket> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().take(10).collect();
            if f.len() < 10 {
                return None;
            }
            let port = |ep: &str| {
                let (addr, port) = ep.split_once(':')?;
                Some(format!("{addr}:{}", u16::from_str_radix(port, 16).ok()?))
            };
            let rx_queue = f[4].split_once(':').and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok())?;
            Some(TcpSocket {
                inode: f[9].parse().ok()?,
                state: TcpState::from_hex(f[3]),
                endpoints: format!("{} -> {}", port(f[1])?, port(f[2])?),
                rx_queue,
            })
        })
        .collect()
}

/// A SysV shared memory segment of `/proc/sysvipc/shm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShmSegment {
    pub key: i64,
    pub shmid: i64,
    pub size: u64,
    pub cpid: i32,
    pub lpid: i32,
    pub nattch: u64,
}

pub fn sysvipc_shm(text: &str) -> Vec<ShmSegment> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            // key shmid perms size cpid lpid nattch ...
            let f: Vec<&str> = l.split_whitespace().take(7).collect();
            if f.len() < 7 {
                return None;
            }
            Some(ShmSegment {
                key: f[0].parse().ok()?,
                shmid: f[1].parse().ok()?,
                size: f[3].parse().ok()?,
                cpid: f[4].parse().ok()?,
                lpid: f[5].parse().ok()?,
                nattch: f[6].parse().ok()?,
            })
        })
        .collect()
}

/// The IPv4 addresses a network namespace holds (its `/proc/PID/net/fib_trie`'s "/32 host
/// LOCAL" leaves), but loopback's; sorted, each once, at most 256.
pub fn local_ipv4(fib_trie: &str) -> Vec<std::net::Ipv4Addr> {
    let mut out = std::collections::BTreeSet::new();
    let mut leaf: Option<std::net::Ipv4Addr> = None;
    for line in fib_trie.lines() {
        let t = line.trim();
        if let Some(addr) = t.strip_prefix("|-- ") {
            leaf = addr.parse().ok();
        } else if t == "/32 host LOCAL" {
            if let Some(a) = leaf.filter(|a| !a.is_loopback()) {
                out.insert(a);
            }
        } else if !t.starts_with('/') {
            leaf = None;
        }
        if out.len() >= 256 {
            break;
        }
    }
    out.into_iter().collect()
}

/// `MemAvailable:` of `/proc/meminfo`, in KiB.
pub fn mem_available_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Whether `/proc/PID/syscall` shows a task inside vfork: `vfork` itself, or `clone` with
/// `CLONE_VFORK` (x86-64 numbering; elsewhere only the wait channel tells).
pub fn syscall_is_vfork(text: &str) -> bool {
    const CLONE_VFORK: u64 = 0x4000;
    let mut f = text.split_whitespace();
    let Some(nr) = f.next().and_then(|n| n.parse::<i64>().ok()) else { return false };
    let flags = f.next().and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok()).unwrap_or(0);
    match nr {
        58 if cfg!(target_arch = "x86_64") => true,
        56 if cfg!(target_arch = "x86_64") => flags & CLONE_VFORK != 0,
        220 if cfg!(target_arch = "aarch64") => flags & CLONE_VFORK != 0,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn local_addresses_of_a_fib_trie() {
        let text = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n\
                    \x20          |-- 127.0.0.1\n              /32 host LOCAL\n\
                    \x20          |-- 198.18.1.0\n              /24 link UNICAST\n\
                    \x20          |-- 198.18.1.7\n              /32 host LOCAL\n\
                    \x20       |-- 198.18.1.255\n           /32 link BROADCAST\n\
                    Local:\n           |-- 198.18.1.7\n              /32 host LOCAL\n\
                    \x20    +-- 198.19.0.0/16 2 0 2\n              /32 host LOCAL\n";
        let addrs: Vec<String> = super::local_ipv4(text).iter().map(|a| a.to_string()).collect();
        assert_eq!(addrs, ["198.18.1.7"]);
        assert!(super::local_ipv4("|-- 999.1.1.1\n/32 host LOCAL\n|-- \n").is_empty());
    }

    use super::*;

    #[test]
    fn stat_survives_odd_command_names() {
        let text = "1234 (a) b (c)) S 1 1234 1234 34816 1234 4194560 0 0";
        let s = stat(text).expect("stat");
        assert_eq!(s, Stat { state: 'S', ppid: 1, session: 1234, tty_nr: 34816 });
        assert_eq!(stat_comm(text), "a) b (c)");
        assert_eq!(dev_major_minor(34816), (136, 0));
        assert_eq!(dev_major_minor(0x10_0503), (5, 259));
        assert!(stat("garbage").is_none());
        assert!(stat("1 (x) S 1").is_none());
    }

    #[test]
    fn status_fields() {
        let s = status(
            "Name:\tx\nTracerPid:\t77\nUid:\t1\t2\t3\t2\nGid:\t5\t6\t7\t8\nVmRSS:\t  2048 kB\n\
             NSpid:\t900\t1\nCapEff:\t000001fffeffffff\nbogus\n",
        );
        assert_eq!(
            s,
            Status {
                tracer_pid: 77,
                rss_kib: 2048,
                ns_pids: vec![900, 1],
                uids: [1, 2, 3],
                gids: [5, 6, 7],
                cap_eff: 0x1fffeffffff
            }
        );
        // This VM's root: every capability but CAP_SYS_RESOURCE.
        assert_eq!(s.cap_eff & CAP_SYS_RESOURCE, 0);
        assert_eq!(status(""), Status::default());
    }

    #[test]
    fn descriptor_links() {
        assert_eq!(fd_kind("socket:[991]"), FdKind::Socket(991));
        assert_eq!(fd_kind("anon_inode:[io_uring]"), FdKind::Anon("io_uring".into()));
        assert_eq!(fd_kind("anon_inode:bpf-map"), FdKind::Anon("bpf-map".into()));
        assert_eq!(fd_kind("/tmp/x y (deleted)"), FdKind::Path { path: "/tmp/x y".into(), deleted: true });
        assert_eq!(fd_kind("/dev/null"), FdKind::Path { path: "/dev/null".into(), deleted: false });
        assert_eq!(fd_kind("pipe:[5]"), FdKind::Other("pipe:[5]".into()));
        assert_eq!(ns_inode("net:[4026531840]"), Some(4026531840));
        assert_eq!(ns_inode("net:[x]"), None);
        assert_eq!(ptmx_index("pos:\t0\nflags:\t02\ntty-index:\t3\n"), Some(3));
        assert_eq!(fdinfo_flags("pos:\t0\nflags:\t02000001\n"), Some(0o2000001));
        assert_eq!(pipe_inode("pipe:[77]"), Some(77));
        assert_eq!(pipe_inode("socket:[77]"), None);
    }

    #[test]
    fn maps_keep_file_mappings_once() {
        let text = "\
55d0-55d1 r--p 00000000 fd:01 123 /usr/bin/python3.13
55d1-55d2 r-xp 00001000 fd:01 123 /usr/bin/python3.13
7f00-7f01 rw-s 00000000 00:10 5 /anon_hugepage (deleted)
7f02-7f03 rw-s 00000000 00:01 6 /SYSV00000000 (deleted)
7f04-7f05 rw-p 00000000 00:00 0 
7ffd-7ffe rw-p 00000000 00:00 0 [stack]
7f06-7f07 r--p 00000000 fd:01 9 /tmp/with space (deleted)";
        let m = maps(text);
        assert_eq!(m.len(), 4, "{m:?}");
        assert_eq!(m[1], Mapping { range: "7f00-7f01".into(), path: "/anon_hugepage".into(), deleted: true });
        assert_eq!(m[3].path, "/tmp/with space");
    }

    #[test]
    fn tcp_lines() {
        let text =
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000002 00:00000000 00000000     0        0 5551 1 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 5552 1 0
   2: short line";
        let t = tcp_table(text);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].state, TcpState::Listen);
        assert_eq!(t[0].rx_queue, 2);
        assert_eq!(t[0].endpoints, "0100007F:8080 -> 00000000:0");
        assert_eq!(
            t[1],
            TcpSocket {
                inode: 5552,
                state: TcpState::Established,
                endpoints: "0100007F:8080 -> 0100007F:50000".into(),
                rx_queue: 0
            }
        );
    }

    #[test]
    fn sysvipc_tables() {
        let shm = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap
         0          7  1600                  4096  4242  4242      1     0     0     0     0 1 0 1 4096 0";
        assert_eq!(
            sysvipc_shm(shm),
            vec![ShmSegment { key: 0, shmid: 7, size: 4096, cpid: 4242, lpid: 4242, nattch: 1 }]
        );
    }

    #[test]
    fn meminfo_and_vfork() {
        assert_eq!(mem_available_kib("MemTotal: 10 kB\nMemAvailable:  5120 kB\n"), Some(5120));
        assert_eq!(mem_available_kib("MemTotal: 10 kB\n"), None);
        if cfg!(target_arch = "x86_64") {
            assert!(syscall_is_vfork("58 0x0 0x0 0x0 0x0 0x0 0x0 0x7ffd 0x7f00"));
            assert!(syscall_is_vfork("56 0x4111 0x0 0x0 0x0 0x0 0x0 0x7ffd 0x7f00"));
            assert!(!syscall_is_vfork("56 0x1200011 0x0 0x0 0x0 0x0 0x0 0x7ffd 0x7f00"));
        }
        assert!(!syscall_is_vfork("running"));
        assert!(!syscall_is_vfork("7 0x0"));
    }

    #[test]
    fn hugetlbfs_mount_points() {
        let m = "hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\nproc /proc proc rw 0 0\n";
        assert_eq!(hugetlbfs_mounts(m), vec!["/dev/hugepages".to_owned()]);
    }
}

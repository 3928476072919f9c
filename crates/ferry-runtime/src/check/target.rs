//! `ferry check --to NODE`: what the target node says of itself, set against this host and the
//! workload: CRIU there, its CPU against this one (CRIU's own `cpuinfo check`, run on the
//! target with this host's `cpuinfo.img`), its kernel, its free memory; and an estimate of each
//! strategy's freeze, total time and bytes from the workload's memory and the measured link.

use std::fs;
use std::path::{Path, PathBuf};

use ferry_criu::{Criu, LogTarget, Version, MIN_VERSION};
use serde::{Deserialize, Serialize};

use super::{Reason, Severity};

/// CRIU's `cpuinfo.img` is a few hundred bytes: anything near this is not one.
pub const MAX_CPUINFO: usize = 64 << 10;

/// Throughputs of ferry's page path on the development machine (`bench/README.md`, 1 GiB:
/// checkpoint 0.94 s, restore 0.66 s), for the estimates.
const DUMP_BYTES_PER_S: f64 = 1.07 * (1u64 << 30) as f64;
const RESTORE_BYTES_PER_S: f64 = 1.5 * (1u64 << 30) as f64;
/// Post-copy's freeze whatever the size (`bench/README.md`).
const POST_COPY_FREEZE_S: f64 = 0.2;
/// Stop-copy's and pre-copy's freeze besides the pages: a 16 MiB lab process's dump, transfer,
/// restore and commit took 0.14 + 0.05 + 0.16 + 0.01 s (`make demo-process`).
const FIXED_FREEZE_S: f64 = 0.35;
/// Without a measured link: 1 Gbit/s.
const DEFAULT_LINK_BYTES_PER_S: f64 = 125e6;

/// What a node says of itself as a migration's target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetFacts {
    pub node: String,
    pub kernel: String,
    /// Its CRIU's version, or why there is none that works.
    pub criu: Result<String, String>,
    /// CRIU's `cpuinfo check` there against this host's CPU: `None` when not run (no
    /// `cpuinfo.img` was sent, or no CRIU there), else its verdict and, failed, its log's errors.
    pub cpu_check: Option<Result<(), String>>,
    pub cpu_flags: String,
    pub mem_available: u64,
    /// Bytes per second between the agents, measured by the one asked (0: not measured).
    pub link_bytes_per_s: u64,
    /// For a container: what the target's runtime says would keep it from being recreated
    /// there (empty: nothing); `None` when no container was asked about.
    #[serde(default)]
    pub container: Option<Vec<String>>,
    /// For a process tree: what of its [`TreeNeeds`] the target lacks (empty: nothing);
    /// `None` when not asked.
    pub tree: Option<Vec<NeedProblem>>,
}

/// Paths and TCP ports a process tree's restore takes from the target: CRIU opens its
/// executables, mapped files, open files and working directories again by path there (and
/// refuses a file whose size changed), and binds its listeners' addresses again. ferry copies
/// none of these (a container's come with its record).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeNeeds {
    pub paths: Vec<PathNeed>,
    /// Listening sockets, for a tree in this host's network namespace (one of its own moves
    /// with it, addresses and all).
    pub listens: Vec<Listen>,
    /// The addresses of the tree's own network namespace (none when it shares this host's):
    /// the target gives the namespace it recreates the same ones, so none may be taken there.
    pub addresses: Vec<std::net::Ipv4Addr>,
}

/// At most this many paths and listeners are sent and checked; a longer path is not one.
pub const MAX_NEEDS: usize = 4096;
const MAX_NEED_PATH: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathNeed {
    pub path: String,
    pub dir: bool,
    /// The size CRIU records and checks (executables, mappings and open files).
    pub size: Option<u64>,
    /// Mapped or executed: a size that differs is a refused restore, not a guess.
    pub mapped: bool,
}

/// A listener's local address as `/proc/net/tcp` writes it (hex, all zeros: any) and its port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listen {
    pub addr: String,
    pub port: u16,
}

/// What the target lacks of a [`TreeNeeds`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeedProblem {
    /// `path`, `size` or `port`.
    pub kind: String,
    pub what: String,
    pub blocker: bool,
}

impl TreeNeeds {
    /// From the facts gathered of a tree: every path its tasks hold (but pseudo-files, which
    /// CRIU handles itself, and deleted files, which it carries), and its listeners when the
    /// tree shares this process's network namespace.
    pub fn of(facts: &super::Facts) -> TreeNeeds {
        let mut needs = TreeNeeds::default();
        let mut seen = std::collections::BTreeSet::new();
        let root = format!("/proc/{}/root", facts.root);
        let mut add = |path: &str, mapped: bool| {
            let pseudo =
                ["/proc", "/sys", "/dev"].iter().any(|p| path == *p || path.starts_with(&format!("{p}/")));
            if pseudo || path.len() > MAX_NEED_PATH || !path.starts_with('/') || !seen.insert(path.to_owned())
            {
                return;
            }
            // Seen from the tree's root, which may not be this process's.
            let Ok(md) = fs::metadata(format!("{root}{path}")) else { return };
            let size = md.is_file().then_some(md.len());
            needs.paths.push(PathNeed { path: path.to_owned(), dir: md.is_dir(), size, mapped });
        };
        for t in &facts.tasks {
            if let Some(super::PathState::Present(path)) = &t.exe {
                add(path, true);
            }
            if let Some(super::PathState::Present(path)) = &t.cwd {
                add(path, false);
            }
            for m in t.maps.iter().filter(|m| !m.deleted) {
                add(&m.path, true);
            }
            for f in &t.fds {
                if let super::parse::FdKind::Path { path, deleted: false } = &f.kind {
                    add(path, false);
                }
            }
        }
        let shares_our_net = facts
            .tasks
            .first()
            .and_then(|t| t.ns.get("net"))
            .is_some_and(|n| facts.own_ns.get("net") == Some(n));
        if !shares_our_net {
            needs.addresses = fs::read_to_string(format!("/proc/{}/net/fib_trie", facts.root))
                .map(|t| super::parse::local_ipv4(&t))
                .unwrap_or_default();
        }
        if shares_our_net {
            for sock in facts.tcp.iter().filter(|s| s.state == super::parse::TcpState::Listen) {
                if let Some(l) = listen_of(&sock.endpoints) {
                    if !needs.listens.contains(&l) {
                        needs.listens.push(l);
                    }
                }
            }
        }
        needs.paths.truncate(MAX_NEEDS);
        needs.listens.truncate(MAX_NEEDS);
        needs.addresses.truncate(MAX_NEEDS);
        needs
    }
}

/// `ADDR:PORT -> ...` (the check's form of a `/proc/net/tcp` line) as a [`Listen`].
fn listen_of(endpoints: &str) -> Option<Listen> {
    let local = endpoints.split(" -> ").next()?;
    let (addr, port) = local.rsplit_once(':')?;
    Some(Listen { addr: addr.to_owned(), port: port.parse().ok()? })
}

/// A `/proc/net/tcp{,6}` address (32-bit words in host order, here little-endian) as text.
fn addr_text(hex: &str) -> String {
    let words: Option<Vec<[u8; 4]>> = (0..hex.len() / 8)
        .map(|i| {
            hex.get(8 * i..8 * i + 8).and_then(|w| u32::from_str_radix(w, 16).ok()).map(u32::to_le_bytes)
        })
        .collect();
    match words.as_deref() {
        Some([v4]) => std::net::Ipv4Addr::from(*v4).to_string(),
        Some(w) if w.len() == 4 => {
            let bytes: Vec<u8> = w.iter().flatten().copied().collect();
            let octets: [u8; 16] = bytes.try_into().unwrap_or([0; 16]);
            format!("[{}]", std::net::Ipv6Addr::from(octets))
        }
        _ => hex.to_owned(),
    }
}

fn is_any(hex: &str) -> bool {
    hex.bytes().all(|b| b == b'0')
}

/// What this host (the target) lacks of `needs`: paths missing, of another kind or size, and
/// listeners' ports taken here. Read-only: nothing is bound or opened for writing.
pub fn tree_problems(needs: &TreeNeeds) -> Vec<NeedProblem> {
    let mut out = Vec::new();
    let problem = |kind: &str, what: String, blocker: bool| NeedProblem { kind: kind.into(), what, blocker };
    for need in needs.paths.iter().take(MAX_NEEDS) {
        // From a peer: a path is only looked at, and only if it is one.
        if need.path.len() > MAX_NEED_PATH || !need.path.starts_with('/') || need.path.contains('\0') {
            continue;
        }
        match fs::metadata(&need.path) {
            Err(e) => out.push(problem("path", format!("{} is missing here ({e})", need.path), true)),
            Ok(md) if md.is_dir() != need.dir => out.push(problem(
                "path",
                format!(
                    "{} is a {} here, a {} on the source",
                    need.path,
                    kind_of(md.is_dir()),
                    kind_of(need.dir)
                ),
                true,
            )),
            Ok(md) => match need.size {
                Some(size) if md.is_file() && md.len() != size => out.push(problem(
                    "size",
                    format!("{} has {} bytes here, {size} on the source", need.path, md.len()),
                    need.mapped,
                )),
                _ => {}
            },
        }
    }
    let here: Vec<Listen> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| fs::read_to_string(p).ok())
        .flat_map(|text| super::parse::tcp_table(&text))
        .filter(|s| s.state == super::parse::TcpState::Listen)
        .filter_map(|s| listen_of(&s.endpoints))
        .collect();
    let ours =
        fs::read_to_string("/proc/net/fib_trie").map(|t| super::parse::local_ipv4(&t)).unwrap_or_default();
    for addr in needs.addresses.iter().take(MAX_NEEDS).filter(|a| ours.contains(a)) {
        out.push(problem("address", format!("{addr} is an address of this host"), true));
    }
    for want in needs.listens.iter().take(MAX_NEEDS) {
        let taken = here
            .iter()
            .find(|h| h.port == want.port && (h.addr == want.addr || is_any(&h.addr) || is_any(&want.addr)));
        if let Some(h) = taken {
            let at = format!("{}:{}", addr_text(&h.addr), h.port);
            out.push(problem("port", format!("TCP port {} is listened on here ({at})", want.port), true));
        }
    }
    out
}

fn kind_of(dir: bool) -> &'static str {
    if dir {
        "directory"
    } else {
        "file"
    }
}

/// What this host and the workload bring to the comparison.
#[derive(Debug, Clone, Default)]
pub struct SourceFacts {
    pub kernel: String,
    pub criu: Option<Version>,
    pub cpu_flags: String,
    /// The tree's resident memory, what a checkpoint's pages amount to.
    pub memory: u64,
}

impl SourceFacts {
    /// This host's, for a tree of `memory` bytes.
    pub fn here(criu: Option<&Criu>, memory: u64) -> SourceFacts {
        SourceFacts {
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            criu: criu.and_then(|c| c.version().ok()),
            cpu_flags: cpu_flags(),
            memory,
        }
    }
}

/// This host's facts as a target (run by the target's agent): `cpuinfo`, the source's
/// `cpuinfo.img`, is checked against this CPU by CRIU.
pub fn target_facts(node: &str, criu: Result<&Criu, &str>, cpuinfo: Option<&[u8]>) -> TargetFacts {
    let criu_version = match criu {
        Ok(c) => c.version().map(|v| v.to_string()).map_err(|e| e.to_string()),
        Err(why) => Err(why.to_owned()),
    };
    let cpu_check = match (criu, cpuinfo) {
        // The image comes from a peer: bounded before CRIU reads it.
        (Ok(_), Some(img)) if img.len() > MAX_CPUINFO => {
            Some(Err(format!("a cpuinfo image of {} bytes (at most {MAX_CPUINFO})", img.len())))
        }
        (Ok(c), Some(img)) => Some(cpuinfo_check(c, img)),
        _ => None,
    };
    TargetFacts {
        node: node.to_owned(),
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        criu: criu_version,
        cpu_check,
        cpu_flags: cpu_flags(),
        mem_available: mem_available(),
        link_bytes_per_s: 0,
        container: None,
        tree: None,
    }
}

/// This host's `cpuinfo.img`, as CRIU writes it into a checkpoint.
pub fn source_cpuinfo(criu: &Criu) -> Result<Vec<u8>, String> {
    let dir = ScratchDir::new("cpuinfo-dump")?;
    let log = LogTarget::new(dir.path(), "cpuinfo.log");
    criu.cpuinfo_dump(dir.path(), &log).map_err(|e| e.to_string())?;
    let img =
        fs::read(dir.path().join("cpuinfo.img")).map_err(|e| format!("cannot read cpuinfo.img: {e}"))?;
    if img.len() > MAX_CPUINFO {
        return Err(format!("cpuinfo.img of {} bytes", img.len()));
    }
    Ok(img)
}

fn cpuinfo_check(criu: &Criu, img: &[u8]) -> Result<(), String> {
    if img.len() > MAX_CPUINFO {
        return Err(format!(
            "the source's cpuinfo.img is {} bytes, over the cap of {MAX_CPUINFO}",
            img.len()
        ));
    }
    let dir = ScratchDir::new("cpuinfo-check")?;
    fs::write(dir.path().join("cpuinfo.img"), img).map_err(|e| format!("cannot write cpuinfo.img: {e}"))?;
    let log = LogTarget::new(dir.path(), "cpuinfo.log");
    criu.cpuinfo_check(dir.path(), &log).map_err(|e| {
        // CRIU's log names the features that differ; its own error only says it failed.
        let errors: Vec<String> = fs::read_to_string(log.path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("Error") || l.contains("mismatch"))
            .take(6)
            .map(|l| l.trim().chars().take(200).collect())
            .collect();
        if errors.is_empty() {
            e.to_string()
        } else {
            errors.join("; ")
        }
    })
}

/// The reasons `facts` of node `node` give for this workload.
pub fn target_reasons(src: &SourceFacts, t: &TargetFacts) -> Vec<Reason> {
    let node = &t.node;
    let mut out = Vec::new();
    match &t.criu {
        Err(why) => out.push(reason(
            "target-criu",
            Severity::Blocker,
            format!("{node} has no working CRIU: {why}"),
            "the target restores with its own CRIU",
            "run scripts/setup on the target",
        )),
        Ok(v) => match parse_version(v) {
            Some(tv) if tv < MIN_VERSION => out.push(reason(
                "target-criu",
                Severity::Blocker,
                format!("{node} has CRIU {v}, older than {MIN_VERSION}"),
                "older releases fail on these kernels (docs/criu.md)",
                "run scripts/setup on the target",
            )),
            Some(tv) if src.criu.is_some_and(|sv| sv != tv) => out.push(reason(
                "target-criu",
                Severity::Caveat,
                format!("{node} has CRIU {v}, this host {}", src.criu.map(|s| s.to_string()).unwrap_or_default()),
                "images are versioned and read across releases, but a feature one release dumps another may not restore",
                "run the same CRIU on both (scripts/setup)",
            )),
            _ => out.push(reason(
                "target-criu",
                Severity::Info,
                format!("{node} has CRIU {v}"),
                "the target restores with its own CRIU",
                "",
            )),
        },
    }
    match (&t.cpu_check, missing_flags(&src.cpu_flags, &t.cpu_flags)) {
        (Some(Err(detail)), _) => out.push(reason(
            "target-cpu",
            Severity::Blocker,
            format!("CRIU on {node} refuses this host's CPU: {detail}"),
            "the restored code would use instructions or register state the target's CPU lacks",
            "migrate to a node with the same CPU features, or start the workload with a lower target (e.g. -march) and fewer CPU features",
        )),
        (None, missing) if !missing.is_empty() => out.push(reason(
            "target-cpu",
            Severity::Caveat,
            format!("{node}'s CPU lacks flags this host has: {}", shorten(&missing, 12)),
            "code that picked an instruction set at start (glibc, crypto, JITs) may use one the target lacks",
            "compare with `criu cpuinfo check` there, or migrate between nodes of one CPU model",
        )),
        (Some(Ok(())), _) => out.push(reason(
            "target-cpu",
            Severity::Info,
            format!("CRIU on {node} accepts this host's CPU"),
            "criu cpuinfo check compares the features a restored process may use",
            "",
        )),
        _ => {}
    }
    if let (Some(s), Some(d)) = (kernel_version(&src.kernel), kernel_version(&t.kernel)) {
        if d < s {
            out.push(reason(
                "target-kernel",
                Severity::Caveat,
                format!("{node} runs Linux {}, older than this host's {}", t.kernel, src.kernel),
                "objects the source kernel let the workload create may not be restorable on an older one",
                "migrate to a node with the same kernel or a newer one",
            ));
        }
    }
    // Room for the copy's memory, and a tenth more for what a restore needs besides.
    let need = src.memory.saturating_add(src.memory / 10);
    if need > t.mem_available {
        out.push(reason(
            "target-memory",
            Severity::Blocker,
            format!(
                "{node} has {} available; the workload holds {}",
                human(t.mem_available),
                human(src.memory)
            ),
            "the restore allocates all of the workload's memory on the target",
            "free memory there, or pick another node",
        ));
    }
    for problem in t.container.iter().flatten() {
        out.push(reason(
            "target-container",
            Severity::Blocker,
            format!("{node}: {problem}"),
            "the target's runtime recreates the container from its record: it could not",
            "see the sentence before (bind sources and devices must exist on the target; ferry does not copy them)",
        ));
    }
    for p in t.tree.iter().flatten() {
        let (code, why, fix) = match p.kind.as_str() {
            "address" => (
                "target-address",
                "the target recreates the tree's network namespace with the same addresses: one taken there would answer beside the workload, or the restore could not take it",
                "free that address on the target (stop or move what holds it), or migrate to another node",
            ),
            "port" => (
                "target-port",
                "CRIU binds the tree's listeners again on the target: a port taken there fails the restore",
                "stop what listens on that port on the target, or move the workload into a network namespace of its own (`ferry lab exec` does), whose address moves with it",
            ),
            _ => (
                "target-paths",
                "CRIU opens the tree's executables, mapped and open files and working directories again by path on the target, and refuses a file whose size changed; ferry does not copy them",
                "install the same files on the target (same packages, same versions), or share them (the same image or network storage)",
            ),
        };
        let severity = if p.blocker { Severity::Blocker } else { Severity::Caveat };
        out.push(reason(code, severity, format!("{node}: {}", p.what), why, fix));
    }
    out.push(estimate(src.memory, t));
    out
}

/// Freeze, total and bytes of each strategy, for `memory` bytes over the measured link.
fn estimate(memory: u64, t: &TargetFacts) -> Reason {
    let m = memory as f64;
    let (link, measured) = if t.link_bytes_per_s > 0 {
        (t.link_bytes_per_s as f64, "measured")
    } else {
        (DEFAULT_LINK_BYTES_PER_S, "assumed")
    };
    let (dump, ship, restore) = (m / DUMP_BYTES_PER_S, m / link, m / RESTORE_BYTES_PER_S);
    let (dump, restore) = (dump + FIXED_FREEZE_S / 2.0, restore + FIXED_FREEZE_S / 2.0);
    // Stop-copy: all of it while frozen. Pre-copy: the first copy runs beside the workload; the
    // final dump reads and hashes all memory again but ships only what changed (idle: nothing).
    // Post-copy: frozen for the non-page state; the pages follow.
    let lines = [
        format!("stop-copy frozen ~{:.1} s, total ~{:.1} s", dump + ship + restore, dump + ship + restore),
        format!(
            "pre-copy frozen ~{:.1} s (idle), total ~{:.1} s",
            dump + restore,
            2.0 * dump + ship + restore
        ),
        format!("post-copy frozen ~{POST_COPY_FREEZE_S:.1} s, total ~{:.1} s", POST_COPY_FREEZE_S + ship),
    ];
    reason(
        "estimate",
        Severity::Info,
        format!(
            "{} to {}: {}; about {} sent, over a link of {}/s ({measured})",
            human(memory),
            t.node,
            lines.join("; "),
            human(memory),
            human(link as u64)
        ),
        "from the workload's resident memory and ferry's measured page path; the dirty rate is not measured \
         (the check must not slow the workload): a busy workload's pre-copy freezes longer",
        "",
    )
}

fn reason(code: &'static str, severity: Severity, what: String, why: &str, fix: &str) -> Reason {
    Reason { code, severity, what, why: why.to_owned(), fix: fix.to_owned(), pids: Vec::new() }
}

fn missing_flags(src: &str, target: &str) -> Vec<String> {
    if target.trim().is_empty() {
        return Vec::new();
    }
    let have: std::collections::BTreeSet<&str> = target.split_whitespace().collect();
    src.split_whitespace().filter(|f| !have.contains(f)).map(str::to_owned).collect()
}

fn shorten(items: &[String], n: usize) -> String {
    let mut s = items.iter().take(n).cloned().collect::<Vec<_>>().join(" ");
    if items.len() > n {
        s.push_str(&format!(" and {} more", items.len() - n));
    }
    s
}

fn parse_version(v: &str) -> Option<Version> {
    let mut it = v.trim().split('.').map(|p| p.parse::<u32>().ok());
    Some(Version {
        major: it.next()??,
        minor: it.next().flatten().unwrap_or(0),
        sublevel: it.next().flatten().unwrap_or(0),
    })
}

/// `6.18.44-fc-v1300` as (6, 18, 44).
fn kernel_version(release: &str) -> Option<(u32, u32, u32)> {
    let head = release.split(|c: char| !c.is_ascii_digit() && c != '.').next()?;
    let mut it = head.split('.').map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next().flatten().unwrap_or(0), it.next().flatten().unwrap_or(0)))
}

fn human(bytes: u64) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.1} GiB")
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

fn read_trimmed(path: &str) -> String {
    fs::read_to_string(path).map(|s| s.trim().chars().take(256).collect()).unwrap_or_default()
}

fn cpu_flags() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("flags").and_then(|r| r.split_once(':')).map(|(_, f)| f.trim().to_owned())
        })
        .unwrap_or_default()
}

fn mem_available() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// A private directory under the system's temporary directory, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(label: &str) -> Result<ScratchDir, String> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!("ferry-{label}-{}-{nanos}", std::process::id()));
        fs::create_dir(&path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(ScratchDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> TargetFacts {
        TargetFacts {
            node: "node2".into(),
            kernel: "6.18.44-fc".into(),
            criu: Ok("4.2.1".into()),
            cpu_check: Some(Ok(())),
            cpu_flags: "fpu sse avx".into(),
            mem_available: 8 << 30,
            link_bytes_per_s: 500_000_000,
            container: None,
            tree: None,
        }
    }

    fn source() -> SourceFacts {
        SourceFacts {
            kernel: "6.18.44-fc".into(),
            criu: Some(Version { major: 4, minor: 2, sublevel: 1 }),
            cpu_flags: "fpu sse avx".into(),
            memory: 1 << 30,
        }
    }

    fn severity(reasons: &[Reason], code: &str) -> Option<Severity> {
        reasons.iter().find(|r| r.code == code).map(|r| r.severity)
    }

    #[test]
    fn a_matching_target_gives_only_information_and_an_estimate() {
        let r = target_reasons(&source(), &target());
        assert!(r.iter().all(|x| x.severity == Severity::Info), "{r:?}");
        let est = r.iter().find(|x| x.code == "estimate").expect("an estimate");
        assert!(est.what.contains("stop-copy frozen ~") && est.what.contains("(measured)"), "{}", est.what);
    }

    #[test]
    fn what_the_target_lacks_is_named() {
        let mut t = target();
        t.criu = Err("not found".into());
        t.mem_available = 512 << 20;
        t.kernel = "6.1.0".into();
        t.cpu_check = Some(Err("cpu: xsave feature mismatch".into()));
        let r = target_reasons(&source(), &t);
        assert_eq!(severity(&r, "target-criu"), Some(Severity::Blocker));
        assert_eq!(severity(&r, "target-memory"), Some(Severity::Blocker));
        assert_eq!(severity(&r, "target-kernel"), Some(Severity::Caveat));
        assert_eq!(severity(&r, "target-cpu"), Some(Severity::Blocker));

        // A container the target's runtime could not recreate: a blocker per problem.
        let mut t = target();
        t.container =
            Some(vec!["bind source /srv/data is missing".into(), "image busybox is missing".into()]);
        let r = target_reasons(&source(), &t);
        let c: Vec<_> = r.iter().filter(|x| x.code == "target-container").collect();
        assert_eq!(c.len(), 2, "{r:?}");
        assert!(c.iter().all(|x| x.severity == Severity::Blocker && x.what.starts_with("node2: ")), "{c:?}");
        t.container = Some(Vec::new());
        assert_eq!(severity(&target_reasons(&source(), &t), "target-container"), None);

        // No CRIU check ran: the flags are compared instead.
        let mut t = target();
        t.cpu_check = None;
        t.cpu_flags = "fpu sse".into();
        t.criu = Ok("4.1".into());
        let r = target_reasons(&source(), &t);
        let cpu = r.iter().find(|x| x.code == "target-cpu").expect("target-cpu");
        assert_eq!(cpu.severity, Severity::Caveat);
        assert!(cpu.what.contains("avx"));
        assert_eq!(severity(&r, "target-criu"), Some(Severity::Blocker));
    }

    #[test]
    fn addresses_read_as_the_kernel_writes_them() {
        assert_eq!(addr_text("0100007F"), "127.0.0.1");
        assert_eq!(addr_text("210013C6"), "198.19.0.33");
        assert_eq!(addr_text("00000000000000000000000001000000"), "[::1]");
        assert_eq!(addr_text("xyz"), "xyz");
    }

    #[test]
    fn versions_parse() {
        assert_eq!(kernel_version("6.18.44-fc-v1300"), Some((6, 18, 44)));
        assert_eq!(kernel_version("6.1"), Some((6, 1, 0)));
        assert_eq!(kernel_version("x"), None);
        assert_eq!(parse_version("4.2.1"), Some(Version { major: 4, minor: 2, sublevel: 1 }));
        assert_eq!(parse_version("4.2"), Some(Version { major: 4, minor: 2, sublevel: 0 }));
        assert_eq!(parse_version(""), None);
        assert!(shorten(&(0..20).map(|i| i.to_string()).collect::<Vec<_>>(), 12).ends_with("and 8 more"));
    }

    /// This test process as the tree: its executable, mappings and working directory are
    /// found here, a listener of its own is a port taken here; a path missing, of another
    /// kind or size is a problem of its own kind.
    #[test]
    fn a_tree_needs_its_paths_and_ports_on_the_target() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("addr").port();
        let held = tempfile::NamedTempFile::new().expect("temp file");
        fs::write(held.path(), b"twelve bytes").expect("write");
        let facts = super::super::gather::tree(std::process::id() as i32, &[]);
        let needs = TreeNeeds::of(&facts);
        let exe = std::env::current_exe().expect("exe").display().to_string();
        assert!(needs.paths.iter().any(|p| p.path == exe && p.mapped && p.size.is_some()), "{needs:?}");
        let held_path = held.path().display().to_string();
        let held_need = needs.paths.iter().find(|p| p.path == held_path).expect("the open file");
        assert_eq!((held_need.size, held_need.mapped, held_need.dir), (Some(12), false, false));
        assert!(!needs.paths.iter().any(|p| p.path.starts_with("/proc/") || p.path.starts_with("/dev/")));
        assert!(needs.listens.iter().any(|l| l.port == port), "{needs:?}");
        assert!(needs.addresses.is_empty(), "this host's network namespace stays: {needs:?}");

        // Here is also "the target": the paths are found, and the listener's port is taken.
        // (Only this test's own: other tests' files come and go meanwhile.)
        let mine = TreeNeeds {
            paths: needs.paths.iter().filter(|p| p.path == exe || p.path == held_path).cloned().collect(),
            listens: needs.listens.iter().filter(|l| l.port == port).cloned().collect(),
            addresses: Vec::new(),
        };
        let problems = tree_problems(&mine);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].kind == "port" && problems[0].what.contains(&format!("port {port} ")),
            "{problems:?}"
        );

        let odd = TreeNeeds {
            paths: vec![
                PathNeed { path: "/nonexistent/ferry-check".into(), dir: false, size: None, mapped: false },
                PathNeed { path: held_path.clone(), dir: true, size: None, mapped: false },
                PathNeed { path: held_path.clone(), dir: false, size: Some(13), mapped: false },
                PathNeed { path: exe.clone(), dir: false, size: Some(1), mapped: true },
                PathNeed { path: "relative/path".into(), dir: false, size: None, mapped: false },
            ],
            listens: vec![Listen { addr: "00000000".into(), port: 1 }],
            addresses: vec![std::net::Ipv4Addr::new(198, 18, 255, 254)],
        };
        let p = tree_problems(&odd);
        let kinds: Vec<(&str, bool)> = p.iter().map(|p| (p.kind.as_str(), p.blocker)).collect();
        assert_eq!(kinds, [("path", true), ("path", true), ("size", false), ("size", true)], "{p:?}");

        // As reasons: blockers for missing paths and taken ports, a caveat for an open file's size.
        let mut t = target();
        t.tree = Some(p);
        let r = target_reasons(&source(), &t);
        assert_eq!(severity(&r, "target-paths"), Some(Severity::Blocker));
        assert!(r.iter().any(|x| x.code == "target-paths" && x.severity == Severity::Caveat));
        t.tree = Some(problems);
        assert_eq!(severity(&target_reasons(&source(), &t), "target-port"), Some(Severity::Blocker));
        drop(listener);
    }
}

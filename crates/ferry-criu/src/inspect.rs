//! What a checkpoint holds, read from its CRIU images for `ferry inspect`: the process tree,
//! the memory dumped and every open file descriptor with what it refers to.
//!
//! Images come from checkpoints and are hostile input: every file is read through the caps of
//! [`crate::image`] and a total budget, every count is capped, and nothing here panics on
//! damage. Paths found in images are strings to show, never opened. Strings in the returned
//! structs are as the images hold them (lossily made UTF-8): they may hold control characters,
//! so print them through the [`Display`](fmt::Display) impls here, which escape those.
//!
//! The images read (CRIU 4.2 layout; older layouts also read where noted):
//! - `pstree.img`: `pstree_entry` — pid, ppid and thread ids of each process (pids as seen in
//!   the dumped tree's own pid namespace).
//! - `core-<pid>.img`: `core_entry.tc` — `comm` and `task_state` (2 = zombie: no files, no
//!   memory); `core_entry.ids` where no `ids-<pid>.img` exists (older dumps).
//! - `ids-<pid>.img`: `task_kobj_ids_entry.files_id`, which names the fd table image.
//! - `fdinfo-<files_id>.img`: `fdinfo_entry` — fd number, type and the id of its file.
//! - `files.img`: `file_entry` — type, id and the nested `reg` (path, position), `isk` (inet
//!   socket), `usk` (unix socket), `pipe` and `fifo` entries. Older dumps kept these in
//!   `reg-files.img`, `inetsk.img`, `unixsk.img`, `pipes.img` and `fifo.img`; those are read
//!   too when present.
//! - `pagemap-<pid>.img` and `pagemap-shmem-<id>.img`: `pagemap_entry` — the pages stored in
//!   `pages-*.img` (flag `PE_PRESENT`, or for old images any entry not `in_parent`). The page
//!   data itself is never read.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;

use prost::Message;

use crate::image::{entries, header, ImageError, MAX_IMAGE};

/// Size of a page in `pagemap_entry.nr_pages` (x86_64 and the default of other architectures).
pub const PAGE_SIZE: u64 = 4096;
/// At most this many processes in `pstree.img`.
pub const MAX_PROCESSES: usize = 1 << 16;
/// At most this many open files listed, over all processes.
pub const MAX_FILES: usize = 1 << 20;
/// At most this many image bytes read in all by one [`summarize`].
pub const MAX_TOTAL_READ: u64 = 1 << 30;
/// At most this many directory entries looked at while looking for shared memory pagemaps.
pub const MAX_DIR_ENTRIES: usize = 1 << 20;

const PSTREE_MAGIC: u32 = 0x5027_3030;
const CORE_MAGIC: u32 = 0x5505_3847;
const IDS_MAGIC: u32 = 0x5443_2030;
const FDINFO_MAGIC: u32 = 0x5621_3732;
const FILES_MAGIC: u32 = 0x5630_3138;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;
const REG_FILES_MAGIC: u32 = 0x5036_3636;
const INETSK_MAGIC: u32 = 0x5644_3851;
const UNIXSK_MAGIC: u32 = 0x5437_3943;
const PIPES_MAGIC: u32 = 0x5651_3555;
const FIFO_MAGIC: u32 = 0x5836_4939;

/// `task_state` of a zombie in `task_core_entry` (CRIU's `TASK_DEAD`).
const TASK_DEAD: u32 = 2;
/// `pagemap_entry.flags`: the pages are in `pages-*.img`.
const PE_PRESENT: u32 = 1 << 2;

// `fd_types` of fdinfo.proto.
const FD_REG: u32 = 1;
const FD_PIPE: u32 = 2;
const FD_FIFO: u32 = 3;
const FD_INETSK: u32 = 4;
const FD_UNIXSK: u32 = 5;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;

/// What a checkpoint holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// In `pstree.img` order: the root first, then depth first.
    pub processes: Vec<ProcessInfo>,
    /// Bytes of memory stored in the checkpoint: the present pages of every process's pagemap
    /// and of shared memory pagemaps, times [`PAGE_SIZE`]. For a plain dump this is the total
    /// size of `pages-*.img`.
    pub memory_bytes: u64,
    /// Per process in `processes` order, by fd number.
    pub files: Vec<OpenFile>,
}

/// One process of the dumped tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// The pid inside the dumped tree's pid namespace.
    pub pid: i32,
    /// 0 for the root of the tree.
    pub ppid: i32,
    pub threads: usize,
    pub comm: String,
}

/// One open file descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFile {
    pub pid: i32,
    pub fd: u32,
    pub kind: FileKind,
}

/// What a file descriptor refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileKind {
    /// A file, directory or device node opened by path; `pos` is the file offset.
    Regular { path: String, pos: u64 },
    /// A pipe end; both ends share `id` (the pipe's inode number).
    Pipe { id: u32 },
    /// A unix socket: its bound name, `@`-prefixed if abstract, empty if unnamed.
    Unix { path: String },
    /// A TCP socket: addresses as `ip:port` (`[ip]:port` for IPv6) and the kernel's state
    /// name (`LISTEN`, `ESTABLISHED`, ...).
    Tcp { local: String, remote: String, state: String },
    /// A UDP socket and its local address.
    Udp { local: String },
    /// Anything else, described in words.
    Other { desc: String },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InspectError {
    #[error("{image}: {source}")]
    Image { image: String, source: ImageError },
    #[error("{image}: {detail}")]
    Invalid { image: String, detail: String },
    #[error("checkpoint too large to inspect: {detail}")]
    TooLarge { detail: String },
}

/// The root process's PID as the checkpoint recorded it (1: the root of a pid namespace of
/// its own, which CRIU restores into a fresh one), from `pstree.img` alone.
pub fn root_pid(images_dir: &Path) -> Result<i32, InspectError> {
    let mut reader = Reader { dir: images_dir, budget: MAX_TOTAL_READ };
    let tree: Vec<PstreeEntry> = reader.required("pstree.img", PSTREE_MAGIC)?;
    let root = tree.first().ok_or_else(|| invalid("pstree.img", "no processes"))?;
    to_pid(root.pid, "pid")
}

/// Reads the images in `images_dir` and says what the checkpoint holds.
pub fn summarize(images_dir: &Path) -> Result<Summary, InspectError> {
    let mut reader = Reader { dir: images_dir, budget: MAX_TOTAL_READ };
    let tree: Vec<PstreeEntry> = reader.required("pstree.img", PSTREE_MAGIC)?;
    if tree.is_empty() {
        return Err(invalid("pstree.img", "no processes"));
    }
    if tree.len() > MAX_PROCESSES {
        return Err(InspectError::TooLarge {
            detail: format!("{} processes (at most {MAX_PROCESSES})", tree.len()),
        });
    }

    let table = reader.files_table()?;
    let mut fd_tables: HashMap<u32, Vec<FdinfoEntry>> = HashMap::new();
    let mut processes = Vec::with_capacity(tree.len());
    let mut files = Vec::new();
    let mut memory_bytes = 0u64;
    for entry in &tree {
        let pid = to_pid(entry.pid, "pid")?;
        let ppid = to_pid(entry.ppid, "ppid")?;
        let core_name = format!("core-{}.img", entry.pid);
        let core = reader
            .required::<CoreEntry>(&core_name, CORE_MAGIC)?
            .into_iter()
            .next()
            .ok_or_else(|| invalid(&core_name, "no entry"))?;
        let tc = core.tc.ok_or_else(|| invalid(&core_name, "no task core"))?;
        processes.push(ProcessInfo { pid, ppid, threads: entry.threads.len(), comm: lossy(&tc.comm) });
        if tc.task_state == TASK_DEAD {
            continue;
        }

        let ids_name = format!("ids-{}.img", entry.pid);
        let ids = match reader.optional::<TaskKobjIdsEntry>(&ids_name, IDS_MAGIC)? {
            Some(list) => list.into_iter().next(),
            None => core.ids,
        }
        .ok_or_else(|| invalid(&ids_name, "missing from the checkpoint"))?;
        let fds = match fd_tables.entry(ids.files_id) {
            Entry::Occupied(known) => known.into_mut(),
            Entry::Vacant(slot) => {
                let name = format!("fdinfo-{}.img", ids.files_id);
                let mut fds: Vec<FdinfoEntry> = reader.required(&name, FDINFO_MAGIC)?;
                fds.sort_by_key(|f| f.fd);
                slot.insert(fds)
            }
        };
        if files.len().saturating_add(fds.len()) > MAX_FILES {
            return Err(InspectError::TooLarge { detail: format!("more than {MAX_FILES} open files") });
        }
        files.extend(fds.iter().map(|f| OpenFile { pid, fd: f.fd, kind: table.kind(f) }));

        let pagemap = format!("pagemap-{}.img", entry.pid);
        let pages = reader.required::<PagemapEntry>(&pagemap, PAGEMAP_MAGIC)?;
        memory_bytes = memory_bytes.saturating_add(present_bytes(&pages));
    }
    for name in shmem_pagemaps(images_dir)? {
        let pages = reader.required::<PagemapEntry>(&name, PAGEMAP_MAGIC)?;
        memory_bytes = memory_bytes.saturating_add(present_bytes(&pages));
    }
    Ok(Summary { processes, memory_bytes, files })
}

/// Reads images out of one directory, within [`MAX_TOTAL_READ`] bytes in all.
struct Reader<'a> {
    dir: &'a Path,
    budget: u64,
}

impl Reader<'_> {
    /// The bytes of `name`, or `None` where there is no such file.
    fn bytes(&mut self, name: &str) -> Result<Option<Vec<u8>>, InspectError> {
        let path = self.dir.join(name);
        let read_err = |detail: String| InspectError::Image {
            image: name.to_string(),
            source: ImageError::Read { path: path.display().to_string(), detail },
        };
        let md = match fs::symlink_metadata(&path) {
            Ok(md) => md,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_err(e.to_string())),
        };
        if !md.is_file() || md.len() > MAX_IMAGE {
            return Err(read_err("not a regular file of reasonable size".into()));
        }
        if md.len() > self.budget {
            return Err(InspectError::TooLarge {
                detail: format!("images beyond {MAX_TOTAL_READ} bytes in all"),
            });
        }
        let file = File::open(&path).map_err(|e| read_err(e.to_string()))?;
        let opened = file.metadata().map_err(|e| read_err(e.to_string()))?;
        if !opened.is_file() {
            return Err(read_err("not a regular file".into()));
        }
        let limit = MAX_IMAGE.min(self.budget);
        let mut data = Vec::new();
        file.take(limit.saturating_add(1)).read_to_end(&mut data).map_err(|e| read_err(e.to_string()))?;
        let len = data.len() as u64;
        if len > limit {
            return Err(read_err("grew while being read".into()));
        }
        self.budget -= len;
        Ok(Some(data))
    }

    fn optional<M: Message + Default>(
        &mut self,
        name: &str,
        magic: u32,
    ) -> Result<Option<Vec<M>>, InspectError> {
        match self.bytes(name)? {
            Some(data) => decode_all(name, &data, magic).map(Some),
            None => Ok(None),
        }
    }

    fn required<M: Message + Default>(&mut self, name: &str, magic: u32) -> Result<Vec<M>, InspectError> {
        self.optional(name, magic)?.ok_or_else(|| invalid(name, "missing from the checkpoint"))
    }

    /// Every file entry by id: `files.img`, then the per-type images of older dumps.
    fn files_table(&mut self) -> Result<FileTable, InspectError> {
        let mut by_id = HashMap::new();
        for f in self.optional::<FileEntry>("files.img", FILES_MAGIC)?.unwrap_or_default() {
            by_id.insert(f.id, f);
        }
        let mut legacy = |f: FileEntry| {
            by_id.entry(f.id).or_insert(f);
        };
        for reg in self.optional::<RegFileEntry>("reg-files.img", REG_FILES_MAGIC)?.unwrap_or_default() {
            legacy(FileEntry { kind: FD_REG, id: reg.id, reg: Some(reg), ..FileEntry::default() });
        }
        for isk in self.optional::<InetSkEntry>("inetsk.img", INETSK_MAGIC)?.unwrap_or_default() {
            legacy(FileEntry { kind: FD_INETSK, id: isk.id, isk: Some(isk), ..FileEntry::default() });
        }
        for usk in self.optional::<UnixSkEntry>("unixsk.img", UNIXSK_MAGIC)?.unwrap_or_default() {
            legacy(FileEntry { kind: FD_UNIXSK, id: usk.id, usk: Some(usk), ..FileEntry::default() });
        }
        for pipe in self.optional::<PipeEntry>("pipes.img", PIPES_MAGIC)?.unwrap_or_default() {
            legacy(FileEntry { kind: FD_PIPE, id: pipe.id, pipe: Some(pipe), ..FileEntry::default() });
        }
        for fifo in self.optional::<FifoEntry>("fifo.img", FIFO_MAGIC)?.unwrap_or_default() {
            legacy(FileEntry { kind: FD_FIFO, id: fifo.id, fifo: Some(fifo), ..FileEntry::default() });
        }
        Ok(FileTable { by_id })
    }
}

struct FileTable {
    by_id: HashMap<u32, FileEntry>,
}

impl FileTable {
    fn kind(&self, fd: &FdinfoEntry) -> FileKind {
        let entry = self.by_id.get(&fd.id);
        let missing =
            || FileKind::Other { desc: format!("{} (no file entry {:#x})", type_name(fd.kind), fd.id) };
        match fd.kind {
            FD_REG => match entry.and_then(|e| e.reg.as_ref()) {
                Some(reg) => FileKind::Regular { path: lossy(&reg.name), pos: reg.pos },
                None => missing(),
            },
            FD_PIPE => match entry.and_then(|e| e.pipe.as_ref()) {
                Some(pipe) => FileKind::Pipe { id: pipe.pipe_id },
                None => missing(),
            },
            FD_FIFO => match entry.and_then(|e| e.fifo.as_ref()) {
                Some(fifo) => {
                    let reg_id = fifo.regf_id.unwrap_or(fifo.id);
                    let path = self
                        .by_id
                        .get(&reg_id)
                        .and_then(|e| e.reg.as_ref())
                        .map_or_else(String::new, |r| lossy(&r.name));
                    FileKind::Other { desc: format!("fifo {path} (pipe {})", fifo.pipe_id) }
                }
                None => missing(),
            },
            FD_INETSK => match entry.and_then(|e| e.isk.as_ref()) {
                Some(isk) => inet_kind(isk),
                None => missing(),
            },
            FD_UNIXSK => match entry.and_then(|e| e.usk.as_ref()) {
                Some(usk) => FileKind::Unix { path: unix_name(usk) },
                None => missing(),
            },
            other => FileKind::Other { desc: type_name(other) },
        }
    }
}

fn inet_kind(isk: &InetSkEntry) -> FileKind {
    let local = socket_addr(isk.family, &isk.src_addr, isk.src_port);
    match isk.proto {
        IPPROTO_TCP => FileKind::Tcp {
            local,
            remote: socket_addr(isk.family, &isk.dst_addr, isk.dst_port),
            state: tcp_state(isk.state),
        },
        IPPROTO_UDP => FileKind::Udp { local },
        proto => FileKind::Other {
            desc: format!("inet socket (family {}, type {}, protocol {proto}) {local}", isk.family, isk.kind),
        },
    }
}

/// CRIU keeps an address as the `u32` words of its network-order bytes, each word read in
/// host order (little-endian on every architecture ferry runs on).
fn socket_addr(family: u32, words: &[u32], port: u32) -> String {
    let mut bytes = Vec::with_capacity(16);
    for w in words {
        bytes.extend_from_slice(&w.to_le_bytes());
    }
    match (family, bytes.len()) {
        (AF_INET, 4) => {
            let ip = Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]);
            format!("{ip}:{port}")
        }
        (AF_INET6, 16) => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&bytes);
            format!("[{}]:{port}", Ipv6Addr::from(octets))
        }
        (_, 0) => format!("*:{port}"),
        _ => format!("?(family {family}, {} address bytes):{port}", bytes.len()),
    }
}

fn tcp_state(state: u32) -> String {
    let name = match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        other => return format!("state {other}"),
    };
    name.to_string()
}

/// An abstract name keeps every byte; a path name ends at its first NUL (CRIU keeps the
/// address length the socket was bound with, often counting the terminating NUL); a relative
/// path name is shown under the directory CRIU resolved it in.
fn unix_name(usk: &UnixSkEntry) -> String {
    match usk.name.split_first() {
        None => String::new(),
        Some((0, rest)) => format!("@{}", lossy(rest)),
        Some(_) => {
            let name = usk.name.split(|&b| b == 0).next().unwrap_or_default();
            match usk.name_dir.as_deref() {
                Some(dir) if !dir.is_empty() && !name.starts_with(b"/") => {
                    format!("{}/{}", lossy(dir), lossy(name))
                }
                _ => lossy(name),
            }
        }
    }
}

fn type_name(kind: u32) -> String {
    let name = match kind {
        0 => "undefined file",
        1 => "regular file",
        2 => "pipe",
        3 => "fifo",
        4 => "inet socket",
        5 => "unix socket",
        6 => "eventfd",
        7 => "eventpoll",
        8 => "inotify",
        9 => "signalfd",
        10 => "packet socket",
        11 => "tty",
        12 => "fanotify",
        13 => "netlink socket",
        14 => "namespace file",
        15 => "tun",
        16 => "external file",
        17 => "timerfd",
        18 => "memfd",
        19 => "bpf map",
        20 => "pidfd",
        other => return format!("file of type {other}"),
    };
    name.to_string()
}

fn present_bytes(pages: &[PagemapEntry]) -> u64 {
    // The first entry of a pagemap is its `pagemap_head`.
    pages
        .iter()
        .skip(1)
        .filter(|p| match p.flags {
            Some(flags) => flags & PE_PRESENT != 0,
            None => !p.in_parent.unwrap_or(false),
        })
        .map(|p| p.nr_pages.unwrap_or(u64::from(p.compat_nr_pages)).saturating_mul(PAGE_SIZE))
        .fold(0u64, u64::saturating_add)
}

/// `pagemap-shmem-<id>.img` names in the directory, sorted.
fn shmem_pagemaps(dir: &Path) -> Result<Vec<String>, InspectError> {
    let read_err = |detail: String| InspectError::Image {
        image: dir.display().to_string(),
        source: ImageError::Read { path: dir.display().to_string(), detail },
    };
    let mut names = Vec::new();
    for (seen, item) in fs::read_dir(dir).map_err(|e| read_err(e.to_string()))?.enumerate() {
        if seen >= MAX_DIR_ENTRIES {
            return Err(InspectError::TooLarge {
                detail: format!("more than {MAX_DIR_ENTRIES} files in the image directory"),
            });
        }
        let item = item.map_err(|e| read_err(e.to_string()))?;
        let Some(name) = item.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let is_shmem = name
            .strip_prefix("pagemap-shmem-")
            .and_then(|rest| rest.strip_suffix(".img"))
            .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()));
        if is_shmem {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

fn decode_all<M: Message + Default>(image: &str, data: &[u8], magic: u32) -> Result<Vec<M>, InspectError> {
    let wrap = |source: ImageError| InspectError::Image { image: image.to_string(), source };
    let (found, start) = header(data).map_err(wrap)?;
    if found != magic {
        return Err(wrap(ImageError::Magic { found, expected: magic }));
    }
    let mut offset = start;
    let mut out = Vec::new();
    for raw in entries(data, start).map_err(wrap)? {
        out.push(M::decode(raw).map_err(|e| wrap(ImageError::Decode { offset, detail: e.to_string() }))?);
        offset += 4 + raw.len();
    }
    Ok(out)
}

fn to_pid(value: u32, what: &str) -> Result<i32, InspectError> {
    i32::try_from(value).map_err(|_| invalid("pstree.img", &format!("{what} {value} out of range")))
}

fn invalid(image: &str, detail: &str) -> InspectError {
    InspectError::Invalid { image: image.to_string(), detail: detail.to_string() }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Writes `s` with control characters escaped, so that names from images cannot drive a
/// terminal.
fn write_escaped(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    for c in s.chars() {
        if c.is_control() {
            write!(f, "{}", c.escape_default())?;
        } else {
            write!(f, "{c}")?;
        }
    }
    Ok(())
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileKind::Regular { path, pos } => {
                write!(f, "file ")?;
                write_escaped(f, path)?;
                write!(f, " (offset {pos})")
            }
            FileKind::Pipe { id } => write!(f, "pipe:[{id}]"),
            FileKind::Unix { path } if path.is_empty() => write!(f, "unix socket (unnamed)"),
            FileKind::Unix { path } => {
                write!(f, "unix socket ")?;
                write_escaped(f, path)
            }
            FileKind::Tcp { local, remote, state } => write!(f, "tcp {local} -> {remote} {state}"),
            FileKind::Udp { local } => write!(f, "udp {local}"),
            FileKind::Other { desc } => write_escaped(f, desc),
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:>8} {:>8} {:>7}  COMM", "PID", "PPID", "THREADS")?;
        for p in &self.processes {
            write!(f, "{:>8} {:>8} {:>7}  ", p.pid, p.ppid, p.threads)?;
            write_escaped(f, &p.comm)?;
            writeln!(f)?;
        }
        writeln!(
            f,
            "memory: {} bytes ({:.1} MiB) of pages dumped",
            self.memory_bytes,
            self.memory_bytes as f64 / f64::from(1u32 << 20)
        )?;
        writeln!(f, "{:>8} {:>6}  FILE", "PID", "FD")?;
        for o in &self.files {
            writeln!(f, "{:>8} {:>6}  {}", o.pid, o.fd, o.kind)?;
        }
        Ok(())
    }
}

// The fields of CRIU's image messages read here (images/*.proto); protobuf skips the others.
// Strings are read as bytes: CRIU writes names as the kernel has them, not always UTF-8.

/// `pstree_entry`.
#[derive(Clone, PartialEq, Message)]
struct PstreeEntry {
    #[prost(uint32, required, tag = "1")]
    pid: u32,
    #[prost(uint32, required, tag = "2")]
    ppid: u32,
    #[prost(uint32, repeated, tag = "5")]
    threads: Vec<u32>,
}

/// `core_entry`.
#[derive(Clone, PartialEq, Message)]
struct CoreEntry {
    #[prost(message, optional, tag = "3")]
    tc: Option<TaskCoreEntry>,
    #[prost(message, optional, tag = "4")]
    ids: Option<TaskKobjIdsEntry>,
}

/// `task_core_entry`.
#[derive(Clone, PartialEq, Message)]
struct TaskCoreEntry {
    #[prost(uint32, required, tag = "1")]
    task_state: u32,
    #[prost(bytes = "vec", required, tag = "6")]
    comm: Vec<u8>,
}

/// `task_kobj_ids_entry`.
#[derive(Clone, PartialEq, Message)]
struct TaskKobjIdsEntry {
    #[prost(uint32, required, tag = "2")]
    files_id: u32,
}

/// `fdinfo_entry`.
#[derive(Clone, PartialEq, Message)]
struct FdinfoEntry {
    #[prost(uint32, required, tag = "1")]
    id: u32,
    /// `fd_types`.
    #[prost(uint32, required, tag = "3")]
    kind: u32,
    #[prost(uint32, required, tag = "4")]
    fd: u32,
}

/// `file_entry`.
#[derive(Clone, PartialEq, Message)]
struct FileEntry {
    /// `fd_types`.
    #[prost(uint32, required, tag = "1")]
    kind: u32,
    #[prost(uint32, required, tag = "2")]
    id: u32,
    #[prost(message, optional, tag = "3")]
    reg: Option<RegFileEntry>,
    #[prost(message, optional, tag = "4")]
    isk: Option<InetSkEntry>,
    #[prost(message, optional, tag = "16")]
    usk: Option<UnixSkEntry>,
    #[prost(message, optional, tag = "17")]
    fifo: Option<FifoEntry>,
    #[prost(message, optional, tag = "18")]
    pipe: Option<PipeEntry>,
}

/// `reg_file_entry`.
#[derive(Clone, PartialEq, Message)]
struct RegFileEntry {
    #[prost(uint32, required, tag = "1")]
    id: u32,
    #[prost(uint64, required, tag = "3")]
    pos: u64,
    #[prost(bytes = "vec", required, tag = "6")]
    name: Vec<u8>,
}

/// `inet_sk_entry`.
#[derive(Clone, PartialEq, Message)]
struct InetSkEntry {
    #[prost(uint32, required, tag = "1")]
    id: u32,
    #[prost(uint32, required, tag = "3")]
    family: u32,
    #[prost(uint32, required, tag = "4")]
    kind: u32,
    #[prost(uint32, required, tag = "5")]
    proto: u32,
    #[prost(uint32, required, tag = "6")]
    state: u32,
    #[prost(uint32, required, tag = "7")]
    src_port: u32,
    #[prost(uint32, required, tag = "8")]
    dst_port: u32,
    #[prost(uint32, repeated, packed = "false", tag = "11")]
    src_addr: Vec<u32>,
    #[prost(uint32, repeated, packed = "false", tag = "12")]
    dst_addr: Vec<u32>,
}

/// `unix_sk_entry`.
#[derive(Clone, PartialEq, Message)]
struct UnixSkEntry {
    #[prost(uint32, required, tag = "1")]
    id: u32,
    #[prost(bytes = "vec", required, tag = "11")]
    name: Vec<u8>,
    #[prost(bytes = "vec", optional, tag = "14")]
    name_dir: Option<Vec<u8>>,
}

/// `pipe_entry`.
#[derive(Clone, PartialEq, Message)]
struct PipeEntry {
    #[prost(uint32, required, tag = "1")]
    id: u32,
    #[prost(uint32, required, tag = "2")]
    pipe_id: u32,
}

/// `fifo_entry`.
#[derive(Clone, PartialEq, Message)]
struct FifoEntry {
    #[prost(uint32, required, tag = "1")]
    id: u32,
    #[prost(uint32, required, tag = "2")]
    pipe_id: u32,
    #[prost(uint32, optional, tag = "3")]
    regf_id: Option<u32>,
}

/// `pagemap_entry`.
#[derive(Clone, PartialEq, Message)]
struct PagemapEntry {
    #[prost(uint32, required, tag = "2")]
    compat_nr_pages: u32,
    #[prost(bool, optional, tag = "3")]
    in_parent: Option<bool>,
    #[prost(uint32, optional, tag = "4")]
    flags: Option<u32>,
    #[prost(uint64, optional, tag = "5")]
    nr_pages: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/inspect").join(name)
    }

    /// The image files of a fixture, by name, sorted.
    fn images(name: &str) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = fs::read_dir(fixture(name))
            .expect("fixture dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "img"))
            .map(|p| {
                let name = p.file_name().expect("name").to_string_lossy().into_owned();
                (name, fs::read(&p).expect("read"))
            })
            .collect();
        out.sort();
        out
    }

    /// A fresh directory holding `files`.
    fn dir_with(files: &[(String, Vec<u8>)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, data) in files {
            fs::write(dir.path().join(name), data).expect("write");
        }
        dir
    }

    fn files_of(s: &Summary, pid: i32) -> Vec<(u32, FileKind)> {
        s.files.iter().filter(|f| f.pid == pid).map(|f| (f.fd, f.kind.clone())).collect()
    }

    fn tcp(local: &str, remote: &str, state: &str) -> FileKind {
        FileKind::Tcp { local: local.into(), remote: remote.into(), state: state.into() }
    }

    fn dev_null() -> FileKind {
        FileKind::Regular { path: "/dev/null".into(), pos: 0 }
    }

    /// tests/fixtures/inspect/python_tree: work.py dumped by CRIU 4.2.1 with
    /// `--tcp-established`; see the README there for what each descriptor is.
    #[test]
    fn python_tree_processes_memory_and_files() {
        let s = summarize(&fixture("python_tree")).expect("summary");
        assert_eq!(
            s.processes,
            vec![
                ProcessInfo { pid: 1, ppid: 0, threads: 2, comm: "ferry-root".into() },
                ProcessInfo { pid: 2, ppid: 1, threads: 1, comm: "ferry-child".into() },
            ]
        );
        // pages-1.img (5025792 bytes) + pages-2.img (5005312 bytes) of that dump.
        assert_eq!(s.memory_bytes, 10_031_104);
        let pipe = FileKind::Pipe { id: 304_971 };
        assert_eq!(
            files_of(&s, 1),
            vec![
                (0, dev_null()),
                (1, dev_null()),
                (2, dev_null()),
                (3, FileKind::Regular { path: "/tmp/ferry-inspect.4NMPkE/data.txt".into(), pos: 1234 }),
                (5, pipe.clone()),
                (6, tcp("127.0.0.1:40761", "0.0.0.0:0", "LISTEN")),
                (7, tcp("127.0.0.1:47056", "127.0.0.1:40761", "ESTABLISHED")),
                (8, tcp("127.0.0.1:40761", "127.0.0.1:47056", "ESTABLISHED")),
                (9, tcp("[::1]:58725", "[::]:0", "LISTEN")),
                (10, FileKind::Udp { local: "127.0.0.1:34453".into() }),
                (11, FileKind::Unix { path: "/tmp/ferry-inspect.4NMPkE/ctl.sock".into() }),
            ]
        );
        assert_eq!(files_of(&s, 2), vec![(0, dev_null()), (1, dev_null()), (2, dev_null()), (4, pipe)]);
        let text = s.to_string();
        assert!(text.contains("ferry-child"), "{text}");
        assert!(text.contains("tcp 127.0.0.1:47056 -> 127.0.0.1:40761 ESTABLISHED"), "{text}");
        assert!(text.contains("file /tmp/ferry-inspect.4NMPkE/data.txt (offset 1234)"), "{text}");
    }

    /// tests/fixtures/inspect/python_misc: misc.py, with a zombie, a child whose comm is not
    /// UTF-8 and holds an escape character, unix sockets of every naming, a fifo, an epoll
    /// and shared anonymous memory.
    #[test]
    fn python_misc_zombie_unix_names_fifo_and_shared_memory() {
        let s = summarize(&fixture("python_misc")).expect("summary");
        let shape: Vec<(i32, i32, usize)> = s.processes.iter().map(|p| (p.pid, p.ppid, p.threads)).collect();
        assert_eq!(shape, vec![(1, 0, 1), (2, 1, 1), (3, 1, 1)]);
        assert_eq!(s.processes[0].comm, "python3");
        assert_eq!(s.processes[1].comm, "python3");
        assert_eq!(s.processes[2].comm, "\u{fffd}\u{1b}[31modd");
        // pages-1.img (the shared memory, 65536) + pages-2.img and pages-3.img (4304896 each).
        assert_eq!(s.memory_bytes, 8_675_328);
        assert!(files_of(&s, 2).is_empty(), "a zombie has no files");
        let unix = |p: &str| FileKind::Unix { path: p.into() };
        let expected = vec![
            (0, dev_null()),
            (1, dev_null()),
            (2, dev_null()),
            (3, unix("@ferry-abstract")),
            (4, unix("/tmp/ferry-inspect.tWIXNo/rel.sock")),
            (5, unix("")),
            (6, unix("")),
            (7, FileKind::Other { desc: "fifo /tmp/ferry-inspect.tWIXNo/fifo (pipe 10043796)".into() }),
            (8, FileKind::Other { desc: "eventpoll".into() }),
        ];
        assert_eq!(files_of(&s, 1), expected);
        assert_eq!(files_of(&s, 3), expected);

        let text = s.to_string();
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(text.contains("\u{fffd}\\u{1b}[31modd"), "{text}");
        assert!(text.contains("unix socket (unnamed)"), "{text}");

        // Without the shared memory pagemap, only the two processes' own pages count.
        let rest: Vec<_> =
            images("python_misc").into_iter().filter(|(n, _)| !n.starts_with("pagemap-shmem-")).collect();
        let dir = dir_with(&rest);
        let s = summarize(dir.path()).expect("summary");
        assert_eq!(s.memory_bytes, 8_675_328 - 65_536);
    }

    #[test]
    fn missing_or_odd_images_are_errors() {
        let all = images("python_tree");
        for gone in ["pstree.img", "core-2.img", "ids-1.img", "fdinfo-3.img", "pagemap-1.img"] {
            let rest: Vec<_> = all.iter().filter(|(n, _)| n != gone).cloned().collect();
            let dir = dir_with(&rest);
            assert_eq!(summarize(dir.path()), Err(invalid(gone, "missing from the checkpoint")), "{gone}");
        }

        // A directory or a symlink where an image belongs is refused, not followed.
        let rest: Vec<_> = all.iter().filter(|(n, _)| n != "pstree.img").cloned().collect();
        let dir = dir_with(&rest);
        fs::create_dir(dir.path().join("pstree.img")).expect("mkdir");
        assert!(matches!(
            summarize(dir.path()),
            Err(InspectError::Image { source: ImageError::Read { .. }, .. })
        ));
        let dir = dir_with(&rest);
        std::os::unix::fs::symlink(fixture("python_tree").join("pstree.img"), dir.path().join("pstree.img"))
            .expect("symlink");
        assert!(matches!(
            summarize(dir.path()),
            Err(InspectError::Image { source: ImageError::Read { .. }, .. })
        ));

        // An image of another kind under a known name.
        let mut swapped = all.clone();
        let core = all.iter().find(|(n, _)| n == "core-1.img").expect("core");
        for (name, data) in &mut swapped {
            if name == "pstree.img" {
                data.clone_from(&core.1);
            }
        }
        let dir = dir_with(&swapped);
        assert_eq!(
            summarize(dir.path()),
            Err(InspectError::Image {
                image: "pstree.img".into(),
                source: ImageError::Magic { found: CORE_MAGIC, expected: PSTREE_MAGIC }
            })
        );

        assert!(summarize(Path::new("/nonexistent/ferry-inspect")).is_err());
    }

    /// Cuts, garbage and flipped bytes in every image: errors or odd summaries, never a panic.
    #[test]
    fn damaged_images_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for fixture_name in ["python_tree", "python_misc"] {
            let all = images(fixture_name);
            let dir = dir_with(&all);
            for (index, (name, data)) in all.iter().enumerate() {
                let path = dir.path().join(name);
                let mut variants: Vec<Vec<u8>> = Vec::new();
                for cut in [0, 3, 4, 7, 8, 9, data.len() / 2, data.len().saturating_sub(1)] {
                    variants.push(data[..cut.min(data.len())].to_vec());
                }
                // The right header, then garbage.
                let mut garbage = data[..8.min(data.len())].to_vec();
                garbage.extend((0..512).map(|_| next() as u8));
                variants.push(garbage);
                variants.push((0..256).map(|_| next() as u8).collect());
                let step = (data.len() / 48).max(1);
                for at in (0..data.len()).step_by(step) {
                    let mut flipped = data.clone();
                    flipped[at] ^= (next() as u8) | 1;
                    variants.push(flipped);
                }
                for variant in &variants {
                    fs::write(&path, variant).expect("write");
                    let _ = summarize(dir.path());
                }
                // One byte short always leaves a partial entry. Not read: inventory.img and
                // the core image of a thread that does not lead its process.
                if name != "inventory.img" && !(fixture_name == "python_tree" && name == "core-3.img") {
                    fs::write(&path, &data[..data.len() - 1]).expect("write");
                    assert!(summarize(dir.path()).is_err(), "{fixture_name}/{name} cut");
                }
                fs::write(&path, data).expect("restore");
                assert!(summarize(dir.path()).is_ok(), "{fixture_name} {index}");
            }
        }
    }

    #[test]
    fn hostile_counts_and_lengths() {
        // An entry claiming 4 GiB.
        let mut img = IMG_COMMON_MAGIC_BYTES.to_vec();
        img.extend_from_slice(&PSTREE_MAGIC.to_le_bytes());
        img.extend_from_slice(&u32::MAX.to_le_bytes());
        let dir = dir_with(&[("pstree.img".into(), img)]);
        assert!(matches!(
            summarize(dir.path()),
            Err(InspectError::Image { source: ImageError::EntryLength { .. }, .. })
        ));

        // Pids beyond i32 and an empty tree.
        let mut img = IMG_COMMON_MAGIC_BYTES.to_vec();
        img.extend_from_slice(&PSTREE_MAGIC.to_le_bytes());
        let entry = PstreeEntry { pid: u32::MAX, ppid: 0, threads: vec![] }.encode_to_vec();
        img.extend_from_slice(&(entry.len() as u32).to_le_bytes());
        img.extend_from_slice(&entry);
        let dir = dir_with(&[("pstree.img".into(), img)]);
        assert!(matches!(summarize(dir.path()), Err(InspectError::Invalid { .. })));
        let mut img = IMG_COMMON_MAGIC_BYTES.to_vec();
        img.extend_from_slice(&PSTREE_MAGIC.to_le_bytes());
        let dir = dir_with(&[("pstree.img".into(), img)]);
        assert_eq!(summarize(dir.path()), Err(invalid("pstree.img", "no processes")));

        // Page counts that overflow saturate.
        let huge = PagemapEntry {
            compat_nr_pages: 0,
            in_parent: None,
            flags: Some(PE_PRESENT),
            nr_pages: Some(u64::MAX),
        };
        let head = PagemapEntry::default();
        assert_eq!(present_bytes(&[head.clone(), huge.clone(), huge]), u64::MAX);
        // Old images: no flags, pages in the parent do not count.
        let old = |in_parent| PagemapEntry {
            compat_nr_pages: 2,
            in_parent: Some(in_parent),
            flags: None,
            nr_pages: None,
        };
        assert_eq!(present_bytes(&[head, old(false), old(true)]), 2 * PAGE_SIZE);
    }

    #[test]
    fn addresses_and_states() {
        assert_eq!(socket_addr(AF_INET, &[0x0100_007f], 80), "127.0.0.1:80");
        assert_eq!(socket_addr(AF_INET6, &[0, 0, 0, 0x0100_0000], 443), "[::1]:443");
        assert_eq!(socket_addr(AF_INET, &[], 9), "*:9");
        assert_eq!(socket_addr(AF_INET, &[1, 2], 9), "?(family 2, 8 address bytes):9");
        assert_eq!(tcp_state(10), "LISTEN");
        assert_eq!(tcp_state(99), "state 99");
        assert_eq!(type_name(99), "file of type 99");
        let usk = |name: &[u8], dir: Option<&[u8]>| UnixSkEntry {
            id: 1,
            name: name.to_vec(),
            name_dir: dir.map(<[u8]>::to_vec),
        };
        assert_eq!(unix_name(&usk(b"\0a\0b", None)), "@a\0b");
        assert_eq!(unix_name(&usk(b"s\0junk", Some(b"/d"))), "/d/s");
        assert_eq!(unix_name(&usk(b"/abs\0", Some(b"/d"))), "/abs");
        assert_eq!(unix_name(&usk(b"", None)), "");
    }

    const IMG_COMMON_MAGIC_BYTES: [u8; 4] = crate::image::IMG_COMMON_MAGIC.to_le_bytes();
}

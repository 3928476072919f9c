//! What post-copy needs from a lazy dump's images: the processes of `pstree.img` and, per
//! process, the ranges its `pagemap-<pid>.img` marks lazy (`PE_LAZY`: left out of the images,
//! still in the frozen task), and (target side) the address space of `mm-<pid>.img` they are cut
//! at and checked against. Images are hostile input: sizes and counts are capped.
//!
//! CRIU's mm image is not a list of mappings: each entry's `status` says what it is, and CRIU's
//! restore acts on an entry by its status bits alone, never by its position in the list. Since
//! CRIU 4.2, guard regions (`madvise(MADV_GUARD_INSTALL)`, kernel 6.13+: PTE markers, no
//! `vm_area_struct` of their own) are written as entries with the status `VMA_AREA_GUARD` only,
//! after every mapping (`collect_madv_guards`, criu/mem.c), each lying inside the mapping(s) it
//! guards; the restorer maps the mappings, then installs each guard over its range
//! (`restore_madv_guard_regions`, criu/pie/restorer.c). A guard page holds nothing: the dump
//! skips it (`should_dump_page`), so no pagemap entry covers one. The parser here reads the
//! status and the mapping flags as CRIU does: the mappings are the entries without
//! `VMA_AREA_GUARD` (sorted and disjoint, as `/proc/PID/smaps` lists them), the guards apart.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use ferry_criu::image::{entries, header, MAX_IMAGE};
use prost::Message;

use super::proto::{PAGE_SIZE, PE_LAZY, PE_PARENT, PE_PRESENT};
use super::LazyError;

const PSTREE_MAGIC: u32 = 0x5027_3030;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;
const MM_MAGIC: u32 = 0x5749_2820;
/// No process has more mappings than this (the kernel's default `vm.max_map_count` is 65530).
const MAX_VMAS: usize = 1 << 20;
/// At most this many processes.
const MAX_PROCESSES: usize = 1 << 16;
/// No process has more pages than this (2^40 bytes).
const MAX_PAGES: u64 = 1 << 28;

/// `pstree_entry`, the field used here.
#[derive(Clone, PartialEq, Message)]
struct PstreeEntry {
    #[prost(uint32, required, tag = "1")]
    pid: u32,
}

/// `pagemap_head`: the first entry of a pagemap image.
#[derive(Clone, PartialEq, Message)]
struct PagemapHead {
    #[prost(uint32, required, tag = "1")]
    pages_id: u32,
}

/// `pagemap_entry`.
#[derive(Clone, PartialEq, Message)]
struct PagemapEntry {
    #[prost(uint64, required, tag = "1")]
    vaddr: u64,
    #[prost(uint32, required, tag = "2")]
    compat_nr_pages: u32,
    #[prost(uint32, optional, tag = "4")]
    flags: Option<u32>,
    #[prost(uint64, optional, tag = "5")]
    nr_pages: Option<u64>,
}

/// `vma_entry`, the fields used here.
#[derive(Clone, PartialEq, Message)]
struct VmaEntry {
    #[prost(uint64, required, tag = "1")]
    start: u64,
    #[prost(uint64, required, tag = "2")]
    end: u64,
    /// `mmap` flags (`MAP_*`).
    #[prost(uint32, required, tag = "6")]
    flags: u32,
    /// CRIU's `VMA_*` status bits (criu/include/image.h).
    #[prost(uint32, required, tag = "7")]
    status: u32,
}

/// `VMA_AREA_VSYSCALL`, `VMA_AREA_VDSO`, `VMA_AREA_VVAR`: the kernel's own mappings.
const VMA_AREA_KERNEL: u32 = (1 << 2) | (1 << 3) | (1 << 12);
/// `VMA_AREA_GUARD`: not a mapping; a guard region inside one (CRIU 4.2+).
const VMA_AREA_GUARD: u32 = 1 << 16;
const MAP_PRIVATE: u32 = 0x02;
const MAP_ANONYMOUS: u32 = 0x20;
const MAP_LOCKED: u32 = 0x2000;
const MAP_HUGETLB: u32 = 0x40000;

impl VmaEntry {
    /// CRIU's `vma_entry_can_be_lazy` (criu/include/vma.h): the mappings whose pages a lazy
    /// dump may leave out and whose range a lazy restore registers with userfaultfd.
    fn can_be_lazy(&self) -> bool {
        self.flags & MAP_ANONYMOUS != 0
            && self.flags & MAP_PRIVATE != 0
            && self.flags & (MAP_LOCKED | MAP_HUGETLB) == 0
            && self.status & VMA_AREA_KERNEL == 0
    }
}

/// One mapping of a process as its mm image describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Its pages may be lazy: the restore registers it with userfaultfd.
    pub lazy: bool,
}

/// A process's address space as CRIU's mm image describes it: its mappings, sorted and
/// disjoint, and its guard regions (sorted, merged, each inside mapped memory).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    pub mappings: Vec<Mapping>,
    pub guards: Vec<(u64, u64)>,
}

impl Layout {
    /// The mapping holding `addr`.
    fn mapping_at(&self, addr: u64) -> Option<&Mapping> {
        let i = self.mappings.partition_point(|m| m.start <= addr).checked_sub(1)?;
        Some(&self.mappings[i]).filter(|m| addr < m.end)
    }

    /// The first guard region that `[start, end)` meets.
    fn guard_in(&self, start: u64, end: u64) -> Option<(u64, u64)> {
        let i = self.guards.partition_point(|&(_, e)| e <= start);
        self.guards.get(i).copied().filter(|&(s, _)| s < end)
    }

    /// True when `[start, end)` is mapped throughout (by one mapping or adjacent ones).
    fn mapped(&self, mut start: u64, end: u64) -> bool {
        while start < end {
            match self.mapping_at(start) {
                Some(m) => start = m.end,
                None => return false,
            }
        }
        true
    }
}

/// `mm_entry`, the field used here.
#[derive(Clone, PartialEq, Message)]
struct MmEntry {
    #[prost(message, repeated, tag = "14")]
    vmas: Vec<VmaEntry>,
}

/// Lazy ranges of one process: start address -> end address (exclusive), adjacent ranges merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LazyRanges {
    ranges: BTreeMap<u64, u64>,
}

impl LazyRanges {
    fn add(&mut self, start: u64, end: u64) {
        // Pagemap entries come sorted and disjoint; merge with a range that ends where this starts.
        if let Some((_, e)) = self.ranges.range_mut(..=start).next_back() {
            if *e == start {
                *e = end;
                return;
            }
        }
        self.ranges.insert(start, end);
    }

    /// True when `[start, end)` lies inside one (merged) lazy range.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        self.ranges.range(..=start).next_back().is_some_and(|(_, &e)| end <= e)
    }

    /// Bytes in all ranges.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The (merged) ranges, in address order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(s, e)| (*s, *e))
    }
}

fn read_image(dir: &Path, name: &str, magic: u32) -> Result<Option<Vec<u8>>, LazyError> {
    let path = dir.join(name);
    let bad = |detail: String| LazyError::Images { image: name.to_string(), detail };
    let md = match fs::symlink_metadata(&path) {
        Ok(md) => md,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(e.to_string())),
    };
    if !md.is_file() || md.len() > MAX_IMAGE {
        return Err(bad("not a regular file of reasonable size".into()));
    }
    let data = fs::read(&path).map_err(|e| bad(e.to_string()))?;
    let (found, _) = header(&data).map_err(|e| bad(e.to_string()))?;
    if found != magic {
        return Err(bad(format!("magic {found:#010x}, expected {magic:#010x}")));
    }
    Ok(Some(data))
}

fn decode<M: Message + Default>(name: &str, data: &[u8]) -> Result<Vec<M>, LazyError> {
    let bad = |detail: String| LazyError::Images { image: name.to_string(), detail };
    let (_, start) = header(data).map_err(|e| bad(e.to_string()))?;
    entries(data, start)
        .map_err(|e| bad(e.to_string()))?
        .into_iter()
        .map(|raw| M::decode(raw).map_err(|e| bad(e.to_string())))
        .collect()
}

/// The pids of `pstree.img` (as seen in the dumped tree's pid namespace), root first.
pub fn tree_pids(dir: &Path) -> Result<Vec<u32>, LazyError> {
    let data = read_image(dir, "pstree.img", PSTREE_MAGIC)?
        .ok_or_else(|| LazyError::Images { image: "pstree.img".into(), detail: "missing".into() })?;
    let tree: Vec<PstreeEntry> = decode("pstree.img", &data)?;
    if tree.is_empty() || tree.len() > MAX_PROCESSES {
        return Err(LazyError::Images {
            image: "pstree.img".into(),
            detail: format!("{} processes", tree.len()),
        });
    }
    Ok(tree.into_iter().map(|e| e.pid).collect())
}

/// The lazy ranges of process `pid`; empty if it has no pagemap (a zombie).
pub fn lazy_ranges(dir: &Path, pid: u32) -> Result<LazyRanges, LazyError> {
    let name = format!("pagemap-{pid}.img");
    match read_image(dir, &name, PAGEMAP_MAGIC)? {
        Some(data) => parse_lazy_ranges(&name, &data),
        None => Ok(LazyRanges::default()),
    }
}

fn check_magic(name: &str, data: &[u8], magic: u32) -> Result<usize, LazyError> {
    let bad = |detail: String| LazyError::Images { image: name.to_string(), detail };
    let (found, start) = header(data).map_err(|e| bad(e.to_string()))?;
    if found != magic {
        return Err(bad(format!("magic {found:#010x}, expected {magic:#010x}")));
    }
    Ok(start)
}

/// The lazy ranges a pagemap image (`name`, its bytes) marks.
fn parse_lazy_ranges(name: &str, data: &[u8]) -> Result<LazyRanges, LazyError> {
    let bad = |detail: String| LazyError::Images { image: name.to_string(), detail };
    let start = check_magic(name, data, PAGEMAP_MAGIC)?;
    let raw = entries(data, start).map_err(|e| bad(e.to_string()))?;
    let mut out = LazyRanges::default();
    let mut total = 0u64;
    let mut last_end = 0u64;
    // The first entry is the `pagemap_head`.
    for entry in raw.into_iter().skip(1) {
        let pe = PagemapEntry::decode(entry).map_err(|e| bad(e.to_string()))?;
        // Lazy and not in the images. A full dump marks its anonymous pages PE_LAZY too (they
        // may be restored lazily from the images), with PE_PRESENT: those are not served here.
        let flags = pe.flags.unwrap_or(0);
        if flags & PE_LAZY == 0 || flags & PE_PRESENT != 0 {
            continue;
        }
        let pages = pe.nr_pages.unwrap_or(u64::from(pe.compat_nr_pages));
        total = total.saturating_add(pages);
        if !pe.vaddr.is_multiple_of(PAGE_SIZE) || pages == 0 || total > MAX_PAGES {
            return Err(bad(format!("odd lazy entry {:#x} (+{pages} pages)", pe.vaddr)));
        }
        // CRIU writes them in address order; anything else would make ranges overlap.
        if pe.vaddr < last_end {
            return Err(bad(format!("lazy entry {:#x} out of order", pe.vaddr)));
        }
        let end = pe
            .vaddr
            .checked_add(pages * PAGE_SIZE)
            .ok_or_else(|| bad(format!("entry {:#x} wraps", pe.vaddr)))?;
        out.add(pe.vaddr, end);
        last_end = end;
    }
    Ok(out)
}

/// Where the pages of one process lie in its `pages-<id>.img`, for a restore that takes the
/// lazy ones from elsewhere (ferry's store) and only the others from the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredPages {
    /// The `pages-<id>.img` the pagemap points at.
    pub pages_file: String,
    /// Lazy runs: (address, bytes, offset in the pages image), in address order.
    pub lazy: Vec<(u64, u64, u64)>,
    /// Runs CRIU's restore reads from the pages image: (offset, bytes).
    pub eager: Vec<(u64, u64)>,
}

impl StoredPages {
    /// The offset in the pages image of lazy bytes `[vaddr, vaddr + len)`, if one lazy run
    /// holds them all.
    pub fn offset_of(&self, vaddr: u64, len: u64) -> Option<u64> {
        let i = self.lazy.partition_point(|&(a, _, _)| a <= vaddr).checked_sub(1)?;
        let (a, n, off) = self.lazy[i];
        (vaddr.checked_add(len)? <= a + n).then_some(off + (vaddr - a))
    }
}

/// The stored-pages plan of process `pid` of a full dump (every page in the images): CRIU
/// marks the pages a lazy restore may leave to a lazy-pages daemon `PE_LAZY` as well as
/// `PE_PRESENT`, so the pagemap says both where each run lies in the pages image and which
/// runs the restore will skip. `None` for a process without a pagemap (a zombie).
pub fn stored_pages(dir: &Path, pid: u32) -> Result<Option<StoredPages>, LazyError> {
    let name = format!("pagemap-{pid}.img");
    match read_image(dir, &name, PAGEMAP_MAGIC)? {
        Some(data) => parse_stored_pages(&name, &data).map(Some),
        None => Ok(None),
    }
}

/// As [`stored_pages`], from a pagemap image's bytes.
pub fn parse_stored_pages(name: &str, data: &[u8]) -> Result<StoredPages, LazyError> {
    let (_, _, pages_id, list) = checked_pagemap(name, data)?;
    let mut out = StoredPages { pages_file: format!("pages-{pages_id}.img"), ..Default::default() };
    let mut offset = 0u64;
    for (pe, len) in list {
        let flags = pe.flags.unwrap_or(0);
        if flags & PE_PRESENT == 0 {
            // A zero or lazy-only entry: nothing of it in the pages image.
            if flags & PE_LAZY != 0 {
                let detail = format!("lazy entry {:#x} is not in the images", pe.vaddr);
                return Err(LazyError::Images { image: name.to_string(), detail });
            }
            continue;
        }
        if flags & PE_LAZY != 0 {
            match out.lazy.last_mut() {
                Some((a, n, o)) if *a + *n == pe.vaddr && *o + *n == offset => *n += len,
                _ => out.lazy.push((pe.vaddr, len, offset)),
            }
        } else {
            match out.eager.last_mut() {
                Some((o, n)) if *o + *n == offset => *n += len,
                _ => out.eager.push((offset, len)),
            }
        }
        offset += len;
    }
    Ok(out)
}

/// A pagemap image's header length, its head entry (bytes) and pages id, and its entries,
/// each checked (page aligned, not empty, in address order, within the caps, none in a parent
/// checkpoint's images) and given with its length in bytes.
#[allow(clippy::type_complexity)]
fn checked_pagemap<'d>(
    name: &str,
    data: &'d [u8],
) -> Result<(usize, &'d [u8], u32, Vec<(FullPagemapEntry, u64)>), LazyError> {
    let bad = |detail: String| LazyError::Images { image: name.to_string(), detail };
    let start = check_magic(name, data, PAGEMAP_MAGIC)?;
    let raw = entries(data, start).map_err(|e| bad(e.to_string()))?;
    let head = *raw.first().ok_or_else(|| bad("no pagemap head".into()))?;
    let pages_id = PagemapHead::decode(head).map_err(|e| bad(e.to_string()))?.pages_id;
    let (mut total, mut last_end) = (0u64, 0u64);
    let mut out = Vec::with_capacity(raw.len().saturating_sub(1));
    for entry in raw.into_iter().skip(1) {
        let pe = FullPagemapEntry::decode(entry).map_err(|e| bad(e.to_string()))?;
        if pe.in_parent == Some(true) || pe.flags.unwrap_or(0) & PE_PARENT != 0 {
            return Err(bad(format!("entry {:#x} is in a parent checkpoint's images", pe.vaddr)));
        }
        let pages = pe.nr_pages.unwrap_or(u64::from(pe.compat_nr_pages));
        total = total.saturating_add(pages);
        if !pe.vaddr.is_multiple_of(PAGE_SIZE) || pages == 0 || total > MAX_PAGES || pe.vaddr < last_end {
            return Err(bad(format!("odd entry {:#x} (+{pages} pages)", pe.vaddr)));
        }
        let len = pages * PAGE_SIZE;
        last_end = pe.vaddr.checked_add(len).ok_or_else(|| bad(format!("entry {:#x} wraps", pe.vaddr)))?;
        out.push((pe, len));
    }
    Ok((start, head, pages_id, out))
}

/// One run of a full dump's pages image, in pagemap order, made from a lazy dump: pages CRIU
/// wrote into its pages image, or lazy pages still in the frozen process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageRun {
    /// The next `len` bytes of the lazy dump's pages image.
    Image { len: u64 },
    /// `len` bytes at `vaddr` of the process's memory.
    Memory { vaddr: u64, len: u64 },
}

/// What turns a lazy dump's images of one process into a full dump's: the pages image's
/// content as runs, and the pagemap with every lazy entry marked present as well (which is how
/// a full dump marks the pages a lazy restore may leave to its daemon).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LazyDumpPages {
    pub pages_file: String,
    pub runs: Vec<PageRun>,
    /// The rewritten `pagemap-<pid>.img`.
    pub pagemap: Vec<u8>,
}

impl LazyDumpPages {
    /// Bytes the runs read from memory.
    pub fn memory_bytes(&self) -> u64 {
        self.runs.iter().map(|r| if let PageRun::Memory { len, .. } = r { *len } else { 0 }).sum()
    }
}

/// `pagemap_entry`, every field (for rewriting one).
#[derive(Clone, PartialEq, Message)]
struct FullPagemapEntry {
    #[prost(uint64, required, tag = "1")]
    vaddr: u64,
    #[prost(uint32, required, tag = "2")]
    compat_nr_pages: u32,
    /// Before `PE_PARENT`: the pages are in the parent checkpoint's images.
    #[prost(bool, optional, tag = "3")]
    in_parent: Option<bool>,
    #[prost(uint32, optional, tag = "4")]
    flags: Option<u32>,
    #[prost(uint64, optional, tag = "5")]
    nr_pages: Option<u64>,
}

/// The full-dump form of process `pid`'s pages in a lazy dump's images (`None`: no pagemap, a
/// zombie).
pub fn complete_lazy_dump(dir: &Path, pid: u32) -> Result<Option<LazyDumpPages>, LazyError> {
    let name = format!("pagemap-{pid}.img");
    match read_image(dir, &name, PAGEMAP_MAGIC)? {
        Some(data) => parse_lazy_dump(&name, &data).map(Some),
        None => Ok(None),
    }
}

/// As [`complete_lazy_dump`], from a pagemap image's bytes.
pub fn parse_lazy_dump(name: &str, data: &[u8]) -> Result<LazyDumpPages, LazyError> {
    let (start, head, pages_id, list) = checked_pagemap(name, data)?;
    let mut out = LazyDumpPages { pages_file: format!("pages-{pages_id}.img"), ..Default::default() };
    out.pagemap.extend_from_slice(&data[..start]);
    let put = |bytes: &[u8], out: &mut Vec<u8>| {
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    };
    put(head, &mut out.pagemap);
    for (mut pe, len) in list {
        let flags = pe.flags.unwrap_or(0);
        let run = if flags & PE_PRESENT != 0 {
            Some(PageRun::Image { len })
        } else if flags & PE_LAZY != 0 {
            pe.flags = Some(flags | PE_PRESENT);
            Some(PageRun::Memory { vaddr: pe.vaddr, len })
        } else {
            None
        };
        match (out.runs.last_mut(), run) {
            (Some(PageRun::Image { len: l }), Some(PageRun::Image { len })) => *l += len,
            (Some(PageRun::Memory { vaddr: a, len: l }), Some(PageRun::Memory { vaddr, len }))
                if *a + *l == vaddr =>
            {
                *l += len
            }
            (_, Some(r)) => out.runs.push(r),
            (_, None) => {}
        }
        put(&pe.encode_to_vec(), &mut out.pagemap);
    }
    Ok(out)
}

/// The lazy runs of a [`StoredPages`] plan as the pager's ranges: cut where the mappings of
/// `mm-<pid>.img` end, each inside a mapping the restore registers with userfaultfd.
pub fn stored_lazy_iovs(dir: &Path, pid: u32, plan: &StoredPages) -> Result<Vec<(u64, u64)>, LazyError> {
    let mut ranges = LazyRanges::default();
    for &(a, n, _) in &plan.lazy {
        ranges.add(a, a + n);
    }
    if ranges.is_empty() {
        return Ok(Vec::new());
    }
    split_at_mappings(&ranges, &layout(dir, pid)?)
        .map_err(|detail| LazyError::Images { image: format!("mm-{pid}.img"), detail })
}

/// The address space of process `pid` (`mm-<pid>.img`); empty if it has no mm image (a
/// zombie).
pub fn layout(dir: &Path, pid: u32) -> Result<Layout, LazyError> {
    let name = format!("mm-{pid}.img");
    match read_image(dir, &name, MM_MAGIC)? {
        Some(data) => parse_layout(&name, &data),
        None => Ok(Layout::default()),
    }
}

fn parse_layout(name: &str, data: &[u8]) -> Result<Layout, LazyError> {
    let bad = |detail: String| LazyError::Images { image: name.to_string(), detail };
    check_magic(name, data, MM_MAGIC)?;
    let mm: Vec<MmEntry> = decode(name, data)?;
    let mm = mm.into_iter().next().ok_or_else(|| bad("no mm entry".into()))?;
    if mm.vmas.len() > MAX_VMAS {
        return Err(bad(format!("{} mappings", mm.vmas.len())));
    }
    let mut out = Layout::default();
    for v in &mm.vmas {
        let (s, e) = (v.start, v.end);
        if e <= s || !s.is_multiple_of(PAGE_SIZE) || !e.is_multiple_of(PAGE_SIZE) {
            return Err(bad(format!("odd entry {s:#x}-{e:#x} (status {:#x})", v.status)));
        }
        if v.status & VMA_AREA_GUARD != 0 {
            out.guards.push((s, e));
        } else {
            out.mappings.push(Mapping { start: s, end: e, lazy: v.can_be_lazy() });
        }
    }
    out.mappings.sort_unstable_by_key(|m| m.start);
    for w in out.mappings.windows(2) {
        if w[0].end > w[1].start {
            return Err(bad(format!(
                "mappings {:#x}-{:#x} and {:#x}-{:#x} overlap",
                w[0].start, w[0].end, w[1].start, w[1].end
            )));
        }
    }
    out.guards.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(out.guards.len());
    for &(s, e) in &out.guards {
        match merged.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    // CRIU's restore installs each guard with madvise, which fails outside mapped memory.
    if let Some(&(s, e)) = merged.iter().find(|&&(s, e)| !out.mapped(s, e)) {
        return Err(bad(format!("guard region {s:#x}-{e:#x} outside the mappings")));
    }
    out.guards = merged;
    Ok(out)
}

/// The lazy ranges of process `pid`, cut where its mappings end: userfaultfd fills pages
/// within one mapping at a time. A lazy range outside every mapping, in a mapping the restore
/// does not register with userfaultfd, or over a guard region is an error.
pub fn lazy_iovs(dir: &Path, pid: u32) -> Result<Vec<(u64, u64)>, LazyError> {
    let ranges = lazy_ranges(dir, pid)?;
    if ranges.is_empty() {
        return Ok(Vec::new());
    }
    split_at_mappings(&ranges, &layout(dir, pid)?)
        .map_err(|detail| LazyError::Images { image: format!("mm-{pid}.img"), detail })
}

/// As [`lazy_iovs`], from the bytes of a pagemap and an mm image (the fuzz target's way in).
/// The result is sorted, disjoint, page aligned, each piece inside one mapping.
pub fn lazy_iovs_of(pagemap: &[u8], mm: &[u8]) -> Result<Vec<(u64, u64)>, LazyError> {
    let ranges = parse_lazy_ranges("pagemap", pagemap)?;
    let layout = parse_layout("mm", mm)?;
    split_at_mappings(&ranges, &layout).map_err(|detail| LazyError::Images { image: "mm".into(), detail })
}

fn split_at_mappings(ranges: &LazyRanges, layout: &Layout) -> Result<Vec<(u64, u64)>, String> {
    let mut out = Vec::new();
    for (mut start, end) in ranges.iter() {
        if let Some((gs, ge)) = layout.guard_in(start, end) {
            return Err(format!("lazy pages {start:#x}-{end:#x} over guard region {gs:#x}-{ge:#x}"));
        }
        while start < end {
            let Some(m) = layout.mapping_at(start) else {
                return Err(format!("lazy page {start:#x} lies in no mapping"));
            };
            if !m.lazy {
                return Err(format!(
                    "lazy page {start:#x} lies in mapping {:#x}-{:#x}, which a lazy restore does not \
                     register with userfaultfd",
                    m.start, m.end
                ));
            }
            let piece = end.min(m.end);
            out.push((start, piece));
            start = piece;
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_cover() {
        let mut r = LazyRanges::default();
        r.add(0x1000, 0x3000);
        r.add(0x3000, 0x5000);
        r.add(0x8000, 0x9000);
        assert_eq!(r.bytes(), 0x5000);
        assert!(r.covers(0x1000, 0x5000));
        assert!(r.covers(0x2000, 0x3000));
        assert!(!r.covers(0x4000, 0x6000));
        assert!(!r.covers(0x0, 0x1000));
        assert!(r.covers(0x8000, 0x9000));
        assert!(!r.covers(0x8000, 0xa000));
    }

    /// A pagemap image: magic, head, then `(vaddr, pages, flags)` entries.
    fn pagemap(pages_id: u32, entries: &[(u64, u64, u32)]) -> Vec<u8> {
        let mut out = PAGEMAP_MAGIC.to_le_bytes().to_vec();
        let mut put = |b: Vec<u8>| {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(&b);
        };
        put(PagemapHead { pages_id }.encode_to_vec());
        for &(vaddr, n, flags) in entries {
            put(FullPagemapEntry {
                vaddr,
                compat_nr_pages: n as u32,
                in_parent: None,
                flags: Some(flags),
                nr_pages: Some(n),
            }
            .encode_to_vec());
        }
        out
    }

    /// A lazy dump's pagemap becomes the full dump's: its runs say where each page comes
    /// from, and the rewritten pagemap places them where the restore's plan finds them.
    #[test]
    fn a_lazy_dump_pagemap_becomes_a_full_one() {
        let p = PAGE_SIZE;
        let lazy = pagemap(
            3,
            &[
                (0x1000, 2, PE_PRESENT),
                (0x3000, 3, PE_LAZY),
                (0x6000, 1, PE_LAZY),
                (0x10000, 1, PE_PRESENT),
                (0x20000, 4, 0),
            ],
        );
        let done = parse_lazy_dump("pagemap-1.img", &lazy).unwrap();
        assert_eq!(done.pages_file, "pages-3.img");
        assert_eq!(
            done.runs,
            vec![
                PageRun::Image { len: 2 * p },
                PageRun::Memory { vaddr: 0x3000, len: 4 * p },
                PageRun::Image { len: p }
            ]
        );
        assert_eq!(done.memory_bytes(), 4 * p);
        // Read back as a full dump: the lazy runs follow the two pages CRIU wrote.
        let plan = parse_stored_pages("pagemap-1.img", &done.pagemap).unwrap();
        assert_eq!(plan.pages_file, "pages-3.img");
        assert_eq!(plan.lazy, vec![(0x3000, 4 * p, 2 * p)]);
        assert_eq!(plan.eager, vec![(0, 2 * p), (6 * p, p)]);
        assert_eq!(plan.offset_of(0x5000, p), Some(4 * p));
        assert_eq!(plan.offset_of(0x6000, 2 * p), None, "past the run");
        // A full dump's pagemap is its own completion: nothing left in memory.
        assert_eq!(parse_lazy_dump("p", &done.pagemap).unwrap().memory_bytes(), 0);
    }

    #[test]
    fn pagemaps_naming_a_parent_or_disordered_are_refused() {
        for entries in [
            &[(0x1000u64, 1u64, PE_PRESENT | PE_PARENT)][..],
            &[(0x5000, 1, PE_PRESENT), (0x1000, 1, PE_PRESENT)][..],
            &[(0x1001, 1, PE_PRESENT)][..],
        ] {
            let img = pagemap(1, entries);
            assert!(parse_lazy_dump("p", &img).is_err(), "{entries:?}");
            assert!(parse_stored_pages("p", &img).is_err(), "{entries:?}");
        }
    }

    /// Real images of CRIU 4.2.1 lazy dumps (the fuzz target's seeds): an 8 MiB memhog, a
    /// 4 GiB one with its pagemap cut after 64 entries (one per MiB), a 64 MiB one with two
    /// threads dumped with ferry's patch 0003 (one entry per run of lazy pages), and the
    /// testkit's `guarded` workload (8 MiB, two threads; patch 0003) with four guard regions.
    #[test]
    fn real_lazy_dumps_parse() {
        for (seed, min) in [
            (
                &include_bytes!("../../../fuzz/corpus/lazy_images/guarded-8m-threads")[..],
                (8u64 << 20) - 2 * PAGE_SIZE,
            ),
            (&include_bytes!("../../../fuzz/corpus/lazy_images/memhog-8m")[..], 8u64 << 20),
            (&include_bytes!("../../../fuzz/corpus/lazy_images/memhog-4g")[..], 32 << 20),
            (&include_bytes!("../../../fuzz/corpus/lazy_images/memhog-64m-threads-runs")[..], 64 << 20),
        ] {
            let (pagemap, mm) = split_seed(seed);
            let iovs = lazy_iovs_of(pagemap, mm).unwrap();
            let bytes: u64 = iovs.iter().map(|(s, e)| e - s).sum();
            assert!(bytes >= min, "{bytes} lazy bytes");
            assert!(iovs.windows(2).all(|w| w[0].1 <= w[1].0));
            assert!(lazy_iovs_of(mm, pagemap).is_err(), "images swapped: wrong magic");
        }
    }

    fn split_seed(seed: &[u8]) -> (&[u8], &[u8]) {
        let n = u32::from_le_bytes(seed[..4].try_into().unwrap()) as usize;
        seed[4..].split_at(n)
    }

    /// An mm image holding `vmas` (start, end, flags, status), as CRIU writes one.
    fn mm_image(vmas: &[(u64, u64, u32, u32)]) -> Vec<u8> {
        let mm = MmEntry {
            vmas: vmas
                .iter()
                .map(|&(start, end, flags, status)| VmaEntry { start, end, flags, status })
                .collect(),
        };
        let body = mm.encode_to_vec();
        let mut out = ferry_criu::image::IMG_COMMON_MAGIC.to_le_bytes().to_vec();
        out.extend_from_slice(&MM_MAGIC.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// CRIU 4.2 writes guard regions as entries of the mm image with the status
    /// `VMA_AREA_GUARD`, after the mappings, lying inside the mappings they guard. The seed:
    /// one at the start and one in the middle of the `guarded` workload's 8 MiB buffer, one at
    /// the bottom of each of its two threads' 8 MiB stacks (the kernel merged adjacent ones of
    /// those mappings into one). They are guards, not mappings, and the lazy pages go around
    /// them.
    #[test]
    fn guard_regions_are_not_mappings() {
        let (pagemap, mm) = split_seed(include_bytes!("../../../fuzz/corpus/lazy_images/guarded-8m-threads"));
        let layout = parse_layout("mm", mm).unwrap();
        assert_eq!(layout.guards.len(), 4, "{layout:?}");
        for &(s, e) in &layout.guards {
            assert_eq!(e - s, PAGE_SIZE);
            let m = layout.mapping_at(s).unwrap();
            assert!(m.lazy && m.end - m.start >= 8 << 20, "a guard inside an 8 MiB anonymous mapping: {m:?}");
        }
        let iovs = lazy_iovs_of(pagemap, mm).unwrap();
        assert!(iovs.iter().all(|&(s, e)| layout.guard_in(s, e).is_none()), "lazy pages over a guard");

        // The same layout, made up: mappings (sorted or not), guards after them, overlapping.
        let anon = MAP_PRIVATE | MAP_ANONYMOUS;
        let regular = 1 | (1 << 9);
        let img = mm_image(&[
            (0x10000, 0x20000, anon, regular),
            (0x1000, 0x3000, 0x02, regular | (1 << 6)), // a private file mapping
            (0x10000, 0x11000, 0, VMA_AREA_GUARD),
            (0x18000, 0x19000, 0, VMA_AREA_GUARD),
            (0x17000, 0x18000, 0, VMA_AREA_GUARD),
        ]);
        let l = parse_layout("mm", &img).unwrap();
        assert_eq!(
            l.mappings,
            vec![Mapping { start: 0x1000, end: 0x3000, lazy: false }, anon_m(0x10000, 0x20000)]
        );
        assert_eq!(l.guards, vec![(0x10000, 0x11000), (0x17000, 0x19000)]);
        // Mappings may not overlap each other, nor may a guard lie outside them.
        let bad = mm_image(&[(0x10000, 0x20000, anon, regular), (0x1f000, 0x21000, anon, regular)]);
        assert!(parse_layout("mm", &bad).is_err(), "overlapping mappings");
        let bad = mm_image(&[(0x10000, 0x20000, anon, regular), (0x1f000, 0x21000, 0, VMA_AREA_GUARD)]);
        assert!(parse_layout("mm", &bad).is_err(), "a guard reaching past its mapping");
        let good = mm_image(&[
            (0x10000, 0x20000, anon, regular),
            (0x20000, 0x30000, anon, regular),
            (0x1f000, 0x21000, 0, VMA_AREA_GUARD),
        ]);
        assert!(parse_layout("mm", &good).is_ok(), "a guard over two adjacent mappings");
    }

    fn anon_m(start: u64, end: u64) -> Mapping {
        Mapping { start, end, lazy: true }
    }

    #[test]
    fn lazy_ranges_are_cut_at_mapping_ends() {
        let mut r = LazyRanges::default();
        r.add(0x1000, 0x6000);
        r.add(0x8000, 0x9000);
        let layout = Layout {
            mappings: vec![anon_m(0x0, 0x3000), anon_m(0x3000, 0x7000), anon_m(0x8000, 0xa000)],
            guards: vec![],
        };
        assert_eq!(
            split_at_mappings(&r, &layout).unwrap(),
            vec![(0x1000, 0x3000), (0x3000, 0x6000), (0x8000, 0x9000)]
        );
        let short = Layout { mappings: vec![anon_m(0x0, 0x3000)], guards: vec![] };
        assert!(split_at_mappings(&r, &short).is_err(), "a lazy page outside every mapping");
        let mut locked = layout.clone();
        locked.mappings[1].lazy = false;
        assert!(split_at_mappings(&r, &locked).is_err(), "a lazy page where the restore registers none");
        let mut guarded = layout;
        guarded.guards.push((0x5000, 0x6000));
        assert!(split_at_mappings(&r, &guarded).is_err(), "a lazy page over a guard");
    }
}

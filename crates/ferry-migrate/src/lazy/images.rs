//! What the page source needs from a lazy dump's images: the processes of `pstree.img` and, per
//! process, the ranges its `pagemap-<pid>.img` marks lazy (`PE_LAZY`: left out of the images,
//! still in the frozen task). Images are hostile input: sizes and counts are capped.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use ferry_criu::image::{entries, header, MAX_IMAGE};
use prost::Message;

use super::proto::{PAGE_SIZE, PE_LAZY, PE_PRESENT};
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

/// The mappings of process `pid` (`mm-<pid>.img`), as sorted, disjoint `(start, end)` pairs;
/// empty if it has no mm image (a zombie).
pub fn vmas(dir: &Path, pid: u32) -> Result<Vec<(u64, u64)>, LazyError> {
    let name = format!("mm-{pid}.img");
    match read_image(dir, &name, MM_MAGIC)? {
        Some(data) => parse_vmas(&name, &data),
        None => Ok(Vec::new()),
    }
}

fn parse_vmas(name: &str, data: &[u8]) -> Result<Vec<(u64, u64)>, LazyError> {
    let bad = |detail: String| LazyError::Images { image: name.to_string(), detail };
    check_magic(name, data, MM_MAGIC)?;
    let mm: Vec<MmEntry> = decode(name, data)?;
    let mm = mm.into_iter().next().ok_or_else(|| bad("no mm entry".into()))?;
    if mm.vmas.len() > MAX_VMAS {
        return Err(bad(format!("{} mappings", mm.vmas.len())));
    }
    let mut out: Vec<(u64, u64)> = mm.vmas.iter().map(|v| (v.start, v.end)).collect();
    out.sort_unstable();
    for (i, &(s, e)) in out.iter().enumerate() {
        let overlaps = i > 0 && out[i - 1].1 > s;
        if e <= s || !s.is_multiple_of(PAGE_SIZE) || !e.is_multiple_of(PAGE_SIZE) || overlaps {
            return Err(bad(format!("odd mapping {s:#x}-{e:#x}")));
        }
    }
    Ok(out)
}

/// The lazy ranges of process `pid`, cut where its mappings end: userfaultfd fills pages
/// within one mapping at a time. A lazy range outside every mapping is an error.
pub fn lazy_iovs(dir: &Path, pid: u32) -> Result<Vec<(u64, u64)>, LazyError> {
    let ranges = lazy_ranges(dir, pid)?;
    if ranges.is_empty() {
        return Ok(Vec::new());
    }
    split_at_vmas(&ranges, &vmas(dir, pid)?)
        .map_err(|detail| LazyError::Images { image: format!("mm-{pid}.img"), detail })
}

/// As [`lazy_iovs`], from the bytes of a pagemap and an mm image (the fuzz target's way in).
/// The result is sorted, disjoint, page aligned, each piece inside one mapping.
pub fn lazy_iovs_of(pagemap: &[u8], mm: &[u8]) -> Result<Vec<(u64, u64)>, LazyError> {
    let ranges = parse_lazy_ranges("pagemap", pagemap)?;
    let vmas = parse_vmas("mm", mm)?;
    split_at_vmas(&ranges, &vmas).map_err(|detail| LazyError::Images { image: "mm".into(), detail })
}

fn split_at_vmas(ranges: &LazyRanges, vmas: &[(u64, u64)]) -> Result<Vec<(u64, u64)>, String> {
    let mut out = Vec::new();
    for (mut start, end) in ranges.iter() {
        while start < end {
            // The mapping holding `start`: the last one starting at or below it.
            let i = vmas.partition_point(|&(s, _)| s <= start);
            let Some(&(_, vma_end)) = i.checked_sub(1).map(|i| &vmas[i]).filter(|&&(_, e)| start < e) else {
                return Err(format!("lazy page {start:#x} lies in no mapping"));
            };
            let piece = end.min(vma_end);
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

    /// Real images of CRIU 4.2.1 lazy dumps (the fuzz target's seeds): an 8 MiB memhog, a
    /// 4 GiB one with its pagemap cut after 64 entries (one per MiB), and a 64 MiB one with two
    /// threads dumped with ferry's patch 0003 (one entry per run of lazy pages).
    #[test]
    fn real_lazy_dumps_parse() {
        for (seed, min) in [
            (&include_bytes!("../../../../fuzz/corpus/lazy_images/memhog-8m")[..], 8u64 << 20),
            (&include_bytes!("../../../../fuzz/corpus/lazy_images/memhog-4g")[..], 32 << 20),
            (&include_bytes!("../../../../fuzz/corpus/lazy_images/memhog-64m-threads-runs")[..], 64 << 20),
        ] {
            let n = u32::from_le_bytes(seed[..4].try_into().unwrap()) as usize;
            let (pagemap, mm) = seed[4..].split_at(n);
            let iovs = lazy_iovs_of(pagemap, mm).unwrap();
            let bytes: u64 = iovs.iter().map(|(s, e)| e - s).sum();
            assert!(bytes >= min, "{bytes} lazy bytes");
            assert!(iovs.windows(2).all(|w| w[0].1 <= w[1].0));
            assert!(lazy_iovs_of(mm, pagemap).is_err(), "images swapped: wrong magic");
        }
    }

    #[test]
    fn lazy_ranges_are_cut_at_mapping_ends() {
        let mut r = LazyRanges::default();
        r.add(0x1000, 0x6000);
        r.add(0x8000, 0x9000);
        let vmas = [(0x0, 0x3000), (0x3000, 0x7000), (0x8000, 0xa000)];
        assert_eq!(
            split_at_vmas(&r, &vmas).unwrap(),
            vec![(0x1000, 0x3000), (0x3000, 0x6000), (0x8000, 0x9000)]
        );
        assert!(split_at_vmas(&r, &[(0x0, 0x3000)]).is_err(), "a lazy page outside every mapping");
    }
}

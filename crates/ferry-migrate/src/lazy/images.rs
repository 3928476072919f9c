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
    let Some(data) = read_image(dir, &name, PAGEMAP_MAGIC)? else {
        return Ok(LazyRanges::default());
    };
    let bad = |detail: String| LazyError::Images { image: name.clone(), detail };
    let (_, start) = header(&data).map_err(|e| bad(e.to_string()))?;
    let raw = entries(&data, start).map_err(|e| bad(e.to_string()))?;
    let mut out = LazyRanges::default();
    let mut total = 0u64;
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
        let end = pe
            .vaddr
            .checked_add(pages * PAGE_SIZE)
            .ok_or_else(|| bad(format!("entry {:#x} wraps", pe.vaddr)))?;
        out.add(pe.vaddr, end);
    }
    Ok(out)
}

#[cfg(test)]
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
}

//! A checkpoint's working set: the pages a lazy restore of it had to fetch on demand, in the
//! order the restored tree faulted on them (`STORE/hints/ID.ws`, ID the manifest's id). The
//! next lazy restore of the same checkpoint pushes these first, in that order, so that its
//! first requests do not wait on one fault after another (REAP's record-and-prefetch).
//!
//! It is a hint, not data: it names addresses only, is neither sealed nor signed, and a wrong
//! one costs time, never integrity (every page it names is read through the store and checked
//! like any other; a page it names that is not a lazy page of the checkpoint is skipped). So it
//! is read as hostile input all the same: a version, a size cap, a count cap, exact length.
//!
//! Layout (little-endian): magic `FERRYWS1`, version u32, count u32, the manifest id (16
//! bytes), then `count` runs of 16 bytes: pid u32 (in the images), pages u32, address u64.

/// Current version of the file.
pub const WS_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"FERRYWS1";
const HEADER: usize = 8 + 4 + 4 + 16;
const RUN: usize = 16;
/// At most this many runs (512 KiB of file).
pub const MAX_RUNS: usize = 32 * 1024;
/// At most this many pages in one run (4 MiB).
pub const MAX_RUN_PAGES: u32 = 1024;
const PAGE: u64 = 4096;
/// The file's size cap.
pub const MAX_WS_BYTES: usize = HEADER + MAX_RUNS * RUN;

/// Pages `[vaddr, vaddr + pages * 4096)` of process `pid` (its pid in the images).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Run {
    pub pid: u32,
    pub vaddr: u64,
    pub pages: u32,
}

/// The file for checkpoint `id` holding `runs` (the first [`MAX_RUNS`]; runs over
/// [`MAX_RUN_PAGES`] or not page-aligned are left out).
pub fn encode(id: &[u8; 16], runs: &[Run]) -> Vec<u8> {
    let kept: Vec<&Run> = runs.iter().filter(|r| valid(r)).take(MAX_RUNS).collect();
    let mut out = Vec::with_capacity(HEADER + kept.len() * RUN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&WS_VERSION.to_le_bytes());
    out.extend_from_slice(&(kept.len() as u32).to_le_bytes());
    out.extend_from_slice(id);
    for r in kept {
        out.extend_from_slice(&r.pid.to_le_bytes());
        out.extend_from_slice(&r.pages.to_le_bytes());
        out.extend_from_slice(&r.vaddr.to_le_bytes());
    }
    out
}

fn valid(r: &Run) -> bool {
    r.pages >= 1
        && r.pages <= MAX_RUN_PAGES
        && r.vaddr.is_multiple_of(PAGE)
        && r.vaddr.checked_add(u64::from(r.pages) * PAGE).is_some()
}

/// The runs of a working-set file, if it is one of this version, for checkpoint `id`, and
/// within every cap.
pub fn decode(data: &[u8], id: &[u8; 16]) -> Result<Vec<Run>, String> {
    if data.len() > MAX_WS_BYTES {
        return Err(format!("{} bytes, over the cap of {MAX_WS_BYTES}", data.len()));
    }
    if data.len() < HEADER || &data[..8] != MAGIC {
        return Err("not a working-set file".into());
    }
    let word = |at: usize| u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
    let version = word(8);
    if version != WS_VERSION {
        return Err(format!("version {version} (this ferry reads {WS_VERSION})"));
    }
    let count = word(12) as usize;
    if count > MAX_RUNS {
        return Err(format!("{count} runs, over the cap of {MAX_RUNS}"));
    }
    if data[16..32] != id[..] {
        return Err("it is another checkpoint's".into());
    }
    if data.len() != HEADER + count * RUN {
        return Err(format!("{} bytes for {count} runs", data.len()));
    }
    let mut runs = Vec::with_capacity(count);
    for rec in data[HEADER..].chunks_exact(RUN) {
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&rec[8..16]);
        let r = Run {
            pid: u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]),
            pages: u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]),
            vaddr: u64::from_le_bytes(addr),
        };
        if !valid(&r) {
            return Err(format!("a run that is no run of pages: {r:?}"));
        }
        runs.push(r);
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_caps_and_refusals() {
        let id = [7u8; 16];
        let runs =
            vec![Run { pid: 1, vaddr: 0x7f00_0000_0000, pages: 16 }, Run { pid: 2, vaddr: 0x1000, pages: 1 }];
        let file = encode(&id, &runs);
        assert_eq!(decode(&file, &id), Ok(runs.clone()));
        assert!(decode(&file, &[8u8; 16]).expect_err("other id").contains("another"));
        assert!(decode(&file[..file.len() - 1], &id).is_err(), "a cut file");
        let mut bumped = file.clone();
        bumped[8] = 2;
        assert!(decode(&bumped, &id).expect_err("version").contains("version 2"));
        let mut bad_run = file.clone();
        bad_run[HEADER + 8] = 1; // an address that is not page-aligned
        assert!(decode(&bad_run, &id).is_err());
        assert!(decode(&vec![0; MAX_WS_BYTES + 1], &id).expect_err("cap").contains("cap"));

        // Writing leaves out what reading would refuse, and stops at the cap.
        let odd =
            [Run { pid: 1, vaddr: 0x1001, pages: 1 }, Run { pid: 1, vaddr: 0, pages: MAX_RUN_PAGES + 1 }];
        assert_eq!(decode(&encode(&id, &odd), &id), Ok(Vec::new()));
        let many = vec![Run { pid: 1, vaddr: 0, pages: 1 }; MAX_RUNS + 5];
        assert_eq!(decode(&encode(&id, &many), &id).map(|r| r.len()), Ok(MAX_RUNS));
    }
}

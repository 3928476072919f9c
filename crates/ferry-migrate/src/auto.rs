//! `--strategy auto`: measure what decides the downtime, then pick.
//!
//! - Memory: the tree's resident size.
//! - Dirty rate: this kernel has no soft-dirty tracking, so ferry samples pages of the root's
//!   writable anonymous mappings through /proc/PID/mem, twice, 250 ms apart, and counts those
//!   whose content changed (an underestimate when a page is written with the same bytes).
//! - Link speed: 4 MiB echoed by the target over the authenticated channel.
//!
//! Stop-copy and pre-copy both dump and restore all memory inside the freeze (pre-copy only
//! saves sending the chunks the target already has); post-copy freezes only for the
//! non-memory state, at the cost of a workload that depends on the source until its last page
//! has arrived. So: stop-copy when the memory is small, pre-copy when the whole freeze is
//! short anyway and little memory changes, post-copy otherwise.

use std::collections::hash_map::DefaultHasher;
use std::fs::File;
use std::hash::Hasher;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::api::Strategy;

/// Pages sampled for the dirty rate.
const SAMPLES: usize = 512;
const SAMPLE_GAP: Duration = Duration::from_millis(250);
/// Rates measured on this kind of machine (bench/README.md): CRIU's dump with ferry's sealing,
/// and materialize + restore, per byte of memory.
const DUMP_BYTES_PER_S: f64 = 700e6;
const RESTORE_BYTES_PER_S: f64 = 700e6;
/// Non-memory work of a freeze (dump, ship and restore of the other images).
const FIXED_FREEZE_S: f64 = 0.3;
/// Below this, a full copy while frozen is quick enough whatever the rest.
const SMALL: u64 = 64 << 20;
/// Pre-copy only when its freeze is expected below this and little memory changes.
const PRECOPY_MAX_FREEZE_S: f64 = 1.0;
const PRECOPY_MAX_DIRTY: f64 = 0.05;

/// What auto measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    pub memory: u64,
    /// Fraction of the sampled memory rewritten per second.
    pub dirty_per_s: f64,
    /// Bytes per second to the target.
    pub link_bytes_per_s: f64,
}

/// The strategy for `measured`, and why (numbers included).
pub fn decide(m: &Measured) -> (Strategy, String) {
    let mib = m.memory as f64 / (1u64 << 20) as f64;
    let link = m.link_bytes_per_s.max(1.0);
    let full_freeze = FIXED_FREEZE_S
        + m.memory as f64 / DUMP_BYTES_PER_S
        + m.memory as f64 / link
        + m.memory as f64 / RESTORE_BYTES_PER_S;
    // Pre-copy sends what changed between its first checkpoint and the freeze (about as long
    // as the first checkpoint takes to dump and send).
    let window = m.memory as f64 / DUMP_BYTES_PER_S + m.memory as f64 / link;
    let changed = (m.dirty_per_s * window).min(1.0);
    let pre_freeze = FIXED_FREEZE_S
        + m.memory as f64 / DUMP_BYTES_PER_S
        + changed * m.memory as f64 / link
        + m.memory as f64 / RESTORE_BYTES_PER_S;
    // Post-copy's price: the workload depends on the source until every page has crossed
    // (pushed at about link speed, docs/migration.md).
    let pages_s = m.memory as f64 / link;
    let facts = format!(
        "{mib:.0} MiB resident, {:.1}% of it rewritten per second, link {:.0} MiB/s; expected freeze: stop-copy {full_freeze:.2} s, pre-copy {pre_freeze:.2} s, post-copy ~{FIXED_FREEZE_S:.1} s then ~{pages_s:.1} s of pages from the source",
        m.dirty_per_s * 100.0,
        link / (1u64 << 20) as f64
    );
    if m.memory < SMALL {
        (Strategy::StopCopy, format!("auto: small memory, copied while frozen ({facts})"))
    } else if pre_freeze <= PRECOPY_MAX_FREEZE_S && m.dirty_per_s <= PRECOPY_MAX_DIRTY {
        (Strategy::PreCopy, format!("auto: short freeze with little memory changing ({facts})"))
    } else {
        (Strategy::PostCopy, format!("auto: memory follows after the switch ({facts})"))
    }
}

/// Fraction of `pid`'s writable private memory rewritten per second (sampled); 0 if it cannot
/// be read.
pub fn dirty_rate(pid: i32) -> f64 {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { return 0.0 };
    let ranges: Vec<(u64, u64)> = maps
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let path = f.nth(3).unwrap_or("");
            if !perms.starts_with("rw") || !perms.ends_with('p') || !(path.is_empty() || path == "[heap]") {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some((u64::from_str_radix(a, 16).ok()?, u64::from_str_radix(b, 16).ok()?))
        })
        .collect();
    let total_pages: u64 = ranges.iter().map(|(a, b)| (b - a) / 4096).sum();
    if total_pages == 0 {
        return 0.0;
    }
    let Ok(mem) = File::open(format!("/proc/{pid}/mem")) else { return 0.0 };
    let mut seed = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) | 1;
    let pages: Vec<u64> = (0..SAMPLES)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut k = seed % total_pages;
            for (a, b) in &ranges {
                let n = (b - a) / 4096;
                if k < n {
                    return a + k * 4096;
                }
                k -= n;
            }
            ranges[0].0
        })
        .collect();
    let sample = |mem: &File| -> Vec<Option<u64>> {
        let mut buf = vec![0u8; 4096];
        pages
            .iter()
            .map(|&addr| {
                mem.read_exact_at(&mut buf, addr).ok()?;
                let mut h = DefaultHasher::new();
                h.write(&buf);
                Some(h.finish())
            })
            .collect()
    };
    let t = Instant::now();
    let first = sample(&mem);
    std::thread::sleep(SAMPLE_GAP);
    let second = sample(&mem);
    let secs = t.elapsed().as_secs_f64().max(1e-3);
    let (mut read, mut changed) = (0usize, 0usize);
    for (a, b) in first.iter().zip(&second) {
        if let (Some(a), Some(b)) = (a, b) {
            read += 1;
            changed += usize::from(a != b);
        }
    }
    if read == 0 {
        return 0.0;
    }
    changed as f64 / read as f64 / secs
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_memory_is_copied_while_frozen() {
        let (s, why) = decide(&Measured { memory: 16 * MIB, dirty_per_s: 0.5, link_bytes_per_s: 100e6 });
        assert_eq!(s, Strategy::StopCopy);
        assert!(why.contains("16 MiB"), "{why}");
    }

    #[test]
    fn moderate_quiet_memory_on_a_fast_link_is_pre_copied() {
        let (s, why) = decide(&Measured { memory: 100 * MIB, dirty_per_s: 0.01, link_bytes_per_s: 1e9 });
        assert_eq!(s, Strategy::PreCopy, "{why}");
    }

    #[test]
    fn large_or_busy_memory_is_post_copied() {
        let big = decide(&Measured { memory: 1024 * MIB, dirty_per_s: 0.0, link_bytes_per_s: 1e9 });
        assert_eq!(big.0, Strategy::PostCopy, "{}", big.1);
        let busy = decide(&Measured { memory: 100 * MIB, dirty_per_s: 0.2, link_bytes_per_s: 1e9 });
        assert_eq!(busy.0, Strategy::PostCopy, "{}", busy.1);
        let slow = decide(&Measured { memory: 200 * MIB, dirty_per_s: 0.02, link_bytes_per_s: 10e6 });
        assert_eq!(slow.0, Strategy::PostCopy, "{}", slow.1);
        // The reason gives post-copy's price too: 200 MiB over 10 MB/s take about 21 s.
        assert!(slow.1.contains("then ~21.0 s of pages from the source"), "{}", slow.1);
    }

    #[test]
    fn own_quiet_memory_measures_near_zero() {
        let keep = vec![7u8; 8 << 20];
        let rate = dirty_rate(std::process::id() as i32);
        assert!((0.0..=4.0).contains(&rate), "{rate}");
        drop(keep);
    }
}

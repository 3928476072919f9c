//! Post-copy pages pushed ahead of demand. Right after the switch the target's daemon asks
//! the source for each page the workload touches (one round trip per fault) and fetches the
//! rest in the background, in pieces that shrink to 64 KiB after every fault: a workload that
//! keeps writing makes the transfer crawl (1 GiB rewriting 10 %/s took 13 to 15 s, 4 GiB did
//! not finish in minutes). So the source also streams every lazy page, in address order, on a
//! connection of its own (`PagesPush`), and the target keeps what arrives in a bounded
//! [`PushCache`]; the daemon's requests are answered from it when they can be, from the
//! source otherwise. The source's tree is frozen: a page pushed and a page fetched are the
//! same bytes.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::lazy::PAGE_SIZE;

/// Pages per pushed frame (1 MiB).
pub(crate) const PUSH_PAGES: u32 = 256;
/// Bytes of pushed pages the target holds that the daemon has not asked for yet; the push
/// waits (and TCP holds the source back) while it is full.
pub(crate) const CACHE_BYTES: usize = 256 << 20;

const PAGE: usize = PAGE_SIZE as usize;

/// A pushed run of pages, and which of them the daemon still needs.
struct Run {
    /// The frame as received; the pages start at `at` (no copy on the page path).
    frame: Vec<u8>,
    at: usize,
    wanted: Vec<bool>,
    left: usize,
}

impl Run {
    fn pages(&self) -> &[u8] {
        &self.frame[self.at..]
    }

    fn len(&self) -> usize {
        self.frame.len() - self.at
    }
}

#[derive(Default)]
struct State {
    /// (pid, start address) -> run.
    runs: BTreeMap<(u32, u64), Run>,
    bytes: usize,
    /// Per pid, the ranges the daemon has been given (merged): pushed pages in them are stale
    /// copies nobody will ask for.
    served: BTreeMap<u32, BTreeMap<u64, u64>>,
    closed: bool,
    /// The push may start (the workload runs at the target, its network up).
    begun: bool,
    hits: u64,
    misses: u64,
}

/// What the target holds of the pushed pages.
pub(crate) struct PushCache {
    state: Mutex<State>,
    room: Condvar,
    cap: usize,
}

impl PushCache {
    pub(crate) fn new(cap: usize) -> PushCache {
        PushCache { state: Mutex::new(State::default()), room: Condvar::new(), cap }
    }

    /// Lets the push start: not while the workload is being restored, which it would slow
    /// down (on one machine it competes for the same cores), only once it runs.
    pub(crate) fn begin(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.begun = true;
        }
        self.room.notify_all();
    }

    /// Waits until [`PushCache::begin`]; false if the cache was closed first.
    pub(crate) fn wait_begin(&self) -> bool {
        let Ok(mut st) = self.state.lock() else { return false };
        while !st.begun && !st.closed {
            st = match self.room.wait_timeout(st, Duration::from_millis(200)) {
                Ok((g, _)) => g,
                Err(_) => return false,
            };
        }
        !st.closed
    }

    /// Keeps `frame[at..]` (whole pages at `vaddr` of process `pid`), waiting while the cache
    /// is full. False once the cache is closed (nobody will read it any more).
    pub(crate) fn insert(&self, pid: u32, vaddr: u64, frame: Vec<u8>, at: usize) -> bool {
        let Ok(mut st) = self.state.lock() else { return false };
        while !st.closed && st.bytes >= self.cap {
            st = match self.room.wait_timeout(st, Duration::from_millis(200)) {
                Ok((g, _)) => g,
                Err(_) => return false,
            };
        }
        if st.closed {
            return false;
        }
        let len = frame.len().saturating_sub(at);
        let pages = len / PAGE;
        let mut wanted = vec![true; pages];
        if let Some(served) = st.served.get(&pid) {
            for (i, w) in wanted.iter_mut().enumerate() {
                let at = vaddr + (i * PAGE) as u64;
                if contains(served, at) {
                    *w = false;
                }
            }
        }
        let left = wanted.iter().filter(|w| **w).count();
        if left == 0 {
            return true;
        }
        st.bytes += len;
        st.runs.insert((pid, vaddr), Run { frame, at, wanted, left });
        true
    }

    /// Fills `out` with `nr_pages` pages at `vaddr` of `pid` if every one of them was pushed
    /// and not handed out before; true if it did. Either way the range counts as served.
    pub(crate) fn take(&self, pid: u32, vaddr: u64, nr_pages: u32, out: &mut Vec<u8>) -> bool {
        let Ok(mut st) = self.state.lock() else { return false };
        let end = vaddr + u64::from(nr_pages) * PAGE_SIZE;
        // The runs covering [vaddr, end), in order, each with the part it holds.
        let mut parts: Vec<((u32, u64), u64, u64)> = Vec::new();
        let mut at = vaddr;
        while at < end {
            let found = st
                .runs
                .range(..=(pid, at))
                .next_back()
                .filter(|((p, s), r)| *p == pid && at < s + r.len() as u64)
                .map(|(k, r)| (*k, k.1 + r.len() as u64));
            let Some((key, run_end)) = found else { break };
            let part_end = run_end.min(end);
            let run = &st.runs[&key];
            let first = ((at - key.1) / PAGE_SIZE) as usize;
            let last = ((part_end - key.1) / PAGE_SIZE) as usize;
            if !run.wanted[first..last].iter().all(|w| *w) {
                break;
            }
            parts.push((key, at, part_end));
            at = part_end;
        }
        let hit = at >= end;
        if hit {
            out.clear();
            for (key, from, to) in &parts {
                let run = &st.runs[key];
                let a = (from - key.1) as usize;
                let b = (to - key.1) as usize;
                out.extend_from_slice(&run.pages()[a..b]);
            }
            st.hits += 1;
        } else {
            st.misses += 1;
        }
        forget(&mut st, pid, vaddr, end);
        drop(st);
        self.room.notify_all();
        hit
    }

    /// No more reads: wakes and turns away the pusher; frees what is held.
    pub(crate) fn close(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.closed = true;
            st.runs.clear();
            st.bytes = 0;
        }
        self.room.notify_all();
    }

    /// (requests answered from the cache, requests that went to the source).
    pub(crate) fn counts(&self) -> (u64, u64) {
        self.state.lock().map(|s| (s.hits, s.misses)).unwrap_or((0, 0))
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.state.lock().map(|s| s.bytes).unwrap_or(0)
    }
}

/// Marks `[start, end)` of `pid` served: records it, and drops those pages from the runs.
fn forget(st: &mut State, pid: u32, start: u64, end: u64) {
    add_range(st.served.entry(pid).or_default(), start, end);
    let keys: Vec<(u32, u64)> = st
        .runs
        .range((pid, 0)..(pid, end))
        .filter(|((_, s), r)| s + (r.len() as u64) > start)
        .map(|(k, _)| *k)
        .collect();
    for key in keys {
        let Some(run) = st.runs.get_mut(&key) else { continue };
        let run_end = key.1 + run.len() as u64;
        let from = ((start.max(key.1) - key.1) / PAGE_SIZE) as usize;
        let to = ((end.min(run_end) - key.1) / PAGE_SIZE) as usize;
        for w in &mut run.wanted[from..to] {
            if *w {
                *w = false;
                run.left -= 1;
            }
        }
        if run.left == 0 {
            if let Some(r) = st.runs.remove(&key) {
                st.bytes -= r.len();
            }
        }
    }
}

/// Inserts `[start, end)` into a set of disjoint ranges (start -> end), merging neighbours.
fn add_range(set: &mut BTreeMap<u64, u64>, mut start: u64, mut end: u64) {
    if let Some((&s, &e)) = set.range(..=start).next_back() {
        if e >= start {
            start = s;
            end = end.max(e);
            set.remove(&s);
        }
    }
    let overlapping: Vec<u64> = set.range(start..=end).map(|(s, _)| *s).collect();
    for s in overlapping {
        if let Some(e) = set.remove(&s) {
            end = end.max(e);
        }
    }
    set.insert(start, end);
}

fn contains(set: &BTreeMap<u64, u64>, at: u64) -> bool {
    set.range(..=at).next_back().is_some_and(|(_, &e)| at < e)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pages(first: u8, n: usize) -> Vec<u8> {
        (0..n).flat_map(|i| vec![first.wrapping_add(i as u8); PAGE]).collect()
    }

    const A: u64 = 0x10_0000;

    #[test]
    fn pushed_pages_answer_requests_once() {
        let c = PushCache::new(1 << 30);
        assert!(c.insert(1, A, pages(10, 4), 0));
        let mut out = Vec::new();
        assert!(c.take(1, A + PAGE_SIZE, 2, &mut out));
        assert_eq!(out, pages(11, 2));
        // Handed out: never again (the daemon does not ask twice; a second answer would be stale).
        assert!(!c.take(1, A + PAGE_SIZE, 1, &mut out));
        // Another process's pages are not these.
        assert!(!c.take(2, A, 1, &mut out));
        assert!(c.take(1, A, 1, &mut out));
        assert_eq!(out, pages(10, 1));
        assert!(c.take(1, A + 3 * PAGE_SIZE, 1, &mut out));
        assert_eq!(c.held(), 0, "every page handed out: the run is gone");
        assert_eq!(c.counts(), (3, 2));
    }

    #[test]
    fn pages_are_kept_inside_the_frame_they_came_in() {
        let c = PushCache::new(1 << 30);
        let mut frame = vec![0xee; 12];
        frame.extend_from_slice(&pages(20, 2));
        assert!(c.insert(3, A, frame, 12));
        assert_eq!(c.held(), 2 * PAGE, "the head is not counted");
        let mut out = Vec::new();
        assert!(c.take(3, A + PAGE_SIZE, 1, &mut out));
        assert_eq!(out, pages(21, 1));
    }

    #[test]
    fn a_request_may_span_runs_but_not_a_gap() {
        let c = PushCache::new(1 << 30);
        c.insert(1, A, pages(0, 2), 0);
        c.insert(1, A + 2 * PAGE_SIZE, pages(2, 2), 0);
        let mut out = Vec::new();
        assert!(c.take(1, A + PAGE_SIZE, 2, &mut out));
        assert_eq!(out, pages(1, 2));
        c.insert(1, A + 6 * PAGE_SIZE, pages(6, 1), 0);
        assert!(!c.take(1, A + 3 * PAGE_SIZE, 4, &mut out), "pages 4 and 5 were never pushed");
    }

    #[test]
    fn pages_fetched_before_their_push_are_not_kept() {
        let c = PushCache::new(1 << 30);
        let mut out = Vec::new();
        // A fault fetched page 1 from the source before the push got there.
        assert!(!c.take(1, A + PAGE_SIZE, 1, &mut out));
        c.insert(1, A, pages(0, 2), 0);
        assert!(!c.take(1, A + PAGE_SIZE, 1, &mut out));
        assert!(c.take(1, A, 1, &mut out));
        assert_eq!(c.held(), 0);
        // A run made only of pages already served is not kept at all.
        c.insert(1, A, pages(0, 2), 0);
        assert_eq!(c.held(), 0);
    }

    #[test]
    fn a_full_cache_holds_the_push_until_pages_are_taken_or_it_closes() {
        let c = std::sync::Arc::new(PushCache::new(2 * PAGE));
        assert!(c.insert(1, A, pages(0, 2), 0));
        let pusher = {
            let c = c.clone();
            std::thread::spawn(move || c.insert(1, A + 2 * PAGE_SIZE, pages(2, 2), 0))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!pusher.is_finished(), "waits while full");
        let mut out = Vec::new();
        assert!(c.take(1, A, 2, &mut out));
        assert!(pusher.join().unwrap(), "room made");
        let blocked = {
            let c = c.clone();
            std::thread::spawn(move || c.insert(1, A + 8 * PAGE_SIZE, pages(8, 1), 0))
        };
        std::thread::sleep(Duration::from_millis(50));
        c.close();
        assert!(!blocked.join().unwrap(), "closed: turned away");
    }

    #[test]
    fn the_push_waits_for_its_start_or_the_close() {
        let c = std::sync::Arc::new(PushCache::new(1 << 20));
        let waiter = {
            let c = c.clone();
            std::thread::spawn(move || c.wait_begin())
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished());
        c.begin();
        assert!(waiter.join().unwrap());
        let c = std::sync::Arc::new(PushCache::new(1 << 20));
        let waiter = {
            let c = c.clone();
            std::thread::spawn(move || c.wait_begin())
        };
        c.close();
        assert!(!waiter.join().unwrap());
    }

    #[test]
    fn served_ranges_merge() {
        let mut set = BTreeMap::new();
        add_range(&mut set, 10, 20);
        add_range(&mut set, 30, 40);
        add_range(&mut set, 20, 30);
        assert_eq!(set.into_iter().collect::<Vec<_>>(), vec![(10, 40)]);
        let mut set = BTreeMap::new();
        add_range(&mut set, 30, 40);
        add_range(&mut set, 5, 35);
        add_range(&mut set, 50, 60);
        assert_eq!(set.into_iter().collect::<Vec<_>>(), vec![(5, 40), (50, 60)]);
        assert!(contains(&[(5u64, 40u64)].into_iter().collect(), 39));
        assert!(!contains(&[(5u64, 40u64)].into_iter().collect(), 40));
    }
}

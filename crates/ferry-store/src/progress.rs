//! How a long operation tells its caller how far it is. The libraries only count: an
//! operation names its stage (and how many bytes the stage moves, when that is known), then
//! reports the bytes done. Drawing is the binary's business (ferry's CLI draws a progress bar
//! on a terminal and nothing in a pipe), so no library depends on a terminal crate.
//!
//! It lives here, the lowest crate with a long operation (export, import), so that every verb
//! above it (checkpoint, restore, migration) reports through the same trait.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Where a long operation reports. Called from any thread, often (once per MiB or so): keep
/// it cheap.
pub trait Progress: Send + Sync + std::fmt::Debug {
    /// A new stage begins (`label`, e.g. "pages"), moving `total` bytes if known; the count
    /// starts again from zero.
    fn stage(&self, label: &str, total: Option<u64>);
    /// `bytes` more of the current stage are done.
    fn advance(&self, bytes: u64);
    /// The current stage moves `total` bytes after all (a [`Joint`] learns its total as its
    /// parts announce theirs); what was done stays counted.
    fn set_total(&self, total: u64) {
        let _ = total;
    }
}

/// Reports to no one.
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Progress for Silent {
    fn stage(&self, _label: &str, _total: Option<u64>) {}
    fn advance(&self, _bytes: u64) {}
}

/// A reporter to hold and hand to threads.
pub type SharedProgress = Arc<dyn Progress>;

/// The shared reporter that reports to no one.
pub fn silent() -> SharedProgress {
    Arc::new(Silent)
}

/// Several operations at once (a clone's replicas, restored side by side) on one display:
/// each reports to its own [`Joint::part`], and the display sees one stage, `label`, whose
/// total is the sum of the totals the parts announced so far (it grows as they reach their
/// later stages) and whose count is all their bytes.
#[derive(Debug)]
pub struct Joint {
    inner: SharedProgress,
    total: AtomicU64,
}

impl Joint {
    /// Starts stage `label` on `inner` (its total comes with the parts').
    pub fn new(inner: SharedProgress, label: &str) -> Arc<Joint> {
        inner.stage(label, None);
        Arc::new(Joint { inner, total: AtomicU64::new(0) })
    }

    /// The reporter of one of the operations.
    pub fn part(self: &Arc<Self>) -> SharedProgress {
        Arc::new(JointPart(self.clone()))
    }
}

#[derive(Debug)]
struct JointPart(Arc<Joint>);

impl Progress for JointPart {
    fn stage(&self, _label: &str, total: Option<u64>) {
        if let Some(t) = total {
            let all = self.0.total.fetch_add(t, Ordering::Relaxed) + t;
            self.0.inner.set_total(all);
        }
    }

    fn advance(&self, bytes: u64) {
        self.0.inner.advance(bytes);
    }
}

/// A reader that reports the bytes read through it.
#[derive(Debug)]
pub struct Counted<'p, R> {
    inner: R,
    progress: &'p dyn Progress,
}

impl<'p, R> Counted<'p, R> {
    pub fn new(inner: R, progress: &'p dyn Progress) -> Counted<'p, R> {
        Counted { inner, progress }
    }
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.progress.advance(n as u64);
        }
        Ok(n)
    }
}

/// Counts what an operation reports (tests, and callers that want the figures rather than a
/// display).
#[derive(Debug, Default)]
pub struct Tally {
    stages: std::sync::Mutex<Vec<(String, Option<u64>, u64)>>,
    done: AtomicU64,
}

impl Tally {
    /// Each stage so far: its label, its total as announced and the bytes reported for it.
    pub fn stages(&self) -> Vec<(String, Option<u64>, u64)> {
        let mut s = self.stages.lock().map(|s| s.clone()).unwrap_or_default();
        if let Some(last) = s.last_mut() {
            last.2 = self.done.load(Ordering::Relaxed);
        }
        s
    }
}

impl Progress for Tally {
    fn stage(&self, label: &str, total: Option<u64>) {
        if let Ok(mut s) = self.stages.lock() {
            let done = self.done.swap(0, Ordering::Relaxed);
            if let Some(last) = s.last_mut() {
                last.2 = done;
            }
            s.push((label.to_owned(), total, 0));
        }
    }

    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    fn set_total(&self, total: u64) {
        if let Some(last) = self.stages.lock().ok().as_mut().and_then(|s| s.last_mut()) {
            last.1 = Some(total);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing test should stop right there
mod tests {
    use super::*;

    #[test]
    fn a_counted_reader_reports_every_byte_it_reads() {
        let tally = Tally::default();
        tally.stage("copy", Some(10_000));
        let data = vec![7u8; 10_000];
        let mut out = Vec::new();
        Counted::new(&data[..], &tally).read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        assert_eq!(tally.stages(), vec![("copy".to_owned(), Some(10_000), 10_000)]);
    }

    #[test]
    fn a_joint_sums_its_parts_totals_and_bytes_into_one_stage() {
        let tally = Arc::new(Tally::default());
        let joint = Joint::new(tally.clone(), "replicas");
        let parts: Vec<SharedProgress> = (0..3).map(|_| joint.part()).collect();
        std::thread::scope(|s| {
            for p in &parts {
                s.spawn(move || {
                    p.stage("verify", Some(100));
                    p.advance(100);
                    p.stage("restore", None);
                    p.stage("pages", Some(1000));
                    for _ in 0..10 {
                        p.advance(100);
                    }
                });
            }
        });
        assert_eq!(tally.stages(), vec![("replicas".to_owned(), Some(3300), 3300)]);
    }

    #[test]
    fn each_stage_counts_from_zero() {
        let tally = Tally::default();
        tally.stage("a", None);
        tally.advance(5);
        tally.advance(6);
        tally.stage("b", Some(3));
        tally.advance(3);
        assert_eq!(tally.stages(), vec![("a".to_owned(), None, 11), ("b".to_owned(), Some(3), 3)]);
    }
}

//! The progress bar of a long operation: indicatif on stderr when stderr is a terminal, nothing
//! at all otherwise (a pipe, a file, a CI log), so that what scripts read (the one-line
//! summaries on stdout, errors on stderr) is the same either way.
//!
//! A command plugs in with two lines: `let bar = Bar::new("checkpoint");` and either
//! `context(cli)?.with_progress(bar.clone())` (verbs that take a `Context`) or `&*bar` where a
//! call takes a `&dyn Progress`; then `bar.finish()` before printing its summary. Operations
//! run side by side (a clone's replicas) share one bar through `ferry_runtime::Joint`:
//! `with_progress(Joint::new(bar.clone(), "replicas").part())` on the `Context` they share (or a
//! `part()` each): the bar then counts all their bytes against the sum of their totals.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_runtime::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Set when logs go to stderr (`-v`, `FERRY_LOG`): their lines and a bar would tear each other.
static LOGGING: AtomicBool = AtomicBool::new(false);

/// No bar is drawn from now on: stderr has log lines to show.
pub fn logs_on_stderr() {
    LOGGING.store(true, Ordering::Relaxed);
}

/// One operation's bar; its stages (from the library) replace each other on the same line.
pub struct Bar {
    bar: ProgressBar,
    /// The current stage's label (a migration's events repeat it with every update).
    stage: Mutex<String>,
    /// A stage without a total has counted bytes (its spinner shows them from then on).
    counting: AtomicBool,
}

impl std::fmt::Debug for Bar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bar").field("stage", &self.stage).field("hidden", &self.bar.is_hidden()).finish()
    }
}

impl Bar {
    /// A bar for `verb`, drawn on stderr if it is a terminal.
    pub fn new(verb: &str) -> Arc<Bar> {
        // A dumb terminal cannot redraw a line in place: it gets nothing, as a pipe does.
        let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
        let drawn = std::io::stderr().is_terminal() && !dumb && !LOGGING.load(Ordering::Relaxed);
        let target = if drawn { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        let bar = Bar::with_target(verb, target);
        if drawn {
            // A spinner turns while CRIU works alone (no bytes to count then).
            bar.bar.enable_steady_tick(Duration::from_millis(120));
        }
        bar
    }

    fn with_target(verb: &str, target: ProgressDrawTarget) -> Arc<Bar> {
        let bar = ProgressBar::with_draw_target(None, target);
        bar.set_style(spinner_style());
        bar.set_prefix(verb.to_owned());
        // Until the operation names its first stage (checks, opening the store).
        bar.set_message("starting");
        Arc::new(Bar { bar, stage: Mutex::new(String::new()), counting: AtomicBool::new(false) })
    }

    /// Where a stage stands when told in absolute figures (a migration's events): a stage
    /// of another label starts anew.
    pub fn show(&self, label: &str, done: u64, total: u64) {
        let same = self.stage.lock().map(|s| *s == label).unwrap_or(false);
        if !same {
            self.stage(label, Some(total));
        }
        self.bar.set_length(total);
        self.bar.set_position(done);
    }

    /// Runs `f` (which prints) with the bar out of the way; it is drawn again after.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    /// Removes the bar (before the command prints its summary, or its error).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Progress for Bar {
    fn stage(&self, label: &str, total: Option<u64>) {
        if let Ok(mut s) = self.stage.lock() {
            label.clone_into(&mut s);
        }
        self.bar.set_message(label.to_owned());
        match total {
            Some(t) => {
                self.bar.set_style(bytes_style());
                self.bar.set_length(t);
            }
            None => {
                self.bar.set_style(spinner_style());
                self.bar.unset_length();
            }
        }
        self.counting.store(false, Ordering::Relaxed);
        self.bar.set_position(0);
        // Rate, ETA and the time shown are the stage's own.
        self.bar.reset_eta();
        self.bar.reset_elapsed();
    }

    fn set_total(&self, total: u64) {
        if self.bar.length().is_none() {
            self.bar.set_style(bytes_style());
        }
        self.bar.set_length(total);
    }

    fn advance(&self, bytes: u64) {
        // Bytes without a total (CRIU writing a container's images): their count and rate.
        if self.bar.length().is_none() && !self.counting.swap(true, Ordering::Relaxed) {
            self.bar.set_style(counting_style());
        }
        self.bar.inc(bytes);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

fn bytes_style() -> ProgressStyle {
    ProgressStyle::with_template(
        // The bar takes what the figures leave of the terminal's width.
        "{spinner} {prefix} {msg} [{wide_bar}] {binary_bytes}/{binary_total_bytes}, {binary_bytes_per_sec}, ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

fn counting_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner} {prefix} {msg} {binary_bytes}, {binary_bytes_per_sec} ({elapsed})",
    )
    .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix} {msg} ({elapsed})")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing test should stop right there
mod tests {
    use super::*;

    fn hidden() -> Arc<Bar> {
        Bar::with_target("test", ProgressDrawTarget::hidden())
    }

    #[test]
    fn a_stage_with_a_total_counts_the_bytes_from_zero() {
        let b = hidden();
        b.stage("verify", Some(100));
        b.advance(60);
        b.stage("pages", Some(4 << 20));
        b.advance(1 << 20);
        b.advance(1 << 20);
        assert_eq!(b.bar.length(), Some(4 << 20));
        assert_eq!(b.bar.position(), 2 << 20);
        assert_eq!(b.bar.message(), "pages");
    }

    #[test]
    fn a_stage_without_a_total_is_a_spinner() {
        let b = hidden();
        b.stage("pages", Some(10));
        b.advance(10);
        b.stage("dump", None);
        assert_eq!(b.bar.length(), None);
        assert_eq!(b.bar.position(), 0);
        // Bytes of a stage without a total are counted all the same.
        b.advance(7);
        b.advance(8);
        assert_eq!((b.bar.length(), b.bar.position()), (None, 15));
        assert!(b.counting.load(Ordering::Relaxed));
        b.stage("commit", None);
        assert!(!b.counting.load(Ordering::Relaxed));
    }

    #[test]
    fn a_joint_of_operations_grows_the_total_of_one_stage() {
        let b = hidden();
        let joint = ferry_runtime::Joint::new(b.clone(), "copies");
        let (one, two) = (joint.part(), joint.part());
        assert_eq!(b.bar.length(), None, "a spinner until a total is known");
        one.stage("verify", Some(10));
        one.advance(10);
        two.stage("verify", Some(10));
        one.stage("restore", None);
        one.stage("pages", Some(100));
        one.advance(50);
        assert_eq!((b.bar.position(), b.bar.length()), (60, Some(120)));
        assert_eq!(b.bar.message(), "copies");
    }

    #[test]
    fn absolute_updates_keep_a_stage_and_start_the_next() {
        let b = hidden();
        b.show("transfer", 10, 100);
        b.show("transfer", 50, 120);
        assert_eq!((b.bar.position(), b.bar.length()), (50, Some(120)));
        b.show("pages", 5, 10);
        assert_eq!((b.bar.position(), b.bar.length(), b.bar.message()), (5, Some(10), "pages".into()));
    }
}

//! Waiting by polling: tests never assert how long something took, they wait for it to happen
//! within a generous limit.

use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long the kit waits for a workload to report, by default. Generous: the machines are
/// small and noisy, and a slow pass is better than a flaky failure.
pub const WAIT: Duration = Duration::from_secs(60);

const INTERVAL: Duration = Duration::from_millis(50);

/// Calls `check` every 50 ms until it returns `Some`, or `None` once `timeout` has passed.
pub fn try_poll<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(INTERVAL);
    }
}

/// Like [`try_poll`], but panics naming `what` on timeout.
#[track_caller]
pub fn poll<T>(timeout: Duration, what: &str, check: impl FnMut() -> Option<T>) -> T {
    match try_poll(timeout, check) {
        Some(value) => value,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_value() {
        let mut calls = 0;
        let got = try_poll(Duration::from_secs(5), || {
            calls += 1;
            (calls == 3).then_some(calls)
        });
        assert_eq!(got, Some(3));
    }

    #[test]
    fn gives_up_after_the_timeout() {
        assert_eq!(try_poll(Duration::from_millis(120), || None::<()>), None);
    }

    #[test]
    #[should_panic(expected = "waiting for nothing")]
    fn poll_names_what_it_waited_for() {
        poll(Duration::from_millis(60), "nothing", || None::<()>);
    }
}

//! How a post-copy migration past its switch ends, as the source learns it when its control
//! connection is gone (the link cut, or the source agent restarted): it asks the target
//! (`ArrivalStatus`) until the target says its pages are all in or it gave up, or until the
//! target has been silent past the recover timeout; and it tells the target to forget the
//! migration once it has acted. Used by the source's pages phase and by recovery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::journal::{Entry, Phase};
use crate::lazy::PageSource;
use crate::node::Node;

/// Beyond the recover timeout, how much longer a source waits for a silent target after the
/// switch: the target gives up after the recover timeout itself, so it decides first.
const VERDICT_MARGIN: Duration = Duration::from_secs(10);
/// How often a source without its control connection asks the target how it stands.
const ASK_EVERY: Duration = Duration::from_millis(500);

/// What the target said (or did not) after the switch of a post-copy migration.
pub(crate) enum Verdict {
    /// Every page is there.
    Done,
    /// It killed its copy.
    Lost { at: String, reason: String },
    /// Nothing from it for longer than the recover timeout (and a margin).
    Unreachable { reason: String },
}

/// After the switch of a post-copy migration, without a control connection: asks the target
/// how it stands until it says the pages are all there or it gave up, or until neither it
/// nor its pager has been heard of for longer than the recover timeout (and a margin).
pub(crate) fn await_verdict(node: &Node, entry: &Entry, source: Option<&PageSource>) -> Verdict {
    let bound = entry.recover_timeout() + VERDICT_MARGIN;
    let mut heard = Instant::now();
    let mut why = String::from("no answer");
    loop {
        match node.arrival_status(entry) {
            Ok((Some(Phase::Done), _)) => return Verdict::Done,
            Ok((Some(Phase::Lost), lost)) => {
                let lost = lost.unwrap_or_default();
                let (at, reason) = lost.split_once(": ").unwrap_or(("post-copy pages", &lost));
                return Verdict::Lost { at: at.to_owned(), reason: reason.to_owned() };
            }
            Ok((None, _)) => {
                return Verdict::Lost {
                    at: "post-copy pages".into(),
                    reason: format!("{} has no record of the migration any more", entry.peer),
                }
            }
            Ok((Some(_), _)) => heard = Instant::now(),
            Err(e) => why = crate::chain(&e),
        }
        if let Some(last) = source.and_then(PageSource::last_served) {
            heard = heard.max(last);
        }
        if heard.elapsed() > bound {
            return Verdict::Unreachable {
                reason: format!(
                    "{} was unreachable for {} s after the switch ({why})",
                    entry.peer,
                    bound.as_secs()
                ),
            };
        }
        std::thread::sleep(ASK_EVERY);
    }
}

/// Tells `peer`, in the background, that it may forget `migration`, until it listens (for up
/// to ten minutes; after that its record stays until the next start of this agent finds
/// nothing to settle, and it is dropped by hand).
pub(crate) fn forget_later(node: Arc<Node>, peer: String, migration: String) {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(600);
        while Instant::now() < deadline {
            match node.tell_forget(&peer, &migration) {
                Ok(()) => return,
                Err(e) => {
                    tracing::debug!(error = %e, %peer, %migration, "cannot tell the target to forget yet")
                }
            }
            std::thread::sleep(Duration::from_secs(2));
        }
        tracing::warn!(%peer, %migration, "the target never heard that it may forget the migration");
    });
}

//! The post-copy page channels between the target's pager and the source agent, which reads
//! the frozen tree ([`PageSource`]); pages cross only these authenticated connections:
//!
//! - demand (`Pages`): the pager's requests, for the pages the workload faults on and, once
//!   the push is over, for what is still missing ([`RemotePages`]);
//! - push (`PagesPush`): the source streams every lazy page in address order, from the
//!   switch on, and the target copies each frame straight into the processes ([`start_push`]).
//!   Without it the pages the workload does not touch would come one request at a time; with
//!   a workload that keeps writing, CRIU's own daemon (which ferry used before) took 13 to 15 s
//!   for 1 GiB rewriting 10 %/s. The source's tree is frozen: a page pushed and a page fetched
//!   are the same bytes.
//!
//! A lost demand channel is dialled again (the source agent may be restarting, or the link
//! down for a while): meanwhile the pager waits in its fetch, and so do the threads that
//! fault on a missing page; the rest of the workload runs on. Past the migration's recover
//! timeout the fetch fails, and the target declares the workload lost. A lost push is not
//! dialled again: the pager fetches the rest itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::lazy::{LazyError, PageFeeder, PageFetcher, PageSource, PAGE_SIZE};
use crate::node::Node;
use crate::peer::{unexpected, Channel};
use crate::proto::{decode_push, push_header, Msg, KIND_PAGES, KIND_PUSH};
use crate::MigrateError;

/// How long after the switch the push starts.
const PUSH_AFTER: Duration = Duration::from_millis(300);
/// Pages per pushed frame (1 MiB).
const PUSH_PAGES: u32 = 256;
/// Pages per request on the wire (4 MiB: well under the frame cap).
const PAGES_PER_REQUEST: u32 = 1024;
/// Longest silence of the source while a request waits for its answer (or the peer timeout,
/// if shorter): a cut link is noticed this soon, and the channel dialled again.
pub(crate) const PAGE_SILENCE: Duration = Duration::from_secs(5);
/// Pause between two attempts to reach the source again.
const REDIAL_EVERY: Duration = Duration::from_millis(250);

/// A failed exchange with the source: worth dialling again, or final.
enum Failure {
    /// The connection (the link, or the agent at the other end) failed.
    Transport(String),
    /// The source answered, and refused.
    Refused(String),
}

/// The target's fetcher: asks the source agent over the page channel, and dials it again
/// (for up to the recover timeout) when the channel fails.
pub(crate) struct RemotePages {
    connect: Box<dyn Fn() -> Result<Channel, MigrateError> + Send + Sync>,
    ch: Option<Channel>,
    migration: String,
    source: String,
    /// How long the source may be unreachable.
    bound: Duration,
    silence: Duration,
}

impl RemotePages {
    pub(crate) fn open(
        node: &Node,
        source: &str,
        migration: &str,
        bound: Duration,
    ) -> Result<RemotePages, MigrateError> {
        let mut pages = RemotePages {
            connect: Box::new(node.connector(source)),
            ch: None,
            migration: migration.to_owned(),
            source: source.to_owned(),
            bound,
            silence: PAGE_SILENCE.min(node.config.peer_timeout),
        };
        pages.ch = Some(pages.dial()?);
        Ok(pages)
    }

    fn dial(&self) -> Result<Channel, MigrateError> {
        let mut ch = (self.connect)()?;
        ch.set_read_timeout(self.silence);
        ch.send(&Msg::Pages { migration: self.migration.clone() })?;
        Ok(ch)
    }

    /// One exchange: every request out, then every answer in.
    fn exchange(&mut self, reqs: &[(u32, u64, u32)], out: &mut Vec<u8>) -> Result<(), Failure> {
        let ch = match self.ch.as_mut() {
            Some(ch) => ch,
            None => {
                let ch = self.dial().map_err(|e| Failure::Transport(crate::chain(&e)))?;
                self.ch.insert(ch)
            }
        };
        let transport = |e: MigrateError| Failure::Transport(crate::chain(&e));
        let mut parts = Vec::new();
        for &(pid, vaddr, nr_pages) in reqs {
            let mut done = 0u32;
            while done < nr_pages {
                let n = (nr_pages - done).min(PAGES_PER_REQUEST);
                let at = vaddr + u64::from(done) * PAGE_SIZE;
                ch.send(&Msg::PageRequest { pid, vaddr: at, nr_pages: n }).map_err(transport)?;
                parts.push(n);
                done += n;
            }
        }
        out.clear();
        for n in parts {
            match ch.next("post-copy pages").map_err(transport)? {
                Err(frame)
                    if frame.kind == KIND_PAGES && frame.payload.len() as u64 == u64::from(n) * PAGE_SIZE =>
                {
                    out.extend_from_slice(&frame.payload)
                }
                Err(frame) => {
                    return Err(Failure::Refused(format!(
                        "the source answered {} bytes of kind {:#x} for {n} pages",
                        frame.payload.len(),
                        frame.kind
                    )))
                }
                Ok(Msg::Error { message }) => return Err(Failure::Refused(message)),
                Ok(other) => return Err(Failure::Refused(unexpected("post-copy pages", &other).to_string())),
            }
        }
        Ok(())
    }
}

impl PageFetcher for RemotePages {
    fn fetch(&mut self, pid: u32, vaddr: u64, nr_pages: u32, out: &mut Vec<u8>) -> Result<(), LazyError> {
        self.fetch_many(&[(pid, vaddr, nr_pages)], out)
    }

    /// Every request goes out before the first answer is read: faults of several threads,
    /// or pages far apart, cost one round trip together. A failed channel is dialled again
    /// and the requests repeated (they are reads of frozen memory) until the source answers
    /// or has been unreachable for the recover timeout.
    fn fetch_many(&mut self, reqs: &[(u32, u64, u32)], out: &mut Vec<u8>) -> Result<(), LazyError> {
        let asked = Instant::now();
        let mut lost: Option<Instant> = None;
        loop {
            match self.exchange(reqs, out) {
                Ok(()) => {
                    if let Some(t) = lost {
                        tracing::warn!(source = %self.source, seconds = t.elapsed().as_secs_f64(), "the pages flow again");
                    }
                    return Ok(());
                }
                Err(Failure::Refused(why)) => return Err(LazyError::Fetch(why)),
                Err(Failure::Transport(why)) => {
                    self.ch = None;
                    if lost.is_none() {
                        tracing::warn!(source = %self.source, error = %why, bound_s = self.bound.as_secs(), "the page channel failed: the faulting threads wait while it is dialled again");
                        lost = Some(asked);
                    }
                    if asked.elapsed() >= self.bound {
                        return Err(LazyError::Fetch(format!(
                            "the source {} was unreachable for {} s (the recover timeout): {why}",
                            self.source,
                            self.bound.as_secs()
                        )));
                    }
                    std::thread::sleep(REDIAL_EVERY);
                }
            }
        }
    }
}

/// A thread that opens the push connection once `feeder` allows it and copies what arrives
/// into the restored processes (off the freeze: the restore does not wait for the handshake).
/// If it cannot, the pager fetches every page itself.
pub(crate) fn start_push(node: &Node, source: &str, migration: &str, feeder: PageFeeder) {
    let dialer = node.connector(source);
    let migration = migration.to_owned();
    let ending = feeder.clone();
    let silence = PAGE_SILENCE.min(node.config.peer_timeout);
    let spawned = std::thread::Builder::new().name("ferry-page-push".into()).spawn(move || {
        if !feeder.wait_allowed() {
            return;
        }
        // The first moments after the switch belong to the workload's own faults (it catches
        // up on what it owes its clients); FERRY_PUSH_DELAY_MS overrides the pause.
        let delay = std::env::var("FERRY_PUSH_DELAY_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(PUSH_AFTER, Duration::from_millis);
        std::thread::sleep(delay);
        // Demand faults and the workload itself come first.
        if let Err(e) = ferry_sys::idle_priority_for_this_thread() {
            tracing::debug!(error = %e, "the page push runs at normal priority");
        }
        let opened = dialer().and_then(|mut ch| {
            ch.set_read_timeout(silence);
            ch.send(&Msg::PagesPush { migration })?;
            Ok(ch)
        });
        let mut ch = match opened {
            Ok(ch) => ch,
            Err(e) => {
                tracing::warn!(error = %e, "no page push: the pages come on demand");
                feeder.end();
                return;
            }
        };
        let mut bytes = 0u64;
        loop {
            match ch.next("pushed pages") {
                Ok(Err(frame)) if frame.kind == KIND_PUSH => match decode_push(&frame.payload) {
                    Ok((pid, vaddr, data)) => {
                        bytes += data.len() as u64;
                        if !feeder.feed(pid, vaddr, data) {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "bad page push frame; the rest comes on demand");
                        break;
                    }
                },
                Ok(Ok(Msg::PushDone)) => break,
                Ok(Ok(Msg::Error { message })) => {
                    tracing::warn!(%message, "the source stopped pushing pages");
                    break;
                }
                Ok(other) => {
                    tracing::warn!(?other, "unexpected on the page push connection");
                    break;
                }
                Err(e) => {
                    tracing::info!(error = %e, "the page push connection ended: the rest comes on demand");
                    break;
                }
            }
        }
        feeder.end();
        tracing::info!(bytes, "page push ended");
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no page push thread: the pages come on demand");
        ending.end();
    }
}

/// The frozen tree whose pages `migration` serves; if there is none, the peer is told so.
fn frozen_tree(
    node: &Node,
    ch: &mut Channel,
    migration: &str,
) -> Result<Option<Arc<PageSource>>, MigrateError> {
    let source = node.page_source(migration);
    if source.is_none() {
        ch.send(&Msg::Error { message: format!("no post-copy migration {migration} here") })?;
    }
    Ok(source)
}

/// The source's side of a page channel: answers requests until the target hangs up.
pub(crate) fn serve(node: &Node, ch: &mut Channel, migration: &str) -> Result<(), MigrateError> {
    let Some(source) = frozen_tree(node, ch, migration)? else { return Ok(()) };
    let mut buf = Vec::new();
    if crate::failpoint::check("source-serve-pages") == Some(crate::failpoint::Action::Cut) {
        return Err(MigrateError::Lost {
            node: ch.node.clone(),
            phase: "post-copy pages (failpoint)".into(),
        });
    }
    loop {
        match ch.next("post-copy pages") {
            Ok(Ok(Msg::PageRequest { pid, vaddr, nr_pages })) if nr_pages <= PAGES_PER_REQUEST => {
                match source.read(pid, vaddr, nr_pages, &mut buf) {
                    Ok(()) => ferry_wire::frame::write_frame(&mut ch.conn, KIND_PAGES, &buf)?,
                    Err(e) => ch.send(&Msg::Error { message: crate::chain(&e) })?,
                }
            }
            Ok(Ok(other)) => return Err(unexpected("post-copy pages", &other)),
            Ok(Err(frame)) => {
                return Err(MigrateError::protocol(format!("unexpected frame kind {:#x}", frame.kind)))
            }
            Err(MigrateError::Lost { .. }) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

/// The source's side of a page push: every lazy page of the tree, in address order, until
/// all are sent or the target hangs up.
pub(crate) fn push(node: &Node, ch: &mut Channel, migration: &str) -> Result<(), MigrateError> {
    let Some(source) = frozen_tree(node, ch, migration)? else { return Ok(()) };
    // Requests for pages a fault waits on (the other connection) come first.
    if let Err(e) = ferry_sys::idle_priority_for_this_thread() {
        tracing::debug!(error = %e, "the page push runs at normal priority");
    }
    let mut buf = Vec::new();
    for (pid, start, end) in source.ranges() {
        let mut at = start;
        while at < end {
            let n = ((end - at) / PAGE_SIZE).min(u64::from(PUSH_PAGES)) as u32;
            if let Err(e) = source.read(pid, at, n, &mut buf) {
                // The tree is gone (the migration ended) or the range went away.
                let _ = ch.send(&Msg::Error { message: crate::chain(&e) });
                return Ok(());
            }
            let mut payload = push_header(pid, at);
            payload.extend_from_slice(&buf);
            match ferry_wire::frame::write_frame(&mut ch.conn, KIND_PUSH, &payload) {
                Ok(()) => {}
                // The target has every page it needs and hung up.
                Err(_) => return Ok(()),
            }
            at += u64::from(n) * PAGE_SIZE;
        }
    }
    ch.send(&Msg::PushDone)
}

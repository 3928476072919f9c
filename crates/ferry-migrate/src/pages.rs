//! The post-copy page channel: a connection of its own between the target's lazy-pages
//! daemon (through [`RemotePages`]) and the source agent, which reads each requested range
//! from the frozen tree ([`PageSource`]). Pages cross only this authenticated channel.

use std::sync::Arc;

use crate::agent::{unexpected, Agent, Channel};
use crate::lazy::{LazyError, PageFetcher, PageSource, PAGE_SIZE};
use crate::proto::{decode_push, push_header, Msg, KIND_PAGES, KIND_PUSH};
use crate::push::{PushCache, CACHE_BYTES, PUSH_PAGES};
use crate::MigrateError;

/// How long after the switch the push starts.
const PUSH_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
/// Pages per request on the wire (4 MiB: well under the frame cap).
const PAGES_PER_REQUEST: u32 = 1024;

/// The target's fetcher: answers from the pages the source pushes when it can, asks the
/// source agent over the page channel otherwise.
pub(crate) struct RemotePages {
    ch: Channel,
    cache: Option<Arc<PushCache>>,
}

impl RemotePages {
    pub(crate) fn open(agent: &Agent, source: &str, migration: &str) -> Result<RemotePages, MigrateError> {
        let mut ch = agent.connect(source)?;
        ch.send(&Msg::Pages { migration: migration.to_owned() })?;
        // FERRY_PUSH=off in the target agent's environment: demand and CRIU's background
        // fetching only (to measure what the push buys).
        let push = std::env::var("FERRY_PUSH").map_or(true, |v| v != "off");
        let cache = if push { start_push(agent, source, migration) } else { None };
        Ok(RemotePages { ch, cache })
    }

    /// The cache pushed pages go to, if they are pushed (most requests are then answered
    /// from memory); the push starts at [`PushCache::begin`].
    pub(crate) fn push_cache(&self) -> Option<Arc<PushCache>> {
        self.cache.clone()
    }
}

/// A thread that opens the push connection and fills the cache from it (off the freeze: the
/// restore does not wait for the handshake). If it cannot, the pages all come on demand.
fn start_push(agent: &Agent, source: &str, migration: &str) -> Option<Arc<PushCache>> {
    let cache = Arc::new(PushCache::new(CACHE_BYTES));
    let filling = cache.clone();
    let dialer = agent.connector(source);
    let migration = migration.to_owned();
    let spawned = std::thread::Builder::new().name("ferry-page-push".into()).spawn(move || {
        if !filling.wait_begin() {
            return;
        }
        // The first moments after the switch belong to the workload's faults: a push at once
        // lengthened the clients' longest wait (1 GiB rewriting 10 %/s: 0.65 s against 0.39 s
        // with this pause). FERRY_PUSH_DELAY_MS overrides it.
        let delay = std::env::var("FERRY_PUSH_DELAY_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(PUSH_AFTER, std::time::Duration::from_millis);
        std::thread::sleep(delay);
        // Demand faults and the workload itself come first.
        if let Err(e) = ferry_sys::idle_priority_for_this_thread() {
            tracing::debug!(error = %e, "the page push runs at normal priority");
        }
        let opened = dialer().and_then(|mut ch| {
            ch.send(&Msg::PagesPush { migration })?;
            Ok(ch)
        });
        let mut ch = match opened {
            Ok(ch) => ch,
            Err(e) => {
                tracing::warn!(error = %e, "no page push: every page comes on demand");
                return;
            }
        };
        let mut bytes = 0u64;
        loop {
            match ch.next("pushed pages") {
                Ok(Err(frame)) if frame.kind == KIND_PUSH => match decode_push(&frame.payload) {
                    Ok((pid, vaddr, data)) => {
                        bytes += data.len() as u64;
                        let at = frame.payload.len() - data.len();
                        if !filling.insert(pid, vaddr, frame.payload, at) {
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
                    tracing::debug!(error = %e, "page push connection ended");
                    break;
                }
            }
        }
        tracing::info!(bytes, "page push ended");
    });
    match spawned {
        Ok(_) => Some(cache),
        Err(e) => {
            tracing::warn!(error = %e, "no page push thread: every page comes on demand");
            None
        }
    }
}

impl Drop for RemotePages {
    fn drop(&mut self) {
        if let Some(cache) = &self.cache {
            let (hits, misses) = cache.counts();
            tracing::info!(hits, misses, "page requests answered from the push / from the source");
            cache.close();
        }
    }
}

impl PageFetcher for RemotePages {
    fn fetch(&mut self, pid: u32, vaddr: u64, nr_pages: u32, out: &mut Vec<u8>) -> Result<(), LazyError> {
        if let Some(cache) = &self.cache {
            if cache.take(pid, vaddr, nr_pages, out) {
                return Ok(());
            }
        }
        out.clear();
        let mut done = 0u32;
        while done < nr_pages {
            let n = (nr_pages - done).min(PAGES_PER_REQUEST);
            let at = vaddr + u64::from(done) * PAGE_SIZE;
            let fail = |e: MigrateError| LazyError::Fetch(crate::chain(&e));
            self.ch.send(&Msg::PageRequest { pid, vaddr: at, nr_pages: n }).map_err(fail)?;
            match self.ch.next("post-copy pages").map_err(fail)? {
                Err(frame)
                    if frame.kind == KIND_PAGES && frame.payload.len() as u64 == u64::from(n) * PAGE_SIZE =>
                {
                    out.extend_from_slice(&frame.payload);
                }
                Err(frame) => {
                    return Err(LazyError::Fetch(format!(
                        "the source answered {} bytes of kind {:#x} for {n} pages",
                        frame.payload.len(),
                        frame.kind
                    )))
                }
                Ok(Msg::Error { message }) => return Err(LazyError::Fetch(message)),
                Ok(other) => return Err(fail(unexpected("post-copy pages", &other))),
            }
            done += n;
        }
        Ok(())
    }
}

/// The frozen tree whose pages `migration` serves; if there is none, the peer is told so.
fn frozen_tree(
    agent: &Agent,
    ch: &mut Channel,
    migration: &str,
) -> Result<Option<Arc<PageSource>>, MigrateError> {
    let source = agent
        .pages
        .lock()
        .map_err(|_| MigrateError::protocol("page registry poisoned"))?
        .get(migration)
        .cloned();
    if source.is_none() {
        ch.send(&Msg::Error { message: format!("no post-copy migration {migration} here") })?;
    }
    Ok(source)
}

/// The source's side of a page channel: answers requests until the target hangs up.
pub(crate) fn serve(agent: &Agent, ch: &mut Channel, migration: &str) -> Result<(), MigrateError> {
    let Some(source) = frozen_tree(agent, ch, migration)? else { return Ok(()) };
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
pub(crate) fn push(agent: &Agent, ch: &mut Channel, migration: &str) -> Result<(), MigrateError> {
    let Some(source) = frozen_tree(agent, ch, migration)? else { return Ok(()) };
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

//! The post-copy page channel: a connection of its own between the target's lazy-pages
//! daemon (through [`RemotePages`]) and the source agent, which reads each requested range
//! from the frozen tree ([`PageSource`]). Pages cross only this authenticated channel.

use std::sync::Arc;

use crate::agent::{unexpected, Agent, Channel};
use crate::lazy::{LazyError, PageFetcher, PageSource, PAGE_SIZE};
use crate::proto::{Msg, KIND_PAGES};
use crate::MigrateError;

/// Pages per request on the wire (4 MiB: well under the frame cap).
const PAGES_PER_REQUEST: u32 = 1024;

/// The target's fetcher: asks the source agent over the page channel.
pub(crate) struct RemotePages {
    ch: Channel,
}

impl RemotePages {
    pub(crate) fn open(agent: &Agent, source: &str, migration: &str) -> Result<RemotePages, MigrateError> {
        let mut ch = agent.connect(source)?;
        ch.send(&Msg::Pages { migration: migration.to_owned() })?;
        Ok(RemotePages { ch })
    }
}

impl PageFetcher for RemotePages {
    fn fetch(&mut self, pid: u32, vaddr: u64, nr_pages: u32, out: &mut Vec<u8>) -> Result<(), LazyError> {
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

/// The source's side of a page channel: answers requests until the target hangs up.
pub(crate) fn serve(agent: &Agent, ch: &mut Channel, migration: &str) -> Result<(), MigrateError> {
    let source: Option<Arc<PageSource>> = agent
        .pages
        .lock()
        .map_err(|_| MigrateError::protocol("page registry poisoned"))?
        .get(migration)
        .cloned();
    let Some(source) = source else {
        ch.send(&Msg::Error { message: format!("no post-copy migration {migration} here") })?;
        return Ok(());
    };
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

//! Lazy pages served by ferry rather than by CRIU: post-copy migration, and a restore from the
//! store whose pages go straight from the sealed chunks into the restored processes.
//!
//! CRIU's own remote lazy mode cannot work on hosts without `CAP_SYS_RESOURCE` (its page
//! server sizes a pipe beyond `fs.pipe-max-size`), listens unauthenticated on every address,
//! and offers no hook for ferry's TLS channel. So (see docs/lazy-pages.md):
//!
//! - source: `criu dump` with `lazy_pages` stops at post-dump with the images complete except
//!   the lazy (anonymous) pages, the tree frozen. [`PageSource`] reads requested ranges from
//!   `/proc/<pid>/mem` of the frozen tasks, refusing anything the images do not mark lazy.
//!   Once the target has every page, post-dump is answered; [`PageServerFinisher`] then ends
//!   the session of CRIU's own (now useless) page server at once, so CRIU kills the tree.
//! - target: [`LazyPager`] takes the userfaultfds of `criu restore --lazy-pages` in place of
//!   CRIU's `lazy-pages` daemon and fills the missing pages itself, from a [`PageFetcher`]
//!   (the transport to the source) and from pages pushed ahead of demand ([`PageFeeder`]);
//!   the tree runs while its pages arrive.
#![forbid(unsafe_code)]

mod finisher;
pub mod guard;
mod images;
mod pager;
pub mod proto;
mod source;

use std::time::Duration;

pub use finisher::{pick_port, FinishReport, PageServerFinisher};
pub use images::{
    complete_lazy_dump, layout, lazy_iovs, lazy_iovs_of, lazy_ranges, parse_lazy_dump, parse_stored_pages,
    stored_lazy_iovs, stored_pages, tree_pids, Layout, LazyDumpPages, LazyRanges, Mapping, PageRun,
    StoredPages,
};
pub use pager::{Keeper, LazyPager, PageFeeder};
pub use proto::PAGE_SIZE;
pub use source::{HeldBy, PageSource};

/// Largest request served (4 MiB).
pub const MAX_REQUEST_PAGES: u32 = 16 << 10;

/// What the target's side of post-copy has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LazyStats {
    /// Page bytes copied into the processes.
    pub bytes: u64,
    /// Of those, bytes pushed ahead of demand.
    pub pushed: u64,
    /// Requests sent to the source.
    pub requests: u64,
    /// Page faults handled.
    pub faults: u64,
    /// When the first request went out.
    pub first_request: Option<std::time::Instant>,
    /// When every page was in.
    pub finished: Option<std::time::Instant>,
    /// Time spent waiting for the source.
    pub fetching: Duration,
    /// Time spent copying pages into the processes (`UFFDIO_COPY`).
    pub copying: Duration,
}

/// Fetches lazy pages for the target's pager: from the source over the network, or (tests,
/// local use) straight from a [`PageSource`].
pub trait PageFetcher {
    /// Fills `out` (replacing its content) with exactly `nr_pages` pages at `vaddr` of process
    /// `pid` (its pid in the images). An error ends the serving: the faulting tasks keep waiting.
    fn fetch(&mut self, pid: u32, vaddr: u64, nr_pages: u32, out: &mut Vec<u8>) -> Result<(), LazyError>;

    /// Fills `out` with the pages of every request `(pid, vaddr, nr_pages)`, one after the
    /// other. A fetcher that can ask for them all before the first answer comes should.
    fn fetch_many(&mut self, reqs: &[(u32, u64, u32)], out: &mut Vec<u8>) -> Result<(), LazyError> {
        out.clear();
        let mut one = Vec::new();
        for &(pid, vaddr, n) in reqs {
            self.fetch(pid, vaddr, n, &mut one)?;
            out.extend_from_slice(&one);
        }
        Ok(())
    }
}

/// A [`PageSource`] is a fetcher of its own pages.
impl PageFetcher for std::sync::Arc<PageSource> {
    fn fetch(&mut self, pid: u32, vaddr: u64, nr_pages: u32, out: &mut Vec<u8>) -> Result<(), LazyError> {
        self.read(pid, vaddr, nr_pages, out)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("image {image}: {detail}")]
    Images { image: String, detail: String },
    #[error("dumped tree: {0}")]
    Tree(String),
    #[error("refused {nr_pages} pages at {vaddr:#x} of process {pid}: {why}")]
    Refused { pid: u32, vaddr: u64, nr_pages: u32, why: String },
    #[error("fetching pages failed: {0}")]
    Fetch(String),
    #[error("page-server protocol: {0}")]
    Protocol(String),
    #[error("the restore ended before it had handed over every process")]
    RestoreEnded,
    #[error("serving lazy pages failed: {0}")]
    Serve(String),
    #[error("closing CRIU's page server: {0}")]
    Finish(String),
    #[error("no end after {0:?}")]
    Timeout(Duration),
}

/// `e` and its sources, each once, joined by ": ".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        src = s.source();
    }
    text
}

//! Post-copy migration with lazy pages, served by ferry rather than by CRIU.
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
//! - target: [`LazyServer`] runs `criu lazy-pages` with a socket pair as its page-server
//!   connection and answers its requests through a [`PageFetcher`] (the transport to the
//!   source); `criu restore --lazy-pages` then starts the tree, which runs while pages arrive.

mod finisher;
mod images;
pub mod proto;
mod server;
mod source;

use std::time::Duration;

pub use finisher::{pick_port, FinishReport, PageServerFinisher};
pub use images::{lazy_ranges, tree_pids, LazyRanges};
pub use proto::PAGE_SIZE;
pub use server::{LazyServer, LazyStats};
pub use source::PageSource;

/// Largest request served (CRIU's daemon asks for at most 4 MiB).
pub const MAX_REQUEST_PAGES: u32 = 16 << 10;

/// Fetches lazy pages for the target's daemon: from the source over the network, or (tests,
/// local use) straight from a [`PageSource`].
pub trait PageFetcher {
    /// Fills `out` (replacing its content) with exactly `nr_pages` pages at `vaddr` of process
    /// `pid` (its pid in the images). An error ends the serving: the daemon gets no answer.
    fn fetch(&mut self, pid: u32, vaddr: u64, nr_pages: u32, out: &mut Vec<u8>) -> Result<(), LazyError>;
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
    #[error("lazy-pages daemon: {0}")]
    Daemon(String),
    #[error("serving lazy pages failed: {0}")]
    Serve(String),
    #[error("closing CRIU's page server: {0}")]
    Finish(String),
    #[error("no end after {0:?}")]
    Timeout(Duration),
}

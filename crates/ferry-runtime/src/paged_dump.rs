//! A process tree's checkpoint without page images: CRIU dumps everything but the contents of
//! the anonymous private pages (a lazy dump, with ferry's CRIU patch that leaves them out of
//! its page pipes), and at post-dump, while the tree is frozen, ferry reads those pages from
//! the tasks' memory itself, in runs of 1 MiB, straight into the store's pipeline.
//!
//! The checkpoint is the one a full dump makes: each process's pages image is fed to the
//! pipeline as the full dump would have written it (the pages CRIU wrote, interleaved in
//! pagemap order with the pages read from memory) and its pagemap is rewritten the way a full
//! dump writes it (lazy entries marked present too). So every reader (verify, inspect,
//! export, restore, migration, dedup) sees no difference, and the plaintext pages never land
//! in a file.
//!
//! With `--leave-running` the pages are copied into ferry's memory while the tree is frozen
//! and sealed after it runs again: the freeze lasts the dump and that copy.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use ferry_lazy::{PageRun, PageSource, PAGE_SIZE};
use ferry_store::pipeline::Pipeline;
use ferry_store::StoreError;

use crate::Error;

/// Read from memory in requests of this size: a pipeline segment, handed over without a copy.
const RUN: u64 = 1 << 20;

/// The pages of a frozen tree, copied into memory (a `--leave-running` checkpoint).
#[derive(Debug, Default)]
pub(crate) struct MemoryCopy {
    /// Per pages image: its name and its content, in pieces.
    files: Vec<(String, Vec<Vec<u8>>)>,
    pub(crate) bytes: u64,
}

/// Where the pages of one pages image go.
trait Sink {
    fn write(&mut self, data: Vec<u8>) -> Result<(), Error>;
}

struct FeedSink<'a>(ferry_store::pipeline::Feed<'a>);

impl Sink for FeedSink<'_> {
    fn write(&mut self, data: Vec<u8>) -> Result<(), Error> {
        Ok(self.0.write_owned(data)?)
    }
}

impl Sink for Vec<Vec<u8>> {
    fn write(&mut self, data: Vec<u8>) -> Result<(), Error> {
        self.push(data);
        Ok(())
    }
}

fn pager_error(e: ferry_lazy::LazyError) -> Error {
    Error::PostDump(format!("reading the frozen tree's pages: {e}"))
}

/// Feeds every process's full pages image to `pipeline`, reading the lazy pages from the tree
/// rooted at host pid `root` (frozen by CRIU at post-dump), and rewrites the pagemaps in
/// `images`. Returns the bytes read from memory.
pub(crate) fn feed_from_frozen(images: &Path, root: i32, pipeline: &Pipeline) -> Result<u64, Error> {
    let source = PageSource::open(images, root).map_err(pager_error)?;
    let mut bytes = 0;
    for pid in ferry_lazy::tree_pids(images).map_err(pager_error)? {
        let Some(plan) = ferry_lazy::complete_lazy_dump(images, pid).map_err(pager_error)? else { continue };
        let mut sink = FeedSink(pipeline.feed(&plan.pages_file)?);
        bytes += write_pages(images, pid, &plan, &source, &mut sink)?;
        sink.0.finish()?;
        rewrite_pagemap(images, pid, &plan.pagemap)?;
    }
    Ok(bytes)
}

/// As [`feed_from_frozen`], into memory: the tree may run again once this returns.
pub(crate) fn copy_from_frozen(images: &Path, root: i32) -> Result<MemoryCopy, Error> {
    let source = PageSource::open(images, root).map_err(pager_error)?;
    let mut copy = MemoryCopy::default();
    for pid in ferry_lazy::tree_pids(images).map_err(pager_error)? {
        let Some(plan) = ferry_lazy::complete_lazy_dump(images, pid).map_err(pager_error)? else { continue };
        let mut pieces: Vec<Vec<u8>> = Vec::new();
        copy.bytes += write_pages(images, pid, &plan, &source, &mut pieces)?;
        copy.files.push((plan.pages_file.clone(), pieces));
        rewrite_pagemap(images, pid, &plan.pagemap)?;
    }
    Ok(copy)
}

/// Feeds a copy made by [`copy_from_frozen`] to `pipeline`, freeing it as it goes.
pub(crate) fn feed_copy(copy: MemoryCopy, pipeline: &Pipeline) -> Result<(), Error> {
    for (name, pieces) in copy.files {
        let mut feed = pipeline.feed(&name)?;
        for p in pieces {
            feed.write_owned(p)?;
        }
        feed.finish()?;
    }
    Ok(())
}

/// Writes process `pid`'s full pages image into `sink`: CRIU's pages where the pagemap says
/// they are in its image, the frozen process's memory where they were left lazy.
fn write_pages(
    images: &Path,
    pid: u32,
    plan: &ferry_lazy::LazyDumpPages,
    source: &PageSource,
    sink: &mut dyn Sink,
) -> Result<u64, Error> {
    let path = images.join(&plan.pages_file);
    let io = |action: &'static str| {
        let path = path.clone();
        move |source| Error::Store(StoreError::Io { action, path: path.clone(), source })
    };
    let mut image = match File::open(&path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io("cannot open")(e)),
    };
    let mut from_memory = 0;
    for run in &plan.runs {
        match *run {
            PageRun::Image { len } => {
                let file = image.as_mut().ok_or_else(|| {
                    Error::PostDump(format!("{} is missing from the dump", plan.pages_file))
                })?;
                let mut left = len;
                while left > 0 {
                    let n = left.min(RUN) as usize;
                    let mut buf = vec![0u8; n];
                    file.read_exact(&mut buf).map_err(io("cannot read"))?;
                    sink.write(buf)?;
                    left -= n as u64;
                }
            }
            PageRun::Memory { vaddr, len } => {
                let mut at = vaddr;
                while at < vaddr + len {
                    let n = (vaddr + len - at).min(RUN);
                    let mut buf = Vec::with_capacity(n as usize);
                    source.read(pid, at, (n / PAGE_SIZE) as u32, &mut buf).map_err(pager_error)?;
                    sink.write(buf)?;
                    at += n;
                    from_memory += n;
                    // Tests: ferry dies in the middle of sealing the frozen tree's pages.
                    if from_memory >= 128 << 20 {
                        ferry_sys::failpoint::check("checkpoint-pages");
                    }
                }
            }
        }
    }
    Ok(from_memory)
}

/// Replaces `pagemap-<pid>.img` with its full-dump form.
fn rewrite_pagemap(images: &Path, pid: u32, pagemap: &[u8]) -> Result<(), Error> {
    let path = images.join(format!("pagemap-{pid}.img"));
    std::fs::write(&path, pagemap)
        .map_err(|source| Error::Store(StoreError::Io { action: "cannot write", path, source }))
}

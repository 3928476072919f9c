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
use ferry_store::{Progress, StoreError};

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

/// Every process's plan, in the tree's order (each process that has pages).
fn plans(images: &Path) -> Result<Vec<(u32, ferry_lazy::LazyDumpPages)>, Error> {
    let mut out = Vec::new();
    for pid in ferry_lazy::tree_pids(images).map_err(pager_error)? {
        if let Some(plan) = ferry_lazy::complete_lazy_dump(images, pid).map_err(pager_error)? {
            out.push((pid, plan));
        }
    }
    Ok(out)
}

/// The bytes of every pages image the plans make: what a progress bar of them counts to.
fn total_bytes(plans: &[(u32, ferry_lazy::LazyDumpPages)]) -> u64 {
    let run = |r: &PageRun| match *r {
        PageRun::Image { len } | PageRun::Memory { len, .. } => len,
    };
    plans.iter().flat_map(|(_, p)| p.runs.iter()).map(run).sum()
}

/// Feeds every process's full pages image to `pipeline`, reading the lazy pages from the tree
/// rooted at host pid `root` (frozen by CRIU at post-dump), and rewrites the pagemaps in
/// `images`. Returns the bytes read from memory.
pub(crate) fn feed_from_frozen(
    images: &Path,
    root: i32,
    pipeline: &Pipeline,
    progress: &dyn Progress,
) -> Result<u64, Error> {
    let source = PageSource::open(images, root).map_err(pager_error)?;
    let plans = plans(images)?;
    progress.stage("pages", Some(total_bytes(&plans)));
    let mut bytes = 0;
    for (pid, plan) in plans {
        let mut sink = FeedSink(pipeline.feed(&plan.pages_file)?);
        bytes += write_pages(images, pid, &plan, &source, &mut sink, progress)?;
        sink.0.finish()?;
        rewrite_pagemap(images, pid, &plan.pagemap)?;
    }
    Ok(bytes)
}

/// As [`feed_from_frozen`], into memory: the tree may run again once this returns.
pub(crate) fn copy_from_frozen(
    images: &Path,
    root: i32,
    progress: &dyn Progress,
) -> Result<MemoryCopy, Error> {
    let source = PageSource::open(images, root).map_err(pager_error)?;
    let plans = plans(images)?;
    progress.stage("copy", Some(total_bytes(&plans)));
    let mut copy = MemoryCopy::default();
    for (pid, plan) in plans {
        let mut pieces: Vec<Vec<u8>> = Vec::new();
        copy.bytes += write_pages(images, pid, &plan, &source, &mut pieces, progress)?;
        copy.files.push((plan.pages_file.clone(), pieces));
        rewrite_pagemap(images, pid, &plan.pagemap)?;
    }
    Ok(copy)
}

/// Feeds a copy made by [`copy_from_frozen`] to `pipeline`, freeing it as it goes.
pub(crate) fn feed_copy(copy: MemoryCopy, pipeline: &Pipeline, progress: &dyn Progress) -> Result<(), Error> {
    let total = copy.files.iter().flat_map(|(_, p)| p.iter()).map(|p| p.len() as u64).sum();
    progress.stage("pages", Some(total));
    for (name, pieces) in copy.files {
        let mut feed = pipeline.feed(&name)?;
        for p in pieces {
            let n = p.len() as u64;
            feed.write_owned(p)?;
            progress.advance(n);
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
    progress: &dyn Progress,
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
                    progress.advance(n as u64);
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
                    progress.advance(n);
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

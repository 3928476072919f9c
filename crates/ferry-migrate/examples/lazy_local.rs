//! Post-copy on one host: `lazy_local [--tcp-established] PID DIR` dumps the tree rooted at host pid PID lazily and,
//! at post-dump, restores it lazily from a copy of its images, ferry's `LazyPager` filling the
//! missing pages straight from the frozen source (`PageSource`). The same image parser, page
//! source, pager and CRIU options as a post-copy migration (`ferry migrate --strategy
//! post-copy`), without the network and the store between the two sides. Used by
//! `tools/zdtm-sweep` (docs/zdtm.md), and for trials.
//!
//! The tree must be PID 1 of its own pid namespace (`unshare --pid --fork`): the copy is
//! restored into a fresh one while the source still holds its pids. Prints `restored HOSTPID`
//! once every page is in and the source is gone, and returns; the restored root is then
//! adopted by init. Logs and images in DIR. `FERRY_CRIU` picks the CRIU binary;
//! `LAZY_LOCAL_RESTORE_CRIU`, if set, the one the restore runs (the sweep's wrapper that gives the
//! copy what another host would: see tools/zdtm-sweep).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use ferry_criu::{
    Criu, DumpOptions, LogTarget, Notify, NotifyHandler, RecordingNotify, RestoreOptions, SharedOptions,
};
use ferry_migrate::lazy::{pick_port, LazyPager, PageServerFinisher, PageSource};

/// Longest wait for every page.
const SERVE_TIMEOUT: Duration = Duration::from_secs(120);

struct AtPostDump<'a> {
    /// The restore's CRIU (the dump's unless `LAZY_LOCAL_RESTORE_CRIU` says otherwise).
    criu: &'a Criu,
    root: i32,
    tcp_established: bool,
    dir: PathBuf,
    restored: Option<i32>,
}

impl AtPostDump<'_> {
    /// Restores the copy and serves it every page; an error makes CRIU resume the source.
    fn migrate(&mut self) -> Result<(), String> {
        let source_images = self.dir.join("source");
        let target_images = self.dir.join("target");
        let source =
            Arc::new(PageSource::open(&source_images, self.root).map_err(|e| format!("page source: {e}"))?);
        copy_images(&source_images, &target_images).map_err(|e| format!("copy the images: {e}"))?;
        let target_logs = self.dir.join("target-logs");
        let mut pager = LazyPager::start(&target_images, &target_logs, Box::new(Arc::clone(&source)))
            .map_err(|e| format!("pager: {e}"))?;
        let opts = RestoreOptions::new(&target_images, LogTarget::new(&target_logs, "restore.log"))
            .tcp_established(self.tcp_established)
            .restore_sibling(true)
            .lazy_pages(true);
        let restored = self
            .criu
            .restore(&opts, &mut RecordingNotify::default())
            .map_err(|e| format!("lazy restore: {e}; log {}", target_logs.join("restore.log").display()))?;
        self.restored = Some(restored.pid);
        match pager.wait_done(SERVE_TIMEOUT) {
            Ok(stats) => {
                pager.stop();
                eprintln!(
                    "lazy_local: {} bytes in {} requests, {} faults",
                    stats.bytes, stats.requests, stats.faults
                );
                Ok(())
            }
            Err(e) => {
                // The copy waits on its missing pages while the pager lives: kill it first.
                let _ = ferry_sys::kill(restored.pid, ferry_sys::Signal::Kill);
                let _ = ferry_sys::wait_child(restored.pid);
                self.restored = None;
                pager.stop();
                Err(format!("serving the pages: {e}"))
            }
        }
    }
}

impl NotifyHandler for AtPostDump<'_> {
    fn notify(&mut self, event: &Notify, _pid: Option<i32>) -> Result<(), String> {
        match event {
            Notify::PostDump => self.migrate().inspect_err(|e| eprintln!("lazy_local: post-dump: {e}")),
            _ => Ok(()),
        }
    }
}

fn copy_images(from: &Path, to: &Path) -> std::io::Result<()> {
    fs::create_dir_all(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        if e.file_name().to_string_lossy().ends_with(".img") {
            fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

fn run(root: i32, dir: &Path, tcp_established: bool) -> Result<i32, String> {
    let explicit = std::env::var_os("FERRY_CRIU").map(PathBuf::from);
    let criu =
        Criu::locate(explicit.as_deref()).map_err(|e| e.to_string())?.with_timeout(Duration::from_secs(300));
    let source_images = dir.join("source");
    fs::create_dir_all(&source_images).map_err(|e| e.to_string())?;
    let port = pick_port().map_err(|e| e.to_string())?;
    let log = LogTarget::new(dir.join("source-logs"), "dump.log");
    // As a migration's post-copy dump (ferry-runtime's checkpoint with lazy pages).
    let opts = DumpOptions::new(root, &source_images, log.clone())
        .lazy_pages(Some(port))
        .lazy_pages_undrained(true)
        .tcp_established(tcp_established);
    let restore_criu = match std::env::var_os("LAZY_LOCAL_RESTORE_CRIU") {
        Some(p) => Criu::locate(Some(Path::new(&p)))
            .map_err(|e| e.to_string())?
            .with_timeout(Duration::from_secs(300)),
        None => criu.clone(),
    };
    let at_post_dump =
        AtPostDump { criu: &restore_criu, root, tcp_established, dir: dir.to_path_buf(), restored: None };
    let mut handler = PageServerFinisher::new(port, at_post_dump);
    let dumped = criu.dump(&opts, &mut handler);
    let finished = handler.finish();
    let restored = handler.inner_mut().restored;
    dumped.map_err(|e| format!("lazy dump: {e}; log {}", log.path().display()))?;
    finished.map_err(|e| e.to_string())?;
    restored.ok_or_else(|| "nothing restored".to_string())
}

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let tcp_established = args.first().is_some_and(|a| a == "--tcp-established");
    if tcp_established {
        args.remove(0);
    }
    let (Some(pid), Some(dir)) = (args.first().and_then(|p| p.parse::<i32>().ok()), args.get(1)) else {
        eprintln!("usage: lazy_local [--tcp-established] PID DIR");
        return ExitCode::from(2);
    };
    match run(pid, Path::new(dir), tcp_established) {
        Ok(restored) => {
            println!("restored {restored}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lazy_local: {e}");
            ExitCode::FAILURE
        }
    }
}

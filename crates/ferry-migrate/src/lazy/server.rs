//! The target side: a `criu lazy-pages` daemon whose page server is ferry.
//!
//! The daemon gets one end of a Unix socket pair as its page-server connection
//! (`--page-server --ps-socket FD`), so no listener exists at all: no other process can serve
//! it pages or ask it anything. A thread answers its requests through a [`PageFetcher`].

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ferry_criu::LogTarget;

use super::proto::{Header, CMD_CLOSE, CMD_FORCE_CLOSE, CMD_GET, PAGE_SIZE};
use super::{LazyError, PageFetcher, MAX_REQUEST_PAGES};

/// How long the daemon is given to come up (listen for the restore).
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `stop` waits for a serving thread that is busy in its fetcher.
const STOP_JOIN: Duration = Duration::from_secs(2);
/// The name CRIU gives the daemon's socket, in its work directory.
const LAZY_SOCKET: &str = "lazy-pages.socket";

/// What a [`LazyServer`] has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LazyStats {
    /// Page bytes sent to the daemon.
    pub bytes: u64,
    /// Requests answered.
    pub requests: u64,
    /// When the first request arrived.
    pub first_request: Option<Instant>,
    /// When the daemon ended the session (every page delivered).
    pub finished: Option<Instant>,
    /// Time spent in the fetcher.
    pub fetching: Duration,
    /// Time spent sending pages to the daemon.
    pub sending: Duration,
}

/// A running `criu lazy-pages` daemon fed by ferry. Dropping it (or [`stop`](Self::stop)) kills
/// the daemon and closes its connection.
///
/// Order on failure: while the daemon lives, a restored task touching a missing page waits in
/// the kernel. Once the daemon is gone the kernel fills such pages with zeros, silently. So
/// kill the restored tree first, then stop the server.
#[derive(Debug)]
pub struct LazyServer {
    daemon: Child,
    /// A handle on ferry's end, to unblock the serving thread on stop.
    conn: UnixStream,
    stats: Arc<Mutex<LazyStats>>,
    done: mpsc::Receiver<Result<(), LazyError>>,
    outcome: Option<Result<(), String>>,
    thread: Option<thread::JoinHandle<UnixStream>>,
    /// ferry's end, kept open after a failed fetch so the daemon (and the tasks) keep waiting.
    parked: Option<UnixStream>,
    log: PathBuf,
    stopped: bool,
}

impl LazyServer {
    /// Starts `criu lazy-pages` on `images_dir` (the lazy dump's images), logging to `log`.
    ///
    /// `log.dir` must be the log directory of the lazy restore that follows: CRIU's restore
    /// looks for the daemon's socket (`lazy-pages.socket`) in its work directory, which
    /// ferry-criu sets to the log directory. One lazy restore at a time per directory.
    pub fn start(
        criu: &Path,
        images_dir: &Path,
        log: &LogTarget,
        fetcher: Box<dyn PageFetcher + Send>,
    ) -> Result<LazyServer, LazyError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |source| LazyError::Io { what, source }
        };
        fs::create_dir_all(&log.dir).map_err(io("create the log directory"))?;
        match fs::remove_file(log.dir.join(LAZY_SOCKET)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(LazyError::Io { what: "remove a stale lazy-pages.socket".into(), source: e })
            }
            _ => {}
        }
        let (ours, theirs) = UnixStream::pair().map_err(io("socket pair"))?;
        let (mut ready, ready_theirs) = UnixStream::pair().map_err(io("status socket pair"))?;
        let stderr = File::create(log.dir.join(format!("{}.stderr", log.file_name)))
            .map_err(io("create the daemon's stderr file"))?;

        let mut cmd = Command::new(criu);
        cmd.arg("lazy-pages")
            .arg("-D")
            .arg(images_dir)
            .arg("-W")
            .arg(&log.dir)
            .arg("-o")
            .arg(&log.file_name)
            .arg(format!("-v{}", log.level as i32))
            .arg("--page-server")
            .arg("--ps-socket")
            .arg(theirs.as_raw_fd().to_string())
            .arg("--status-fd")
            .arg(ready_theirs.as_raw_fd().to_string());
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr);
        ferry_sys::inherit_fd_in_child(&mut cmd, theirs.as_fd());
        ferry_sys::inherit_fd_in_child(&mut cmd, ready_theirs.as_fd());
        let mut daemon = cmd.spawn().map_err(io("start criu lazy-pages"))?;
        drop(theirs);
        drop(ready_theirs);
        let log_path = log.path();

        // The daemon writes one byte once its socket listens, and closes the fd.
        let _ = ready.set_read_timeout(Some(START_TIMEOUT));
        let mut byte = [0u8; 1];
        if !matches!(ready.read(&mut byte), Ok(1)) {
            let _ = daemon.kill();
            let status = daemon.wait().ok();
            return Err(LazyError::Daemon(format!(
                "criu lazy-pages did not come up ({}); see {}",
                status.map_or("still running".into(), |s| s.to_string()),
                log_path.display()
            )));
        }

        let conn = match ours.try_clone() {
            Ok(c) => c,
            Err(e) => {
                let _ = daemon.kill();
                let _ = daemon.wait();
                return Err(LazyError::Io { what: "clone the daemon's connection".into(), source: e });
            }
        };
        let stats = Arc::new(Mutex::new(LazyStats::default()));
        let (tx, done) = mpsc::channel();
        let thread_stats = Arc::clone(&stats);
        let spawned = thread::Builder::new().name("ferry-lazy-serve".into()).spawn(move || {
            let mut sock = ours;
            let result = serve(&mut sock, fetcher, &thread_stats);
            let _ = tx.send(result);
            sock
        });
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => {
                let _ = daemon.kill();
                let _ = daemon.wait();
                return Err(LazyError::Io { what: "start the serving thread".into(), source: e });
            }
        };
        tracing::debug!(pid = daemon.id(), "criu lazy-pages daemon up");
        Ok(LazyServer {
            daemon,
            conn,
            stats,
            done,
            outcome: None,
            thread: Some(thread),
            parked: None,
            log: log_path,
            stopped: false,
        })
    }

    /// What was served so far.
    pub fn stats(&self) -> LazyStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Pid of the `criu lazy-pages` daemon.
    pub fn daemon_pid(&self) -> u32 {
        self.daemon.id()
    }

    /// The daemon's log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Waits until the daemon has every page and ended the session (then it exits), or until
    /// serving failed. On a failed fetch the daemon is left running, with its connection open,
    /// so that the restored tasks keep waiting for their pages rather than reading zeros: kill
    /// the restored tree, then [`stop`](Self::stop).
    pub fn wait_done(&mut self, timeout: Duration) -> Result<LazyStats, LazyError> {
        let deadline = Instant::now() + timeout;
        if self.outcome.is_none() {
            match self.done.recv_timeout(timeout) {
                Ok(r) => {
                    if let Some(t) = self.thread.take() {
                        let sock = t.join().ok();
                        if r.is_err() {
                            self.parked = sock;
                        }
                    }
                    self.outcome = Some(r.map_err(|e| e.to_string()));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => return Err(LazyError::Timeout(timeout)),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.outcome = Some(Err("the serving thread died".into()));
                }
            }
        }
        if let Some(Err(why)) = &self.outcome {
            return Err(LazyError::Serve(why.clone()));
        }
        // The session is over: the daemon exits on its own.
        loop {
            match self.daemon.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(self.stats()),
                Ok(Some(status)) => {
                    return Err(LazyError::Daemon(format!(
                        "criu lazy-pages exited with {status}; see {}",
                        self.log.display()
                    )))
                }
                Ok(None) if Instant::now() >= deadline => return Err(LazyError::Timeout(timeout)),
                Ok(None) => thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(LazyError::Io { what: "wait for criu lazy-pages".into(), source: e }),
            }
        }
    }

    /// Kills the daemon (if it still runs), closes the connection and returns what was served.
    pub fn stop(mut self) -> LazyStats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if self.daemon.try_wait().ok().flatten().is_none() {
            let _ = self.daemon.kill();
        }
        let _ = self.daemon.wait();
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
        self.parked = None;
        if let Some(t) = self.thread.take() {
            // A fetcher stuck in a remote call cannot be interrupted from here: leave it.
            if self.done.recv_timeout(STOP_JOIN).is_ok() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for LazyServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Answers the daemon until it ends the session.
fn serve(
    sock: &mut UnixStream,
    mut fetcher: Box<dyn PageFetcher + Send>,
    stats: &Mutex<LazyStats>,
) -> Result<(), LazyError> {
    let mut buf = Vec::new();
    loop {
        let Some(h) = Header::read_from(sock)
            .map_err(|e| LazyError::Io { what: "read a request".into(), source: e })?
        else {
            return Err(LazyError::Protocol(
                "the daemon closed its connection without ending the session".into(),
            ));
        };
        match h.command() {
            CMD_GET => {
                let now = Instant::now();
                stats.lock().unwrap_or_else(|e| e.into_inner()).first_request.get_or_insert(now);
                let pid = u32::try_from(h.dst_id)
                    .map_err(|_| LazyError::Protocol(format!("request for process id {}", h.dst_id)))?;
                let nr = u32::try_from(h.nr_pages)
                    .ok()
                    .filter(|n| (1..=MAX_REQUEST_PAGES).contains(n))
                    .ok_or_else(|| LazyError::Protocol(format!("request for {} pages", h.nr_pages)))?;
                fetcher.fetch(pid, h.vaddr, nr, &mut buf)?;
                let fetched = Instant::now();
                let want = u64::from(nr) * PAGE_SIZE;
                if buf.len() as u64 != want {
                    return Err(LazyError::Protocol(format!(
                        "fetcher returned {} bytes for {nr} pages",
                        buf.len()
                    )));
                }
                let write = |sock: &mut UnixStream, buf: &[u8]| -> std::io::Result<()> {
                    Header::pages_for(&h, u64::from(nr)).write_to(sock)?;
                    sock.write_all(buf)
                };
                write(sock, &buf).map_err(|e| LazyError::Io { what: "send pages".into(), source: e })?;
                let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
                s.bytes += want;
                s.requests += 1;
                s.fetching += fetched - now;
                s.sending += fetched.elapsed();
            }
            CMD_CLOSE | CMD_FORCE_CLOSE => {
                sock.write_all(&0i32.to_le_bytes())
                    .map_err(|e| LazyError::Io { what: "answer the session's end".into(), source: e })?;
                stats.lock().unwrap_or_else(|e| e.into_inner()).finished = Some(Instant::now());
                return Ok(());
            }
            other => return Err(LazyError::Protocol(format!("unknown command {other:#x} ({:#x})", h.cmd))),
        }
    }
}

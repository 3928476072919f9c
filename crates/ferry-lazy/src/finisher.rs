//! The source side's end of a lazy dump: closing the page server CRIU starts after post-dump.
//!
//! With `lazy_pages`, CRIU's dump (`cr_dump_finish`, criu/cr-dump.c) asks post-dump first and
//! only then, whatever the answer, runs its own lazy page server (`cr_lazy_mem_dump` ->
//! `cr_page_server`): it binds `ps.port` on every IPv4 address (through RPC `ps.address` and
//! `ps.fd` are ignored in lazy mode), listens with a backlog of one, sends the `status-ready`
//! notification, accepts ONE connection and serves it without any authentication. The tree
//! stays frozen until that session ends; then CRIU kills it (post-dump answered with success)
//! or resumes it (post-dump refused).
//!
//! ferry serves the pages itself before it answers post-dump, so CRIU's server has nothing left
//! to do: [`PageServerFinisher`] connects at `status-ready` (before CRIU even accepts), sends
//! the end-of-session command and half-closes; CRIU answers with status 0 and finishes.
//! Afterwards [`PageServerFinisher::finish`] checks that the session CRIU served was ours:
//! if another client got in first, ours is reset when CRIU closes its listener.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use ferry_criu::{Notify, NotifyHandler};

use super::proto::Header;
use super::LazyError;

/// The notification CRIU sends (through RPC) once its page server listens.
const STATUS_READY: &str = "status-ready";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A free TCP port for CRIU's page server (bound on every address for a moment and released).
pub fn pick_port() -> Result<u16, LazyError> {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| LazyError::Io { what: "find a free port".into(), source: e })
}

/// What closing CRIU's page server took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishReport {
    /// From CRIU's `status-ready` (it listens) to ferry's connection being established: the
    /// only time another client could have reached CRIU's server first.
    pub exposed: Duration,
    /// From `status-ready` to CRIU's answer to the end of the session, read after the dump
    /// returned (an upper bound).
    pub session: Duration,
}

/// Wraps the dump's notification handler (which serves the pages at post-dump) and closes
/// CRIU's lazy page server on `port` as soon as it listens. Use it for every lazy dump, whether
/// post-dump is answered with success or with an error: CRIU starts its server either way and
/// would wait for a client forever.
#[derive(Debug)]
pub struct PageServerFinisher<H> {
    inner: H,
    port: u16,
    conn: Option<(TcpStream, Instant, Duration)>,
    error: Option<String>,
}

impl<H: NotifyHandler> PageServerFinisher<H> {
    pub fn new(port: u16, inner: H) -> Self {
        PageServerFinisher { inner, port, conn: None, error: None }
    }

    pub fn inner(&self) -> &H {
        &self.inner
    }

    /// The wrapped handler, given back.
    pub fn into_inner(self) -> H {
        self.inner
    }

    pub fn inner_mut(&mut self) -> &mut H {
        &mut self.inner
    }

    /// True once CRIU's page server was reached and told to end.
    pub fn closed(&self) -> bool {
        self.conn.is_some()
    }

    /// After the dump returned: checks CRIU's answer on ferry's session (status 0). Fails if
    /// CRIU's server was never reached, or if it served another client (ours was never
    /// accepted, so it was reset).
    pub fn finish(&mut self) -> Result<FinishReport, LazyError> {
        if let Some(why) = self.error.take() {
            return Err(LazyError::Finish(why));
        }
        let Some((mut sock, ready_at, exposed)) = self.conn.take() else {
            return Err(LazyError::Finish(
                "CRIU's page server never announced itself (no status-ready)".into(),
            ));
        };
        let _ = sock.set_read_timeout(Some(ANSWER_TIMEOUT));
        let mut status = [0u8; 4];
        sock.read_exact(&mut status).map_err(|e| {
            LazyError::Finish(format!(
                "no answer on ferry's session ({e}): CRIU's page server may have served another client"
            ))
        })?;
        let session = ready_at.elapsed();
        match i32::from_le_bytes(status) {
            0 => Ok(FinishReport { exposed, session }),
            s => Err(LazyError::Finish(format!("CRIU's page server ended the session with status {s}"))),
        }
    }

    fn close_criu_server(&mut self) -> Result<(), String> {
        let ready_at = Instant::now();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let mut sock = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            .map_err(|e| format!("cannot reach CRIU's page server at {addr}: {e}"))?;
        let exposed = ready_at.elapsed();
        // CRIU reads the command once it accepts; after answering it waits for our end of
        // stream (to spare itself a TIME_WAIT), which the half-close gives it at once.
        sock.write_all(&Header::close(false).encode())
            .and_then(|_| sock.shutdown(Shutdown::Write))
            .map_err(|e| format!("cannot end CRIU's page-server session: {e}"))?;
        tracing::debug!(port = self.port, ?exposed, "told CRIU's lazy page server to end");
        self.conn = Some((sock, ready_at, exposed));
        Ok(())
    }
}

impl<H: NotifyHandler> NotifyHandler for PageServerFinisher<H> {
    fn notify(&mut self, event: &Notify, pid: Option<i32>) -> Result<(), String> {
        match event {
            Notify::Other(name) if name == STATUS_READY => {
                // Unreachable (never seen): refuse, so CRIU closes its listener instead of
                // waiting in accept() forever. CRIU then resumes the tree even after a successful
                // post-dump (network still locked): the caller must kill it if the target runs.
                if let Err(why) = self.close_criu_server() {
                    tracing::warn!(%why, "lazy dump: CRIU's page server left open");
                    self.error = Some(why.clone());
                    return Err(why);
                }
                Ok(())
            }
            _ => self.inner.notify(event, pid),
        }
    }
}

//! Connections between agents: the transport (a byte stream, mutual TLS in ferryd), the
//! dialer, and the control channel's framing (postcard messages in `ferry-wire` frames).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use crate::proto::{Msg, KIND_MSG, PEER_CAP, PROTOCOL};
use crate::MigrateError;

/// A byte stream to a peer (mutual TLS in ferryd).
pub trait Conn: Read + Write + Send {
    /// Limits how long one read waits (`None`: no limit). The dialer sets the peer timeout;
    /// the phases that expect a steady flow (post-copy's pages and reports) shorten it, so
    /// that a cut link is noticed in seconds.
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> std::io::Result<()>;
}

impl Conn for ferry_wire::TlsStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> std::io::Result<()> {
        ferry_wire::TlsStream::set_read_timeout(self, timeout)
    }
}

impl Conn for std::os::unix::net::UnixStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> std::io::Result<()> {
        std::os::unix::net::UnixStream::set_read_timeout(self, timeout)
    }
}

impl Conn for std::net::TcpStream {
    fn set_read_timeout(&mut self, timeout: Option<Duration>) -> std::io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, timeout)
    }
}

/// Opens authenticated connections to peers.
pub trait Dialer: Send + Sync {
    /// A connection to `node` at `addr`, and the Ed25519 key its peer was authenticated by.
    fn dial(&self, node: &str, addr: SocketAddr) -> Result<(Box<dyn Conn>, [u8; 32]), MigrateError>;
}

/// Dials `node` and exchanges hellos; returns the channel and the peer's keys.
pub(crate) fn connect_with(
    dialer: &dyn Dialer,
    addr: Option<SocketAddr>,
    node: &str,
    hello: &Msg,
) -> Result<(Channel, [u8; 32], [u8; 32]), MigrateError> {
    let addr = addr.ok_or_else(|| MigrateError::UnknownNode(node.into()))?;
    let (conn, peer_key) = dialer.dial(node, addr)?;
    let mut ch = Channel::new(conn, node);
    ch.peer_key = Some(peer_key);
    ch.send(hello)?;
    match ch.recv("hello")? {
        Msg::Hello { protocol, ed25519, x25519, .. } if protocol == PROTOCOL => {
            if ed25519 != peer_key {
                return Err(MigrateError::Refused(format!(
                    "{node} says hello with a key other than its certificate's"
                )));
            }
            Ok((ch, ed25519, x25519))
        }
        Msg::Hello { protocol, .. } => Err(MigrateError::Refused(format!(
            "node {node} speaks migration protocol {protocol}, this node {PROTOCOL}: run the same ferry version"
        ))),
        other => Err(unexpected("hello", &other)),
    }
}

/// A control connection: postcard messages in frames, and chunk batches.
pub(crate) struct Channel {
    pub(crate) conn: Box<dyn Conn>,
    pub(crate) node: String,
    /// The Ed25519 key the peer was authenticated by (TLS), when known.
    pub(crate) peer_key: Option<[u8; 32]>,
}

impl Channel {
    pub(crate) fn new(conn: Box<dyn Conn>, node: &str) -> Channel {
        Channel { conn, node: node.to_owned(), peer_key: None }
    }

    /// See [`Conn::set_read_timeout`].
    pub(crate) fn set_read_timeout(&mut self, timeout: Duration) {
        if let Err(e) = self.conn.set_read_timeout(Some(timeout)) {
            tracing::debug!(error = %e, "cannot shorten a connection's read timeout");
        }
    }

    pub(crate) fn send(&mut self, msg: &Msg) -> Result<(), MigrateError> {
        ferry_wire::frame::send(&mut self.conn, KIND_MSG, msg)?;
        self.conn.flush().map_err(|e| MigrateError::Wire(e.into()))
    }

    /// The next frame: a message, or (kind, payload) of another kind. EOF is an error.
    pub(crate) fn next(
        &mut self,
        phase: &str,
    ) -> Result<Result<Msg, ferry_wire::frame::Frame>, MigrateError> {
        let frame = ferry_wire::frame::read_frame(&mut self.conn, PEER_CAP)?
            .ok_or_else(|| MigrateError::Lost { node: self.node.clone(), phase: phase.into() })?;
        if frame.kind != KIND_MSG {
            return Ok(Err(frame));
        }
        Ok(Ok(ferry_wire::frame::decode_payload(&frame)?))
    }

    /// The next message; a peer's `Error` becomes [`MigrateError::Remote`].
    pub(crate) fn recv(&mut self, phase: &str) -> Result<Msg, MigrateError> {
        match self.next(phase)? {
            Ok(Msg::Error { message }) => Err(MigrateError::Remote { node: self.node.clone(), message }),
            Ok(m) => Ok(m),
            Err(f) => {
                Err(MigrateError::protocol(format!("unexpected frame of kind {:#x} during {phase}", f.kind)))
            }
        }
    }

    /// Sends `msg` and reads the answer.
    pub(crate) fn call(&mut self, msg: &Msg, phase: &str) -> Result<Msg, MigrateError> {
        self.send(msg)?;
        self.recv(phase)
    }
}

pub(crate) fn unexpected(phase: &str, msg: &Msg) -> MigrateError {
    let name = format!("{msg:?}");
    let name: String = name.chars().take_while(|c| c.is_alphanumeric()).collect();
    MigrateError::protocol(format!("unexpected message {name} during {phase}"))
}

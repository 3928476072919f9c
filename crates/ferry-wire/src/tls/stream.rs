//! Connecting, accepting, and the stream both give.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::client::Resumption;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::server::NoServerSessionStorage;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, ConnectionCommon, ServerConfig,
    ServerConnection, StreamOwned,
};

use super::verify::{peer_of, PeerVerifier, Refusal};
use super::{key_hex, Identity, Trust};
use crate::frame::{read_frame, write_frame};
use crate::WireError;

/// Frame kind the server sends once, empty, when it has admitted the client. Reserved: the
/// protocols above must not use it.
pub const KIND_ADMITTED: u16 = 0xffff;
/// How long `accept` waits for a client to finish its handshake, unless set otherwise.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The node on the other side, as its certificate names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its Ed25519 public key: its identity.
    pub key: [u8; 32],
    /// The name in its certificate (first DNS name, else common name; may be empty).
    pub name: String,
}

/// Connects to and accepts peers with this node's identity and trust.
#[derive(Debug, Clone)]
pub struct Endpoint {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    handshake_timeout: Duration,
    verifier: Arc<PeerVerifier>,
}

impl Endpoint {
    /// TLS 1.3 only, client certificates mandatory, no session resumption (each connection
    /// checks the peer against the trust in force).
    pub fn new(identity: &Identity, trust: Trust) -> Result<Endpoint, WireError> {
        let verifier = Arc::new(PeerVerifier::new(trust)?);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions = [&rustls::version::TLS13];
        let chain = || vec![identity.cert()];
        let key = || PrivateKeyDer::Pkcs8(identity.key());
        let mut client = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map_err(WireError::TlsConfig)?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_auth_cert(chain(), key())
            .map_err(WireError::TlsConfig)?;
        client.resumption = Resumption::disabled();
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)
            .map_err(WireError::TlsConfig)?
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(chain(), key())
            .map_err(WireError::TlsConfig)?;
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        Ok(Endpoint {
            client: Arc::new(client),
            server: Arc::new(server),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            verifier,
        })
    }

    /// Replaces the pinned keys (`Trust::pinned`); handshakes from now on use the new list,
    /// both ways. The cluster CA stays as it was.
    pub fn set_pinned(&self, keys: Vec<[u8; 32]>) {
        self.verifier.set_pinned(keys);
    }

    /// How long `accept` gives a client to complete the handshake.
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Endpoint {
        self.handshake_timeout = timeout;
        self
    }

    /// Connects to the peer at `addr` and completes the handshake, all within `timeout`.
    /// Either side refusing the other is an error here.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<(TlsStream, Peer), WireError> {
        self.connect_as(addr, ServerName::IpAddress(addr.ip().into()), timeout)
    }

    /// [`Endpoint::connect`], sending `name` (the peer's node name) as server name. The server
    /// name is informational: the peer is admitted by its key, whatever its certificate names.
    pub fn connect_named(
        &self,
        addr: SocketAddr,
        name: &str,
        timeout: Duration,
    ) -> Result<(TlsStream, Peer), WireError> {
        let server_name = match ServerName::try_from(name.to_owned()) {
            Ok(n) => n,
            Err(_) => ServerName::IpAddress(addr.ip().into()),
        };
        self.connect_as(addr, server_name, timeout)
    }

    fn connect_as(
        &self,
        addr: SocketAddr,
        name: ServerName<'static>,
        timeout: Duration,
    ) -> Result<(TlsStream, Peer), WireError> {
        let deadline = Instant::now() + timeout;
        let tcp = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|source| WireError::Connect { addr, source })?;
        tcp.set_nodelay(true).map_err(|source| WireError::Connect { addr, source })?;
        let mut conn = ClientConnection::new(self.client.clone(), name).map_err(WireError::TlsConfig)?;
        let fail = |e| handshake_error(e, addr, timeout);
        handshake(&mut conn, &tcp, deadline).map_err(fail)?;
        let peer = peer_from(&conn, addr)?;
        let mut stream = StreamOwned::new(conn, tcp);
        // The server's word that it admitted us.
        set_deadline(&stream.sock, deadline).map_err(fail)?;
        let frame = read_frame(&mut stream, 0).map_err(|e| match e {
            WireError::Io(e) => fail(e),
            other => other,
        })?;
        clear_timeouts(&stream.sock)?;
        match frame {
            Some(f) if f.kind == KIND_ADMITTED => {}
            _ => return Err(WireError::NotAdmitted { addr }),
        }
        tracing::debug!(%addr, peer = %peer.name, key = %key_hex(&peer.key), "connected to peer");
        Ok((TlsStream { inner: Inner::Client(stream), peer: peer.clone(), addr }, peer))
    }

    /// Completes the handshake of a connection taken from a listener, within the handshake
    /// timeout. A refused client is an error here (and learns it in its `connect`).
    pub fn accept(&self, tcp: TcpStream) -> Result<(TlsStream, Peer), WireError> {
        let addr = tcp.peer_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let timeout = self.handshake_timeout;
        let deadline = Instant::now() + timeout;
        tcp.set_nodelay(true)?;
        let mut conn = ServerConnection::new(self.server.clone()).map_err(WireError::TlsConfig)?;
        let result = handshake(&mut conn, &tcp, deadline).map_err(|e| handshake_error(e, addr, timeout));
        if let Err(e) = &result {
            tracing::warn!(%addr, error = %e, "peer not admitted");
        }
        result?;
        let peer = peer_from(&conn, addr)?;
        let mut stream = StreamOwned::new(conn, tcp);
        let fail = |e| handshake_error(e, addr, timeout);
        set_deadline(&stream.sock, deadline).map_err(fail)?;
        write_frame(&mut stream, KIND_ADMITTED, &[]).map_err(|e| match e {
            WireError::Io(e) => fail(e),
            other => other,
        })?;
        clear_timeouts(&stream.sock)?;
        tracing::info!(%addr, peer = %peer.name, key = %key_hex(&peer.key), "peer admitted");
        Ok((TlsStream { inner: Inner::Server(stream), peer: peer.clone(), addr }, peer))
    }
}

/// Drives the handshake to its end, each read and write bounded by what is left of the time.
fn handshake<S>(conn: &mut ConnectionCommon<S>, tcp: &TcpStream, deadline: Instant) -> io::Result<()> {
    let mut io = DeadlineIo { tcp, deadline };
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut io) {
            // rustls writes one queued message after a failure; the alert that tells the peer
            // why may be behind another one.
            while conn.wants_write() && conn.write_tls(&mut io).is_ok() {}
            return Err(e);
        }
    }
    while conn.wants_write() {
        conn.write_tls(&mut io)?;
    }
    clear_timeouts(tcp)
}

/// Sets the socket's timeouts to what is left until `deadline`.
fn set_deadline(tcp: &TcpStream, deadline: Instant) -> io::Result<()> {
    let left = remaining(deadline)?;
    tcp.set_read_timeout(Some(left))?;
    tcp.set_write_timeout(Some(left))
}

fn clear_timeouts(tcp: &TcpStream) -> io::Result<()> {
    tcp.set_read_timeout(None)?;
    tcp.set_write_timeout(None)
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    match deadline.checked_duration_since(Instant::now()) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// A socket whose every read and write ends by a deadline.
struct DeadlineIo<'a> {
    tcp: &'a TcpStream,
    deadline: Instant,
}

impl DeadlineIo<'_> {
    fn timed<T>(&self, op: impl FnOnce(&TcpStream) -> io::Result<T>) -> io::Result<T> {
        set_deadline(self.tcp, self.deadline)?;
        op(self.tcp).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock => io::ErrorKind::TimedOut.into(),
            _ => e,
        })
    }
}

impl Read for DeadlineIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.timed(|mut t| t.read(buf))
    }
}

impl Write for DeadlineIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.timed(|mut t| t.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The verified peer of a finished handshake.
fn peer_from<S>(conn: &ConnectionCommon<S>, addr: SocketAddr) -> Result<Peer, WireError> {
    let cert = conn.peer_certificates().and_then(|c| c.first()).ok_or(WireError::NoClientCert { addr })?;
    let (key, name) = peer_of(cert).ok_or(WireError::Refused { addr, refusal: Refusal::BadCertificate })?;
    Ok(Peer { key, name })
}

/// Says what a failed handshake means for the operator.
fn handshake_error(e: io::Error, addr: SocketAddr, timeout: Duration) -> WireError {
    if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) {
        return WireError::HandshakeTimeout { addr, timeout };
    }
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
        return WireError::HandshakeIo { addr, source: e };
    };
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            match other.0.downcast_ref::<Refusal>() {
                Some(refusal) => WireError::Refused { addr, refusal: refusal.clone() },
                None => WireError::Handshake { addr, source: tls.clone() },
            }
        }
        rustls::Error::NoCertificatesPresented => WireError::NoClientCert { addr },
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::BadCertificate
            | AlertDescription::CertificateRequired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::HandshakeFailure),
        ) => WireError::RefusedByPeer { addr, alert: format!("{alert:?}") },
        other => WireError::Handshake { addr, source: other.clone() },
    }
}

/// An admitted connection: read and write frames with [`crate::frame`].
pub struct TlsStream {
    inner: Inner,
    peer: Peer,
    addr: SocketAddr,
}

enum Inner {
    Client(StreamOwned<ClientConnection, TcpStream>),
    Server(StreamOwned<ServerConnection, TcpStream>),
}

impl fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = match self.inner {
            Inner::Client(_) => "client",
            Inner::Server(_) => "server",
        };
        f.debug_struct("TlsStream")
            .field("side", &side)
            .field("addr", &self.addr)
            .field("peer", &self.peer)
            .finish()
    }
}

impl TlsStream {
    /// The peer, as admitted.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.addr
    }

    fn tcp(&self) -> &TcpStream {
        match &self.inner {
            Inner::Client(s) => &s.sock,
            Inner::Server(s) => &s.sock,
        }
    }

    /// Bounds each read (`None`: wait forever). A read that times out fails with
    /// `WouldBlock` or `TimedOut`; the stream stays usable.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.tcp().set_read_timeout(timeout)
    }

    /// Bounds each write (`None`: wait forever).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.tcp().set_write_timeout(timeout)
    }

    /// Ends the connection cleanly: the peer's next read sees the end (`read_frame` gives
    /// `Ok(None)`), not a truncation.
    pub fn shutdown(&mut self) -> Result<(), WireError> {
        match &mut self.inner {
            Inner::Client(s) => s.conn.send_close_notify(),
            Inner::Server(s) => s.conn.send_close_notify(),
        }
        self.flush()?;
        match self.tcp().shutdown(Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e.into()),
            _ => Ok(()),
        }
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Client(s) => s.read(buf),
            Inner::Server(s) => s.read(buf),
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Client(s) => s.write(buf),
            Inner::Server(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Inner::Client(s) => s.flush(),
            Inner::Server(s) => s.flush(),
        }
    }
}

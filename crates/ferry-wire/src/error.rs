//! The crate's one error type.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::tls::Refusal;

/// What went wrong on the wire. Messages say what failed; the source (when there is one) is
/// chained, not repeated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Reading or writing the connection failed.
    #[error("i/o on the peer connection failed")]
    Io(#[from] io::Error),
    /// The first four bytes are not `FRYW`.
    #[error(
        "not a ferry wire frame (magic {found:02x?}, expected \"FRYW\"): is the peer a ferry node, \
         and is this its peer port?"
    )]
    BadMagic {
        /// The four bytes read instead.
        found: [u8; 4],
    },
    /// The frame's format version is not the one this build speaks.
    #[error(
        "wire format version {found} is not supported (this build speaks {supported}): run the same \
         ferry version on both nodes"
    )]
    Version {
        /// Version in the frame.
        found: u16,
        /// Version this build speaks.
        supported: u16,
    },
    /// The header announces a payload above the reader's cap; nothing was allocated for it.
    #[error("frame of kind {kind} announces {len} bytes, above the cap of {cap}: refused")]
    TooLarge {
        /// Kind in the header.
        kind: u16,
        /// Announced payload length.
        len: u64,
        /// The cap in force.
        cap: u32,
    },
    /// The input ended inside a frame.
    #[error("connection closed inside a frame: {got} of {need} bytes")]
    Truncated {
        /// Bytes read of the header or payload being read.
        got: usize,
        /// Bytes that part should have.
        need: usize,
    },
    /// A typed payload did not decode as the expected message.
    #[error("payload of frame kind {kind} does not decode as the expected message")]
    Decode {
        /// Kind in the header.
        kind: u16,
        /// The decoder's complaint.
        #[source]
        source: postcard::Error,
    },
    /// A typed payload decoded, but bytes were left after it.
    #[error("payload of frame kind {kind} has {extra} bytes after the message")]
    TrailingBytes {
        /// Kind in the header.
        kind: u16,
        /// Bytes left over.
        extra: usize,
    },
    /// A message did not encode.
    #[error("message of kind {kind} does not encode")]
    Encode {
        /// Kind it was to be sent as.
        kind: u16,
        /// The encoder's complaint.
        #[source]
        source: postcard::Error,
    },
    /// rustls refused the configuration (a bug, or an unusable key).
    #[error("TLS configuration failed")]
    TlsConfig(#[source] rustls::Error),
    /// The TCP connection could not be made.
    #[error("cannot connect to peer {addr}: is its agent running, and the address right?")]
    Connect {
        /// Peer address.
        addr: SocketAddr,
        /// The system's complaint.
        #[source]
        source: io::Error,
    },
    /// The peer did not complete the handshake in time.
    #[error("no TLS handshake with {addr} within {timeout:?}: the peer went silent (not a ferry agent, or packets dropped)")]
    HandshakeTimeout {
        /// Peer address.
        addr: SocketAddr,
        /// The time it had.
        timeout: Duration,
    },
    /// The connection failed during the handshake.
    #[error("TLS handshake with {addr} failed")]
    HandshakeIo {
        /// Peer address.
        addr: SocketAddr,
        /// What the socket said.
        #[source]
        source: io::Error,
    },
    /// TLS itself failed (protocol, cryptography).
    #[error("TLS handshake with {addr} failed")]
    Handshake {
        /// Peer address.
        addr: SocketAddr,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
    /// This node refused the peer's certificate.
    #[error("refused peer {addr}: {refusal}")]
    Refused {
        /// Peer address.
        addr: SocketAddr,
        /// Why.
        refusal: Refusal,
    },
    /// The peer refused this node's certificate.
    #[error(
        "peer {addr} refused this node's certificate (TLS alert {alert}): pin this node's key there \
         with `ferry node trust` (the text `ferry keys show` prints here), or use a certificate from \
         the cluster CA it trusts"
    )]
    RefusedByPeer {
        /// Peer address.
        addr: SocketAddr,
        /// The alert it sent.
        alert: String,
    },
    /// The client presented no certificate.
    #[error("peer {addr} presented no certificate: ferry nodes authenticate with their node key")]
    NoClientCert {
        /// Peer address.
        addr: SocketAddr,
    },
    /// The handshake ended but the server did not confirm admission.
    #[error("peer {addr} did not confirm the connection: is it a ferry agent of the same version?")]
    NotAdmitted {
        /// Peer address.
        addr: SocketAddr,
    },
    /// A node name that cannot go into a certificate.
    #[error(
        "node name {name:?} cannot go into a certificate: use letters, digits, '-' and '.' (a DNS name)"
    )]
    BadNodeName {
        /// The name.
        name: String,
    },
    /// A CA name that cannot go into a certificate.
    #[error("cluster CA name {name:?} is not usable: 1 to 64 characters, no control characters")]
    BadCaName {
        /// The name.
        name: String,
    },
    /// The cluster CA file or certificate is not usable.
    #[error("cluster CA not usable: {why}; make one with `ferry node ca init`")]
    BadCa {
        /// What is wrong with it.
        why: &'static str,
    },
    /// This node's certificate file is not usable.
    #[error("this node's certificate is not usable: {why}; issue one with `ferry node ca issue`")]
    BadNodeCertificate {
        /// What is wrong with it.
        why: &'static str,
    },
    /// The certificate given as this node's is for another key.
    #[error(
        "the certificate is for key {cert_key}, not for this node's key {node_key}: was it issued \
         for another node, or before `ferry keys rotate`? Issue one with `ferry node ca issue`"
    )]
    NotThisNodesCertificate {
        /// The Ed25519 key in the certificate (hex).
        cert_key: String,
        /// This node's Ed25519 key (hex).
        node_key: String,
    },
    /// rcgen could not make a certificate.
    #[error("cannot make the {what} certificate")]
    Certificate {
        /// Which one.
        what: &'static str,
        /// rcgen's complaint.
        #[source]
        source: rcgen::Error,
    },
}

//! Mutual TLS between ferry nodes and the framing of the messages they exchange.
//!
//! # Frames
//! [`frame`]: `FRYW`, format version, message kind, payload length (big-endian), payload. A
//! reader has a cap on the payload length (default 16 MiB) and refuses a larger frame before
//! allocating; a wrong magic or version is refused with a message that says so. Typed payloads
//! are postcard ([`send`], [`recv`]). Kind `0xffff` ([`tls::KIND_ADMITTED`]) is this crate's.
//!
//! # Who may connect
//! A node's identity is its Ed25519 key (the one that signs its manifests), not a host name:
//! addresses change when workloads and nodes move, and a name in a certificate proves nothing
//! without someone vouching for it. A peer is admitted when either
//! - its key is **pinned** (`ferry node trust`): no CA to run, right for a few nodes, and
//!   the same pin says whose manifests to accept; or
//! - its certificate was issued by the **cluster CA** (signature and validity checked): a new
//!   node needs one certificate instead of a pin on every other node.
//!
//! Everything else is refused, with the refused key in hex in the error: unknown keys, other
//! CAs, expired certificates, RSA or ECDSA keys, clients without a certificate. Host names are
//! not checked; [`Peer`] gives the name the certificate carries, for messages only.
//!
//! # TLS 1.3 only
//! Both ends are ferry, so there is no older peer to talk to: TLS 1.3 removes the
//! renegotiation, cipher-suite and static-key choices of 1.2 and encrypts the certificates
//! (which name the nodes) on the wire. Client certificates are
//! mandatory, the only signature scheme is Ed25519, and sessions are not resumed, so every
//! connection is checked against the trust in force.
//!
//! # Blocking I/O
//! [`Endpoint::connect`] and [`Endpoint::accept`] return once the handshake is done and the
//! server has admitted the client (so that either side's refusal is an error there), and
//! never wait past their timeout. Use one thread per connection.
#![forbid(unsafe_code)]

mod error;
pub mod frame;
pub mod tls;

pub use error::WireError;
pub use frame::{decode_frame, read_frame, recv, send, write_frame, Frame};
pub use tls::{CaCert, ClusterCa, Endpoint, Identity, Peer, Refusal, TlsStream, Trust};

//! Mutual TLS 1.3 between nodes: [`Endpoint`] connects and accepts, [`TlsStream`] carries the
//! frames, [`Peer`] says who is on the other side.
//!
//! After the handshake the server sends one empty frame of kind [`KIND_ADMITTED`]; `connect`
//! waits for it, so that a client the server refuses learns it in `connect` (in TLS 1.3 the
//! client's handshake ends before the server has checked the client's certificate).

mod der;
mod identity;
mod stream;
mod verify;

use std::fmt::Write as _;

pub use identity::{CaCert, ClusterCa, Identity};
pub use stream::{Endpoint, Peer, TlsStream, DEFAULT_HANDSHAKE_TIMEOUT, KIND_ADMITTED};
pub use verify::{Refusal, Trust};

/// A key as lower-case hex, as messages show it.
pub fn key_hex(key: &[u8; 32]) -> String {
    let mut s = String::with_capacity(64);
    for b in key {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests;

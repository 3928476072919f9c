//! The crate's one error type.

use std::io;

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
}

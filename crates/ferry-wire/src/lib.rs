//! Mutual TLS between ferry nodes and the framing of the messages they exchange.
#![forbid(unsafe_code)]

mod error;
pub mod frame;

pub use error::WireError;
pub use frame::{decode_frame, read_frame, recv, send, write_frame, Frame};

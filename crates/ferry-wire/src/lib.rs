//! Mutual TLS between ferry nodes and the framing of the messages they exchange.
#![forbid(unsafe_code)]

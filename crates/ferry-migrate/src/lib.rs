//! Live migration between ferry nodes: the protocol between agents, the source and target
//! sides, the strategies (stop-copy, pre-copy by content, post-copy with lazy pages), the
//! journal that makes a migration a transaction, and the local API the CLI speaks to its agent.
#![forbid(unsafe_code)]
pub mod lazy;

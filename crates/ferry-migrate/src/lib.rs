//! Live migration between ferry nodes: the protocol between agents, the source and target
//! sides, the strategies (stop-copy, pre-copy by content, post-copy with lazy pages), the
//! journal that makes a migration a transaction, and the local API the CLI speaks to its agent.
#![forbid(unsafe_code)]

mod agent;
pub mod api;
pub mod auto;
pub mod client;
mod error;
pub use ferry_lazy::guard;
pub use ferry_sys::failpoint;
mod holder;
pub mod journal;
pub mod lab_agents;
pub use ferry_lazy as lazy;
mod node;
mod outcome;
mod pages;
mod peer;
pub mod phase;
pub mod proto;
mod recover;
mod ship;
mod source;
mod target;

pub use agent::Agent;
pub use error::{chain, MigrateError};
pub use node::{AgentConfig, Metrics};
pub use peer::{Conn, Dialer};

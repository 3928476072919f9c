//! ferryd: the node agent.

fn main() {}

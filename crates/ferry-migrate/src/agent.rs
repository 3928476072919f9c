//! The agent's entry points, which ferryd calls: a migration asked for locally (the source's
//! phases, `source`), a connection from a peer (the target's phases, `target`, or a page
//! channel, `pages`), and recovery at start (`recover`). The state they share is a
//! [`Node`](crate::node::Node); nothing below this module refers back to it.

use std::sync::Arc;

use ferry_runtime::Context;

use crate::api::{Event, MigrateRequest, NodeStatus, Report};
use crate::node::{AgentConfig, Metrics, Node};
use crate::peer::{Channel, Conn, Dialer};
use crate::MigrateError;

/// A node's migration agent.
pub struct Agent {
    node: Arc<Node>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("name", &self.node.config.name).finish_non_exhaustive()
    }
}

impl Agent {
    pub fn new(config: AgentConfig, ctx: Context, dialer: Box<dyn Dialer>) -> Result<Agent, MigrateError> {
        Ok(Agent { node: Arc::new(Node::new(config, ctx, dialer)?) })
    }

    pub fn name(&self) -> &str {
        &self.node.config.name
    }

    pub fn metrics(&self) -> &Metrics {
        &self.node.metrics
    }

    pub fn status(&self) -> NodeStatus {
        let n = &self.node;
        NodeStatus {
            name: n.config.name.clone(),
            listen: n.config.listen.clone(),
            peers: n.config.peers.keys().cloned().collect(),
            public_key: n.ctx.store.keys().public().to_text(),
            migrations_ok: n.metrics.migrations_ok.get(),
            migrations_failed: n.metrics.migrations_failed.get(),
            migrations_lost: n.metrics.migrations_lost.get(),
            arrivals_lost: n.metrics.arrivals_lost.get(),
        }
    }

    /// Migrates a workload of this node (the source side), streaming events to `events`.
    pub fn migrate(
        &self,
        req: &MigrateRequest,
        events: &mut dyn FnMut(Event),
    ) -> Result<Report, MigrateError> {
        let n = &self.node;
        let _one = n.busy.lock().map_err(|_| MigrateError::protocol("agent lock poisoned"))?;
        let result = crate::source::migrate(n, req, events);
        match &result {
            Ok(r) => {
                n.metrics.migrations_ok.inc();
                n.metrics.record(r);
            }
            Err(e) => {
                n.metrics.migrations_failed.inc();
                if matches!(e, MigrateError::WorkloadLost { .. }) {
                    n.metrics.migrations_lost.inc();
                }
            }
        }
        result
    }

    /// What `node` says of itself as a target (`ferry check --to`): this agent itself, or a
    /// peer asked over a connection of its own, the link to it measured on the way.
    pub fn target_facts(
        &self,
        node: &str,
        cpuinfo: Option<&[u8]>,
        container: Option<&[u8]>,
        tree: Option<&ferry_runtime::check::target::TreeNeeds>,
    ) -> Result<ferry_runtime::check::target::TargetFacts, MigrateError> {
        let n = &self.node;
        if node == n.config.name {
            return Ok(target_facts(n, cpuinfo, container, tree));
        }
        let mut ch = n.connect(node)?;
        let link = crate::source::probe_link(&mut ch)?;
        ch.send(&crate::proto::Msg::FactsQuery {
            cpuinfo: cpuinfo.map(<[u8]>::to_vec),
            container: container.map(<[u8]>::to_vec),
            tree: tree.cloned(),
        })?;
        match ch.recv("target facts")? {
            crate::proto::Msg::TargetFacts(mut facts) => {
                facts.link_bytes_per_s = link as u64;
                Ok(facts)
            }
            crate::proto::Msg::Error { message } => Err(MigrateError::Refused(message)),
            other => Err(MigrateError::protocol(format!("{node} answered a facts query with {other:?}"))),
        }
    }

    /// Serves one connection from an authenticated peer (the target side, a page channel, or
    /// a question about a migration). `peer_key`: the Ed25519 key the connection's peer was
    /// authenticated by.
    pub fn serve_peer(
        &self,
        conn: Box<dyn Conn>,
        peer: &str,
        peer_key: [u8; 32],
    ) -> Result<(), MigrateError> {
        let mut ch = Channel::new(conn, peer);
        ch.peer_key = Some(peer_key);
        crate::target::serve(&self.node, ch)
    }

    /// Finishes or undoes what a crash interrupted, as far as it can before serving peers
    /// (run at start); a frozen tree whose pages a target still needs is served again.
    pub fn recover(&self) -> Vec<String> {
        crate::recover::run(&self.node)
    }

    /// After `recover`, once this agent serves its peers: settles, in the background, what
    /// needs a peer's answer (a workload whose migration did not reach the switch gets its
    /// address back once its target holds no copy; one past the switch is let go once its
    /// target has every page or has given up).
    pub fn settle(&self) {
        let node = self.node.clone();
        std::thread::spawn(move || crate::recover::settle(&node));
    }
}

/// This node's facts as a target; `cpuinfo` (capped) is the asking host's CPU, for CRIU here.
pub(crate) fn target_facts(
    node: &Node,
    cpuinfo: Option<&[u8]>,
    container: Option<&[u8]>,
    tree: Option<&ferry_runtime::check::target::TreeNeeds>,
) -> ferry_runtime::check::target::TargetFacts {
    let mut facts =
        ferry_runtime::check::target::target_facts(&node.config.name, Ok(&node.ctx.criu), cpuinfo);
    facts.container = container.map(|record| container_problems(node, record));
    facts.tree = tree.map(|needs| {
        let mut problems = ferry_runtime::check::target::tree_problems(needs);
        problems.extend(address_problems(node, &needs.addresses));
        problems
    });
    facts
}

/// Whether this node can give a tree's own network namespace back its `addresses`: only a lab
/// node recreates one (target.rs), and only where no workload of this node holds the address.
fn address_problems(
    node: &Node,
    addresses: &[std::net::Ipv4Addr],
) -> Vec<ferry_runtime::check::target::NeedProblem> {
    use ferry_runtime::check::target::NeedProblem;
    let problem = |what: String| NeedProblem { kind: "address".into(), what, blocker: true };
    let Some(first) = addresses.first() else { return Vec::new() };
    let Some(lab) = &node.config.lab else {
        return vec![problem(format!(
            "the tree has a network namespace of its own ({first}), which this node can recreate only as a lab node"
        ))];
    };
    let mut out = Vec::new();
    for addr in addresses.iter().take(ferry_runtime::check::target::MAX_NEEDS) {
        match ferry_lab::workload_at(lab, &node.config.name, *addr) {
            Ok(Some(w)) => {
                let who = if w.pid == 0 { "arriving".to_owned() } else { format!("pid {}", w.pid) };
                out.push(problem(format!("{addr} is held by lab workload {} ({who})", w.id)));
            }
            Ok(None) => {}
            Err(e) => out.push(problem(format!("cannot read the lab's record of {addr}: {e}"))),
        }
    }
    out
}

/// What would keep a container of `record` from being recreated here: the preflight a
/// migration's `Prepare` runs (the record comes from a peer: parsed with its caps).
fn container_problems(node: &Node, record: &[u8]) -> Vec<String> {
    use ferry_runtime::container::{self, ContainerRecord};
    let record = match ContainerRecord::parse(record) {
        Ok(r) => r,
        Err(e) => return vec![e.to_string()],
    };
    match container::preflight(&node.ctx.endpoints, &record, &record.name) {
        Ok(()) => Vec::new(),
        Err(ferry_runtime::Error::ContainerRefused { reasons, .. }) => reasons,
        Err(e) => vec![e.to_string()],
    }
}

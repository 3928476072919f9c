//! `ferry lab`: several nodes on this machine (network namespaces on a bridge), and workloads
//! started on them like pods.

use crate::output::outln;
use std::ffi::OsString;
use std::path::Path;

use ferry_lab::{ExecOptions, Lab, LabConfig, LabError, Subnet};

use crate::cli::{Cli, LabAction};
use crate::exit::Exit;
use crate::Outcome;

pub fn run(cli: &Cli, action: &LabAction) -> Outcome {
    let (what, result) = match action {
        LabAction::Up { nodes, subnet, lab, no_agents } => {
            let result = up(lab.name.as_deref(), *nodes, subnet.as_deref());
            if result.is_ok() && !no_agents {
                if let Err(e) = start_agents(cli, lab.name.as_deref()) {
                    eprintln!("error: lab up failed: the nodes' agents did not start");
                    eprintln!("  cause: {e}");
                    if let Some(h) = e.hint() {
                        eprintln!("  hint: {h}");
                    }
                    let _ = down(lab.name.as_deref());
                    return Ok(Exit::Failure.into());
                }
            }
            ("lab up failed", result)
        }
        LabAction::Exec { node, log, command, lab, runtime: None, .. } => {
            ("lab exec failed", exec(lab.name.as_deref(), node, log.as_deref(), command))
        }
        LabAction::Exec { node, command, lab, runtime: Some(kind), id, image, memory, env, .. } => {
            let c = ContainerArgs { kind, id: id.as_deref(), image: image.as_deref(), memory: *memory, env };
            return exec_container(lab.name.as_deref(), node, &c, command);
        }
        LabAction::Down { lab } => ("lab down failed", down(lab.name.as_deref())),
        LabAction::Status { json, lab } => ("lab status failed", status(lab.name.as_deref(), *json)),
    };
    // Lab errors are not the runtime's: reported here, in the same shape as `exit::report`.
    match result {
        Ok(()) => crate::ok(),
        Err(err) => {
            report(what, &err);
            Ok(classify(&err).into())
        }
    }
}

fn up(name: Option<&str>, nodes: usize, subnet: Option<&str>) -> Result<(), LabError> {
    let mut config = LabConfig::select(name)?;
    if let Some(s) = subnet {
        config = config.with_subnet(s.parse::<Subnet>()?);
    }
    let lab = Lab::up(&config, nodes)?;
    let bridge = lab.bridge();
    outln!(
        "{} is up: {} node{} on bridge {} ({}/{}); state in {}",
        title(&config),
        lab.nodes().len(),
        if lab.nodes().len() == 1 { "" } else { "s" },
        bridge.name,
        bridge.ip,
        lab.subnet().prefix_len(),
        config.state_file().display()
    );
    for node in lab.nodes() {
        outln!("{}  {}  netns {}", node.name, node.ip, node.netns);
    }
    Ok(())
}

/// Starts a ferryd on every node of the lab (the binary next to this one, else on PATH).
fn start_agents(cli: &Cli, name: Option<&str>) -> Result<(), ferry_migrate::MigrateError> {
    let config = LabConfig::select(name)?;
    let lab = Lab::load(&config)?;
    let ferryd = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("ferryd")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| "ferryd".into());
    let sockets = ferry_migrate::lab_agents::start_agents(&lab, &ferryd, cli.criu.as_deref())?;
    for (node, socket) in lab.nodes().iter().zip(&sockets) {
        outln!(
            "{}  agent ferryd on {}:{}  socket {}",
            node.name,
            node.ip,
            ferry_migrate::lab_agents::PEER_PORT,
            socket.display()
        );
    }
    Ok(())
}

fn exec(name: Option<&str>, node: &str, log: Option<&Path>, command: &[OsString]) -> Result<(), LabError> {
    let config = LabConfig::select(name)?;
    let mut lab = Lab::load(&config)?;
    // Relative to where ferry was started, not to wherever the workload changes to.
    let log = log.map(|l| std::path::absolute(l).unwrap_or_else(|_| l.to_path_buf()));
    let w = lab.exec(node, command, &ExecOptions { log })?;
    outln!("{} {}", w.workload_id(), w.ip);
    Ok(())
}

/// What `lab exec --runtime` asks for.
struct ContainerArgs<'a> {
    kind: &'a str,
    id: Option<&'a str>,
    image: Option<&'a str>,
    memory: Option<u64>,
    env: &'a [String],
}

/// The lab's image directory for containers: busybox and what the demo needs (built by
/// `scripts/mkrootfs`; outside every lab's own directories, which `lab down` removes).
const DEFAULT_IMAGE: &str = "/var/cache/ferry/images/busybox";

fn exec_container(name: Option<&str>, node: &str, c: &ContainerArgs<'_>, command: &[OsString]) -> Outcome {
    let what = "lab exec failed";
    let fail = |e: ferry_migrate::MigrateError| {
        eprintln!("error: {what}");
        eprintln!("  cause: {e}");
        if let Some(h) = e.hint() {
            eprintln!("  hint: {h}");
        }
        Ok(Exit::Failure.into())
    };
    let config = match LabConfig::select(name) {
        Ok(c) => c,
        Err(e) => return fail(e.into()),
    };
    let mut lab = match Lab::load(&config) {
        Ok(l) => l,
        Err(e) => return fail(e.into()),
    };
    let args: Vec<String> = command.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    match start_container(&mut lab, node, c, &args) {
        Ok(w) => {
            outln!("{} {}", w.workload_id(), w.ip);
            crate::ok()
        }
        Err(e) => fail(e),
    }
}

fn start_container(
    lab: &mut Lab,
    node: &str,
    c: &ContainerArgs<'_>,
    args: &[String],
) -> Result<ferry_lab::Workload, ferry_migrate::MigrateError> {
    use ferry_migrate::lab_agents;
    use ferry_runtime::container::{self, CreateSpec, Endpoints};
    lab.node(node)?;
    let image_arg = c.image.unwrap_or(DEFAULT_IMAGE);
    if c.image.is_none() && !std::path::Path::new(DEFAULT_IMAGE).is_dir() {
        return Err(ferry_runtime::Error::Container(format!(
            "the lab's image {DEFAULT_IMAGE} is not built: run scripts/mkrootfs (or give --image)"
        ))
        .into());
    }
    // A directory is an image for runc as it is; the others import it on every node, so that
    // a migration finds it wherever the container goes.
    let image = if image_arg.starts_with('/') && c.kind != "runc" {
        let dir = std::path::Path::new(image_arg);
        let base =
            dir.file_name().map(|b| b.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
        let tag = format!("ferry-lab/{base}");
        let nodes: Vec<String> = lab.nodes().iter().map(|n| n.name.clone()).collect();
        for n in nodes {
            let endpoint = lab_agents::start_runtime(lab, &n, c.kind)?;
            let mut e = Endpoints::new(lab_agents::node_dir(lab.config().state_dir(), &n).join("store"));
            e.set(c.kind, endpoint);
            container::open(c.kind, &e)?.import_image(dir, &tag)?;
        }
        tag
    } else {
        image_arg.to_owned()
    };
    let endpoint = lab_agents::start_runtime(lab, node, c.kind)?;
    let mut endpoints = Endpoints::new(lab_agents::node_dir(lab.config().state_dir(), node).join("store"));
    endpoints.set(c.kind, endpoint);
    let rt = container::open(c.kind, &endpoints)?;
    let name = c.id.map(str::to_owned);
    let mut created: Option<String> = None;
    let label = format!("{}:{}", c.kind, name.clone().unwrap_or_else(|| "(new)".into()));
    let mut run = |netns: &std::path::Path| {
        let n = name.clone().unwrap_or_else(|| {
            let ns = netns.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            format!("w-{}", ns.rsplit('-').next().unwrap_or("0"))
        });
        let spec = CreateSpec {
            name: &n,
            image: &image,
            args,
            env: c.env,
            netns: Some(netns),
            memory_limit: c.memory.map(|m| m << 20),
            labels: Default::default(),
            mounts: Vec::new(),
        };
        let r = rt.create(&spec).map_err(|e| ferry_migrate::chain(&ferry_migrate::MigrateError::from(e)))?;
        created = Some(format!("{}:{}", c.kind, r.name));
        Ok(r.pid)
    };
    let w = lab.exec_container(node, &label, args.to_vec(), &mut run)?;
    // The record names the container as created (its name may have been chosen in `run`).
    match created {
        Some(id) if id != label => Ok(ferry_lab::rename_container(lab.config(), w.id, &id)?),
        _ => Ok(w),
    }
}

fn down(name: Option<&str>) -> Result<(), LabError> {
    let config = LabConfig::select(name)?;
    // The nodes' container runtimes first: their containers, daemons and mounts.
    if let Ok(lab) = Lab::load(&config) {
        ferry_migrate::lab_agents::stop_runtimes(&lab);
    }
    let r = Lab::down(&config)?;
    if r.nothing_found() {
        outln!("{} was not up: nothing to remove", title(&config));
    } else {
        outln!(
            "{} is down: killed {} processes, removed {} network namespaces and {} links{}",
            title(&config),
            r.processes_killed.len(),
            r.netns_removed.len(),
            r.links_removed.len(),
            if r.had_state { "" } else { " (found by name: there was no state file)" }
        );
    }
    Ok(())
}

fn status(name: Option<&str>, json: bool) -> Result<(), LabError> {
    let config = LabConfig::select(name)?;
    let lab = Lab::load(&config)?;
    if json {
        let nodes: Vec<_> = lab
            .nodes()
            .iter()
            .map(|n| {
                // Where the node's instance of each container runtime is reached.
                let runtimes: serde_json::Map<String, serde_json::Value> =
                    ferry_migrate::lab_agents::runtime_endpoints(&lab, &n.name)
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|e| e.split_once('=').map(|(k, v)| (k.to_owned(), v.into())))
                        .collect();
                serde_json::json!({
                    "name": n.name, "ip": n.ip, "netns": n.netns, "veth": n.veth, "runtimes": runtimes,
                    "store": ferry_migrate::lab_agents::node_dir(config.state_dir(), &n.name).join("store"),
                })
            })
            .collect();
        let workloads: Vec<_> = lab
            .workloads()
            .iter()
            .map(|w| {
                serde_json::json!({
                    "id": w.workload_id(), "pid": w.pid, "ip": w.ip, "node": w.node, "netns": w.netns,
                    "container": w.container,
                    "veth": w.veth, "command": w.command, "log": w.log, "running": w.is_running(),
                })
            })
            .collect();
        let doc = serde_json::json!({
            "name": config.name(),
            "subnet": lab.subnet().to_string(),
            "bridge": { "name": lab.bridge().name, "ip": lab.bridge().ip },
            "state": config.state_file(),
            "nodes": nodes,
            "workloads": workloads,
        });
        outln!("{doc:#}");
        return Ok(());
    }
    let bridge = lab.bridge();
    outln!(
        "{}: bridge {} ({}/{}); state in {}",
        title(&config),
        bridge.name,
        bridge.ip,
        lab.subnet().prefix_len(),
        config.state_file().display()
    );
    for node in lab.nodes() {
        outln!("{}  {}  netns {}", node.name, node.ip, node.netns);
    }
    for w in lab.workloads() {
        let state = if w.is_running() { "running" } else { "gone" };
        outln!(
            "{}  {}  on {}  netns {}  {state}  {}",
            w.workload_id(),
            w.ip,
            w.node,
            w.netns,
            w.command.join(" ")
        );
    }
    Ok(())
}

/// "The lab" or "Lab NAME", to start a line with.
fn title(config: &LabConfig) -> String {
    let text = config.describe();
    let mut chars = text.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

fn classify(err: &LabError) -> Exit {
    match err {
        LabError::NotRoot { .. } => Exit::NotPermitted,
        LabError::ToolMissing { .. } => Exit::Environment,
        LabError::InvalidName { .. }
        | LabError::InvalidSubnet { .. }
        | LabError::NodeCount { .. }
        | LabError::EmptyCommand
        | LabError::CommandNotFound { .. } => Exit::Usage,
        LabError::NotUp { .. } | LabError::UnknownNode { .. } | LabError::UnknownWorkload { .. } => {
            Exit::NotFound
        }
        LabError::AlreadyUp { .. }
        | LabError::Leftovers { .. }
        | LabError::SubnetInUse { .. }
        | LabError::NoFreeSubnet { .. }
        | LabError::AddressesExhausted { .. } => Exit::Conflict,
        LabError::DamagedState { .. } => Exit::Damaged,
        LabError::Command { .. }
        | LabError::Spawn { .. }
        | LabError::Io { .. }
        | LabError::WorkloadDidNotStart { .. }
        | LabError::WorkloadExited { .. }
        | LabError::ContainerDidNotStart { .. }
        | LabError::DownIncomplete { .. } => Exit::Failure,
    }
}

/// `error: WHAT`, each cause once, then the hint.
fn report(what: &str, err: &LabError) {
    eprintln!("error: {what}");
    let mut source: Option<&dyn std::error::Error> = Some(err);
    while let Some(e) = source {
        eprintln!("  cause: {e}");
        source = e.source();
    }
    if let Some(hint) = err.hint() {
        eprintln!("  hint: {hint}");
    }
}

//! `up`, `exec`, `down`: the lab's objects, created through `ip`, processes started through
//! `setsid`, `nsenter` and `unshare`.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use ferry_sys::Signal;

use crate::state::{State, StateLock};
use crate::sys::{self, ip, ip_in, tool, Usage};
use crate::{Bridge, LabConfig, LabError, Node, Subnet, Workload};

/// How long `exec` waits for the workload to appear in its namespaces.
const START_WAIT: Duration = Duration::from_secs(10);
/// How long `down` keeps killing processes that are still in the lab's namespaces.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long `down` waits for the kernel to finish removing links and namespaces.
const GONE_WAIT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

/// Starts a recorded workload; returns its root's pid and start time.
type StartFn<'a> = dyn FnMut(&State, &Workload) -> Result<(i32, u64), LabError> + 'a;

/// How `exec` starts a workload.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// Append the workload's stdout and stderr to this file (created 0600 if missing) instead
    /// of /dev/null. It is opened once, write-only for appending: CRIU checks on restore that
    /// each file a process holds has the size it had at the checkpoint, except files opened
    /// that way (logs), so the log may grow after a checkpoint and the restore still works
    /// (what was written meanwhile stays in it).
    pub log: Option<PathBuf>,
}

/// What `down` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DownReport {
    /// A state file was there (else the lab's objects were found by name only).
    pub had_state: bool,
    pub processes_killed: Vec<i32>,
    pub netns_removed: Vec<String>,
    pub links_removed: Vec<String>,
}

impl DownReport {
    /// True if there was no lab to take down.
    pub fn nothing_found(&self) -> bool {
        !self.had_state
            && self.processes_killed.is_empty()
            && self.netns_removed.is_empty()
            && self.links_removed.is_empty()
    }
}

/// A lab that is up: a bridge with an address in the root namespace, nodes in network
/// namespaces on it, and the workloads `exec` started.
#[derive(Debug, Clone)]
pub struct Lab {
    config: LabConfig,
    state: State,
}

impl Lab {
    /// Creates `nodes` nodes (`node1`..) and the bridge that joins them to this machine.
    /// Refuses if the lab is already up, or left objects behind (`down` removes them), or its
    /// subnet is in use; a failure half way removes what it created.
    pub fn up(config: &LabConfig, nodes: usize) -> Result<Lab, LabError> {
        sys::preflight()?;
        let lock = StateLock::acquire(config)?;
        if let Some(state) = State::load(config)? {
            return Err(LabError::AlreadyUp {
                lab: config.describe(),
                nodes: state.nodes.len(),
                state: config.state_file(),
                select: config.cli_select(),
            });
        }
        let state = match plan(config, nodes) {
            Ok(state) => state,
            Err(e) => {
                // Refused before anything was made: leave no state directory behind.
                lock.remove_with_dir();
                return Err(e);
            }
        };
        // Recorded before anything exists, so that a crash from here on leaves a record.
        state.save(config)?;
        if let Err(e) = create(&state).and_then(|()| keep_host_netns(config)) {
            let _ = teardown(config, Some(&state));
            let _ = State::remove(config);
            lock.remove_with_dir();
            return Err(e);
        }
        Ok(Lab { config: config.clone(), state })
    }

    /// The lab `config` names, as its state file describes it.
    pub fn load(config: &LabConfig) -> Result<Lab, LabError> {
        // The state is root's alone (0700 directory): say so rather than "permission denied".
        if !ferry_sys::is_root() {
            return Err(LabError::NotRoot { uid: ferry_sys::effective_uid() });
        }
        let state = State::load(config)?.ok_or_else(|| not_up(config))?;
        Ok(Lab { config: config.clone(), state })
    }

    /// Kills every process in the lab's namespaces (and the workloads it recorded), removes
    /// its links, namespaces and state. Works without a state file (after a crash, or if it
    /// was deleted): the lab's objects are found by their names. Taking down a lab that is
    /// not up is no error.
    pub fn down(config: &LabConfig) -> Result<DownReport, LabError> {
        sys::preflight()?;
        let lock = StateLock::acquire(config)?;
        let state = match State::load(config) {
            Ok(state) => state,
            // A damaged record is no reason to keep the lab: its objects are found by name.
            Err(LabError::DamagedState { .. }) => None,
            Err(e) => return Err(e),
        };
        let report = teardown(config, state.as_ref())?;
        State::remove(config)?;
        lock.remove_with_dir();
        Ok(DownReport { had_state: state.is_some(), ..report })
    }

    pub fn config(&self) -> &LabConfig {
        &self.config
    }

    pub fn subnet(&self) -> Subnet {
        self.state.subnet
    }

    /// The bridge; its address is this machine's in the lab.
    pub fn bridge(&self) -> &Bridge {
        &self.state.bridge
    }

    pub fn nodes(&self) -> &[Node] {
        &self.state.nodes
    }

    pub fn node(&self, name: &str) -> Result<&Node, LabError> {
        self.state.node(name)
    }

    /// Every workload `exec` started while this lab was up, running or not.
    pub fn workloads(&self) -> &[Workload] {
        &self.state.workloads
    }

    /// Re-reads the state file (other processes may have started workloads).
    pub fn refresh(&mut self) -> Result<(), LabError> {
        *self = Lab::load(&self.config)?;
        Ok(())
    }

    /// `nsenter --net=/run/netns/NODE-NETNS -- PROGRAM`: a command that runs in `node`'s
    /// network namespace (and nothing else of it; no private mount namespace, unlike
    /// `ip netns exec`, so that CRIU run this way sees the host's mounts).
    pub fn node_command(&self, node: &str, program: impl AsRef<OsStr>) -> Result<Command, LabError> {
        let node = self.node(node)?;
        let mut cmd = Command::new(tool("nsenter")?);
        cmd.arg(format!("--net={}", node.netns_path().display())).arg("--").arg(program);
        Ok(cmd)
    }

    /// Starts `argv` on `node` as a workload: PID 1 of a new pid namespace, session leader
    /// there, in a network namespace of its own whose veth is on the bridge, with the next
    /// address of the node's block. Its stdin is /dev/null, its output goes to /dev/null or
    /// `opts.log`; it is detached (its launcher is not our child) and keeps running after this
    /// process ends. Returns once it runs the command.
    pub fn exec<S: AsRef<OsStr>>(
        &mut self,
        node: &str,
        argv: &[S],
        opts: &ExecOptions,
    ) -> Result<Workload, LabError> {
        sys::preflight()?;
        let program = argv.first().ok_or(LabError::EmptyCommand)?.as_ref();
        if !sys::program_exists(program) {
            return Err(LabError::CommandNotFound { program: program.to_string_lossy().into_owned() });
        }
        let command = argv.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
        self.add_workload(node, command, opts.log.clone(), None, &mut |state, w| start(state, w, argv, opts))
    }

    /// Starts a container on `node` as a workload (`container` is its `KIND:NAME`): the lab
    /// makes its network namespace with the node's next address, `run` starts the container
    /// in it (given the namespace's path) and returns its init process's host PID.
    pub fn exec_container(
        &mut self,
        node: &str,
        container: &str,
        command: Vec<String>,
        run: &mut dyn FnMut(&Path) -> Result<i32, String>,
    ) -> Result<Workload, LabError> {
        sys::preflight()?;
        let node_name = node.to_owned();
        self.add_workload(node, command, None, Some(container.to_owned()), &mut |state, w| {
            attach(&w.netns, &w.veth, w.ip, state)?;
            let pid = run(&w.netns_path())
                .map_err(|detail| LabError::ContainerDidNotStart { node: node_name.clone(), detail })?;
            let start_time = sys::start_time(pid).ok_or_else(|| LabError::ContainerDidNotStart {
                node: node_name.clone(),
                detail: format!("its init process {pid} is gone"),
            })?;
            Ok((pid, start_time))
        })
    }

    /// Records a new workload of `node` before `start` creates it, and its PID after; a
    /// failed start removes its namespace and record.
    fn add_workload(
        &mut self,
        node: &str,
        command: Vec<String>,
        log: Option<PathBuf>,
        container: Option<String>,
        start: &mut StartFn<'_>,
    ) -> Result<Workload, LabError> {
        if !self.config.state_file().exists() {
            return Err(not_up(&self.config));
        }
        let _lock = StateLock::acquire(&self.config)?;
        // Fresh from the file: another process may have started workloads since we loaded it.
        let mut state = State::load(&self.config)?.ok_or_else(|| not_up(&self.config))?;
        let subnet = state.subnet;
        let (k, n) = {
            let node = state.node(node)?;
            (node.index, node.workloads_started)
        };
        let ip = subnet.workload_ip(k, n).ok_or_else(|| LabError::AddressesExhausted {
            node: node.into(),
            max: subnet.max_workloads_per_node(),
        })?;
        let id = state.next_workload;
        let mut workload = Workload {
            id,
            node: node.into(),
            pid: 0,
            start_time: 0,
            ip,
            netns: self.config.workload_netns(id),
            veth: self.config.workload_veth(id)?,
            command,
            log,
            container,
        };
        state.next_workload += 1;
        if let Some(node) = state.nodes.iter_mut().find(|n| n.index == k) {
            node.workloads_started += 1;
        }
        state.workloads.push(workload.clone());
        // Recorded before its namespace exists: a crash from here on leaves a record.
        state.save(&self.config)?;
        let started = start(&state, &workload);
        match started {
            Ok((pid, start_time)) => {
                workload.pid = pid;
                workload.start_time = start_time;
                if let Some(w) = state.workloads.iter_mut().find(|w| w.id == id) {
                    *w = workload.clone();
                }
            }
            Err(_) => {
                remove_workload(&workload);
                state.workloads.retain(|w| w.id != id);
            }
        }
        let saved = state.save(&self.config);
        self.state = state;
        started?;
        saved?;
        Ok(workload)
    }
}

/// Checks that `config`'s lab can come up with `nodes` nodes, and lays it out.
fn plan(config: &LabConfig, nodes: usize) -> Result<State, LabError> {
    let leftovers = lab_objects(config)?;
    if !leftovers.is_empty() {
        return Err(LabError::Leftovers {
            lab: config.describe(),
            objects: leftovers,
            select: config.cli_select(),
        });
    }
    let usage = Usage::read()?;
    let subnet = match (config.subnet(), config.name()) {
        (Some(s), _) => s,
        (None, None) => Subnet::DEFAULT,
        (None, Some(_)) => {
            free_subnet(&usage).ok_or_else(|| LabError::NoFreeSubnet { lab: config.describe() })?
        }
    };
    if nodes == 0 || nodes > subnet.max_nodes() {
        return Err(LabError::NodeCount { requested: nodes, max: subnet.max_nodes(), subnet });
    }
    let users = usage.users_of(&subnet);
    if !users.is_empty() {
        return Err(LabError::SubnetInUse { subnet, what: users.join("; ") });
    }
    let node_list = (1..=nodes)
        .map(|k| Node {
            name: LabConfig::node_name(k),
            index: k,
            netns: config.node_netns(k),
            veth: config.node_veth(k),
            ip: subnet.node_ip(k).unwrap_or(subnet.bridge_ip()),
            workloads_started: 0,
        })
        .collect();
    Ok(State::new(config, subnet, node_list))
}

fn not_up(config: &LabConfig) -> LabError {
    LabError::NotUp { lab: config.describe(), state: config.state_file(), select: config.cli_select() }
}

/// The first /24 of 198.19.0.0/16 nothing on this machine uses: for named labs, which must
/// stay clear of the default lab's 198.18.0.0/16.
fn free_subnet(usage: &Usage) -> Option<Subnet> {
    (0..=255u8)
        .filter_map(|x| Subnet::new(Ipv4Addr::new(198, 19, x, 0), 24).ok())
        .find(|s| usage.users_of(s).is_empty())
}

/// Namespaces and links of the root namespace whose names are the lab's.
fn lab_objects(config: &LabConfig) -> Result<Vec<String>, LabError> {
    let mut found: Vec<String> = sys::netns_names()
        .into_iter()
        .filter(|n| config.is_lab_netns(n))
        .map(|n| format!("network namespace {n}"))
        .collect();
    found.extend(
        sys::link_names()?.into_iter().filter(|l| config.is_lab_link(l)).map(|l| format!("link {l}")),
    );
    Ok(found)
}

fn create(state: &State) -> Result<(), LabError> {
    let bridge = &state.bridge.name;
    let cidr = format!("{}/{}", state.bridge.ip, state.subnet.prefix_len());
    let mac = state.subnet.bridge_mac();
    ip(&["link", "add", bridge, "address", &mac, "type", "bridge"])?;
    // No IPv6 link-local addresses on lab links: the lab uses 198.18.0.0/15 and nothing else.
    ip(&["link", "set", bridge, "addrgenmode", "none"])?;
    ip(&["addr", "add", &cidr, "dev", bridge])?;
    ip(&["link", "set", bridge, "up"])?;
    for node in &state.nodes {
        attach(&node.netns, &node.veth, node.ip, state)?;
    }
    Ok(())
}

/// A network namespace with `eth0` at `addr`, whose peer `veth` is a port of the bridge. The
/// only route inside is the lab's subnet: nothing is sent anywhere else.
pub(crate) fn attach(netns: &str, veth: &str, addr: Ipv4Addr, state: &State) -> Result<(), LabError> {
    attach_with_port(netns, veth, addr, state, true)
}

/// [`attach`], with the bridge's end of the veth left down unless `port_up`: nothing reaches
/// the namespace until [`crate::set_port`] brings it up.
pub(crate) fn attach_with_port(
    netns: &str,
    veth: &str,
    addr: Ipv4Addr,
    state: &State,
    port_up: bool,
) -> Result<(), LabError> {
    let cidr = format!("{addr}/{}", state.subnet.prefix_len());
    ip(&["netns", "add", netns])?;
    ip(&["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns])?;
    ip(&["link", "set", veth, "addrgenmode", "none"])?;
    ip(&["link", "set", veth, "master", &state.bridge.name])?;
    if port_up {
        ip(&["link", "set", veth, "up"])?;
    }
    ip_in(netns, &["link", "set", "lo", "up"])?;
    ip_in(netns, &["link", "set", "eth0", "addrgenmode", "none"])?;
    // The MAC follows from the address, so that wherever the address moves (with its
    // workload, to another node), neighbours' ARP entries for it stay right.
    ip_in(netns, &["link", "set", "eth0", "address", &mac_of(addr)])?;
    ip_in(netns, &["addr", "add", &cidr, "dev", "eth0"])?;
    ip_in(netns, &["link", "set", "eth0", "up"])?;
    Ok(())
}

/// The MAC of the `eth0` that holds `addr`: locally administered, unicast, `02:00:` and the
/// address's four bytes (the bridge's, `02:66:6c:...`, never matches).
pub fn mac_of(addr: Ipv4Addr) -> String {
    let [a, b, c, d] = addr.octets();
    format!("02:00:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// Creates the workload's namespace and starts it; returns its host pid and start time.
fn start<S: AsRef<OsStr>>(
    state: &State,
    w: &Workload,
    argv: &[S],
    opts: &ExecOptions,
) -> Result<(i32, u64), LabError> {
    attach(&w.netns, &w.veth, w.ip, state)?;
    let netns = sys::netns_id(&w.netns).ok_or_else(|| LabError::Command {
        command: format!("ip netns add {}", w.netns),
        stderr: "the namespace vanished right after it was created".into(),
    })?;
    let null = Path::new("/dev/null");
    let out = match &opts.log {
        // Opened once, O_WRONLY|O_APPEND: every process of the workload writes at its end, and
        // CRIU exempts such files from its size check on restore.
        Some(log) => OpenOptions::new().append(true).create(true).mode(0o600).open(log),
        None => OpenOptions::new().write(true).open(null),
    }
    .map_err(|source| LabError::Io {
        action: "cannot open the workload's output",
        path: opts.log.clone().unwrap_or_else(|| null.into()),
        source,
    })?;
    let err = out.try_clone().map_err(|source| LabError::Io {
        action: "cannot duplicate the descriptor of",
        path: opts.log.clone().unwrap_or_else(|| null.into()),
        source,
    })?;
    let setsid = tool("setsid")?;
    let stray = sys::inheritable_fds();
    let mut cmd = if stray.is_empty() {
        Command::new(&setsid)
    } else {
        // Descriptors we inherited without close-on-exec would reach the workload, and CRIU
        // would dump them with it: a shell closes them (doing it here would need unsafe code).
        let closes: String = stray.iter().map(|fd| format!(" {fd}>&-")).collect();
        let mut c = Command::new(tool("bash")?);
        c.arg("-c").arg(format!("exec{closes}; exec \"$@\"")).arg("ferry-lab").arg(&setsid);
        c
    };
    // The outer `setsid` (our child, no group leader, so it calls setsid() and execs in place)
    // puts the launcher in a session of its own: no hangup from our terminal. `nsenter --net`
    // enters only the network namespace: `ip netns exec` would also make a private mount
    // namespace that CRIU would have to dump. `unshare --pid --uts --fork` (a UTS namespace
    // too, so that a clone can get a host name of its own) without `--kill-child`:
    // that sets a parent-death signal, which CRIU restores. The inner `setsid` runs as PID 1
    // of the new namespace, where it is no group leader, so it too execs in place: the
    // workload is PID 1 and leads its own session, as CRIU requires of a tree it dumps.
    cmd.arg("--")
        .arg(tool("nsenter")?)
        .arg(format!("--net={}", sys::netns_path(&w.netns).display()))
        .arg("--")
        .arg(tool("unshare")?)
        .args(["--pid", "--uts", "--fork", "--"])
        .arg(&setsid)
        .arg("--")
        .args(argv)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let command = sys::describe(&cmd);
    let mut launcher = cmd.spawn().map_err(|source| LabError::Spawn { command: command.clone(), source })?;
    let exited = |launcher: &mut Child| match launcher.try_wait() {
        Ok(Some(status)) => Some(status.to_string()),
        Ok(None) => None,
        Err(e) => Some(format!("cannot wait for it: {e}")),
    };
    let fail =
        |status: String| LabError::WorkloadExited { node: w.node.clone(), status, log: opts.log.clone() };
    let ids = BTreeSet::from([netns]);
    // Its root is the one process in the namespace that is PID 1 of a pid namespace.
    let found = wait_for(START_WAIT, || {
        if let Some(status) = exited(&mut launcher) {
            return Some(Err(status));
        }
        let root = sys::pids_in_netns(&ids)
            .into_iter()
            .find(|&p| sys::ns_pids(p).is_some_and(|ns| ns.len() >= 2 && ns.last() == Some(&1)));
        root.map(Ok)
    });
    let pid = match found {
        Some(Ok(pid)) => pid,
        Some(Err(status)) => return Err(fail(status)),
        None => {
            let _ = launcher.kill();
            let _ = launcher.wait();
            let secs = START_WAIT.as_secs();
            return Err(LabError::WorkloadDidNotStart { node: w.node.clone(), secs, log: opts.log.clone() });
        }
    };
    // Until the inner setsid has exec'd the command, the pid runs setsid: wait for the switch
    // (unless the command is setsid itself), so that the caller sees the workload's own image.
    let setsid_exe = fs::canonicalize(&setsid).unwrap_or(setsid);
    let program = argv[0].as_ref().to_string_lossy();
    let program_is_setsid =
        sys::which(&program).and_then(|p| fs::canonicalize(p).ok()).is_some_and(|p| p == setsid_exe);
    let execd = wait_for(START_WAIT, || {
        if let Some(status) = exited(&mut launcher) {
            return Some(Err(status));
        }
        let exe = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        (program_is_setsid || exe != setsid_exe).then_some(Ok(()))
    });
    match execd {
        Some(Ok(())) => {}
        Some(Err(status)) => return Err(fail(status)),
        None => return Err(fail("it never ran the command".into())),
    }
    let start_time = sys::start_time(pid).ok_or_else(|| fail("it is gone".into()))?;
    // The launcher (unshare) waits for the workload; someone must reap the launcher in turn, or
    // a long-lived caller collects zombies. A short-lived one (the CLI) exits before it, and
    // the launcher passes to init.
    let _ = std::thread::Builder::new().name(format!("ferry-lab-reap-{pid}")).spawn(move || launcher.wait());
    Ok((pid, start_time))
}

/// Removes a workload whose start failed: its processes, veth and namespace.
pub(crate) fn remove_workload(w: &Workload) {
    if let Some(id) = sys::netns_id(&w.netns) {
        kill_all(&BTreeSet::from([id]), &[]);
    }
    let _ = ip(&["link", "del", &w.veth]);
    let _ = ip(&["netns", "del", &w.netns]);
}

/// Polls `check` until it answers or `limit` has passed.
fn wait_for<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(POLL);
    }
}

/// SIGKILLs every process in the namespaces `ids`, and the recorded `(pid, start)`s, until
/// none is left (a process may fork while we kill). Returns the pids killed and those that
/// would not go. Never this process: a `down` run from inside the lab must finish.
fn kill_all(ids: &BTreeSet<sys::NsId>, recorded: &[(i32, u64)]) -> (BTreeSet<i32>, Vec<i32>) {
    let me = std::process::id() as i32;
    let mut killed = BTreeSet::new();
    let mut holders: BTreeSet<std::path::PathBuf> = BTreeSet::new();
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let mut victims: BTreeSet<i32> = sys::pids_in_netns(ids).into_iter().collect();
        victims.extend(recorded.iter().filter(|(p, s)| sys::is_alive(*p, *s)).map(|(p, _)| *p));
        victims.remove(&me);
        if victims.is_empty() {
            // ferry's holders that held them, empty now.
            for dir in holders {
                let _ = wait_for(KILL_WAIT, || fs::remove_dir(&dir).ok());
                if let Some(parent) = dir.parent() {
                    let _ = fs::remove_dir(parent);
                }
            }
            return (killed, Vec::new());
        }
        if Instant::now() >= deadline {
            return (killed, victims.into_iter().collect());
        }
        for pid in &victims {
            // PID 1 of a pid namespace ignores SIGTERM; SIGKILL also takes its whole namespace.
            if ferry_sys::kill(*pid, Signal::Kill).is_ok() {
                killed.insert(*pid);
            }
        }
        // A frozen process (a migration's source copy, held by ferry after the switch) keeps
        // its SIGKILL pending until it is thawed.
        for pid in &victims {
            holders.extend(thaw_if_frozen(*pid));
        }
        sleep(POLL);
    }
}

/// Thaws the cgroup v1 freezer cgroup `pid` is in if it is frozen; returns it if it is one of
/// ferry's holders (`/ferry-hold/...`), to be removed once empty.
fn thaw_if_frozen(pid: i32) -> Option<std::path::PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == "freezer").then(|| path.to_owned())
    })?;
    if path == "/" {
        return None;
    }
    let dir = std::path::Path::new(FREEZER).join(path.trim_start_matches('/'));
    let state = dir.join("freezer.state");
    if fs::read_to_string(&state).is_ok_and(|s| s.trim() != "THAWED") {
        let _ = fs::write(&state, "THAWED");
    }
    path.starts_with("/ferry-hold/").then_some(dir)
}

/// The cgroup v1 freezer hierarchy.
const FREEZER: &str = "/sys/fs/cgroup/freezer";

/// Removes everything of the lab: recorded in `state`, or found by name.
/// Bind-mounts this process's network namespace (the host's, where the bridge is) on the
/// lab's `host-netns` file.
fn keep_host_netns(config: &LabConfig) -> Result<(), LabError> {
    let file = config.host_netns_file();
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&file)
        .map_err(|source| LabError::Io { action: "cannot create", path: file.clone(), source })?;
    let mut cmd = Command::new(tool("mount")?);
    cmd.arg("--bind").arg("/proc/self/ns/net").arg(&file);
    sys::run(cmd).map(drop)
}

/// Undoes [`keep_host_netns`].
fn release_host_netns(config: &LabConfig) {
    let file = config.host_netns_file();
    if file.exists() {
        if let Ok(umount) = tool("umount") {
            let mut cmd = Command::new(umount);
            cmd.arg(&file);
            let _ = sys::run(cmd);
        }
        let _ = fs::remove_file(&file);
    }
}

/// Removes what the nodes' agents kept under the state directory (stores, sockets, logs),
/// after unmounting what an agent killed mid-work left mounted there (private tmpfs).
fn remove_node_dirs(config: &LabConfig) -> Vec<String> {
    let mut left = Vec::new();
    for dir in [config.state_dir().join("nodes"), config.data_dir()] {
        if !dir.exists() {
            continue;
        }
        let prefix = dir.to_string_lossy().into_owned();
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|p| p.starts_with(&prefix))
            .collect();
        // Deepest first.
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        if let Ok(umount) = tool("umount") {
            for p in points {
                let mut cmd = Command::new(&umount);
                cmd.arg("-l").arg(p);
                let _ = sys::run(cmd);
            }
        }
        if let Err(e) = fs::remove_dir_all(&dir) {
            left.push(format!("{} ({e})", dir.display()));
        }
    }
    left
}

fn teardown(config: &LabConfig, state: Option<&State>) -> Result<DownReport, LabError> {
    release_host_netns(config);
    let mut left = Vec::new();
    let mut netns: BTreeSet<String> =
        sys::netns_names().into_iter().filter(|n| config.is_lab_netns(n)).collect();
    let mut recorded = Vec::new();
    let mut wanted_links = BTreeSet::new();
    if let Some(s) = state {
        netns.extend(s.nodes.iter().map(|n| n.netns.clone()));
        netns.extend(s.workloads.iter().map(|w| w.netns.clone()));
        recorded.extend(s.workloads.iter().filter(|w| w.pid > 0).map(|w| (w.pid, w.start_time)));
        wanted_links.insert(s.bridge.name.clone());
        wanted_links.extend(s.nodes.iter().map(|n| n.veth.clone()));
        wanted_links.extend(s.workloads.iter().map(|w| w.veth.clone()));
    }
    netns.retain(|n| sys::netns_path(n).exists());
    let ids: BTreeSet<sys::NsId> = netns.iter().filter_map(|n| sys::netns_id(n)).collect();
    let (killed, survivors) = kill_all(&ids, &recorded);
    left.extend(survivors.iter().map(|p| format!("process {p}")));
    left.extend(remove_node_dirs(config));

    let present = sys::link_names()?;
    let mut links: Vec<String> =
        present.into_iter().filter(|l| config.is_lab_link(l) || wanted_links.contains(l)).collect();
    // Ports before the bridge; deleting a veth end removes its peer in the namespace too.
    links.sort_by_key(|l| *l == config.bridge_name() || state.is_some_and(|s| *l == s.bridge.name));
    let mut links_removed = Vec::new();
    for link in links {
        match ip(&["link", "del", &link]) {
            Ok(_) => links_removed.push(link),
            // Gone meanwhile: a veth whose namespace was destroyed takes its peer with it.
            Err(LabError::Command { stderr, .. }) if stderr.contains("Cannot find device") => {}
            Err(e) => left.push(format!("link {link} ({e})")),
        }
    }
    let mut netns_removed = Vec::new();
    for ns in netns {
        match ip(&["netns", "del", &ns]) {
            Ok(_) => netns_removed.push(ns),
            Err(e) => left.push(format!("network namespace {ns} ({e})")),
        }
    }
    // The kernel dismantles namespaces in the background; wait until nothing of ours is listed.
    let remaining = wait_for(GONE_WAIT, || {
        let objects = lab_objects(config).unwrap_or_default();
        objects.is_empty().then_some(())
    });
    if remaining.is_none() && left.is_empty() {
        left.extend(lab_objects(config)?);
    }
    if !left.is_empty() {
        return Err(LabError::DownIncomplete { left });
    }
    Ok(DownReport {
        had_state: state.is_some(),
        processes_killed: killed.into_iter().collect(),
        netns_removed,
        links_removed,
    })
}

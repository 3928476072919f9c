//! Which lab: its name, where its state lives, and the names of everything it creates.
//!
//! Every object of a lab carries the lab's prefix, and `lab down` without a state file removes
//! exactly the objects that match one of the lab's name patterns (prefix, then `br0`,
//! `nodeN` or `wN`). The patterns of two labs never match each other's objects: the default
//! lab uses `fl-` for links and `ferry-lab-` for namespaces, a lab named `t05` uses `flt05-`
//! and `ferry-lab-t05-` (whose remainder, `t05-node1`, is no default-lab pattern).

use std::path::{Path, PathBuf};

use crate::{LabError, Subnet};

/// Where the default lab keeps its state.
pub const DEFAULT_STATE_DIR: &str = "/run/ferry-lab";

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const IFNAME_MAX: usize = 15;

/// Which lab an operation works on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabConfig {
    name: Option<String>,
    state_dir: PathBuf,
    subnet: Option<Subnet>,
}

impl Default for LabConfig {
    fn default() -> LabConfig {
        LabConfig { name: None, state_dir: PathBuf::from(DEFAULT_STATE_DIR), subnet: None }
    }
}

impl LabConfig {
    /// The default lab: state in `/run/ferry-lab`, bridge `fl-br0`, namespaces
    /// `ferry-lab-node1`..., subnet 198.18.0.0/16.
    pub fn new() -> LabConfig {
        LabConfig::default()
    }

    /// A lab of its own beside the default one (for tests, or a second experiment): `name` is 1
    /// to 4 lowercase letters or digits; its state lives in `/run/ferry-lab-NAME`.
    pub fn named(name: &str) -> Result<LabConfig, LabError> {
        let invalid = |why: &str| LabError::InvalidName { name: name.into(), why: why.into() };
        if name.is_empty() || name.len() > 4 {
            return Err(invalid("it must be 1 to 4 characters long"));
        }
        if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
            return Err(invalid("only lowercase letters and digits are allowed"));
        }
        Ok(LabConfig {
            name: Some(name.into()),
            state_dir: PathBuf::from(format!("{DEFAULT_STATE_DIR}-{name}")),
            subnet: None,
        })
    }

    /// `named(name)` if a name is given, else the default lab.
    pub fn select(name: Option<&str>) -> Result<LabConfig, LabError> {
        name.map_or_else(|| Ok(LabConfig::new()), LabConfig::named)
    }

    /// The lab whose state is in `dir` (its name read from the state file): how an agent of
    /// a lab node finds its lab.
    pub fn from_state_dir(dir: impl Into<PathBuf>) -> Result<LabConfig, LabError> {
        let probe = LabConfig::new().with_state_dir(dir);
        let state = crate::state::State::load(&probe)?.ok_or_else(|| LabError::NotUp {
            lab: format!("the lab at {}", probe.state_dir.display()),
            state: probe.state_file(),
            select: String::new(),
        })?;
        Ok(LabConfig { name: state.name, ..probe })
    }

    /// Keeps the state somewhere else (it holds no secrets, but only root may change it).
    pub fn with_state_dir(mut self, dir: impl Into<PathBuf>) -> LabConfig {
        self.state_dir = dir.into();
        self
    }

    /// The subnet `up` uses. Without one, the default lab takes 198.18.0.0/16 and a named lab
    /// the first /24 of 198.19.0.0/16 no route of this machine touches.
    pub fn with_subnet(mut self, subnet: Subnet) -> LabConfig {
        self.subnet = Some(subnet);
        self
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub fn subnet(&self) -> Option<Subnet> {
        self.subnet
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Where the nodes' agents keep their stores and logs: on disk, not in the state
    /// directory's tmpfs (checkpoints of GiBs would fill /run).
    pub fn data_dir(&self) -> PathBuf {
        data_dir(&self.state_dir)
    }

    /// `STATE_DIR/host-netns`: a reference (bind mount) to the network namespace the lab was
    /// made from, where its bridge is; agents running inside nodes reach the bridge through it.
    pub fn host_netns_file(&self) -> PathBuf {
        self.state_dir.join("host-netns")
    }

    /// `STATE_DIR/state.json`: what the lab created.
    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("state.json")
    }

    pub(crate) fn lock_file(&self) -> PathBuf {
        self.state_dir.join("lock")
    }

    /// "the lab" or "lab NAME", for messages.
    pub fn describe(&self) -> String {
        match &self.name {
            None => "the lab".into(),
            Some(n) => format!("lab {n}"),
        }
    }

    /// The `--name` argument that selects this lab in the CLI, if any.
    pub fn cli_args(&self) -> Vec<String> {
        self.name.iter().flat_map(|n| ["--name".to_string(), n.clone()]).collect()
    }

    /// [`cli_args`](LabConfig::cli_args) as text to append to a command: ` --name NAME` or "".
    pub fn cli_select(&self) -> String {
        self.cli_args().iter().map(|a| format!(" {a}")).collect()
    }

    /// Prefix of the lab's interfaces in the root namespace (`fl-`, `flNAME-`).
    pub fn link_prefix(&self) -> String {
        format!("fl{}-", self.name.as_deref().unwrap_or(""))
    }

    /// Prefix of the lab's network namespaces (`ferry-lab-`, `ferry-lab-NAME-`).
    pub fn netns_prefix(&self) -> String {
        match &self.name {
            None => "ferry-lab-".into(),
            Some(n) => format!("ferry-lab-{n}-"),
        }
    }

    pub fn bridge_name(&self) -> String {
        format!("{}br0", self.link_prefix())
    }

    pub(crate) fn node_name(k: usize) -> String {
        format!("node{k}")
    }

    pub(crate) fn node_netns(&self, k: usize) -> String {
        format!("{}node{k}", self.netns_prefix())
    }

    /// The root-namespace end of node `k`'s veth pair.
    pub(crate) fn node_veth(&self, k: usize) -> String {
        format!("{}node{k}", self.link_prefix())
    }

    pub(crate) fn workload_netns(&self, id: u64) -> String {
        format!("{}w{id}", self.netns_prefix())
    }

    pub(crate) fn workload_veth(&self, id: u64) -> Result<String, LabError> {
        let name = format!("{}w{id}", self.link_prefix());
        if name.len() > IFNAME_MAX {
            return Err(LabError::Command {
                command: format!("ip link add {name}"),
                stderr: "interface name too long: the lab ran out of workload numbers".into(),
            });
        }
        Ok(name)
    }

    /// True for the lab's interfaces in the root namespace (bridge and veth ends).
    pub fn is_lab_link(&self, ifname: &str) -> bool {
        ifname
            .strip_prefix(&self.link_prefix())
            .is_some_and(|rest| rest == "br0" || numbered(rest, "node") || numbered(rest, "w"))
    }

    /// True for the lab's network namespaces (nodes and workloads).
    pub fn is_lab_netns(&self, name: &str) -> bool {
        name.strip_prefix(&self.netns_prefix())
            .is_some_and(|rest| numbered(rest, "node") || numbered(rest, "w"))
    }
}

/// `stem` followed by a number, nothing else.
fn numbered(s: &str, stem: &str) -> bool {
    s.strip_prefix(stem).is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The data directory of the lab whose state is in `state_dir`: `/var/lib/<name>` for a state
/// directory under `/run` (`/run/ferry-lab-t3` -> `/var/lib/ferry-lab-t3`), else `STATE_DIR/data`.
pub fn data_dir(state_dir: &Path) -> PathBuf {
    match (state_dir.strip_prefix("/run"), state_dir.file_name()) {
        (Ok(_), Some(name)) => Path::new("/var/lib").join(name),
        _ => state_dir.join("data"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names() {
        let c = LabConfig::new();
        assert_eq!(c.bridge_name(), "fl-br0");
        assert_eq!(c.node_veth(1), "fl-node1");
        assert_eq!(c.node_netns(1), "ferry-lab-node1");
        assert_eq!(c.workload_netns(3), "ferry-lab-w3");
        assert_eq!(c.workload_veth(3).expect("veth"), "fl-w3");
        assert_eq!(c.state_file(), PathBuf::from("/run/ferry-lab/state.json"));
        assert!(c.cli_args().is_empty());
    }

    #[test]
    fn named_labs_have_their_own_names() {
        let c = LabConfig::named("t05").expect("name");
        assert_eq!(c.bridge_name(), "flt05-br0");
        assert_eq!(c.node_netns(2), "ferry-lab-t05-node2");
        assert_eq!(c.state_dir(), Path::new("/run/ferry-lab-t05"));
        assert_eq!(c.cli_args(), ["--name", "t05"]);
        for bad in ["", "abcde", "T1", "a-b", "a/b", "ä"] {
            assert!(LabConfig::named(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn patterns_never_cross_labs() {
        let main = LabConfig::new();
        let a = LabConfig::named("a").expect("a");
        let ab = LabConfig::named("ab").expect("ab");
        let w1 = LabConfig::named("w1").expect("w1");
        let labs = [&main, &a, &ab, &w1];
        for (i, owner) in labs.iter().enumerate() {
            let links = [owner.bridge_name(), owner.node_veth(12), owner.workload_veth(7).expect("veth")];
            let netns = [owner.node_netns(3), owner.workload_netns(44)];
            for (j, other) in labs.iter().enumerate() {
                for l in &links {
                    assert_eq!(other.is_lab_link(l), i == j, "{l} vs {}", other.describe());
                }
                for n in &netns {
                    assert_eq!(other.is_lab_netns(n), i == j, "{n} vs {}", other.describe());
                }
            }
        }
        for stranger in
            ["fl-", "fl-node", "fl-br1", "fl-nodex", "fl-w1x", "eth0", "ferry-lab-", "ferry-lab-x"]
        {
            assert!(!main.is_lab_link(stranger) && !main.is_lab_netns(stranger), "{stranger}");
        }
    }

    #[test]
    fn interface_names_fit() {
        let c = LabConfig::named("abcd").expect("name");
        assert!(c.node_veth(255).len() <= IFNAME_MAX);
        assert!(c.workload_veth(999_999).is_ok());
        assert!(c.workload_veth(99_999_999).is_err());
    }

    #[test]
    fn data_lives_on_disk_for_labs_under_run() {
        assert_eq!(data_dir(Path::new("/run/ferry-lab-t3")), Path::new("/var/lib/ferry-lab-t3"));
        assert_eq!(data_dir(Path::new("/tmp/x/lab")), Path::new("/tmp/x/lab/data"));
    }
}

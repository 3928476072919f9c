//! The lab's addresses: one subnet inside 198.18.0.0/15 (set aside for benchmarking, never
//! routed on the internet), cut into one block per node.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::LabError;

/// The only range a lab may use.
pub const LAB_RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 0, 0), 15);

/// A subnet of [`LAB_RANGE`], /16 to /24, in which one lab lives.
///
/// Layout: block 0 holds the bridge (`.1` of the subnet); block K holds node K (the block's
/// `.1`) and the workloads started on it. In a /16 a block is a /24, so node K is
/// `198.18.K.1` and its workloads `198.18.K.10`, `.11`, ...; smaller subnets have 16 blocks of
/// 16 addresses (node at offset 1, workloads from offset 2). The last address of each block is
/// never handed out (it is the broadcast address of the last one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    base: u32,
    len: u8,
}

impl Subnet {
    /// The default lab's subnet: 198.18.0.0/16.
    pub const DEFAULT: Subnet = Subnet { base: u32::from_be_bytes([198, 18, 0, 0]), len: 16 };

    /// `addr/len`; it must be the subnet's first address, and lie in 198.18.0.0/15.
    pub fn new(addr: Ipv4Addr, len: u8) -> Result<Subnet, LabError> {
        let invalid = |why: &str| LabError::InvalidSubnet { input: format!("{addr}/{len}"), why: why.into() };
        if !(16..=24).contains(&len) {
            return Err(invalid("the prefix length must be 16 to 24"));
        }
        let base = u32::from(addr);
        if base & mask(len) != base {
            return Err(invalid("the address must be the first of the subnet (host bits zero)"));
        }
        if !overlaps((base, len), (u32::from(LAB_RANGE.0), LAB_RANGE.1)) {
            return Err(invalid("a lab may only use addresses in 198.18.0.0/15"));
        }
        Ok(Subnet { base, len })
    }

    pub fn base(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base)
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.len) == self.base
    }

    /// True if `addr/len` shares any address with this subnet.
    pub fn overlaps(&self, addr: Ipv4Addr, len: u8) -> bool {
        overlaps((self.base, self.len), (u32::from(addr), len.min(32)))
    }

    /// The bridge's address in the root namespace: the subnet's `.1`.
    pub fn bridge_ip(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.base + 1)
    }

    /// How many nodes fit (one block each, block 0 being the bridge's).
    pub fn max_nodes(&self) -> usize {
        (self.size() / self.block() - 1) as usize
    }

    /// How many workloads fit on one node.
    pub fn max_workloads_per_node(&self) -> usize {
        (self.block() - 1 - self.first_workload()) as usize
    }

    /// Node `k` (1-based), or `None` if it does not fit.
    pub fn node_ip(&self, k: usize) -> Option<Ipv4Addr> {
        (1..=self.max_nodes()).contains(&k).then(|| Ipv4Addr::from(self.block_start(k) + 1))
    }

    /// The `n`th workload (0-based) started on node `k`, or `None` if it does not fit.
    pub fn workload_ip(&self, k: usize, n: usize) -> Option<Ipv4Addr> {
        self.node_ip(k)?;
        (n < self.max_workloads_per_node())
            .then(|| Ipv4Addr::from(self.block_start(k) + self.first_workload() + n as u32))
    }

    /// A locally administered MAC for the bridge, fixed so that it does not follow its ports
    /// (a bridge otherwise takes the lowest port MAC, and neighbours' caches go stale whenever
    /// a port comes or goes). Unique per lab: subnets of labs never overlap.
    pub(crate) fn bridge_mac(&self) -> String {
        let [_, b, c, _] = self.base.to_be_bytes();
        format!("02:66:6c:{b:02x}:{c:02x}:01")
    }

    fn size(&self) -> u32 {
        1 << (32 - self.len)
    }

    fn block(&self) -> u32 {
        (self.size() / 256).max(16)
    }

    fn block_start(&self, k: usize) -> u32 {
        self.base + k as u32 * self.block()
    }

    /// Offset of a node's first workload in its block: `.10` where blocks are /24s, for
    /// addresses that read well; right after the node where blocks are small.
    fn first_workload(&self) -> u32 {
        if self.block() >= 256 {
            10
        } else {
            2
        }
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

fn overlaps(a: (u32, u8), b: (u32, u8)) -> bool {
    let len = a.1.min(b.1);
    a.0 & mask(len) == b.0 & mask(len)
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base(), self.len)
    }
}

impl FromStr for Subnet {
    type Err = LabError;

    fn from_str(s: &str) -> Result<Subnet, LabError> {
        let invalid = |why: &str| LabError::InvalidSubnet { input: s.into(), why: why.into() };
        let (addr, len) = s.trim().split_once('/').ok_or_else(|| invalid("write it as ADDRESS/LENGTH"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| invalid("not an IPv4 address"))?;
        let len: u8 = len.parse().map_err(|_| invalid("the prefix length is not a number"))?;
        Subnet::new(addr, len)
    }
}

impl TryFrom<String> for Subnet {
    type Error = LabError;

    fn try_from(s: String) -> Result<Subnet, LabError> {
        s.parse()
    }
}

impl From<Subnet> for String {
    fn from(s: Subnet) -> String {
        s.to_string()
    }
}

/// Parses `a.b.c.d/len` or a bare address (a /32), as `ip -j route` prints destinations.
pub(crate) fn parse_prefix(s: &str) -> Option<(Ipv4Addr, u8)> {
    match s.split_once('/') {
        Some((a, l)) => Some((a.parse().ok()?, l.parse().ok()?)),
        None => Some((s.parse().ok()?, 32)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("address")
    }

    #[test]
    fn default_layout_reads_well() {
        let s = Subnet::DEFAULT;
        assert_eq!(s.to_string(), "198.18.0.0/16");
        assert_eq!(s.bridge_ip(), ip("198.18.0.1"));
        assert_eq!(s.node_ip(1), Some(ip("198.18.1.1")));
        assert_eq!(s.node_ip(255), Some(ip("198.18.255.1")));
        assert_eq!(s.node_ip(0), None);
        assert_eq!(s.node_ip(256), None);
        assert_eq!(s.workload_ip(2, 0), Some(ip("198.18.2.10")));
        assert_eq!(s.workload_ip(255, 244), Some(ip("198.18.255.254")));
        assert_eq!(s.workload_ip(255, 245), None, "never the broadcast address");
        assert_eq!(s.max_nodes(), 255);
        assert_eq!(s.max_workloads_per_node(), 245);
        assert_eq!(s.bridge_mac(), "02:66:6c:12:00:01");
    }

    #[test]
    fn small_subnets_have_small_blocks() {
        let s: Subnet = "198.19.7.0/24".parse().expect("subnet");
        assert_eq!(s.bridge_ip(), ip("198.19.7.1"));
        assert_eq!(s.node_ip(1), Some(ip("198.19.7.17")));
        assert_eq!(s.workload_ip(1, 0), Some(ip("198.19.7.18")));
        assert_eq!(s.max_nodes(), 15);
        assert_eq!(s.max_workloads_per_node(), 13);
        assert_eq!(s.workload_ip(15, 12), Some(ip("198.19.7.254")));
        assert_eq!(s.workload_ip(15, 13), None);
        let s: Subnet = "198.19.16.0/20".parse().expect("subnet");
        assert_eq!(s.node_ip(2), Some(ip("198.19.16.33")));
        assert_eq!(s.max_nodes(), 255);
    }

    #[test]
    fn every_address_stays_inside_the_subnet() {
        for text in ["198.18.0.0/16", "198.19.0.0/16", "198.19.255.0/24", "198.18.32.0/19"] {
            let s: Subnet = text.parse().expect("subnet");
            for k in 1..=s.max_nodes() {
                let node = s.node_ip(k).expect("node");
                assert!(s.contains(node) && node != s.bridge_ip(), "{text} node {k}");
                for n in [0, s.max_workloads_per_node() - 1] {
                    let w = s.workload_ip(k, n).expect("workload");
                    assert!(s.contains(w) && w != node, "{text} node {k} workload {n}");
                    assert_ne!(w.octets()[3], 255);
                }
            }
        }
    }

    #[test]
    fn only_the_benchmarking_range_is_accepted() {
        for bad in [
            "10.0.0.0/16",
            "198.20.0.0/16",
            "198.17.0.0/16",
            "198.18.0.0/15",
            "198.18.0.0/25",
            "198.18.0.1/24",
            "198.18.0.0",
            "x/16",
            "198.18.0.0/x",
        ] {
            let err = bad.parse::<Subnet>().expect_err(bad);
            assert!(matches!(err, LabError::InvalidSubnet { .. }), "{bad}: {err}");
        }
        assert!("198.19.128.0/17".parse::<Subnet>().is_ok());
    }

    #[test]
    fn overlap_is_symmetric() {
        let s = Subnet::DEFAULT;
        assert!(s.overlaps(ip("198.18.5.0"), 24));
        assert!(s.overlaps(ip("198.0.0.0"), 8));
        assert!(s.overlaps(ip("0.0.0.0"), 0), "a default route covers everything");
        assert!(!s.overlaps(ip("198.19.0.0"), 16));
        assert!(!s.overlaps(ip("192.0.2.0"), 24));
        assert_eq!(parse_prefix("198.18.0.0/16"), Some((ip("198.18.0.0"), 16)));
        assert_eq!(parse_prefix("198.18.0.7"), Some((ip("198.18.0.7"), 32)));
        assert_eq!(parse_prefix("default"), None);
    }

    #[test]
    fn serde_uses_the_text_form() {
        let s: Subnet = "198.19.3.0/24".parse().expect("subnet");
        let json = serde_json::to_string(&s).expect("json");
        assert_eq!(json, "\"198.19.3.0/24\"");
        assert_eq!(serde_json::from_str::<Subnet>(&json).expect("back"), s);
        assert!(serde_json::from_str::<Subnet>("\"10.0.0.0/16\"").is_err());
    }
}

//! Labs for tests: each one claims a name and subnet no other test (in this process or any
//! other) holds, and is torn down when its guard drops, panics included.

use std::fs::{self, File, TryLockError};
use std::net::Ipv4Addr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{DownReport, Lab, LabConfig, LabError, Subnet};

/// Where test labs hold their claims: one lock file per slot `tXX` (lab name `tXX`, subnet
/// 198.19.XX.0/24), locked for as long as the guard lives.
pub const CLAIMS_DIR: &str = "/run/ferry-lab-tests";

/// Slots a test lab may take: 198.19.0.0/24 to 198.19.255.0/24, clear of the default lab's
/// 198.18.0.0/16.
const SLOTS: usize = 256;

/// How many slots `up` tries when a subnet turns out to be in use by something else.
const ATTEMPTS: usize = 16;

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A lab of a test's own, taken down when dropped.
///
/// Its name (`tXX`), state directory (`/run/ferry-lab-tXX`), object names (`fltXX-...`,
/// `ferry-lab-tXX-...`) and subnet (198.19.XX.0/24: 15 nodes of 13 workloads) are held by no
/// one else while it lives, so a test never meets a user's lab or another test's.
#[derive(Debug)]
pub struct TestLab {
    config: LabConfig,
    lab: Option<Lab>,
    claim: Option<Claim>,
}

impl TestLab {
    /// Claims a name and subnet without bringing a lab up: for tests that drive `ferry lab`
    /// themselves (pass [`LabConfig::cli_args`] and the subnet). Dropping it still takes down
    /// whatever lab of that name exists.
    pub fn reserve() -> Result<TestLab, LabError> {
        let (config, claim) = claim()?;
        Ok(TestLab { config, lab: None, claim: Some(claim) })
    }

    /// Claims a name and subnet and brings up a lab of `nodes` nodes there.
    pub fn up(nodes: usize) -> Result<TestLab, LabError> {
        // Claims of subnets found in use stay held until a free one is found, so that the
        // next attempt takes another slot.
        let mut busy = Vec::new();
        for _ in 0..ATTEMPTS {
            let mut guard = TestLab::reserve()?;
            match Lab::up(&guard.config, nodes) {
                Ok(lab) => {
                    guard.lab = Some(lab);
                    return Ok(guard);
                }
                Err(LabError::SubnetInUse { .. } | LabError::Leftovers { .. }) => busy.push(guard),
                Err(e) => return Err(e),
            }
        }
        Err(LabError::NoFreeSubnet { lab: "a test lab".into() })
    }

    pub fn config(&self) -> &LabConfig {
        &self.config
    }

    /// The subnet this guard holds (its lab may not be up).
    pub fn subnet(&self) -> Subnet {
        self.config.subnet().unwrap_or(Subnet::DEFAULT)
    }

    /// The lab [`up`](TestLab::up) brought up. Panics for a guard from
    /// [`reserve`](TestLab::reserve).
    #[track_caller]
    pub fn lab(&self) -> &Lab {
        self.lab.as_ref().expect("TestLab::reserve() brings no lab up; use TestLab::up(n)")
    }

    #[track_caller]
    pub fn lab_mut(&mut self) -> &mut Lab {
        self.lab.as_mut().expect("TestLab::reserve() brings no lab up; use TestLab::up(n)")
    }

    /// Takes the lab down now and reports what went; the claim is released.
    pub fn down(mut self) -> Result<DownReport, LabError> {
        let report = Lab::down(&self.config);
        self.lab = None;
        if let Some(claim) = self.claim.take() {
            claim.release();
        }
        report
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let Some(claim) = self.claim.take() else { return };
        if let Err(e) = Lab::down(&self.config) {
            // No panic here: this may run while a test is already panicking. The next guard
            // to claim this slot tries again.
            eprintln!("ferry-lab: {} was not fully taken down: {e}", self.config.describe());
        }
        claim.release();
    }
}

#[derive(Debug)]
struct Claim {
    file: File,
    path: PathBuf,
}

impl Claim {
    /// Removes the lock file while still holding it (whoever opens it next checks that the
    /// file it locked is still the one in the directory), then unlocks.
    fn release(self) {
        let _ = fs::remove_file(&self.path);
        drop(self.file);
    }
}

fn claim() -> Result<(LabConfig, Claim), LabError> {
    let dir = PathBuf::from(CLAIMS_DIR);
    fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|source| LabError::Io {
        action: "cannot create",
        path: dir.clone(),
        source,
    })?;
    let first = std::process::id() as usize * 7 + NEXT.fetch_add(1, Ordering::Relaxed);
    for i in 0..SLOTS {
        let slot = ((first + i) % SLOTS) as u8;
        let path = dir.join(format!("t{slot:02x}.lock"));
        let io = |action| {
            let path = path.clone();
            move |source| LabError::Io { action, path, source }
        };
        let file = crate::state::open_lock_file(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Error(source)) => return Err(io("cannot lock")(source)),
        }
        // Its holder may have removed it between our open and our lock: then it is not the
        // claim other processes see, and the slot is not ours.
        let same = match (file.metadata(), fs::metadata(&path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if !same {
            continue;
        }
        let config = LabConfig::named(&format!("t{slot:02x}"))?
            .with_subnet(Subnet::new(Ipv4Addr::new(198, 19, slot, 0), 24)?);
        // A holder that was killed (SIGKILL, no drop) may have left its lab behind.
        Lab::down(&config)?;
        return Ok((config, Claim { file, path }));
    }
    Err(LabError::NoFreeSubnet { lab: "a test lab (every slot is claimed)".into() })
}

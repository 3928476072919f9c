//! Command-line syntax.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Checkpoint, restore and migrate running Linux workloads.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, max_term_width = 100)]
pub struct Cli {
    /// Checkpoint store directory.
    #[arg(long, global = true, env = "FERRY_STORE", default_value = "/var/lib/ferry")]
    pub store: PathBuf,
    /// CRIU binary to use instead of the one on $PATH.
    #[arg(long, global = true, env = "FERRY_CRIU")]
    pub criu: Option<PathBuf>,
    /// Seconds after which a CRIU call is stopped.
    #[arg(long, global = true, env = "FERRY_CRIU_TIMEOUT", default_value_t = 600)]
    pub criu_timeout: u64,
    /// Send agent commands (migrate, node status) to this lab node's agent.
    #[arg(long, global = true, env = "FERRY_NODE")]
    pub node: Option<String>,
    /// The local agent's socket (without --node).
    #[arg(long, global = true, env = "FERRY_SOCKET", default_value = "/run/ferry/ferryd.sock")]
    pub socket: PathBuf,
    /// Where a container runtime is reached, as KIND=PATH (repeatable): runc's state
    /// directory (its --root; default /run/runc) or the API socket of podman, containerd or docker.
    #[arg(
        long = "runtime-endpoint",
        global = true,
        env = "FERRY_RUNTIME_ENDPOINTS",
        value_delimiter = ',',
        value_name = "KIND=PATH"
    )]
    pub runtime_endpoints: Vec<String>,
    /// More log output (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check that this host can checkpoint and restore.
    Doctor {
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Will a workload survive a checkpoint? A verdict (ready, ready with caveats, not ready),
    /// a score and every reason with its fix, read from /proc and the runtime without freezing
    /// or tracing it (docs/check.md). Exits 11 when not ready.
    Check {
        /// The workload, as `ferry checkpoint` takes it: pid:PID, runc:ID, podman:ID,
        /// containerd:NAMESPACE/ID, docker:ID.
        workload: String,
        /// The checkpoint will pass --tcp-established (established connections are then no
        /// blocker; without this flag they are a caveat). `--tcp-established=false`: it will
        /// not, so they are a blocker, as `ferry checkpoint` without the flag judges them.
        #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
        tcp_established: Option<bool>,
        /// Also judge the move to this node: its CRIU, its CPU (CRIU's cpuinfo check there), its
        /// kernel and free memory, asked through the agents (`--node` picks the source's agent),
        /// and an estimate per strategy over the measured link.
        #[arg(long, value_name = "NODE", conflicts_with = "trial")]
        to: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Also a trial run: a real checkpoint (the workload runs on), restored into a sandbox
        /// on this host (its own pid and network namespaces, nothing but loopback), watched,
        /// probed and removed. Exits 11 unless the copy stayed alive and the probe passed.
        #[arg(long)]
        trial: bool,
        /// With --trial: a health check run (`sh -c`) in the copy's network namespace, where
        /// it reaches the copy at 127.0.0.1; exit 0 means healthy.
        #[arg(long, value_name = "CMD", requires = "trial")]
        probe: Option<String>,
        /// With --trial: how long the copy must stay alive before the probe.
        #[arg(long, value_name = "SECONDS", default_value_t = 3, requires = "trial",
              value_parser = clap::value_parser!(u64).range(1..=600))]
        trial_seconds: u64,
    },
    /// Checkpoint a running workload into the store (encrypted, signed, deduplicated).
    Checkpoint {
        /// The workload: pid:PID (the root of a process tree), or a container: runc:ID,
        /// podman:ID, containerd:NAMESPACE/ID, docker:ID (it is stopped and removed from its
        /// runtime unless --leave-running; `ferry restore` brings it back).
        workload: String,
        /// Name of the checkpoint (default: KIND-ID-UNIXTIME).
        #[arg(long)]
        name: Option<String>,
        /// Keep the workload running after the checkpoint (default: it is stopped).
        #[arg(long)]
        leave_running: bool,
        /// Checkpoint established TCP connections too; until the restore, their traffic is held.
        #[arg(long)]
        tcp_established: bool,
        /// Keep only the newest N checkpoints of this workload.
        #[arg(long, value_name = "N")]
        keep: Option<usize>,
        /// Checkpoint even if `ferry check` finds the workload not ready.
        #[arg(long)]
        force: bool,
    },
    /// Restore a checkpoint; without --detach, wait for a process tree and exit with its
    /// status. A container is recreated under its runtime and runs there.
    Restore {
        /// Name of the checkpoint.
        name: String,
        /// The restored container's name under its runtime (default: the name it had).
        #[arg(long = "name", value_name = "NEW")]
        new_name: Option<String>,
        /// Return once the workload runs (through the pager: once its memory is complete).
        #[arg(long, short)]
        detach: bool,
        /// Write the restored root's host PID to this file.
        #[arg(long)]
        pidfile: Option<PathBuf>,
        /// Let a process tree run before its memory is complete: the pages it touches come
        /// first, the rest follow. A chunk that fails its check then kills the tree (by
        /// default every chunk is checked before the tree runs).
        #[arg(long)]
        lazy: bool,
    },
    /// N running copies of a checkpoint, or of a live workload (checkpointed first with
    /// --leave-running), restored at once on lab nodes: each in its own pid, network and UTS
    /// namespace, with its own address and host name (docs/clone.md).
    Clone {
        /// A checkpoint that `ferry clone` made, or a live workload: pid:PID, PID 1 of its own
        /// pid and network namespaces (as `ferry lab exec` starts one).
        source: String,
        /// How many copies (1 to 64).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
        replicas: u32,
        /// A lab node to run copies on (repeatable: the copies go round the nodes in turn).
        #[arg(long = "to", value_name = "NODE", required = true)]
        to: Vec<String>,
        /// The checkpoint's name when SOURCE is a live workload (default: KIND-ID-UNIXTIME).
        #[arg(long)]
        name: Option<String>,
        /// Host names PREFIX-1 .. PREFIX-N (default: the checkpoint's name).
        #[arg(long, value_name = "PREFIX")]
        hostname_prefix: Option<String>,
        /// Run CMD (`sh -c`) for each copy once it runs, with FERRY_CLONE_INDEX, _NAME, _PID,
        /// _IP, _HOSTNAME, _NODE and _ORIGIN set: where the application is told to reseed
        /// itself. A failure removes every copy.
        #[arg(long, value_name = "CMD")]
        on_clone: Option<String>,
        /// Send this signal (HUP, USR1, USR2, ...) to each copy's root once it runs.
        #[arg(long, value_name = "SIGNAL")]
        signal: Option<String>,
        /// Clone even if `ferry check` finds the live workload not ready.
        #[arg(long)]
        force: bool,
        /// Let each copy run before its memory is complete: the pages it touches first come
        /// first through ferry's pager, the rest follow (the command returns once all are in).
        #[arg(long)]
        lazy: bool,
        /// Print the copies as JSON.
        #[arg(long)]
        json: bool,
        /// The lab whose nodes --to names (default: the default lab).
        #[arg(long = "lab", env = "FERRY_LAB", value_name = "NAME")]
        lab: Option<String>,
    },
    /// List checkpoints (and the clones made from them that run).
    List {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a checkpoint's signature, keys and every chunk, without restoring it.
    Verify {
        /// Names of the checkpoints (default: all).
        names: Vec<String>,
    },
    /// Show what a checkpoint holds: processes, memory, open files, sockets, sizes.
    Inspect {
        name: String,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a checkpoint as an archive in the Podman/CRI-O layout (encrypted unless
    /// --plaintext); a container's, in the clear, is what `podman container restore --import`
    /// restores. With --oci-image (and --plaintext), a checkpoint OCI image instead.
    Export {
        name: String,
        /// The archive to write; with --oci-image, an OCI image layout as a tar (what `podman
        /// load` reads), or as a directory when it ends in `/`.
        #[arg(short, long)]
        output: PathBuf,
        /// Write CRIU's images in the clear, as checkpointctl and Podman read them. Anyone who
        /// can read the file can read the process's memory.
        #[arg(long)]
        plaintext: bool,
        /// Write a checkpoint OCI image (as `podman container checkpoint --create-image` and
        /// `checkpointctl build` make them), for `podman load` and `podman container restore
        /// IMAGE`. It is plaintext by nature: it needs --plaintext too.
        #[arg(long)]
        oci_image: bool,
        /// The OCI image's name (default: localhost/ferry/NAME:latest).
        #[arg(long, value_name = "IMAGE", requires = "oci_image")]
        tag: Option<String>,
        /// The Podman image holding the container's root file system, for a container whose
        /// checkpoint names none (runc's).
        #[arg(long, value_name = "IMAGE")]
        rootfs_image: Option<String>,
        /// Encrypt for this recipient (as named by `ferry keys add-recipient`) instead of for
        /// this node and all recipients; repeat for several.
        #[arg(long = "for", value_name = "RECIPIENT")]
        recipients: Vec<String>,
    },
    /// Import an archive written by `ferry export`, or a container checkpoint archive written by
    /// `podman container checkpoint --export` or the kubelet (CRI-O's layout).
    Import {
        /// The archive (uncompressed or zstd).
        file: PathBuf,
        /// Name for the imported checkpoint (default: the name in its manifest; for a Podman or
        /// kubelet archive, KIND-CONTAINER-TIME).
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove checkpoints.
    Rm {
        /// Names of the checkpoints.
        #[arg(required = true)]
        names: Vec<String>,
        /// Destroy the checkpoint's data key first: every copy of it becomes unreadable.
        #[arg(long)]
        shred: bool,
    },
    /// Remove chunks no checkpoint uses, and leftovers of interrupted work.
    Gc,
    /// This node's keys and the recipients checkpoints are encrypted for.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Move a running workload to another node, live, with its memory, files and TCP
    /// connections; its address moves with it. Asks this node's agent (ferryd).
    Migrate {
        /// The workload: pid:PID on this node.
        workload: String,
        /// The target node.
        #[arg(long)]
        to: String,
        /// auto, stop-copy, pre-copy or post-copy.
        #[arg(long, default_value = "auto")]
        strategy: ferry_migrate::api::Strategy,
        /// After the switch (the workload runs on the target), how long the agents try to
        /// reach each other again when the link or an agent fails, the target's faulting
        /// threads waiting meanwhile, before the workload is declared lost (exit code 10).
        #[arg(long, value_name = "SECS", default_value_t = ferry_migrate::api::DEFAULT_RECOVER_TIMEOUT_S,
              value_parser = clap::value_parser!(u32).range(1..=86400))]
        recover_timeout: u32,
        /// What a post-copy migration that cannot finish after the switch does: `lost` (the
        /// workload is lost: no older state of it runs again) or `resume-source` (the source's
        /// frozen copy resumes in its state at the freeze: whatever the workload did on the
        /// target since the switch, writes it acknowledged included, is lost).
        #[arg(long, value_name = "WHAT", default_value = "lost")]
        on_failure: ferry_migrate::api::OnFailure,
        /// Also write the report (phases, bytes, downtime) as JSON to FILE.
        #[arg(long, value_name = "FILE")]
        report_json: Option<PathBuf>,
        /// Migrate even if `ferry check` finds the workload not ready.
        #[arg(long)]
        force: bool,
    },
    /// A `restore --lazy`'s guard (started by ferry itself): kills the restored tree if the
    /// restore dies before every page is in.
    #[command(hide = true)]
    Guard { name: String },
    /// This node as its agent sees it, and whom it trusts.
    Node {
        #[command(subcommand)]
        action: NodeAction,
    },
    /// Several nodes on this machine for tests and trials: network namespaces on a bridge,
    /// addresses in 198.18.0.0/15, reachable from this machine.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Create this node's keys (done automatically on first use).
    Init,
    /// Print this node's public key, to give to nodes that should restore our checkpoints.
    Show,
    /// Encrypt future checkpoints for another node too, and trust its signatures.
    AddRecipient {
        /// A name for the node.
        name: String,
        /// Its public key, as `ferry keys show` prints it there.
        public_key: String,
    },
    /// Replace this node's signing and encryption keys (old checkpoints stay readable).
    Rotate,
}

#[derive(Debug, Subcommand)]
pub enum NodeAction {
    /// The agent's name, address, peers and counters.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Admit another node: its TLS key is pinned, its checkpoints' signatures trusted, and
    /// migrations to it encrypt for it. Restart ferryd for the TLS pin to take effect.
    Trust {
        /// The node's name.
        name: String,
        /// Its public key, as `ferry keys show` prints it there.
        public_key: String,
    },
    /// This node's public key (what other nodes trust), and its certificate from the cluster
    /// CA if it has one.
    Show,
    /// A cluster CA: admits nodes by a certificate for their key instead of pins.
    Ca {
        #[command(subcommand)]
        action: CaAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaAction {
    /// Create a cluster CA (certificate and private key) in DIR; never overwrites one.
    Init {
        /// The directory (created 0700); keep it off the nodes.
        dir: PathBuf,
        /// The CA's name in its certificate.
        #[arg(long, default_value = "ferry cluster CA")]
        name: String,
    },
    /// Issue a certificate for this node's key (to STORE/keys/node-cert.pem) and trust the
    /// CA (STORE/keys/cluster-ca.pem). Restart ferryd for it to take effect.
    Issue {
        /// The CA's directory (made by `ferry node ca init`).
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The node name in the certificate (default: the host name).
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum LabAction {
    /// Create nodes node1..nodeN (a network namespace each) and the bridge (fl-br0) that joins
    /// them and this machine, and start a ferryd on each (all trusting each other).
    Up {
        /// Do not start agents.
        #[arg(long)]
        no_agents: bool,
        /// How many nodes.
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// The lab's subnet, inside 198.18.0.0/15, /16 to /24 (default: 198.18.0.0/16; for a
        /// named lab the first free /24 of 198.19.0.0/16).
        #[arg(long, value_name = "CIDR")]
        subnet: Option<String>,
        #[command(flatten)]
        lab: LabSelect,
    },
    /// Start CMD on NODE like a pod: PID 1 of its own pid namespace, in its own network
    /// namespace with its own address. Prints `pid:HOSTPID IP` as its last line; with
    /// --runtime, a container of that runtime (the node's own instance of it) in that
    /// namespace, and `KIND:NAME IP`.
    Exec {
        /// The node: node1, node2, ...
        node: String,
        /// Run CMD in a container of this runtime: runc, podman, containerd or docker.
        #[arg(long, value_name = "KIND")]
        runtime: Option<String>,
        /// The container's name (default: w-N). containerd: NAMESPACE/NAME.
        #[arg(long, value_name = "NAME", requires = "runtime")]
        id: Option<String>,
        /// The container's image: a root filesystem directory (imported into every node's
        /// instance of the runtime as `ferry-lab/DIRNAME`), or an image the runtime has.
        #[arg(long, requires = "runtime")]
        image: Option<String>,
        /// The container's memory limit in MiB.
        #[arg(long, value_name = "MIB", requires = "runtime")]
        memory: Option<u64>,
        /// An environment variable for the container, KEY=VALUE (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE", requires = "runtime")]
        env: Vec<String>,
        /// Append the workload's stdout and stderr to FILE (default: /dev/null). Opened
        /// write-only for appending, which CRIU exempts from its file size check: the log may
        /// grow after a checkpoint and the restore still works.
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<OsString>,
        #[command(flatten)]
        lab: LabSelect,
    },
    /// Kill the lab's workloads, remove its namespaces, links and state; also after a crash.
    Down {
        #[command(flatten)]
        lab: LabSelect,
    },
    /// Show the lab's nodes and workloads.
    Status {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        lab: LabSelect,
    },
}

#[derive(Debug, clap::Args)]
pub struct LabSelect {
    /// Use the lab of this name (1-4 lowercase letters or digits) beside the default one.
    #[arg(long, env = "FERRY_LAB", value_name = "NAME")]
    pub name: Option<String>,
}

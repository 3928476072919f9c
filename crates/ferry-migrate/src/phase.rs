//! The phases of a migration, which both agents journal, and the protocol that moves a
//! migration from one phase to the next (source S, target T; in the manner of Cloud
//! Hypervisor's `vm-migration` protocol: one control connection, S asks and T answers, plus
//! connections of their own for the chunk stream and the post-copy pages).
//!
//! ```text
//!  phase      S (source agent)                          T (target agent)
//!  ---------  ----------------------------------------  ----------------------------------------
//!             Hello ----------------------------------> Hello (keys checked against TLS)
//!             [auto: KIND_PROBE ----------------------> ProbeAck]
//!  Prepare    Prepare{migration, workload, strategy, -> journal (T, Prepare); a namespace with
//!               recover_timeout_s, ...}                 the workload's address, port down
//!                                       <-------------- Prepared{x25519}
//!             [pre-copy: Offer ... -------------------> Stored]
//!  Transfer   journal (S, Transfer: holder named)
//!             CRIU freezes and dumps                    [Stream connection: KIND_STREAM ...]
//!             at post-dump (CRIU holds the tree):
//!             Offer, chunks, ChunksDone --------------> journal (T, Transfer); Stored
//!             the tree into ferry's freezer cgroup
//!  Switching  Restore{lazy, ...} ---------------------> CRIU restores (post-copy: T's pager
//!             journal (S, Switching: held pids)         opens `Pages` to S)
//!             SwitchRecorded -------------------------> pre-resume: once SwitchRecorded is in,
//!                                                       journal (T, Switched), port up, the
//!                                                       tree runs: THE SWITCH
//!  Switched                             <-------------- Running{pid}
//!             journal (S, Switched)
//!             Commit ---------------------------------> the workload recorded as T's
//!                                       <-------------- Committed
//!             stop-copy, pre-copy: the held tree killed; post-dump answered; S forgets
//!             post-copy:                                PagesPush (T opens it) and Pages
//!                                       <-------------- PagesProgress{bytes} (every 2 s)
//!  Done                                 <-------------- PagesDone (journal (T, Done))
//!  | Lost                               <-------------- PagesLost{at, reason} (T killed its copy)
//!             journal (S, Done | Lost); the held tree
//!             killed (or, Lost with --on-failure=
//!             resume-source, resumed)
//!             Forget ---------------------------------> T forgets the migration
//! ```
//!
//! Who may send what, on the control connection (anything else is a protocol error):
//!
//! | phase | S sends | T answers / sends |
//! |---|---|---|
//! | (any) | `Hello`, a probe | `Hello`, `ProbeAck`, `Error` |
//! | Prepare | `Prepare`, pre-copy's `Offer`..`ChunksDone`, `Abort` | `Prepared`, `Lacking`, `Stored`, `Aborted` |
//! | Transfer | `Offer`..`ChunksDone`, `Restore`, `Abort` | `Lacking`, `Stored`, `Aborted` |
//! | Switching | `SwitchRecorded` (or `Abort`) | `Running`, or `Error` (then T's copy never ran) |
//! | Switched | `Commit` | `Committed`; post-copy: `PagesProgress`, then `PagesDone` or `PagesLost` |
//! | Done, Lost | `Forget` | (nothing) |
//!
//! On connections of their own: `Stream` (S to T, Transfer only), `Pages` and `PagesPush` (T
//! to S, from Switching until Done), `ArrivalStatus` (S to T, at any time: T's phase, which is
//! how S learns what T did when their control connection is gone) and `Forget`.
//!
//! **The switch is the commit point.** T's copy runs with its network up only after T has
//! journaled `Switched`, and only after S has said (`SwitchRecorded`) that it journaled
//! `Switching` (with its frozen tree in a freezer cgroup of its own, out of reach of CRIU's
//! resume); S's journal write overlaps T's restore, so neither side's record costs the freeze
//! more than T's one write. From then on S never
//! lets its copy run again unless T says that its copy never ran (T has no record of the
//! migration, or it undid it before the switch), or unless T declared the workload lost and
//! the user asked for `--on-failure=resume-source`. Before the switch any failure resumes S's
//! copy; after it, T's copy is the workload: a lost link pauses its faulting threads while the
//! agents reconnect, for up to `recover_timeout_s`, after which T kills it and says the
//! workload was lost, and where.

use serde::{Deserialize, Serialize};

/// Where a migration stands. Both agents record the same phases in their journals (each with
/// its [`Role`]); the target records no `Switching` (it goes from `Transfer` to `Switched` at
/// the switch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// S: the target was asked; nothing is frozen (pre-copy ships a running checkpoint).
    /// T: a namespace for the workload's address exists.
    Prepare,
    /// S: the tree is being frozen and dumped, or CRIU holds it frozen while its checkpoint
    /// crosses; any failure resumes it. T: the checkpoint is arriving, or being restored (the
    /// restored tree has not run).
    Transfer,
    /// S only: T was asked to restore and may switch at any moment. S's tree is held in its
    /// freezer cgroup and is let go only on T's word.
    Switching,
    /// The commit point is behind: T's copy runs with its network up. S keeps its frozen copy
    /// only to serve its pages (post-copy), and never resumes it on its own.
    Switched,
    /// Every page is on T; S's copy is gone.
    Done,
    /// After the switch the workload could not be kept: T's copy was killed (the reason and
    /// the point are journaled).
    Lost,
}

impl Phase {
    /// True once the target's copy may have run with its network up: from here on the
    /// source's copy is never resumed on its own.
    pub fn past_switch(self) -> bool {
        matches!(self, Phase::Switched | Phase::Done | Phase::Lost)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Prepare => "prepare",
            Phase::Transfer => "transfer",
            Phase::Switching => "switching",
            Phase::Switched => "switched",
            Phase::Done => "done",
            Phase::Lost => "lost",
        })
    }
}

/// Which side of a migration a journal entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Source,
    Target,
}

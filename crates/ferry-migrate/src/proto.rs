//! The protocol between agents, over mutual TLS: control messages (postcard) and batches of
//! sealed chunks, each in its own frame kind. Control is request/response on one connection
//! (after the switch of a post-copy migration the target reports on it unasked); post-copy
//! pages, and the chunks streamed while the source still dumps, use a connection of their own
//! each. The sequence, and who may send what in which phase, is in `phase`.

use serde::{Deserialize, Serialize};

use ferry_store::replica::ChunkRef;

use crate::api::Strategy;
use crate::phase::Phase;

/// Version of this protocol (checked in `Hello`). 6: chunks may be sealed in frame format 2
/// (AES-256-GCM), which a ferry of protocol 5 cannot open. 7: `FactsQuery`/`TargetFacts`
/// (`ferry check --to`). 8: `FactsQuery.tree`, `TargetFacts.tree` (a process tree's paths
/// and listeners). 9: `TreeNeeds.addresses` (its own network namespace's addresses).
pub const PROTOCOL: u32 = 9;
/// Key under which a workload's network namespace is declared external to CRIU (it stays
/// behind; the target provides one with the same address). ferry-runtime's: clones use it too.
pub(crate) use ferry_runtime::NETNS_KEY;
/// Frame kinds.
pub const KIND_MSG: u16 = 0x4d53;
pub const KIND_CHUNKS: u16 = 0x4348;
/// Chunks streamed ahead of their offer, each with its full reference.
pub const KIND_STREAM: u16 = 0x5354;
/// Post-copy pages pushed ahead of demand: `pid u32 BE`, `vaddr u64 BE`, whole pages.
pub const KIND_PUSH: u16 = 0x5055;
/// Raw bytes echoed as a length (the link probe of `auto`).
pub const KIND_PROBE: u16 = 0x5052;
/// Raw page data answering a `PageRequest`.
pub const KIND_PAGES: u16 = 0x5047;
/// Cap on any frame between agents.
pub const PEER_CAP: u32 = 16 << 20;
/// Chunk references per `ChunkList` frame (52 bytes each at most).
pub const REFS_PER_FRAME: usize = 1 << 16;
/// Manifest bytes per `ManifestPart`.
pub const MANIFEST_PART: usize = 8 << 20;
/// Sealed bytes per chunk batch frame.
pub const BATCH_BYTES: usize = 1 << 20;

/// A control message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Msg {
    /// Each side's public keys: the Ed25519 one must be the key its TLS certificate was
    /// verified for; the X25519 one is what data keys are wrapped for.
    Hello {
        protocol: u32,
        node: String,
        ed25519: [u8; 32],
        x25519: [u8; 32],
    },
    /// The source asks the target to take a workload.
    Prepare {
        migration: String,
        workload: String,
        ip: Option<std::net::Ipv4Addr>,
        /// The source's lab record of the workload (its command line moves with it).
        lab_workload: Option<u64>,
        /// The workload's neighbour entries (address, MAC), installed in its new namespace.
        neighbours: Vec<(std::net::Ipv4Addr, String)>,
        strategy: Strategy,
        /// A container's record (`ferry-container.json`), checked by the target before anything
        /// is frozen: runtime up, name free, image and bind mount sources present.
        container: Option<Vec<u8>>,
        /// After the switch, how long the target waits for a lost source (its faulting threads
        /// paused) before it declares the workload lost.
        recover_timeout_s: u32,
    },
    /// The target's X25519 key, for which the data keys are wrapped.
    Prepared {
        x25519: [u8; 32],
    },
    /// A checkpoint follows: its slots; then its signed manifest (`manifest_len` bytes) in
    /// `ManifestPart`s (a large checkpoint's manifest is over the frame cap), then `total`
    /// chunk refs in `ChunkList`s.
    Offer {
        name: String,
        manifest_len: u64,
        slots: Vec<u8>,
        total: u32,
    },
    ManifestPart(Vec<u8>),
    ChunkList(Vec<ChunkRef>),
    /// Positions (in the offer's list) of the chunks the target lacks; `last` ends the answer.
    Lacking {
        positions: Vec<u32>,
        last: bool,
    },
    /// All lacking chunks were sent (in KIND_CHUNKS frames).
    ChunksDone,
    /// The checkpoint is stored (and its signature checked).
    Stored {
        bytes: u64,
    },
    /// Restore checkpoint `name`; `external_net`: into a namespace the target provides for
    /// the workload's address; `lazy`: memory follows through the page channel (post-copy).
    Restore {
        name: String,
        tcp_established: bool,
        lazy: bool,
        external_net: bool,
    },
    /// The source has journaled `Switching` (sent right after `Restore`): the target may
    /// switch. It waits for this before its copy runs.
    SwitchRecorded,
    /// The workload runs on the target (network up: it switched); a container as `KIND:NAME`.
    Running {
        pid: i32,
        restore_s: f64,
        container: Option<String>,
    },
    /// The source is gone: release the network.
    Commit,
    Committed,
    /// Undo everything for this migration.
    Abort {
        reason: String,
    },
    Aborted,
    /// Where the target stands with a migration (asked on a connection of its own: by a
    /// source whose control connection is gone, or that restarted).
    ArrivalStatus {
        migration: String,
    },
    /// The target's journaled phase of it (`None`: no record: it never switched, or it undid
    /// its arrival before the switch); for `Lost`, why and where.
    ArrivalIs {
        phase: Option<Phase>,
        lost: Option<String>,
    },
    /// The source has acted on the outcome: the target may forget the migration.
    Forget {
        migration: String,
    },
    Forgotten,
    /// Opens the post-copy page channel of a migration (a connection of its own).
    Pages {
        migration: String,
    },
    /// `nr_pages` pages at `vaddr` of process `pid` (as numbered in the images); answered by
    /// a KIND_PAGES frame or an `Error`.
    PageRequest {
        pid: u32,
        vaddr: u64,
        nr_pages: u32,
    },
    /// Post-copy: pages received so far (sent every few seconds, so that the source's wait is
    /// never silent).
    PagesProgress {
        bytes: u64,
    },
    /// Post-copy: the target has every page; the source may let its frozen copy go.
    PagesDone {
        bytes: u64,
        requests: u64,
    },
    /// Post-copy: the target could not get every page and killed its copy: the workload is
    /// lost (`at`: the point, `reason`: why).
    PagesLost {
        at: String,
        reason: String,
    },
    /// Opens the chunk stream of a migration (a connection of its own, while the source
    /// dumps): KIND_STREAM frames follow, then `StreamEnd`.
    Stream {
        migration: String,
    },
    StreamEnd,
    /// The streamed chunks are durable on the target (its answer to `StreamEnd`).
    Streamed {
        chunks: u64,
        bytes: u64,
    },
    /// Opens the page push of a post-copy migration (a connection of its own, from the
    /// target): the source sends every lazy page in KIND_PUSH frames, then `PushDone`.
    PagesPush {
        migration: String,
    },
    PushDone,
    /// Bytes to echo back (`auto` measures the link with it).
    Probe(Vec<u8>),
    ProbeAck {
        len: u64,
    },
    Error {
        message: String,
    },
    /// What the target says of itself (`ferry check --to`), with the source's `cpuinfo.img`
    /// (at most `check::target::MAX_CPUINFO` bytes) for its CRIU to check; answered by
    /// `TargetFacts`.
    FactsQuery {
        cpuinfo: Option<Vec<u8>>,
        /// A container's record (`ferry-container.json`), for the target's runtime to judge.
        container: Option<Vec<u8>>,
        /// A process tree's paths and listeners, for the target to look for.
        tree: Option<ferry_runtime::check::target::TreeNeeds>,
    },
    TargetFacts(ferry_runtime::check::target::TargetFacts),
}

/// Chunks in a KIND_CHUNKS frame: `count u32 BE`, then `count` times (`position u32 BE`,
/// `len u32 BE`), then the frames back to back (as they lie in the sender's pack, and as the
/// receiver appends them to its own: one read and one write per batch).
pub fn batch_header(entries: &[(u32, u32)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 8 * entries.len() + BATCH_BYTES);
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for (pos, len) in entries {
        out.extend_from_slice(&pos.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    }
    out
}

/// A decoded KIND_CHUNKS payload: (position, len) of each chunk, and their frames' bytes.
pub type Batch<'a> = (Vec<(u32, u32)>, &'a [u8]);

/// Splits a KIND_CHUNKS payload into its (position, len) list and the frames' bytes.
pub fn decode_batch(payload: &[u8]) -> Result<Batch<'_>, String> {
    let count = payload.get(..4).ok_or("chunk batch without a count")?;
    let count = u32::from_be_bytes([count[0], count[1], count[2], count[3]]) as usize;
    let head_len =
        count.checked_mul(8).and_then(|n| n.checked_add(4)).ok_or("chunk batch count overflows")?;
    let head = payload.get(4..head_len).ok_or("chunk batch cut in its list")?;
    let entries: Vec<(u32, u32)> = head
        .chunks_exact(8)
        .map(|e| (u32::from_be_bytes([e[0], e[1], e[2], e[3]]), u32::from_be_bytes([e[4], e[5], e[6], e[7]])))
        .collect();
    let frames = &payload[head_len..];
    let total: u64 = entries.iter().map(|(_, l)| u64::from(*l)).sum();
    if total != frames.len() as u64 {
        return Err(format!("chunk batch lists {total} bytes and carries {}", frames.len()));
    }
    Ok((entries, frames))
}

/// The head of a KIND_PUSH frame.
pub fn push_header(pid: u32, vaddr: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + (1 << 20));
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(&vaddr.to_be_bytes());
    out
}

/// Splits a KIND_PUSH payload into (pid, vaddr, pages); the pages must be whole, at least
/// one, at a page-aligned address.
pub fn decode_push(payload: &[u8]) -> Result<(u32, u64, &[u8]), String> {
    let head = payload.get(..12).ok_or("page push frame without its head")?;
    let pid = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let mut v = [0u8; 8];
    v.copy_from_slice(&head[4..12]);
    let vaddr = u64::from_be_bytes(v);
    let pages = &payload[12..];
    let page = crate::lazy::PAGE_SIZE;
    if pages.is_empty() || !(pages.len() as u64).is_multiple_of(page) || !vaddr.is_multiple_of(page) {
        return Err(format!("page push of {} bytes at {vaddr:#x}: not whole pages", pages.len()));
    }
    vaddr
        .checked_add(pages.len() as u64)
        .ok_or_else(|| format!("page push at {vaddr:#x} runs past the address space"))?;
    Ok((pid, vaddr, pages))
}

/// Bytes of one chunk reference in a KIND_STREAM frame.
const STREAM_REF: usize = 32 + 16 + 4;

/// Chunks in a KIND_STREAM frame: `count u32 BE`, then `count` times (`id`, `key`, `len u32
/// BE`), then the frames back to back.
pub fn stream_header(chunks: &[ChunkRef], frames_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + STREAM_REF * chunks.len() + frames_len);
    out.extend_from_slice(&(chunks.len() as u32).to_be_bytes());
    for c in chunks {
        out.extend_from_slice(&c.id);
        out.extend_from_slice(&c.key);
        out.extend_from_slice(&c.len.to_be_bytes());
    }
    out
}

/// A decoded KIND_STREAM payload: the chunks' references and their frames' bytes.
pub type StreamBatch<'a> = (Vec<ChunkRef>, &'a [u8]);

/// Splits a KIND_STREAM payload; the lengths must add up to the bytes carried.
pub fn decode_stream(payload: &[u8]) -> Result<StreamBatch<'_>, String> {
    let count = payload.get(..4).ok_or("chunk stream batch without a count")?;
    let count = u32::from_be_bytes([count[0], count[1], count[2], count[3]]) as usize;
    let head_len = count
        .checked_mul(STREAM_REF)
        .and_then(|n| n.checked_add(4))
        .ok_or("chunk stream batch count overflows")?;
    let head = payload.get(4..head_len).ok_or("chunk stream batch cut in its list")?;
    let mut chunks = Vec::with_capacity(count);
    for r in head.chunks_exact(STREAM_REF) {
        let mut id = [0u8; 32];
        let mut key = [0u8; 16];
        id.copy_from_slice(&r[..32]);
        key.copy_from_slice(&r[32..48]);
        let len = u32::from_be_bytes([r[48], r[49], r[50], r[51]]);
        chunks.push(ChunkRef { id, key, len });
    }
    let frames = &payload[head_len..];
    let total: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
    if total != frames.len() as u64 {
        return Err(format!("chunk stream batch lists {total} bytes and carries {}", frames.len()));
    }
    Ok((chunks, frames))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_and_cut_ones_are_refused() {
        let mut b = batch_header(&[(7, 3), (9, 300)]);
        b.extend_from_slice(b"abc");
        b.extend_from_slice(&[5u8; 300]);
        let (entries, frames) = decode_batch(&b).unwrap();
        assert_eq!(entries, vec![(7, 3), (9, 300)]);
        assert_eq!(&frames[..3], b"abc");
        for cut in [0, 3, 8, 12, 20, b.len() - 1] {
            assert!(decode_batch(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(decode_batch(&long).is_err());
        assert!(decode_batch(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn stream_batches_round_trip_and_cut_ones_are_refused() {
        let refs = [
            ChunkRef { id: [1; 32], key: [2; 16], len: 3 },
            ChunkRef { id: [4; 32], key: [5; 16], len: 200 },
        ];
        let mut b = stream_header(&refs, 203);
        b.extend_from_slice(b"abc");
        b.extend_from_slice(&[9u8; 200]);
        let (chunks, frames) = decode_stream(&b).unwrap();
        assert_eq!(chunks, refs.to_vec());
        assert_eq!(frames.len(), 203);
        assert_eq!(&frames[..3], b"abc");
        for cut in [0, 3, 4, 30, 4 + 52, 4 + 104, b.len() - 1] {
            assert!(decode_stream(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(decode_stream(&long).is_err());
        assert!(decode_stream(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn push_frames_round_trip_and_odd_ones_are_refused() {
        let mut b = push_header(7, 0x7000);
        b.extend_from_slice(&[3u8; 8192]);
        let (pid, vaddr, pages) = decode_push(&b).unwrap();
        assert_eq!((pid, vaddr, pages.len()), (7, 0x7000, 8192));
        assert!(decode_push(&b[..12]).is_err(), "no pages");
        assert!(decode_push(&b[..12 + 100]).is_err(), "part of a page");
        let mut odd = push_header(7, 0x7001);
        odd.extend_from_slice(&[0u8; 4096]);
        assert!(decode_push(&odd).is_err(), "unaligned");
        let mut wrap = push_header(7, u64::MAX - 4095);
        wrap.extend_from_slice(&[0u8; 8192]);
        assert!(decode_push(&wrap).is_err(), "past the end");
        assert!(decode_push(&[1, 2]).is_err());
    }
}

//! Moving a checkpoint from the source's store to the target's: the offer (signed manifest,
//! keys wrapped for the target, the chunk list), the target's answer (what it lacks), then
//! only those chunks, sealed as stored, in batches.
//!
//! While the source still dumps, the chunks its store seals can already travel on a stream
//! connection of their own ([`Streamer`], [`receive_stream`]): the target stores them ahead
//! of the offer, and the offer's "what do you lack" then skips them.

use std::collections::HashSet;
use std::sync::mpsc::Receiver as Queue;
use std::thread::JoinHandle;

use ferry_store::pipeline::TappedFrames;
use ferry_store::replica::{ChunkRef, Shipment};
use ferry_store::Store;

use crate::api::{Event, Progress};
use crate::journal::{Phase, Role};
use crate::node::Node;
use crate::peer::{unexpected, Channel};
use crate::proto::{
    batch_header, decode_batch, decode_stream, stream_header, Msg, BATCH_BYTES, KIND_CHUNKS, KIND_STREAM,
    MANIFEST_PART, REFS_PER_FRAME,
};
use crate::MigrateError;

/// What a chunk stream moved.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Streamed {
    pub chunks: u64,
    pub bytes: u64,
}

/// Sends the frames a checkpoint's pipeline seals to the target as they come, on a
/// connection of its own.
pub(crate) struct Streamer {
    handle: JoinHandle<Result<Streamed, MigrateError>>,
}

impl Streamer {
    /// Opens the stream of `migration` on `ch` (a fresh connection to the target) and sends
    /// every batch `frames` yields until the pipeline closes it.
    pub(crate) fn start(
        mut ch: Channel,
        migration: String,
        frames: Queue<TappedFrames>,
    ) -> Result<Streamer, MigrateError> {
        let handle = std::thread::Builder::new()
            .name("ferry-stream".into())
            .spawn(move || {
                ch.send(&Msg::Stream { migration })?;
                let mut corrupt =
                    crate::failpoint::check("source-send-chunks") == Some(crate::failpoint::Action::Corrupt);
                let mut refs = Vec::new();
                for batch in frames {
                    refs.clear();
                    refs.extend(batch.chunks.iter().map(|(id, len)| ChunkRef {
                        id: *id,
                        key: batch.key,
                        len: *len,
                    }));
                    let mut payload = stream_header(&refs, batch.bytes.len());
                    let head = payload.len();
                    payload.extend_from_slice(&batch.bytes);
                    if corrupt && batch.bytes.len() > 64 {
                        payload[head + batch.bytes.len() / 2] ^= 0x40;
                        corrupt = false;
                    }
                    ferry_wire::frame::write_frame(&mut ch.conn, KIND_STREAM, &payload)?;
                }
                match ch.call(&Msg::StreamEnd, "chunk stream")? {
                    Msg::Streamed { chunks, bytes } => Ok(Streamed { chunks, bytes }),
                    other => Err(unexpected("chunk stream", &other)),
                }
            })
            .map_err(|e| MigrateError::protocol(format!("cannot start the chunk stream: {e}")))?;
        Ok(Streamer { handle })
    }

    /// Waits until the target has stored what was streamed (the pipeline must be finished).
    pub(crate) fn finish(self) -> Result<Streamed, MigrateError> {
        self.handle.join().map_err(|_| MigrateError::protocol("the chunk stream thread panicked"))?
    }
}

/// Takes in a chunk stream (after `Stream` was read) for an arrival from the same peer;
/// answers `Streamed` once the chunks are durable here.
pub(crate) fn receive_stream(agent: &Node, ch: &mut Channel, migration: &str) -> Result<(), MigrateError> {
    let phase = "receiving a chunk stream";
    let arriving = agent.journal.read(migration).is_some_and(|e| {
        e.role == Role::Target && matches!(e.phase, Phase::Prepare | Phase::Transfer) && e.peer == ch.node
    });
    if !arriving {
        let e = MigrateError::Refused(format!("no migration {migration} from {} is arriving here", ch.node));
        let _ = ch.send(&Msg::Error { message: e.to_string() });
        return Err(e);
    }
    let store = &agent.ctx.store;
    // Not synced: the arrival's chunks are removed once it ends, and no recovery reads them.
    let mut rx = store.receiver_with(false)?;
    if let Some(pack) = rx.pack() {
        if let Ok(mut streamed) = agent.streamed.lock() {
            streamed.entry(migration.to_owned()).or_default().push(pack);
        }
        // In the journal too, so that a restart undoing the arrival releases the pack. The
        // arrival's own connection writes nothing until its offer, which comes after the
        // stream's end.
        if let Some(mut entry) = agent.journal.read(migration) {
            entry.packs.push(pack);
            agent.journal.write(&entry)?;
        }
    }
    let taken = (|| loop {
        match ch.next(phase)? {
            Err(frame) if frame.kind == KIND_STREAM => {
                let (refs, frames) = decode_stream(&frame.payload).map_err(MigrateError::protocol)?;
                rx.add_batch(&refs, frames)?;
                crate::failpoint::check("target-stream");
            }
            Err(frame) => {
                return Err(MigrateError::protocol(format!("unexpected frame kind {:#x}", frame.kind)))
            }
            Ok(Msg::StreamEnd) => return Ok(()),
            Ok(other) => return Err(unexpected(phase, &other)),
        }
    })();
    if let Err(e) = taken {
        let _ = ch.send(&Msg::Error { message: crate::chain(&e) });
        return Err(e);
    }
    let bytes = rx.bytes();
    let chunks = rx.finish_loose()?;
    agent.metrics.bytes_received.inc_by(bytes);
    tracing::info!(%migration, chunks, bytes, "stored the chunks streamed during the dump");
    ch.send(&Msg::Streamed { chunks, bytes })
}

/// What one shipment cost.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Shipped {
    pub chunks: usize,
    pub lacking: usize,
    pub bytes: u64,
}

fn take_chunks(
    ch: &mut Channel,
    rx: &mut ferry_store::replica::Receiver<'_>,
    chunks: &[ChunkRef],
    wanted: &HashSet<u32>,
    phase: &str,
) -> Result<(), MigrateError> {
    loop {
        match ch.next(phase)? {
            Err(frame) if frame.kind == KIND_CHUNKS => {
                let (entries, frames) = decode_batch(&frame.payload).map_err(MigrateError::protocol)?;
                let mut refs = Vec::with_capacity(entries.len());
                for (pos, len) in entries {
                    if !wanted.contains(&pos) {
                        return Err(MigrateError::protocol(format!("chunk {pos} was sent unasked")));
                    }
                    let chunk = chunks[pos as usize];
                    if chunk.len != len {
                        return Err(MigrateError::protocol(format!(
                            "chunk {pos} came with {len} bytes, listed {}",
                            chunk.len
                        )));
                    }
                    refs.push(chunk);
                }
                rx.add_batch(&refs, frames)?;
            }
            Err(frame) => {
                return Err(MigrateError::protocol(format!("unexpected frame kind {:#x}", frame.kind)))
            }
            Ok(Msg::ChunksDone) => return Ok(()),
            Ok(other) => return Err(unexpected(phase, &other)),
        }
    }
}

/// Sends `checkpoint` (verified by the caller) to the target over `ch`; returns once the
/// target stored it.
pub(crate) fn send(
    store: &Store,
    ch: &mut Channel,
    checkpoint: &ferry_store::Checkpoint,
    recipient: &[u8; 32],
    phase: &str,
    events: &mut dyn FnMut(Event),
) -> Result<Shipped, MigrateError> {
    let t0 = std::time::Instant::now();
    let name = checkpoint.name();
    let s = store.shipment_of(checkpoint, recipient)?;
    tracing::debug!(seconds = t0.elapsed().as_secs_f64(), "offer: shipment read");
    ch.send(&Msg::Offer {
        name: s.name.clone(),
        manifest_len: s.manifest.len() as u64,
        slots: s.slots.clone(),
        total: s.chunks.len() as u32,
    })?;
    for part in s.manifest.chunks(MANIFEST_PART) {
        ch.send(&Msg::ManifestPart(part.to_vec()))?;
    }
    for part in s.chunks.chunks(REFS_PER_FRAME) {
        ch.send(&Msg::ChunkList(part.to_vec()))?;
    }
    tracing::debug!(seconds = t0.elapsed().as_secs_f64(), "offer: sent");
    let mut lacking = Vec::new();
    loop {
        match ch.recv(phase)? {
            Msg::Lacking { positions, last } => {
                lacking.extend(positions);
                if last {
                    break;
                }
            }
            other => return Err(unexpected(phase, &other)),
        }
    }
    tracing::debug!(seconds = t0.elapsed().as_secs_f64(), "offer: answered");
    let total: u64 = lacking.iter().filter_map(|&i| s.chunks.get(i as usize)).map(|c| u64::from(c.len)).sum();
    let sent =
        send_chunks(store, ch, &s, &lacking, total, phase, events).map_err(|e| why_it_failed(ch, e))?;
    match ch.call(&Msg::ChunksDone, phase)? {
        Msg::Stored { .. } => {
            let shipped = Shipped { chunks: s.chunks.len(), lacking: lacking.len(), bytes: sent };
            tracing::info!(%name, chunks = shipped.chunks, sent = shipped.lacking, bytes = shipped.bytes, "shipped");
            Ok(shipped)
        }
        other => Err(unexpected(phase, &other)),
    }
}

/// A write to the target failed: if the target said why before it hung up, that is the error.
fn why_it_failed(ch: &mut Channel, e: MigrateError) -> MigrateError {
    match ch.next("the target's error") {
        Ok(Ok(Msg::Error { message })) => MigrateError::Remote { node: ch.node.clone(), message },
        _ => e,
    }
}

fn send_chunks(
    store: &Store,
    ch: &mut Channel,
    s: &Shipment,
    lacking: &[u32],
    total: u64,
    phase: &str,
    events: &mut dyn FnMut(Event),
) -> Result<u64, MigrateError> {
    let mut reader = store.chunk_reader()?;
    let mut sent = 0u64;
    let mut last_report = 0u64;
    let corrupt = crate::failpoint::check("source-send-chunks") == Some(crate::failpoint::Action::Corrupt);
    let mut i = 0;
    while i < lacking.len() {
        // About BATCH_BYTES of chunks per frame.
        let mut refs = Vec::new();
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        while i < lacking.len() && bytes < BATCH_BYTES {
            let pos = lacking[i];
            let chunk = *s.chunks.get(pos as usize).ok_or_else(|| {
                MigrateError::protocol(format!("the target asked for chunk {pos} of {}", s.chunks.len()))
            })?;
            refs.push(chunk);
            entries.push((pos, chunk.len));
            bytes += chunk.len as usize;
            i += 1;
        }
        let mut payload = batch_header(&entries);
        let head = payload.len();
        reader.read_batch(&refs, &mut payload)?;
        if corrupt && sent == 0 && payload.len() > head + 64 {
            let mid = head + (payload.len() - head) / 2;
            payload[mid] ^= 0x40;
        }
        ferry_wire::frame::write_frame(&mut ch.conn, KIND_CHUNKS, &payload)?;
        sent += (payload.len() - head) as u64;
        if sent - last_report >= 16 << 20 {
            last_report = sent;
            events(Event::Progress(Progress { phase: phase.into(), done: sent, total }));
        }
    }
    events(Event::Progress(Progress { phase: phase.into(), done: sent, total }));
    Ok(sent)
}

/// Takes in the checkpoint offered (after `Offer` was read); answers `Stored`.
pub(crate) fn receive(
    store: &Store,
    ch: &mut Channel,
    name: String,
    manifest_len: u64,
    slots: Vec<u8>,
    total: u32,
    packs: &mut Vec<[u8; 16]>,
) -> Result<u64, MigrateError> {
    let phase = "receiving a checkpoint";
    if manifest_len > ferry_store::manifest::MAX_MANIFEST_FILE as u64 {
        return Err(MigrateError::Refused(format!("a manifest of {manifest_len} bytes offered")));
    }
    let mut manifest = Vec::with_capacity(manifest_len as usize);
    while (manifest.len() as u64) < manifest_len {
        match ch.recv(phase)? {
            Msg::ManifestPart(part) if manifest.len() as u64 + part.len() as u64 <= manifest_len => {
                manifest.extend_from_slice(&part);
            }
            Msg::ManifestPart(_) => return Err(MigrateError::protocol("more manifest bytes than offered")),
            other => return Err(unexpected(phase, &other)),
        }
    }
    if total as usize > ferry_store::replica::MAX_SHIPMENT_CHUNKS {
        return Err(MigrateError::Refused(format!("{total} chunks offered")));
    }
    let mut chunks: Vec<ChunkRef> = Vec::with_capacity(total as usize);
    while chunks.len() < total as usize {
        match ch.recv(phase)? {
            Msg::ChunkList(part) if chunks.len() + part.len() <= total as usize => chunks.extend(part),
            Msg::ChunkList(_) => return Err(MigrateError::protocol("more chunks listed than offered")),
            other => return Err(unexpected(phase, &other)),
        }
    }
    let t0 = std::time::Instant::now();
    let lacking = store.lacking(&chunks)?;
    tracing::debug!(seconds = t0.elapsed().as_secs_f64(), "offer taken: lacking found");
    let wanted: HashSet<u32> = lacking.iter().copied().collect();
    let parts: Vec<&[u32]> = lacking.chunks(REFS_PER_FRAME * 4).collect();
    if parts.is_empty() {
        ch.send(&Msg::Lacking { positions: Vec::new(), last: true })?;
    }
    for (i, part) in parts.iter().enumerate() {
        ch.send(&Msg::Lacking { positions: part.to_vec(), last: i + 1 == parts.len() })?;
    }
    let mut rx = store.receiver_with(false)?;
    packs.extend(rx.pack());
    crate::failpoint::check("target-receive");
    if let Err(e) = take_chunks(ch, &mut rx, &chunks, &wanted, phase) {
        // Say why now, and read what is still coming until the source's end marker: hanging
        // up on unread data would reset the connection and lose the message.
        let _ = ch.send(&Msg::Error { message: crate::chain(&e) });
        while let Ok(next) = ch.next(phase) {
            if matches!(next, Ok(Msg::ChunksDone) | Ok(Msg::Abort { .. })) {
                break;
            }
        }
        return Err(e);
    }
    let bytes = rx.bytes();
    tracing::debug!(seconds = t0.elapsed().as_secs_f64(), "offer taken: chunks in");
    rx.finish(&Shipment { name, manifest, slots, chunks })?;
    tracing::debug!(seconds = t0.elapsed().as_secs_f64(), "offer taken: recorded");
    ch.send(&Msg::Stored { bytes })?;
    Ok(bytes)
}

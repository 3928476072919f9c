//! The fuzz targets' bodies, shared by the libFuzzer binaries (`fuzz_targets/`, nightly
//! `cargo fuzz`) and by `replay` (stable: runs a corpus through them once).
//!
//! Keys are fixed so that inputs made by `gen_corpus` stay valid across runs. A fuzzer cannot
//! forge signatures or AEAD tags, so each target also builds correctly signed or sealed
//! containers around fuzzer-chosen contents: that is how it reaches the body decoder, the
//! bounded decompression and the validation behind them.

use std::sync::OnceLock;

use aes_gcm::Aes256Gcm;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::XChaCha20Poly1305;
use ferry_store::keys::NodeKeys;
use ferry_store::manifest::{decode_verified, encode_signed};
use ferry_store::seal::{
    frame_len, DataKey, FrameFormat, KeyRing, Opener, Sealer, Slots, HEADER_LEN, MAX_PLAIN,
};

/// The fixed node: `node.key` bytes with Ed25519 seed 1.., X25519 secret 2.., hash key 3...
pub fn node() -> &'static NodeKeys {
    static K: OnceLock<NodeKeys> = OnceLock::new();
    K.get_or_init(|| {
        let mut b = Vec::with_capacity(104);
        b.extend_from_slice(b"FRYK");
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&[1; 32]);
        b.extend_from_slice(&[2; 32]);
        b.extend_from_slice(&[3; 32]);
        NodeKeys::from_secret_bytes(&b).expect("fixed node key")
    })
}

pub const DATA_KEY: [u8; 32] = [4; 32];

pub fn ring() -> &'static KeyRing {
    static R: OnceLock<KeyRing> = OnceLock::new();
    R.get_or_init(|| {
        let mut r = KeyRing::new();
        r.insert(DataKey::from_bytes(&DATA_KEY));
        r
    })
}

/// `body` framed as a manifest and signed by the fixed node.
pub fn sign_body(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + body.len() + 96);
    out.extend_from_slice(b"FRYM");
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    let sig = node().sign(&out);
    out.extend_from_slice(&sig);
    out.extend_from_slice(&node().public().ed25519);
    out
}

/// Input: a manifest file, which is also tried as a body signed by the trusted key.
pub fn manifest(data: &[u8]) {
    let trusted = [node().public().ed25519];
    let _ = decode_verified(data, &trusted);
    // Signing is the slow part; large bodies add little that small ones do not.
    if data.len() > 1 << 20 {
        return;
    }
    if let Ok((m, signer)) = decode_verified(&sign_body(data), &trusted) {
        assert_eq!(signer, trusted[0]);
        // What was accepted re-encodes, and reads back the same.
        let again = encode_signed(&m, node()).expect("an accepted manifest re-encodes");
        let (back, _) = decode_verified(&again, &trusted).expect("a re-encoded manifest verifies");
        assert_eq!(back, m);
    }
}

/// Input: a mode byte, then
/// - 0: chunk id (32) || frame, opened as read from a pack;
/// - 1 (format 1) and 3 (format 2): flags (1), plain_len (4), payload: a frame sealed here with
///   the fixed data key around the payload, so the fuzzer controls what is decompressed after
///   authentication;
/// - 2: a plaintext, sealed in both formats and opened again.
pub fn chunk_frame(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut opener = Opener::new(ring(), node().hash_key());
    match mode % 4 {
        0 => {
            if rest.len() < 32 {
                return;
            }
            let (id, frame) = rest.split_at(32);
            let id: [u8; 32] = id.try_into().expect("32 bytes");
            let len = frame_len(frame);
            if let Ok(plain) = opener.open(&id, frame) {
                assert_eq!(len.expect("an opened frame has a length"), frame.len());
                assert_eq!(node().chunk_id(&plain), id);
            }
        }
        m @ (1 | 3) => {
            if rest.len() < 5 {
                return;
            }
            let flags = rest[0];
            let plain_len = u32::from_le_bytes([rest[1], rest[2], rest[3], rest[4]]);
            let payload = &rest[5..];
            let id = node().chunk_id(payload);
            let format = if m == 1 { FrameFormat::XChaCha20Poly1305 } else { FrameFormat::Aes256Gcm };
            let frame = seal_raw(format, flags, plain_len, payload, &id);
            let r = opener.open(&id, &frame);
            if let Ok(p) = &r {
                assert_eq!(p.len(), plain_len as usize);
            }
            if flags == 0 && plain_len as usize == payload.len() && payload.len() <= MAX_PLAIN {
                assert_eq!(r.expect("a well-formed raw frame opens"), payload);
            }
        }
        _ => {
            if rest.len() > MAX_PLAIN {
                return;
            }
            let id = node().chunk_id(rest);
            for format in [FrameFormat::XChaCha20Poly1305, FrameFormat::Aes256Gcm] {
                let mut out = Vec::new();
                Sealer::with_format(&DataKey::from_bytes(&DATA_KEY), format).seal(&id, rest, &mut out);
                assert_eq!(out[4], format.version());
                assert_eq!(frame_len(&out).expect("sealed frame has a length"), out.len());
                assert_eq!(opener.open(&id, &out).expect("sealed frame opens"), rest);
            }
        }
    }
}

/// A frame with any header fields, sealed correctly (per docs/store-format.md) with the fixed
/// data key: the reference XChaCha20-Poly1305 or AES-256-GCM (RustCrypto's), not
/// ferry-store's own.
pub fn seal_raw(format: FrameFormat, flags: u8, plain_len: u32, payload: &[u8], id: &[u8; 32]) -> Vec<u8> {
    let dk = DataKey::from_bytes(&DATA_KEY);
    let mut f = Vec::with_capacity(HEADER_LEN + payload.len() + 16);
    f.extend_from_slice(b"FRYC");
    f.push(format.version());
    f.push(flags);
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&dk.id());
    // Format 1: the XChaCha20 nonce; format 2: salt (16) || frame number (8).
    let nonce = [9u8; 24];
    f.extend_from_slice(&nonce);
    f.extend_from_slice(&plain_len.to_le_bytes());
    f.extend_from_slice(&((payload.len() + 16) as u32).to_le_bytes());
    let mut aad = f.clone();
    aad.extend_from_slice(id);
    let mut body = payload.to_vec();
    let tag = match format {
        FrameFormat::XChaCha20Poly1305 => XChaCha20Poly1305::new((&DATA_KEY).into())
            .encrypt_in_place_detached((&nonce).into(), &aad, &mut body)
            .expect("small payload"),
        FrameFormat::Aes256Gcm => {
            let chunk_key =
                blake3::derive_key("ferry 2026 chunk key", &[&DATA_KEY[..], &nonce[..16]].concat());
            let gcm_nonce = [&nonce[16..], &[0u8; 4][..]].concat();
            Aes256Gcm::new((&chunk_key).into())
                .encrypt_in_place_detached(gcm_nonce[..].into(), &aad, &mut body)
                .expect("small payload")
        }
    };
    f.extend_from_slice(&body);
    f.extend_from_slice(&tag);
    f
}

/// Input: a slots file.
pub fn slots(data: &[u8]) {
    if let Ok(s) = Slots::decode(data) {
        // One encoding per value: what decodes re-encodes to the same bytes.
        assert_eq!(s.encode(), data);
        if let Ok(ring) = s.open_all(node().x25519_secret()) {
            assert_eq!(ring.len(), s.entries.len());
        }
    }
}

/// The tar reader of `ferry import`: hostile archives must be refused, never panic or allocate
/// what the headers claim.
pub fn archive(data: &[u8]) {
    let _ = ferry_store::archive::check_archive(data);
}

/// A message shape with the field types protocol messages use, for the typed decoder.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Probe {
    Hello { name: String, versions: Vec<u16>, hash_key_id: [u8; 32] },
    Chunks(Vec<([u8; 32], Vec<u8>)>),
    Pages { start: u64, len: u32, data: Option<Vec<u8>> },
    Done,
}

/// Input: a stream of wire frames. Read as a stream (with a small cap and the default one) and
/// as a slice, the two readers agree; what they accept re-encodes to the same bytes; payloads
/// are also tried as typed messages.
pub fn wire_frame(data: &[u8]) {
    use ferry_wire::frame::{decode_frame, decode_payload, read_frame, write_frame, DEFAULT_CAP};

    for cap in [64, DEFAULT_CAP] {
        let mut cursor = std::io::Cursor::new(data);
        let mut offset = 0;
        loop {
            let streamed = read_frame(&mut cursor, cap);
            let sliced = decode_frame(&data[offset..], cap);
            match (streamed, sliced) {
                (Ok(Some(f)), Ok((g, used))) => {
                    assert_eq!(f, g, "stream and slice readers agree");
                    assert!(f.payload.len() <= cap as usize, "cap holds");
                    let mut again = Vec::new();
                    write_frame(&mut again, f.kind, &f.payload).expect("writes to a Vec");
                    assert_eq!(again, &data[offset..offset + used], "one encoding per frame");
                    if let Ok(msg) = decode_payload::<Probe>(&f) {
                        // Not byte-equal: postcard accepts overlong varints.
                        let bytes = postcard::to_allocvec(&msg).expect("a decoded message encodes");
                        let back: Probe = postcard::from_bytes(&bytes).expect("re-encoded message decodes");
                        assert_eq!(back, msg);
                    }
                    offset += used;
                    assert_eq!(cursor.position() as usize, offset);
                }
                (Ok(None), Err(_)) => {
                    assert_eq!(offset, data.len(), "a clean end only at the end");
                    break;
                }
                (Err(_), Err(_)) => break,
                (s, d) => panic!("readers disagree at {offset}: stream {s:?}, slice {d:?}"),
            }
        }
    }
}

/// The migration protocol's payloads: control messages and local API requests as postcard
/// (what decodes must re-encode and decode to the same value), and chunk batches (the lengths
/// a batch lists must add up to the bytes it carries).
pub fn migrate_msg(data: &[u8]) {
    use ferry_migrate::api::{Event, Request};
    use ferry_migrate::proto::{decode_batch, decode_push, decode_stream, push_header, stream_header, Msg};

    if let Ok(msg) = postcard::from_bytes::<Msg>(data) {
        let bytes = postcard::to_allocvec(&msg).expect("a decoded message encodes");
        let back: Msg = postcard::from_bytes(&bytes).expect("re-encoded message decodes");
        assert_eq!(format!("{back:?}"), format!("{msg:?}"));
    }
    if let Ok(req) = postcard::from_bytes::<Request>(data) {
        let bytes = postcard::to_allocvec(&req).expect("a decoded request encodes");
        let back: Request = postcard::from_bytes(&bytes).expect("re-encoded request decodes");
        assert_eq!(format!("{back:?}"), format!("{req:?}"));
    }
    let _ = postcard::from_bytes::<Event>(data);
    if let Ok((entries, frames)) = decode_batch(data) {
        let total: u64 = entries.iter().map(|(_, l)| u64::from(*l)).sum();
        assert_eq!(total, frames.len() as u64, "a batch's lengths add up");
        assert!(4 + 8 * entries.len() + frames.len() == data.len());
    }
    if let Ok((pid, vaddr, pages)) = decode_push(data) {
        assert!(!pages.is_empty() && pages.len().is_multiple_of(4096) && vaddr.is_multiple_of(4096));
        let mut again = push_header(pid, vaddr);
        again.extend_from_slice(pages);
        assert_eq!(again, data, "a page push frame re-encodes to its bytes");
    }
    if let Ok((chunks, frames)) = decode_stream(data) {
        let total: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
        assert_eq!(total, frames.len() as u64, "a stream batch's lengths add up");
        let mut again = stream_header(&chunks, frames.len());
        again.extend_from_slice(frames);
        assert_eq!(again, data, "a stream batch re-encodes to its bytes");
    }
}

/// CRIU's pagemap and mm images as post-copy's target reads them (`lazy_iovs_of`). The input
/// is a little-endian `u32` length, that many bytes of pagemap image, then the mm image.
pub fn lazy_images(data: &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<4>() else { return };
    let n = (u32::from_le_bytes(*len) as usize).min(rest.len());
    let (pagemap, mm) = rest.split_at(n);
    if let Ok(iovs) = ferry_migrate::lazy::lazy_iovs_of(pagemap, mm) {
        let mut last = 0u64;
        for &(start, end) in &iovs {
            assert!(start < end, "an empty or reversed range: {iovs:?}");
            assert!(start % 4096 == 0 && end % 4096 == 0, "not page aligned: {iovs:?}");
            assert!(start >= last, "ranges overlap or are out of order: {iovs:?}");
            last = end;
        }
    }
}

/// A container's record (`ferry-container.json`), its `deleted.files`, or the container
/// metadata of a Podman or kubelet (CRI-O) archive, as a checkpoint or an imported archive
/// carries them. First byte: 0, the record; 2, `config.dump` and `spec.dump` (then
/// `network.status`) mapped to a record: two little-endian `u32` lengths (config, spec), the
/// two documents, and the rest as `network.status` if any; anything else, the deleted list.
/// What is accepted must be valid by the parsers' own rules and survive a round trip.
pub fn container_record(data: &[u8]) {
    use ferry_runtime::container::{rootfs, ContainerRecord};
    let Some((&which, rest)) = data.split_first() else { return };
    if which == 0 {
        if let Ok(r) = ContainerRecord::parse(rest) {
            let again = serde_json::to_vec(&r).expect("a parsed record encodes");
            assert_eq!(ContainerRecord::parse(&again).expect("and parses again"), r);
            for (src, _) in r.bind_sources() {
                let _ = src.len();
            }
        }
    } else if which == 2 {
        container_dumps(rest);
    } else if let Ok(list) = rootfs::parse_deleted(rest) {
        for p in list {
            assert!(!p.split('/').any(|c| c == ".."), "{p}");
        }
    }
}

/// `config.dump` + `spec.dump` (+ `network.status`) to a record, and back to Podman's files.
fn container_dumps(data: &[u8]) {
    use ferry_runtime::container::formats::{
        config_dump, image_annotations, record_from_dumps, spec_dump, ImageFacts,
    };
    use ferry_runtime::container::ContainerRecord;
    let Some((config_len, rest)) = data.split_first_chunk::<4>() else { return };
    let Some((spec_len, rest)) = rest.split_first_chunk::<4>() else { return };
    let config_len = (u32::from_le_bytes(*config_len) as usize).min(rest.len());
    let (config, rest) = rest.split_at(config_len);
    let spec_len = (u32::from_le_bytes(*spec_len) as usize).min(rest.len());
    let (spec, network) = rest.split_at(spec_len);
    let network = (!network.is_empty()).then_some(network);
    let Ok((record, _engine)) = record_from_dumps(config, spec, network) else { return };
    record.validate().expect("a record made from dumps is valid");
    assert_eq!(record.kind, "podman");
    assert!(!record.annotations().contains_key("org.criu.config"), "the archive's CRIU config is dropped");
    let bytes = serde_json::to_vec(&record).expect("a made record encodes");
    assert_eq!(ContainerRecord::parse(&bytes).expect("and parses as any record"), record);
    let made = config_dump(&record, None).expect("a podman record has a config.dump");
    assert!(made.is_object());
    assert!(made.get("conmonPidFile").is_none() && made.get("ShmDir").is_none(), "no old host's paths");
    assert!(spec_dump(&record).pointer("/annotations/org.criu.config").is_none());
    let facts = ImageFacts { checkpoint: "fuzz", criu_version: "4.2.1", kernel: "6.1" };
    let a = image_annotations(&record, &made, &facts);
    assert_eq!(a.get("io.podman.annotations.checkpoint.runtime.name").map(String::as_str), Some("runc"));
}

/// `ferry check`'s readers of what `/proc` and the kernel say about a workload, all untrusted:
/// mode byte, then for an even one a sock_diag answer (netlink datagram), else text given to
/// every `/proc` parser. Nothing may panic; what comes out keeps the parsers' own bounds.
pub fn proc_facts(data: &[u8]) {
    use ferry_runtime::check::{lock_holders, parse, unix_diag};
    let Some((&which, rest)) = data.split_first() else { return };
    if which % 2 == 0 {
        let mut out = std::collections::HashMap::new();
        if unix_diag::parse(rest, &mut out).is_ok() {
            for (inode, s) in &out {
                assert_eq!(*inode, s.inode);
                assert_ne!(s.peer, Some(0), "a zero peer means none");
            }
        }
        return;
    }
    let text = String::from_utf8_lossy(rest);
    let _ = parse::stat(&text);
    assert!(parse::stat_comm(&text).chars().count() <= 64);
    assert!(parse::status(&text).ns_pids.len() <= 64);
    for line in text.lines() {
        let _ = parse::fd_kind(line);
        let _ = parse::ns_inode(line);
        let _ = parse::syscall_is_vfork(line);
    }
    let _ = parse::ptmx_index(&text);
    let maps = parse::maps(&text);
    let mut paths: Vec<&str> = maps.iter().map(|m| m.path.as_str()).collect();
    assert!(paths.iter().all(|p| p.starts_with('/')));
    paths.sort_unstable();
    let n = paths.len();
    paths.dedup();
    assert_eq!(n, paths.len(), "each mapped path once");
    let _ = parse::tcp_table(&text);
    let _ = parse::sysvipc_shm(&text);
    let _ = parse::hugetlbfs_mounts(&text);
    let _ = parse::mem_available_kib(&text);
    let holders = lock_holders(&text);
    assert!(holders.iter().all(|p| *p > 0) && holders.windows(2).all(|w| w[0] < w[1]));
}

/// `clones.json` as `ferry list` reads it (the store's record of running clones): nothing may
/// panic, and what parses is within the caps.
pub fn clones_file(data: &[u8]) {
    if let Ok(clones) = ferry_runtime::clone::parse_clones(data) {
        assert!(clones.len() <= 4096);
    }
}

/// A working-set hint (`STORE/hints/ID.ws`): the id it is read for is the one it names, so
/// that the fuzzer reaches the runs; what decodes encodes back to the same bytes.
pub fn working_set(data: &[u8]) {
    use ferry_store::working_set::{decode, encode, MAX_RUNS};
    let mut id = [0u8; 16];
    if let Some(named) = data.get(16..32) {
        id.copy_from_slice(named);
    }
    if let Ok(runs) = decode(data, &id) {
        assert!(runs.len() <= MAX_RUNS);
        assert_eq!(encode(&id, &runs), data);
    }
}

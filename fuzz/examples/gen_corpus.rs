//! Writes the seed corpus, made by ferry-store's own encoders with the fixed keys:
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus` (into fuzz/corpus/).

use std::path::Path;

use ferry_store::keys::NodeKeys;
use ferry_store::manifest::{encode_signed, Extent, FileRecord, HostInfo, ManifestBody};
use ferry_store::seal::{DataKey, Sealer, Slots};
use ferry_store_fuzz::{node, seal_raw, Probe, DATA_KEY};

fn write(dir: &Path, name: &str, data: &[u8]) {
    std::fs::create_dir_all(dir).expect("create corpus dir");
    std::fs::write(dir.join(name), data).expect("write seed");
}

fn body(files: usize, extents: usize) -> ManifestBody {
    let k = node();
    ManifestBody {
        id: [5; 16],
        name: "web1".into(),
        created: 1_760_000_000,
        generation: 2,
        source: "pid:1234".into(),
        host: HostInfo {
            hostname: "node-a".into(),
            kernel: "6.8.0-45-generic".into(),
            criu_version: "4.0".into(),
            cpu_flags: "fpu vme sse2 avx2".into(),
        },
        spec: r#"{"kind":"pid","pid":1234}"#.into(),
        tcp_established: files > 1,
        leave_running: false,
        network_lock_tables: vec!["CRIU-0a1b2c3d".into()],
        dump_seconds: 1.5,
        key_ids: vec![DataKey::from_bytes(&DATA_KEY).id()],
        recipients: vec![k.public().x25519],
        files: (0..files)
            .map(|f| {
                let extents: Vec<Extent> = (0..extents)
                    .map(|e| {
                        if e % 2 == 1 {
                            Extent::Zero { len: 4096 * (e as u64 + 1) }
                        } else {
                            Extent::Chunk { id: k.chunk_id(&[f as u8, e as u8]), len: 4096 }
                        }
                    })
                    .collect();
                FileRecord {
                    name: format!("pages-{f}.img"),
                    size: extents.iter().map(Extent::len).sum(),
                    extents,
                }
            })
            .collect(),
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let k = node();

    let dir = root.join("manifest");
    for (i, (files, extents)) in [(0, 0), (1, 1), (3, 4), (2, 40)].into_iter().enumerate() {
        let b = body(files, extents);
        write(&dir, &format!("signed-{i}"), &encode_signed(&b, k).expect("valid body"));
        // The target also signs its input as a body: raw bodies reach the decoder directly.
        write(&dir, &format!("body-{i}"), &postcard::to_allocvec(&b).expect("encodes"));
    }

    let dir = root.join("chunk_frame");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            // xorshift64: incompressible enough for zstd to give up.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let text: Vec<u8> = b"ferry checkpoint restore page ".iter().cycle().take(4096).copied().collect();
    let dk = DataKey::from_bytes(&DATA_KEY);
    for (i, plain) in [&random[..], &text[..], b"tiny", b""].into_iter().enumerate() {
        let id = k.chunk_id(plain);
        let mut frame = vec![0u8];
        frame.extend_from_slice(&id);
        Sealer::new(&dk).seal(&id, plain, &mut frame);
        write(&dir, &format!("frame-{i}"), &frame);
        let mut rt = vec![2u8];
        rt.extend_from_slice(plain);
        write(&dir, &format!("roundtrip-{i}"), &rt);
    }
    // Mode 1: authenticated payloads, raw and zstd.
    let z = zstd::bulk::compress(&text, 1).expect("zstd");
    for (i, (flags, plain_len, payload)) in
        [(0u8, 4096u32, &random[..]), (1, 4096, &z[..]), (1, 100, &z[..])].into_iter().enumerate()
    {
        let mut v = vec![1u8, flags];
        v.extend_from_slice(&plain_len.to_le_bytes());
        v.extend_from_slice(payload);
        write(&dir, &format!("payload-{i}"), &v);
        // Sanity: the helper builds what the target builds.
        let _ = seal_raw(flags, plain_len, payload, &k.chunk_id(payload));
    }

    let dir = root.join("slots");
    let other = NodeKeys::generate().public().x25519;
    let k2 = DataKey::from_bytes(&[6; 32]);
    let sets: [(&[&DataKey], Vec<[u8; 32]>); 3] = [
        (&[&dk], vec![k.public().x25519]),
        (&[&dk, &k2], vec![other, k.public().x25519]),
        (&[&k2], vec![other]),
    ];
    for (i, (keys, recipients)) in sets.iter().enumerate() {
        write(&dir, &format!("slots-{i}"), &Slots::wrap(keys, recipients).expect("wrap").encode());
    }
    write(&dir, "slots-empty", &Slots::default().encode());

    let dir = root.join("wire_frame");
    let probes = [
        Probe::Hello { name: "node1".into(), versions: vec![1], hash_key_id: [3; 32] },
        Probe::Chunks(vec![([1; 32], b"chunk".to_vec()), ([2; 32], vec![])]),
        Probe::Pages { start: 0x7f00_0000_0000, len: 4096, data: Some(vec![0xaa; 64]) },
        Probe::Done,
    ];
    let mut stream = Vec::new();
    for (i, p) in probes.iter().enumerate() {
        let mut one = Vec::new();
        ferry_wire::frame::send(&mut one, i as u16 + 1, p).expect("encodes");
        write(&dir, &format!("probe-{i}"), &one);
        stream.extend(one);
    }
    write(&dir, "stream", &stream);
    let mut raw = Vec::new();
    ferry_wire::frame::write_frame(&mut raw, 0xffff, &[0; 100]).expect("writes");
    write(&dir, "above-small-cap", &raw);
    println!("seed corpus written to {}", root.display());
}

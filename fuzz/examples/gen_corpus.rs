//! Writes the seed corpus, made by ferry-store's own encoders with the fixed keys:
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus` (into fuzz/corpus/).

use std::path::Path;

use ferry_store::keys::NodeKeys;
use ferry_store::manifest::{encode_signed, Extent, FileRecord, HostInfo, ManifestBody};
use ferry_store::seal::{DataKey, FrameFormat, Sealer, Slots};
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

/// `gen_corpus` writes every seed; `gen_corpus container_record archive chunk_frame` only the
/// seeds of those targets (the others are left as they are).
fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let only: Vec<String> = std::env::args().skip(1).collect();
    if !only.is_empty() {
        for t in &only {
            match t.as_str() {
                "container_record" => container_seeds(&root),
                "archive" => archive_seeds(&root),
                "chunk_frame" => chunk_frame_seeds(&root),
                other => {
                    panic!("gen_corpus: {other}: only container_record, archive and chunk_frame are written alone")
                }
            }
        }
        return;
    }
    container_seeds(&root);
    archive_seeds(&root);
    let k = node();

    let dir = root.join("manifest");
    for (i, (files, extents)) in [(0, 0), (1, 1), (3, 4), (2, 40)].into_iter().enumerate() {
        let b = body(files, extents);
        write(&dir, &format!("signed-{i}"), &encode_signed(&b, k).expect("valid body"));
        // The target also signs its input as a body: raw bodies reach the decoder directly.
        write(&dir, &format!("body-{i}"), &postcard::to_allocvec(&b).expect("encodes"));
    }

    chunk_frame_seeds(&root);
    let dk = DataKey::from_bytes(&DATA_KEY);

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

/// Podman 4's `config.dump` (trimmed; the old host's paths kept, as Podman writes them).
const PODMAN_CONFIG: &str = r#"{"id": "54afcbe79e1572275246f2d32624812d396ea9410d849d1d5f1c2ecf8dab407b",
 "name": "web", "rootfsImageID": "10ab2a76fde08deda52d3c1da1b25d4b1469590484cce792df52de62affb293a",
 "rootfsImageName": "localhost/ferry-lab/busybox:latest", "labels": {"app": "web"},
 "ShmDir": "/var/lib/containers/storage/overlay-containers/54af/userdata/shm",
 "conmonPidFile": "/run/containers/storage/overlay-containers/54af/userdata/conmon.pid",
 "idMappingsOptions": {"HostUIDMapping": true, "HostGIDMapping": true},
 "cgroupParent": "/libpod_parent", "runtime": "runc", "stopSignal": 15, "createNetNS": true}"#;
const PODMAN_SPEC: &str = r#"{"ociVersion": "1.0.2-dev", "process": {"args": ["/bin/sh"]},
 "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/run/netns/netns-1"}],
           "cgroupsPath": "/libpod_parent/libpod-54af"},
 "annotations": {"io.container.manager": "libpod", "org.criu.config": "/etc/evil.conf"}}"#;
const PODMAN_NETWORK: &str = r#"{"podman": {"interfaces": {"eth0": {"subnets": [{"ipnet": "10.88.0.5/16",
 "gateway": "10.88.0.1"}], "mac_address": "0a:58:0a:58:00:05"}}}}"#;
/// CRI-O's `config.dump` and `spec.dump` of a kubelet checkpoint.
const CRIO_CONFIG: &str = r#"{"id": "6b2c5e1f0b0e4f6a9d7c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e",
 "name": "k8s_counter_counters_default_2f1c_0", "rootfsImage": "busybox",
 "rootfsImageRef": "3f57d9401f8d42f986df300f0c69192fc41da28ccc8d797829467780db3dd741",
 "rootfsImageName": "docker.io/library/busybox:latest", "runtime": "runc",
 "createdTime": "2026-12-06T20:00:00Z", "checkpointedTime": "2026-12-06T21:00:00Z",
 "restoredTime": "0001-01-01T00:00:00Z", "restored": false}"#;
const CRIO_SPEC: &str = r#"{"ociVersion": "1.0.2-dev", "process": {"args": ["/bin/sh", "-c", "count"]},
 "linux": {"namespaces": [{"type": "network", "path": "/var/run/netns/7d6c"}]},
 "annotations": {"io.container.manager": "cri-o", "io.kubernetes.container.name": "counter",
  "io.kubernetes.pod.name": "counters", "io.kubernetes.pod.namespace": "default",
  "io.kubernetes.cri-o.IP.0": "10.85.0.12",
  "io.kubernetes.cri-o.Labels": "{\"io.kubernetes.pod.name\":\"counters\"}"}}"#;

/// Input of `container_record` mode 2: config and spec lengths, the two, network.status.
fn dumps_seed(config: &str, spec: &str, network: &str) -> Vec<u8> {
    let mut v = vec![2u8];
    v.extend_from_slice(&(config.len() as u32).to_le_bytes());
    v.extend_from_slice(&(spec.len() as u32).to_le_bytes());
    v.extend_from_slice(config.as_bytes());
    v.extend_from_slice(spec.as_bytes());
    v.extend_from_slice(network.as_bytes());
    v
}

fn container_seeds(root: &Path) {
    let dir = root.join("container_record");
    write(&dir, "dumps-podman", &dumps_seed(PODMAN_CONFIG, PODMAN_SPEC, PODMAN_NETWORK));
    write(&dir, "dumps-podman-null-network", &dumps_seed(PODMAN_CONFIG, PODMAN_SPEC, "null"));
    write(&dir, "dumps-crio", &dumps_seed(CRIO_CONFIG, CRIO_SPEC, ""));
    let hostile_labels = CRIO_SPEC.replace(r#"{\"io.kubernetes"#, r#"[\"io.kubernetes"#);
    write(&dir, "dumps-crio-bad-labels", &dumps_seed(CRIO_CONFIG, &hostile_labels, ""));
    let hostile_name = PODMAN_CONFIG.replace(r#""name": "web""#, r#""name": "../../etc""#);
    write(&dir, "dumps-podman-bad-name", &dumps_seed(&hostile_name, PODMAN_SPEC, ""));
}

/// A tar of `entries` (a name ending in `/` is a directory).
fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        let dir = name.ends_with('/');
        h.set_entry_type(if dir { tar::EntryType::Directory } else { tar::EntryType::Regular });
        h.set_mode(if dir { 0o755 } else { 0o644 });
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, *data).expect("append");
    }
    b.into_inner().expect("tar")
}

/// Archives in the layouts `ferry import` takes besides its own: Podman's export and CRI-O's
/// (the kubelet's), with their root file system changes.
fn archive_seeds(root: &Path) {
    let dir = root.join("archive");
    let diff = tar_of(&[("root/", b""), ("root/new.txt", b"hello\n")]);
    let podman = tar_of(&[
        ("artifacts/", b""),
        ("devshm-checkpoint.tar", &[0u8; 1536]),
        ("config.dump", PODMAN_CONFIG.as_bytes()),
        ("spec.dump", PODMAN_SPEC.as_bytes()),
        ("network.status", PODMAN_NETWORK.as_bytes()),
        ("stats-dump", b"\x01\x02"),
        ("ctr.log", b"2026-12-06T21:00:00Z stdout F tick\n"),
        ("checkpoint/", b""),
        ("checkpoint/inventory.img", b"inventory"),
        ("checkpoint/descriptors.json", b"[\"/dev/null\",\"pipe:[1]\",\"pipe:[1]\"]"),
        ("checkpoint/pages-1.img", &[7u8; 4096]),
        ("rootfs-diff.tar", &diff),
        ("deleted.files", b"[\"/data\"]"),
    ]);
    write(&dir, "podman-export.tar", &podman);
    let crio = tar_of(&[
        ("./", b""),
        ("stats-dump", b"\x01"),
        ("dump.log", b"(00.000000) Dumping finished successfully\n"),
        ("checkpoint/", b""),
        ("checkpoint/inventory.img", b"inventory"),
        ("checkpoint/pages-1.img", &[7u8; 4096]),
        ("config.dump", CRIO_CONFIG.as_bytes()),
        ("spec.dump", CRIO_SPEC.as_bytes()),
        ("bind.mounts", b"[]"),
        ("rootfs-diff.tar", &diff),
        ("deleted.files", b"[]"),
        ("io.kubernetes.cri-o.LogPath", b"tick\n"),
    ]);
    write(&dir, "kubelet-checkpoint.tar", &crio);
}

/// Frames of both formats, authenticated payloads for both, plaintexts to round-trip.
fn chunk_frame_seeds(root: &Path) {
    let k = node();
    let dir = root.join("chunk_frame");
    let dk = DataKey::from_bytes(&DATA_KEY);
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
    for (i, plain) in [&random[..], &text[..], b"tiny", b""].into_iter().enumerate() {
        let id = k.chunk_id(plain);
        // Format 2 (what ferry writes now) and format 1 (what it wrote before, still read).
        for (format, name) in
            [(FrameFormat::Aes256Gcm, "frame"), (FrameFormat::XChaCha20Poly1305, "frame-v1")]
        {
            let mut frame = vec![0u8];
            frame.extend_from_slice(&id);
            Sealer::with_format(&dk, format).seal(&id, plain, &mut frame);
            write(&dir, &format!("{name}-{i}"), &frame);
        }
        let mut rt = vec![2u8];
        rt.extend_from_slice(plain);
        write(&dir, &format!("roundtrip-{i}"), &rt);
    }
    // Modes 1 (format 1) and 3 (format 2): authenticated payloads, raw and zstd.
    let z = zstd::bulk::compress(&text, 1).expect("zstd");
    for (i, (flags, plain_len, payload)) in
        [(0u8, 4096u32, &random[..]), (1, 4096, &z[..]), (1, 100, &z[..])].into_iter().enumerate()
    {
        for (mode, format, name) in
            [(1u8, FrameFormat::XChaCha20Poly1305, "payload"), (3, FrameFormat::Aes256Gcm, "payload-v2")]
        {
            let mut v = vec![mode, flags];
            v.extend_from_slice(&plain_len.to_le_bytes());
            v.extend_from_slice(payload);
            write(&dir, &format!("{name}-{i}"), &v);
            // Sanity: the helper builds what the target builds.
            let _ = seal_raw(format, flags, plain_len, payload, &k.chunk_id(payload));
        }
    }
}

//! Per-core cost of the secure store's primitives on 4 KiB chunks, both chunk frame formats in
//! the same run: sealing and opening (format 1 XChaCha20-Poly1305, format 2 AES-256-GCM) and
//! the keyed chunk id (BLAKE3, against HMAC-SHA-256 as the other keyed hash at hand).
//!
//! `cargo run --release -p ferry-store --example seal_bench [-- MIB_PER_ROUND ROUNDS]`
//!
//! One thread; random (incompressible) pages from a 1 MiB working set, so the data is in cache
//! and no compression is tried: this is the crypto alone. Variants take turns within each
//! round and the best round counts, so that a busy machine slows them alike.

use std::hint::black_box;
use std::time::Instant;

use ferry_store::keys::{ChunkId, NodeKeys};
use ferry_store::seal::{DataKey, FrameFormat, KeyRing, Opener, Sealer};
use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

const PAGE: usize = 4096;
const SET: usize = 256;

struct Fixture {
    keys: NodeKeys,
    dk: DataKey,
    ring: KeyRing,
    pages: Vec<Vec<u8>>,
    ids: Vec<ChunkId>,
}

fn fixture() -> Fixture {
    let keys = NodeKeys::generate();
    let dk = DataKey::generate();
    let mut ring = KeyRing::new();
    ring.insert(dk.clone());
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let pages: Vec<Vec<u8>> = (0..SET)
        .map(|_| {
            let mut p = vec![0u8; PAGE];
            rng.fill_bytes(&mut p);
            p
        })
        .collect();
    let ids = pages.iter().map(|p| keys.chunk_id(p)).collect();
    Fixture { keys, dk, ring, pages, ids }
}

/// Frames of the working set in `format`, from `sealers` sealers taking turns.
fn frames(f: &Fixture, format: FrameFormat, sealers: usize) -> Vec<Vec<u8>> {
    let mut s: Vec<Sealer> = (0..sealers).map(|_| Sealer::with_format(&f.dk, format)).collect();
    (0..SET)
        .map(|i| {
            let mut out = Vec::new();
            s[i % sealers].seal_with(&f.ids[i], &f.pages[i], &mut out, false);
            out
        })
        .collect()
}

type Run<'a> = Box<dyn FnMut(usize) + 'a>;

fn run<'a>(f: impl FnMut(usize) + 'a) -> Run<'a> {
    Box::new(f)
}

/// Seals `n` pages (without compression).
fn seal(f: &Fixture, format: FrameFormat) -> Run<'_> {
    let mut s = Sealer::with_format(&f.dk, format);
    let mut out = Vec::with_capacity(2 * PAGE);
    Box::new(move |n| {
        for i in 0..n {
            out.clear();
            s.seal_with(&f.ids[i % SET], &f.pages[i % SET], &mut out, false);
        }
        black_box(&out);
    })
}

/// Opens `n` frames: tag, decryption, and the keyed hash checked against the id.
fn open<'a>(f: &'a Fixture, frames: &'a [Vec<u8>]) -> Run<'a> {
    let mut o = Opener::new(&f.ring, f.keys.hash_key());
    Box::new(move |n| {
        for i in 0..n {
            black_box(o.open(&f.ids[i % SET], &frames[i % SET]).expect("frame opens"));
        }
    })
}

fn main() {
    let mut args =
        std::env::args().skip(1).map(|a| a.parse::<usize>().expect("usage: seal_bench [MIB ROUNDS]"));
    let mib = args.next().unwrap_or(256);
    let rounds = args.next().unwrap_or(5);
    let n = (mib << 20) / PAGE;
    let f = fixture();
    let f = &f;
    let gcm_frames = frames(f, FrameFormat::Aes256Gcm, 1);
    let xchacha_frames = frames(f, FrameFormat::XChaCha20Poly1305, 1);
    // More sealers than an opener keeps chunk keys for, taking turns: every open derives one.
    let scattered = frames(f, FrameFormat::Aes256Gcm, 64);
    let hmac_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, f.keys.hash_key());

    let mut variants: Vec<(&str, Run<'_>)> = vec![
        ("seal, format 1 (XChaCha20-Poly1305)", seal(f, FrameFormat::XChaCha20Poly1305)),
        ("seal, format 2 (AES-256-GCM)", seal(f, FrameFormat::Aes256Gcm)),
        ("open + keyed BLAKE3 check, format 1", open(f, &xchacha_frames)),
        ("open + keyed BLAKE3 check, format 2", open(f, &gcm_frames)),
        ("open, format 2, chunk key never cached", open(f, &scattered)),
        (
            "chunk id: keyed BLAKE3",
            run(|n| {
                for i in 0..n {
                    black_box(f.keys.chunk_id(&f.pages[i % SET]));
                }
            }),
        ),
        (
            "chunk id: HMAC-SHA-256 (ring)",
            run(|n| {
                for i in 0..n {
                    black_box(ring::hmac::sign(&hmac_key, &f.pages[i % SET]));
                }
            }),
        ),
    ];
    let mut best = vec![f64::INFINITY; variants.len()];
    for _ in 0..rounds {
        for (k, (_, variant)) in variants.iter_mut().enumerate() {
            let t = Instant::now();
            variant(n);
            best[k] = best[k].min(t.elapsed().as_secs_f64());
        }
    }
    let per_gib = |k: usize| best[k] * (1u64 << 30) as f64 / (n * PAGE) as f64;

    println!("seal_bench: 4 KiB random chunks, one core, best of {rounds} rounds of {mib} MiB");
    println!("cpu: {}", cpu_flags());
    for (k, (name, _)) in variants.iter().enumerate() {
        println!("  {name:<42} {:6.3} s/GiB  {:7.0} MiB/s", per_gib(k), 1024.0 / per_gib(k));
    }
    let ratio = |new: usize, old: usize| per_gib(new) / per_gib(old);
    println!("ratios, new / old (below 1: new is cheaper):");
    println!("  seal, format 2 / format 1                  {:.2}", ratio(1, 0));
    println!("  open, format 2 / format 1                  {:.2}", ratio(3, 2));
    println!("  open, format 2 uncached / cached           {:.2}", ratio(4, 3));
    println!("  HMAC-SHA-256 / keyed BLAKE3                {:.2}", ratio(6, 5));
    println!(
        "  id + seal per page, format 2 / format 1    {:.2}  ({:.3} against {:.3} s/GiB)",
        (per_gib(5) + per_gib(1)) / (per_gib(5) + per_gib(0)),
        per_gib(5) + per_gib(1),
        per_gib(5) + per_gib(0)
    );
}

fn cpu_flags() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let mut have = Vec::new();
        macro_rules! probe {
            ($($f:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($f) {
                    have.push($f);
                }
            )*};
        }
        probe!("aes", "pclmulqdq", "vaes", "vpclmulqdq", "avx2", "avx512f", "sha");
        format!("x86_64 with {}; new frames: {:?}", have.join(" "), FrameFormat::preferred())
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        format!("{}; new frames: {:?}", std::env::consts::ARCH, FrameFormat::preferred())
    }
}

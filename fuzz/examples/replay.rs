//! Runs corpus files through a target once, on stable Rust (no libFuzzer):
//! `cargo run --manifest-path fuzz/Cargo.toml --example replay -- TARGET PATH...`
//! where PATH is a file or a directory of files. A panic is a failure.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn files(p: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if p.is_dir() {
        let mut entries =
            std::fs::read_dir(p)?.map(|e| e.map(|e| e.path())).collect::<Result<Vec<_>, _>>()?;
        entries.sort();
        for e in entries {
            files(&e, out)?;
        }
    } else {
        out.push(p.to_path_buf());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let target: fn(&[u8]) = match args.first().map(String::as_str) {
        Some("manifest") => ferry_store_fuzz::manifest,
        Some("chunk_frame") => ferry_store_fuzz::chunk_frame,
        Some("slots") => ferry_store_fuzz::slots,
        Some("archive") => ferry_store_fuzz::archive,
        Some("wire_frame") => ferry_store_fuzz::wire_frame,
        Some("migrate_msg") => ferry_store_fuzz::migrate_msg,
        Some("lazy_images") => ferry_store_fuzz::lazy_images,
        Some("container_record") => ferry_store_fuzz::container_record,
        Some("proc_facts") => ferry_store_fuzz::proc_facts,
        Some("clones_file") => ferry_store_fuzz::clones_file,
        Some("working_set") => ferry_store_fuzz::working_set,
        _ => {
            eprintln!("usage: replay manifest|chunk_frame|slots|archive|wire_frame|migrate_msg|lazy_images|container_record|proc_facts|clones_file|working_set PATH...");
            return ExitCode::from(2);
        }
    };
    let mut inputs = Vec::new();
    for p in &args[1..] {
        if let Err(e) = files(Path::new(p), &mut inputs) {
            eprintln!("{p}: {e}");
            return ExitCode::from(2);
        }
    }
    for p in &inputs {
        match std::fs::read(p) {
            Ok(data) => target(&data),
            Err(e) => {
                eprintln!("{}: {e}", p.display());
                return ExitCode::from(2);
            }
        }
    }
    println!("{}: replayed {} inputs, no failure", args[0], inputs.len());
    ExitCode::SUCCESS
}

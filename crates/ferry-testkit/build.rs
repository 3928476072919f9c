//! Builds the kit's C workloads (`workloads/*.c`) with the system's C compiler (`cc`, which
//! Rust needs as its linker anyway) into `OUT_DIR`; their paths reach the crate as
//! `FERRY_TESTKIT_<NAME>` environment variables at compile time. CRIU restores an executable by
//! its path, so a binary stays where it was built for as long as the build lives.

use std::path::PathBuf;
use std::process::Command;

/// The C workloads, by name (`workloads/NAME.c`).
const PROGRAMS: &[&str] = &["guarded"];

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    for name in PROGRAMS {
        let src = format!("workloads/{name}.c");
        println!("cargo:rerun-if-changed={src}");
        let bin = out.join(name);
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let status = Command::new(&cc)
            .args(["-O2", "-Wall", "-Werror", "-pthread", "-o"])
            .arg(&bin)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {cc} to build {src}: {e}"));
        assert!(status.success(), "{cc} failed to build {src}");
        println!("cargo:rustc-env=FERRY_TESTKIT_{}={}", name.to_uppercase(), bin.display());
    }
    println!("cargo:rerun-if-env-changed=CC");
}

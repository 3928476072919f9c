use crate::output::outln;
use ferry_store::packs::hex;

use super::{context, human_bytes};
use crate::cli::Cli;
use crate::cmd::list::utc;
use crate::Outcome;

pub fn run(cli: &Cli, name: &str, json: bool) -> Outcome {
    let what = || format!("inspect of {name} failed");
    let ctx = context(cli).map_err(|e| (what(), e))?;
    let i = ferry_runtime::inspect(&ctx, name).map_err(|e| (what(), e))?;
    let m = &i.checkpoint.manifest;
    let fp = i.footprint;
    let dedup_ratio = if fp.stored > 0 { (fp.logical - fp.zero) as f64 / fp.stored as f64 } else { 0.0 };
    if json {
        let doc = serde_json::json!({
            "name": m.name, "source": m.source, "created": m.created, "generation": m.generation,
            "host": { "hostname": m.host.hostname, "kernel": m.host.kernel, "criu": m.host.criu_version },
            "signer": hex(&i.checkpoint.signer),
            "logical_bytes": fp.logical, "zero_bytes": fp.zero, "stored_bytes": fp.stored,
            "shared_bytes": fp.shared, "chunks": fp.chunks, "dedup_ratio": dedup_ratio,
            "memory_bytes": i.summary.memory_bytes,
            "processes": i.summary.processes.iter().map(|p| serde_json::json!({
                "pid": p.pid, "ppid": p.ppid, "threads": p.threads, "comm": p.comm })).collect::<Vec<_>>(),
            "files": i.summary.files.iter().map(|f| serde_json::json!({
                "pid": f.pid, "fd": f.fd, "kind": f.kind.to_string() })).collect::<Vec<_>>(),
            "container": i.container.as_ref().map(|c| serde_json::json!({
                "kind": c.record.kind, "id": c.record.id, "name": c.record.name, "image": c.record.image,
                "labels": c.record.labels, "network": c.record.network,
                "rootfs_diff_bytes": c.rootfs_diff_bytes, "deleted": c.deleted,
                "spec": c.record.spec })),
        });
        outln!("{doc}");
        return crate::ok();
    }
    outln!("checkpoint   {} (generation {}), taken {}", m.name, m.generation, utc(m.created));
    outln!(
        "source       {} on {} (Linux {}, CRIU {})",
        m.source,
        m.host.hostname,
        m.host.kernel,
        m.host.criu_version
    );
    outln!("signed by    {}", hex(&i.checkpoint.signer[..8]));
    outln!(
        "size         {} logical, {} zero pages, {} stored in {} chunks ({} shared with other checkpoints)",
        human_bytes(fp.logical),
        human_bytes(fp.zero),
        human_bytes(fp.stored),
        fp.chunks,
        human_bytes(fp.shared)
    );
    outln!("dedup+compression ratio {dedup_ratio:.2}x of non-zero data");
    outln!("memory       {}", human_bytes(i.summary.memory_bytes));
    if let Some(c) = &i.container {
        let r = &c.record;
        outln!(
            "container    {}:{} (id {}), image {}",
            r.kind,
            r.name,
            r.id,
            r.image.as_deref().unwrap_or("(a root directory)")
        );
        if let Some(n) = &r.network {
            let ip = n.ip.map(|i| i.to_string()).unwrap_or_else(|| "no address".into());
            let own = if n.external { "its own namespace, left behind" } else { "dumped with it" };
            outln!("network      {ip} {} ({own})", n.mac.as_deref().unwrap_or(""));
        }
        outln!(
            "root fs      {} of added or changed files, {} deleted",
            human_bytes(c.rootfs_diff_bytes),
            c.deleted.len()
        );
    }
    outln!();
    crate::output::write_out(format_args!("{}", i.summary));
    crate::ok()
}

use crate::output::outln;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::json;

use super::{human_bytes, open_store};
use crate::cli::Cli;
use crate::Outcome;

pub fn run(cli: &Cli, json: bool) -> Outcome {
    let what = || "cannot list checkpoints".to_owned();
    let store = open_store(cli).map_err(|e| (what(), e))?;
    let (all, bad) = store.list().map_err(|e| (what(), e.into()))?;
    // Clones are listed only where one runs; a damaged record hides none of the checkpoints.
    let clones = ferry_runtime::clone::live_clones(store.root()).unwrap_or_else(|e| {
        eprintln!("warning: the clones are not listed: {e}");
        Vec::new()
    });
    if json {
        let rows: Vec<_> = all
            .iter()
            .map(|c| {
                json!({
                    "name": c.manifest.name,
                    "source": c.manifest.source,
                    "size_bytes": c.logical_size(),
                    "created": c.manifest.created,
                    "clones": clones.iter().filter(|k| k.origin == c.manifest.name).collect::<Vec<_>>(),
                })
            })
            .collect();
        outln!("{}", serde_json::Value::Array(rows));
    } else {
        outln!("{:<32} {:<16} {:>10}  CREATED", "NAME", "SOURCE", "SIZE");
        for c in &all {
            outln!(
                "{:<32} {:<16} {:>10}  {}",
                c.manifest.name,
                c.manifest.source,
                human_bytes(c.logical_size()),
                utc(c.manifest.created)
            );
        }
    }
    if !json && !clones.is_empty() {
        outln!();
        outln!("{:<32} {:<16} {:>8}  {:<15} {:<8} HOSTNAME", "CLONE", "ORIGIN", "PID", "IP", "NODE");
        for c in &clones {
            outln!(
                "{:<32} {:<16} {:>8}  {:<15} {:<8} {}",
                c.name,
                c.origin,
                c.pid,
                c.ip,
                c.node,
                c.hostname.as_deref().unwrap_or("-")
            );
        }
    }
    for (name, err) in &bad {
        eprintln!("warning: {name} is not listed: {err}");
    }
    crate::ok()
}

/// `YYYY-MM-DD HH:MM:SS UTC` without a date crate (civil-from-days, proleptic Gregorian).
pub fn utc(secs: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(secs);
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn formats_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
    }
}

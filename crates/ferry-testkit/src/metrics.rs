//! Reading a Prometheus / OpenMetrics text exposition back, strictly enough that a malformed
//! line fails the test that reads it.

use std::collections::BTreeMap;

/// One sample: its name, its labels, its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of `text`; comment lines (`# HELP`, `# TYPE`, `# UNIT`, `# EOF`) are skipped.
/// A line that is not `name{label="value",...} number` is an error naming it.
pub fn parse_metrics(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let bad = || format!("not a sample: {line:?}");
        let (series, value) = line.rsplit_once(' ').ok_or_else(bad)?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().map_err(|_| bad())?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => (name, labels_of(rest.strip_suffix('}').ok_or_else(bad)?).ok_or_else(bad)?),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            return Err(bad());
        }
        out.push(Sample { name: name.to_owned(), labels, value });
    }
    Ok(out)
}

/// `a="x",b="y"` (no escapes: ferry's label values have none).
fn labels_of(s: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (k, after) = rest.split_once("=\"")?;
        let (v, after) = after.split_once('"')?;
        labels.insert(k.to_owned(), v.to_owned());
        rest = after.strip_prefix(',').unwrap_or(after);
        if !after.is_empty() && !after.starts_with(',') {
            return None;
        }
    }
    Some(labels)
}

/// The value of the sample named `name` whose labels include every one of `labels`.
pub fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
        })
        .map(|s| s.value)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failing test should stop right there
mod tests {
    use super::*;

    #[test]
    fn samples_are_read_and_bad_lines_refused() {
        let text =
            "# TYPE x counter\nx_total{node=\"a\"} 3\nh_bucket{node=\"a\",le=\"+Inf\"} 2\nplain 1.5\n# EOF\n";
        let s = parse_metrics(text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(metric(&s, "x_total", &[("node", "a")]), Some(3.0));
        assert_eq!(metric(&s, "h_bucket", &[("le", "+Inf")]), Some(2.0));
        assert_eq!(metric(&s, "plain", &[]), Some(1.5));
        assert_eq!(metric(&s, "x_total", &[("node", "b")]), None);
        for bad in ["x{node=\"a\" 1", "x 1 2 three", "x{node=a} 1", "{a=\"b\"} 1", "x one"] {
            assert!(parse_metrics(bad).is_err(), "{bad}");
        }
    }
}

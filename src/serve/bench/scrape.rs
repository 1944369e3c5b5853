//! The server's own view of a benchmark level: histograms read from `/metrics` (Prometheus'
//! text format) before and after, and their difference, so the batch sizes the scheduler
//! actually ran are reported beside the client's latencies.
use std::collections::BTreeMap;

/// A histogram summed over its label sets: cumulative counts by upper bound (`+Inf` last).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

/// Every histogram in a `/metrics` text, by name.
pub fn parse(text: &str) -> BTreeMap<String, Histogram> {
    let mut buckets: BTreeMap<String, BTreeMap<u64, (f64, f64)>> = BTreeMap::new();
    let mut out: BTreeMap<String, Histogram> = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = split_sample(line) else {
            continue;
        };
        let (name, labels) = match series.find('{') {
            Some(i) => (&series[..i], &series[i..]),
            None => (series, ""),
        };
        if let Some(base) = name.strip_suffix("_bucket") {
            let Some(le) = label(labels, "le") else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse::<f64>() {
                    Ok(v) => v,
                    Err(_) => continue,
                }
            };
            // Keyed by the bound's bits (ordered for non-negative bounds) to sum label sets.
            let e = buckets
                .entry(base.to_string())
                .or_default()
                .entry(le.to_bits())
                .or_insert((le, 0.0));
            e.1 += value;
        } else if let Some(base) = name.strip_suffix("_sum") {
            out.entry(base.to_string()).or_default().sum += value;
        } else if let Some(base) = name.strip_suffix("_count") {
            out.entry(base.to_string()).or_default().count += value;
        }
    }
    for (name, b) in buckets {
        let mut v: Vec<(f64, f64)> = b.into_values().collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        out.entry(name).or_default().buckets = v;
    }
    // `_sum`/`_count` of a summary or a counter named so, without buckets, are not histograms.
    out.retain(|_, h| !h.buckets.is_empty());
    out
}

/// Samples of counter or gauge `name`, summed by the value of `key` (other labels aside).
pub fn by_label(text: &str, name: &str, key: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = split_sample(line) else {
            continue;
        };
        let (n, labels) = match series.find('{') {
            Some(i) => (&series[..i], &series[i..]),
            None => (series, ""),
        };
        if n == name {
            *out.entry(label(labels, key).unwrap_or_default())
                .or_insert(0.0) += value;
        }
    }
    out
}

/// `name{labels} value [timestamp]` → (`name{labels}`, value); label values may hold spaces.
fn split_sample(line: &str) -> Option<(&str, f64)> {
    let end = match line.rfind('}') {
        Some(i) => i + 1,
        None => line.find(char::is_whitespace)?,
    };
    let (series, rest) = line.split_at(end);
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((series, value))
}

/// The value of label `key` in `{a="x",b="y"}` (escapes `\"`, `\\`, `\n` undone).
fn label(labels: &str, key: &str) -> Option<String> {
    let inner = labels.strip_prefix('{')?.strip_suffix('}')?;
    let mut rest = inner;
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let name = rest[..eq].trim().trim_start_matches(',').trim();
        let after = rest[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return None,
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end?;
        if name == key {
            return Some(value);
        }
        rest = after[end + 1..].trim_start_matches(',');
    }
    None
}

impl Histogram {
    /// What was observed between `before` and `self` (a counter reset counts from zero).
    pub fn since(&self, before: Option<&Histogram>) -> Histogram {
        let Some(b) = before else {
            return self.clone();
        };
        if self.count < b.count {
            return self.clone();
        }
        let old = |le: f64| {
            b.buckets
                .iter()
                .find(|(l, _)| l.to_bits() == le.to_bits())
                .map_or(0.0, |(_, c)| *c)
        };
        Histogram {
            buckets: self
                .buckets
                .iter()
                .map(|&(le, c)| (le, c - old(le)))
                .collect(),
            sum: self.sum - b.sum,
            count: self.count - b.count,
        }
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }

    /// The `q` quantile as Prometheus' `histogram_quantile` estimates it: linear within the
    /// bucket that holds it; the largest finite bound if it falls in `+Inf`.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 || self.buckets.is_empty() {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count;
        let mut lower = (0.0, 0.0);
        for &(le, c) in &self.buckets {
            if c >= rank {
                if le.is_infinite() {
                    return Some(lower.0);
                }
                let (lo, below) = lower;
                let width = c - below;
                return Some(if width <= 0.0 {
                    le
                } else {
                    lo + (le - lo) * (rank - below) / width
                });
            }
            lower = (le, c);
        }
        Some(lower.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
# HELP clipcap_decode_batch_rows Rows per decode step
# TYPE clipcap_decode_batch_rows histogram
clipcap_decode_batch_rows_bucket{le="1"} 2
clipcap_decode_batch_rows_bucket{le="4"} 6
clipcap_decode_batch_rows_bucket{le="16"} 10
clipcap_decode_batch_rows_bucket{le="+Inf"} 10
clipcap_decode_batch_rows_sum 60
clipcap_decode_batch_rows_count 10
clipcap_queue_duration_seconds_bucket{model="a b",le="0.1"} 1
clipcap_queue_duration_seconds_bucket{model="a b",le="+Inf"} 2
clipcap_queue_duration_seconds_sum{model="a b"} 0.5
clipcap_queue_duration_seconds_count{model="a b"} 2
clipcap_queue_duration_seconds_bucket{le="0.1",model="q\"}x"} 3
clipcap_queue_duration_seconds_bucket{le="+Inf",model="q\"}x"} 3
clipcap_queue_duration_seconds_sum{model="q\"}x"} 0.1
clipcap_queue_duration_seconds_count{model="q\"}x"} 3
clipcap_requests_total{route="/caption",status="200"} 17
clipcap_odd_count 4
"#;

    #[test]
    fn histograms_are_read_and_summed_over_label_sets() {
        let h = parse(TEXT);
        assert_eq!(h.len(), 2, "{:?}", h.keys());
        let rows = &h["clipcap_decode_batch_rows"];
        assert_eq!(
            rows.buckets,
            vec![(1.0, 2.0), (4.0, 6.0), (16.0, 10.0), (f64::INFINITY, 10.0)]
        );
        assert_eq!((rows.sum, rows.count, rows.mean()), (60.0, 10.0, Some(6.0)));
        let q = &h["clipcap_queue_duration_seconds"];
        assert_eq!(q.buckets, vec![(0.1, 4.0), (f64::INFINITY, 5.0)]);
        assert_eq!(q.count, 5.0);
        assert!((q.sum - 0.6).abs() < 1e-12);
    }

    #[test]
    fn a_difference_and_its_quantiles_follow_prometheus() {
        let before = parse(TEXT)["clipcap_decode_batch_rows"].clone();
        let after = parse(
            &TEXT
                .replace("{le=\"4\"} 6", "{le=\"4\"} 8")
                .replace("{le=\"16\"} 10", "{le=\"16\"} 20")
                .replace("{le=\"+Inf\"} 10", "{le=\"+Inf\"} 21")
                .replace("rows_sum 60", "rows_sum 260")
                .replace("rows_count 10", "rows_count 21"),
        )["clipcap_decode_batch_rows"]
            .clone();
        let d = after.since(Some(&before));
        assert_eq!(
            d.buckets,
            vec![(1.0, 0.0), (4.0, 2.0), (16.0, 10.0), (f64::INFINITY, 11.0)]
        );
        assert_eq!((d.count, d.sum), (11.0, 200.0));
        // Rank 5.5 of 11 lies in (4, 16], 3.5 into that bucket's 8: 4 + 12 * 3.5 / 8.
        assert!((d.quantile(0.5).unwrap() - 9.25).abs() < 1e-9);
        // The top rank is in +Inf: the largest finite bound.
        assert_eq!(d.quantile(1.0), Some(16.0));
        // A restart (counts went down) is read from zero.
        assert_eq!(before.since(Some(&after)), before);
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn counters_are_summed_by_one_label() {
        let text = "# TYPE clipcap_worker_seconds_total counter\n\
            clipcap_worker_seconds_total{phase=\"step\"} 2.5\n\
            clipcap_worker_seconds_total{phase=\"join\"} 0.25\n\
            clipcap_worker_seconds_total{phase=\"step\",model=\"b\"} 1\n\
            clipcap_worker_seconds_total_other{phase=\"step\"} 9\n";
        let by = by_label(text, "clipcap_worker_seconds_total", "phase");
        assert_eq!(by.len(), 2);
        assert_eq!((by["step"], by["join"]), (3.5, 0.25));
    }

    #[test]
    fn labels_are_unescaped() {
        assert_eq!(label(r#"{a="1",le="+Inf"}"#, "le").as_deref(), Some("+Inf"));
        assert_eq!(
            label(r#"{m="x\"y\\z",le="2"}"#, "m").as_deref(),
            Some("x\"y\\z")
        );
        assert_eq!(label(r#"{m="x"}"#, "le"), None);
    }
}

//! Reading a process's `/metrics` (Prometheus text format).

/// One sample: metric name, labels, value.
pub type Sample = (String, Vec<(String, String)>, f64);

/// One scrape of `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct MetricsText(pub String);

impl MetricsText {
    /// Samples as (name, labels, value); comments and malformed lines skipped.
    pub fn samples(&self) -> Vec<Sample> {
        self.0.lines().filter_map(parse_sample).collect()
    }

    /// Sum of every sample named `name` whose labels include all of `labels`.
    /// `None` when no sample matches (the metric is not exported, or no
    /// labelled child exists yet).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut total = None;
        for (sample, sample_labels, value) in self.samples() {
            if sample != name {
                continue;
            }
            let matches = labels
                .iter()
                .all(|(k, v)| sample_labels.iter().any(|(sk, sv)| sk == k && sv == v));
            if matches {
                *total.get_or_insert(0.0) += value;
            }
        }
        total
    }

    /// Like [`sum`](Self::sum), 0 when absent (counters not yet incremented).
    pub fn sum_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.sum(name, labels).unwrap_or(0.0)
    }

    /// Sums of `name` grouped by the value of `label`.
    pub fn by_label(&self, name: &str, label: &str) -> Vec<(String, f64)> {
        let mut groups: Vec<(String, f64)> = Vec::new();
        for (sample, labels, value) in self.samples() {
            if sample != name {
                continue;
            }
            let key = labels
                .iter()
                .find(|(k, _)| k == label)
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, total)) => *total += value,
                None => groups.push((key, value)),
            }
        }
        groups.sort_by(|a, b| a.0.cmp(&b.0));
        groups
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line[open..].find('}')? + open;
            (
                &line[..open],
                parse_labels(&line[open + 1..close]),
                &line[close + 1..],
            )
        }
        None => {
            let space = line.find(' ')?;
            (&line[..space], Vec::new(), &line[space..])
        }
    };
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some((name.to_string(), labels, value))
}

fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 1..];
        let Some(stripped) = after.strip_prefix('"') else {
            break;
        };
        let mut value = String::new();
        let mut chars = stripped.char_indices();
        let mut end = stripped.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(match escaped {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                other => value.push(other),
            }
        }
        labels.push((key, value));
        rest = &stripped[end.min(stripped.len())..];
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP warren_controller_scale_patches Patches
# TYPE warren_controller_scale_patches counter
warren_controller_scale_patches_total{direction="up"} 3
warren_controller_scale_patches_total{direction="down"} 2
warren_controller_leader 1
warren_controller_broker_requests_total{request="queues"} 10
warren_controller_broker_requests_total{request="passive_declare"} 4
weird_total{a="x,y=\"z\"",b="2"} 7
# EOF
"#;

    #[test]
    fn sums_and_groups() {
        let m = MetricsText(TEXT.to_string());
        assert_eq!(
            m.sum("warren_controller_scale_patches_total", &[]),
            Some(5.0)
        );
        assert_eq!(
            m.sum(
                "warren_controller_scale_patches_total",
                &[("direction", "up")]
            ),
            Some(3.0)
        );
        assert_eq!(m.sum("warren_controller_leader", &[]), Some(1.0));
        assert_eq!(m.sum("absent", &[]), None);
        assert_eq!(m.sum_or_zero("absent", &[]), 0.0);
        assert_eq!(
            m.by_label("warren_controller_broker_requests_total", "request"),
            vec![("passive_declare".into(), 4.0), ("queues".into(), 10.0)]
        );
        assert_eq!(
            m.sum("weird_total", &[("a", "x,y=\"z\""), ("b", "2")]),
            Some(7.0)
        );
    }
}

//! The Prometheus rules file the chart ships, and the "data form" of an
//! alert expression used to prove its inputs exist.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::LoadError;

#[derive(Debug, Clone, Deserialize)]
pub struct RuleFile {
    pub groups: Vec<RuleGroup>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RuleGroup {
    pub name: String,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Rule {
    #[serde(default)]
    pub alert: Option<String>,
    #[serde(default)]
    pub record: Option<String>,
    pub expr: String,
}

impl RuleFile {
    /// `charts/warren/files/prometheus-rules.yaml`.
    pub fn path() -> PathBuf {
        crate::chart_dir().join("files/prometheus-rules.yaml")
    }

    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_saphyr::from_str(&text).map_err(|err| LoadError::Yaml {
            path: path.to_path_buf(),
            message: err.to_string(),
        })
    }

    /// (alert name, expression) of every alerting rule.
    pub fn alerts(&self) -> Vec<(String, String)> {
        self.groups
            .iter()
            .flat_map(|g| g.rules.iter())
            .filter_map(|r| r.alert.clone().map(|a| (a, r.expr.clone())))
            .collect()
    }
}

/// `expr` with every comparison outside label matchers and strings turned
/// into a `bool` comparison (`x > 5` becomes `x > bool 5`), so it returns a
/// 0/1 sample for every input series instead of only the firing ones. A
/// rule whose data form returns nothing has no input data at all.
pub fn bool_form(expr: &str) -> String {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = String::with_capacity(expr.len() + 16);
    let mut braces = 0usize;
    let mut quote: Option<char> = None;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if let Some(q) = quote {
            out.push(c);
            if c == '\\' && i + 1 < chars.len() {
                out.push(chars[i + 1]);
                i += 2;
                continue;
            }
            if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        match c {
            '"' | '\'' | '`' => {
                quote = Some(c);
                out.push(c);
                i += 1;
                continue;
            }
            '{' => braces += 1,
            '}' => braces = braces.saturating_sub(1),
            _ => {}
        }
        let next = chars.get(i + 1).copied();
        let operator = if braces > 0 {
            None
        } else {
            match (c, next) {
                ('=', Some('=')) | ('!', Some('=')) | ('>', Some('=')) | ('<', Some('=')) => {
                    Some(2)
                }
                ('>', _) | ('<', _) => Some(1),
                _ => None,
            }
        };
        match operator {
            Some(len) => {
                out.extend(&chars[i..i + len]);
                i += len;
                let rest: String = chars[i..].iter().collect();
                if !rest.trim_start().starts_with("bool") {
                    out.push_str(" bool");
                }
            }
            None => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comparisons_become_bool_outside_matchers_and_strings() {
        assert_eq!(
            bool_form(r#"up{job!="a",x=~"b|>c"} == 0"#),
            r#"up{job!="a",x=~"b|>c"} == bool 0"#
        );
        assert_eq!(
            bool_form("(deriv(m[10m]) > 0) and (m >= 1000)"),
            "(deriv(m[10m]) > bool 0) and (m >= bool 1000)"
        );
        assert_eq!(bool_form("a > bool 1"), "a > bool 1");
        assert_eq!(bool_form("a / b != 0.5"), "a / b != bool 0.5");
    }

    #[test]
    fn the_shipped_rules_load_and_every_alert_has_a_comparison() {
        let file = RuleFile::load(&RuleFile::path()).unwrap();
        let alerts = file.alerts();
        assert!(alerts.len() >= 8, "{alerts:?}");
        for (name, expr) in alerts {
            assert_ne!(bool_form(&expr), expr, "{name} compares nothing");
        }
    }
}

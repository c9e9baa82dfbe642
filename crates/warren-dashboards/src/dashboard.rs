//! Grafana dashboard JSON: panels, their queries, variables and annotation
//! queries, and the expansion of Grafana's variables into plain PromQL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::LoadError;

/// One dashboard file.
#[derive(Debug, Clone, Deserialize)]
pub struct Dashboard {
    pub uid: String,
    pub title: String,
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(default)]
    pub panels: Vec<Panel>,
    #[serde(default)]
    pub templating: Templating,
    #[serde(default)]
    pub annotations: Annotations,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Templating {
    #[serde(default)]
    pub list: Vec<Variable>,
}

/// A dashboard variable (`datasource`, or a `label_values(...)` query).
#[derive(Debug, Clone, Deserialize)]
pub struct Variable {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The query of a `query` variable (`label_values(metric, label)`).
    #[serde(default)]
    pub definition: Option<String>,
    #[serde(default, rename = "allValue")]
    pub all_value: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Annotations {
    #[serde(default)]
    pub list: Vec<Annotation>,
}

/// An annotation; those with an `expr` are Prometheus queries.
#[derive(Debug, Clone, Deserialize)]
pub struct Annotation {
    pub name: String,
    #[serde(default)]
    pub expr: Option<String>,
}

/// One panel.
#[derive(Debug, Clone, Deserialize)]
pub struct Panel {
    pub id: u32,
    pub title: String,
    #[serde(default)]
    pub targets: Vec<Target>,
    #[serde(default, rename = "fieldConfig")]
    pub field_config: FieldConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct FieldConfig {
    #[serde(default)]
    pub defaults: FieldDefaults,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct FieldDefaults {
    #[serde(default)]
    pub unit: Option<String>,
}

/// One query of a panel.
#[derive(Debug, Clone, Deserialize)]
pub struct Target {
    #[serde(rename = "refId")]
    pub ref_id: String,
    pub expr: String,
    #[serde(default, rename = "legendFormat")]
    pub legend_format: Option<String>,
}

impl Panel {
    pub fn unit(&self) -> &str {
        self.field_config
            .defaults
            .unit
            .as_deref()
            .unwrap_or("short")
    }
}

/// A query found in a dashboard, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DashboardQuery {
    /// e.g. `warren overview / panel 3 "Workers" / B`.
    pub origin: String,
    pub expr: String,
}

impl Dashboard {
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| LoadError::Json {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Every dashboard the chart ships (`charts/warren/dashboards/*.json`), by file name.
    pub fn load_all() -> Result<Vec<(PathBuf, Self)>, LoadError> {
        let dir = crate::chart_dir().join("dashboards");
        let entries = std::fs::read_dir(&dir).map_err(|source| LoadError::Read {
            path: dir.clone(),
            source,
        })?;
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        paths.sort();
        paths
            .into_iter()
            .map(|p| Self::load(&p).map(|d| (p, d)))
            .collect()
    }

    /// Variables whose value is a query (not the data source).
    pub fn query_variables(&self) -> impl Iterator<Item = &Variable> {
        self.templating.list.iter().filter(|v| v.kind == "query")
    }

    /// Every panel target and every annotation query, unexpanded.
    pub fn queries(&self) -> Vec<DashboardQuery> {
        let mut out = Vec::new();
        for panel in &self.panels {
            for target in &panel.targets {
                out.push(DashboardQuery {
                    origin: format!(
                        "{} / panel {} {:?} / {}",
                        self.title, panel.id, panel.title, target.ref_id
                    ),
                    expr: target.expr.clone(),
                });
            }
        }
        for annotation in &self.annotations.list {
            if let Some(expr) = &annotation.expr {
                out.push(DashboardQuery {
                    origin: format!("{} / annotation {:?}", self.title, annotation.name),
                    expr: expr.clone(),
                });
            }
        }
        out
    }
}

/// The metric and label of a `label_values(metric{...}, label)` variable query.
pub fn parse_label_values(query: &str) -> Option<(String, String)> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((selector.trim().to_string(), label.trim().to_string()))
}

/// Replaces Grafana's variables in `expr`: `$__rate_interval` and
/// `$__interval` by `interval`, `$name` / `${name}` by `values[name]`
/// (longest names first, so `$scaler_x` is never cut at `$scaler`).
pub fn expand(expr: &str, values: &BTreeMap<String, String>, interval: &str) -> String {
    let mut out = expr
        .replace("$__rate_interval", interval)
        .replace("${__rate_interval}", interval)
        .replace("$__interval", interval)
        .replace("${__interval}", interval);
    let mut names: Vec<&String> = values.keys().collect();
    names.sort_by_key(|n| std::cmp::Reverse(n.len()));
    for name in names {
        let value = &values[name];
        out = out.replace(&format!("${{{name}}}"), value);
        out = out.replace(&format!("${name}"), value);
    }
    out
}

/// `{{label}}` placeholders of a legend filled from a series' labels.
pub fn legend(format: Option<&str>, labels: &BTreeMap<String, String>) -> String {
    let Some(format) = format.filter(|f| !f.is_empty()) else {
        return labels
            .iter()
            .filter(|(k, _)| k.as_str() != "__name__")
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
    };
    let mut out = String::new();
    let mut rest = format;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                let key = after[..end].trim();
                out.push_str(labels.get(key).map(String::as_str).unwrap_or(""));
                rest = &after[end + 2..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_expand_longest_first_and_braced() {
        let values = BTreeMap::from([
            ("namespace".to_string(), ".*".to_string()),
            ("name".to_string(), "jobs".to_string()),
        ]);
        let expr = r#"rate(x{namespace=~"$namespace", name=~"${name}"}[$__rate_interval])"#;
        assert_eq!(
            expand(expr, &values, "30s"),
            r#"rate(x{namespace=~".*", name=~"jobs"}[30s])"#
        );
    }

    #[test]
    fn label_values_queries_are_split() {
        assert_eq!(
            parse_label_values(r#"label_values(m{namespace=~"$namespace"}, name)"#),
            Some((
                r#"m{namespace=~"$namespace"}"#.to_string(),
                "name".to_string()
            ))
        );
        assert_eq!(parse_label_values("query_result(up)"), None);
    }

    #[test]
    fn legends_fill_labels() {
        let labels = BTreeMap::from([
            ("namespace".to_string(), "a".to_string()),
            ("name".to_string(), "jobs".to_string()),
        ]);
        assert_eq!(
            legend(Some("{{namespace}}/{{name}} desired"), &labels),
            "a/jobs desired"
        );
        assert_eq!(legend(None, &labels), "name=jobs,namespace=a");
    }

    #[test]
    fn the_shipped_dashboards_load_with_unique_panel_ids() {
        let all = Dashboard::load_all().unwrap();
        assert_eq!(all.len(), 2, "{all:?}");
        for (path, dashboard) in all {
            let mut ids: Vec<u32> = dashboard.panels.iter().map(|p| p.id).collect();
            let count = ids.len();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), count, "{}", path.display());
            assert!(dashboard.queries().len() >= dashboard.panels.len());
        }
    }
}

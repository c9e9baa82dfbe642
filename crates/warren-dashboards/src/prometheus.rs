//! A small client of Prometheus' HTTP API (`/api/v1/query`, `query_range`,
//! `label/<name>/values`, `rules`, `targets`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{what}: {source}")]
    Http {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{what}: Prometheus answered {error_type}: {error}")]
    Prometheus {
        what: String,
        error_type: String,
        error: String,
    },
    #[error("{what}: unexpected answer: {detail}")]
    Shape { what: String, detail: String },
}

/// One series of a range query: its labels and (unix seconds, value) points.
#[derive(Debug, Clone, PartialEq)]
pub struct RangeSeries {
    pub labels: BTreeMap<String, String>,
    pub points: Vec<(f64, f64)>,
}

#[derive(Deserialize)]
struct Envelope {
    status: String,
    #[serde(default)]
    data: Value,
    #[serde(default, rename = "errorType")]
    error_type: String,
    #[serde(default)]
    error: String,
}

/// A Prometheus server's HTTP API.
#[derive(Clone)]
pub struct PrometheusApi {
    base: String,
    http: reqwest::Client,
}

impl PrometheusApi {
    /// `base`: e.g. `http://127.0.0.1:9090`.
    pub fn new(base: impl Into<String>) -> Result<Self, ApiError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .map_err(|source| ApiError::Http {
                what: "building the HTTP client".into(),
                source,
            })?;
        Ok(Self {
            base: base.into().trim_end_matches('/').to_string(),
            http,
        })
    }

    async fn get(
        &self,
        path: &str,
        params: &[(&str, String)],
        what: &str,
    ) -> Result<Value, ApiError> {
        let http_err = |source| ApiError::Http {
            what: what.to_string(),
            source,
        };
        let envelope: Envelope = self
            .http
            .get(format!("{}{path}", self.base))
            .query(params)
            .send()
            .await
            .map_err(http_err)?
            .json()
            .await
            .map_err(http_err)?;
        if envelope.status != "success" {
            return Err(ApiError::Prometheus {
                what: what.to_string(),
                error_type: envelope.error_type,
                error: envelope.error,
            });
        }
        Ok(envelope.data)
    }

    /// A range query from `start` to `end` (unix seconds) every `step` seconds.
    pub async fn query_range(
        &self,
        expr: &str,
        start: f64,
        end: f64,
        step: f64,
    ) -> Result<Vec<RangeSeries>, ApiError> {
        let what = format!("query_range {expr}");
        let data = self
            .get(
                "/api/v1/query_range",
                &[
                    ("query", expr.to_string()),
                    ("start", format!("{start:.3}")),
                    ("end", format!("{end:.3}")),
                    ("step", format!("{step}")),
                ],
                &what,
            )
            .await?;
        let shape = |detail: &str| ApiError::Shape {
            what: what.clone(),
            detail: detail.to_string(),
        };
        let result = data
            .get("result")
            .and_then(Value::as_array)
            .ok_or_else(|| shape("no result array"))?;
        result
            .iter()
            .map(|series| {
                let labels = series
                    .get("metric")
                    .and_then(Value::as_object)
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                let points = series
                    .get("values")
                    .and_then(Value::as_array)
                    .ok_or_else(|| shape("a series without values"))?
                    .iter()
                    .filter_map(|pair| {
                        let t = pair.get(0)?.as_f64()?;
                        let v = pair.get(1)?.as_str()?.parse::<f64>().ok()?;
                        Some((t, v))
                    })
                    .collect();
                Ok(RangeSeries { labels, points })
            })
            .collect()
    }

    /// Values of `label` on series matching `selector`.
    pub async fn label_values(&self, label: &str, selector: &str) -> Result<Vec<String>, ApiError> {
        let what = format!("label_values({selector}, {label})");
        let data = self
            .get(
                &format!("/api/v1/label/{label}/values"),
                &[("match[]", selector.to_string())],
                &what,
            )
            .await?;
        Ok(data
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `/api/v1/rules`: (rule name, health, last error) of every loaded rule.
    pub async fn rule_health(&self) -> Result<Vec<(String, String, String)>, ApiError> {
        let data = self.get("/api/v1/rules", &[], "rules").await?;
        let mut out = Vec::new();
        for group in data
            .get("groups")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for rule in group
                .get("rules")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let field = |k: &str| {
                    rule.get(k)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string()
                };
                out.push((field("name"), field("health"), field("lastError")));
            }
        }
        Ok(out)
    }

    /// `/api/v1/targets`: (scrape job, health, last error) of every active target.
    pub async fn target_health(&self) -> Result<Vec<(String, String, String)>, ApiError> {
        let data = self.get("/api/v1/targets", &[], "targets").await?;
        let mut out = Vec::new();
        for target in data
            .get("activeTargets")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let field = |k: &str| {
                target
                    .get(k)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            out.push((field("scrapePool"), field("health"), field("lastError")));
        }
        Ok(out)
    }
}

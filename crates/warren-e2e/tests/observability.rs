//! The chart's dashboards and alerts against a real Prometheus (Debian's)
//! scraping the real sender, workers, controller and a private RabbitMQ
//! with its Prometheus plugin, during a short load (see
//! `warren_e2e::observability`). Every dashboard panel query, variable
//! query and annotation, and every alert expression, must run without error
//! and return data; the overview's main panels are drawn to a PNG.
//!
//! Needs the binaries (`cargo build --bins`), rabbitmq-server, prometheus,
//! fonts-dejavu-core (`.ci/run` installs them) and the localcluster binary
//! (`make local-build`): the controller's apiserver is a private control plane.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use warren_dashboards::dashboard::{Dashboard, expand, parse_label_values};
use warren_dashboards::prometheus::{PrometheusApi, RangeSeries};
use warren_dashboards::rules::{RuleFile, bool_form};
use warren_dashboards::snapshot::{self, OVERVIEW_MAIN_PANELS};
use warren_e2e::SCALER;
use warren_e2e::observability::{BROKEN_SCALER, LoadOptions, RATE_INTERVAL, observed_load};

const STEP: f64 = 2.0;

fn has_data(series: &[RangeSeries]) -> bool {
    series
        .iter()
        .any(|s| s.points.iter().any(|(_, v)| v.is_finite()))
}

fn last_value(series: &[RangeSeries], label: &str, value: &str) -> Option<f64> {
    series
        .iter()
        .find(|s| s.labels.get(label).map(String::as_str) == Some(value))
        .and_then(|s| s.points.last().map(|p| p.1))
}

/// Runs `expr` over the window; records a failure when it errors or
/// returns no finite sample.
async fn expect_data(
    api: &PrometheusApi,
    origin: &str,
    expr: &str,
    window: (f64, f64),
    failures: &mut Vec<String>,
) -> Vec<RangeSeries> {
    match api.query_range(expr, window.0, window.1, STEP).await {
        Ok(series) if has_data(&series) => series,
        Ok(series) => {
            failures.push(format!(
                "{origin}: no data ({} series) for {expr}",
                series.len()
            ));
            series
        }
        Err(err) => {
            failures.push(format!("{origin}: {err}"));
            Vec::new()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_dashboard_query_and_alert_expression_returns_data_from_a_real_prometheus() {
    let run = observed_load(LoadOptions::default())
        .await
        .expect("the observed run starts (needs rabbitmq-server and prometheus from Debian)");
    let api = &run.api;
    let window = (run.start, run.end);
    let mut failures = Vec::new();

    // Every scrape job had an up target.
    let up = expect_data(
        api,
        "targets",
        "max by (job) (max_over_time(up[5m]))",
        window,
        &mut failures,
    )
    .await;
    for job in [
        "sender",
        "controller",
        "worker",
        "rabbitmq",
        "rabbitmq-queues",
    ] {
        assert_eq!(
            last_value(&up, "job", job),
            Some(1.0),
            "scrape job {job} never up: {up:?}\n{}",
            run.prometheus.log()
        );
    }

    // Prometheus loaded the chart's rules and evaluates them cleanly.
    let rules = RuleFile::load(&RuleFile::path()).expect("the chart's rules file");
    let health = api.rule_health().await.expect("/api/v1/rules");
    for (name, _) in rules.alerts() {
        match health.iter().find(|(n, _, _)| *n == name) {
            Some((_, h, _)) if h == "ok" => {}
            other => failures.push(format!("rule {name} not loaded healthy: {other:?}")),
        }
    }

    // Dashboards: variable queries return values; every panel target and
    // annotation returns data with All selected.
    let dashboards = Dashboard::load_all().expect("the chart's dashboards");
    assert_eq!(dashboards.len(), 2);
    let mut queries_run = 0;
    for (_, dashboard) in &dashboards {
        let mut values = BTreeMap::new();
        for variable in dashboard.query_variables() {
            let definition = variable.definition.clone().unwrap_or_default();
            let Some((selector, label)) = parse_label_values(&definition) else {
                failures.push(format!(
                    "{}: variable {} is not label_values(...)",
                    dashboard.title, variable.name
                ));
                continue;
            };
            let selector = expand(&selector, &values, RATE_INTERVAL);
            match api.label_values(&label, &selector).await {
                Ok(found) if !found.is_empty() => {}
                Ok(_) => failures.push(format!(
                    "{}: variable {} has no values",
                    dashboard.title, variable.name
                )),
                Err(err) => failures.push(format!(
                    "{}: variable {}: {err}",
                    dashboard.title, variable.name
                )),
            }
            values.insert(
                variable.name.clone(),
                variable.all_value.clone().unwrap_or_else(|| ".*".into()),
            );
        }
        for query in dashboard.queries() {
            let expr = expand(&query.expr, &values, RATE_INTERVAL);
            // Annotations (and any thresholded query) are judged on their inputs.
            let data_form = bool_form(&expr);
            expect_data(api, &query.origin, &data_form, window, &mut failures).await;
            queries_run += 1;
        }
    }
    assert!(queries_run >= 20, "only {queries_run} dashboard queries");

    // Alerts: the expression as written runs; its data form returns data.
    for (name, expr) in rules.alerts() {
        if let Err(err) = api.query_range(&expr, window.0, window.1, STEP).await {
            failures.push(format!("alert {name}: {err}"));
        }
        expect_data(
            api,
            &format!("alert {name} (data form)"),
            &bool_form(&expr),
            window,
            &mut failures,
        )
        .await;
    }

    // The data is the run's, not just present: the broken scaler is not
    // Ready and counts its failed reads, the real one is Ready and scaled
    // up, the poison message was dead-lettered.
    let ready = expect_data(
        api,
        "ready",
        "warren_controller_scaler_ready",
        window,
        &mut failures,
    )
    .await;
    assert_eq!(
        last_value(&ready, "name", BROKEN_SCALER),
        Some(0.0),
        "{ready:?}"
    );
    assert_eq!(last_value(&ready, "name", SCALER), Some(1.0), "{ready:?}");
    let errors = expect_data(
        api,
        "errors",
        "warren_controller_scaler_errors_total{error=\"queue_not_found\"}",
        window,
        &mut failures,
    )
    .await;
    assert!(
        last_value(&errors, "name", BROKEN_SCALER).is_some_and(|v| v >= 3.0),
        "{errors:?}"
    );
    let desired = expect_data(
        api,
        "desired",
        "max_over_time(warren_controller_scaler_desired_replicas[5m])",
        window,
        &mut failures,
    )
    .await;
    assert!(
        last_value(&desired, "name", SCALER).is_some_and(|v| v >= 2.0),
        "{desired:?}"
    );
    let dead = expect_data(
        api,
        "dead letters",
        "max_over_time(rabbitmq_detailed_queue_messages{queue=~\".+\\\\.dead\"}[5m])",
        window,
        &mut failures,
    )
    .await;
    let dead_queue = format!("{}.dead", run.queue);
    assert_eq!(
        last_value(&dead, "queue", &dead_queue),
        Some(1.0),
        "{dead:?}"
    );

    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // The overview's main panels, drawn from this Prometheus.
    let overview = &dashboards
        .iter()
        .find(|(_, d)| d.uid == "warren-overview")
        .expect("the overview dashboard")
        .1;
    let values = BTreeMap::from([("namespace".to_string(), ".*".to_string())]);
    let panels = snapshot::collect_panels(
        api,
        overview,
        &OVERVIEW_MAIN_PANELS,
        &values,
        RATE_INTERVAL,
        (run.start, run.end, 1.0),
    )
    .await
    .expect("panel data");
    assert_eq!(panels.len(), OVERVIEW_MAIN_PANELS.len());
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("overview.png");
    snapshot::render_png(&png, &panels, std::path::Path::new(snapshot::DEFAULT_FONT))
        .expect("drawing the PNG");
    let bytes = std::fs::read(&png).unwrap();
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000,
        "{} bytes",
        bytes.len()
    );
    let summary = snapshot::inspect_png(&png).expect("a readable PNG");
    assert_eq!(
        (summary.width, summary.height),
        snapshot::picture_size(OVERVIEW_MAIN_PANELS.len())
    );
    assert_eq!(
        summary.plotted_panels,
        OVERVIEW_MAIN_PANELS.len(),
        "{summary:?}"
    );
}

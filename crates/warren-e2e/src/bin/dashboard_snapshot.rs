//! `make dashboard-snapshot`: runs the observed load of
//! `warren_e2e::observability` (real sender, workers, controller, RabbitMQ,
//! and a real Prometheus scraping them) and draws the overview dashboard's
//! main panels from that Prometheus to a PNG (the README's picture).
//!
//! cargo build --bins && cargo run -p warren-e2e --bin dashboard-snapshot [-- --out FILE --font TTF --seconds N]

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use warren_dashboards::dashboard::Dashboard;
use warren_dashboards::snapshot::{self, OVERVIEW_MAIN_PANELS};
use warren_e2e::observability::{LoadOptions, RATE_INTERVAL, observed_load};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../warren-dashboards/snapshot/overview.png");
    let mut font = PathBuf::from(snapshot::DEFAULT_FONT);
    let mut load = LoadOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--out" => out = PathBuf::from(value("--out")?),
            "--font" => font = PathBuf::from(value("--font")?),
            "--seconds" => load.load_seconds = value("--seconds")?.parse()?,
            "-h" | "--help" => {
                println!("dashboard-snapshot [--out FILE.png] [--font FILE.ttf] [--seconds N]");
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    let dashboard =
        Dashboard::load(&warren_dashboards::chart_dir().join("dashboards/warren-overview.json"))?;
    println!(
        "loading warren for {} s under a real Prometheus…",
        load.load_seconds
    );
    let run = observed_load(load).await?;
    let values = BTreeMap::from([("namespace".to_string(), ".*".to_string())]);
    let panels = snapshot::collect_panels(
        &run.api,
        &dashboard,
        &OVERVIEW_MAIN_PANELS,
        &values,
        RATE_INTERVAL,
        (run.start, run.end, 1.0),
    )
    .await?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    snapshot::render_png(&out, &panels, &font)?;
    let summary = snapshot::inspect_png(&out)?;
    println!(
        "{}: {}x{} px, {} of {} panels plotted",
        out.display(),
        summary.width,
        summary.height,
        summary.plotted_panels,
        panels.len()
    );
    Ok(())
}

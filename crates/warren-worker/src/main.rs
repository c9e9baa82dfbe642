use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser as _;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use warren_telemetry::Readiness;
use warren_worker::Args;
use warren_worker::metrics::WorkerMetrics;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Refuse a configuration that cannot work before anything starts.
    args.prefetch()?;
    warren_telemetry::init_tracing(&args.log).context("setting up logging")?;
    warren_telemetry::install_crypto_provider();

    let mut registry = Registry::default();
    let metrics = WorkerMetrics::register(&mut registry);
    let readiness = Readiness::default();
    let listener = tokio::net::TcpListener::bind(args.listen_addr)
        .await
        .with_context(|| format!("binding {}", args.listen_addr))?;
    let ops = warren_telemetry::ops_router::<()>(Arc::new(registry), readiness.clone());
    let shutdown = CancellationToken::new();
    let stop_http = shutdown.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, ops)
            .with_graceful_shutdown(async move { stop_http.cancelled().await })
            .await
    });

    let signal = shutdown.clone();
    tokio::spawn(async move {
        warren_telemetry::shutdown_signal().await;
        signal.cancel();
    });
    tracing::info!(pod = %args.pod_name, addr = %args.listen_addr, "warren-worker starting");
    let result = warren_worker::run(args, metrics, readiness, shutdown.clone()).await;
    shutdown.cancel();
    let _ = http.await;
    result
}

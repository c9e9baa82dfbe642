use anyhow::Context as _;
use clap::Parser as _;
use prometheus_client::registry::Registry;
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
    let shutdown = warren_telemetry::shutdown_on_signal();
    let ops = warren_telemetry::serve_ops(
        args.listen_addr,
        registry,
        readiness.clone(),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(pod = %args.pod_name, addr = %args.listen_addr, "warren-worker starting");
    let result = warren_worker::run(args, metrics, readiness, shutdown.clone()).await;
    shutdown.cancel();
    ops.stopped().await;
    result
}

use anyhow::Context as _;
use clap::Parser as _;
use tokio_util::sync::CancellationToken;
use warren_sender::Args;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    warren_telemetry::init_tracing(&args.log).context("setting up logging")?;
    warren_telemetry::install_crypto_provider();
    let shutdown = CancellationToken::new();
    let sender = warren_sender::start(&args, shutdown.clone()).await?;
    tracing::info!(addr = %sender.addr, queues = ?args.all_queues(), "warren-sender listening");
    warren_telemetry::shutdown_signal().await;
    shutdown.cancel();
    sender
        .server
        .await
        .context("HTTP server task")?
        .context("HTTP server")?;
    tracing::info!("warren-sender stopped");
    Ok(())
}

use anyhow::Context as _;
use clap::Parser as _;
use warren_sender::Args;

/// mimalloc instead of glibc's malloc: under load the sender makes a few
/// dozen small allocations per request (hyper, lapin's frames, JSON), and
/// glibc's allocator was about 16 % of the sender's CPU in `perf` profiles
/// (`_int_malloc`, `malloc_consolidate`, `unlink_chunk`, `_int_free`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    warren_telemetry::init_tracing(&args.log).context("setting up logging")?;
    warren_telemetry::install_crypto_provider();
    let shutdown = warren_telemetry::shutdown_on_signal();
    let sender = warren_sender::start(&args, shutdown).await?;
    tracing::info!(addr = %sender.addr, queues = ?args.all_queues(), "warren-sender listening");
    sender
        .server
        .await
        .context("HTTP server task")?
        .context("HTTP server")?;
    tracing::info!("warren-sender stopped");
    Ok(())
}

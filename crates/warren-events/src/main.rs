//! `warren-events`: the audit events log (`warren.events.log`, a RabbitMQ
//! stream) from the command line. Prints one JSON object per event on
//! standard output: `{"offset": N, "routing_key": "...", "event": {...}}`.
//!
//! ```text
//! warren-events follow                     # new events as they come (Ctrl-C to stop)
//! warren-events follow --from 15m          # the last 15 minutes, then live
//! warren-events read --from first          # everything retained, then exit
//! warren-events read --from 2026-11-29T23:00:00Z --limit 100
//! warren-events migrate                    # replace an old unbounded log by the stream
//! ```
//! Reading never removes anything from the log.

use std::io::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use warren_broker::events_log::{EventsLogReader, LogEntry, StartAt};
use warren_broker::topology::EVENTS_LOG_QUEUE;
use warren_broker::{EventsLogArgs, EventsLogStatus, QueueType, Topology};

#[derive(Debug, clap::Parser)]
#[command(
    name = "warren-events",
    version,
    about = "Follow or read warren's audit events log (warren.events.log), or replace an old unbounded one"
)]
struct Args {
    /// RabbitMQ AMQP URL (vhost URL-encoded: %2f is "/").
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        global = true
    )]
    amqp_url: String,
    /// How long to wait for the broker connection, in milliseconds.
    #[arg(
        long,
        env = "WARREN_CONNECT_TIMEOUT_MS",
        default_value_t = 10_000,
        global = true
    )]
    connect_timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print events as they arrive, until interrupted.
    Follow {
        /// Where to start: next (only new events), first, last, an offset, an RFC 3339
        /// time or a duration ago (15m, 2h, 1d).
        #[arg(long, default_value = "next")]
        from: StartAt,
        /// Only events whose routing key starts with this (e.g. `message.`, `scaler.scaled`).
        #[arg(long, default_value = "")]
        only: String,
    },
    /// Print the retained events from a point on, then exit once caught up.
    Read {
        /// Where to start: first (the oldest retained), last, an offset, an RFC 3339 time
        /// or a duration ago (15m, 2h, 1d).
        #[arg(long, default_value = "first")]
        from: StartAt,
        /// Only events whose routing key starts with this.
        #[arg(long, default_value = "")]
        only: String,
        /// Caught up: no event for this long (milliseconds).
        #[arg(long, default_value_t = 2000)]
        idle_ms: u64,
        /// Stop after this many events.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Replace an old, unbounded warren.events.log (a classic queue of an earlier
    /// version) by the bounded stream. Deletes the old queue AND THE EVENTS IN IT.
    Migrate {
        #[command(flatten)]
        retention: EventsLogArgs,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WARREN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    warren_telemetry::install_crypto_provider();
    let connection = warren_broker::connect(
        &args.amqp_url,
        "warren-events",
        Duration::from_millis(args.connect_timeout_ms),
    )
    .await
    .context("connecting to RabbitMQ")?;
    match args.command {
        Command::Follow { from, only } => {
            let mut reader = EventsLogReader::open(&connection, &from, 100)
                .await
                .context("attaching to the events log")?;
            tokio::select! {
                result = async {
                    while let Some(entry) = reader.next().await {
                        print_entry(&entry.context("reading the events log")?, &only)?;
                    }
                    anyhow::Ok(())
                } => result?,
                _ = warren_telemetry::shutdown_signal() => {}
            }
        }
        Command::Read {
            from,
            only,
            idle_ms,
            limit,
        } => {
            let mut reader = EventsLogReader::open(&connection, &from, 500)
                .await
                .context("attaching to the events log")?;
            let mut printed = 0usize;
            while limit.is_none_or(|limit| printed < limit) {
                let Some(entry) = reader
                    .next_within(Duration::from_millis(idle_ms))
                    .await
                    .context("reading the events log")?
                else {
                    break;
                };
                if print_entry(&entry, &only)? {
                    printed += 1;
                }
            }
            reader.close().await;
        }
        Command::Migrate { retention } => {
            let topology =
                Topology::new(Vec::new(), QueueType::Quorum).with_events_log(retention.retention());
            match topology
                .migrate_events_log(&connection)
                .await
                .context("replacing the events log")?
            {
                EventsLogStatus::Bounded => eprintln!(
                    "{EVENTS_LOG_QUEUE} is already the bounded stream with this retention; nothing to do"
                ),
                EventsLogStatus::Unavailable { reason } => {
                    anyhow::bail!("{EVENTS_LOG_QUEUE} is unavailable: {reason}")
                }
                EventsLogStatus::Legacy { reason } => eprintln!(
                    "replaced the old {EVENTS_LOG_QUEUE} ({reason}) by a stream (max age {}, max bytes {})",
                    retention.events_max_age, retention.events_max_bytes
                ),
            }
        }
    }
    let _ = connection.close(200, "bye".into()).await;
    Ok(())
}

/// Prints `entry` as JSON lines, one per event (a batched message, as the
/// worker publishes `message.processed`, carries several under one offset),
/// when its routing key starts with `only`.
fn print_entry(entry: &LogEntry, only: &str) -> anyhow::Result<bool> {
    if !entry.routing_key.starts_with(only) {
        return Ok(false);
    }
    let mut out = std::io::stdout().lock();
    for event in warren_broker::events_in(entry.event.clone()) {
        let line = serde_json::json!({
            "offset": entry.offset,
            "routing_key": entry.routing_key,
            "event": event,
        });
        writeln!(out, "{line}").context("writing to standard output")?;
    }
    out.flush().context("writing to standard output")?;
    Ok(true)
}

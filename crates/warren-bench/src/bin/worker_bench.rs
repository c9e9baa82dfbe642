//! `make bench` (worker part): jobs per second of one consumer draining a
//! preloaded classic durable queue, measured in one run against one private
//! RabbitMQ node.
//!
//! Contenders, each draining the same queue refilled with the same jobs:
//! - a raw lapin consumer (prefetch 1, ack each, no work, no logging): the ceiling;
//! - the seed's pika worker (bench/pika_worker.py: prefetch 1, manual ack,
//!   sleep per dot, two printed lines per job);
//! - the release `warren-worker`, as the chart runs it (JSON logs at info,
//!   audit events on).
//!
//! Timing, the same for all: from the moment the consumer shows up on the
//! queue (a passive declare polled every millisecond) to the moment its last
//! job is done (the worker's "done" log line read from its stdout pipe; the
//! raw consumer's last ack). Then per-job overhead with 10 ms, 100 ms and 1 s
//! jobs, and warren-worker with WARREN_CONCURRENCY=10 against 1 on 100 ms jobs.
//!
//! Prints tables and ratios. Not a test: nothing here asserts timings.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use warren_broker::{Envelope, QueueType, Topology};
use warren_testkit::{free_port, unique_name};

#[derive(Debug, Parser)]
#[command(
    name = "worker-bench",
    about = "warren-worker vs the seed's pika worker vs a raw lapin consumer: jobs/s, per-job overhead, concurrency"
)]
struct Args {
    /// The warren-worker binary (build with --release for meaningful figures).
    #[arg(long, env = "WARREN_WORKER_BIN")]
    worker_bin: PathBuf,
    /// Python with pika installed (make bench creates a venv).
    #[arg(long, env = "WARREN_BENCH_PYTHON")]
    python: PathBuf,
    /// The seed's pika worker.
    #[arg(long, default_value = "bench/pika_worker.py")]
    pika_script: PathBuf,
    /// Zero-work jobs per drain.
    #[arg(long, default_value_t = 10_000)]
    jobs: usize,
    /// Zero-work rounds (the three consumers take turns; the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrency compared with 1 on 100 ms jobs.
    #[arg(long, default_value_t = 10)]
    concurrency: u16,
    /// Skip the runs with 10 ms, 100 ms and 1 s jobs.
    #[arg(long)]
    zero_work_only: bool,
}

/// Who drains the queue.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Contender {
    RawLapin,
    Pika,
    Warren { concurrency: u16 },
}

impl Contender {
    fn label(self) -> String {
        match self {
            Contender::RawLapin => "raw lapin consumer, prefetch 1, ack each (ceiling)".into(),
            Contender::Pika => "seed's pika worker, prefetch 1".into(),
            Contender::Warren { concurrency: 1 } => "warren-worker, prefetch 1".into(),
            Contender::Warren { concurrency } => {
                format!("warren-worker, WARREN_CONCURRENCY={concurrency}")
            }
        }
    }
}

/// One drain: how many jobs in how long.
#[derive(Debug, Clone, Copy)]
struct Drain {
    jobs: usize,
    seconds: f64,
}

impl Drain {
    fn rate(self) -> f64 {
        self.jobs as f64 / self.seconds
    }
    fn ms_per_job(self) -> f64 {
        self.seconds * 1000.0 / self.jobs as f64
    }
}

/// The private node, the queue and a channel to fill and watch it.
struct Bench {
    args: Args,
    url: String,
    queue: String,
    channel: Channel,
    _connection: Connection,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    warren_telemetry::install_crypto_provider();
    warren_bench::require_files(&[
        ("warren-worker", &args.worker_bin),
        ("python", &args.python),
        ("pika worker script", &args.pika_script),
    ])?;
    let node = warren_bench::private_node().await?;
    let url = node.amqp_url();
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .context("connecting to the private node")?;
    let channel = connection.create_channel().await?;
    let queue = unique_name("bench-worker");
    Topology::new(vec![queue.clone()], QueueType::Classic)
        .declare(&connection)
        .await
        .context("declaring the classic work queue")?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let bench = Bench {
        args,
        url,
        queue,
        channel,
        _connection: connection,
    };

    // 1. Zero work, prefetch 1: the three consumers take turns, `rounds` times.
    let contenders = [
        Contender::RawLapin,
        Contender::Pika,
        Contender::Warren { concurrency: 1 },
    ];
    let mut zero: Vec<Vec<Drain>> = vec![Vec::new(); contenders.len()];
    for round in 1..=bench.args.rounds {
        for (index, contender) in contenders.iter().enumerate() {
            eprintln!(
                "round {round}/{}: {} draining {} zero-work jobs...",
                bench.args.rounds,
                contender.label(),
                bench.args.jobs
            );
            zero[index].push(bench.drain(*contender, bench.args.jobs, 0.0).await?);
        }
    }

    // 2. Jobs with work: the overhead per job, in milliseconds.
    let mut with_work: Vec<(f64, Drain, Drain)> = Vec::new();
    let mut concurrency: Option<(Drain, Drain)> = None;
    if !bench.args.zero_work_only {
        for (work, jobs) in [(0.01, 200), (0.1, 100), (1.0, 5)] {
            eprintln!("{jobs} jobs of {work} s each: pika, then warren-worker...");
            let pika = bench.drain(Contender::Pika, jobs, work).await?;
            let warren = bench
                .drain(Contender::Warren { concurrency: 1 }, jobs, work)
                .await?;
            with_work.push((work, warren, pika));
        }
        // 3. Concurrency on 100 ms jobs (the run above is concurrency 1).
        let n = bench.args.concurrency;
        eprintln!("100 jobs of 0.1 s each: warren-worker with WARREN_CONCURRENCY={n}...");
        let many = bench
            .drain(Contender::Warren { concurrency: n }, 100, 0.1)
            .await?;
        if let Some((_, one, _)) = with_work.iter().find(|(work, _, _)| *work == 0.1) {
            concurrency = Some((*one, many));
        }
    }
    print_report(&bench.args, &contenders, &zero, &with_work, concurrency);
    drop(node);
    Ok(())
}

fn median(drains: &[Drain]) -> Drain {
    let mut sorted = drains.to_vec();
    sorted.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    sorted[sorted.len() / 2]
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

fn print_report(
    args: &Args,
    contenders: &[Contender],
    zero: &[Vec<Drain>],
    with_work: &[(f64, Drain, Drain)],
    concurrency: Option<(Drain, Drain)>,
) {
    println!();
    println!(
        "## warren worker benchmark (one private RabbitMQ node, classic durable queue, {} preloaded zero-work jobs per drain, median of {} rounds)",
        args.jobs, args.rounds
    );
    println!();
    println!("| consumer | jobs/s | ms/job | rounds (jobs/s) |");
    println!("|---|---:|---:|---|");
    let mut medians = Vec::new();
    for (contender, drains) in contenders.iter().zip(zero) {
        let m = median(drains);
        medians.push(m.rate());
        let all: Vec<String> = drains.iter().map(|d| format!("{:.0}", d.rate())).collect();
        println!(
            "| {} | {:.0} | {:.3} | {} |",
            contender.label(),
            m.rate(),
            m.ms_per_job(),
            all.join(", ")
        );
    }
    let (raw, pika, warren) = (medians[0], medians[1], medians[2]);
    println!();
    println!("| ratio (zero work, prefetch 1) | value | bar |");
    println!("|---|---:|---|");
    println!(
        "| warren-worker / seed's pika worker | {:.2}x | >= 1.0x |",
        ratio(warren, pika)
    );
    println!(
        "| warren-worker / raw lapin consumer | {:.2} | >= 0.8 |",
        ratio(warren, raw)
    );
    println!(
        "| seed's pika worker / raw lapin consumer | {:.2} | |",
        ratio(pika, raw)
    );
    if !with_work.is_empty() {
        println!();
        println!(
            "| work per job | jobs | warren-worker ms/job | overhead ms | pika ms/job | overhead ms |"
        );
        println!("|---|---:|---:|---:|---:|---:|");
        let zero_warren = median(&zero[2]);
        let zero_pika = median(&zero[1]);
        println!(
            "| none | {} | {:.3} | {:.3} | {:.3} | {:.3} |",
            args.jobs,
            zero_warren.ms_per_job(),
            zero_warren.ms_per_job(),
            zero_pika.ms_per_job(),
            zero_pika.ms_per_job()
        );
        for (work, warren, pika) in with_work {
            let work_ms = work * 1000.0;
            println!(
                "| {work_ms:.0} ms | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
                warren.jobs,
                warren.ms_per_job(),
                warren.ms_per_job() - work_ms,
                pika.ms_per_job(),
                pika.ms_per_job() - work_ms
            );
        }
    }
    if let Some((one, many)) = concurrency {
        println!();
        println!("| warren-worker, 100 ms jobs | jobs | jobs/s |");
        println!("|---|---:|---:|");
        println!(
            "| WARREN_CONCURRENCY=1 (prefetch 1) | {} | {:.1} |",
            one.jobs,
            one.rate()
        );
        println!(
            "| WARREN_CONCURRENCY={0} (prefetch {0}) | {1} | {2:.1} |",
            args.concurrency,
            many.jobs,
            many.rate()
        );
        println!(
            "| ratio | {:.1}x | bar >= 8x (at concurrency 10) |",
            ratio(many.rate(), one.rate())
        );
    }
}

impl Bench {
    /// Fills the queue with `jobs` jobs of `work_seconds` each, lets
    /// `contender` drain it and times the drain.
    async fn drain(
        &self,
        contender: Contender,
        jobs: usize,
        work_seconds: f64,
    ) -> anyhow::Result<Drain> {
        // One dot per job, scaled by the seconds per dot; no dot is zero work.
        let message = if work_seconds > 0.0 {
            "job."
        } else {
            "zero work"
        };
        self.wait_consumers(0).await?;
        self.fill(jobs, message).await?;
        let drain = match contender {
            Contender::RawLapin => self.raw_lapin(jobs).await?,
            Contender::Pika => {
                let mut command = Command::new(&self.args.python);
                command
                    .arg(&self.args.pika_script)
                    .env("AMQP_URL", self.url.replace("%2f", "%2F"))
                    .env("QUEUE", &self.queue)
                    .env("SECONDS_PER_DOT", work_seconds.to_string())
                    .env("PYTHONDONTWRITEBYTECODE", "1");
                self.external(command, jobs, " [x] Done").await?
            }
            Contender::Warren { concurrency } => {
                let mut command = Command::new(&self.args.worker_bin);
                command
                    .env("AMQP_URL", &self.url)
                    .env("WARREN_QUEUE", &self.queue)
                    .env("WARREN_QUEUE_TYPE", "classic")
                    .env("WARREN_CONCURRENCY", concurrency.to_string())
                    .env("WARREN_PREFETCH", concurrency.to_string())
                    .env("WARREN_SECONDS_PER_DOT", work_seconds.to_string())
                    .env("WARREN_LISTEN_ADDR", format!("127.0.0.1:{}", free_port()?))
                    .env("WARREN_LOG_FORMAT", "json")
                    .env("WARREN_LOG", "info")
                    .env("POD_NAME", "bench-worker");
                self.external(command, jobs, "\"job done\"").await?
            }
        };
        self.wait_consumers(0).await?;
        let left = self.queue_state().await?.0;
        if left != 0 {
            bail!("{} left {left} jobs in the queue", contender.label());
        }
        Ok(drain)
    }

    /// Publishes `jobs` persistent envelopes, confirmed.
    async fn fill(&self, jobs: usize, message: &str) -> anyhow::Result<()> {
        for _ in 0..jobs {
            let body = Envelope::new(message, Default::default()).to_bytes();
            let _confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    self.queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?;
        }
        self.channel.wait_for_confirms().await?;
        let (ready, _) = self.queue_state().await?;
        if ready as usize != jobs {
            bail!("filled the queue with {jobs} jobs but it holds {ready}");
        }
        Ok(())
    }

    /// (ready messages, consumers) from a passive declare.
    async fn queue_state(&self) -> anyhow::Result<(u32, u32)> {
        let queue = self
            .channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("passive declare of the bench queue")?;
        Ok((queue.message_count(), queue.consumer_count()))
    }

    /// Polls until the queue has `consumers` consumers; returns when it saw it.
    async fn wait_consumers(&self, consumers: u32) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.queue_state().await?.1 == consumers {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!("the queue never had {consumers} consumers");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Runs a worker process until `jobs` lines containing `done_marker`
    /// came out of its stdout.
    async fn external(
        &self,
        mut command: Command,
        jobs: usize,
        done_marker: &str,
    ) -> anyhow::Result<Drain> {
        let mut child: Child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker process")?;
        let stdout = child.stdout.take().context("the worker's stdout")?;
        let marker = done_marker.to_string();
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut done = 0usize;
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(&marker) {
                    done += 1;
                    if done == jobs {
                        return Some(Instant::now());
                    }
                }
            }
            None
        });
        let started = self.wait_consumers(1).await?;
        let finished = tokio::time::timeout(Duration::from_secs(600), reader)
            .await
            .context("the worker took more than 600 s")??;
        // The seed's worker prints "Done" just before its ack: let the last
        // ack reach the broker before the process goes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = child.kill().await;
        let finished = finished.context("the worker exited before finishing its jobs")?;
        Ok(Drain {
            jobs,
            seconds: finished.duration_since(started).as_secs_f64(),
        })
    }

    /// The ceiling: a lapin consumer that acks each delivery and does nothing else.
    async fn raw_lapin(&self, jobs: usize) -> anyhow::Result<Drain> {
        let connection = Connection::connect(&self.url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel.basic_qos(1, BasicQosOptions::default()).await?;
        let queue = self.queue.clone();
        let consumer = tokio::spawn(async move {
            let mut consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    "raw-lapin".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let mut done = 0usize;
            while let Some(delivery) = consumer.next().await {
                delivery?.acker.ack(BasicAckOptions::default()).await?;
                done += 1;
                if done == jobs {
                    return Ok::<_, anyhow::Error>(Instant::now());
                }
            }
            bail!("the raw consumer was cancelled after {done} of {jobs} jobs")
        });
        let started = self.wait_consumers(1).await?;
        let finished = consumer.await??;
        let _ = connection.close(200, "bye".into()).await;
        Ok(Drain {
            jobs,
            seconds: finished.duration_since(started).as_secs_f64(),
        })
    }
}

//! The ceiling section: the sender against the raw pipelined-confirm
//! ceiling, measured in short interleaved rounds.
//!
//! One long row per publisher is at the mercy of whatever else the machine
//! does meanwhile: on a shared 2-core machine the raw ceiling alone moved
//! from 10.6k to 24.1k/s between two runs. So every contestant (the raw
//! publisher, the sender at two loads, the sender with audit events off, and
//! optionally a baseline build of the sender) is measured for
//! `--round-seconds` in each of `--rounds` rounds, in forward order on even
//! rounds and backward order on odd ones (A B B A: a load that drifts
//! steadily hits every contestant alike). A ratio is taken within a round
//! (against that round's raw ceiling, or this build against the baseline
//! build) and the median over rounds is printed with its spread (min – max).
//!
//! Durability is the same for every contestant: the queue type under test,
//! persistent, mandatory, publisher confirms; the senders run with audit
//! events on (batched, the default) unless the row says otherwise.
//!
//! Beside throughput, the sender's CPU time per accepted job (all threads,
//! from `/proc/<pid>/task/*/schedstat`) is printed: it is the sender's own
//! cost, much less sensitive to the machine's load than jobs per second.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use lapin::options::QueuePurgeOptions;
use lapin::{Connection, ConnectionProperties};
use tokio::process::{Child, Command};
use warren_broker::{QueueType, Topology};
use warren_testkit::{free_port, ready_count, unique_name};

use crate::scrape::cpu_ns;
use crate::{Args, LoadResult, RAW_CHANNELS, RAW_WINDOW, load_at, raw_publisher, spawn, wait_http};

/// The longest wait for emptying a queue between runs.
const PURGE_TIMEOUT: Duration = Duration::from_secs(30);

/// What one contestant is.
enum Kind {
    /// The raw lapin publisher keeping `window` publishes in flight per channel.
    Raw { window: usize },
    /// A sender process under `connections` HTTP connections.
    Sender {
        process: Child,
        port: u16,
        connections: usize,
        /// This build (false: the baseline build).
        current: bool,
        audit: bool,
    },
}

/// One contestant and its result in every round so far.
struct Contestant {
    name: String,
    kind: Kind,
    queue: String,
    rounds: Vec<Measured>,
}

/// One contestant's round.
struct Measured {
    load: LoadResult,
    /// The sender's CPU microseconds per accepted job (None for the raw publisher).
    cpu_us_per_job: Option<f64>,
}

/// The rounds of one queue type.
pub(crate) struct Rounds {
    queue_type: QueueType,
    contestants: Vec<Contestant>,
    /// The 1-minute load average at the start of each round.
    loads: Vec<f64>,
    round_seconds: u64,
    concurrency: usize,
    ceiling_concurrency: usize,
}

/// The 1-minute load average (0 when unreadable).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The median and the extremes of `values` (NaN when empty).
fn median_spread(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    (median, sorted[0], sorted[n - 1])
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

impl Rounds {
    /// Starts the senders of `queue_type`'s contestants and runs the rounds.
    pub(crate) async fn run(
        args: &Args,
        url: &str,
        queue_type: QueueType,
        body: &[u8],
    ) -> anyhow::Result<Self> {
        let mut contestants = contestants(args, url, queue_type).await?;
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let queues: Vec<String> = contestants.iter().map(|c| c.queue.clone()).collect();
        Topology::new(queues, queue_type)
            .declare(&connection)
            .await?;
        let channel = connection.create_channel().await?;
        let duration = Duration::from_secs(args.round_seconds.max(1));
        let mut loads = Vec::new();
        for round in 0..args.rounds {
            loads.push(load_average());
            let order: Vec<usize> = if round % 2 == 0 {
                (0..contestants.len()).collect()
            } else {
                (0..contestants.len()).rev().collect()
            };
            for index in order {
                let contestant = &mut contestants[index];
                eprintln!(
                    "{} round {}/{}: {}...",
                    queue_type.as_str(),
                    round + 1,
                    args.rounds,
                    contestant.name
                );
                let measured = measure(args, url, body, contestant, duration).await?;
                // Printed as it comes, so a run stopped early keeps its figures.
                let cpu = measured
                    .cpu_us_per_job
                    .map(|us| format!(", {us:.0} µs CPU/job"))
                    .unwrap_or_default();
                eprintln!(
                    "  {:.0}/s, {} errors{cpu} (load {:.1})",
                    measured.load.rate(),
                    measured.load.errors,
                    load_average()
                );
                // Late confirms of the last requests land before the count.
                tokio::time::sleep(Duration::from_millis(300)).await;
                let stored = ready_count(url, &contestant.queue).await?;
                if (stored as usize) < measured.load.ok {
                    eprintln!(
                        "warning: {}: {} accepted but only {stored} in the queue",
                        contestant.name, measured.load.ok
                    );
                }
                // Every round starts from an empty queue. Bounded: one run
                // on the shared machine hung here for 14 minutes.
                let purge = channel.queue_purge(
                    contestant.queue.as_str().into(),
                    QueuePurgeOptions::default(),
                );
                match tokio::time::timeout(PURGE_TIMEOUT, purge).await {
                    Ok(purged) => {
                        purged.context("purging a bench queue")?;
                    }
                    Err(_) => eprintln!(
                        "warning: purging {} took over {PURGE_TIMEOUT:?}; its next round starts with messages in the queue",
                        contestant.name
                    ),
                }
                contestant.rounds.push(measured);
            }
        }
        let _ = connection.close(200, "bye".into()).await;
        for contestant in &mut contestants {
            if let Kind::Sender { process, .. } = &mut contestant.kind {
                let _ = process.kill().await;
            }
        }
        Ok(Self {
            queue_type,
            contestants,
            loads,
            round_seconds: args.round_seconds,
            concurrency: args.concurrency,
            ceiling_concurrency: args.ceiling_concurrency,
        })
    }

    /// Rows for the main table: every contestant over all its rounds
    /// (accepted/s = all accepted ÷ all seconds; p50/p99 the median round's).
    pub(crate) fn rows(&self) -> Vec<(String, LoadResult)> {
        self.contestants
            .iter()
            .map(|contestant| {
                let results: Vec<&LoadResult> = contestant.rounds.iter().map(|m| &m.load).collect();
                let percentile = |p: f64| {
                    let values: Vec<f64> = results
                        .iter()
                        .map(|r| r.percentile(p).as_secs_f64())
                        .collect();
                    Duration::from_secs_f64(median_spread(&values).0.max(0.0))
                };
                let total = LoadResult {
                    ok: results.iter().map(|r| r.ok).sum(),
                    errors: results.iter().map(|r| r.errors).sum(),
                    seconds: results.iter().map(|r| r.seconds).sum(),
                    latencies: Vec::new(),
                    reported: Some((percentile(0.5), percentile(0.99))),
                };
                (contestant.name.clone(), total)
            })
            .collect()
    }

    fn rates(&self, index: usize) -> Vec<f64> {
        self.contestants[index]
            .rounds
            .iter()
            .map(|m| m.load.rate())
            .collect()
    }

    /// Per round, the rate of `index` over the rate of `base`.
    fn ratios(&self, index: usize, base: usize) -> Vec<f64> {
        self.rates(index)
            .iter()
            .zip(self.rates(base))
            .map(|(a, b)| ratio(*a, b))
            .collect()
    }

    fn find(&self, pick: impl Fn(&Kind) -> bool) -> Option<usize> {
        self.contestants.iter().position(|c| pick(&c.kind))
    }

    fn sender(&self, current: bool, audit: bool, at: usize) -> Option<usize> {
        self.find(|kind| {
            matches!(kind, Kind::Sender { current: c, audit: a, connections, .. }
                if *c == current && *a == audit && *connections == at)
        })
    }

    /// The round-by-round table and the median ratios.
    pub(crate) fn print(&self) {
        let kind = self.queue_type.as_str();
        println!();
        println!(
            "### {kind} queues: {} interleaved rounds, {} s per contestant, order reversed every other round",
            self.loads.len(),
            self.round_seconds
        );
        println!();
        let names: Vec<&str> = self.contestants.iter().map(|c| c.name.as_str()).collect();
        println!("| round | load (1 min) | {} |", names.join(" | "));
        println!("|---|---:|{}", "---:|".repeat(names.len()));
        for (round, load) in self.loads.iter().enumerate() {
            let ceiling = self.contestants[0].rounds[round].load.rate();
            let cells: Vec<String> = self
                .contestants
                .iter()
                .map(|c| {
                    let measured = &c.rounds[round];
                    let rate = measured.load.rate();
                    let cpu = measured
                        .cpu_us_per_job
                        .map(|us| format!(", {us:.0} µs CPU/job"))
                        .unwrap_or_default();
                    let errors = if measured.load.errors > 0 {
                        format!(", {} errors", measured.load.errors)
                    } else {
                        String::new()
                    };
                    format!("{rate:.0}/s ({:.2}{cpu}{errors})", ratio(rate, ceiling))
                })
                .collect();
            println!("| {} | {load:.1} | {} |", round + 1, cells.join(" | "));
        }
        let medians: Vec<String> = (0..self.contestants.len())
            .map(|i| {
                let (median, low, high) = median_spread(&self.ratios(i, 0));
                format!("{median:.2} [{low:.2} – {high:.2}]")
            })
            .collect();
        let (load, low, high) = median_spread(&self.loads);
        println!(
            "| median / raw ceiling [min – max] | {load:.1} [{low:.1} – {high:.1}] | {} |",
            medians.join(" | ")
        );
        self.print_ratios();
    }

    /// The ratio lines: the bar at `--ceiling-concurrency`, the same at
    /// `--concurrency`, and this build against the baseline build.
    fn print_ratios(&self) {
        let kind = self.queue_type.as_str();
        let rounds = self.loads.len();
        println!();
        println!("| ratio ({kind}, median of {rounds} rounds [min – max]) | value | bar |");
        println!("|---|---:|---|");
        let line = |what: String, values: Vec<f64>, bar: &str| {
            let (median, low, high) = median_spread(&values);
            println!("| {what} | {median:.2} [{low:.2} – {high:.2}] | {bar} |");
        };
        for (connections, bar) in [
            (self.ceiling_concurrency, ">= 0.5 (judged here)"),
            (
                self.concurrency,
                "printed: the issue's 0.23 – 0.44 was at this load",
            ),
        ] {
            if let Some(sender) = self.sender(true, true, connections) {
                line(
                    format!(
                        "warren-sender, audit events on, {connections} connections / raw ceiling"
                    ),
                    self.ratios(sender, 0),
                    bar,
                );
            }
        }
        if let Some(raw) = self.find(|k| matches!(k, Kind::Raw { window } if *window != RAW_WINDOW))
        {
            line(
                format!(
                    "raw lapin with {} in flight / raw ceiling: the most {} clients allow",
                    self.concurrency, self.concurrency
                ),
                self.ratios(raw, 0),
                "",
            );
        }
        if let Some(off) = self.sender(true, false, self.ceiling_concurrency) {
            line(
                "warren-sender, audit events off / raw ceiling".into(),
                self.ratios(off, 0),
                "",
            );
        }
        for connections in [self.ceiling_concurrency, self.concurrency] {
            if let (Some(new), Some(old)) = (
                self.sender(true, true, connections),
                self.sender(false, true, connections),
            ) {
                line(
                    format!("this build / baseline build, jobs/s, {connections} connections"),
                    self.ratios(new, old),
                    "",
                );
                let cpu = |i: usize| -> Vec<f64> {
                    self.contestants[i]
                        .rounds
                        .iter()
                        .map(|m| m.cpu_us_per_job.unwrap_or(f64::NAN))
                        .collect()
                };
                line(
                    format!(
                        "this build / baseline build, CPU per accepted job, {connections} connections (lower is better)"
                    ),
                    cpu(new)
                        .iter()
                        .zip(cpu(old))
                        .map(|(a, b)| ratio(*a, b))
                        .collect(),
                    "",
                );
            }
        }
    }
}

/// The contestants of `queue_type`, senders started and ready.
async fn contestants(
    args: &Args,
    url: &str,
    queue_type: QueueType,
) -> anyhow::Result<Vec<Contestant>> {
    let kind = queue_type.as_str();
    let quorum = queue_type == QueueType::Quorum;
    let mut list = vec![Contestant {
        name: format!("raw lapin, pipelined confirms ({kind})"),
        kind: Kind::Raw { window: RAW_WINDOW },
        queue: unique_name("bench-raw"),
        rounds: Vec::new(),
    }];
    if quorum {
        let window = args.concurrency.div_ceil(RAW_CHANNELS).max(1);
        list.push(Contestant {
            name: format!("raw lapin, {} in flight ({kind})", window * RAW_CHANNELS),
            kind: Kind::Raw { window },
            queue: unique_name("bench-raw"),
            rounds: Vec::new(),
        });
    }
    // (binary, this build, audit events, connections)
    let mut senders: Vec<(&Path, bool, bool, usize)> =
        vec![(&args.sender_bin, true, true, args.ceiling_concurrency)];
    if quorum {
        senders.push((&args.sender_bin, true, true, args.concurrency));
        senders.push((&args.sender_bin, true, false, args.ceiling_concurrency));
        if let Some(baseline) = &args.baseline_sender_bin {
            senders.push((baseline, false, true, args.ceiling_concurrency));
            senders.push((baseline, false, true, args.concurrency));
        }
    }
    for (binary, current, audit, connections) in senders {
        let queue = unique_name("bench-sender");
        let port = free_port()?;
        let process = spawn(
            Command::new(binary)
                .env("AMQP_URL", url)
                .env("WARREN_QUEUE", &queue)
                .env("WARREN_QUEUE_TYPE", kind)
                .env("WARREN_LISTEN_ADDR", format!("127.0.0.1:{port}"))
                .env("WARREN_AUDIT_EVENTS", audit.to_string())
                .env("WARREN_LOG", "warn"),
        )?;
        wait_http(&format!("http://127.0.0.1:{port}/readyz")).await?;
        let mut name = String::from(if current {
            "warren-sender"
        } else {
            "baseline warren-sender"
        });
        if !audit {
            name.push_str(", audit events off");
        }
        // The bar's row keeps the name the other sections compare with.
        let name = if current && audit && connections == args.ceiling_concurrency {
            format!("{name} ({kind})")
        } else {
            format!("{name} ({kind}, {connections} connections)")
        };
        list.push(Contestant {
            name,
            kind: Kind::Sender {
                process,
                port,
                connections,
                current,
                audit,
            },
            queue,
            rounds: Vec::new(),
        });
    }
    Ok(list)
}

/// One contestant for `duration`.
async fn measure(
    args: &Args,
    url: &str,
    body: &[u8],
    contestant: &Contestant,
    duration: Duration,
) -> anyhow::Result<Measured> {
    match &contestant.kind {
        Kind::Raw { window } => Ok(Measured {
            load: raw_publisher(url, &contestant.queue, body, duration, *window).await?,
            cpu_us_per_job: None,
        }),
        Kind::Sender {
            process,
            port,
            connections,
            ..
        } => {
            let pid = process.id().context("a sender exited")?;
            let before = cpu_ns(pid)?;
            let load = load_at(
                args,
                &format!("http://127.0.0.1:{port}/send"),
                duration,
                *connections,
            )
            .await?;
            let spent = cpu_ns(pid)?.saturating_sub(before);
            let cpu_us_per_job = Some(spent as f64 / 1000.0 / load.ok.max(1) as f64);
            Ok(Measured {
                load,
                cpu_us_per_job,
            })
        }
    }
}

//! What Prometheus scraping costs the sender (issue 12's bar: a 1 s scrape
//! adds < 1 % CPU to a loaded sender).
//!
//! Measured two ways on one sender process, CPU read from
//! `/proc/<pid>/task/*/schedstat` (nanoseconds on CPU, every thread):
//! 1. A/B under the same HTTP load: CPU per accepted job without scraping
//!    and with a `GET /metrics` every second, alternated twice (A B A B) so
//!    drift in the machine's load hits both.
//! 2. The cost of one scrape, directly: CPU for 2000 back-to-back scrapes of
//!    the sender after the load (every series populated), divided by 2000,
//!    set against the sender's CPU per second under load.
//!
//! The second figure is the precise one; the first shows the same thing
//! through the noise of a shared machine.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use tokio::process::Command;
use warren_testkit::{free_port, unique_name};

use crate::{Args, load, spawn, wait_http};

/// Nanoseconds all threads of `pid` have spent on a CPU.
pub(crate) fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let tasks = format!("/proc/{pid}/task");
    let mut total = 0u64;
    for entry in std::fs::read_dir(&tasks).with_context(|| format!("reading {tasks}"))? {
        let path = entry?.path().join("schedstat");
        // A thread may exit between the listing and the read.
        if let Ok(text) = std::fs::read_to_string(&path) {
            total += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// One load phase.
#[derive(Debug, Clone, Copy, Default)]
struct Phase {
    accepted: usize,
    cpu_ns: u64,
    scrapes: usize,
}

impl Phase {
    fn add(&mut self, other: Phase) {
        self.accepted += other.accepted;
        self.cpu_ns += other.cpu_ns;
        self.scrapes += other.scrapes;
    }
    fn cpu_per_job_us(&self) -> f64 {
        self.cpu_ns as f64 / 1000.0 / self.accepted.max(1) as f64
    }
}

/// Figures of [`measure`].
pub struct ScrapeCost {
    plain: Phase,
    scraped: Phase,
    seconds_per_phase: f64,
    per_scrape_ns: f64,
    metrics_bytes: usize,
}

async fn scrape_every_second(url: String, stop: tokio_util::sync::CancellationToken) -> usize {
    let client = reqwest::Client::new();
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    let mut scrapes = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return scrapes,
            _ = ticker.tick() => {
                if let Ok(response) = client.get(&url).send().await {
                    let _ = response.bytes().await;
                    scrapes += 1;
                }
            }
        }
    }
}

/// Runs the measurement against a fresh sender on `amqp_url` (quorum
/// queue, audit events on: the chart's defaults).
pub async fn measure(args: &Args, sender_bin: &Path, amqp_url: &str) -> anyhow::Result<ScrapeCost> {
    let port = free_port()?;
    let mut sender = spawn(
        Command::new(sender_bin)
            .env("AMQP_URL", amqp_url)
            .env("WARREN_QUEUE", unique_name("bench-scrape"))
            .env("WARREN_QUEUE_TYPE", "quorum")
            .env("WARREN_LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("WARREN_LOG", "warn"),
    )?;
    let pid = sender.id().context("the sender exited at once")?;
    wait_http(&format!("http://127.0.0.1:{port}/readyz")).await?;
    let send_url = format!("http://127.0.0.1:{port}/send");
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    let duration = Duration::from_secs(args.seconds);

    let mut plain = Phase::default();
    let mut scraped = Phase::default();
    for with_scrape in [false, true, false, true] {
        let stop = tokio_util::sync::CancellationToken::new();
        let scraper = with_scrape
            .then(|| tokio::spawn(scrape_every_second(metrics_url.clone(), stop.clone())));
        let before = cpu_ns(pid)?;
        let result = load(args, &send_url, 202, duration).await?;
        let cpu = cpu_ns(pid)?.saturating_sub(before);
        stop.cancel();
        let scrapes = match scraper {
            Some(task) => task.await.unwrap_or(0),
            None => 0,
        };
        let phase = Phase {
            accepted: result.ok,
            cpu_ns: cpu,
            scrapes,
        };
        if with_scrape {
            scraped.add(phase);
        } else {
            plain.add(phase);
        }
    }

    // The cost of one scrape, directly.
    let client = reqwest::Client::new();
    let mut metrics_bytes = 0;
    let rounds = 2000;
    let before = cpu_ns(pid)?;
    for _ in 0..rounds {
        let body = client.get(&metrics_url).send().await?.bytes().await?;
        metrics_bytes = body.len();
    }
    let per_scrape_ns = cpu_ns(pid)?.saturating_sub(before) as f64 / rounds as f64;
    let _ = sender.kill().await;
    Ok(ScrapeCost {
        plain,
        scraped,
        seconds_per_phase: duration.as_secs_f64() * 2.0,
        per_scrape_ns,
        metrics_bytes,
    })
}

impl ScrapeCost {
    /// The printed table.
    pub fn print(&self) {
        let loaded_cpu_per_s = self.plain.cpu_ns as f64 / self.seconds_per_phase;
        let share = self.per_scrape_ns / loaded_cpu_per_s * 100.0;
        let ab = (self.scraped.cpu_per_job_us() / self.plain.cpu_per_job_us() - 1.0) * 100.0;
        println!();
        println!("| sender, Prometheus scrape overhead (quorum, audit on) | value |");
        println!("|---|---:|");
        println!(
            "| no scrape: accepted/s, CPU per accepted job | {:.0}/s, {:.1} µs |",
            self.plain.accepted as f64 / self.seconds_per_phase,
            self.plain.cpu_per_job_us()
        );
        println!(
            "| 1 s scrape ({} scrapes): accepted/s, CPU per accepted job | {:.0}/s, {:.1} µs |",
            self.scraped.scrapes,
            self.scraped.accepted as f64 / self.seconds_per_phase,
            self.scraped.cpu_per_job_us()
        );
        println!(
            "| A/B: CPU per job with the scrape vs without (A B A B; machine noise included) | {ab:+.1} % |"
        );
        println!(
            "| one /metrics scrape ({} bytes), mean of 2000 | {:.0} µs CPU |",
            self.metrics_bytes,
            self.per_scrape_ns / 1000.0
        );
        let verdict = if share < 1.0 {
            "< 1 % ✔"
        } else {
            "≥ 1 % ✘"
        };
        println!(
            "| a 1 s scrape as a share of the loaded sender's CPU ({:.2} cores) | {share:.3} % ({verdict}) |",
            loaded_cpu_per_s / 1e9
        );
    }
}

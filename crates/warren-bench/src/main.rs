//! `make bench`: the message pipeline's figures, measured in one run against
//! one private RabbitMQ node.
//!
//! 1. and 2. The ceiling section ([`rounds`]): a raw lapin publisher with
//!    pipelined confirms against `warren-sender` under a concurrent HTTP load
//!    (202 only after confirm) at `--ceiling-concurrency` (256) and
//!    `--concurrency` (64) connections, audit events on (batched, the
//!    default) and off, the raw publisher held to 64 in flight (the most 64
//!    clients allow: a quorum confirm takes milliseconds), and optionally a
//!    baseline sender build; in short interleaved rounds, ratios taken
//!    within a round, medians printed with their spread.
//! 3. The seed's design: Flask + pika, one connection per request.
//! 4. `warren-worker` jobs/s with zero-work jobs at prefetch 1 (and 10).
//! 5. Tokens (with a private PostgreSQL): the sender with `WARREN_AUTH=required`
//!    and one hot monthly token vs the same sender with auth off, and two
//!    senders racing one token limited to `--race-limit` uses under load.
//! 6. What a 1 s Prometheus scrape costs the loaded sender ([`scrape`]).
//!
//! `--only ceiling,tokens,scrape,flask,worker` picks the parts to run (default all).
//! Prints a table and the ratios. Not a test: nothing here asserts timings.

mod rounds;
mod scrape;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use tokio::process::{Child, Command};
use warren_broker::{Envelope, QueueType, Topology};
use warren_testkit::{PgNode, RabbitNode, RabbitOptions, free_port, ready_count, unique_name};
use warren_tokens::{Limit, NewToken, Store, SubjectKind, SubjectRef, SystemClock};

#[derive(Debug, Parser)]
#[command(
    name = "pipeline-bench",
    about = "Sender vs raw publisher vs Flask+pika; worker jobs/s"
)]
struct Args {
    /// The warren-sender binary (build with --release for meaningful figures).
    #[arg(long, env = "WARREN_SENDER_BIN")]
    sender_bin: PathBuf,
    /// The warren-worker binary.
    #[arg(long, env = "WARREN_WORKER_BIN")]
    worker_bin: PathBuf,
    /// Python with flask and pika installed (make bench creates a venv).
    #[arg(long, env = "WARREN_BENCH_PYTHON")]
    python: PathBuf,
    /// The Flask + pika baseline script.
    #[arg(long, default_value = "bench/flask_sender.py")]
    flask_script: PathBuf,
    /// Seconds each publishing measurement outside the ceiling section runs.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Concurrent HTTP connections.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Concurrent HTTP connections for the bar's sender row in the ceiling
    /// section: enough for the broker to reach its ceiling (at
    /// `--concurrency` even the raw publisher held to that many publishes
    /// in flight cannot, on a busy machine; both loads are printed).
    #[arg(long, default_value_t = 256)]
    ceiling_concurrency: usize,
    /// Interleaved rounds of the ceiling section (the ratios printed are
    /// medians over rounds, with their spread).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Seconds each contestant runs in each round of the ceiling section.
    #[arg(long, default_value_t = 3)]
    round_seconds: u64,
    /// Another warren-sender build (e.g. main's) measured in the same
    /// rounds: prints this build / that build, jobs/s and CPU per job.
    #[arg(long, env = "WARREN_BENCH_BASELINE_SENDER_BIN")]
    baseline_sender_bin: Option<PathBuf>,
    /// wrk binary for the HTTP load (a separate, efficient process); without
    /// it an in-process reqwest load generator shares the CPU with the sender.
    #[arg(long, env = "WARREN_BENCH_WRK")]
    wrk: Option<PathBuf>,
    /// Jobs for the worker measurement.
    #[arg(long, default_value_t = 5000)]
    worker_jobs: usize,
    /// Measure tokens too (needs Debian's postgresql for a private cluster).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    tokens: bool,
    /// The limit two senders race for.
    #[arg(long, default_value_t = 10_000)]
    race_limit: u64,
    /// Which parts to run, comma-separated: `ceiling` (raw publisher and the
    /// sender on quorum and classic queues), `tokens`, `scrape`, `flask`, `worker`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ceiling,tokens,scrape,flask,worker"
    )]
    only: Vec<Section>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Ceiling,
    Tokens,
    Scrape,
    Flask,
    Worker,
}

struct LoadResult {
    ok: usize,
    errors: usize,
    seconds: f64,
    latencies: Vec<Duration>,
    /// Percentiles reported by an external load generator (wrk).
    reported: Option<(Duration, Duration)>,
}

impl LoadResult {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.seconds
    }
    fn percentile(&self, p: f64) -> Duration {
        if let Some((p50, p99)) = self.reported {
            return if p < 0.9 { p50 } else { p99 };
        }
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let index = ((self.latencies.len() as f64 - 1.0) * p).round() as usize;
        self.latencies[index]
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    warren_telemetry::install_crypto_provider();
    for (what, path) in [
        ("sender", &args.sender_bin),
        ("worker", &args.worker_bin),
        ("python", &args.python),
    ] {
        if !path.exists() {
            bail!(
                "{what} not found at {} (run `make bench`, which builds and installs them)",
                path.display()
            );
        }
    }
    eprintln!("starting a private RabbitMQ node...");
    let node = RabbitNode::start(RabbitOptions::default())
        .await
        .context("starting RabbitMQ")?;
    let url = node.amqp_url();
    let body = Envelope::new("Hello RabbitMQ!.....", Default::default()).to_bytes();
    let duration = Duration::from_secs(args.seconds);

    let mut rows: Vec<(String, LoadResult)> = Vec::new();
    let mut ceilings = Vec::new();
    if args.only.contains(&Section::Ceiling) {
        for queue_type in [QueueType::Quorum, QueueType::Classic] {
            let rounds = rounds::Rounds::run(&args, &url, queue_type, &body).await?;
            rows.extend(rounds.rows());
            ceilings.push(rounds);
        }
    }

    let race = if args.tokens && args.only.contains(&Section::Tokens) {
        Some(token_runs(&args, &url, duration, &mut rows).await?)
    } else {
        None
    };
    let scrape_cost = if args.only.contains(&Section::Scrape) {
        eprintln!("warren-sender with and without a 1 s Prometheus scrape...");
        Some(scrape::measure(&args, &args.sender_bin, &url).await?)
    } else {
        None
    };

    if args.only.contains(&Section::Flask) {
        eprintln!("Flask + pika (seed design, classic queue)...");
        let flask_queue = unique_name("bench-flask");
        let flask_port = free_port()?;
        let pika_url = url.replace("%2f", "%2F");
        let mut flask = spawn(
            Command::new(&args.python)
                .arg(&args.flask_script)
                .env("AMQP_URL", &pika_url)
                .env("QUEUE", &flask_queue)
                .env("PORT", flask_port.to_string()),
        )?;
        wait_tcp(flask_port).await?;
        let flask_result = load(
            &args,
            &format!("http://127.0.0.1:{flask_port}/send"),
            200,
            duration,
        )
        .await?;
        let _ = flask.kill().await;
        rows.push((
            "Flask + pika, connection per request (classic)".into(),
            flask_result,
        ));
    }

    let workers = if args.only.contains(&Section::Worker) {
        eprintln!("warren-worker, zero-work jobs...");
        Some((
            worker_rate(&args, &url, 1).await?,
            worker_rate(&args, &url, 10).await?,
        ))
    } else {
        None
    };

    println!();
    println!(
        "## warren pipeline benchmark ({} s per run; the ceiling rows: {} rounds x {} s, summed; {} HTTP connections from {} ({} for the bar's row), one private RabbitMQ node)",
        args.seconds,
        args.rounds,
        args.round_seconds,
        args.concurrency,
        if args.wrk.is_some() {
            "wrk"
        } else {
            "an in-process reqwest client"
        },
        args.ceiling_concurrency
    );
    println!();
    println!("| publisher | accepted/s | p50 ms | p99 ms | errors |");
    println!("|---|---:|---:|---:|---:|");
    for (name, r) in &rows {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {} |",
            r.rate(),
            r.percentile(0.50).as_secs_f64() * 1000.0,
            r.percentile(0.99).as_secs_f64() * 1000.0,
            r.errors
        );
    }
    let rate = |name: &str| {
        rows.iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r.rate())
            .unwrap_or(0.0)
    };
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    println!();
    println!("| ratio | value | bar |");
    println!("|---|---:|---|");
    if args.only.contains(&Section::Flask) {
        for kind in ["classic", "quorum"] {
            println!(
                "| warren-sender ({kind}) / Flask + pika | {:.1}x | >= 20x |",
                ratio(
                    rate(&format!("warren-sender ({kind})")),
                    rate("Flask + pika, connection per request (classic)")
                )
            );
        }
    }
    if let Some((accepted, limit, used)) = race {
        println!(
            "| warren-sender, WARREN_AUTH=required, one hot monthly token / auth off (quorum) | {:.2} | >= 0.7 |",
            ratio(
                rate("warren-sender (quorum, WARREN_AUTH=required, hot monthly token)"),
                rate("warren-sender (quorum, WARREN_AUTH=off)")
            )
        );
        println!(
            "| two senders racing one token: accepted / limit | {accepted} / {limit} (over: {}, used in the database: {used}) | exactly the limit |",
            accepted.saturating_sub(limit)
        );
    }
    for rounds in &ceilings {
        rounds.print();
    }
    if let Some((worker_p1, worker_p10)) = workers {
        println!();
        println!("| worker | jobs/s |");
        println!("|---|---:|");
        println!("| warren-worker, zero-work jobs, prefetch 1 (quorum) | {worker_p1:.0} |");
        println!("| warren-worker, zero-work jobs, prefetch 10 (quorum) | {worker_p10:.0} |");
    }
    if let Some(scrape_cost) = scrape_cost {
        scrape_cost.print();
    }
    drop(node);
    Ok(())
}

fn spawn(command: &mut Command) -> anyhow::Result<Child> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting a benchmark process")
}

async fn wait_http(url: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(response) = client.get(url).send().await
            && response.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{url} never answered 200")
}

async fn wait_tcp(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens on port {port}")
}

/// Confirm-mode channels of the raw publisher.
pub(crate) const RAW_CHANNELS: usize = 4;
/// Publishes each raw channel keeps in flight for the ceiling.
pub(crate) const RAW_WINDOW: usize = 256;

/// How long after its run the raw publisher still waits for confirms (and
/// for its connection to close): a confirm that never comes counts as an
/// error instead of stopping the bench.
const RAW_GRACE: Duration = Duration::from_secs(10);

/// The ceiling: [`RAW_CHANNELS`] confirm-mode channels, each keeping up to
/// `window` publishes in flight into `queue` (declared by the caller),
/// persistent + mandatory like the sender. Bounded: publishes and confirms
/// still outstanding [`RAW_GRACE`] after the run are counted as errors (a
/// run on the shared machine once lost its connection mid-run and waited
/// for ever for confirms that could no longer come).
async fn raw_publisher(
    url: &str,
    queue: &str,
    body: &[u8],
    duration: Duration,
    window: usize,
) -> anyhow::Result<LoadResult> {
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    let started = Instant::now();
    let deadline = started + duration;
    let give_up = tokio::time::Instant::from_std(deadline + RAW_GRACE);
    let mut tasks = Vec::new();
    for _ in 0..RAW_CHANNELS {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let queue = queue.to_string();
        let body = body.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut in_flight = FuturesUnordered::new();
            let mut ok = 0usize;
            let mut errors = 0usize;
            let mut latencies = Vec::new();
            let mut abandoned = 0usize;
            'run: loop {
                while in_flight.len() < window && Instant::now() < deadline {
                    let sent = Instant::now();
                    let publish = channel.basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &body,
                        BasicProperties::default().with_delivery_mode(2),
                    );
                    match tokio::time::timeout_at(give_up, publish).await {
                        Ok(Ok(confirm)) => in_flight.push(async move { (confirm.await, sent) }),
                        Ok(Err(_)) => errors += 1,
                        Err(_) => {
                            abandoned += 1 + in_flight.len();
                            break 'run;
                        }
                    }
                }
                match tokio::time::timeout_at(give_up, in_flight.next()).await {
                    Ok(Some((Ok(c), sent))) if c.is_ack() => {
                        ok += 1;
                        latencies.push(sent.elapsed());
                    }
                    Ok(Some(_)) => errors += 1,
                    Ok(None) => break,
                    Err(_) => {
                        abandoned += in_flight.len();
                        break;
                    }
                }
            }
            (ok, errors + abandoned, latencies, abandoned)
        }));
    }
    let mut result = LoadResult {
        ok: 0,
        errors: 0,
        seconds: 0.0,
        latencies: Vec::new(),
        reported: None,
    };
    let mut abandoned = 0;
    for task in tasks {
        let (ok, errors, latencies, gave_up) = task.await?;
        result.ok += ok;
        result.errors += errors;
        result.latencies.extend(latencies);
        abandoned += gave_up;
    }
    // A run that gave up is timed by its publishing time, not the grace.
    result.seconds = if abandoned > 0 {
        duration.as_secs_f64()
    } else {
        started.elapsed().as_secs_f64()
    };
    result.latencies.sort();
    if abandoned > 0 {
        eprintln!(
            "warning: the raw publisher gave up on {abandoned} publishes {RAW_GRACE:?} after its run (counted as errors; connection up: {})",
            connection.status().connected()
        );
    }
    let _ = tokio::time::timeout(RAW_GRACE, connection.close(200, "bye".into())).await;
    Ok(result)
}

/// The HTTP load: wrk when given, else the in-process generator.
async fn load(
    args: &Args,
    url: &str,
    expect: u16,
    duration: Duration,
) -> anyhow::Result<LoadResult> {
    load_with(args, url, expect, duration, None).await
}

/// [`load`] of 202s with `connections` connections instead of `--concurrency`.
async fn load_at(
    args: &Args,
    url: &str,
    duration: Duration,
    connections: usize,
) -> anyhow::Result<LoadResult> {
    match &args.wrk {
        Some(wrk) => wrk_load(wrk, url, connections, duration, None).await,
        None => Ok(http_load(url, 202, connections, duration, None).await),
    }
}

/// [`load`] with an `Authorization: Bearer` token on every request.
async fn load_with(
    args: &Args,
    url: &str,
    expect: u16,
    duration: Duration,
    bearer: Option<&str>,
) -> anyhow::Result<LoadResult> {
    match &args.wrk {
        Some(wrk) => wrk_load(wrk, url, args.concurrency, duration, bearer).await,
        None => Ok(http_load(url, expect, args.concurrency, duration, bearer).await),
    }
}

/// Tokens: auth off vs required with one hot monthly token, then two
/// senders racing one token limited to `race_limit`. Returns (accepted,
/// limit, used as the database counts it).
async fn token_runs(
    args: &Args,
    amqp_url: &str,
    duration: Duration,
    rows: &mut Vec<(String, LoadResult)>,
) -> anyhow::Result<(u64, u64, u64)> {
    eprintln!("tokens: starting a private PostgreSQL...");
    let pg = PgNode::start().await.context("starting PostgreSQL")?;
    let store = Store::new(warren_tokens::pool(&pg.url(), 2)?, Arc::new(SystemClock));
    store.migrate().await?;
    store.create_application("bench").await?;
    let token = |limit| NewToken {
        subject: SubjectRef {
            kind: SubjectKind::Application,
            name: "bench".into(),
        },
        limit,
        queues: None,
        expires_at: None,
    };
    let (_, hot) = store
        .create_token(&token(Limit::Monthly(1_000_000_000)))
        .await?;
    let start_sender = |queue: &str, auth: bool| -> anyhow::Result<(Child, u16)> {
        let port = free_port()?;
        let child = spawn(
            Command::new(&args.sender_bin)
                .env("AMQP_URL", amqp_url)
                .env("WARREN_QUEUE", queue)
                .env("WARREN_QUEUE_TYPE", "quorum")
                .env("WARREN_LISTEN_ADDR", format!("127.0.0.1:{port}"))
                .env("WARREN_AUTH", if auth { "required" } else { "off" })
                .env("WARREN_DATABASE_URL", pg.url())
                .env("WARREN_LOG", "warn"),
        )?;
        Ok((child, port))
    };
    for auth in [false, true] {
        eprintln!(
            "warren-sender, quorum queue, WARREN_AUTH={}...",
            if auth { "required" } else { "off" }
        );
        let queue = unique_name("bench-tokens");
        let (mut sender, port) = start_sender(&queue, auth)?;
        wait_http(&format!("http://127.0.0.1:{port}/readyz")).await?;
        wait_gate(port).await?;
        let bearer = auth.then_some(hot.as_str());
        let result = load_with(
            args,
            &format!("http://127.0.0.1:{port}/send"),
            202,
            duration,
            bearer,
        )
        .await?;
        let _ = sender.kill().await;
        let name = if auth {
            "warren-sender (quorum, WARREN_AUTH=required, hot monthly token)"
        } else {
            "warren-sender (quorum, WARREN_AUTH=off)"
        };
        rows.push((name.into(), result));
    }

    eprintln!(
        "two senders racing one token of {} uses...",
        args.race_limit
    );
    let (race, secret) = store
        .create_token(&token(Limit::MaxUses(args.race_limit)))
        .await?;
    let queue = unique_name("bench-race");
    let (mut a, port_a) = start_sender(&queue, true)?;
    let (mut b, port_b) = start_sender(&queue, true)?;
    for port in [port_a, port_b] {
        wait_http(&format!("http://127.0.0.1:{port}/readyz")).await?;
        wait_gate(port).await?;
    }
    let url_a = format!("http://127.0.0.1:{port_a}/send");
    let url_b = format!("http://127.0.0.1:{port_b}/send");
    let (ra, rb) = tokio::join!(
        load_with(args, &url_a, 202, duration, Some(secret.as_str())),
        load_with(args, &url_b, 202, duration, Some(secret.as_str())),
    );
    let (ra, rb) = (ra?, rb?);
    eprintln!(
        "race: {} + {} answered 202 by the two senders",
        ra.ok, rb.ok
    );
    let accepted = ready_count(amqp_url, &queue).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let used = store.token(race.id).await?.used;
    let _ = a.kill().await;
    let _ = b.kill().await;
    Ok((u64::from(accepted), args.race_limit, used))
}

/// Waits until a sender with auth on can check tokens (an unknown token gets 401, not 503).
async fn wait_gate(port: u16) -> anyhow::Result<()> {
    let unknown = warren_tokens::secret::Secret::generate()?;
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let answer = client
            .post(format!("http://127.0.0.1:{port}/send"))
            .bearer_auth(unknown.as_str())
            .header("content-type", "application/json")
            .body(r#"{"message": "warm-up"}"#)
            .send()
            .await;
        if answer.is_ok_and(|r| r.status().as_u16() != 503) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the sender on port {port} never checked tokens")
}

/// Runs wrk with a POST script and parses its summary. Any non-2xx answer
/// or socket error counts as an error.
async fn wrk_load(
    wrk: &PathBuf,
    url: &str,
    concurrency: usize,
    duration: Duration,
    bearer: Option<&str>,
) -> anyhow::Result<LoadResult> {
    let dir = std::env::temp_dir().join(format!("warren-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let script = dir.join(format!("post-{}.lua", free_port()?));
    let mut lua = "wrk.method = \"POST\"\nwrk.body = '{\"message\": \"Hello RabbitMQ!.....\"}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n".to_string();
    if let Some(token) = bearer {
        lua.push_str(&format!(
            "wrk.headers[\"Authorization\"] = \"Bearer {token}\"\n"
        ));
    }
    std::fs::write(&script, lua)?;
    let output = Command::new(wrk)
        .args([
            "-t",
            "2",
            "-c",
            &concurrency.to_string(),
            "-d",
            &format!("{}s", duration.as_secs()),
            "--latency",
            "-s",
        ])
        .arg(&script)
        .arg(url)
        .output()
        .await
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    parse_wrk(&text, duration).with_context(|| format!("parsing wrk output:\n{text}"))
}

fn parse_wrk(text: &str, duration: Duration) -> anyhow::Result<LoadResult> {
    let duration_of = |value: &str| -> Option<Duration> {
        let value = value.trim();
        let (number, scale) = if let Some(v) = value.strip_suffix("us") {
            (v, 1e-6)
        } else if let Some(v) = value.strip_suffix("ms") {
            (v, 1e-3)
        } else if let Some(v) = value.strip_suffix('s') {
            (v, 1.0)
        } else {
            return None;
        };
        number
            .parse::<f64>()
            .ok()
            .map(|n| Duration::from_secs_f64(n * scale))
    };
    let mut total = None;
    let mut errors = 0usize;
    let mut p50 = None;
    let mut p99 = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.split(" requests in ").next()
            && line.contains(" requests in ")
        {
            total = rest.trim().parse::<usize>().ok();
        }
        if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<usize>().unwrap_or(0);
        }
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            errors += rest
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<usize>().ok())
                .sum::<usize>();
        }
        if let Some(rest) = line.strip_prefix("50%") {
            p50 = duration_of(rest);
        }
        if let Some(rest) = line.strip_prefix("99%") {
            p99 = duration_of(rest);
        }
    }
    let total = total.context("no request count")?;
    Ok(LoadResult {
        ok: total.saturating_sub(errors),
        errors,
        seconds: duration.as_secs_f64(),
        latencies: Vec::new(),
        reported: Some((p50.context("no p50")?, p99.context("no p99")?)),
    })
}

/// `concurrency` clients POSTing jobs for `duration`.
async fn http_load(
    url: &str,
    expect: u16,
    concurrency: usize,
    duration: Duration,
    bearer: Option<&str>,
) -> LoadResult {
    let authorization = Arc::new(bearer.map(|t| format!("Bearer {t}")));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_default();
    let url = Arc::new(url.to_string());
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let client = client.clone();
        let url = url.clone();
        let authorization = authorization.clone();
        tasks.push(tokio::spawn(async move {
            let mut ok = 0usize;
            let mut errors = 0usize;
            let mut latencies = Vec::new();
            let body = json!({"message": "Hello RabbitMQ!....."}).to_string();
            while Instant::now() < deadline {
                let sent = Instant::now();
                let mut request = client
                    .post(url.as_str())
                    .header("content-type", "application/json")
                    .body(body.clone());
                if let Some(authorization) = authorization.as_deref() {
                    request = request.header("authorization", authorization);
                }
                let response = request.send().await;
                match response {
                    Ok(r) if r.status().as_u16() == expect => {
                        let _ = r.bytes().await;
                        ok += 1;
                        latencies.push(sent.elapsed());
                    }
                    _ => errors += 1,
                }
            }
            (ok, errors, latencies)
        }));
    }
    let mut result = LoadResult {
        ok: 0,
        errors: 0,
        seconds: 0.0,
        latencies: Vec::new(),
        reported: None,
    };
    for task in tasks {
        if let Ok((ok, errors, latencies)) = task.await {
            result.ok += ok;
            result.errors += errors;
            result.latencies.extend(latencies);
        }
    }
    result.seconds = started.elapsed().as_secs_f64();
    result.latencies.sort();
    result
}

/// Fills a queue with zero-work jobs, starts one worker and times the drain.
async fn worker_rate(args: &Args, url: &str, prefetch: u16) -> anyhow::Result<f64> {
    let queue = unique_name("bench-worker");
    let connection = Connection::connect(url, ConnectionProperties::default()).await?;
    Topology::new(vec![queue.clone()], QueueType::Quorum)
        .declare(&connection)
        .await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for _ in 0..args.worker_jobs {
        let body = Envelope::new("zero work", Default::default()).to_bytes();
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?;
    }
    channel.wait_for_confirms().await?;
    let port = free_port()?;
    let started = Instant::now();
    let mut worker = spawn(
        Command::new(&args.worker_bin)
            .env("AMQP_URL", url)
            .env("WARREN_QUEUE", &queue)
            .env("WARREN_PREFETCH", prefetch.to_string())
            .env("WARREN_SECONDS_PER_DOT", "0")
            .env("WARREN_LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("WARREN_LOG", "warn"),
    )?;
    let client = reqwest::Client::new();
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let processed = match client.get(&metrics_url).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
        .lines()
        .find(|l| l.starts_with("warren_worker_jobs_processed_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
        if processed as usize >= args.worker_jobs {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the worker processed only {processed} of {} jobs in 300 s",
                args.worker_jobs
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = args.worker_jobs as f64 / started.elapsed().as_secs_f64();
    let _ = worker.kill().await;
    let _ = connection.close(200, "bye".into()).await;
    Ok(rate)
}

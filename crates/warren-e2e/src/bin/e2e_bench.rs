//! e2e-bench: the controller's figures, end to end, on this machine.
//!
//! ```text
//! make local-up    # parts 1-3 run on the local cluster
//! make e2e-bench   # [BENCH_ARGS="--trials 20 --quick"]
//! ```
//!
//! Prints:
//! 1. reaction latency from a burst landing in the queue (the sender's first
//!    202, i.e. the first publish confirm) to the scale patch, p50/p95 over
//!    repeated trials at pollingIntervalSeconds 1 — from zero replicas (AMQP
//!    passive declare) and from one running replica (management API, which
//!    lags by the node's `collect_statistics_interval`, RabbitMQ's default
//!    5 s unless `--stats-ms` says otherwise); from zero also burst → first
//!    new worker pod Ready → first job acked;
//! 2. jobs lost / interrupted / redelivered over `--scale-ins` scale-ins,
//!    drain time of a burst vs the ideal for the replica count;
//! 3. controller RSS;
//! 4. broker and apiserver requests per tick with 1, 100 and 1000 QueueScalers
//!    on one vhost, the controller binary against a private kube-apiserver
//!    (`warren_testkit::ControlPlane`; localcluster from `make local-build`):
//!    management requests counted by a proxy in front of the management port;
//!    AMQP passive declares from the controller's metrics; apiserver requests
//!    from the apiserver's own `apiserver_request_total` (the kinds the
//!    controller uses); the controller's CPU per tick and RSS.
//!
//! Parts 1–3 run on the local cluster named by `WARREN_E2E_CLUSTER` (`make
//! e2e-bench` sets it to the state directory of `make local-up`): the chart's
//! controller and workers as pods, replicas by the real ReplicaSet
//! controller. Without it they fail at once (`--fleet-only` runs part 4
//! alone, which needs no cluster: it starts its own private control planes).

use std::ffi::OsString;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;
use warren_e2e::{
    Binaries, CountingProxy, Harness, HarnessOptions, JobKind, NAMESPACE, Process, SECRET,
    base_spec, deployment_object, percentile, scaler_object,
};
use warren_testkit::{
    ControlPlane, RabbitNode, RabbitOptions, controller_requests_between, cpu_seconds,
};

struct Options {
    trials: usize,
    scaler_counts: Vec<usize>,
    stats_ms: u64,
    window_secs: u64,
    fleet_only: bool,
    scale_ins: usize,
    drains: usize,
}

fn parse_options() -> anyhow::Result<Options> {
    let mut options = Options {
        trials: 20,
        scaler_counts: vec![1, 100, 1000],
        stats_ms: 5000,
        window_secs: 10,
        fleet_only: false,
        scale_ins: 50,
        drains: 1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--trials" => options.trials = value("--trials")?.parse()?,
            "--scalers" => {
                options.scaler_counts = value("--scalers")?
                    .split(',')
                    .map(|n| n.trim().parse::<usize>())
                    .collect::<Result<_, _>>()?
            }
            "--stats-ms" => options.stats_ms = value("--stats-ms")?.parse()?,
            "--window" => options.window_secs = value("--window")?.parse()?,
            "--fleet-only" => options.fleet_only = true,
            "--scale-ins" => options.scale_ins = value("--scale-ins")?.parse()?,
            "--drains" => options.drains = value("--drains")?.parse()?,
            "--quick" => {
                options.trials = 5;
                options.scaler_counts = vec![1, 100];
                options.window_secs = 5;
                options.scale_ins = 10;
            }
            "-h" | "--help" => {
                println!(
                    "e2e-bench [--trials N] [--scalers 1,100,1000] [--stats-ms 5000] [--window 10] [--scale-ins 50] [--drains 1] [--quick] [--fleet-only]\n\
                     Parts 1-3 run on the local cluster named by WARREN_E2E_CLUSTER (`make local-up`, then\n\
                     `make e2e-bench`, which sets it); --fleet-only (part 4, private control planes) needs none.\n\
                     Build the binaries first: cargo build --release --bins"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(options)
}

/// A pseudo-random delay in [0, 1 s) so trials land at every phase of the
/// polling tick.
fn jitter(i: usize) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    let mixed = nanos
        .wrapping_mul(6364136223846793005)
        .wrapping_add((i as u64).wrapping_mul(1442695040888963407));
    Duration::from_millis((mixed >> 33) % 1000)
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn latency_row(name: &str, values: &[Duration], target: Option<Duration>) -> String {
    let p50 = percentile(values, 50.0).unwrap_or_default();
    let p95 = percentile(values, 95.0).unwrap_or_default();
    let max = values.iter().max().copied().unwrap_or_default();
    let verdict = match target {
        Some(t) if p95 < t => format!("p95 < {} ✔", ms(t)),
        Some(t) => format!("p95 ≥ {} ✘", ms(t)),
        None => "—".into(),
    };
    format!(
        "| {name} | {} | {} | {} | {} | {verdict} |",
        values.len(),
        ms(p50),
        ms(p95),
        ms(max)
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = parse_options()?;
    let binaries = Binaries::locate()?;
    println!("# warren end-to-end benchmark\n");
    println!(
        "binaries: {}\nmachine: {} CPUs; RabbitMQ collect_statistics_interval {} ms; pollingIntervalSeconds 1\n",
        binaries
            .controller
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        options.stats_ms
    );

    if !options.fleet_only {
        if warren_e2e::cluster::cluster_state_dir().is_none() {
            bail!(
                "parts 1-3 run on the local cluster: start it with `make local-up` and run \
                 `make e2e-bench` (it sets {}), or pass --fleet-only for part 4 alone",
                warren_e2e::CLUSTER_ENV
            );
        }
        scaling(&options).await?;
    }
    println!(
        "\n## Broker and apiserver requests per tick as scalers grow (one vhost, 1 s polling, a private kube-apiserver)\n"
    );
    println!(
        "| scalers | management HTTP / tick (proxy) | by path | AMQP passive declares / tick | all broker requests / tick (controller metrics) | apiserver requests / tick (apiserver_request_total) | per scaler per reconcile | controller CPU ms / tick | controller RSS |\n|---|---|---|---|---|---|---|---|---|"
    );
    let node = RabbitNode::start(RabbitOptions {
        management: true,
        stats_interval_ms: options.stats_ms,
        ..RabbitOptions::default()
    })
    .await?;
    for &n in &options.scaler_counts {
        match scaler_fleet(&binaries, &node, n, options.window_secs).await {
            Ok(row) => println!("{row}"),
            Err(err) => println!("| {n} | failed: {} | | | | | | | |", one_line(&err)),
        }
    }
    Ok(())
}

/// Reaction, drain and memory against one scaler and real workers.
async fn scaling(options: &Options) -> anyhow::Result<()> {
    let h = Harness::start(
        HarnessOptions {
            seconds_per_dot: 0.01,
            stats_interval_ms: options.stats_ms,
            ..HarnessOptions::default()
        }
        .scaler(|s| {
            s.max_replicas = 4;
            s.messages_per_replica = 5;
            s.behavior.scale_down.stabilization_window_seconds = 1;
            s.behavior.cooldown_seconds = 1;
        }),
    )
    .await?;
    h.wait_replicas(0, Duration::from_secs(10)).await?;

    println!("## Reaction: burst in the queue → scale patch\n");
    println!("| from | trials | p50 | p95 | max | target |\n|---|---|---|---|---|---|");
    let mut end_to_end = None;
    match from_zero(&h, options.trials).await {
        Ok(values) => {
            println!(
                "{}",
                latency_row(
                    "0 replicas (activation, AMQP passive declare)",
                    &values.patch,
                    Some(Duration::from_secs(1))
                )
            );
            end_to_end = Some(values);
        }
        Err(err) => println!("| 0 replicas | failed: {} | | | | |", one_line(&err)),
    }
    match from_one(&h, options.trials.div_ceil(4)).await {
        Ok(values) => println!(
            "{}",
            latency_row(
                "1 running replica (scale-up, management API)",
                &values,
                None
            )
        ),
        Err(err) => println!("| 1 running replica | failed: {} | | | | |", one_line(&err)),
    }
    if let Some(values) = end_to_end.filter(|v| !v.acked.is_empty()) {
        println!("\n## From zero, end to end: burst → new worker pod Ready → first job acked\n");
        println!("| step | trials | p50 | p95 | max | target |\n|---|---|---|---|---|---|");
        println!(
            "{}",
            latency_row("burst → first new pod Ready", &values.ready, None)
        );
        println!(
            "{}",
            latency_row("burst → first job acked", &values.acked, None)
        );
    }
    println!();
    match scale_in_churn(&h, options.scale_ins).await {
        Ok(table) => println!("{table}"),
        Err(err) => println!("## Scale-ins under load\n\nfailed: {}\n", one_line(&err)),
    }
    for i in 0..options.drains.max(1) {
        match drain(&h, i).await {
            Ok(table) => println!("{table}"),
            Err(err) => println!("## Drain and safety\n\nfailed: {}\n", one_line(&err)),
        }
        eprintln!("drain {} of {}", i + 1, options.drains.max(1));
    }
    match h.controller_memory() {
        Some(rss) => println!(
            "## Controller memory\n\n| while | RSS | peak RSS |\n|---|---|---|\n| scaling one target (after the runs above) | {} | {} |",
            mib(rss.rss_kib),
            mib(rss.peak_kib)
        ),
        None => println!("## Controller memory\n\nthe controller is not running"),
    }
    drop(h);

    Ok(())
}

/// The first line of an error (a harness timeout carries pages of diagnostics).
fn one_line(err: &anyhow::Error) -> String {
    format!("{err:#}")
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Per trial from zero: burst → scale patch, burst → first new pod Ready,
/// burst → first job acked.
#[derive(Default)]
struct FromZero {
    patch: Vec<Duration>,
    ready: Vec<Duration>,
    acked: Vec<Duration>,
}

/// From zero: 10 instant jobs; the target wakes (AMQP passive declare),
/// drains, and returns to 0 before the next trial.
async fn from_zero(h: &Harness, trials: usize) -> anyhow::Result<FromZero> {
    let mut values = FromZero::default();
    let since = |at: chrono::DateTime<chrono::Utc>, from: chrono::DateTime<chrono::Utc>| {
        Duration::from_millis(u64::try_from((at - from).num_milliseconds()).unwrap_or(0))
    };
    for i in 0..trials {
        tokio::time::sleep(jitter(i)).await;
        let before = Instant::now();
        let burst = h.send_burst(10, 0).await?;
        let change = h
            .wait_change(before, Duration::from_secs(15), "activation", |c| {
                c.from == Some(0) && c.to > 0
            })
            .await?;
        values
            .patch
            .push(change.at.saturating_duration_since(burst.first_confirm));
        h.wait_jobs_done(&burst.ids, Duration::from_secs(30))
            .await?;
        // Workers consume before their first readiness probe passes, so the
        // jobs may be done before any new pod is Ready (or the pod is gone).
        let ready_deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < ready_deadline {
            if let Some(ready) = h.first_worker_ready_since(burst.first_confirm_wall) {
                values.ready.push(since(ready, burst.first_confirm_wall));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let first_ack = h
            .job_log()
            .events
            .iter()
            .filter(|e| e.kind == JobKind::Done && burst.ids.contains(&e.id))
            .filter_map(|e| e.at)
            .min();
        if let Some(acked) = first_ack {
            values.acked.push(since(acked, burst.first_confirm_wall));
        }
        h.wait_replicas(0, Duration::from_secs(30)).await?;
        h.wait_pods_ready(0, Duration::from_secs(30)).await?;
        eprintln!("from zero, trial {}: {}", i + 1, ms(values.patch[i]));
    }
    Ok(values)
}

/// Scale-ins while jobs run: each round queues 8 jobs of 1.5 s,
/// waits for at least 2 replicas, lowers maxReplicas to 1 (a scale-in that
/// the ReplicaSet controller carries out on busy and idle pods), then raises
/// it back to 4; after `rounds` scale-ins, the accounting of every job.
async fn scale_in_churn(h: &Harness, rounds: usize) -> anyhow::Result<String> {
    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..rounds {
        let burst = h.send_burst(8, 150).await?;
        ids.extend(burst.ids);
        if h.recorder.current().unwrap_or(0) < 2 {
            h.wait_value_at_least(2, Duration::from_secs(30)).await?;
        }
        let lowered = Instant::now();
        h.patch_scaler_spec(json!({"maxReplicas": 1})).await?;
        h.wait_change(lowered, Duration::from_secs(30), "the scale-in to 1", |c| {
            c.to == 1
        })
        .await?;
        h.patch_scaler_spec(json!({"maxReplicas": 4})).await?;
        eprintln!("scale-in round {} of {rounds}", i + 1);
    }
    h.wait_jobs_done(&ids, Duration::from_secs(180)).await?;
    let scale_ins = h
        .recorder
        .history()
        .iter()
        .filter(|c| c.at >= started && c.from.is_some_and(|f| f > c.to))
        .count();
    let report = h.report();
    let log = h.job_log();
    let (judged, violations) = h.scale_in_cost_violations()?;
    let exits = h.exits();
    let victims = exits.iter().filter(|e| e.sigterm_sent).count();
    let killed = exits.iter().filter(|e| e.sigkill_sent).count();
    Ok(format!(
        "## Scale-ins while jobs run (local cluster)\n\n\
         | measure | value |\n|---|---|\n\
         | rounds (8 jobs × 1.5 s queued, ≥ 2 replicas, then maxReplicas 4 → 1 → 4) | {rounds} |\n\
         | scale-ins (Deployment replica decreases) | {scale_ins} |\n\
         | pods stopped by a scale-in (SIGTERM) / of them SIGKILLed after the grace period | {victims} / {killed} |\n\
         | Ready victims judged by deletion cost / not the lowest cost | {judged} / {} |\n\
         | busy pods sent SIGTERM by a scale-in | {} |\n\
         | jobs sent / done (all phases) | {} / {} |\n\
         | jobs interrupted (all phases) | {} |\n\
         | jobs redelivered (all phases) | {} |\n\
         | jobs lost (all phases) | {} |\n",
        violations.len(),
        log.busy_at_sigterm().len(),
        report.sent,
        report.done,
        report.interrupted.len(),
        report.redelivered.len(),
        report.lost.len(),
    ))
}

/// From one running replica (minReplicas 1): 20 jobs of 1 s, so the burst
/// outlives the management API's lag; the target grows to 4.
async fn from_one(h: &Harness, trials: usize) -> anyhow::Result<Vec<Duration>> {
    h.patch_scaler_spec(json!({"minReplicas": 1})).await?;
    h.wait_replicas(1, Duration::from_secs(15)).await?;
    h.wait_pods_ready(1, Duration::from_secs(30)).await?;
    let mut values = Vec::new();
    for i in 0..trials {
        // Let the management counts settle on the idle queue.
        tokio::time::sleep(Duration::from_secs(10) + jitter(i)).await;
        let before = Instant::now();
        let burst = h.send_burst(20, 100).await?;
        let change = h
            .wait_change(before, Duration::from_secs(30), "scale-up from 1", |c| {
                c.from == Some(1) && c.to > 1
            })
            .await?;
        values.push(change.at.saturating_duration_since(burst.first_confirm));
        h.wait_jobs_done(&burst.ids, Duration::from_secs(60))
            .await?;
        h.wait_replicas(1, Duration::from_secs(60)).await?;
        h.wait_pods_ready(1, Duration::from_secs(30)).await?;
        eprintln!("from one, trial {}: {}", i + 1, ms(values[i]));
    }
    h.patch_scaler_spec(json!({"minReplicas": 0})).await?;
    Ok(values)
}

/// Drain: 40 jobs of 0.5 s from zero with up to 4 replicas; then the
/// accounting of every job of every phase.
///
/// The drain is printed three ways, each against the same ideal (every job
/// on one of `maxReplicas` replicas from the first instant): from the
/// burst (the first publish confirm: what a client waits, and the figure
/// the issue's bar names), from the first new worker pod Ready, and from the
/// first job a new pod started. The last two leave out the pods' start
/// (scheduling, process start, readiness probe), which is the node's, not
/// the scaler's; workers consume before their first readiness probe passes,
/// so "from Ready" can leave out work already done.
///
/// The burst lands at a pseudo-random phase of the scaler's polling tick
/// (`jitter`, as in the reaction trials): waiting a whole number of seconds
/// after the scale to zero, which came at a tick, put every burst just after
/// a tick, so each drain waited ~0.95 s for its scale patch (the worst case;
/// the runs of 2026-11-30 15:03–15:31, before this jitter).
async fn drain(h: &Harness, round: usize) -> anyhow::Result<String> {
    h.wait_replicas(0, Duration::from_secs(60)).await?;
    h.wait_pods_ready(0, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(10) + jitter(round)).await;
    let drain_jobs = 40usize;
    let dots = 50usize;
    let job_secs = dots as f64 * 0.01;
    let max_replicas = 4usize;
    let burst = h.send_burst(drain_jobs, dots).await?;
    h.wait_jobs_done(&burst.ids, Duration::from_secs(120))
        .await?;
    let log = h.job_log();
    let last = log
        .last_done_at(&burst.ids)
        .context("timestamps of the drained jobs")?;
    let first_started = log
        .events
        .iter()
        .filter(|e| e.kind == JobKind::Started && burst.ids.contains(&e.id))
        .filter_map(|e| e.at)
        .min();
    // A pod's first readiness probe can pass after the jobs are done.
    let mut first_ready = h.first_worker_ready_since(burst.first_confirm_wall);
    let ready_deadline = Instant::now() + Duration::from_secs(8);
    while first_ready.is_none() && Instant::now() < ready_deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        first_ready = h.first_worker_ready_since(burst.first_confirm_wall);
    }
    let secs =
        |from: chrono::DateTime<chrono::Utc>| (last - from).num_milliseconds() as f64 / 1000.0;
    let ideal = drain_jobs.div_ceil(max_replicas) as f64 * job_secs;
    let drained = secs(burst.first_confirm_wall);
    let row = |what: &str, from: Option<chrono::DateTime<chrono::Utc>>| match from {
        Some(from) if from > last => {
            format!("| drain from {what} | after the last job was done | — |")
        }
        Some(from) => format!(
            "| drain from {what} (+{:.2} s after the burst) | {:.2} s | {:.2}× |",
            (from - burst.first_confirm_wall).num_milliseconds() as f64 / 1000.0,
            secs(from),
            secs(from) / ideal
        ),
        None => format!("| drain from {what} | not seen | — |"),
    };
    let patched = h
        .recorder
        .history()
        .iter()
        .find(|c| c.at >= burst.first_confirm && c.from == Some(0) && c.to > 0)
        .map(|c| ms(c.at.saturating_duration_since(burst.first_confirm)))
        .unwrap_or_else(|| "not seen".into());
    let from_ready = row("the first new worker pod Ready", first_ready);
    let from_started = row("the first job started by a new pod", first_started);
    h.wait_replicas(0, Duration::from_secs(60)).await?;
    h.wait_pods_ready(0, Duration::from_secs(30)).await?;
    let report = h.report();
    let log = h.job_log();
    let scale_ins = h
        .recorder
        .history()
        .iter()
        .filter(|c| c.from.is_some_and(|f| f > c.to))
        .count();
    Ok(format!(
        "## Drain and safety\n\n\
         burst: {drain_jobs} jobs × {job_secs:.1} s from zero, maxReplicas {max_replicas}, messagesPerReplica 5; \
         ideal = every job on one of {max_replicas} replicas from the first instant = {ideal:.2} s. \
         The bar (≤ 1.3× the ideal) is judged on the first row: from the burst, pod start included.\n\n\
         | drain | time | ratio to the ideal |\n|---|---|---|\n\
         | drain from the burst (first confirm → last job done; the bar's figure) | {drained:.2} s | {:.2}× |\n\
         {from_ready}\n\
         {from_started}\n\n\
         | measure | value |\n|---|---|\n\
         | burst → scale patch (the wait for the scaler's tick, then its patch) | {patched} |\n\
         | jobs sent in all phases | {} |\n\
         | scale-ins in all phases | {scale_ins} |\n\
         | busy pods sent SIGTERM by a scale-in (all phases) | {} |\n\
         | jobs interrupted by scale-in (all phases) | {} |\n\
         | redeliveries (all phases) | {} |\n\
         | jobs lost (all phases) | {} |\n",
        drained / ideal,
        report.sent,
        log.busy_at_sigterm().len(),
        report.interrupted.len(),
        report.redelivered.len(),
        report.lost.len(),
    ))
}

/// `n` scalers on `n` queues of one vhost, each targeting its own Deployment
/// at zero replicas, on a private control plane; one controller; requests
/// counted over `window_secs`.
async fn scaler_fleet(
    binaries: &Binaries,
    node: &RabbitNode,
    n: usize,
    window_secs: u64,
) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let plane = ControlPlane::start()
        .await
        .context("a private control plane (make local-build builds localcluster)")?;
    let client = plane.client().await?;
    let kubeconfig = plane.kubeconfig();
    let proxy = CountingProxy::start(&node.management_url()).await?;
    let connection = lapin::Connection::connect(&node.amqp_url(), Default::default()).await?;
    let channel = connection.create_channel().await?;
    let prefix = warren_testkit::unique_name("fleet");
    let mut deployments = Vec::new();
    let mut scalers = Vec::new();
    for i in 0..n {
        let queue = format!("{prefix}-{i}");
        channel
            .queue_declare(
                queue.as_str().into(),
                Default::default(),
                Default::default(),
            )
            .await?;
        let target = format!("target-{i}");
        deployments.push(deployment_object(&target, 0, 30));
        let mut spec = base_spec(
            &queue,
            &proxy.url(),
            &format!("amqp://127.0.0.1:{}", node.amqp_port()),
        );
        spec.scale_target_ref.name = target;
        scalers.push(scaler_object(&format!("scaler-{i}"), spec)?);
    }
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": SECRET, "namespace": NAMESPACE},
        "data": {"username": "Z3Vlc3Q=", "password": "Z3Vlc3Q="},
    });
    ControlPlane::create_all(&client, vec![secret]).await?;
    ControlPlane::create_all(&client, deployments).await?;
    ControlPlane::create_all(&client, scalers).await?;
    let scaler_api: kube::Api<warren_crd::QueueScaler> =
        kube::Api::namespaced(client.clone(), NAMESPACE);
    let vars: Vec<(OsString, OsString)> = [
        ("KUBECONFIG", kubeconfig.display().to_string()),
        ("POD_NAME", format!("bench-controller-{n}")),
        ("POD_NAMESPACE", NAMESPACE.to_string()),
        ("WARREN_LEADER_ELECTION", "false".to_string()),
        ("WARREN_LOG_FORMAT", "json".to_string()),
        ("WARREN_LOG", "warn".to_string()),
        ("AMQP_URL", node.amqp_url()),
    ]
    .into_iter()
    .map(|(k, v)| (OsString::from(k), OsString::from(v)))
    .collect();
    let mut controller = Process::spawn(
        &binaries.controller,
        &format!("controller-{n}"),
        &vars,
        &dir.path().join("logs"),
    )?;
    controller
        .wait_http_ok("/healthz", Duration::from_secs(30))
        .await?;

    // Warm-up: every scaler reconciled at least once.
    let started = Instant::now();
    loop {
        let observed = scaler_api
            .list(&Default::default())
            .await?
            .items
            .iter()
            .filter(|o| o.status.as_ref().is_some_and(|s| s.observation.is_some()))
            .count();
        if observed == n {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "only {observed} of {n} scalers reconciled after 120 s; controller log:\n{}",
                controller.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let warm_up = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;

    proxy.reset();
    let metrics_before = controller.metrics().await?;
    let apiserver_before = plane.metrics(&client).await?;
    let cpu_before = cpu_seconds(&controller.pid().to_string()).unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(window_secs)).await;
    let metrics_after = controller.metrics().await?;
    let apiserver_after = plane.metrics(&client).await?;
    let cpu = cpu_seconds(&controller.pid().to_string()).unwrap_or_default() - cpu_before;
    let mut api_kinds: Vec<(String, f64)> =
        controller_requests_between(&apiserver_before, &apiserver_after)
            .into_iter()
            .collect();
    let api_requests = api_kinds.iter().fold(0.0, |sum, (_, v)| sum + v);
    api_kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
    let counts = proxy.counts();
    let ticks = window_secs as f64;
    let reconciles = metrics_after.sum_or_zero("warren_controller_reconciles_total", &[])
        - metrics_before.sum_or_zero("warren_controller_reconciles_total", &[]);

    let name = "warren_controller_broker_requests_total";
    let delta = |label: &str| {
        metrics_after.sum_or_zero(name, &[("request", label)])
            - metrics_before.sum_or_zero(name, &[("request", label)])
    };
    let all_broker = metrics_after.sum_or_zero(name, &[]) - metrics_before.sum_or_zero(name, &[]);
    let by_path = counts
        .iter()
        .map(|(k, v)| format!("{k}: {:.1}", *v as f64 / ticks))
        .collect::<Vec<_>>()
        .join("; ");
    let memory = controller.memory();
    let row = format!(
        "| {n} | {:.1} | {} | {:.1} | {:.1} | {:.1} ({}) | {:.3} ({reconciles:.0} reconciles) | {:.1} | {} (warm-up {:.1} s) |",
        proxy.total() as f64 / ticks,
        if by_path.is_empty() {
            "—".into()
        } else {
            by_path
        },
        delta("passive_declare") / ticks,
        all_broker / ticks,
        api_requests / ticks,
        if api_kinds.is_empty() {
            "none".to_string()
        } else {
            api_kinds
                .iter()
                .take(3)
                .map(|(k, v)| format!("{k}: {:.2}", v / ticks))
                .collect::<Vec<_>>()
                .join("; ")
        },
        api_requests / reconciles.max(1.0),
        cpu * 1000.0 / ticks,
        memory.map(|m| mib(m.rss_kib)).unwrap_or_else(|| "?".into()),
        warm_up.as_secs_f64(),
    );
    let _ = controller.signal(nix::sys::signal::Signal::SIGTERM);
    controller.wait_exit(Duration::from_secs(10)).await;
    let _ = connection.close(200, "bench done".into()).await;
    Ok(row)
}

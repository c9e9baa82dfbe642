//! Controller cost per tick as QueueScalers grow (prints figures; not a test).
//!
//! ```text
//! cargo build --release -p warren-controller --bins --examples
//! target/release/examples/tick_bench            # or: cargo run --release -p warren-controller --example tick_bench
//! ```
//!
//! Starts a private RabbitMQ node with the management plugin and, for each
//! scaler count N (default 1, 100, 1000), a vhost `bench-N` with N queues.
//!
//! A. In process: N scalers read their queue through the real
//!    [`QueueObserver`] (Secret cache → [`QueueStatsHub`] → management API,
//!    and a passive declare per scaler on the pooled AMQP channel) once per
//!    tick, concurrently, as N reconciles would. Prints management requests
//!    per tick (`ManagementClient::requests_sent`), passive declares and
//!    AMQP connections, tick latency, and this process's CPU time per tick
//!    and RSS.
//! B. The `warren-controller` binary against a real kube-apiserver — a
//!    private control plane (`warren_testkit::ControlPlane`, localcluster
//!    built by `make local-build`), through KUBECONFIG — with N QueueScalers
//!    and N Deployments at 1 replica: reconciles per second, broker requests
//!    per tick (from its /metrics), Kubernetes API requests per tick (the
//!    apiserver's own `apiserver_request_total`), the controller's CPU time per tick
//!    and RSS (from /proc/<pid>), and the time from a burst landing in a
//!    queue to the scale patch over `--bursts` bursts (p50 / p95 / max),
//!    each published at a different phase of the polling tick.
//!    `--controller-bin` runs another build (e.g. an older one) for a
//!    before/after comparison.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::{ListParams, PostParams};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::json;
use warren_controller::observe::credentials::CredentialsCache;
use warren_controller::observe::management::{
    Credentials, ManagementClient, ManagementConfig, ManagementEndpoint, QueueStatsHub,
};
use warren_controller::observe::peek::QueuePeeker;
use warren_controller::observe::{BrokerObserver, BrokerTarget, QueueObserver};
use warren_crd::QueueScaler;
use warren_crd::{BrokerRef, CredentialsSecretRef, QueueRef};
use warren_testkit::{
    ControlPlane, RabbitNode, RabbitOptions, controller_requests_between, cpu_seconds,
};

#[derive(Debug, Parser)]
#[command(about = "Controller cost per tick with 1, 100, 1000 QueueScalers")]
struct Args {
    /// Scaler counts to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    scalers: Vec<usize>,
    /// Ticks measured per scaler count in part A.
    #[arg(long, default_value_t = 5)]
    ticks: u32,
    /// Tick length in part A (the polling interval), in milliseconds.
    #[arg(long, default_value_t = 1000)]
    tick_ms: u64,
    /// RabbitMQ `collect_statistics_interval` in milliseconds.
    #[arg(long, default_value_t = 1000)]
    stats_interval_ms: u64,
    /// The controller binary for part B (default: next to this example's
    /// directory, i.e. target/<profile>/warren-controller).
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// Measurement window of part B, in seconds.
    #[arg(long, default_value_t = 10)]
    window_seconds: u64,
    /// Run only part A.
    #[arg(long)]
    skip_binary: bool,
    /// Run only part B (e.g. to measure another build with --controller-bin).
    #[arg(long)]
    skip_in_process: bool,
    /// Bursts measured per scaler count in part B.
    #[arg(long, default_value_t = 20)]
    bursts: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    warren_telemetry::install_crypto_provider();
    let args = Args::parse();
    let controller_bin = match (&args.controller_bin, args.skip_binary) {
        (_, true) => None,
        (Some(path), false) => Some(path.clone()),
        (None, false) => Some(default_controller_bin()?),
    };
    if let Some(bin) = &controller_bin
        && !bin.exists()
    {
        bail!(
            "{} not found: build it with `cargo build --release -p warren-controller --bins`, pass --controller-bin, or --skip-binary",
            bin.display()
        );
    }

    eprintln!("starting a private RabbitMQ node with the management plugin...");
    let node = RabbitNode::start(RabbitOptions {
        management: true,
        stats_interval_ms: args.stats_interval_ms,
        ..RabbitOptions::default()
    })
    .await
    .context("cannot start RabbitMQ (is rabbitmq-server installed?)")?;
    for (index, &n) in args.scalers.iter().enumerate() {
        eprintln!("creating vhost {} with {n} queues...", vhost(index, n));
        create_vhost(&node, &vhost(index, n), n).await?;
    }

    println!(
        "\n== A. Queue reads per tick, in process (QueueObserver -> QueueStatsHub -> management API) =="
    );
    println!(
        "{:>8} {:>14} {:>18} {:>12} {:>11} {:>12} {:>12} {:>12} {:>10}",
        "scalers",
        "mgmt req/tick",
        "per-queue req/tick",
        "peeks/tick",
        "amqp conns",
        "tick p50 ms",
        "tick max ms",
        "cpu ms/tick",
        "RSS MiB"
    );
    for (index, &n) in args.scalers.iter().enumerate() {
        if args.skip_in_process {
            println!("(skipped)");
            break;
        }
        let vhost = vhost(index, n);
        let row = part_a(
            &node,
            &vhost,
            n,
            args.ticks,
            Duration::from_millis(args.tick_ms),
        )
        .await?;
        println!(
            "{:>8} {:>14.2} {:>18} {:>12.2} {:>11} {:>12.1} {:>12.1} {:>12.2} {:>10.1}",
            n,
            row.requests_per_tick,
            n,
            row.peeks_per_tick,
            row.connections,
            row.p50_ms,
            row.max_ms,
            row.cpu_ms_per_tick,
            row.rss_mib
        );
    }

    if let Some(bin) = controller_bin {
        println!(
            "\n== B. warren-controller binary against a private kube-apiserver (pollingIntervalSeconds=1) =="
        );
        println!(
            "{:>8} {:>10} {:>13} {:>13} {:>11} {:>11} {:>12} {:>11} {:>8} {:>26} {:>13}",
            "scalers",
            "startup s",
            "reconciles/s",
            "mgmt req/tick",
            "peeks/tick",
            "amqp conns",
            "k8s req/tick",
            "cpu ms/tick",
            "RSS MiB",
            "burst->scale s p50/p95/max",
            "mgmt shows s"
        );
        for (index, &n) in args.scalers.iter().enumerate() {
            let vhost = vhost(index, n);
            let row = part_b(
                &node,
                &vhost,
                n,
                &bin,
                Duration::from_secs(args.window_seconds),
                args.bursts.max(1),
            )
            .await?;
            let reaction = format!(
                "{:.2}/{:.2}/{:.2}",
                percentile(&row.burst_to_scale_s, 0.5),
                percentile(&row.burst_to_scale_s, 0.95),
                percentile(&row.burst_to_scale_s, 1.0)
            );
            println!(
                "{:>8} {:>10.1} {:>13.1} {:>13.2} {:>11.2} {:>11} {:>12.2} {:>11.2} {:>8.1} {:>26} {:>13.2}",
                n,
                row.startup_s,
                row.reconciles_per_s,
                row.mgmt_per_tick,
                row.peeks_per_tick,
                row.amqp_connections,
                row.k8s_per_tick,
                row.cpu_ms_per_tick,
                row.rss_mib,
                reaction,
                percentile(&row.management_lag_s, 0.5)
            );
            println!("{:>8} k8s requests per tick by kind: {}", "", row.k8s_kinds);
        }
    }
    println!(
        "\nmgmt req/tick: management API requests per polling tick (one GET /api/queues/<vhost>?columns=... serves every scaler on the vhost);"
    );
    println!(
        "per-queue req/tick: what polling each queue's own endpoint would cost. ticks in B = reconciles / scalers."
    );
    println!(
        "peeks/tick: AMQP passive declares per tick (one frame pair each, on one long-lived channel); amqp conns: AMQP connections opened (B: from the controller's /metrics, n/a for builds without it)."
    );
    println!(
        "k8s req/tick: the controller's requests per tick as the apiserver's apiserver_request_total counts them (QueueScalers and their status, /scale, GET/LIST of Deployments, Events, Secrets, pod reads and patches; watches not counted). Each Deployment's pod is never run (no node): the scheduler's FailedScheduling Events (POST/PATCH events) are in the count, see the kinds."
    );
    println!(
        "burst->scale: 50 messages published (confirmed) until the Deployment's replicas change, p50/p95/max (nearest rank) over the bursts; mgmt shows: median time until the management API reports them (statistics lag)."
    );
    Ok(())
}

fn default_controller_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/tick_bench -> target/<profile>/warren-controller
    let profile_dir = exe
        .parent()
        .and_then(|examples| examples.parent())
        .context("cannot locate the target directory")?;
    Ok(profile_dir.join("warren-controller"))
}

/// One vhost per measured case, so no case sees another's messages (the
/// management API reports a purge seconds late).
fn vhost(index: usize, n: usize) -> String {
    format!("bench-{index}-{n}")
}

fn queue(i: usize) -> String {
    format!("q-{i:05}")
}

async fn create_vhost(node: &RabbitNode, vhost: &str, n: usize) -> anyhow::Result<()> {
    node.rabbitmqctl(&["add_vhost", vhost])?;
    node.rabbitmqctl(&["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"])?;
    let (_connection, channel) = connect(node, vhost).await?;
    for i in 0..n {
        channel
            .queue_declare(
                queue(i).as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

async fn connect(node: &RabbitNode, vhost: &str) -> anyhow::Result<(Connection, Channel)> {
    let url = format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", node.amqp_port());
    let connection = Connection::connect(
        &url,
        ConnectionProperties::default().with_connection_name("tick-bench".into()),
    )
    .await
    .with_context(|| format!("cannot connect to vhost {vhost}"))?;
    let channel = connection.create_channel().await?;
    Ok((connection, channel))
}

/// A private control plane holding the broker credentials' Secret.
async fn control_plane() -> anyhow::Result<(ControlPlane, kube::Client)> {
    eprintln!("starting a private Kubernetes control plane...");
    let plane = ControlPlane::start()
        .await
        .context("cannot start a private control plane (make local-build builds localcluster)")?;
    let client = plane.client().await?;
    let secret: Secret = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "warren-rabbitmq", "namespace": "default"},
               "data": {"username": "Z3Vlc3Q=", "password": "Z3Vlc3Q="}}))?;
    Api::<Secret>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &secret)
        .await?;
    Ok((plane, client))
}

/// Polls Deployment `name` until its `spec.replicas` satisfies `pred`.
async fn wait_replicas(
    api: &Api<Deployment>,
    name: &str,
    timeout: Duration,
    pred: impl Fn(i32) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(d) = api.get(name).await
            && d.spec.and_then(|s| s.replicas).is_some_and(&pred)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn broker(node: &RabbitNode) -> BrokerRef {
    BrokerRef {
        management_url: node.management_url(),
        amqp_url: format!("amqp://127.0.0.1:{}", node.amqp_port()),
        credentials_secret_ref: CredentialsSecretRef {
            name: "warren-rabbitmq".into(),
            username_key: "username".into(),
            password_key: "password".into(),
        },
    }
}

/// Nearest-rank percentile of `samples` (`q` in 0..=1); NaN when empty.
fn percentile(samples: &[f64], q: f64) -> f64 {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| !v.is_nan()).collect();
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

struct RowA {
    requests_per_tick: f64,
    peeks_per_tick: f64,
    connections: u64,
    p50_ms: f64,
    max_ms: f64,
    cpu_ms_per_tick: f64,
    rss_mib: f64,
}

async fn part_a(
    node: &RabbitNode,
    vhost: &str,
    n: usize,
    ticks: u32,
    tick: Duration,
) -> anyhow::Result<RowA> {
    let (_plane, client) = control_plane().await?;
    let management = ManagementClient::new(ManagementConfig::default())?;
    let hub = Arc::new(QueueStatsHub::new(management, tick.mul_f64(0.9)));
    let source = Arc::new(BrokerObserver::new(
        Arc::new(CredentialsCache::new(client, Duration::from_secs(600))),
        hub.clone(),
        Arc::new(QueuePeeker::new(Duration::from_secs(5))),
    ));
    let targets: Vec<BrokerTarget> = (0..n)
        .map(|i| BrokerTarget {
            namespace: "default".into(),
            broker: broker(node),
            queue: QueueRef::single(queue(i), vhost.to_string()),
        })
        .collect();

    // Warm-up tick: Secret read, HTTP connection, stats for every queue.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let failures = one_tick(&source, &targets).await;
        if failures == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{failures} of {n} queue reads still fail after 60 s");
        }
        tokio::time::sleep(tick).await;
    }
    tokio::time::sleep(tick).await;

    let requests_before = hub.client().requests_sent();
    let peeks_before = source.peeker().declares_sent();
    let cpu_before = cpu_seconds("self").context("reading this process' CPU time")?;
    let mut latencies = Vec::new();
    for _ in 0..ticks {
        let started = Instant::now();
        let failures = one_tick(&source, &targets).await;
        if failures > 0 {
            bail!("{failures} of {n} queue reads failed during the measurement");
        }
        let took = started.elapsed();
        latencies.push(took.as_secs_f64() * 1000.0);
        tokio::time::sleep(tick.saturating_sub(took)).await;
    }
    let cpu = cpu_seconds("self").context("reading this process' CPU time")? - cpu_before;
    let requests = hub.client().requests_sent() - requests_before;
    let peeks = source.peeker().declares_sent() - peeks_before;
    latencies.sort_by(f64::total_cmp);
    Ok(RowA {
        requests_per_tick: requests as f64 / f64::from(ticks),
        peeks_per_tick: peeks as f64 / f64::from(ticks),
        connections: source.peeker().connections_opened(),
        p50_ms: latencies[latencies.len() / 2],
        max_ms: latencies.last().copied().unwrap_or_default(),
        cpu_ms_per_tick: cpu * 1000.0 / f64::from(ticks),
        rss_mib: rss_mib("self")?,
    })
}

/// N concurrent reads, as N reconciles in one polling interval; returns failures.
async fn one_tick(source: &Arc<BrokerObserver>, targets: &[BrokerTarget]) -> usize {
    let reads = targets.iter().map(|t| {
        let source = source.clone();
        async move { source.observe(t).await }
    });
    futures::future::join_all(reads)
        .await
        .iter()
        .filter(|r| r.is_err())
        .count()
}

struct RowB {
    startup_s: f64,
    reconciles_per_s: f64,
    mgmt_per_tick: f64,
    peeks_per_tick: f64,
    amqp_connections: String,
    k8s_per_tick: f64,
    /// "VERB resource: per tick", most first.
    k8s_kinds: String,
    cpu_ms_per_tick: f64,
    rss_mib: f64,
    burst_to_scale_s: Vec<f64>,
    management_lag_s: Vec<f64>,
}

async fn part_b(
    node: &RabbitNode,
    vhost: &str,
    n: usize,
    bin: &PathBuf,
    window: Duration,
    bursts: u32,
) -> anyhow::Result<RowB> {
    let (plane, client) = control_plane().await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let scalers: Api<QueueScaler> = Api::namespaced(client.clone(), "default");
    let broker = serde_json::to_value(broker(node))?;
    eprintln!("creating {n} Deployments and {n} QueueScalers...");
    ControlPlane::create_all(
        &client,
        (0..n)
            .map(|i| {
                let name = format!("w-{i:05}");
                json!({"apiVersion": "apps/v1", "kind": "Deployment",
                       "metadata": {"name": name, "namespace": "default"},
                       "spec": {"replicas": 1,
                                "selector": {"matchLabels": {"app": name}},
                                "template": {"metadata": {"labels": {"app": name}},
                                             "spec": {"containers": [{"name": "w", "image": "worker"}]}}}})
            })
            .collect(),
    )
    .await?;
    ControlPlane::create_all(
        &client,
        (0..n)
            .map(|i| {
                json!({"apiVersion": "warren.dev/v1alpha1", "kind": "QueueScaler",
                       "metadata": {"name": format!("qs-{i:05}"), "namespace": "default"},
                       "spec": {"scaleTargetRef": {"name": format!("w-{i:05}")},
                                "queue": {"name": queue(i), "vhost": vhost},
                                "broker": broker,
                                "minReplicas": 1, "maxReplicas": 20, "messagesPerReplica": 5,
                                "pollingIntervalSeconds": 1,
                                // Back to 1 replica right after each burst is purged.
                                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}}}})
            })
            .collect(),
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = plane.kubeconfig();
    let log = std::fs::File::create(dir.path().join("controller.log"))?;
    let port = warren_testkit::free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let mut child = tokio::process::Command::new(bin)
        .env("KUBECONFIG", &kubeconfig)
        .env("WARREN_LISTEN_ADDR", &addr)
        .env("WARREN_LEADER_ELECTION", "false")
        .env("WARREN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let pid = child.id().context("no pid")?.to_string();

    // Startup: every scaler has a status.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let done = scalers
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|s| {
                s.status
                    .as_ref()
                    .is_some_and(|s| s.desired_replicas.is_some())
            })
            .count();
        if done == n {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {done} of {n} scalers got a status in 180 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let startup_s = started.elapsed().as_secs_f64();
    // The controller-manager has created every Deployment's pod (its writes are
    // not the controller's; the scheduler's Events about them still are counted).
    let deadline = Instant::now() + Duration::from_secs(180);
    while deployments
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .any(|d| d.status.as_ref().and_then(|s| s.replicas) != Some(1))
    {
        if Instant::now() > deadline {
            bail!("the Deployments' pods were not all created in 180 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let http = reqwest::Client::new();
    let before = scrape(&http, &addr).await?;
    let apiserver_before = plane.metrics(&client).await?;
    let cpu_before = cpu_seconds(&pid).context("reading the controller's CPU time")?;
    let window_started = Instant::now();
    tokio::time::sleep(window).await;
    let after = scrape(&http, &addr).await?;
    let apiserver_after = plane.metrics(&client).await?;
    let mut k8s_kinds: Vec<(String, f64)> =
        controller_requests_between(&apiserver_before, &apiserver_after)
            .into_iter()
            .collect();
    k8s_kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
    let k8s_requests = k8s_kinds.iter().fold(0.0, |sum, (_, v)| sum + v);
    let elapsed = window_started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(&pid).context("reading the controller's CPU time")? - cpu_before;
    let rss = rss_mib(&pid)?;

    let delta = |name: &str, label: Option<&str>| {
        sum_metric(&after, name, label) - sum_metric(&before, name, label)
    };
    let reconciles = delta("warren_controller_reconciles_total", None);
    let ticks = (reconciles / n as f64).max(1.0);
    let mgmt = delta(
        "warren_controller_broker_requests_total",
        Some("request=\"queues\""),
    );
    let peeks = delta(
        "warren_controller_broker_requests_total",
        Some("request=\"passive_declare\""),
    );

    let amqp_connections = if after.contains("warren_controller_amqp_opens_total") {
        format!(
            "{}",
            sum_metric(
                &after,
                "warren_controller_amqp_opens_total",
                Some("what=\"connection\"")
            )
        )
    } else {
        "n/a".to_string()
    };

    // Bursts -> scale patch on the first scaler (its queue starts empty).
    let (_connection, channel) = connect(node, vhost).await?;
    channel
        .queue_purge(queue(0).as_str().into(), QueuePurgeOptions::default())
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let probe = ManagementClient::new(ManagementConfig::default())?;
    let endpoint = ManagementEndpoint {
        url: node.management_url(),
        credentials: Credentials {
            username: "guest".into(),
            password: "guest".into(),
        },
    };
    let mut burst_to_scale_s = Vec::new();
    let mut management_lag_s = Vec::new();
    for burst in 0..bursts {
        // Start from 1 replica and an empty queue, as the management API
        // sees it too (else the lag probe would see the last burst).
        if !wait_replicas(&deployments, "w-00000", Duration::from_secs(60), |r| r == 1).await {
            bail!("w-00000 never went back to 1 replica after burst {burst}");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = probe
                .vhost_queues(&endpoint, vhost)
                .await
                .ok()
                .and_then(|q| q.get(&queue(0)).and_then(|q| q.messages_ready));
            if ready == Some(0) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the management API never showed {} empty", queue(0));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A different phase of the 1 s polling tick for each burst.
        let phase = u64::from(burst) * 1000 / u64::from(bursts);
        tokio::time::sleep(Duration::from_millis(phase)).await;

        // Meanwhile, how long the management API takes to show the burst.
        let lag_probe = probe.clone();
        let lag_endpoint = endpoint.clone();
        let probe_vhost = vhost.to_string();
        let burst_started = Instant::now();
        let lag = tokio::spawn(async move {
            loop {
                if let Ok(queues) = lag_probe.vhost_queues(&lag_endpoint, &probe_vhost).await
                    && queues
                        .get(&queue(0))
                        .and_then(|q| q.messages_ready)
                        .is_some_and(|ready| ready >= 50)
                {
                    return burst_started.elapsed().as_secs_f64();
                }
                if burst_started.elapsed() > Duration::from_secs(60) {
                    return f64::NAN;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        for _ in 0..50 {
            channel
                .basic_publish(
                    "".into(),
                    queue(0).as_str().into(),
                    BasicPublishOptions::default(),
                    b"job",
                    BasicProperties::default(),
                )
                .await?
                .await?;
        }
        if !wait_replicas(&deployments, "w-00000", Duration::from_secs(60), |r| r > 1).await {
            bail!("burst {burst} never scaled w-00000");
        }
        burst_to_scale_s.push(burst_started.elapsed().as_secs_f64());
        management_lag_s.push(lag.await.unwrap_or(f64::NAN));
        channel
            .queue_purge(queue(0).as_str().into(), QueuePurgeOptions::default())
            .await?;
    }

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;

    Ok(RowB {
        startup_s,
        reconciles_per_s: reconciles / elapsed,
        mgmt_per_tick: mgmt / ticks,
        peeks_per_tick: peeks / ticks,
        amqp_connections,
        k8s_per_tick: k8s_requests / ticks,
        k8s_kinds: if k8s_kinds.is_empty() {
            "none".into()
        } else {
            k8s_kinds
                .iter()
                .map(|(kind, v)| format!("{kind} {:.2}", v / ticks))
                .collect::<Vec<_>>()
                .join(", ")
        },
        cpu_ms_per_tick: cpu * 1000.0 / ticks,
        rss_mib: rss,
        burst_to_scale_s,
        management_lag_s,
    })
}

async fn scrape(http: &reqwest::Client, addr: &str) -> anyhow::Result<String> {
    Ok(http
        .get(format!("http://{addr}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .text()
        .await?)
}

/// Sum of the samples of `name` (whose labels contain `label`, if given).
fn sum_metric(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|line| label.is_none_or(|l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Resident set size of `pid` in MiB.
fn rss_mib(pid: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kib / 1024.0)
}

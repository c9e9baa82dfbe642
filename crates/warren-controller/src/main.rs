//! `warren-controller`: scales worker Deployments from RabbitMQ queue depth.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use warren_controller::audit::{BrokerAudit, NoAudit, ScaleAudit};
use warren_controller::leader::{LeaseConfig, run_while_leader};
use warren_controller::metrics::ControllerMetrics;
use warren_controller::observe::BrokerObserver;
use warren_controller::observe::credentials::CredentialsCache;
use warren_controller::observe::management::{ManagementClient, ManagementConfig, QueueStatsHub};
use warren_controller::observe::peek::QueuePeeker;
use warren_controller::reconcile::{self, Context, Settings, in_flight};
use warren_telemetry::{LogArgs, Readiness};

/// Watches QueueScalers, reads queue depth from RabbitMQ and patches the
/// target's /scale subresource. Uses in-cluster config or KUBECONFIG.
#[derive(Debug, Parser)]
#[command(name = "warren-controller", version)]
struct Args {
    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    #[arg(long, env = "WARREN_LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    listen_addr: SocketAddr,

    /// Run leader election on a Lease so only one replica scales (the chart
    /// turns it on; off by default for a single local process).
    #[arg(long, env = "WARREN_LEADER_ELECTION", default_value_t = false, action = clap::ArgAction::Set)]
    leader_election: bool,

    /// Name of the Lease used for leader election.
    #[arg(long, env = "WARREN_LEASE_NAME", default_value = "warren-controller")]
    lease_name: String,

    /// Namespace of the Lease (the controller's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pod_namespace: String,

    /// Identity of this replica in the Lease (default: the host name).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,

    /// Lease validity in seconds after the last renewal.
    #[arg(long, env = "WARREN_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,

    /// Renew the Lease this many seconds before it expires.
    #[arg(long, env = "WARREN_LEASE_GRACE_SECONDS", default_value_t = 5)]
    lease_grace_seconds: u64,

    /// Only watch QueueScalers in this namespace (empty: all namespaces).
    #[arg(long, env = "WARREN_WATCH_NAMESPACE", default_value = "")]
    watch_namespace: String,

    /// Timeout of one broker request (management API call, AMQP connect or
    /// passive declare), in milliseconds.
    #[arg(long, env = "WARREN_BROKER_TIMEOUT_MS", default_value_t = 5000)]
    broker_timeout_ms: u64,

    /// Publish a `scaler.scaled` audit event on the broker's `warren.events`
    /// exchange for every scale.
    #[arg(long, env = "WARREN_AUDIT_EVENTS", default_value_t = true, action = clap::ArgAction::Set)]
    audit_events: bool,

    #[command(flatten)]
    events_log: warren_broker::EventsLogArgs,

    /// Rewrite a QueueScaler's status at least this often (seconds) even
    /// when only the observation time changed.
    #[arg(long, env = "WARREN_STATUS_HEARTBEAT_SECONDS", default_value_t = 60)]
    status_heartbeat_seconds: u64,

    /// QueueScalers reconciled at once (0: unlimited).
    #[arg(long, env = "WARREN_RECONCILE_CONCURRENCY", default_value_t = 64)]
    reconcile_concurrency: u16,

    /// Longest backoff after failed reconciles of one scaler, in seconds.
    #[arg(long, env = "WARREN_MAX_BACKOFF_SECONDS", default_value_t = 300)]
    max_backoff_seconds: u64,

    /// Read queue listings in pages of this many queues (max 500); 0 reads
    /// each vhost in one request.
    #[arg(long, env = "WARREN_MANAGEMENT_PAGE_SIZE", default_value_t = 0)]
    management_page_size: u32,

    /// Management API answers younger than this (ms) are shared between
    /// scalers on the same broker and vhost.
    #[arg(long, env = "WARREN_STATS_MAX_AGE_MS", default_value_t = 1000)]
    stats_max_age_ms: u64,

    /// RabbitMQ's `collect_statistics_interval` (ms): the management API's
    /// unacked count can be two of these old. Messages that left the ready
    /// count less than twice this plus WARREN_STATS_MAX_AGE_MS ago count as
    /// in flight (a scale-down or the step to zero waits that long after the
    /// last drop of the ready count; 11 s by default). 0 with
    /// WARREN_STATS_MAX_AGE_MS=0 turns this off.
    #[arg(
        long,
        env = "WARREN_MANAGEMENT_STATS_INTERVAL_MS",
        default_value_t = 5000
    )]
    management_stats_interval_ms: u64,

    /// How long credentials read from a Secret are reused, in seconds.
    #[arg(long, env = "WARREN_SECRET_TTL_SECONDS", default_value_t = 60)]
    secret_ttl_seconds: u64,

    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    warren_telemetry::install_crypto_provider();
    let args = Args::parse();
    warren_telemetry::init_tracing(&args.log).context("cannot set up logging")?;

    let mut registry = Registry::default();
    let metrics = ControllerMetrics::register(&mut registry);
    let readiness = Readiness::default();

    let shutdown = warren_telemetry::shutdown_on_signal();
    let server = warren_telemetry::serve_ops(
        args.listen_addr,
        registry,
        readiness.clone(),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(addr = %args.listen_addr, "serving /metrics /healthz /readyz");

    let client = kube::Client::try_default()
        .await
        .context("cannot build a Kubernetes client (in-cluster config or KUBECONFIG)")?;
    let (observer, audit) = broker_readers(&args, &client, &metrics)?;
    let settings = args.settings();
    let watch_namespace = args.watch_namespace();

    // Ready once the process can serve; scaling is gated by the lease.
    readiness.set(true);
    let run_term = |stop: CancellationToken| {
        // A fresh context per leadership term: stabilization history from an
        // earlier term is stale by definition.
        let ctx = Arc::new(Context::new(
            client.clone(),
            args.pod_name.clone(),
            metrics.clone(),
            observer.clone(),
            audit.clone(),
            settings.clone(),
        ));
        reconcile::run(ctx, watch_namespace.clone(), stop)
    };

    let result = scale_while_leading(&args, &client, &metrics, &shutdown, run_term).await;

    shutdown.cancel();
    readiness.set(false);
    server.stopped().await;
    tracing::info!("stopped");
    result
}

/// Runs `run_term` for each leadership term (or once, until shutdown,
/// without leader election).
async fn scale_while_leading<F, Fut>(
    args: &Args,
    client: &kube::Client,
    metrics: &ControllerMetrics,
    shutdown: &CancellationToken,
    mut run_term: F,
) -> anyhow::Result<()>
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    if !args.leader_election {
        tracing::info!("leader election disabled; this replica scales");
        metrics.leader.set(1);
        run_term(shutdown.clone()).await;
        return Ok(());
    }
    let stop = shutdown.clone();
    run_while_leader(
        client.clone(),
        args.lease(),
        metrics.clone(),
        async move { stop.cancelled().await },
        run_term,
    )
    .await
    .context("leader election failed")
}

/// The queue observer and the audit sink. They outlive leadership terms:
/// their caches and connections are not leader state.
fn broker_readers(
    args: &Args,
    client: &kube::Client,
    metrics: &ControllerMetrics,
) -> anyhow::Result<(Arc<BrokerObserver>, Arc<dyn ScaleAudit>)> {
    let broker_timeout = Duration::from_millis(args.broker_timeout_ms);
    let management = ManagementClient::new(ManagementConfig {
        timeout: broker_timeout,
        page_size: NonZeroU32::new(args.management_page_size),
    })
    .context("cannot build the management API client")?
    .with_metrics(metrics.clone());
    let credentials = Arc::new(CredentialsCache::new(
        client.clone(),
        Duration::from_secs(args.secret_ttl_seconds),
    ));
    let hub = Arc::new(QueueStatsHub::new(
        management,
        Duration::from_millis(args.stats_max_age_ms),
    ));
    let peeker = Arc::new(QueuePeeker::new(broker_timeout).with_metrics(metrics.clone()));
    let observer = Arc::new(BrokerObserver::new(credentials.clone(), hub, peeker));
    let audit: Arc<dyn ScaleAudit> = if args.audit_events {
        Arc::new(
            BrokerAudit::new(credentials, broker_timeout, metrics.clone())
                .with_events_log(args.events_log.retention()),
        )
    } else {
        Arc::new(NoAudit)
    };
    Ok((observer, audit))
}

impl Args {
    fn settings(&self) -> Settings {
        Settings {
            status_heartbeat: Duration::from_secs(self.status_heartbeat_seconds),
            error_backoff_max: Duration::from_secs(self.max_backoff_seconds.max(1)),
            concurrency: self.reconcile_concurrency,
            in_flight_horizon: in_flight::horizon(
                Duration::from_millis(self.management_stats_interval_ms),
                Duration::from_millis(self.stats_max_age_ms),
            ),
            ..Settings::default()
        }
    }

    /// The one namespace to watch (`None`: all of them), logged.
    fn watch_namespace(&self) -> Option<String> {
        let namespace = (!self.watch_namespace.is_empty()).then(|| self.watch_namespace.clone());
        match &namespace {
            Some(ns) => tracing::info!(namespace = %ns, "watching QueueScalers in one namespace"),
            None => tracing::info!("watching QueueScalers in all namespaces"),
        }
        namespace
    }

    /// The leader lease of this replica.
    fn lease(&self) -> LeaseConfig {
        LeaseConfig {
            lease_name: self.lease_name.clone(),
            namespace: self.pod_namespace.clone(),
            identity: self.pod_name.clone().unwrap_or_else(hostname),
            duration: Duration::from_secs(self.lease_duration_seconds),
            grace: Duration::from_secs(self.lease_grace_seconds),
        }
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| format!("warren-controller-{}", std::process::id()))
}

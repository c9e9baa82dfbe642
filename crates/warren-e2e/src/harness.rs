//! [`Harness`]: one end-to-end environment per test.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::{Value, json};
use warren_crd::{
    Behavior, BrokerRef, CredentialsSecretRef, Fallback, PolicyType, QueueRef, QueueScaler,
    QueueScalerSpec, QueueScalerStatus, ScaleDownRules, ScaleTargetRef, ScaleUpRules,
    ScalingPolicy, SelectPolicy, TargetKind,
};
use warren_testkit::{RabbitNode, RabbitOptions};

use crate::cluster::{
    self, ApiWrite, CONTROLLER, Cluster, ClusterSetup, describe_pods, instance_name,
};
use crate::process::tail;
use crate::{
    Binaries, CountingProxy, HarnessError, JobLog, JobReport, MetricsText, Process, ReplicaChange,
    ReplicaRecorder, http_client,
};

/// A worker container instance that ended (on the cluster, from the pod
/// watch: one per container run, named like the job log's instances).
#[derive(Debug, Clone, PartialEq)]
pub struct PodExit {
    /// The instance: the pod's name, `<pod>#<restart>` for a restarted container.
    pub pod: String,
    /// Exit code (128 + n for a signal, as the kubelet reports it).
    pub code: Option<i32>,
    /// Terminating signal number, if a signal killed it.
    pub signal: Option<i32>,
    /// It ended while its pod was being deleted (scale-in or deletion: the
    /// kubelet sent SIGTERM).
    pub sigterm_sent: bool,
    /// It ended by SIGKILL while its pod was being deleted (the grace
    /// period ran out).
    pub sigkill_sent: bool,
    /// How long it ran.
    pub ran_for: Duration,
}

impl PodExit {
    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Namespace of the objects [`scaler_object`] and [`deployment_object`] make
/// (on a private control plane: the observability run, e2e-bench's fleet);
/// on the cluster each harness has a namespace of its own.
pub const NAMESPACE: &str = "default";
/// The worker Deployment the scaler targets.
pub const DEPLOYMENT: &str = "warren-worker";
/// The Secret with the broker credentials (as the chart names it).
pub const SECRET: &str = "warren-rabbitmq";
/// The QueueScaler's name.
pub const SCALER: &str = "warren-worker";
/// The leader-election Lease.
pub const LEASE: &str = "warren-controller";
/// Scale-down stabilization window of [`base_spec`], seconds: longer than the
/// management API's data lag.
pub const DATA_LAG_WINDOW: u32 = 12;
/// Cooldown before zero of [`base_spec`], seconds: longer than the
/// management API's data lag.
pub const DATA_LAG_COOLDOWN: u32 = 15;

/// The work queue's type (`WARREN_QUEUE_TYPE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    Quorum,
    /// For scenarios that SIGKILL the broker: on RabbitMQ 3.10 a single-node
    /// quorum queue stops confirming after a crash and restart.
    Classic,
}

impl QueueKind {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueKind::Quorum => "quorum",
            QueueKind::Classic => "classic",
        }
    }
}

/// An adjustment of the QueueScaler spec.
pub type SpecEdit = Box<dyn FnOnce(&mut QueueScalerSpec) + Send>;

/// How to set up a [`Harness`].
pub struct HarnessOptions {
    /// The work queue's type (default quorum; `WARREN_E2E_QUEUE_TYPE=classic`
    /// changes the default for every harness).
    pub queue_kind: QueueKind,
    /// `WARREN_SECONDS_PER_DOT` of the workers.
    pub seconds_per_dot: f64,
    /// `terminationGracePeriodSeconds` of the worker pods.
    pub grace_seconds: u64,
    /// The node's `collect_statistics_interval` (management API lag).
    pub stats_interval_ms: u64,
    /// Enable RabbitMQ's Prometheus plugin on the node (see
    /// `RabbitNode::prometheus_url`).
    pub rabbit_prometheus: bool,
    /// Replicas of the chart's controller Deployment (0: none).
    pub controllers: usize,
    /// `WARREN_LEADER_ELECTION` (default: on when more than one controller).
    pub leader_election: Option<bool>,
    pub lease_duration_seconds: u64,
    pub lease_grace_seconds: u64,
    /// Create the QueueScaler (from [`base_spec`] plus the edit).
    pub create_scaler: bool,
    /// Route the scaler's management URL through a [`CountingProxy`].
    pub count_management_requests: bool,
    /// More environment for the controllers.
    pub controller_env: Vec<(String, String)>,
    /// Before creating the QueueScaler (so before the controllers act on
    /// it), wait until the management API reports counts for the work queue
    /// (RabbitMQ collects them only some seconds after a queue is declared;
    /// a fresh queue is a real condition the controller must handle, so
    /// this is off by default).
    /// `WARREN_E2E_WAIT_FOR_QUEUE_STATS=1` turns it on for every harness.
    pub wait_for_queue_stats: bool,
    /// Applied to [`base_spec`] before the QueueScaler is created (see [`HarnessOptions::scaler`]).
    pub spec_edit: Option<SpecEdit>,
    /// More worker pools, by suffix (e.g. `sms`): each gets its own queue
    /// `<queue>-<suffix>` (accepted by the sender through `WARREN_QUEUES`),
    /// its own Deployment `warren-worker-<suffix>` (the chart's worker
    /// Deployment with that name), and a replica recorder. Their QueueScalers are the
    /// scenario's to create ([`Harness::pool_spec`], [`Harness::put_scaler`]).
    pub extra_pools: Vec<String>,
    /// More queues the main Deployment's workers consume besides the work
    /// queue, by suffix: `<queue>-<suffix>`, accepted by the sender and
    /// consumed through the worker's `WARREN_QUEUES` (a pool of several
    /// queues). The scenario points the QueueScaler at them.
    pub worker_queues: Vec<String>,
}

/// A worker pool beyond the harness's main one (see [`HarnessOptions::extra_pools`]).
pub struct Pool {
    pub suffix: String,
    /// The queue its workers consume.
    pub queue: String,
    /// Its Deployment (and the name of its QueueScaler, by convention).
    pub deployment: String,
    pub recorder: ReplicaRecorder,
}

impl Default for HarnessOptions {
    fn default() -> Self {
        Self {
            queue_kind: match std::env::var("WARREN_E2E_QUEUE_TYPE").as_deref() {
                Ok("classic") => QueueKind::Classic,
                _ => QueueKind::Quorum,
            },
            seconds_per_dot: 0.1,
            grace_seconds: 30,
            stats_interval_ms: 500,
            rabbit_prometheus: false,
            controllers: 1,
            leader_election: None,
            lease_duration_seconds: 3,
            lease_grace_seconds: 1,
            create_scaler: true,
            count_management_requests: false,
            controller_env: Vec::new(),
            wait_for_queue_stats: std::env::var_os("WARREN_E2E_WAIT_FOR_QUEUE_STATS").is_some(),
            spec_edit: None,
            extra_pools: Vec::new(),
            worker_queues: Vec::new(),
        }
    }
}

impl HarnessOptions {
    /// Adjusts the QueueScaler spec (applied on top of [`base_spec`]).
    #[must_use]
    pub fn scaler(mut self, edit: impl FnOnce(&mut QueueScalerSpec) + Send + 'static) -> Self {
        self.spec_edit = Some(Box::new(edit));
        self
    }
}

/// The test QueueScaler before a scenario adjusts it: short windows so a
/// scenario runs in seconds.
///
/// pollingIntervalSeconds 1, maxReplicas 4, messagesPerReplica 2, scale-up
/// without a window (+10 pods per second), scale-down window
/// [`DATA_LAG_WINDOW`] s (-100% per second), cooldown [`DATA_LAG_COOLDOWN`] s,
/// fallback after 2 failed reads (holding the count).
///
/// Why the scale-down window and the cooldown are not 2–3 s: RabbitMQ's
/// management API reports queue and channel counts late — measured on this
/// machine's 3.10 node, ~5 s for a classic queue (the management agent
/// samples every 5 s, the smallest `sample_retention_policies` interval,
/// whatever `collect_statistics_interval` says) and up to ~10 s for a quorum
/// queue (plus the 5 s quorum tick); a freshly declared queue has no counts
/// at all for 5–10 s. A window shorter than that makes any controller
/// decide on counts older than the burst it just reacted to. Scenarios
/// about the safety rules that must hold whatever the windows (never to
/// zero with jobs in flight) set short windows on purpose.
pub fn base_spec(queue: &str, management_url: &str, amqp_url: &str) -> QueueScalerSpec {
    QueueScalerSpec {
        scale_target_ref: ScaleTargetRef {
            api_version: "apps/v1".into(),
            kind: TargetKind::Deployment,
            name: DEPLOYMENT.into(),
        },
        queue: QueueRef::single(queue, "/"),
        broker: BrokerRef {
            management_url: management_url.into(),
            amqp_url: amqp_url.into(),
            credentials_secret_ref: CredentialsSecretRef {
                name: SECRET.into(),
                username_key: "username".into(),
                password_key: "password".into(),
            },
        },
        min_replicas: 0,
        max_replicas: 4,
        messages_per_replica: 2,
        activation_messages: 0,
        count_unacked: true,
        target_drain_seconds: None,
        polling_interval_seconds: 1,
        behavior: Behavior {
            scale_up: ScaleUpRules {
                stabilization_window_seconds: 0,
                policies: vec![ScalingPolicy {
                    policy_type: PolicyType::Pods,
                    value: 10,
                    period_seconds: 1,
                }],
                select_policy: SelectPolicy::Max,
            },
            scale_down: ScaleDownRules {
                stabilization_window_seconds: DATA_LAG_WINDOW,
                policies: vec![ScalingPolicy {
                    policy_type: PolicyType::Percent,
                    value: 100,
                    period_seconds: 1,
                }],
                select_policy: SelectPolicy::Max,
            },
            cooldown_seconds: DATA_LAG_COOLDOWN,
        },
        fallback: Fallback {
            failure_threshold: 2,
            replicas: None,
        },
        paused: false,
    }
}

/// A QueueScaler object in [`NAMESPACE`] (the cluster backend puts it in the
/// harness's own namespace).
pub fn scaler_object(name: &str, spec: QueueScalerSpec) -> Result<Value, HarnessError> {
    let mut object = serde_json::to_value(QueueScaler::new(name, spec))?;
    object["metadata"]["namespace"] = json!(NAMESPACE);
    Ok(object)
}

/// A Deployment object in [`NAMESPACE`] (the cluster backend puts it in the
/// harness's own namespace).
pub fn deployment_object(name: &str, replicas: i64, grace_seconds: u64) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": name}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": grace_seconds,
                    "containers": [{
                        "name": "worker",
                        "image": "warren-worker:dev",
                        "ports": [{"name": "metrics", "containerPort": 9090}],
                    }],
                },
            },
        },
    })
}

/// A burst of jobs accepted by the sender.
#[derive(Debug, Clone)]
pub struct Burst {
    pub ids: Vec<String>,
    /// When the first 202 (publish confirmed) came back.
    pub first_confirm: Instant,
    /// When the last one came back.
    pub last_confirm: Instant,
    /// `first_confirm` on the wall clock (to compare with worker log lines).
    pub first_confirm_wall: chrono::DateTime<chrono::Utc>,
}

/// One end-to-end environment. Everything is killed when it is dropped; when
/// dropped during a panic it prints its diagnostics (replica history,
/// controller logs, scaler status, job accounting) to stderr.
///
/// It runs on the local cluster whose state directory (`make local-up`)
/// [`cluster::CLUSTER_ENV`] names, in a namespace of its own: see
/// [`crate::cluster`]. Without that variable [`Harness::start`] fails.
pub struct Harness {
    pub queue: String,
    pub queue_kind: QueueKind,
    pub node: RabbitNode,
    cluster: Box<Cluster>,
    pub sender: Process,
    pub recorder: ReplicaRecorder,
    pub proxy: Option<CountingProxy>,
    pub binaries: Binaries,
    pub started: Instant,
    /// The extra worker pools, in the order of [`HarnessOptions::extra_pools`].
    pub pools: Vec<Pool>,
    /// Waits last this many times what a scenario asks
    /// (`WARREN_E2E_PATIENCE`, default 3: a real control plane on a loaded
    /// machine is slower to react than the scenarios' own figures).
    patience: f64,
    dir: Option<tempfile::TempDir>,
    sent: Mutex<Vec<String>>,
    http: reqwest::Client,
}

impl Harness {
    /// Starts the broker, a namespace of the local cluster with the chart's
    /// objects (controller and worker Deployments), the sender and the
    /// QueueScaler.
    pub async fn start(options: HarnessOptions) -> Result<Self, HarnessError> {
        let started = Instant::now();
        // No cluster, or one that does not answer, fails the test before
        // anything starts: never a skip.
        let state = cluster::cluster_state_dir().ok_or(HarnessError::NoCluster)?;
        let binaries = Binaries::locate()?;
        let (client, node_ip) = Cluster::connect(&state).await?;
        let dir = tempfile::Builder::new()
            .prefix("warren-e2e-")
            .tempdir()
            .map_err(|source| HarnessError::Io {
                context: "creating the run directory".into(),
                source,
            })?;
        let queue = warren_testkit::unique_name("e2e");
        let node = RabbitNode::start(RabbitOptions {
            management: true,
            prometheus: options.rabbit_prometheus,
            stats_interval_ms: options.stats_interval_ms,
            http_on_all_interfaces: true,
            ..RabbitOptions::default()
        })
        .await?;
        let proxy = if options.count_management_requests {
            // The controller pods reach it through the node's address.
            let ip = std::net::Ipv4Addr::UNSPECIFIED;
            Some(CountingProxy::start_on(ip, &node.management_url()).await?)
        } else {
            None
        };
        let http = http_client()?;

        // The sender declares the topology (work queues, DLX, events) at start.
        let logs = dir.path().join("logs");
        let pool_queues: Vec<String> = options
            .extra_pools
            .iter()
            .map(|suffix| format!("{queue}-{suffix}"))
            .collect();
        let worker_queues: Vec<String> = options
            .worker_queues
            .iter()
            .map(|suffix| format!("{queue}-{suffix}"))
            .collect();
        let extra_queues = pool_queues
            .iter()
            .chain(&worker_queues)
            .cloned()
            .collect::<Vec<_>>()
            .join(",");
        let sender_env = env(&[
            ("AMQP_URL", node.amqp_url().as_str()),
            ("WARREN_QUEUE", queue.as_str()),
            ("WARREN_QUEUES", extra_queues.as_str()),
            ("WARREN_QUEUE_TYPE", options.queue_kind.as_str()),
            ("WARREN_DOT_RULE_DISABLED", "true"),
            ("WARREN_LOG_FORMAT", "json"),
            ("WARREN_LOG", "info"),
            ("POD_NAME", "warren-sender"),
        ]);
        let mut sender = Process::spawn(&binaries.sender, "warren-sender", &sender_env, &logs)?;
        sender
            .wait_http_ok("/readyz", Duration::from_secs(30))
            .await?;

        let leader_election = options.leader_election.unwrap_or(options.controllers > 1);
        let extra_pools: Vec<(String, String)> = options
            .extra_pools
            .iter()
            .cloned()
            .zip(pool_queues.iter().cloned())
            .collect();
        let cluster = Cluster::start(
            state,
            client,
            node_ip.clone(),
            ClusterSetup {
                namespace: &queue,
                queue: &queue,
                queue_type: options.queue_kind.as_str(),
                amqp_host_port: format!("{node_ip}:{}", node.amqp_port()),
                seconds_per_dot: options.seconds_per_dot,
                grace_seconds: options.grace_seconds,
                controllers: options.controllers,
                leader_election,
                lease_duration_seconds: options.lease_duration_seconds,
                lease_grace_seconds: options.lease_grace_seconds,
                controller_env: &options.controller_env,
                worker_queues: &worker_queues,
                extra_pools: &extra_pools,
            },
        )
        .await?;
        let recorder = cluster.recorder(DEPLOYMENT);
        let pools = extra_pools
            .into_iter()
            .map(|(suffix, queue)| {
                let deployment = format!("{DEPLOYMENT}-{suffix}");
                Pool {
                    suffix,
                    queue,
                    recorder: cluster.recorder(&deployment),
                    deployment,
                }
            })
            .collect();
        let patience = std::env::var("WARREN_E2E_PATIENCE")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(3.0);

        let harness = Self {
            queue,
            queue_kind: options.queue_kind,
            node,
            cluster: Box::new(cluster),
            sender,
            recorder,
            proxy,
            binaries,
            started,
            pools,
            patience,
            dir: Some(dir),
            sent: Mutex::default(),
            http,
        };

        // The controllers run already; they act once the QueueScaler exists.
        if options.wait_for_queue_stats {
            let waited = harness
                .wait_for_queue_stats(Duration::from_secs(60))
                .await?;
            tracing::info!(?waited, "management API reports counts for the work queue");
        }
        if options.create_scaler {
            let mut spec = harness.default_spec();
            if let Some(edit) = options.spec_edit {
                edit(&mut spec);
            }
            harness.put_scaler(SCALER, spec).await?;
        }
        Ok(harness)
    }

    /// The cluster side of this harness (its namespace, pods, watches).
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    fn patient(&self, timeout: Duration) -> Duration {
        timeout.mul_f64(self.patience)
    }

    /// `url` (an address on 127.0.0.1) as the controller pods reach it:
    /// through the node's bridge address.
    fn reachable(&self, url: &str) -> String {
        url.replace("127.0.0.1", &self.cluster.node_ip)
    }

    /// Waits until the management API reports message counts for the work
    /// queue; returns how long that took.
    pub async fn wait_for_queue_stats(&self, timeout: Duration) -> Result<Duration, HarnessError> {
        let started = Instant::now();
        let url = format!(
            "{}/api/queues/%2F/{}",
            self.node.management_url(),
            self.queue
        );
        loop {
            let counts =
                match self
                    .http
                    .get(&url)
                    .basic_auth("guest", Some("guest"))
                    .send()
                    .await
                {
                    Ok(response) => response.json::<Value>().await.ok().is_some_and(|q| {
                        q.get("messages_unacknowledged").is_some_and(Value::is_u64)
                    }),
                    Err(_) => false,
                };
            if counts {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                return Err(self.timeout("management counts for the work queue".into(), started));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Unacked messages per named connection (a worker's connection is
    /// named after its pod) as the management API reports them now.
    pub async fn management_unacked_by_connection(
        &self,
    ) -> Result<BTreeMap<String, u64>, HarnessError> {
        let base = self.node.management_url();
        let get = |path: String| {
            let http = self.http.clone();
            let url = format!("{base}{path}");
            async move {
                let err = |source| HarnessError::Http {
                    context: format!("GET {url}"),
                    source,
                };
                http.get(&url)
                    .basic_auth("guest", Some("guest"))
                    .send()
                    .await
                    .map_err(err)?
                    .json::<Value>()
                    .await
                    .map_err(err)
            }
        };
        let connections =
            get("/api/vhosts/%2F/connections?columns=name,user_provided_name".into()).await?;
        let channels = get(
            "/api/vhosts/%2F/channels?columns=connection_details.name,messages_unacknowledged"
                .into(),
        )
        .await?;
        let mut names = BTreeMap::new();
        for c in connections.as_array().into_iter().flatten() {
            if let (Some(name), Some(pod)) = (
                c.get("name").and_then(Value::as_str),
                c.get("user_provided_name").and_then(Value::as_str),
            ) {
                names.insert(name.to_string(), pod.to_string());
            }
        }
        let mut unacked: BTreeMap<String, u64> = names.values().map(|p| (p.clone(), 0)).collect();
        for ch in channels.as_array().into_iter().flatten() {
            let connection = ch
                .pointer("/connection_details/name")
                .and_then(Value::as_str);
            let n = ch
                .get("messages_unacknowledged")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            if let Some(pod) = connection.and_then(|c| names.get(c)) {
                *unacked.entry(pod.clone()).or_insert(0) += n;
            }
        }
        Ok(unacked)
    }

    /// Waits until the management API (what the controller reads to mark
    /// pod-deletion costs) shows exactly `busy` among the live worker pods
    /// as holding unacked messages, every other live pod connected and idle.
    pub async fn wait_management_busy(
        &self,
        busy: &BTreeSet<String>,
        timeout: Duration,
    ) -> Result<Duration, HarnessError> {
        let started = Instant::now();
        let timeout = self.patient(timeout);
        loop {
            let alive: Vec<String> = self
                .live_workers()
                .into_iter()
                .map(|(pod, _)| pod)
                .collect();
            let view = self
                .management_unacked_by_connection()
                .await
                .unwrap_or_default();
            let matches = alive.iter().all(|pod| match view.get(pod) {
                Some(n) => (*n > 0) == busy.contains(pod),
                None => false,
            });
            if matches {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                return Err(self.timeout(
                    format!("the management API to show busy pods {busy:?} (shows {view:?})"),
                    started,
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// [`base_spec`] for this harness's queue and broker (as the controller
    /// reaches them).
    pub fn default_spec(&self) -> QueueScalerSpec {
        let management = match &self.proxy {
            Some(proxy) => format!("http://127.0.0.1:{}", proxy.port()),
            None => self.node.management_url(),
        };
        base_spec(
            &self.queue,
            &self.reachable(&management),
            &self.reachable(&format!("amqp://127.0.0.1:{}", self.node.amqp_port())),
        )
    }

    /// Worker pods (main Deployment) running, not terminating: (pod, the
    /// name of its current instance in the job log).
    fn live_workers(&self) -> Vec<(String, String)> {
        self.cluster
            .pods_of(DEPLOYMENT)
            .into_iter()
            .filter(|p| !p.deleted && !p.terminating)
            .map(|p| {
                let instance = instance_name(&p.name, p.restart_count);
                (p.name, instance)
            })
            .collect()
    }

    /// The extra pool with this suffix.
    pub fn pool(&self, suffix: &str) -> Result<&Pool, HarnessError> {
        self.pools
            .iter()
            .find(|p| p.suffix == suffix)
            .ok_or_else(|| HarnessError::Other(format!("no extra pool {suffix:?}")))
    }

    /// [`Harness::default_spec`] aimed at an extra pool: its Deployment and its queue.
    pub fn pool_spec(&self, suffix: &str) -> Result<QueueScalerSpec, HarnessError> {
        let pool = self.pool(suffix)?;
        let mut spec = self.default_spec();
        spec.scale_target_ref.name = pool.deployment.clone();
        spec.queue = QueueRef::single(pool.queue.clone(), "/");
        Ok(spec)
    }

    /// The QueueScaler `name` as JSON.
    fn scaler_object(&self, name: &str) -> Option<Value> {
        self.cluster.scaler(name)
    }

    /// Every QueueScaler of the harness, as JSON.
    pub fn scalers(&self) -> Vec<Value> {
        self.cluster.scalers()
    }

    /// The status of the QueueScaler `name`, as the controller last wrote it.
    pub fn status_of(&self, name: &str) -> Option<QueueScalerStatus> {
        let object = self.scaler_object(name)?;
        serde_json::from_value(object.get("status")?.clone()).ok()
    }

    /// Creates or replaces a QueueScaler.
    pub async fn put_scaler(&self, name: &str, spec: QueueScalerSpec) -> Result<(), HarnessError> {
        self.cluster.put_scaler(scaler_object(name, spec)?).await
    }

    /// Applies a JSON merge patch to the QueueScaler's spec (as `kubectl
    /// patch --type merge` would; the generation moves).
    pub async fn patch_scaler_spec(&self, spec_patch: Value) -> Result<(), HarnessError> {
        self.cluster
            .merge_patch_scaler(SCALER, json!({"spec": spec_patch}))
            .await
    }

    /// Creates a Deployment (e.g. [`deployment_object`]) next to the harness's.
    pub async fn put_deployment(&self, object: Value) -> Result<(), HarnessError> {
        self.cluster.create_deployment(object).await
    }

    /// Kubernetes Events recorded so far (JSON).
    pub async fn events(&self) -> Result<Vec<Value>, HarnessError> {
        self.cluster.events().await
    }

    /// Run directory (the sender's log).
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new("."))
    }

    /// The controllers by name (their `POD_NAME`): the controller
    /// Deployment's live pods.
    pub fn controller_names(&self) -> Vec<String> {
        self.cluster
            .pods_of(CONTROLLER)
            .into_iter()
            .filter(|p| !p.deleted && !p.terminating)
            .map(|p| p.name)
            .collect()
    }

    /// One scrape of the controller pod `name`'s `/metrics`.
    pub async fn controller_metrics(&self, name: &str) -> Result<MetricsText, HarnessError> {
        Ok(MetricsText(
            self.cluster.pod_get(name, 8080, "/metrics").await?,
        ))
    }

    /// Takes the controller `name` away without a clean release: deletion
    /// of its pod (the kubelet stops it and its Deployment starts another).
    pub async fn kill_controller(&self, name: &str) -> Result<(), HarnessError> {
        self.cluster.delete_pod(name).await
    }

    /// Sends `signal` to the worker process of pod `pod` (not a deletion:
    /// the kubelet restarts the container, as for a crash).
    pub fn kill_worker(&self, pod: &str, signal: Signal) -> Result<(), HarnessError> {
        // A job log instance name (`<pod>#<restart>`) names its pod.
        let pod = pod.split('#').next().unwrap_or(pod);
        self.cluster
            .signal_pod_process(pod, "warren-worker", signal)
    }

    /// Waits until the worker pod `pod` (or a job log instance name of it)
    /// has been restarted by its kubelet and is Ready again; returns its
    /// restart count.
    pub async fn wait_restarted(&self, pod: &str, timeout: Duration) -> Result<i32, HarnessError> {
        let cluster = &self.cluster;
        let pod = pod.split('#').next().unwrap_or(pod);
        let restarted = |p: &cluster::PodRecord| {
            p.name == pod && p.restart_count >= 1 && p.ready && !p.terminating
        };
        cluster
            .wait_pods(
                self.patient(timeout),
                &format!("pod {pod} restarted and Ready"),
                |pods| pods.iter().any(restarted),
            )
            .await?;
        Ok(cluster
            .pods()
            .iter()
            .find(|p| restarted(p))
            .map(|p| p.restart_count)
            .unwrap_or_default())
    }

    /// Judges every scale-in victim of the main Deployment against the pods
    /// the ReplicaSet controller kept (from the pod watch). A victim that
    /// was Ready must have had a deletion cost no higher than any Ready pod
    /// kept; pods deleted within 5 s of each other count as one batch (not
    /// as kept). Returns how many victims were judged and the violations.
    pub fn scale_in_cost_violations(&self) -> Result<(usize, Vec<String>), HarnessError> {
        let pods = self.cluster.pods_of(DEPLOYMENT);
        let deleted_at: BTreeMap<String, Instant> = pods
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.deletion.as_ref()?.at)))
            .collect();
        let mut judged = 0;
        let mut violations = Vec::new();
        for pod in &pods {
            let Some(d) = &pod.deletion else { continue };
            if !d.ready {
                continue;
            }
            judged += 1;
            for (kept, cost, ready) in &d.kept {
                let same_batch = deleted_at
                    .get(kept)
                    .is_some_and(|at| at.saturating_duration_since(d.at) < Duration::from_secs(5));
                if *ready && !same_batch && *cost < d.cost {
                    violations.push(format!(
                        "{} (cost {}) deleted while {kept} (cost {cost}) was kept",
                        pod.name, d.cost
                    ));
                }
            }
        }
        Ok((judged, violations))
    }

    /// The first controller pod's process memory.
    pub fn controller_memory(&self) -> Option<crate::MemoryUsage> {
        let pod = self.controller_names().into_iter().next()?;
        let pid = self.cluster.pod_pid(&pod, "warren-controller")?;
        crate::process::memory_of(u32::try_from(pid).ok()?)
    }

    /// When the first worker pod became Ready at or after `since` (from the
    /// pod watch).
    pub fn first_worker_ready_since(
        &self,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        self.cluster
            .pods()
            .into_iter()
            .filter(|p| p.deployment != CONTROLLER)
            .filter_map(|p| p.ready_since)
            .filter(|at| *at >= since)
            .min()
    }

    /// Holder of the leader Lease, if any.
    pub fn lease_holder(&self) -> Option<String> {
        self.cluster.lease_holder()
    }

    /// POSTs one job; returns its id once the sender answered 202.
    pub async fn send(&self, message: &str) -> Result<String, HarnessError> {
        let url = format!("{}/send", self.sender.base_url());
        let id = post_job(&self.http, &url, message).await?;
        self.sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(id.clone());
        Ok(id)
    }

    /// Sends `count` jobs of `dots` dots at once (concurrent requests).
    pub async fn send_burst(&self, count: usize, dots: usize) -> Result<Burst, HarnessError> {
        self.send_messages(&vec![job(dots); count]).await
    }

    /// Sends `count` jobs of `dots` dots at once to `queue`
    /// (`POST /send/{queue}`).
    pub async fn send_burst_to(
        &self,
        queue: &str,
        count: usize,
        dots: usize,
    ) -> Result<Burst, HarnessError> {
        self.send_messages_to(Some(queue), &vec![job(dots); count])
            .await
    }

    /// Sends these messages at once (concurrent requests).
    pub async fn send_messages(&self, messages: &[String]) -> Result<Burst, HarnessError> {
        self.send_messages_to(None, messages).await
    }

    /// Sends these messages at once to `queue` (`None`: the default queue).
    async fn send_messages_to(
        &self,
        queue: Option<&str>,
        messages: &[String],
    ) -> Result<Burst, HarnessError> {
        let base = match queue {
            Some(queue) => format!("{}/send/{queue}", self.sender.base_url()),
            None => format!("{}/send", self.sender.base_url()),
        };
        let results = futures::future::join_all(messages.iter().map(|m| {
            let http = self.http.clone();
            let base = base.clone();
            async move {
                let id = post_job(&http, &base, m).await?;
                Ok::<_, HarnessError>((id, Instant::now(), chrono::Utc::now()))
            }
        }))
        .await;
        let mut ids = Vec::new();
        let mut times = Vec::new();
        let mut walls = Vec::new();
        for result in results {
            let (id, at, wall) = result?;
            ids.push(id);
            times.push(at);
            walls.push(wall);
        }
        self.sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend(ids.iter().cloned());
        let now = Instant::now();
        Ok(Burst {
            ids,
            first_confirm: times.iter().min().copied().unwrap_or(now),
            last_confirm: times.iter().max().copied().unwrap_or(now),
            first_confirm_wall: walls.iter().min().copied().unwrap_or_else(chrono::Utc::now),
        })
    }

    /// Every job accepted so far.
    pub fn sent(&self) -> Vec<String> {
        self.sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The worker logs as they are now, from the container logs the node
    /// agent keeps. A container's second run (after a crash) is `<pod>#1`,
    /// and so on: see [`instance_name`].
    pub fn job_log(&self) -> JobLog {
        self.cluster.job_log()
    }

    /// Exits of worker containers (every pool's): one per container
    /// instance that ended (named like the job log's); SIGTERM "sent" means
    /// the pod was being deleted, SIGKILL "sent" that it then died of
    /// signal 9.
    pub fn exits(&self) -> Vec<PodExit> {
        self.cluster
            .pods()
            .into_iter()
            .filter(|p| p.deployment != CONTROLLER)
            .flat_map(|p| {
                p.exits.into_values().map(move |e| PodExit {
                    pod: instance_name(&p.name, e.restart),
                    code: Some(e.code),
                    signal: e.signal,
                    sigterm_sent: e.while_deleting,
                    sigkill_sent: e.while_deleting && e.signal == Some(9),
                    ran_for: e.ran_for,
                })
            })
            .collect()
    }

    /// Accounting of every job sent so far.
    pub fn report(&self) -> JobReport {
        let exited: BTreeSet<String> = self.exits().into_iter().map(|e| e.pod).collect();
        self.job_log().report(&self.sent(), &exited)
    }

    /// Waits until every id in `ids` has a `job done` line.
    pub async fn wait_jobs_done(
        &self,
        ids: &[String],
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let started = Instant::now();
        let timeout = self.patient(timeout);
        loop {
            let log = self.job_log();
            if log.all_done(ids) {
                return Ok(());
            }
            if started.elapsed() > timeout {
                let done = log.done_counts();
                let missing: Vec<&String> =
                    ids.iter().filter(|id| !done.contains_key(*id)).collect();
                return Err(self.timeout(
                    format!(
                        "{} of {} jobs to finish (missing {missing:?})",
                        missing.len(),
                        ids.len()
                    ),
                    started,
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `n` worker pods are in the middle of a job.
    pub async fn wait_in_hand(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<(String, String)>, HarnessError> {
        let started = Instant::now();
        let timeout = self.patient(timeout);
        loop {
            let alive: BTreeSet<String> = self
                .live_workers()
                .into_iter()
                .map(|(_, instance)| instance)
                .collect();
            let in_hand: Vec<(String, String)> = self
                .job_log()
                .in_hand()
                .into_iter()
                .filter(|(pod, _)| alive.contains(pod))
                .collect();
            if in_hand.len() >= n {
                return Ok(in_hand);
            }
            if started.elapsed() > timeout {
                return Err(self.timeout(
                    format!("{n} pods with a job in hand (now {in_hand:?})"),
                    started,
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the Deployment's `spec.replicas` is `n`.
    pub async fn wait_replicas(
        &self,
        n: i64,
        timeout: Duration,
    ) -> Result<ReplicaChange, HarnessError> {
        let started = Instant::now();
        self.recorder
            .wait_value(self.patient(timeout), |v| v == n)
            .await
            .ok_or_else(|| self.timeout(format!("the Deployment to have {n} replicas"), started))
    }

    /// Waits until the Deployment's `spec.replicas` is at least `n`.
    pub async fn wait_value_at_least(
        &self,
        n: i64,
        timeout: Duration,
    ) -> Result<ReplicaChange, HarnessError> {
        let started = Instant::now();
        self.recorder
            .wait_value(self.patient(timeout), |v| v >= n)
            .await
            .ok_or_else(|| self.timeout(format!("the Deployment to have {n}+ replicas"), started))
    }

    /// Waits until a replica change at or after `since` satisfies `pred`.
    pub async fn wait_change(
        &self,
        since: Instant,
        timeout: Duration,
        what: &str,
        pred: impl FnMut(&ReplicaChange) -> bool,
    ) -> Result<ReplicaChange, HarnessError> {
        let started = Instant::now();
        self.recorder
            .wait_change(since, self.patient(timeout), pred)
            .await
            .ok_or_else(|| self.timeout(what.to_string(), started))
    }

    /// Waits until `n` worker pods run, are ready and none is terminating.
    pub async fn wait_pods_ready(&self, n: usize, timeout: Duration) -> Result<(), HarnessError> {
        let started = Instant::now();
        let timeout = self.patient(timeout);
        let ok = self
            .cluster
            .wait_pods(timeout, "ready worker pods", |pods| {
                let live: Vec<_> = pods
                    .iter()
                    .filter(|p| p.deployment == DEPLOYMENT && !p.deleted)
                    .collect();
                live.len() == n && live.iter().all(|p| p.ready && !p.terminating)
            })
            .await
            .is_ok();
        if ok {
            Ok(())
        } else {
            Err(self.timeout(format!("{n} ready worker pods"), started))
        }
    }

    /// The QueueScaler's status as the controller last wrote it.
    pub fn scaler_status(&self) -> Option<QueueScalerStatus> {
        self.status_of(SCALER)
    }

    /// Waits until the QueueScaler's status satisfies `pred`.
    pub async fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&QueueScalerStatus) -> bool,
    ) -> Result<QueueScalerStatus, HarnessError> {
        let started = Instant::now();
        let timeout = self.patient(timeout);
        let mut matches = |object: &Value| {
            object
                .get("status")
                .and_then(|s| serde_json::from_value::<QueueScalerStatus>(s.clone()).ok())
                .is_some_and(|s| pred(&s))
        };
        self.cluster
            .wait_scaler(SCALER, timeout, &mut matches)
            .await
            .and_then(|o| serde_json::from_value(o.get("status")?.clone()).ok())
            .ok_or_else(|| self.timeout(what.to_string(), started))
    }

    /// PATCH requests to the Deployment's `/scale` subresource, from the
    /// apiserver's audit log (any writer).
    pub fn scale_patches(&self) -> Vec<ApiWrite> {
        self.cluster
            .deployment_writes(DEPLOYMENT, Some("scale"))
            .into_iter()
            .filter(|w| w.method == "PATCH")
            .collect()
    }

    /// Writes to the Deployment other than through `/scale` made with the
    /// controller's ServiceAccount (it should only ever use `/scale`).
    pub fn other_deployment_writes(&self) -> Vec<ApiWrite> {
        let controller = self.cluster.controller_user();
        self.cluster
            .deployment_writes(DEPLOYMENT, None)
            .into_iter()
            .filter(|w| w.user == controller)
            .collect()
    }

    /// Ready messages in the work queue (AMQP passive declare).
    pub async fn ready_count(&self) -> Result<u32, HarnessError> {
        warren_testkit::ready_count(&self.node.amqp_url(), &self.queue)
            .await
            .map_err(|err| HarnessError::Other(err.to_string()))
    }

    /// Removes every ready message from the work queue.
    pub async fn purge(&self) -> Result<u32, HarnessError> {
        let amqp = |context: &str| {
            let context = context.to_string();
            move |source| HarnessError::Amqp { context, source }
        };
        let connection = lapin::Connection::connect(
            &self.node.amqp_url(),
            lapin::ConnectionProperties::default(),
        )
        .await
        .map_err(amqp("connecting to purge"))?;
        let channel = connection.create_channel().await.map_err(amqp("channel"))?;
        let purged = channel
            .queue_purge(
                self.queue.as_str().into(),
                lapin::options::QueuePurgeOptions::default(),
            )
            .await
            .map_err(amqp("purging the work queue"))?;
        let _ = connection.close(200, "purged".into()).await;
        Ok(purged)
    }

    fn timeout(&self, what: String, started: Instant) -> HarnessError {
        HarnessError::Timeout {
            what,
            waited: started.elapsed(),
            detail: self.diagnostics(),
        }
    }

    /// What happened so far, for a failure message.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "--- replicas (t=0 at harness start): {}\n",
            self.recorder.describe(self.started)
        ));
        out.push_str(&format!(
            "--- namespace {} pods:\n    {}\n",
            self.cluster.namespace,
            describe_pods(&self.cluster.pods())
        ));
        for exit in self.exits() {
            out.push_str(&format!("--- exit {exit:?}\n"));
        }
        for pool in &self.pools {
            out.push_str(&format!(
                "--- pool {} replicas: {}\n--- pool {} status: {:?}\n",
                pool.deployment,
                pool.recorder.describe(self.started),
                pool.deployment,
                self.status_of(&pool.deployment)
            ));
        }
        out.push_str(&format!("--- jobs: {:?}\n", self.report()));
        out.push_str(&format!(
            "--- scale patches: {}\n",
            self.scale_patches()
                .iter()
                .map(|r| format!("{} {} by {}", r.status, r.method, r.user))
                .collect::<Vec<_>>()
                .join(" | ")
        ));
        match self.scaler_object(SCALER) {
            Some(object) => out.push_str(&format!(
                "--- scaler status: {}\n",
                object.get("status").cloned().unwrap_or(Value::Null)
            )),
            None => out.push_str("--- no QueueScaler\n"),
        }
        out.push_str(&format!("--- lease holder: {:?}\n", self.lease_holder()));
        for pod in self.cluster.pods_of(CONTROLLER) {
            out.push_str(&format!(
                "--- controller pod {} log (last 40 lines):\n{}\n",
                pod.name,
                self.cluster.controller_log_tail(&pod.name, 40)
            ));
        }
        out.push_str(&format!(
            "--- sender log (last 5 lines):\n{}\n",
            tail(&self.sender.log_text(), 5)
        ));
        out.push_str(&format!("--- run directory: {}\n", self.dir().display()));
        out
    }

    /// Keeps the run directory (logs) after the harness is dropped.
    pub fn keep_dir(&mut self) -> PathBuf {
        match self.dir.take() {
            Some(dir) => dir.keep(),
            None => PathBuf::from("."),
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let diagnostics = self.diagnostics();
            let path = self.keep_dir();
            eprintln!(
                "===== warren-e2e diagnostics (logs kept in {}) =====\n{diagnostics}",
                path.display(),
            );
        } else if std::env::var_os("WARREN_E2E_KEEP").is_some() {
            let path = self.keep_dir();
            eprintln!("warren-e2e: logs kept in {}", path.display());
        }
    }
}

/// A message with `dots` dots (the worker works `dots × seconds_per_dot`).
pub fn job(dots: usize) -> String {
    format!("job{}", ".".repeat(dots))
}

async fn post_job(
    http: &reqwest::Client,
    url: &str,
    message: &str,
) -> Result<String, HarnessError> {
    let err = |source| HarnessError::Http {
        context: format!("POST {url}"),
        source,
    };
    let response = http
        .post(url)
        .json(&json!({"message": message}))
        .send()
        .await
        .map_err(err)?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(err)?;
    if status != 202 {
        return Err(HarnessError::Rejected { status, body });
    }
    let parsed: Value = serde_json::from_str(&body)?;
    parsed
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or(HarnessError::Rejected { status, body })
}

fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
    pairs
        .iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_spec_is_a_valid_scaler() {
        let spec = base_spec("q", "http://127.0.0.1:1", "amqp://127.0.0.1:2");
        spec.validate().unwrap();
        let object = scaler_object("s", spec.clone()).unwrap();
        assert_eq!(object["apiVersion"], "warren.dev/v1alpha1");
        assert_eq!(object["kind"], "QueueScaler");
        assert_eq!(object["metadata"]["namespace"], NAMESPACE);
        assert_eq!(object["spec"]["pollingIntervalSeconds"], 1);
        assert_eq!(
            object["spec"]["broker"]["credentialsSecretRef"]["name"],
            SECRET
        );
        let back: QueueScaler = serde_json::from_value(object).unwrap();
        assert_eq!(back.spec, spec);
    }
}

//! [`Harness`]: one end-to-end environment per test.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use warren_crd::{
    Behavior, BrokerRef, CredentialsSecretRef, Fallback, PolicyType, QueueRef, QueueScaler,
    QueueScalerSpec, QueueScalerStatus, ScaleDownRules, ScaleTargetRef, ScaleUpRules,
    ScalingPolicy, SelectPolicy, TargetKind,
};
use warren_fakekube::resources::{DEPLOYMENTS, LEASES, QUEUESCALERS, SECRETS};
use warren_fakekube::{
    ChildOutput, FakeApiServer, PodExit, ProcessReplicaSet, ProcessTemplate, Readiness,
    RecordedRequest,
};
use warren_testkit::{RabbitNode, RabbitOptions};

use crate::process::tail;
use crate::{
    Binaries, CountingProxy, HarnessError, JobLog, JobReport, Process, ReplicaChange,
    ReplicaRecorder, http_client,
};

/// Namespace of everything in the fake.
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
/// base64("guest"): the private node's user and password.
const GUEST_B64: &str = "Z3Vlc3Q=";

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
    /// How many controller processes to start (0: none; start them later
    /// with [`Harness::start_controller`]).
    pub controllers: usize,
    /// `WARREN_LEADER_ELECTION` (default: on when more than one controller).
    pub leader_election: Option<bool>,
    pub lease_duration_seconds: u64,
    pub lease_grace_seconds: u64,
    /// Run worker pods for the Deployment (a process-backed ReplicaSet).
    pub workers: bool,
    /// Create the QueueScaler (from [`base_spec`] plus the edit).
    pub create_scaler: bool,
    /// Route the scaler's management URL through a [`CountingProxy`].
    pub count_management_requests: bool,
    /// More environment for the controllers.
    pub controller_env: Vec<(String, String)>,
    /// Before starting the controllers, wait until the management API
    /// reports counts for the work queue (RabbitMQ collects them only some
    /// seconds after a queue is declared; a fresh queue is a real condition
    /// the controller must handle, so this is off by default).
    /// `WARREN_E2E_WAIT_FOR_QUEUE_STATS=1` turns it on for every harness.
    pub wait_for_queue_stats: bool,
    /// Applied to [`base_spec`] before the QueueScaler is created (see [`HarnessOptions::scaler`]).
    pub spec_edit: Option<SpecEdit>,
    /// More worker pools, by suffix (e.g. `sms`): each gets its own queue
    /// `<queue>-<suffix>` (accepted by the sender through `WARREN_QUEUES`),
    /// its own Deployment `warren-worker-<suffix>` run by its own process
    /// ReplicaSet, and a replica recorder. Their QueueScalers are the
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
    pub workers: ProcessReplicaSet,
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
            workers: true,
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

/// A QueueScaler object for the fake, in [`NAMESPACE`].
pub fn scaler_object(name: &str, spec: QueueScalerSpec) -> Result<Value, HarnessError> {
    let mut object = serde_json::to_value(QueueScaler::new(name, spec))?;
    object["metadata"]["namespace"] = json!(NAMESPACE);
    Ok(object)
}

/// A Deployment object for the fake (no pods until something runs them).
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
pub struct Harness {
    pub queue: String,
    pub queue_kind: QueueKind,
    pub node: RabbitNode,
    pub api: FakeApiServer,
    pub workers: Option<ProcessReplicaSet>,
    pub sender: Process,
    pub controllers: Vec<Process>,
    pub recorder: ReplicaRecorder,
    pub proxy: Option<CountingProxy>,
    pub binaries: Binaries,
    pub started: Instant,
    /// The extra worker pools, in the order of [`HarnessOptions::extra_pools`].
    pub pools: Vec<Pool>,
    leader_election: bool,
    lease_duration_seconds: u64,
    lease_grace_seconds: u64,
    controller_env: Vec<(String, String)>,
    kubeconfig: PathBuf,
    dir: Option<tempfile::TempDir>,
    sent: Mutex<Vec<String>>,
    http: reqwest::Client,
}

impl Harness {
    /// Starts the broker, the fake API server (Deployment, Secret,
    /// QueueScaler), the worker ReplicaSet, the sender and the controllers.
    pub async fn start(options: HarnessOptions) -> Result<Self, HarnessError> {
        let started = Instant::now();
        let binaries = Binaries::locate()?;
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
            ..RabbitOptions::default()
        })
        .await?;

        let api = FakeApiServer::start().await?;
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        api.put_object(
            &SECRETS,
            json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": SECRET, "namespace": NAMESPACE},
                "type": "Opaque",
                "data": {"username": GUEST_B64, "password": GUEST_B64},
            }),
        )?;
        api.put_object(
            &DEPLOYMENTS,
            deployment_object(DEPLOYMENT, 0, options.grace_seconds),
        )?;
        let recorder = ReplicaRecorder::start(&api, &DEPLOYMENTS, NAMESPACE, DEPLOYMENT);

        let proxy = if options.count_management_requests {
            Some(CountingProxy::start(&node.management_url()).await?)
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

        let worker_template = |queue: &str| {
            ProcessTemplate::new(&binaries.worker)
                .env("AMQP_URL", node.amqp_url())
                .env("WARREN_QUEUE", queue)
                .env("WARREN_QUEUE_TYPE", options.queue_kind.as_str())
                .env(
                    "WARREN_SECONDS_PER_DOT",
                    options.seconds_per_dot.to_string(),
                )
                .env("WARREN_PREFETCH", "1")
                .env("WARREN_LOG_FORMAT", "json")
                // `job started` is a debug line; the job log needs it.
                .env("WARREN_LOG", "info,warren_worker::job=debug")
                .env("WARREN_RECONNECT_MIN_MS", "100")
                .env("WARREN_RECONNECT_MAX_MS", "1000")
                .readiness(Readiness::HttpGet {
                    path: "/readyz".into(),
                })
                .output(ChildOutput::Files(dir.path().join("pods")))
        };
        let workers = options.workers.then(|| {
            let template = worker_template(&queue).env("WARREN_QUEUES", worker_queues.join(","));
            ProcessReplicaSet::start(&api, NAMESPACE, DEPLOYMENT, template)
        });
        let mut pools = Vec::new();
        for (suffix, pool_queue) in options.extra_pools.iter().zip(pool_queues) {
            let deployment = format!("{DEPLOYMENT}-{suffix}");
            api.put_object(
                &DEPLOYMENTS,
                deployment_object(&deployment, 0, options.grace_seconds),
            )?;
            pools.push(Pool {
                suffix: suffix.clone(),
                recorder: ReplicaRecorder::start(&api, &DEPLOYMENTS, NAMESPACE, &deployment),
                workers: ProcessReplicaSet::start(
                    &api,
                    NAMESPACE,
                    &deployment,
                    worker_template(&pool_queue),
                ),
                queue: pool_queue,
                deployment,
            });
        }

        let mut harness = Self {
            queue,
            queue_kind: options.queue_kind,
            node,
            api,
            workers,
            sender,
            controllers: Vec::new(),
            recorder,
            proxy,
            binaries,
            started,
            pools,
            leader_election: options.leader_election.unwrap_or(options.controllers > 1),
            lease_duration_seconds: options.lease_duration_seconds,
            lease_grace_seconds: options.lease_grace_seconds,
            controller_env: options.controller_env,
            kubeconfig,
            dir: Some(dir),
            sent: Mutex::default(),
            http,
        };

        if options.create_scaler {
            let mut spec = harness.default_spec();
            if let Some(edit) = options.spec_edit {
                edit(&mut spec);
            }
            harness.put_scaler(SCALER, spec)?;
        }
        if options.wait_for_queue_stats {
            let waited = harness
                .wait_for_queue_stats(Duration::from_secs(60))
                .await?;
            tracing::info!(?waited, "management API reports counts for the work queue");
        }
        for i in 0..options.controllers {
            harness
                .start_controller(&format!("warren-controller-{i}"))
                .await?;
        }
        Ok(harness)
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
        loop {
            let alive: Vec<String> = self
                .workers
                .as_ref()
                .map(|w| {
                    w.pods()
                        .into_iter()
                        .filter(|p| !p.terminating)
                        .map(|p| p.name)
                        .collect()
                })
                .unwrap_or_default();
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

    /// [`base_spec`] for this harness's queue and broker.
    pub fn default_spec(&self) -> QueueScalerSpec {
        let management = match &self.proxy {
            Some(proxy) => proxy.url(),
            None => self.node.management_url(),
        };
        base_spec(
            &self.queue,
            &management,
            &format!("amqp://127.0.0.1:{}", self.node.amqp_port()),
        )
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

    /// The status of the QueueScaler `name`, as the controller last wrote it.
    pub fn status_of(&self, name: &str) -> Option<QueueScalerStatus> {
        let object = self.api.get_object(&QUEUESCALERS, NAMESPACE, name)?;
        serde_json::from_value(object.get("status")?.clone()).ok()
    }

    /// Creates or replaces a QueueScaler.
    pub fn put_scaler(&self, name: &str, spec: QueueScalerSpec) -> Result<(), HarnessError> {
        self.api
            .put_object(&QUEUESCALERS, scaler_object(name, spec)?)?;
        Ok(())
    }

    /// Applies a JSON merge patch to the QueueScaler's spec (as `kubectl
    /// patch --type merge` would; the generation moves).
    pub fn patch_scaler_spec(&self, spec_patch: Value) -> Result<(), HarnessError> {
        self.api.patch_object(
            &QUEUESCALERS,
            NAMESPACE,
            SCALER,
            &json!({"spec": spec_patch}),
        )?;
        Ok(())
    }

    /// Run directory (logs, kubeconfig).
    pub fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new("."))
    }

    /// Where the worker pods write their logs.
    pub fn pods_dir(&self) -> PathBuf {
        self.dir().join("pods")
    }

    /// Starts a controller process named `name` (its `POD_NAME`) and waits
    /// until it serves `/healthz`.
    pub async fn start_controller(&mut self, name: &str) -> Result<(), HarnessError> {
        let mut vars = vec![
            (
                "KUBECONFIG".to_string(),
                self.kubeconfig.display().to_string(),
            ),
            ("POD_NAME".into(), name.into()),
            ("POD_NAMESPACE".into(), NAMESPACE.into()),
            (
                "WARREN_LEADER_ELECTION".into(),
                self.leader_election.to_string(),
            ),
            ("WARREN_LEASE_NAME".into(), LEASE.into()),
            (
                "WARREN_LEASE_DURATION_SECONDS".into(),
                self.lease_duration_seconds.to_string(),
            ),
            (
                "WARREN_LEASE_GRACE_SECONDS".into(),
                self.lease_grace_seconds.to_string(),
            ),
            ("WARREN_LOG_FORMAT".into(), "json".into()),
            ("WARREN_LOG".into(), "info,warren_controller=debug".into()),
            // Audit events (scaler.scaled) go to this broker.
            ("AMQP_URL".into(), self.node.amqp_url()),
        ];
        vars.extend(self.controller_env.iter().cloned());
        let vars: Vec<(OsString, OsString)> = vars
            .into_iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect();
        let mut process = Process::spawn(
            &self.binaries.controller,
            name,
            &vars,
            &self.dir().join("logs"),
        )?;
        process
            .wait_http_ok("/healthz", Duration::from_secs(30))
            .await?;
        self.controllers.push(process);
        Ok(())
    }

    /// The controller process named `name`.
    pub fn controller(&self, name: &str) -> Option<&Process> {
        self.controllers.iter().find(|c| c.name == name)
    }

    /// Holder of the leader Lease, if any.
    pub fn lease_holder(&self) -> Option<String> {
        self.api
            .get_object(&LEASES, NAMESPACE, LEASE)?
            .pointer("/spec/holderIdentity")?
            .as_str()
            .map(str::to_string)
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

    /// The worker logs as they are now.
    pub fn job_log(&self) -> JobLog {
        JobLog::read(&self.pods_dir())
    }

    /// Exits of worker pod processes (every pool's).
    pub fn exits(&self) -> Vec<PodExit> {
        let mut exits = self.workers.as_ref().map(|w| w.exits()).unwrap_or_default();
        for pool in &self.pools {
            exits.extend(pool.workers.exits());
        }
        exits
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
        loop {
            let alive: BTreeSet<String> = self
                .workers
                .as_ref()
                .map(|w| w.pods().into_iter().map(|p| p.name).collect())
                .unwrap_or_default();
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
            .wait_value(timeout, |v| v == n)
            .await
            .ok_or_else(|| self.timeout(format!("the Deployment to have {n} replicas"), started))
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
            .wait_change(since, timeout, pred)
            .await
            .ok_or_else(|| self.timeout(what.to_string(), started))
    }

    /// Waits until `n` worker pods run, are ready and none is terminating.
    pub async fn wait_pods_ready(&self, n: usize, timeout: Duration) -> Result<(), HarnessError> {
        let started = Instant::now();
        let ok = match &self.workers {
            Some(workers) => workers.wait_for_ready(n, timeout).await,
            None => false,
        };
        if ok {
            Ok(())
        } else {
            Err(self.timeout(format!("{n} ready worker pods"), started))
        }
    }

    /// The QueueScaler's status as the controller last wrote it.
    pub fn scaler_status(&self) -> Option<QueueScalerStatus> {
        let object = self.api.get_object(&QUEUESCALERS, NAMESPACE, SCALER)?;
        serde_json::from_value(object.get("status")?.clone()).ok()
    }

    /// Waits until the QueueScaler's status satisfies `pred`.
    pub async fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&QueueScalerStatus) -> bool,
    ) -> Result<QueueScalerStatus, HarnessError> {
        let started = Instant::now();
        let found = self
            .api
            .wait_for_object(&QUEUESCALERS, NAMESPACE, SCALER, timeout, |object| {
                object
                    .get("status")
                    .and_then(|s| serde_json::from_value::<QueueScalerStatus>(s.clone()).ok())
                    .is_some_and(|s| pred(&s))
            })
            .await;
        found
            .and_then(|o| serde_json::from_value(o.get("status")?.clone()).ok())
            .ok_or_else(|| self.timeout(what.to_string(), started))
    }

    /// PATCH requests to the Deployment's `/scale` subresource.
    pub fn scale_patches(&self) -> Vec<RecordedRequest> {
        let path = format!("/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{DEPLOYMENT}/scale");
        self.api
            .requests()
            .into_iter()
            .filter(|r| r.method == "PATCH" && r.path == path)
            .collect()
    }

    /// Writes to the Deployment other than through `/scale` (the controller
    /// should only ever use `/scale`).
    pub fn other_deployment_writes(&self) -> Vec<RecordedRequest> {
        let base = format!("/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{DEPLOYMENT}");
        self.api
            .requests()
            .into_iter()
            .filter(|r| matches!(r.method.as_str(), "PATCH" | "PUT" | "POST"))
            .filter(|r| r.path == base)
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
        if let Some(workers) = &self.workers {
            let pods: Vec<String> = workers
                .pods()
                .iter()
                .map(|p| {
                    format!(
                        "{}{}{}",
                        p.name,
                        if p.ready { "" } else { " (not ready)" },
                        if p.terminating { " (terminating)" } else { "" }
                    )
                })
                .collect();
            out.push_str(&format!("--- pods: {}\n", pods.join(", ")));
            for exit in workers.exits() {
                out.push_str(&format!(
                    "--- exit {}: code {:?} signal {:?} sigterm {} sigkill {} after {:.1}s\n",
                    exit.pod,
                    exit.code,
                    exit.signal,
                    exit.sigterm_sent,
                    exit.sigkill_sent,
                    exit.ran_for.as_secs_f64()
                ));
            }
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
                .map(|r| format!("{} {}", r.status, r.body))
                .collect::<Vec<_>>()
                .join(" | ")
        ));
        match self.api.get_object(&QUEUESCALERS, NAMESPACE, SCALER) {
            Some(object) => out.push_str(&format!(
                "--- scaler status: {}\n",
                object.get("status").cloned().unwrap_or(Value::Null)
            )),
            None => out.push_str("--- no QueueScaler\n"),
        }
        out.push_str(&format!("--- lease holder: {:?}\n", self.lease_holder()));
        for controller in &self.controllers {
            out.push_str(&format!(
                "--- {} log (last 40 lines):\n{}\n",
                controller.name,
                controller.log_tail(40)
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

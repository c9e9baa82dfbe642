//! The Kubernetes side of a [`Harness`](crate::Harness): one namespace of a
//! real Kubernetes control plane (`make local-up`: kube-apiserver, the
//! ReplicaSet and Deployment controllers, the scheduler, and a node agent that
//! runs pods as local processes).
//!
//! Per test: a namespace; the chart's worker Deployment(s), controller
//! Deployment, ServiceAccount, Role and RoleBinding, rendered by `helm
//! template` from `charts/warren` and created as they are, except the worker
//! count (0 to start), the grace period and the broker address; a Secret
//! `warren-rabbitmq` with the private node's credentials. The broker is the
//! harness's private RabbitMQ node on this machine, reached by the pods
//! through the node's bridge address (its AMQP, management and Prometheus
//! listeners serve every interface). The sender runs on this machine.
//!
//! What a test reads back comes from the apiserver and the node: replica
//! history from a watch of the Deployment, worker pods and their exits from a
//! pod watch, the job log from the container log files the node agent keeps
//! (`<state>/nodeagent/logs/pods/<namespace>_<pod>_<uid>/<container>/<restart>.log`,
//! kept after the pod is gone), `/scale` writes from the apiserver's audit
//! log, the QueueScaler and the leader Lease from watches, controller metrics
//! from the pod IP.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use warren_crd::QueueScaler;

use crate::{HarnessError, JobLog, ReplicaRecorder};

/// The local cluster's state directory (`make local-up` writes
/// `admin.kubeconfig`, `logs/audit.log` and `nodeagent/logs/pods/` there). When set, every
/// [`Harness`](crate::Harness) runs on that cluster; a cluster that does not
/// answer is an error, never a skip.
pub const CLUSTER_ENV: &str = "WARREN_E2E_CLUSTER";

/// The chart's pod-deletion-cost annotation (set by the controller).
const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// The controller Deployment the chart renders with `fullnameOverride=warren`.
pub const CONTROLLER: &str = "warren-controller";

/// The cluster state directory from [`CLUSTER_ENV`], if set.
pub fn cluster_state_dir() -> Option<PathBuf> {
    std::env::var_os(CLUSTER_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn kube_err(context: impl Into<String>) -> impl FnOnce(kube::Error) -> HarnessError {
    let context = context.into();
    move |source| HarnessError::Kube { context, source }
}

/// One instance of a container (the pod's `restart`-th run) that ended.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceExit {
    pub restart: i32,
    pub code: i32,
    pub signal: Option<i32>,
    /// The pod was being deleted when it ended (SIGTERM from the kubelet).
    pub while_deleting: bool,
    pub ran_for: Duration,
}

/// A pod of the namespace as the pod watch last saw it (deleted ones stay).
#[derive(Debug, Clone, Default)]
pub struct PodRecord {
    pub name: String,
    pub uid: String,
    /// The Deployment owning it (its ReplicaSet's name without the hash).
    pub deployment: String,
    pub ip: Option<String>,
    pub ready: bool,
    /// When the watch first showed it Ready (wall clock of this machine).
    pub ready_since: Option<chrono::DateTime<chrono::Utc>>,
    pub terminating: bool,
    pub deleted: bool,
    pub restart_count: i32,
    pub cost: Option<i64>,
    pub exits: BTreeMap<i32, InstanceExit>,
    /// Seen when the pod first showed a deletionTimestamp: its own cost and
    /// readiness and those of the other live pods of its Deployment.
    pub deletion: Option<DeletionSnapshot>,
}

/// The ranking inputs at the moment a pod started terminating.
#[derive(Debug, Clone)]
pub struct DeletionSnapshot {
    pub at: Instant,
    pub cost: i64,
    pub ready: bool,
    /// Other pods of the Deployment, live and not terminating: (name, cost, ready).
    pub kept: Vec<(String, i64, bool)>,
}

/// The name a container instance goes by in the job log and the exits: the
/// pod's name for its first run, `<pod>#<restart>` after a restart.
pub fn instance_name(pod: &str, restart: i32) -> String {
    if restart == 0 {
        pod.to_string()
    } else {
        format!("{pod}#{restart}")
    }
}

/// What the watches keep.
#[derive(Default)]
struct Stores {
    pods: BTreeMap<String, PodRecord>,
    scalers: BTreeMap<String, Value>,
    lease_holder: Option<String>,
}

/// A namespace on the cluster and the watches over it. Dropping it deletes
/// the namespace (and so every pod in it).
pub struct Cluster {
    pub client: Client,
    pub namespace: String,
    /// The node's InternalIP: where pods reach processes of this machine.
    pub node_ip: String,
    state_dir: PathBuf,
    stores: Arc<Mutex<Stores>>,
    changed: watch::Receiver<u64>,
    tasks: Vec<JoinHandle<()>>,
    http: reqwest::Client,
}

/// What the cluster backend needs from the harness's options.
pub struct ClusterSetup<'a> {
    pub namespace: &'a str,
    pub queue: &'a str,
    pub queue_type: &'a str,
    /// `amqp://HOST:PORT/%2f` without credentials, as pods reach the node.
    pub amqp_host_port: String,
    pub seconds_per_dot: f64,
    pub grace_seconds: u64,
    pub controllers: usize,
    pub leader_election: bool,
    pub lease_duration_seconds: u64,
    pub lease_grace_seconds: u64,
    pub controller_env: &'a [(String, String)],
    /// Queues of the main pool besides `queue`.
    pub worker_queues: &'a [String],
    /// Extra pools: (deployment suffix, queue).
    pub extra_pools: &'a [(String, String)],
}

impl Cluster {
    /// Connects to the cluster in `state_dir` and returns its node address
    /// (no namespace yet).
    pub async fn connect(state_dir: &Path) -> Result<(Client, String), HarnessError> {
        let kubeconfig = state_dir.join("admin.kubeconfig");
        let unreachable = |why: String| {
            HarnessError::Other(format!(
                "no cluster at {} ({CLUSTER_ENV}): {why}; start one with `make local-up`",
                state_dir.display()
            ))
        };
        let config = kube::config::Kubeconfig::read_from(&kubeconfig)
            .map_err(|e| unreachable(format!("reading {}: {e}", kubeconfig.display())))?;
        let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
            .await
            .map_err(|e| unreachable(format!("kubeconfig: {e}")))?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::try_from(config).map_err(|e| unreachable(e.to_string()))?;
        tokio::time::timeout(Duration::from_secs(20), client.apiserver_version())
            .await
            .map_err(|_| unreachable("the apiserver did not answer in 20 s".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let nodes = Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await
            .map_err(kube_err("listing nodes"))?;
        let node_ip = nodes
            .items
            .iter()
            .flat_map(|n| n.status.iter().flat_map(|s| s.addresses.iter().flatten()))
            .find(|a| a.type_ == "InternalIP")
            .map(|a| a.address.clone())
            .ok_or_else(|| unreachable("no node with an InternalIP".into()))?;
        Ok((client, node_ip))
    }

    /// Creates the namespace and the chart's objects, starts the watches and
    /// waits for the controller pods to be Ready.
    pub async fn start(
        state_dir: PathBuf,
        client: Client,
        node_ip: String,
        setup: ClusterSetup<'_>,
    ) -> Result<Self, HarnessError> {
        let namespace = setup.namespace.to_string();
        Api::<Namespace>::all(client.clone())
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": namespace, "labels": {"warren.dev/e2e": "true"}},
                }))?,
            )
            .await
            .map_err(kube_err(format!("creating namespace {namespace}")))?;
        let (notify, changed) = watch::channel(0u64);
        let mut cluster = Self {
            client: client.clone(),
            namespace: namespace.clone(),
            node_ip,
            state_dir,
            stores: Arc::default(),
            changed,
            tasks: Vec::new(),
            http: crate::http_client()?,
        };
        let notify = Arc::new(notify);
        cluster.tasks.push(watch_pods(
            Api::namespaced(client.clone(), &namespace),
            cluster.stores.clone(),
            notify.clone(),
        ));
        cluster.tasks.push(watch_scalers(
            Api::namespaced(client.clone(), &namespace),
            cluster.stores.clone(),
            notify.clone(),
        ));
        cluster.tasks.push(watch_lease(
            Api::namespaced(client.clone(), &namespace),
            cluster.stores.clone(),
            notify,
        ));

        let guest = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": crate::SECRET, "namespace": namespace},
            "type": "Opaque",
            "stringData": {"username": "guest", "password": "guest"},
        });
        create::<Secret>(&client, &namespace, guest).await?;
        for object in render_chart(&namespace, &setup)? {
            let kind = object["kind"].as_str().unwrap_or_default().to_string();
            match kind.as_str() {
                "ServiceAccount" => create::<ServiceAccount>(&client, &namespace, object).await?,
                "Role" => create::<Role>(&client, &namespace, object).await?,
                "RoleBinding" => create::<RoleBinding>(&client, &namespace, object).await?,
                "Deployment" => create::<Deployment>(&client, &namespace, object).await?,
                other => {
                    return Err(HarnessError::Other(format!(
                        "the chart rendered a {other} the cluster backend does not create"
                    )));
                }
            }
        }
        if setup.controllers > 0 {
            cluster
                .wait_pods(Duration::from_secs(180), "controller pods Ready", |pods| {
                    pods.iter()
                        .filter(|p| p.deployment == CONTROLLER && !p.deleted && p.ready)
                        .count()
                        >= setup.controllers
                })
                .await?;
        }
        Ok(cluster)
    }

    /// A recorder of `spec.replicas` of the Deployment `name`, from a watch.
    pub fn recorder(&self, name: &str) -> ReplicaRecorder {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        ReplicaRecorder::from_source(move |mut recording| async move {
            let stream = watcher(api, config).default_backoff();
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                if let Ok(watcher::Event::Apply(d) | watcher::Event::InitApply(d)) = event
                    && let Some(n) = d.spec.as_ref().and_then(|s| s.replicas)
                {
                    recording.record(i64::from(n));
                }
            }
        })
    }

    fn stores(&self) -> std::sync::MutexGuard<'_, Stores> {
        self.stores.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every pod of the namespace seen so far (deleted ones included).
    pub fn pods(&self) -> Vec<PodRecord> {
        self.stores().pods.values().cloned().collect()
    }

    /// Pods of the Deployment `deployment` seen so far.
    pub fn pods_of(&self, deployment: &str) -> Vec<PodRecord> {
        self.pods()
            .into_iter()
            .filter(|p| p.deployment == deployment)
            .collect()
    }

    /// Waits until `pred` holds for the pods.
    pub async fn wait_pods(
        &self,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&[PodRecord]) -> bool,
    ) -> Result<(), HarnessError> {
        let mut changed = self.changed.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            changed.borrow_and_update();
            if pred(&self.pods()) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return Err(HarnessError::Other(format!(
                    "timed out after {timeout:?} waiting for {what}: pods {:?}",
                    self.pods().iter().map(describe_pod).collect::<Vec<_>>()
                )));
            }
        }
    }

    /// The QueueScaler `name` as the watch last saw it.
    pub fn scaler(&self, name: &str) -> Option<Value> {
        self.stores().scalers.get(name).cloned()
    }

    /// Every QueueScaler of the namespace.
    pub fn scalers(&self) -> Vec<Value> {
        self.stores().scalers.values().cloned().collect()
    }

    /// Waits until the QueueScaler `name` satisfies `pred`.
    pub async fn wait_scaler(
        &self,
        name: &str,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Option<Value> {
        let mut changed = self.changed.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            changed.borrow_and_update();
            if let Some(object) = self.scaler(name).filter(|o| pred(o)) {
                return Some(object);
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// Holder of the leader Lease.
    pub fn lease_holder(&self) -> Option<String> {
        self.stores().lease_holder.clone()
    }

    /// Creates or replaces (server-side apply) a QueueScaler.
    pub async fn put_scaler(&self, mut object: Value) -> Result<(), HarnessError> {
        object["metadata"]["namespace"] = json!(self.namespace);
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        Api::<QueueScaler>::namespaced(self.client.clone(), &self.namespace)
            .patch(
                &name,
                &PatchParams::apply("warren-e2e").force(),
                &Patch::Apply(object),
            )
            .await
            .map_err(kube_err(format!("applying QueueScaler {name}")))?;
        Ok(())
    }

    /// A JSON merge patch on a QueueScaler.
    pub async fn merge_patch_scaler(&self, name: &str, patch: Value) -> Result<(), HarnessError> {
        Api::<QueueScaler>::namespaced(self.client.clone(), &self.namespace)
            .patch(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(kube_err(format!("patching QueueScaler {name}")))?;
        Ok(())
    }

    /// Creates a Deployment (namespace set to this one).
    pub async fn create_deployment(&self, mut object: Value) -> Result<(), HarnessError> {
        object["metadata"]["namespace"] = json!(self.namespace);
        create::<Deployment>(&self.client, &self.namespace, object).await
    }

    /// Kubernetes Events of the namespace (core and events.k8s.io), as JSON.
    pub async fn events(&self) -> Result<Vec<Value>, HarnessError> {
        let core: Api<k8s_openapi::api::core::v1::Event> =
            Api::namespaced(self.client.clone(), &self.namespace);
        let mut out = Vec::new();
        for e in core
            .list(&ListParams::default())
            .await
            .map_err(kube_err("listing events"))?
        {
            out.push(serde_json::to_value(e)?);
        }
        let new: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &self.namespace);
        for e in new
            .list(&ListParams::default())
            .await
            .map_err(kube_err("listing events.k8s.io events"))?
        {
            out.push(serde_json::to_value(e)?);
        }
        Ok(out)
    }

    /// Deletes a pod (the kubelet sends SIGTERM, waits for the grace period,
    /// then SIGKILL).
    pub async fn delete_pod(&self, name: &str) -> Result<(), HarnessError> {
        Api::<Pod>::namespaced(self.client.clone(), &self.namespace)
            .delete(name, &DeleteParams::default())
            .await
            .map_err(kube_err(format!("deleting pod {name}")))?;
        Ok(())
    }

    /// Sends `signal` to the process of `pod`'s container running `program`
    /// (found by its executable's name and its `POD_NAME`): a crash, not a
    /// deletion.
    pub fn signal_pod_process(
        &self,
        pod: &str,
        program: &str,
        signal: nix::sys::signal::Signal,
    ) -> Result<(), HarnessError> {
        let pid = find_pod_process(pod, program).ok_or_else(|| {
            HarnessError::Other(format!("no {program} process with POD_NAME={pod}"))
        })?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
            .map_err(|e| HarnessError::Other(format!("kill {signal} {pid} ({pod}): {e}")))
    }

    /// The pid of `pod`'s container process running `program`.
    pub fn pod_pid(&self, pod: &str, program: &str) -> Option<i32> {
        find_pod_process(pod, program)
    }

    /// `GET http://<pod IP>:<port><path>`.
    pub async fn pod_get(&self, pod: &str, port: u16, path: &str) -> Result<String, HarnessError> {
        let ip = self
            .stores()
            .pods
            .get(pod)
            .and_then(|p| p.ip.clone())
            .ok_or_else(|| HarnessError::Other(format!("pod {pod} has no IP")))?;
        let url = format!("http://{ip}:{port}{path}");
        let err = |source| HarnessError::Http {
            context: format!("GET {url}"),
            source,
        };
        let response = self.http.get(&url).send().await.map_err(err)?;
        let status = response.status().as_u16();
        let body = response.text().await.map_err(err)?;
        if status != 200 {
            return Err(HarnessError::Other(format!("GET {url} answered {status}")));
        }
        Ok(body)
    }

    /// The container logs of this namespace's pods, for `container`:
    /// (instance name, path) in pod then restart order.
    fn log_files(&self, container: &str) -> Vec<(String, String, PathBuf)> {
        let root = self.state_dir.join("nodeagent").join("logs").join("pods");
        let prefix = format!("{}_", self.namespace);
        let mut files = Vec::new();
        let Ok(entries) = std::fs::read_dir(&root) else {
            return files;
        };
        for entry in entries.flatten() {
            let dir_name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = dir_name.strip_prefix(&prefix) else {
                continue;
            };
            let Some((pod, _uid)) = rest.rsplit_once('_') else {
                continue;
            };
            let Ok(logs) = std::fs::read_dir(entry.path().join(container)) else {
                continue;
            };
            for log in logs.flatten() {
                let path = log.path();
                let restart = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(|s| s.parse::<i32>().ok());
                if let Some(restart) = restart {
                    files.push((pod.to_string(), instance_name(pod, restart), path));
                }
            }
        }
        files.sort();
        files
    }

    /// Every worker container's log (every pool), by instance.
    pub fn job_log(&self) -> JobLog {
        JobLog::from_files(
            self.log_files("worker")
                .into_iter()
                .map(|(_, instance, path)| (instance, path)),
        )
    }

    /// The last `lines` lines of the controller pod `pod`'s current log.
    pub fn controller_log_tail(&self, pod: &str, lines: usize) -> String {
        let text = self
            .log_files("controller")
            .into_iter()
            .filter(|(p, _, _)| p == pod)
            .map(|(_, _, path)| std::fs::read_to_string(path).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("");
        crate::process::tail(&text, lines)
    }

    /// Writes through the apiserver to `deployments/<name>[/<subresource>]`
    /// of this namespace, from its audit log, in order.
    pub fn deployment_writes(&self, name: &str, subresource: Option<&str>) -> Vec<ApiWrite> {
        let text = std::fs::read_to_string(self.state_dir.join("logs").join("audit.log"))
            .unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|e| e["stage"] == "ResponseComplete")
            .filter(|e| {
                let o = &e["objectRef"];
                o["namespace"] == self.namespace.as_str()
                    && o["resource"] == "deployments"
                    && o["name"] == name
                    && o["subresource"].as_str() == subresource
            })
            .filter(|e| matches!(e["verb"].as_str(), Some("patch" | "update" | "create")))
            .map(|e| ApiWrite {
                method: e["verb"].as_str().unwrap_or_default().to_uppercase(),
                path: e["requestURI"].as_str().unwrap_or_default().to_string(),
                user: e
                    .pointer("/user/username")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                status: e
                    .pointer("/responseStatus/code")
                    .and_then(Value::as_u64)
                    .unwrap_or(0) as u16,
            })
            .collect()
    }

    /// The controller's identity as the apiserver sees it.
    pub fn controller_user(&self) -> String {
        format!("system:serviceaccount:{}:{CONTROLLER}", self.namespace)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if std::env::var_os("WARREN_E2E_KEEP").is_some() {
            eprintln!("warren-e2e: namespace {} kept", self.namespace);
            return;
        }
        // Drop runs on the test's runtime, which this blocks: delete the
        // namespace from a thread with its own runtime and its own client (a
        // client's background task lives on the runtime that made it).
        let state_dir = self.state_dir.clone();
        let namespace = self.namespace.clone();
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async move {
                let (client, _) = Cluster::connect(&state_dir)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::time::timeout(
                    Duration::from_secs(30),
                    Api::<Namespace>::all(client).delete(&namespace, &DeleteParams::background()),
                )
                .await
                .map_err(|_| "no answer in 30 s".to_string())?
                .map(|_| ())
                .map_err(|e| e.to_string())
            })
        })
        .join();
        if let Ok(Err(err)) | Err(err) = deleted.map_err(|_| "panicked".to_string()) {
            eprintln!("warren-e2e: deleting namespace {}: {err}", self.namespace);
        }
    }
}

/// A write to the API as the apiserver's audit log recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiWrite {
    pub method: String,
    pub path: String,
    pub user: String,
    pub status: u16,
}

async fn create<K>(client: &Client, namespace: &str, object: Value) -> Result<(), HarnessError>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug,
{
    let typed: K = serde_json::from_value(object)?;
    let name = typed.meta().name.clone().unwrap_or_default();
    Api::<K>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &typed)
        .await
        .map_err(kube_err(format!("creating {} {name}", K::kind(&()))))?;
    Ok(())
}

/// The chart's worker, controller and RBAC objects for this namespace, with
/// the worker count, grace period, broker address and the test's settings
/// applied.
fn render_chart(namespace: &str, setup: &ClusterSetup<'_>) -> Result<Vec<Value>, HarnessError> {
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../charts/warren");
    let mut pools = vec![json!({
        "name": "worker",
        "queues": std::iter::once(setup.queue.to_string())
            .chain(setup.worker_queues.iter().cloned())
            .collect::<Vec<_>>(),
    })];
    for (suffix, queue) in setup.extra_pools {
        pools.push(json!({"name": format!("worker-{suffix}"), "queues": [queue]}));
    }
    let extra: Vec<String> = setup
        .worker_queues
        .iter()
        .cloned()
        .chain(setup.extra_pools.iter().map(|(_, q)| q.clone()))
        .collect();
    let values = json!({
        "fullnameOverride": "warren",
        "queue": {"name": setup.queue, "type": setup.queue_type, "extra": extra},
        "log": {"format": "json", "filter": "info,warren_worker::job=debug,warren_controller=debug"},
        "worker": {
            "pools": pools,
            "secondsPerDot": setup.seconds_per_dot,
            "prefetch": 1,
            // Rendered with a grace period the chart accepts, then set to the test's.
            "longestJobSeconds": 1,
            "terminationGracePeriodSeconds": 600,
        },
        "controller": {
            "replicas": setup.controllers,
            "leaderElection": setup.leader_election,
        },
    });
    let dir = tempfile::tempdir().map_err(|source| HarnessError::Io {
        context: "a directory for the chart values".into(),
        source,
    })?;
    let values_path = dir.path().join("values.json");
    std::fs::write(&values_path, serde_json::to_vec(&values)?).map_err(|source| {
        HarnessError::Io {
            context: "writing the chart values".into(),
            source,
        }
    })?;
    let helm = std::env::var("HELM").unwrap_or_else(|_| "helm".into());
    let output = std::process::Command::new(&helm)
        .arg("template")
        .arg("warren")
        .arg(&chart)
        .args(["--namespace", namespace, "-f"])
        .arg(&values_path)
        .args([
            "--show-only",
            "templates/worker.yaml",
            "--show-only",
            "templates/controller.yaml",
            "--show-only",
            "templates/controller-rbac.yaml",
        ])
        .output()
        .map_err(|source| HarnessError::Io {
            context: format!("running {helm} template (install it with .ci/install-tools.sh)"),
            source,
        })?;
    if !output.status.success() {
        return Err(HarnessError::Other(format!(
            "helm template failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let mut objects = Vec::new();
    for doc in text.split("\n---") {
        if doc
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            continue;
        }
        let mut object: Value = serde_saphyr::from_str(doc)
            .map_err(|e| HarnessError::Other(format!("parsing the rendered chart: {e}\n{doc}")))?;
        if object["kind"] == "Deployment" {
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            if name == CONTROLLER {
                let mut env = vec![
                    (
                        "WARREN_LEASE_DURATION_SECONDS".to_string(),
                        setup.lease_duration_seconds.to_string(),
                    ),
                    (
                        "WARREN_LEASE_GRACE_SECONDS".to_string(),
                        setup.lease_grace_seconds.to_string(),
                    ),
                ];
                env.extend(setup.controller_env.iter().cloned());
                set_env(&mut object, &env);
            } else {
                object["spec"]["replicas"] = json!(0);
                object["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] =
                    json!(setup.grace_seconds);
                let amqp = format!(
                    "amqp://$(RABBITMQ_USERNAME):$(RABBITMQ_PASSWORD)@{}/%2f",
                    setup.amqp_host_port
                );
                set_env(
                    &mut object,
                    &[
                        ("AMQP_URL".into(), amqp),
                        ("WARREN_RECONNECT_MIN_MS".into(), "100".into()),
                        ("WARREN_RECONNECT_MAX_MS".into(), "1000".into()),
                    ],
                );
            }
        }
        objects.push(object);
    }
    Ok(objects)
}

/// Sets (replaces or appends) env vars of every container of a Deployment.
fn set_env(deployment: &mut Value, vars: &[(String, String)]) {
    let Some(containers) = deployment
        .pointer_mut("/spec/template/spec/containers")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for container in containers {
        let env = container
            .as_object_mut()
            .map(|c| c.entry("env").or_insert_with(|| json!([])));
        let Some(env) = env.and_then(Value::as_array_mut) else {
            continue;
        };
        for (name, value) in vars {
            let entry = json!({"name": name, "value": value});
            match env.iter_mut().find(|e| e["name"] == name.as_str()) {
                Some(existing) => *existing = entry,
                None => env.push(entry),
            }
        }
    }
}

/// `pid` of the process whose executable is named `program` and whose
/// environment has `POD_NAME=<pod>`.
fn find_pod_process(pod: &str, program: &str) -> Option<i32> {
    let wanted = format!("POD_NAME={pod}");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let exe = std::fs::read_link(entry.path().join("exe")).ok();
        if exe
            .as_deref()
            .and_then(Path::file_name)
            .and_then(|n| n.to_str())
            != Some(program)
        {
            continue;
        }
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if environ.split(|b| *b == 0).any(|v| v == wanted.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

fn describe_pod(p: &PodRecord) -> String {
    format!(
        "{} [{}] restarts {} cost {:?}{}{}{}",
        p.name,
        p.deployment,
        p.restart_count,
        p.cost,
        if p.ready { " ready" } else { " not-ready" },
        if p.terminating { " terminating" } else { "" },
        if p.deleted { " deleted" } else { "" },
    )
}

/// One line per pod, for diagnostics.
pub fn describe_pods(pods: &[PodRecord]) -> String {
    pods.iter()
        .map(describe_pod)
        .collect::<Vec<_>>()
        .join("\n    ")
}

fn spawn_watch<K>(
    api: Api<K>,
    config: watcher::Config,
    stores: Arc<Mutex<Stores>>,
    notify: Arc<watch::Sender<u64>>,
    mut apply: impl FnMut(&mut Stores, K, bool) + Send + 'static,
) -> JoinHandle<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + 'static,
{
    tokio::spawn(async move {
        let stream = watcher(api, config).default_backoff();
        futures::pin_mut!(stream);
        while let Ok(Some(event)) = stream.try_next().await.map_err(|_| ()) {
            let (object, deleted) = match event {
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) => (o, false),
                watcher::Event::Delete(o) => (o, true),
                watcher::Event::Init | watcher::Event::InitDone => continue,
            };
            {
                let mut guard = stores.lock().unwrap_or_else(PoisonError::into_inner);
                apply(&mut guard, object, deleted);
            }
            notify.send_modify(|n| *n += 1);
        }
    })
}

fn watch_pods(
    api: Api<Pod>,
    stores: Arc<Mutex<Stores>>,
    notify: Arc<watch::Sender<u64>>,
) -> JoinHandle<()> {
    spawn_watch(
        api,
        watcher::Config::default(),
        stores,
        notify,
        |s, pod, deleted| {
            let Some(name) = pod.metadata.name.clone() else {
                return;
            };
            let deployment = pod
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.kind == "ReplicaSet")
                .and_then(|o| o.name.rsplit_once('-').map(|(d, _)| d.to_string()))
                .unwrap_or_default();
            let status = pod.status.clone().unwrap_or_default();
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let terminating = pod.metadata.deletion_timestamp.is_some();
            let cost = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(DELETION_COST))
                .and_then(|v| v.parse::<i64>().ok());
            let first = status.container_statuses.iter().flatten().next().cloned();
            // The ranking inputs of every other live pod, before this update.
            let kept: Vec<(String, i64, bool)> = s
                .pods
                .values()
                .filter(|p| p.deployment == deployment && p.name != name)
                .filter(|p| !p.deleted && !p.terminating)
                .map(|p| (p.name.clone(), p.cost.unwrap_or(0), p.ready))
                .collect();
            let record = s.pods.entry(name.clone()).or_default();
            if terminating && record.deletion.is_none() && !record.name.is_empty() {
                record.deletion = Some(DeletionSnapshot {
                    at: Instant::now(),
                    // As the ReplicaSet controller saw it: the pod before this update.
                    cost: record.cost.unwrap_or(0),
                    ready: record.ready,
                    kept,
                });
            }
            record.name = name;
            record.uid = pod.metadata.uid.clone().unwrap_or_default();
            record.deployment = deployment;
            record.ip = status.pod_ip.clone().or(record.ip.take());
            record.ready = ready && !deleted;
            if record.ready && record.ready_since.is_none() {
                record.ready_since = Some(chrono::Utc::now());
            }
            record.terminating = terminating;
            record.deleted |= deleted;
            record.cost = cost;
            if let Some(c) = first {
                record.restart_count = c.restart_count;
                let ended = |t: &k8s_openapi::api::core::v1::ContainerStateTerminated| {
                    let ran_for = match (&t.started_at, &t.finished_at) {
                        (Some(a), Some(b)) => Duration::from_millis(
                            u64::try_from(b.0.as_millisecond() - a.0.as_millisecond()).unwrap_or(0),
                        ),
                        _ => Duration::ZERO,
                    };
                    (
                        t.exit_code,
                        t.signal.or((t.exit_code > 128).then(|| t.exit_code - 128)),
                        ran_for,
                    )
                };
                if let Some(t) = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()) {
                    let (code, signal, ran_for) = ended(t);
                    // The kubelet may report the last run's end before it counts the restart.
                    let restart = (c.restart_count - 1).max(0);
                    record.exits.entry(restart).or_insert(InstanceExit {
                        restart,
                        code,
                        signal,
                        while_deleting: false,
                        ran_for,
                    });
                }
                if let Some(t) = c.state.as_ref().and_then(|s| s.terminated.as_ref()) {
                    let (code, signal, ran_for) = ended(t);
                    let restart = c.restart_count;
                    record.exits.insert(
                        restart,
                        InstanceExit {
                            restart,
                            code,
                            signal,
                            while_deleting: terminating,
                            ran_for,
                        },
                    );
                }
            }
        },
    )
}

fn watch_scalers(
    api: Api<QueueScaler>,
    stores: Arc<Mutex<Stores>>,
    notify: Arc<watch::Sender<u64>>,
) -> JoinHandle<()> {
    spawn_watch(
        api,
        watcher::Config::default(),
        stores,
        notify,
        |s, scaler, deleted| {
            let Some(name) = scaler.metadata.name.clone() else {
                return;
            };
            if deleted {
                s.scalers.remove(&name);
            } else if let Ok(value) = serde_json::to_value(&scaler) {
                s.scalers.insert(name, value);
            }
        },
    )
}

fn watch_lease(
    api: Api<Lease>,
    stores: Arc<Mutex<Stores>>,
    notify: Arc<watch::Sender<u64>>,
) -> JoinHandle<()> {
    let config = watcher::Config::default().fields(&format!("metadata.name={}", crate::LEASE));
    spawn_watch(api, config, stores, notify, |s, lease, deleted| {
        s.lease_holder = if deleted {
            None
        } else {
            lease.spec.and_then(|spec| spec.holder_identity)
        };
    })
}

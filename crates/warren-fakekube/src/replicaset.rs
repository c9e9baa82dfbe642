//! A process-backed ReplicaSet: one real child process per replica of a
//! Deployment stored in the fake API server.
//!
//! It watches the Deployment's `spec.replicas` and reconciles:
//! - scale-up starts processes (each with a unique `POD_NAME`, `POD_NAMESPACE`
//!   and its own `WARREN_LISTEN_ADDR=127.0.0.1:<free port>`) and creates their
//!   Pod objects (labels from the pod template, phase Running, Ready
//!   condition);
//! - scale-in picks victims the way the ReplicaSet controller ranks pods (not
//!   ready first, then lowest `controller.kubernetes.io/pod-deletion-cost`,
//!   then newest), marks their Pod objects with a `deletionTimestamp`, sends
//!   SIGTERM, waits the pod's `terminationGracePeriodSeconds` (default 30),
//!   then SIGKILLs; the Pod object is deleted when the process has exited;
//! - a Pod object deleted through the API terminates its process the same way
//!   and is replaced;
//! - a process that exits on its own (or is killed by a test) is replaced by a
//!   new pod with a new name;
//! - the Deployment's `status` (replicas, readyReplicas, availableReplicas,
//!   updatedReplicas, unavailableReplicas, observedGeneration) follows.
//!
//! Simplifications, each a deliberate difference from Kubernetes:
//! - there are no ReplicaSet objects, no rollouts and no surge: one pod
//!   template, pods owned by a fictitious ReplicaSet `<deployment>-fake`;
//! - pod names are `<deployment>-<n>` with `n` never reused, not
//!   `<deployment>-<hash>-<random>`;
//! - victim ranking keeps only the criteria that can differ here (readiness,
//!   deletion cost, age — "newest first" stands in for Kubernetes' "ready for
//!   the shortest time" and "newest creation" tie-breaks);
//! - a container that exits is not restarted in place by a kubelet
//!   (restartCount never moves): the pod is deleted and replaced;
//! - readiness is either "started" or an HTTP GET probe polled every 500 ms.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::sys::signal::kill;
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

pub use nix::sys::signal::Signal;

use crate::resources::{DEPLOYMENTS, PODS};
use crate::store::now_rfc3339;
use crate::{FakeApiServer, FakeKubeError};

/// The annotation the ReplicaSet controller ranks scale-in victims by.
pub const POD_DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// Default `terminationGracePeriodSeconds`.
const DEFAULT_GRACE_SECONDS: u64 = 30;

/// How a pod becomes Ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Ready as soon as the process is started.
    Started,
    /// Ready while `GET http://<WARREN_LISTEN_ADDR><path>` answers 2xx/3xx.
    HttpGet {
        /// Probe path, e.g. `/readyz`.
        path: String,
    },
}

/// Where a child's stdout and stderr go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildOutput {
    /// The test process's own stdout/stderr (nextest captures them).
    Inherit,
    /// Discarded.
    Null,
    /// `<dir>/<pod>.log`, both streams.
    Files(PathBuf),
}

/// What to run for each replica.
#[derive(Debug, Clone)]
pub struct ProcessTemplate {
    /// Program to execute.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Extra environment (POD_NAME, POD_NAMESPACE and WARREN_LISTEN_ADDR are
    /// set per pod and override these).
    pub env: Vec<(OsString, OsString)>,
    /// How readiness is decided.
    pub readiness: Readiness,
    /// Where output goes.
    pub output: ChildOutput,
}

impl ProcessTemplate {
    /// Runs `program`, ready when started, output inherited.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            readiness: Readiness::Started,
            output: ChildOutput::Inherit,
        }
    }

    /// Adds an argument.
    #[must_use]
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds an environment variable.
    #[must_use]
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the readiness rule.
    #[must_use]
    pub fn readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }

    /// Sets where output goes.
    #[must_use]
    pub fn output(mut self, output: ChildOutput) -> Self {
        self.output = output;
        self
    }
}

/// A running (or terminating) pod process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodProcess {
    /// Pod name (`POD_NAME`).
    pub name: String,
    /// OS process id.
    pub pid: u32,
    /// Its `WARREN_LISTEN_ADDR`.
    pub listen_addr: SocketAddr,
    /// Ready condition.
    pub ready: bool,
    /// Being terminated (SIGTERM sent).
    pub terminating: bool,
    /// Creation order (the `n` of `<deployment>-<n>`).
    pub ordinal: u64,
}

/// How a pod process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodExit {
    /// Pod name.
    pub pod: String,
    /// OS process id.
    pub pid: u32,
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Terminating signal number, if a signal killed it.
    pub signal: Option<i32>,
    /// The ReplicaSet sent SIGTERM (scale-in or pod deletion).
    pub sigterm_sent: bool,
    /// The grace period ran out and the ReplicaSet sent SIGKILL.
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

struct Child {
    pid: u32,
    listen_addr: SocketAddr,
    ordinal: u64,
    started: Instant,
    ready: bool,
    terminating: bool,
    sigterm_sent: bool,
    sigkill_sent: bool,
    grace: Duration,
    containers: Value,
}

#[derive(Default)]
struct RsState {
    pods: BTreeMap<String, Child>,
    exits: Vec<PodExit>,
    next_ordinal: u64,
}

struct RsShared {
    state: Mutex<RsState>,
    changed: watch::Sender<u64>,
}

impl RsShared {
    fn state(&self) -> MutexGuard<'_, RsState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

enum Msg {
    Exited {
        name: String,
        status: std::io::Result<ExitStatus>,
    },
    GraceExpired {
        name: String,
    },
    Probe {
        name: String,
        ok: bool,
    },
    Wake,
    Shutdown(oneshot::Sender<()>),
}

/// The process-backed ReplicaSet for one Deployment. Dropping it kills its
/// processes (SIGKILL); [`shutdown`](Self::shutdown) terminates them
/// gracefully.
pub struct ProcessReplicaSet {
    shared: Arc<RsShared>,
    tx: mpsc::UnboundedSender<Msg>,
    task: Option<JoinHandle<()>>,
}

impl Drop for ProcessReplicaSet {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl ProcessReplicaSet {
    /// Starts reconciling Deployment `namespace/deployment` with one
    /// `template` process per replica. Must be called inside a Tokio runtime.
    pub fn start(
        server: &FakeApiServer,
        namespace: &str,
        deployment: &str,
        template: ProcessTemplate,
    ) -> Self {
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(RsShared {
            state: Mutex::new(RsState::default()),
            changed,
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let controller = Controller {
            server: server.clone(),
            namespace: namespace.to_string(),
            deployment: deployment.to_string(),
            owner_uid: uuid::Uuid::new_v4().to_string(),
            template,
            shared: shared.clone(),
            tx: tx.clone(),
            rx,
            tasks: JoinSet::new(),
            shutdown: None,
            spawn_blocked_until: None,
        };
        let task = tokio::spawn(controller.run());
        Self {
            shared,
            tx,
            task: Some(task),
        }
    }

    /// The live pod processes (including terminating ones), oldest first.
    pub fn pods(&self) -> Vec<PodProcess> {
        let state = self.shared.state();
        let mut pods: Vec<PodProcess> = state
            .pods
            .iter()
            .map(|(name, c)| PodProcess {
                name: name.clone(),
                pid: c.pid,
                listen_addr: c.listen_addr,
                ready: c.ready,
                terminating: c.terminating,
                ordinal: c.ordinal,
            })
            .collect();
        pods.sort_by_key(|p| p.ordinal);
        pods
    }

    /// Every pod process that has exited, in exit order.
    pub fn exits(&self) -> Vec<PodExit> {
        self.shared.state().exits.clone()
    }

    /// Sends `signal` to a pod's process (as a test's chaos). The ReplicaSet
    /// does not treat this as a termination: if the process dies, it is
    /// replaced by a new pod.
    pub fn kill_pod(&self, name: &str, signal: Signal) -> Result<(), FakeKubeError> {
        let pid = self
            .shared
            .state()
            .pods
            .get(name)
            .map(|c| c.pid)
            .ok_or_else(|| FakeKubeError::NoSuchPod(name.to_string()))?;
        send_signal(pid, signal).map_err(|source| FakeKubeError::Signal {
            pod: name.to_string(),
            signal,
            source,
        })
    }

    /// Waits until `pred` holds for the live pods; false on timeout.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&[PodProcess]) -> bool,
    ) -> bool {
        let mut changed = self.shared.changed.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            changed.borrow_and_update();
            if pred(&self.pods()) {
                return true;
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                _ => return false,
            }
        }
    }

    /// Waits until exactly `n` pods are running and ready and none is
    /// terminating.
    pub async fn wait_for_ready(&self, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |pods| {
            pods.len() == n && pods.iter().all(|p| p.ready && !p.terminating)
        })
        .await
    }

    /// Waits for a pod's process to exit; returns how it ended.
    pub async fn wait_for_exit(&self, name: &str, timeout: Duration) -> Option<PodExit> {
        let mut changed = self.shared.changed.subscribe();
        let deadline = Instant::now() + timeout;
        loop {
            changed.borrow_and_update();
            if let Some(exit) = self.exits().into_iter().find(|e| e.pod == name) {
                return Some(exit);
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                _ => return None,
            }
        }
    }

    /// Terminates every process gracefully (SIGTERM, grace period, SIGKILL),
    /// removes their Pod objects and stops reconciling.
    pub async fn shutdown(mut self) -> Result<(), FakeKubeError> {
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Msg::Shutdown(reply))
            .map_err(|_| FakeKubeError::Stopped)?;
        done.await.map_err(|_| FakeKubeError::Stopped)?;
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        Ok(())
    }
}

fn send_signal(pid: u32, signal: Signal) -> nix::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| nix::Error::EINVAL)?;
    kill(Pid::from_raw(pid), signal)
}

fn free_port_addr() -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.local_addr()
}

async fn http_probe(addr: SocketAddr, path: String) -> bool {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut head = [0u8; 32];
        let mut read = 0;
        while read < 12 {
            let n = stream.read(&mut head[read..]).await?;
            if n == 0 {
                break;
            }
            read += n;
        }
        let text = String::from_utf8_lossy(&head[..read]).into_owned();
        std::io::Result::Ok(
            text.split_whitespace()
                .nth(1)
                .and_then(|code| code.parse::<u16>().ok())
                .is_some_and(|code| (200..400).contains(&code)),
        )
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Ok(true))
    )
}

struct Controller {
    server: FakeApiServer,
    namespace: String,
    deployment: String,
    owner_uid: String,
    template: ProcessTemplate,
    shared: Arc<RsShared>,
    tx: mpsc::UnboundedSender<Msg>,
    rx: mpsc::UnboundedReceiver<Msg>,
    /// Child wait tasks and timers; dropping the set aborts them, which drops
    /// the `tokio::process::Child`ren and SIGKILLs them (kill_on_drop).
    tasks: JoinSet<()>,
    shutdown: Option<oneshot::Sender<()>>,
    spawn_blocked_until: Option<Instant>,
}

impl Controller {
    async fn run(mut self) {
        let mut changes = self.server.changes();
        let mut probe = tokio::time::interval(Duration::from_millis(500));
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let probing = matches!(self.template.readiness, Readiness::HttpGet { .. });
        loop {
            changes.borrow_and_update();
            self.reconcile();
            if self.shutdown.is_some() && self.shared.state().pods.is_empty() {
                if let Some(reply) = self.shutdown.take() {
                    let _ = reply.send(());
                }
                return;
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                Some(msg) = self.rx.recv() => self.handle(msg),
                _ = probe.tick(), if probing => self.probe_all(),
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            }
            while let Ok(msg) = self.rx.try_recv() {
                self.handle(msg);
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Exited { name, status } => self.exited(&name, status),
            Msg::GraceExpired { name } => {
                let mut state = self.shared.state();
                if let Some(child) = state.pods.get_mut(&name) {
                    tracing::info!(pod = %name, "grace period over, sending SIGKILL");
                    child.sigkill_sent = true;
                    if let Err(err) = send_signal(child.pid, Signal::SIGKILL) {
                        tracing::debug!(pod = %name, error = %err, "SIGKILL failed");
                    }
                }
            }
            Msg::Probe { name, ok } => {
                let changed = {
                    let mut state = self.shared.state();
                    match state.pods.get_mut(&name) {
                        Some(child) if child.ready != ok => {
                            child.ready = ok;
                            Some(child.containers.clone())
                        }
                        _ => None,
                    }
                };
                if let Some(containers) = changed {
                    let status = pod_status_patch(ok, &containers);
                    if let Err(err) =
                        self.server
                            .patch_object(&PODS, &self.namespace, &name, &status)
                    {
                        tracing::debug!(pod = %name, error = %err, "updating pod readiness");
                    }
                    self.shared.bump();
                }
            }
            Msg::Wake => {}
            Msg::Shutdown(reply) => self.shutdown = Some(reply),
        }
    }

    fn exited(&mut self, name: &str, status: std::io::Result<ExitStatus>) {
        let Some(child) = self.shared.state().pods.remove(name) else {
            return;
        };
        let (code, signal) = match &status {
            Ok(s) => (s.code(), s.signal()),
            Err(_) => (None, None),
        };
        tracing::info!(pod = %name, pid = child.pid, ?code, ?signal, terminating = child.terminating, "pod process exited");
        self.shared.state().exits.push(PodExit {
            pod: name.to_string(),
            pid: child.pid,
            code,
            signal,
            sigterm_sent: child.sigterm_sent,
            sigkill_sent: child.sigkill_sent,
            ran_for: child.started.elapsed(),
        });
        self.server.delete_object(&PODS, &self.namespace, name);
        self.shared.bump();
    }

    fn probe_all(&mut self) {
        let Readiness::HttpGet { path } = &self.template.readiness else {
            return;
        };
        let targets: Vec<(String, SocketAddr)> = self
            .shared
            .state()
            .pods
            .iter()
            .filter(|(_, c)| !c.terminating)
            .map(|(n, c)| (n.clone(), c.listen_addr))
            .collect();
        for (name, addr) in targets {
            let tx = self.tx.clone();
            let path = path.clone();
            self.tasks.spawn(async move {
                let ok = http_probe(addr, path).await;
                let _ = tx.send(Msg::Probe { name, ok });
            });
        }
    }

    fn reconcile(&mut self) {
        let deployment = self
            .server
            .get_object(&DEPLOYMENTS, &self.namespace, &self.deployment);
        let desired = match (&deployment, self.shutdown.is_some()) {
            (Some(d), false) => d
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .unwrap_or(1)
                .max(0) as usize,
            _ => 0,
        };

        // A Pod object deleted through the API: terminate its process.
        let orphaned: Vec<String> = self
            .shared
            .state()
            .pods
            .iter()
            .filter(|(_, c)| !c.terminating)
            .map(|(n, _)| n.clone())
            .filter(|n| self.server.get_object(&PODS, &self.namespace, n).is_none())
            .collect();
        for name in orphaned {
            tracing::info!(pod = %name, "pod object deleted, terminating its process");
            self.terminate(&name);
        }

        let alive = self.alive();
        if alive.len() < desired {
            if let Some(deployment) = &deployment {
                for _ in alive.len()..desired {
                    if !self.spawn(deployment) {
                        break;
                    }
                }
            }
        } else if alive.len() > desired {
            let excess = alive.len() - desired;
            for name in self.rank_victims(alive).into_iter().take(excess) {
                tracing::info!(pod = %name, "scale-in victim");
                self.terminate(&name);
            }
        }
        if let Some(deployment) = &deployment {
            self.update_deployment_status(deployment, desired);
        }
    }

    /// Names of non-terminating pods.
    fn alive(&self) -> Vec<String> {
        self.shared
            .state()
            .pods
            .iter()
            .filter(|(_, c)| !c.terminating)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Scale-in order: not ready first, then lowest deletion cost, then newest.
    fn rank_victims(&self, alive: Vec<String>) -> Vec<String> {
        let mut ranked: Vec<(bool, i64, std::cmp::Reverse<u64>, String)> = {
            let state = self.shared.state();
            alive
                .into_iter()
                .filter_map(|name| {
                    let child = state.pods.get(&name)?;
                    Some((child.ready, 0, std::cmp::Reverse(child.ordinal), name))
                })
                .collect()
        };
        for entry in &mut ranked {
            entry.1 = self
                .server
                .get_object(&PODS, &self.namespace, &entry.3)
                .and_then(|pod| {
                    pod.pointer("/metadata/annotations")
                        .and_then(|a| a.get(POD_DELETION_COST))
                        .and_then(Value::as_str)
                        .and_then(|c| c.trim().parse::<i64>().ok())
                })
                .unwrap_or(0);
        }
        ranked.sort();
        ranked.into_iter().map(|(_, _, _, name)| name).collect()
    }

    fn terminate(&mut self, name: &str) {
        let (pid, grace) = {
            let mut state = self.shared.state();
            let Some(child) = state.pods.get_mut(name) else {
                return;
            };
            if child.terminating {
                return;
            }
            child.terminating = true;
            child.sigterm_sent = true;
            (child.pid, child.grace)
        };
        // Like the API server on a graceful pod deletion: the object stays,
        // marked, until the kubelet reports the containers gone.
        let mark = json!({"metadata": {
            "deletionTimestamp": now_rfc3339(),
            "deletionGracePeriodSeconds": grace.as_secs(),
        }});
        let _ = self
            .server
            .patch_object(&PODS, &self.namespace, name, &mark);
        if let Err(err) = send_signal(pid, Signal::SIGTERM) {
            tracing::debug!(pod = %name, error = %err, "SIGTERM failed");
        }
        let tx = self.tx.clone();
        let name = name.to_string();
        self.tasks.spawn(async move {
            tokio::time::sleep(grace).await;
            let _ = tx.send(Msg::GraceExpired { name });
        });
        self.shared.bump();
    }

    /// Starts one pod; false if spawning failed (retried a second later).
    fn spawn(&mut self, deployment: &Value) -> bool {
        if self
            .spawn_blocked_until
            .is_some_and(|until| Instant::now() < until)
        {
            return false;
        }
        let ordinal = {
            let mut state = self.shared.state();
            let n = state.next_ordinal;
            state.next_ordinal += 1;
            n
        };
        let name = format!("{}-{ordinal}", self.deployment);
        let template = deployment
            .pointer("/spec/template")
            .cloned()
            .unwrap_or_else(|| json!({}));
        let grace = Duration::from_secs(
            template
                .pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_u64)
                .unwrap_or(DEFAULT_GRACE_SECONDS),
        );
        let result = free_port_addr().and_then(|addr| {
            let mut cmd = tokio::process::Command::new(&self.template.program);
            cmd.args(&self.template.args)
                .envs(self.template.env.iter().map(|(k, v)| (k, v)))
                .env("POD_NAME", &name)
                .env("POD_NAMESPACE", &self.namespace)
                .env("WARREN_LISTEN_ADDR", addr.to_string())
                .stdin(Stdio::null())
                .kill_on_drop(true);
            match &self.template.output {
                ChildOutput::Inherit => {}
                ChildOutput::Null => {
                    cmd.stdout(Stdio::null()).stderr(Stdio::null());
                }
                ChildOutput::Files(dir) => {
                    std::fs::create_dir_all(dir)?;
                    let file = std::fs::File::create(dir.join(format!("{name}.log")))?;
                    cmd.stdout(file.try_clone()?).stderr(file);
                }
            }
            Ok((addr, cmd.spawn()?))
        });
        let (addr, mut process) = match result {
            Ok(ok) => ok,
            Err(err) => {
                tracing::warn!(pod = %name, program = %self.template.program.display(), error = %err, "starting pod process failed; retrying in 1s");
                self.spawn_blocked_until = Some(Instant::now() + Duration::from_secs(1));
                let tx = self.tx.clone();
                self.tasks.spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let _ = tx.send(Msg::Wake);
                });
                return false;
            }
        };
        let pid = process.id().unwrap_or_default();
        let ready = self.template.readiness == Readiness::Started;
        let containers = template
            .pointer("/spec/containers")
            .cloned()
            .unwrap_or_else(|| json!([]));
        tracing::info!(pod = %name, pid, %addr, "pod process started");
        self.shared.state().pods.insert(
            name.clone(),
            Child {
                pid,
                listen_addr: addr,
                ordinal,
                started: Instant::now(),
                ready,
                terminating: false,
                sigterm_sent: false,
                sigkill_sent: false,
                grace,
                containers: containers.clone(),
            },
        );
        let pod = self.pod_object(&template, &name, addr, pid, ready, grace, &containers);
        if let Err(err) = self.server.put_object(&PODS, pod) {
            tracing::warn!(pod = %name, error = %err, "creating the pod object failed");
        }
        let tx = self.tx.clone();
        self.tasks.spawn(async move {
            let status = process.wait().await;
            let _ = tx.send(Msg::Exited { name, status });
        });
        self.shared.bump();
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn pod_object(
        &self,
        template: &Value,
        name: &str,
        addr: SocketAddr,
        pid: u32,
        ready: bool,
        grace: Duration,
        containers: &Value,
    ) -> Value {
        let mut labels = template
            .pointer("/metadata/labels")
            .cloned()
            .unwrap_or_else(|| json!({}));
        labels["pod-template-hash"] = json!("fake");
        let mut annotations = template
            .pointer("/metadata/annotations")
            .cloned()
            .unwrap_or_else(|| json!({}));
        annotations["fakekube.warren.dev/pid"] = json!(pid.to_string());
        annotations["fakekube.warren.dev/listen-addr"] = json!(addr.to_string());
        let mut spec = template
            .get("spec")
            .cloned()
            .unwrap_or_else(|| json!({"containers": []}));
        spec["nodeName"] = json!("fake-node");
        spec["terminationGracePeriodSeconds"] = json!(grace.as_secs());
        let mut pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [{
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": format!("{}-fake", self.deployment),
                    "uid": self.owner_uid,
                    "controller": true,
                    "blockOwnerDeletion": true,
                }],
            },
            "spec": spec,
            "status": {
                "phase": "Running",
                "podIP": "127.0.0.1",
                "hostIP": "127.0.0.1",
                "startTime": now_rfc3339(),
            },
        });
        crate::patch::merge_patch(&mut pod, &pod_status_patch(ready, containers));
        pod
    }

    fn update_deployment_status(&self, deployment: &Value, desired: usize) {
        let (replicas, ready) = {
            let state = self.shared.state();
            let alive: Vec<&Child> = state.pods.values().filter(|c| !c.terminating).collect();
            (alive.len(), alive.iter().filter(|c| c.ready).count())
        };
        // Kubernetes omits zero counts (omitempty): null removes them.
        let count = |n: usize| if n == 0 { Value::Null } else { json!(n) };
        let generation = deployment
            .pointer("/metadata/generation")
            .cloned()
            .unwrap_or(Value::Null);
        let patch = json!({"status": {
            "observedGeneration": generation,
            "replicas": count(replicas),
            "updatedReplicas": count(replicas),
            "readyReplicas": count(ready),
            "availableReplicas": count(ready),
            "unavailableReplicas": count(desired.saturating_sub(ready)),
        }});
        if let Err(err) =
            self.server
                .patch_object(&DEPLOYMENTS, &self.namespace, &self.deployment, &patch)
        {
            tracing::debug!(error = %err, "updating deployment status");
        }
    }
}

/// The readiness-dependent part of a pod's status.
fn pod_status_patch(ready: bool, containers: &Value) -> Value {
    let flag = if ready { "True" } else { "False" };
    let statuses: Vec<Value> = containers
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| {
                    json!({
                        "name": c.get("name").cloned().unwrap_or_else(|| json!("main")),
                        "image": c.get("image").cloned().unwrap_or_else(|| json!("")),
                        "imageID": "",
                        "ready": ready,
                        "started": true,
                        "restartCount": 0,
                        "state": {"running": {}},
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({"status": {
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": flag},
            {"type": "Ready", "status": flag},
        ],
        "containerStatuses": statuses,
    }})
}

//! A private Kubernetes control plane for one test: `localcluster up
//! --control-plane-only` (etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler from the upstream Go modules, see localcluster/) on ports of
//! its own and a temporary state directory, beside the machine's cluster.
//!
//! No node agent runs: the ReplicaSet controller creates Pod objects, nothing
//! runs them. Tests that need pods to run use the machine's cluster
//! (`make local-scenarios`).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, CustomResourceExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::TestkitError;

/// Names the localcluster binary (default: [`localcluster_bin`]).
pub const LOCALCLUSTER_BIN_ENV: &str = "LOCALCLUSTER_BIN";

/// The control plane's ports before the offset: kube-apiserver, etcd client
/// and peer, kube-controller-manager, kube-scheduler (localcluster's defaults,
/// which the machine's cluster uses as they are).
pub const CONTROL_PLANE_PORTS: [u16; 5] = [6443, 23790, 23800, 10257, 10259];

/// Other fixed ports of the machine's cluster no offset port may land on.
const MACHINE_CLUSTER_PORTS: [u16; 1] = [10250];

/// Offsets tried: at least 1000 (never the machine cluster's own ports), and
/// every port below Linux's ephemeral range (32768), like [`crate::free_port`]'s.
const OFFSETS: std::ops::Range<u16> = 1000..8900;

/// How long the apiserver may take to answer, and the controller-manager to
/// create the `default` ServiceAccount (seconds on an idle machine).
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// The line localcluster logs once the apiserver answered `/readyz` with the
/// generated admin kubeconfig.
const READY_LINE: &str = "\"kube-apiserver ready\"";

/// `$LOCALCLUSTER_BIN`, else where `make local-build` puts it:
/// `$HOME/.cache/localcluster/bin/localcluster`.
pub fn localcluster_bin() -> PathBuf {
    if let Some(path) = std::env::var_os(LOCALCLUSTER_BIN_ENV) {
        return PathBuf::from(path);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/localcluster/bin/localcluster")
}

/// A running private control plane; killed and its state removed on drop.
pub struct ControlPlane {
    child: Child,
    offset: u16,
    /// The port reservations, released when the control plane is gone.
    ports: Vec<std::fs::File>,
    dir: tempfile::TempDir,
}

impl ControlPlane {
    /// Starts a control plane and waits until it is usable: the apiserver
    /// answers, the controller-manager has created the `default`
    /// ServiceAccount (Pods can be created), and the QueueScaler CRD
    /// (`warren_crd::QueueScaler`) is installed and served.
    pub async fn start() -> Result<Self, TestkitError> {
        let plane = Self::start_bare().await?;
        let client = plane.client().await?;
        plane.install_crds(&client).await?;
        plane.wait_for_default_service_account(&client).await?;
        Ok(plane)
    }

    /// Starts a control plane and waits only until the apiserver answers
    /// `/readyz` (localcluster checks it with the admin kubeconfig), without
    /// building a client in this process (so nothing chooses a rustls
    /// provider) and without the CRD ([`Self::install_crds`]).
    pub async fn start_bare() -> Result<Self, TestkitError> {
        let bin = localcluster_bin();
        if !bin.is_file() {
            return Err(TestkitError::Program {
                program: bin.display().to_string(),
                hint: format!(
                    "not found: build it with `make local-build` (or `make local-go-build`), or set {LOCALCLUSTER_BIN_ENV}"
                ),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        remove_orphaned_state();
        let dir = tempfile::Builder::new()
            .prefix(STATE_PREFIX)
            .tempdir()
            .map_err(|source| TestkitError::Dir {
                path: std::env::temp_dir(),
                source,
            })?;
        let owner = dir.path().join(OWNER_FILE);
        std::fs::write(&owner, std::process::id().to_string()).map_err(|source| {
            TestkitError::Dir {
                path: owner,
                source,
            }
        })?;
        let (offset, ports) = reserve_offset()?;
        let log_path = dir.path().join("localcluster.log");
        let (log, log_err) = crate::log_file(&log_path)?;
        let mut command = crate::tied_command(&bin, "KILL");
        command
            .arg("up")
            .arg("--control-plane-only")
            .arg("--port-offset")
            .arg(offset.to_string())
            .arg("--state-dir")
            .arg(dir.path())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().map_err(|source| TestkitError::Program {
            program: bin.display().to_string(),
            hint: "build it with `make local-build`".into(),
            source,
        })?;
        let mut plane = Self {
            child,
            offset,
            ports,
            dir,
        };
        plane.wait_ready().await?;
        Ok(plane)
    }

    async fn wait_ready(&mut self) -> Result<(), TestkitError> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.failed(&format!("localcluster exited with {status}")));
            }
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            if log.contains(READY_LINE) {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(self.failed(&format!(
                    "the apiserver did not answer /readyz within {START_TIMEOUT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn failed(&self, why: &str) -> TestkitError {
        TestkitError::ControlPlane(format!(
            "{why} (port offset {}); log tail:\n{}",
            self.offset,
            self.log_tail(40)
        ))
    }

    /// The last `lines` lines of localcluster's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("localcluster.log")
    }

    /// The state directory (etcd data, certificates, kubeconfigs, logs).
    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The admin kubeconfig (user `kubernetes-admin`, group `system:masters`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    /// What was added to every control-plane port (at least 1000).
    pub fn port_offset(&self) -> u16 {
        self.offset
    }

    /// The ports this control plane listens on (apiserver first), see
    /// [`CONTROL_PLANE_PORTS`].
    pub fn ports(&self) -> [u16; 5] {
        CONTROL_PLANE_PORTS.map(|p| p + self.offset)
    }

    /// `https://127.0.0.1:<6443 + offset>`
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports()[0])
    }

    /// localcluster's process id (also its process group).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A client from the admin kubeconfig, as `KUBECONFIG=…` would build it.
    pub async fn client(&self) -> Result<kube::Client, TestkitError> {
        let fail = |e: &dyn std::fmt::Display| {
            TestkitError::ControlPlane(format!("client from {}: {e}", self.kubeconfig().display()))
        };
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig()).map_err(|e| fail(&e))?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| fail(&e))?;
        kube::Client::try_from(config).map_err(|e| fail(&e))
    }

    /// Creates the QueueScaler CRD and waits until the apiserver serves it.
    pub async fn install_crds(&self, client: &kube::Client) -> Result<(), TestkitError> {
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        let crd = warren_crd::QueueScaler::crd();
        match crds.create(&PostParams::default(), &crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(err) => return Err(self.failed(&format!("creating the QueueScaler CRD: {err}"))),
        }
        let scalers: Api<warren_crd::QueueScaler> = Api::all(client.clone());
        self.until("the QueueScaler CRD served", || async {
            scalers.list(&ListParams::default().limit(1)).await.is_ok()
        })
        .await
    }

    async fn wait_for_default_service_account(
        &self,
        client: &kube::Client,
    ) -> Result<(), TestkitError> {
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
        self.until(
            "the default ServiceAccount (kube-controller-manager running)",
            || async { matches!(accounts.get_opt("default").await, Ok(Some(_))) },
        )
        .await
    }

    async fn until<F, Fut>(&self, what: &str, mut done: F) -> Result<(), TestkitError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let started = Instant::now();
        while !done().await {
            if started.elapsed() > START_TIMEOUT {
                return Err(self.failed(&format!("no {what} within {START_TIMEOUT:?}")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Creates `objects` (JSON with apiVersion, kind, metadata.name and
    /// optionally metadata.namespace, else `default`), 16 requests at a time.
    pub async fn create_all(
        client: &kube::Client,
        objects: Vec<serde_json::Value>,
    ) -> Result<(), TestkitError> {
        use futures::StreamExt;
        let results: Vec<Result<(), TestkitError>> = futures::stream::iter(objects)
            .map(|object| async move {
                let fail = |e: &dyn std::fmt::Display| {
                    TestkitError::ControlPlane(format!("creating {object}: {e}"))
                };
                let object: DynamicObject =
                    serde_json::from_value(object.clone()).map_err(|e| fail(&e))?;
                let types = object.types.clone().unwrap_or_default();
                let gvk = GroupVersionKind::try_from(&types).map_err(|e| fail(&e))?;
                let namespace = object.metadata.namespace.as_deref().unwrap_or("default");
                let api: Api<DynamicObject> =
                    Api::namespaced_with(client.clone(), namespace, &ApiResource::from_gvk(&gvk));
                api.create(&PostParams::default(), &object)
                    .await
                    .map_err(|e| fail(&e))?;
                Ok(())
            })
            .buffer_unordered(16)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// The apiserver's own `/metrics` (Prometheus text): `apiserver_request_total`
    /// counts every request it served, by verb, resource and subresource.
    pub async fn metrics(&self, client: &kube::Client) -> Result<String, TestkitError> {
        let request = http::Request::get("/metrics")
            .body(Vec::new())
            .map_err(|e| TestkitError::ControlPlane(format!("GET /metrics: {e}")))?;
        client
            .request_text(request)
            .await
            .map_err(|e| TestkitError::ControlPlane(format!("GET /metrics: {e}")))
    }

    /// The apiserver's audit log so far, one JSON object per request, in the
    /// order they were answered. localcluster's policy records creates,
    /// updates, patches and deletes of Deployments (and `/scale`),
    /// ReplicaSets, StatefulSets and Pods, with the user who made them.
    pub fn audit_events(&self) -> Vec<serde_json::Value> {
        let text =
            std::fs::read_to_string(self.dir.path().join("logs/audit.log")).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}

/// The kinds warren's controller reads and writes through the apiserver, which
/// nothing else in a settled private control plane touches: QueueScalers (and
/// their status), `/scale` of Deployments and StatefulSets, their reads (GET,
/// LIST; the controller-manager's status writes are not counted), Events,
/// Secrets and Pods.
pub const CONTROLLER_RESOURCES: [&str; 9] = [
    "queuescalers",
    "queuescalers/status",
    "deployments/scale",
    "statefulsets/scale",
    "deployments",
    "statefulsets",
    "events",
    "secrets",
    "pods",
];

/// Requests the apiserver answered according to `apiserver_request_total` in
/// its `/metrics` text, by `"VERB resource[/subresource]"` (WATCH and CONNECT,
/// which are long-running, left out).
pub fn apiserver_requests(metrics: &str) -> std::collections::BTreeMap<String, f64> {
    let mut counts = std::collections::BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix("=\""))
                .map(|v| v.trim_end_matches('"'))
                .unwrap_or("")
        };
        let verb = label("verb");
        if verb == "WATCH" || verb == "CONNECT" || label("resource").is_empty() {
            continue;
        }
        let resource = match label("subresource") {
            "" => label("resource").to_string(),
            sub => format!("{}/{sub}", label("resource")),
        };
        let count: f64 = value.trim().parse().unwrap_or(0.0);
        *counts.entry(format!("{verb} {resource}")).or_insert(0.0) += count;
    }
    counts
}

/// What warren's controller asked of the apiserver between two `/metrics`
/// scrapes ([`apiserver_requests`] on [`CONTROLLER_RESOURCES`]; only GET and
/// LIST of `deployments` and `statefulsets`, no POST or DELETE of `pods`, which
/// the controller-manager makes), by `"VERB resource"`, nonzero only. Events
/// are counted whoever wrote them: with pods that no node runs, the scheduler
/// writes FailedScheduling ones.
pub fn controller_requests_between(
    before: &str,
    after: &str,
) -> std::collections::BTreeMap<String, f64> {
    let before = apiserver_requests(before);
    apiserver_requests(after)
        .into_iter()
        .filter(|(key, _)| {
            let (verb, resource) = key.split_once(' ').unwrap_or(("", ""));
            let read = matches!(verb, "GET" | "LIST");
            CONTROLLER_RESOURCES.contains(&resource)
                && (!matches!(resource, "deployments" | "statefulsets") || read)
                && (resource != "pods" || read || verb == "PATCH")
        })
        .map(|(key, after)| {
            let delta = after - before.get(&key).copied().unwrap_or(0.0);
            (key, delta)
        })
        .filter(|(_, delta)| *delta > 0.0)
        .collect()
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Everything runs in localcluster's one process (its own group).
        let _ = kill(Pid::from_raw(-(self.child.id() as i32)), Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The ports are free again once the process is gone.
        self.ports.clear();
    }
}

/// State directories are `<temp>/warren-controlplane-*`, each with the pid of
/// the test process that owns it in [`OWNER_FILE`].
const STATE_PREFIX: &str = "warren-controlplane-";
const OWNER_FILE: &str = "owner.pid";

/// Removes the state directories of test processes that died without dropping
/// their control plane (killed by a timeout: their localcluster died with them).
fn remove_orphaned_state() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let ours = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(STATE_PREFIX));
        let owner = std::fs::read_to_string(path.join(OWNER_FILE)).ok();
        let gone = owner
            .and_then(|pid| pid.trim().parse::<i32>().ok())
            .is_some_and(|pid| kill(Pid::from_raw(pid), None).is_err());
        if ours && gone {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// An offset whose ports are all free and now reserved by this process
/// (through the same per-port lock files as [`crate::free_port`]).
fn reserve_offset() -> Result<(u16, Vec<std::fs::File>), TestkitError> {
    let span = u64::from(OFFSETS.end - OFFSETS.start);
    let seed = crate::search_start();
    let mut last_error = None;
    for attempt in 0..span.min(256) {
        let offset = OFFSETS.start + ((seed + attempt * 7_919) % span) as u16;
        let ports = CONTROL_PLANE_PORTS.map(|p| p + offset);
        if ports
            .iter()
            .any(|p| CONTROL_PLANE_PORTS.contains(p) || MACHINE_CLUSTER_PORTS.contains(p))
        {
            continue;
        }
        let claimed: std::io::Result<Vec<std::fs::File>> =
            ports.iter().map(|&p| crate::claim(p)).collect();
        match claimed {
            Ok(locks) => return Ok((offset, locks)),
            Err(err) => last_error = Some(err),
        }
    }
    Err(TestkitError::Port(last_error.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "no port offset with five free ports",
        )
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# TYPE apiserver_request_total counter
apiserver_request_total{code="200",component="apiserver",dry_run="",group="apps",resource="deployments",scope="resource",subresource="scale",verb="PATCH",version="v1"} 3
apiserver_request_total{code="200",component="apiserver",dry_run="",group="warren.dev",resource="queuescalers",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 10
apiserver_request_total{code="0",component="apiserver",dry_run="",group="warren.dev",resource="queuescalers",scope="namespace",subresource="",verb="WATCH",version="v1alpha1"} 2
apiserver_request_total{code="200",component="apiserver",dry_run="",group="coordination.k8s.io",resource="leases",scope="resource",subresource="",verb="PUT",version="v1"} 40
apiserver_request_total{code="200",component="",dry_run="",group="",resource="",scope="",subresource="/readyz",verb="GET",version=""} 2
"#;
    const AFTER: &str = r#"apiserver_request_total{code="200",component="apiserver",dry_run="",group="apps",resource="deployments",scope="resource",subresource="scale",verb="PATCH",version="v1"} 3
apiserver_request_total{code="200",component="apiserver",dry_run="",group="warren.dev",resource="queuescalers",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 14
apiserver_request_total{code="409",component="apiserver",dry_run="",group="warren.dev",resource="queuescalers",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 1
apiserver_request_total{code="0",component="apiserver",dry_run="",group="warren.dev",resource="queuescalers",scope="namespace",subresource="",verb="WATCH",version="v1alpha1"} 3
apiserver_request_total{code="200",component="apiserver",dry_run="",group="coordination.k8s.io",resource="leases",scope="resource",subresource="",verb="PUT",version="v1"} 45
apiserver_request_total{code="200",component="apiserver",dry_run="",group="apps",resource="deployments",scope="resource",subresource="status",verb="PUT",version="v1"} 7
apiserver_request_total{code="200",component="apiserver",dry_run="",group="apps",resource="deployments",scope="namespace",subresource="",verb="LIST",version="v1"} 1
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="pods",scope="namespace",subresource="",verb="POST",version="v1"} 4
apiserver_request_total{code="200",component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="",verb="PATCH",version="v1"} 2
apiserver_request_total{code="200",component="",dry_run="",group="",resource="",scope="",subresource="/readyz",verb="GET",version=""} 9
"#;

    #[test]
    fn requests_are_summed_by_verb_and_resource_without_watches() {
        let counts = apiserver_requests(AFTER);
        assert_eq!(counts.get("PATCH queuescalers/status"), Some(&15.0));
        assert_eq!(counts.get("PUT leases"), Some(&45.0));
        assert!(counts.keys().all(|k| !k.starts_with("WATCH")), "{counts:?}");
        assert!(!counts.keys().any(|k| k.contains("readyz")), "{counts:?}");
    }

    #[test]
    fn the_controllers_requests_leave_out_other_components_and_unchanged_counts() {
        let delta = controller_requests_between(BEFORE, AFTER);
        let expected: std::collections::BTreeMap<String, f64> = [
            ("LIST deployments".to_string(), 1.0),
            ("PATCH pods".to_string(), 2.0),
            ("PATCH queuescalers/status".to_string(), 5.0),
        ]
        .into_iter()
        .collect();
        assert_eq!(delta, expected);
    }
}

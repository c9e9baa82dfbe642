//! The private Kubernetes control plane (localcluster --control-plane-only):
//! it starts on ports of its own, serves the API with the QueueScaler CRD,
//! runs the controllers (a Deployment gets its Pod objects), and leaves
//! nothing behind; and servers started by testkit die with their test.
//!
//! Needs the localcluster binary (`make local-build`).

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;
use warren_testkit::{CONTROL_PLANE_PORTS, ControlPlane};

fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn start() -> ControlPlane {
    ControlPlane::start()
        .await
        .expect("a private control plane must start (make local-build builds localcluster)")
}

fn alive(pid: u32) -> bool {
    // A zombie is gone for our purposes: /proc/<pid>/stat says Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.split(' ').nth(2).is_none_or(|state| state != "Z"))
}

fn port_locked(port: u16) -> bool {
    let lock = std::env::temp_dir()
        .join("warren-test-ports")
        .join(port.to_string());
    let status = std::process::Command::new("flock")
        .args(["--nonblock", "--conflict-exit-code", "7"])
        .arg(&lock)
        .arg("true")
        .status()
        .unwrap();
    status.code() == Some(7)
}

#[tokio::test]
async fn starts_on_its_own_ports_serves_the_api_and_leaves_nothing_behind() {
    init();
    // The state of a test process killed before it dropped its control plane.
    let orphan = std::env::temp_dir().join(format!(
        "warren-controlplane-orphan-of-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(orphan.join("etcd")).unwrap();
    let mut dead = std::process::Command::new("true").spawn().unwrap();
    dead.wait().unwrap();
    std::fs::write(orphan.join("owner.pid"), dead.id().to_string()).unwrap();

    let plane = start().await;
    assert!(!orphan.exists(), "{} was not removed", orphan.display());
    assert!(
        plane.state_dir().join("owner.pid").exists(),
        "the state names its owner"
    );
    assert!(plane.port_offset() >= 1000, "{}", plane.port_offset());
    for port in plane.ports() {
        assert!(
            !CONTROL_PLANE_PORTS.contains(&port),
            "{port}: a port of the machine's cluster"
        );
        assert!(port_locked(port), "port {port} is not reserved");
    }
    assert_eq!(
        plane.server_url(),
        format!("https://127.0.0.1:{}", 6443 + plane.port_offset())
    );
    let client = plane.client().await.unwrap();

    // The CRD is served: a QueueScaler is accepted (and validated).
    let scalers: Api<warren_crd::QueueScaler> = Api::namespaced(client.clone(), "default");
    let scaler: warren_crd::QueueScaler = serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "QueueScaler",
        "metadata": {"name": "jobs"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "worker"},
            "queue": {"name": "jobs", "vhost": "/"},
            "broker": {"managementUrl": "http://127.0.0.1:15672",
                       "credentialsSecretRef": {"name": "warren-rabbitmq"}},
            "minReplicas": 0, "maxReplicas": 3, "messagesPerReplica": 5
        }
    }))
    .unwrap();
    scalers
        .create(&PostParams::default(), &scaler)
        .await
        .unwrap();
    let mut invalid = scaler.clone();
    invalid.metadata.name = Some("invalid".into());
    invalid.spec.max_replicas = -1;
    assert!(
        scalers
            .create(&PostParams::default(), &invalid)
            .await
            .is_err(),
        "the CRD's validation must reject maxReplicas -1"
    );
    assert_eq!(
        scalers
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    // The controllers run: a Deployment of 2 gets 2 Pod objects (not run: no node).
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "worker"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "worker"}},
                 "template": {"metadata": {"labels": {"app": "worker"}},
                              "spec": {"containers": [{"name": "w", "image": "worker"}]}}}
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = pods
            .list(&ListParams::default().labels("app=worker"))
            .await
            .unwrap();
        if listed.items.len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the ReplicaSet controller never created 2 pods: {}",
            listed.items.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The apiserver counts what it served; the audit log names who wrote what.
    let metrics = plane.metrics(&client).await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("apiserver_request_total{")
                && l.contains("resource=\"queuescalers\"")
                && l.contains("verb=\"POST\"")),
        "no POST queuescalers in apiserver_request_total"
    );
    let audit = plane.audit_events();
    assert!(
        audit.iter().any(|e| e["verb"] == "create"
            && e["objectRef"]["resource"] == "deployments"
            && e["user"]["username"] == "kubernetes-admin"),
        "no Deployment create by kubernetes-admin in {} audit events",
        audit.len()
    );

    // Dropped: the process is gone, the state removed, the ports released.
    let pid = plane.pid();
    let dir = plane.state_dir().to_path_buf();
    let ports = plane.ports();
    assert!(alive(pid));
    drop(client);
    drop(plane);
    assert!(!alive(pid), "localcluster {pid} still runs");
    assert!(!dir.exists(), "{} still exists", dir.display());
    for port in ports {
        assert!(!port_locked(port), "port {port} still reserved");
        std::net::TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("port {port} still bound: {e}"));
    }
}

#[tokio::test]
async fn two_control_planes_at_once_get_different_ports_and_both_serve() {
    init();
    let (a, b) = tokio::join!(start(), start());
    assert_ne!(a.port_offset(), b.port_offset());
    let mut all: Vec<u16> = a.ports().into_iter().chain(b.ports()).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        all.len(),
        10,
        "ports shared: {:?} {:?}",
        a.ports(),
        b.ports()
    );
    // Each is its own cluster: an object created in one is not in the other.
    let (ca, cb) = (a.client().await.unwrap(), b.client().await.unwrap());
    let only_a: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "only-in-a"},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "a"}},
                 "template": {"metadata": {"labels": {"app": "a"}},
                              "spec": {"containers": [{"name": "w", "image": "worker"}]}}}
    }))
    .unwrap();
    Api::<Deployment>::namespaced(ca.clone(), "default")
        .create(&PostParams::default(), &only_a)
        .await
        .unwrap();
    assert!(
        Api::<Deployment>::namespaced(ca, "default")
            .get_opt("only-in-a")
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        Api::<Deployment>::namespaced(cb, "default")
            .get_opt("only-in-a")
            .await
            .unwrap()
            .is_none()
    );
}

/// `tied_command`: the server dies with the thread that started it (here a
/// thread that ends at once, as a killed test process would) and inherits no
/// descriptor but 0, 1 and 2.
#[test]
fn a_tied_server_dies_with_its_thread_and_inherits_no_descriptor() {
    use std::os::fd::AsRawFd;
    // A descriptor without close-on-exec, as `flock LOCK make test` passes down.
    let file = tempfile::NamedTempFile::new().unwrap();
    let inherited = nix::fcntl::open(
        file.path(),
        nix::fcntl::OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    let fd = inherited.as_raw_fd();
    let sees_fd = |tie: bool| {
        let mut command = if tie {
            warren_testkit::tied_command("sh", "KILL")
        } else {
            std::process::Command::new("sh")
        };
        command.args(["-c", &format!("test -e /proc/$$/fd/{fd}")]);
        command.status().unwrap().success()
    };
    assert!(sees_fd(false), "control: a plain child inherits fd {fd}");
    assert!(!sees_fd(true), "a tied child must not inherit fd {fd}");

    let pid = std::thread::spawn(|| {
        let child = warren_testkit::tied_command("sleep", "KILL")
            .arg("600")
            .spawn()
            .unwrap();
        let pid = child.id();
        // The parent-death signal is set just before the last exec: wait until
        // the process is `sleep` (a thread that ended earlier would have handed
        // its children to another thread of this process before anyone asked).
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.trim() != "sleep")
        {
            assert!(Instant::now() < deadline, "{pid} never became sleep");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Never waited for here: the thread ends with the child running.
        std::mem::forget(child);
        pid
    })
    .join()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "sleep {pid} outlived the thread that started it"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
}

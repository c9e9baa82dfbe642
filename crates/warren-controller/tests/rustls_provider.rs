//! The rustls provider trap (DESIGN.md): kube defaults to rustls' `ring`
//! provider, lapin and reqwest to `aws-lc-rs`; with both compiled in,
//! building a `kube::Client` panics ("Could not automatically determine the
//! process-level CryptoProvider"). This test builds all three clients in one
//! process, kube first and without installing a provider, the way a fresh
//! controller process would if `main` forgot to.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use kube::Api;
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use lapin::{Connection, ConnectionProperties};
use warren_controller::observe::management::{
    Credentials, ManagementClient, ManagementConfig, ManagementEndpoint, StatsError,
};
use warren_crd::QueueScaler;
use warren_testkit::ControlPlane;

#[tokio::test]
async fn kube_reqwest_and_lapin_clients_coexist_in_one_process() {
    // Nothing has chosen a provider yet: rustls must be able to pick the
    // only one compiled in.
    assert!(
        rustls::crypto::CryptoProvider::get_default().is_none(),
        "this test must run before anything installs a provider"
    );

    // kube::Client from a kubeconfig file (as KUBECONFIG=... would), pointing
    // at a real kube-apiserver on 127.0.0.1 over TLS (client certificate), and
    // a real request through it. The control plane is started without a client
    // in this process (`start_bare`), so this one is the first.
    let plane = ControlPlane::start_bare()
        .await
        .expect("a private control plane must start (make local-build builds localcluster)");
    assert!(rustls::crypto::CryptoProvider::get_default().is_none());
    let kubeconfig = Kubeconfig::read_from(plane.kubeconfig()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    assert!(
        config
            .cluster_url
            .to_string()
            .starts_with("https://127.0.0.1:")
    );
    let client = kube::Client::try_from(config).expect("kube::Client builds its rustls config");
    plane.install_crds(&client).await.unwrap();
    let scalers: Api<QueueScaler> = Api::namespaced(client.clone(), "default");
    assert!(
        scalers
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // reqwest (the management API client) in the same process.
    let management = ManagementClient::new(ManagementConfig {
        timeout: Duration::from_secs(2),
        page_size: None,
    })
    .expect("reqwest client builds");
    let port = warren_testkit::free_port().unwrap();
    let refused = management
        .vhost_queues(
            &ManagementEndpoint {
                url: format!("http://127.0.0.1:{port}"),
                credentials: Credentials {
                    username: "guest".into(),
                    password: "guest".into(),
                },
            },
            "/",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(refused, StatsError::Unreachable { .. }),
        "{refused}"
    );

    // lapin in the same process, against the shared broker.
    let connection = Connection::connect(
        &warren_testkit::shared_amqp_url(),
        ConnectionProperties::default().with_connection_name("rustls-trap-test".into()),
    )
    .await
    .expect("the shared RabbitMQ on 127.0.0.1:5672 must be running");
    assert!(connection.status().connected());
    let _ = connection.close(200, "bye".into()).await;

    // The kube client still works after the others initialised TLS.
    assert!(scalers.list(&ListParams::default()).await.is_ok());
    assert!(rustls::crypto::CryptoProvider::get_default().is_some());
}

#[test]
fn only_the_ring_provider_is_in_the_dependency_graph() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.lock"))
        .expect("the workspace Cargo.lock");
    for forbidden in ["name = \"aws-lc-rs\"", "name = \"aws-lc-sys\""] {
        assert!(
            !lock.contains(forbidden),
            "{forbidden} is in Cargo.lock: a dependency enabled rustls' aws-lc-rs provider; \
             with ring also compiled in, kube::Client panics at start"
        );
    }
    assert!(lock.contains("name = \"ring\""));
}

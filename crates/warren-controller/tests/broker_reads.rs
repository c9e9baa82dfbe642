//! The broker readers against a private RabbitMQ node with the management
//! plugin (a short statistics interval unless a test needs lagging stats).
//! The observer's tests read the broker credentials from a Secret served by
//! a real kube-apiserver (a private control plane, `make local-build`).

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::PostParams;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use serde_json::json;
use warren_controller::metrics::{ControllerMetrics, ResultLabels};
use warren_controller::observe::credentials::CredentialsCache;
use warren_controller::observe::management::{
    Credentials, ManagementClient, ManagementConfig, ManagementEndpoint, QueueStatsHub, StatsError,
    VhostQueues,
};
use warren_controller::observe::peek::{PeekError, QueuePeeker};
use warren_controller::observe::{BrokerObserver, BrokerTarget, QueueObserver, ReadySource};
use warren_controller::reconcile::unacked;
use warren_crd::{BrokerRef, CredentialsSecretRef, QueueRef};
use warren_testkit::amqp::publish_confirmed;
use warren_testkit::{ControlPlane, RabbitNode, RabbitOptions, unique_name};

async fn node() -> RabbitNode {
    RabbitNode::start(RabbitOptions {
        management: true,
        stats_interval_ms: 200,
        ..RabbitOptions::default()
    })
    .await
    .expect("a private RabbitMQ node with management must start (is rabbitmq-server installed?)")
}

fn guest(node: &RabbitNode) -> ManagementEndpoint {
    ManagementEndpoint {
        url: node.management_url(),
        credentials: Credentials {
            username: "guest".into(),
            password: "guest".into(),
        },
    }
}

async fn connect(node: &RabbitNode, name: &str) -> Connection {
    Connection::connect(
        &node.amqp_url(),
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await
    .unwrap()
}

async fn declare(channel: &Channel, queue: &str) {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
}

/// Polls the management API until `done` holds (stats lag the queues).
async fn wait_for_stats(
    client: &ManagementClient,
    endpoint: &ManagementEndpoint,
    done: impl Fn(&VhostQueues) -> bool,
) -> VhostQueues {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let snapshot = client.vhost_queues(endpoint, "/").await.unwrap();
        if done(&snapshot) {
            return snapshot;
        }
        assert!(
            Instant::now() < deadline,
            "stats never matched: {snapshot:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn one_request_reads_every_queue_of_a_vhost_and_counts_follow_fill_and_drain() {
    let node = node().await;
    let endpoint = guest(&node);
    let conn = connect(&node, "filler").await;
    let channel = conn.create_channel().await.unwrap();
    let queues: Vec<String> = (0..5).map(|i| format!("depth-{i}")).collect();
    for (i, queue) in queues.iter().enumerate() {
        declare(&channel, queue).await;
        publish_confirmed(&channel, queue, i + 1).await.unwrap();
    }

    let client = ManagementClient::new(ManagementConfig::default()).unwrap();
    // The management API can list a queue's ready count before its other
    // counts (a loaded node fills them in on a later stats tick): wait for all.
    let snapshot = wait_for_stats(&client, &endpoint, |s| {
        queues.iter().enumerate().all(|(i, q)| {
            s.get(q).is_some_and(|q| {
                q.messages_ready == Some(i as u64 + 1)
                    && q.messages_unacknowledged.is_some()
                    && q.consumers.is_some()
            })
        })
    })
    .await;
    for (i, queue) in queues.iter().enumerate() {
        let stats = snapshot.get(queue).unwrap();
        assert_eq!(stats.messages_ready, Some(i as u64 + 1), "{queue}");
        assert_eq!(stats.messages_unacknowledged, Some(0), "{queue}");
        assert_eq!(stats.consumers, Some(0), "{queue}");
    }

    // Five queues, one request.
    let before = client.requests_sent();
    let snapshot = client.vhost_queues(&endpoint, "/").await.unwrap();
    assert_eq!(client.requests_sent() - before, 1);
    assert!(queues.iter().all(|q| snapshot.get(q).is_some()));

    // Paginated walk: 5 queues in pages of 2 = 3 requests, same answer.
    let paged = ManagementClient::new(ManagementConfig {
        page_size: NonZeroU32::new(2),
        ..ManagementConfig::default()
    })
    .unwrap();
    let paged_snapshot = paged.vhost_queues(&endpoint, "/").await.unwrap();
    assert_eq!(paged.requests_sent(), 3);
    assert_eq!(paged_snapshot.queues.len(), snapshot.queues.len());
    for queue in &queues {
        assert_eq!(paged_snapshot.get(queue), snapshot.get(queue), "{queue}");
    }

    // Many concurrent scalers through the hub: still one request.
    let hub = Arc::new(QueueStatsHub::new(client.clone(), Duration::from_secs(2)));
    let before = client.requests_sent();
    let reads = (0..50).map(|_| {
        let hub = hub.clone();
        let endpoint = endpoint.clone();
        async move { hub.vhost_queues(&endpoint, "/").await }
    });
    let results = futures::future::join_all(reads).await;
    assert_eq!(client.requests_sent() - before, 1);
    for result in results {
        assert_eq!(
            result.unwrap().get("depth-4").unwrap().messages_ready,
            Some(5)
        );
    }

    // Drain: purge everything and the counts follow.
    for queue in &queues {
        channel
            .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
            .await
            .unwrap();
    }
    wait_for_stats(&client, &endpoint, |s| {
        queues
            .iter()
            .all(|q| s.get(q).is_some_and(|q| q.messages_ready == Some(0)))
    })
    .await;
}

#[tokio::test]
async fn unacked_counts_are_reported_per_named_connection_and_passive_declare_is_instant() {
    let node = node().await;
    let endpoint = guest(&node);
    let setup = connect(&node, "setup").await;
    let channel = setup.create_channel().await.unwrap();
    declare(&channel, "work").await;
    declare(&channel, "quiet").await;

    // Passive declare sees published messages at once, without waiting for stats.
    let peeker = QueuePeeker::new(Duration::from_secs(5));
    let creds = endpoint.credentials.clone();
    let amqp = format!("amqp://127.0.0.1:{}", node.amqp_port());
    publish_confirmed(&channel, "work", 4).await.unwrap();
    let peek = peeker.peek(&amqp, &creds, "/", "work").await.unwrap();
    assert_eq!((peek.ready, peek.consumers), (4, 0));
    publish_confirmed(&channel, "work", 1).await.unwrap();
    let peek = peeker.peek(&amqp, &creds, "/", "work").await.unwrap();
    assert_eq!(peek.ready, 5);
    let missing = peeker.peek(&amqp, &creds, "/", "no-such-queue").await;
    assert!(
        matches!(missing, Err(PeekError::QueueNotFound { .. })),
        "{missing:?}"
    );
    // The cached connection survives the closed channel of a failed declare.
    assert_eq!(
        peeker.peek(&amqp, &creds, "/", "work").await.unwrap().ready,
        5
    );

    // pod-busy takes two messages and holds them; pod-idle consumes an empty queue.
    let busy = connect(&node, "pod-busy").await;
    let busy_channel = busy.create_channel().await.unwrap();
    busy_channel
        .basic_qos(2, BasicQosOptions::default())
        .await
        .unwrap();
    let mut busy_consumer = busy_channel
        .basic_consume(
            "work".into(),
            "busy".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let idle = connect(&node, "pod-idle").await;
    let idle_channel = idle.create_channel().await.unwrap();
    let _idle_consumer = idle_channel
        .basic_consume(
            "quiet".into(),
            "idle".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(busy_consumer.next().await.unwrap().unwrap());
    }

    let client = ManagementClient::new(ManagementConfig::default()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let unacked = loop {
        let before = client.requests_sent();
        let unacked = client.connection_unacked(&endpoint, "/").await.unwrap();
        assert_eq!(client.requests_sent() - before, 2);
        if unacked.unacked("pod-busy") == 2 && unacked.by_connection.contains_key("pod-idle") {
            break unacked;
        }
        assert!(
            Instant::now() < deadline,
            "never saw the unacked: {unacked:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(unacked.unacked("pod-idle"), 0);
    assert_eq!(unacked.unacked("setup"), 0);

    // Queue view agrees: 3 ready, 2 unacked, 1 consumer.
    let queues = wait_for_stats(&client, &endpoint, |s| {
        s.get("work").is_some_and(|q| {
            q.messages_unacknowledged == Some(2)
                && q.messages_ready.is_some()
                && q.consumers.is_some()
        })
    })
    .await;
    let work = queues.get("work").unwrap();
    assert_eq!(work.messages_ready, Some(3));
    assert_eq!(work.consumers, Some(1));

    // Once acked, pod-busy is idle again.
    for delivery in held {
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
    }
    busy_channel.close(200, "done".into()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let unacked = client.connection_unacked(&endpoint, "/").await.unwrap();
        if unacked.unacked("pod-busy") == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "pod-busy stayed busy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn wrong_password_unknown_vhost_and_refused_port_are_clear_errors() {
    let node = node().await;
    let client = ManagementClient::new(ManagementConfig {
        timeout: Duration::from_secs(3),
        ..ManagementConfig::default()
    })
    .unwrap();

    let mut wrong = guest(&node);
    wrong.credentials.password = "not-the-password".into();
    let err = client.vhost_queues(&wrong, "/").await.unwrap_err();
    assert!(matches!(err, StatsError::Unauthorized { .. }), "{err:?}");
    assert_eq!(err.metric_label(), "unauthorized");
    assert!(err.to_string().contains("guest"), "{err}");
    assert!(!err.to_string().contains("not-the-password"), "{err}");

    let err = client
        .vhost_queues(&guest(&node), "no-such-vhost")
        .await
        .unwrap_err();
    assert!(matches!(err, StatsError::VhostNotFound { .. }), "{err:?}");
    assert_eq!(err.metric_label(), "vhost_not_found");
    assert!(err.to_string().contains("no-such-vhost"), "{err}");

    let refused = ManagementEndpoint {
        url: format!("http://127.0.0.1:{}", warren_testkit::free_port().unwrap()),
        ..guest(&node)
    };
    let err = client.vhost_queues(&refused, "/").await.unwrap_err();
    assert_eq!(err.metric_label(), "unreachable", "{err:?}");

    // AMQP side: wrong password is a connect error, not a hang.
    let peeker = QueuePeeker::new(Duration::from_secs(5));
    let amqp = format!("amqp://127.0.0.1:{}", node.amqp_port());
    let err = peeker
        .peek(&amqp, &wrong.credentials, "/", "anything")
        .await
        .unwrap_err();
    assert_eq!(err.metric_label(), "connect", "{err:?}");
}

/// Credentials from a Secret served by a private control plane, as the
/// controller reads them.
async fn credentials_cache() -> (ControlPlane, Arc<CredentialsCache>) {
    let plane = ControlPlane::start()
        .await
        .expect("a private control plane must start (make local-build builds localcluster)");
    let client = plane.client().await.unwrap();
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "warren-rabbitmq", "namespace": "default"},
        "data": {"username": "Z3Vlc3Q=", "password": "Z3Vlc3Q="}}))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    (plane, cache_of(client))
}

fn cache_of(client: kube::Client) -> Arc<CredentialsCache> {
    Arc::new(CredentialsCache::new(client, Duration::from_secs(600)))
}

fn target(management_url: String, amqp_port: u16, queue: &str) -> BrokerTarget {
    BrokerTarget {
        namespace: "default".into(),
        broker: BrokerRef {
            management_url,
            amqp_url: format!("amqp://127.0.0.1:{amqp_port}"),
            credentials_secret_ref: CredentialsSecretRef {
                name: "warren-rabbitmq".into(),
                username_key: "username".into(),
                password_key: "password".into(),
            },
        },
        queue: QueueRef::single(queue, "/"),
    }
}

#[tokio::test]
async fn a_burst_is_observed_at_once_while_the_management_api_still_shows_the_old_count() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // RabbitMQ's default statistics interval: the management API lags.
    let node = RabbitNode::start(RabbitOptions {
        management: true,
        stats_interval_ms: 5000,
        ..RabbitOptions::default()
    })
    .await
    .expect("a private RabbitMQ node with management must start (is rabbitmq-server installed?)");
    let endpoint = guest(&node);
    let conn = connect(&node, "publisher").await;
    let channel = conn.create_channel().await.unwrap();
    let (_server, credentials) = credentials_cache().await;
    let metrics = ControllerMetrics::default();
    let management = ManagementClient::new(ManagementConfig::default())
        .unwrap()
        .with_metrics(metrics.clone());
    let hub = Arc::new(QueueStatsHub::new(management, Duration::from_millis(100)));
    let peeker = Arc::new(QueuePeeker::new(Duration::from_secs(5)).with_metrics(metrics.clone()));
    let source = BrokerObserver::new(credentials.clone(), hub.clone(), peeker.clone());
    let probe = ManagementClient::new(ManagementConfig::default()).unwrap();

    // A stats emission may land between the publish and the reads; a few
    // fresh queues make sure the lag shows at least once. Every attempt
    // must see the whole burst at once.
    let mut stale_seen = 0;
    for attempt in 0..3 {
        let queue = unique_name("burst");
        declare(&channel, &queue).await;
        // The management API knows the (empty) queue with counts...
        wait_for_stats(&probe, &endpoint, |s| {
            s.get(&queue).is_some_and(|q| q.messages_ready == Some(0))
        })
        .await;
        let target = target(node.management_url(), node.amqp_port(), &queue);
        let before = source.observe(&target).await.unwrap();
        assert_eq!((before.ready, before.unacked), (0, Some(0)));

        // ...then 50 messages land.
        publish_confirmed(&channel, &queue, 50).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await; // past the hub's max_age
        let read = source.observe(&target).await.unwrap();
        let management_ready = probe
            .vhost_queues(&endpoint, "/")
            .await
            .unwrap()
            .get(&queue)
            .and_then(|q| q.messages_ready);
        assert_eq!(read.ready, 50, "attempt {attempt}: {read:?}");
        assert_eq!(read.ready_source, ReadySource::PassiveDeclare);
        assert_eq!(read.unacked, Some(0), "unacked comes from management");
        assert_eq!(read.consumers, 0);
        assert_eq!(unacked::observation(&read, None).ready, 50);
        if management_ready != Some(50) {
            stale_seen += 1;
            eprintln!(
                "attempt {attempt}: management API said {management_ready:?}, the passive declare 50"
            );
        }
    }
    assert!(
        stale_seen > 0,
        "the management API was never behind: the test shows nothing"
    );

    // Management API down, AMQP up: still an observation, unacked unknown.
    let refused = format!("http://127.0.0.1:{}", warren_testkit::free_port().unwrap());
    let queue = unique_name("no-mgmt");
    declare(&channel, &queue).await;
    publish_confirmed(&channel, &queue, 3).await.unwrap();
    let read = source
        .observe(&target(refused.clone(), node.amqp_port(), &queue))
        .await
        .unwrap();
    assert_eq!((read.ready, read.unacked), (3, None));
    assert_eq!(unacked::observation(&read, Some(2)).unacked, 2);

    // Both down: an error.
    let dead_amqp = warren_testkit::free_port().unwrap();
    let err = source
        .observe(&target(refused, dead_amqp, &queue))
        .await
        .unwrap_err();
    assert_eq!(err.metric_label(), "unreachable", "{err:?}");

    // One connection and one shared channel served every read of the node.
    assert_eq!(
        peeker.connections_opened(),
        2,
        "the node's and the dead port's"
    );
    assert_eq!(peeker.channels_opened(), 1);
    let ok = metrics
        .passive_declares
        .get_or_create(&ResultLabels {
            result: "ok".into(),
        })
        .get();
    assert_eq!(ok, 3 * 2 + 1);
}

#[tokio::test]
async fn a_missing_queue_fails_its_own_read_only_and_the_shared_channel_is_kept() {
    let node = node().await;
    let endpoint = guest(&node);
    let conn = connect(&node, "setup").await;
    let channel = conn.create_channel().await.unwrap();
    let queues: Vec<String> = (0..20).map(|i| format!("present-{i}")).collect();
    for (i, queue) in queues.iter().enumerate() {
        declare(&channel, queue).await;
        publish_confirmed(&channel, queue, i % 4).await.unwrap();
    }
    let peeker = Arc::new(QueuePeeker::new(Duration::from_secs(5)));
    let amqp = format!("amqp://127.0.0.1:{}", node.amqp_port());
    let creds = endpoint.credentials.clone();

    // Two rounds of concurrent declares, two missing queues among them. The
    // broker closes the channel a missing queue is declared on, failing
    // whatever else is pending there: only the missing ones may fail.
    for round in 0..2 {
        let mut names: Vec<String> = queues.clone();
        names.insert(5, "missing-a".into());
        names.insert(15, "missing-b".into());
        let reads = names.iter().map(|queue| {
            let peeker = peeker.clone();
            let amqp = amqp.clone();
            let creds = creds.clone();
            let queue = queue.clone();
            async move {
                let result = peeker.peek(&amqp, &creds, "/", &queue).await;
                (queue, result)
            }
        });
        for (queue, result) in futures::future::join_all(reads).await {
            match queue.strip_prefix("present-") {
                Some(i) => {
                    let i: usize = i.parse().unwrap();
                    let peek = result.unwrap_or_else(|e| panic!("round {round}: {queue}: {e}"));
                    assert_eq!(peek.ready, (i % 4) as u64, "round {round}: {queue}");
                }
                None => assert!(
                    matches!(&result, Err(PeekError::QueueNotFound { queue: q, .. }) if *q == queue),
                    "round {round}: {queue}: {result:?}"
                ),
            }
        }
        eprintln!(
            "round {round}: {} channels opened, {} private (retries and known-missing queues)",
            peeker.channels_opened(),
            peeker.private_channels_opened()
        );
        if round == 0 {
            assert_eq!(peeker.connections_opened(), 1);
        }
    }
    // Round 2 declared the missing queues on private channels only: the
    // shared channel opened in round 1 (or reopened there) is still the one.
    let shared_before = peeker.channels_opened() - peeker.private_channels_opened();
    let private_before = peeker.private_channels_opened();
    for queue in &queues {
        peeker.peek(&amqp, &creds, "/", queue).await.unwrap();
    }
    assert_eq!(
        peeker.channels_opened() - peeker.private_channels_opened(),
        shared_before
    );
    assert_eq!(peeker.private_channels_opened(), private_before);
    assert!(
        matches!(
            peeker.peek(&amqp, &creds, "/", "missing-a").await,
            Err(PeekError::QueueNotFound { .. })
        ),
        "still missing"
    );
    assert_eq!(peeker.private_channels_opened(), private_before + 1);
    assert_eq!(peeker.connections_opened(), 1);

    // Once the queue exists it is read again (and back on the shared channel).
    declare(&channel, "missing-a").await;
    publish_confirmed(&channel, "missing-a", 2).await.unwrap();
    assert_eq!(
        peeker
            .peek(&amqp, &creds, "/", "missing-a")
            .await
            .unwrap()
            .ready,
        2
    );
    let private_after = peeker.private_channels_opened();
    assert_eq!(
        peeker
            .peek(&amqp, &creds, "/", "missing-a")
            .await
            .unwrap()
            .ready,
        2
    );
    assert_eq!(peeker.private_channels_opened(), private_after);

    // The broker sees one connection named warren-controller.
    let client = ManagementClient::new(ManagementConfig::default()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let named = client.connection_unacked(&endpoint, "/").await.unwrap();
        if named.by_connection.contains_key("warren-controller") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no connection named warren-controller: {named:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_connection_is_reopened_after_a_broker_restart() {
    let mut node = RabbitNode::start(RabbitOptions::default())
        .await
        .expect("a private RabbitMQ node must start (is rabbitmq-server installed?)");
    let queue = unique_name("restart");
    {
        let conn = connect(&node, "setup").await;
        let channel = conn.create_channel().await.unwrap();
        declare(&channel, &queue).await;
        publish_confirmed(&channel, &queue, 4).await.unwrap();
        conn.close(200, "done".into()).await.unwrap();
    }
    let peeker = QueuePeeker::new(Duration::from_secs(5)).reconnect_backoff(Duration::ZERO);
    let amqp = format!("amqp://127.0.0.1:{}", node.amqp_port());
    let creds = Credentials {
        username: "guest".into(),
        password: "guest".into(),
    };
    for _ in 0..3 {
        assert_eq!(
            peeker.peek(&amqp, &creds, "/", &queue).await.unwrap().ready,
            4
        );
    }
    assert_eq!(peeker.connections_opened(), 1);

    node.stop().await.unwrap();
    let err = peeker.peek(&amqp, &creds, "/", &queue).await.unwrap_err();
    assert!(
        matches!(err.metric_label(), "connect" | "channel" | "declare"),
        "{err:?}"
    );

    node.start_again().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let peek = loop {
        match peeker.peek(&amqp, &creds, "/", &queue).await {
            Ok(peek) => break peek,
            Err(err) => {
                assert!(Instant::now() < deadline, "never reconnected: {err}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // The queue is durable, its transient messages are gone.
    assert_eq!(peek.ready, 0, "{peek:?}");
    let opened = peeker.connections_opened();
    assert!(opened >= 2, "{opened}");
    // And it stays: no new connection per read.
    for _ in 0..3 {
        peeker.peek(&amqp, &creds, "/", &queue).await.unwrap();
    }
    assert_eq!(peeker.connections_opened(), opened);
}

#[tokio::test]
async fn a_scaler_on_a_missing_queue_gets_queue_not_found_without_a_declare_per_tick() {
    let node = node().await;
    let (_server, credentials) = credentials_cache().await;
    let management = ManagementClient::new(ManagementConfig::default()).unwrap();
    let hub = Arc::new(QueueStatsHub::new(management, Duration::from_millis(100)));
    let peeker = Arc::new(QueuePeeker::new(Duration::from_secs(5)));
    let source = BrokerObserver::new(credentials, hub, peeker.clone());
    let queue = unique_name("late");
    let target = target(node.management_url(), node.amqp_port(), &queue);

    // First read: the passive declare says 404.
    let err = source.observe(&target).await.unwrap_err();
    assert_eq!(err.condition_reason(), "QueueNotFound", "{err:?}");
    assert_eq!(peeker.declares_sent(), 1);
    // Later reads: the listing still lacks it, no declare.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let err = source.observe(&target).await.unwrap_err();
        assert_eq!(err.condition_reason(), "QueueNotFound", "{err:?}");
    }
    assert_eq!(peeker.declares_sent(), 1);

    // Once created, the queue is read at the next tick.
    let conn = connect(&node, "setup").await;
    let channel = conn.create_channel().await.unwrap();
    declare(&channel, &queue).await;
    publish_confirmed(&channel, &queue, 6).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let read = source.observe(&target).await.unwrap();
    assert_eq!(read.ready, 6);
    assert_eq!(read.ready_source, ReadySource::PassiveDeclare);
    assert!(!peeker.is_known_missing(
        &target.broker.amqp_url,
        &Credentials {
            username: "guest".into(),
            password: "guest".into(),
        },
        "/",
        &queue
    ));
}

#[tokio::test]
async fn a_scaler_over_names_and_a_pattern_reads_every_matching_queue_with_one_listing() {
    let node = node().await;
    let (plane, credentials) = credentials_cache().await;
    let management = ManagementClient::new(ManagementConfig::default()).unwrap();
    let hub = Arc::new(QueueStatsHub::new(management, Duration::from_secs(30)));
    let peeker = Arc::new(QueuePeeker::new(Duration::from_secs(5)));
    let source = BrokerObserver::new(credentials, hub.clone(), peeker.clone());
    let probe = ManagementClient::new(ManagementConfig::default()).unwrap();
    let endpoint = guest(&node);

    // Three "notify" queues the pattern matches, one named queue, one other.
    let prefix = unique_name("notify");
    let matched: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|s| format!("{prefix}-{s}"))
        .collect();
    let named = unique_name("tasks");
    let other = unique_name("other");
    let conn = connect(&node, "setup").await;
    let channel = conn.create_channel().await.unwrap();
    for (queue, count) in matched.iter().zip([4usize, 0, 7]) {
        declare(&channel, queue).await;
        publish_confirmed(&channel, queue, count).await.unwrap();
    }
    declare(&channel, &named).await;
    publish_confirmed(&channel, &named, 2).await.unwrap();
    declare(&channel, &other).await;
    publish_confirmed(&channel, &other, 50).await.unwrap();
    wait_for_stats(&probe, &endpoint, |s| {
        matched
            .iter()
            .chain([&named, &other])
            .all(|q| s.get(q).is_some())
    })
    .await;

    let mut target = target(node.management_url(), node.amqp_port(), &named);
    target.queue.pattern = Some(format!("^{prefix}-"));
    target.queue.operation = warren_crd::Operation::Max;
    let requests_before = hub.client().requests_sent();
    let read = source.observe(&target).await.unwrap();
    let names: Vec<&str> = read.queues.iter().map(|(n, _)| n.as_str()).collect();
    let mut expected = vec![named.as_str()];
    expected.extend(matched.iter().map(String::as_str));
    assert_eq!(names, expected, "named first, then the matches, sorted");
    let ready: Vec<u64> = read.queues.iter().map(|(_, r)| r.ready).collect();
    assert_eq!(ready, vec![2, 4, 0, 7]);
    assert_eq!(read.ready, 13, "the other queue is not counted");
    assert_eq!(read.ready_source, ReadySource::PassiveDeclare);
    // One listing (cached) served the pattern and every queue's row; one
    // passive declare per queue.
    assert_eq!(hub.client().requests_sent() - requests_before, 1);
    assert_eq!(peeker.declares_sent(), 4);
    let observation = unacked::observation(&read, None);
    assert_eq!(observation.queues.len(), 4);
    assert_eq!(observation.ready, 13);

    // A queue created later is matched at the next listing.
    let late = format!("{prefix}-d");
    declare(&channel, &late).await;
    publish_confirmed(&channel, &late, 3).await.unwrap();
    let fresh_hub = Arc::new(QueueStatsHub::new(
        ManagementClient::new(ManagementConfig::default()).unwrap(),
        Duration::from_millis(100),
    ));
    let credentials2 = cache_of(plane.client().await.unwrap());
    let fresh = BrokerObserver::new(credentials2, fresh_hub, peeker.clone());
    wait_for_stats(&probe, &endpoint, |s| s.get(&late).is_some()).await;
    let read = fresh.observe(&target).await.unwrap();
    assert_eq!(read.queues.len(), 5);
    assert_eq!(read.ready, 16);

    // A named queue that does not exist fails the whole read.
    target.queue.names = vec![unique_name("missing")];
    let err = fresh.observe(&target).await.unwrap_err();
    assert_eq!(err.condition_reason(), "QueueNotFound", "{err:?}");
}

//! The broker readers against a private RabbitMQ node with the management
//! plugin and a short statistics interval.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use warren_controller::queue_peek::{PeekError, QueuePeeker};
use warren_controller::queue_stats::{
    Credentials, ManagementClient, ManagementConfig, ManagementEndpoint, QueueStatsHub, StatsError,
    VhostQueues,
};
use warren_testkit::{RabbitNode, RabbitOptions};

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

async fn publish(channel: &Channel, queue: &str, count: usize) {
    for _ in 0..count {
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b"job",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
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
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let queues: Vec<String> = (0..5).map(|i| format!("depth-{i}")).collect();
    for (i, queue) in queues.iter().enumerate() {
        declare(&channel, queue).await;
        publish(&channel, queue, i + 1).await;
    }

    let client = ManagementClient::new(ManagementConfig::default()).unwrap();
    let snapshot = wait_for_stats(&client, &endpoint, |s| {
        queues.iter().enumerate().all(|(i, q)| {
            s.get(q)
                .is_some_and(|q| q.messages_ready == Some(i as u64 + 1))
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
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    declare(&channel, "work").await;
    declare(&channel, "quiet").await;

    // Passive declare sees published messages at once, without waiting for stats.
    let peeker = QueuePeeker::new(Duration::from_secs(5));
    let creds = endpoint.credentials.clone();
    let amqp = format!("amqp://127.0.0.1:{}", node.amqp_port());
    publish(&channel, "work", 4).await;
    let peek = peeker.peek(&amqp, &creds, "/", "work").await.unwrap();
    assert_eq!((peek.ready, peek.consumers), (4, 0));
    publish(&channel, "work", 1).await;
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
        s.get("work")
            .is_some_and(|q| q.messages_unacknowledged == Some(2))
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

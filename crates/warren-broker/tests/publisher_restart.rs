//! The publisher against a private node that is killed and restarted.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;
use warren_broker::{Publisher, PublisherConfig, QueueType, Topology};
use warren_testkit::{RabbitNode, RabbitOptions, ready_count, unique_name};

async fn publish_until_confirmed(
    publisher: &Publisher,
    queue: &str,
    within: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        let properties = BasicProperties::default().with_delivery_mode(2);
        match publisher.publish("", queue, b"{}", properties).await {
            Ok(()) => return Ok(()),
            Err(err) if Instant::now() > deadline => return Err(err.to_string()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn survives_restart(queue_type: QueueType, crash: bool) {
    let mut node = RabbitNode::start(RabbitOptions::default()).await.unwrap();
    let queue = unique_name("restart");
    let mut config = PublisherConfig::new(node.amqp_url(), "test-publisher");
    config.confirm_timeout = Duration::from_secs(2);
    let publisher = Publisher::start(
        config,
        Topology::new(vec![queue.clone()], queue_type),
        CancellationToken::new(),
    );
    assert!(publisher.wait_connected(Duration::from_secs(30)).await);
    publish_until_confirmed(&publisher, &queue, Duration::from_secs(5))
        .await
        .unwrap();

    if crash {
        node.kill().await.unwrap();
    } else {
        node.stop().await.unwrap();
    }
    node.start_again().await.unwrap();
    let result = publish_until_confirmed(&publisher, &queue, Duration::from_secs(60)).await;
    if let Err(err) = &result {
        let queues = node.rabbitmqctl(&["list_queues", "name", "type", "state", "messages"]);
        panic!("no confirmed publish after the restart: {err}; queues: {queues:?}");
    }
    assert!(publisher.connect_count() >= 2);
    assert_eq!(
        ready_count(&node.amqp_url(), &queue).await.unwrap(),
        2,
        "both confirmed messages are kept"
    );
}

#[tokio::test]
async fn quorum_queue_publishes_are_confirmed_again_after_a_graceful_broker_restart() {
    survives_restart(QueueType::Quorum, false).await;
}

#[tokio::test]
async fn classic_queue_publishes_are_confirmed_again_after_a_broker_crash() {
    survives_restart(QueueType::Classic, true).await;
}

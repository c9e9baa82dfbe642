//! The private node really is a broker of its own: it starts, keeps durable
//! data across a kill and restart, and serves the management API on request.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use warren_testkit::{RabbitNode, RabbitOptions};

#[tokio::test]
async fn durable_messages_survive_kill_and_restart() {
    let mut node = RabbitNode::start(RabbitOptions {
        management: true,
        ..RabbitOptions::default()
    })
    .await
    .expect("private node must start");
    assert_ne!(node.amqp_port(), 5672, "must not be the shared broker");

    let conn = Connection::connect(&node.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare("kept".into(), durable, FieldTable::default())
        .await
        .unwrap();
    channel
        .basic_publish(
            "".into(),
            "kept".into(),
            BasicPublishOptions::default(),
            b"hello",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    // The management API answers on its own port.
    let mgmt =
        tokio::net::TcpStream::connect(node.management_url().trim_start_matches("http://")).await;
    assert!(mgmt.is_ok(), "management port must accept connections");

    node.kill().await.unwrap();
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(&node.amqp_url(), ConnectionProperties::default()),
    )
    .await;
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "a killed node must not accept connections"
    );

    node.start_again().await.unwrap();
    let conn = Connection::connect(&node.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let queue = channel
        .queue_declare(
            "kept".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(queue.message_count(), 1, "the persistent message survived");
}

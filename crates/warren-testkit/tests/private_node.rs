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
    // The node accepts connections while its vhost may still be recovering its
    // queues: a passive declare can say NOT_FOUND for a moment (it closes the
    // channel, so each try gets a new one). A queue that was lost never shows.
    let conn = Connection::connect(&node.amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let queue = loop {
        let channel = conn.create_channel().await.unwrap();
        let declared = channel
            .queue_declare(
                "kept".into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(queue) => break queue,
            Err(err) if std::time::Instant::now() < deadline => {
                eprintln!("the durable queue is not back yet: {err}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(err) => panic!("the durable queue did not come back after the restart: {err}"),
        }
    };
    assert_eq!(queue.message_count(), 1, "the persistent message survived");
}

/// With `http_on_all_interfaces` the management API answers on an address of
/// this machine other than loopback (pods of the local cluster reach it
/// through the node's bridge address).
#[tokio::test]
async fn management_on_every_interface_answers_on_a_non_loopback_address() {
    // This machine's address on its default route: a UDP "connection" sends nothing.
    let probe = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    probe.connect("192.0.2.1:9").unwrap();
    let local = probe.local_addr().unwrap().ip();
    assert!(!local.is_loopback(), "{local}");
    let node = RabbitNode::start(RabbitOptions {
        management: true,
        http_on_all_interfaces: true,
        ..RabbitOptions::default()
    })
    .await
    .expect("private node must start");
    let port = node
        .management_url()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .expect("a port in the management URL");
    let mut answered = None;
    for _ in 0..100 {
        if let Ok(s) = tokio::net::TcpStream::connect((local, port)).await {
            answered = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        answered.is_some(),
        "the management API does not answer on {local}:{port}"
    );
}

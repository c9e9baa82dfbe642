//! The audit events log on a private RabbitMQ node: a stream declared with
//! its retention, an old unbounded queue named (not a crash) and replaced, and
//! reading it in order, from the start or from a point in time, without
//! consuming it.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use warren_broker::events_log::{EventsLogReader, ReadError, StartAt, read_retained};
use warren_broker::topology::{EVENTS_EXCHANGE, EVENTS_LOG_QUEUE};
use warren_broker::{EventsLogRetention, EventsLogStatus, QueueType, Topology};
use warren_testkit::{RabbitNode, RabbitOptions, ready_count};

async fn node() -> (RabbitNode, Connection) {
    let node = RabbitNode::start(RabbitOptions::default())
        .await
        .expect("a private RabbitMQ node (Debian's rabbitmq-server must be installed)");
    let connection = Connection::connect(&node.amqp_url(), ConnectionProperties::default())
        .await
        .expect("connecting to the private node");
    (node, connection)
}

fn retention() -> EventsLogRetention {
    EventsLogRetention {
        max_age: "1h".into(),
        max_bytes: 1_000_000,
    }
}

/// `name<TAB>type<TAB>arguments` of the events log, as RabbitMQ reports it.
fn events_log_row(node: &RabbitNode) -> String {
    let listing = node
        .rabbitmqctl(&[
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "type",
            "arguments",
        ])
        .expect("rabbitmqctl list_queues");
    listing
        .lines()
        .find(|line| line.split('\t').next() == Some(EVENTS_LOG_QUEUE))
        .unwrap_or_default()
        .to_string()
}

async fn publish_event(connection: &Connection, key: &str, n: u64) {
    let channel = connection.create_channel().await.expect("channel");
    let body = json!({"event": key, "n": n, "at": chrono_now()}).to_string();
    channel
        .basic_publish(
            ShortString::from(EVENTS_EXCHANGE),
            ShortString::from(key),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish");
    let _ = channel.close(200, "done".into()).await;
}

fn chrono_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[tokio::test]
async fn the_events_log_is_a_stream_bounded_by_the_configured_age_and_size() {
    let (node, connection) = node().await;
    let topology =
        Topology::new(vec!["tasks".into()], QueueType::Quorum).with_events_log(retention());
    assert_eq!(
        topology.declare(&connection).await.expect("declare"),
        EventsLogStatus::Bounded
    );
    assert_eq!(
        topology.declare(&connection).await.expect("declare again"),
        EventsLogStatus::Bounded,
        "declaring twice is a no-op"
    );
    let row = events_log_row(&node);
    assert!(row.contains("\tstream\t"), "{row}");
    for arg in [
        r#"{"x-queue-type","stream"}"#,
        r#"{"x-max-age","1h"}"#,
        r#"{"x-max-length-bytes",800000}"#,
        r#"{"x-stream-max-segment-size-bytes",100000}"#,
    ] {
        assert!(row.contains(arg), "{arg} missing from {row}");
    }
}

#[tokio::test]
async fn an_old_unbounded_log_is_named_not_fatal_and_migrate_replaces_it() {
    let (node, connection) = node().await;
    // What earlier versions declared: a durable classic queue, no arguments, bound to `#`.
    let channel = connection.create_channel().await.expect("channel");
    Topology::new(Vec::new(), QueueType::Quorum)
        .declare(&connection)
        .await
        .expect("exchange");
    channel
        .queue_delete(ShortString::from(EVENTS_LOG_QUEUE), Default::default())
        .await
        .expect("delete the stream to put the old queue in its place");
    channel
        .queue_declare(
            ShortString::from(EVENTS_LOG_QUEUE),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("old queue");
    channel
        .queue_bind(
            ShortString::from(EVENTS_LOG_QUEUE),
            ShortString::from(EVENTS_EXCHANGE),
            ShortString::from("#"),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");

    // A process starting now declares everything else and reports the old log.
    let topology =
        Topology::new(vec!["jobs".into()], QueueType::Classic).with_events_log(retention());
    let status = topology
        .declare(&connection)
        .await
        .expect("the old log is not an error");
    let EventsLogStatus::Legacy { reason } = status else {
        panic!("the old log was not reported: {status:?}");
    };
    assert!(reason.contains("PRECONDITION_FAILED"), "{reason}");
    assert_eq!(
        ready_count(&node.amqp_url(), "jobs")
            .await
            .expect("work queue"),
        0
    );
    publish_event(&connection, "message.accepted", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        ready_count(&node.amqp_url(), EVENTS_LOG_QUEUE)
            .await
            .expect("old log"),
        1,
        "events still reach the old log"
    );

    // The reader refuses to consume it, and gives the message back.
    let refused = match EventsLogReader::open(&connection, &StartAt::First, 10).await {
        Err(err) => Some(Err(err)),
        Ok(mut reader) => reader.next().await,
    };
    assert!(
        matches!(refused, Some(Err(ReadError::NotAStream))),
        "{refused:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        ready_count(&node.amqp_url(), EVENTS_LOG_QUEUE)
            .await
            .expect("old log"),
        1,
        "the reader consumed the old log"
    );

    let found = topology
        .migrate_events_log(&connection)
        .await
        .expect("migrate");
    assert!(matches!(found, EventsLogStatus::Legacy { .. }), "{found:?}");
    assert!(events_log_row(&node).contains("\tstream\t"));
    assert_eq!(
        topology.declare(&connection).await.expect("declare"),
        EventsLogStatus::Bounded
    );
    assert_eq!(
        topology
            .migrate_events_log(&connection)
            .await
            .expect("again"),
        EventsLogStatus::Bounded,
        "a second migrate has nothing to do"
    );
}

#[tokio::test]
async fn readers_read_in_order_from_the_start_from_a_time_and_live_without_consuming() {
    let (_node, connection) = node().await;
    Topology::new(Vec::new(), QueueType::Quorum)
        .with_events_log(retention())
        .declare(&connection)
        .await
        .expect("declare");
    for n in 0..5 {
        publish_event(&connection, "message.accepted", n).await;
    }
    // Stream timestamps are in whole seconds: leave a clear gap around the cut.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cut = "0s".parse::<StartAt>().expect("now");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for n in 5..10 {
        publish_event(&connection, "message.processed", n).await;
    }

    let idle = Duration::from_millis(1500);
    for _ in 0..2 {
        // Twice: reading consumes nothing.
        let all = read_retained(&connection, &StartAt::First, idle, None)
            .await
            .expect("read from the start");
        let ns: Vec<u64> = all.iter().filter_map(|e| e.event["n"].as_u64()).collect();
        assert_eq!(ns, (0..10).collect::<Vec<_>>());
        assert!(
            all.windows(2).all(|w| w[1].offset > w[0].offset),
            "offsets increase"
        );
    }
    let later = read_retained(&connection, &cut, idle, None)
        .await
        .expect("read from a time");
    let ns: Vec<u64> = later.iter().filter_map(|e| e.event["n"].as_u64()).collect();
    assert_eq!(ns, (5..10).collect::<Vec<_>>());
    assert!(later.iter().all(|e| e.routing_key == "message.processed"));
    let from_offset = read_retained(
        &connection,
        &StartAt::Offset(later[0].offset),
        idle,
        Some(2),
    )
    .await
    .expect("read from an offset");
    assert_eq!(from_offset.len(), 2);
    assert_eq!(from_offset[0], later[0]);

    // Following: only what comes after attaching.
    let mut follower = EventsLogReader::open(&connection, &StartAt::Next, 10)
        .await
        .expect("follow");
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish_event(&connection, "scaler.scaled", 10).await;
    let next = follower
        .next_within(Duration::from_secs(10))
        .await
        .expect("read")
        .expect("the new event arrives");
    assert_eq!(next.event["n"], 10);
    assert_eq!(next.routing_key, "scaler.scaled");
    assert_eq!(next.offset, later[4].offset + 1);
}

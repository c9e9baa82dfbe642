//! A RabbitMQ memory alarm as the worker sees it: RabbitMQ blocks a
//! connection on its first publish after the alarm, here the worker's
//! `message.processed` audit event; the worker logs that and exposes
//! `warren_worker_broker_blocked` 1, and both go back when the alarm clears.
//!
//! The job is queued before the alarm and the worker starts only once the
//! alarm is in effect, so its first publish is certainly after the alarm
//! (with audit batching, a worker already running could publish the event
//! before a slow `rabbitmqctl` had raised it).

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use support::*;
use warren_testkit::{RabbitNode, RabbitOptions, unique_name};

async fn wait_metric(worker: &Worker, name: &str, value: f64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while worker.metric(name).await != Some(value) {
        assert!(
            Instant::now() < deadline,
            "{name} never became {value}; log:\n{}",
            worker.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The connection states RabbitMQ reports (`running`, `blocking`, `blocked`).
fn connection_states(node: &RabbitNode) -> Vec<String> {
    let listing = node
        .rabbitmqctl(&["list_connections", "state", "--no-table-headers", "--quiet"])
        .unwrap();
    listing
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn the_worker_logs_and_exposes_a_blocked_connection_and_its_recovery() {
    let node = RabbitNode::start(RabbitOptions::default()).await.unwrap();
    let url = node.amqp_url();
    let queue = unique_name("worker-blocked");
    let sender = start_sender(&url, &queue, "classic").await;
    let first = send_ok(&sender, &dots(1)).await;

    node.rabbitmqctl(&["set_vm_memory_high_watermark", "0.000001"])
        .unwrap();
    // In effect: the sender's connection (it has published) is held for
    // blocking on its next publish.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let states = connection_states(&node);
        if !states.is_empty() && states.iter().all(|s| s == "blocking" || s == "blocked") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the alarm never took effect: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let worker = spawn_worker(
        &url,
        &queue,
        "worker-blocked",
        0.5,
        &[("WARREN_QUEUE_TYPE", "classic")],
    )
    .await;
    // The job runs and is acked (an ack is no publish); its audit event is
    // the connection's first publish: RabbitMQ blocks it.
    wait_metric(
        &worker,
        "warren_worker_broker_blocked",
        1.0,
        Duration::from_secs(30),
    )
    .await;
    assert!(worker.done_ids().contains(&first), "{}", worker.log_text());
    assert!(
        worker
            .log_text()
            .contains("RabbitMQ blocked the connection"),
        "{}",
        worker.log_text()
    );
    assert!(
        connection_states(&node).iter().any(|s| s == "blocked"),
        "RabbitMQ does not report a blocked connection"
    );

    node.rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"])
        .unwrap();
    wait_metric(
        &worker,
        "warren_worker_broker_blocked",
        0.0,
        Duration::from_secs(30),
    )
    .await;
    assert!(
        worker
            .log_text()
            .contains("RabbitMQ unblocked the connection"),
        "{}",
        worker.log_text()
    );
    // Recovered: a new job goes through end to end.
    let second = send_ok(&sender, &dots(1)).await;
    eventually(
        Duration::from_secs(30),
        "the job after the alarm done",
        || worker.done_ids().contains(&second),
    )
    .await;
    wait_metric(
        &worker,
        "warren_worker_jobs_processed_total",
        2.0,
        Duration::from_secs(10),
    )
    .await;
}

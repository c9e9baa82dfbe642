//! A RabbitMQ memory alarm as the worker sees it: its connection is blocked
//! on its first publish (the `message.processed` audit event) after the
//! alarm; it logs that and exposes `warren_worker_broker_blocked` 1, and both
//! go back when the alarm clears, after which the jobs in hand finish.

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

#[tokio::test]
async fn the_worker_logs_and_exposes_a_blocked_connection_and_its_recovery() {
    let node = RabbitNode::start(RabbitOptions::default()).await.unwrap();
    let url = node.amqp_url();
    let queue = unique_name("worker-blocked");
    let sender = start_sender(&url, &queue, "classic").await;
    let worker = spawn_worker(
        &url,
        &queue,
        "worker-blocked",
        0.5,
        &[("WARREN_QUEUE_TYPE", "classic")],
    )
    .await;
    assert_eq!(
        worker.metric("warren_worker_broker_blocked").await,
        Some(0.0)
    );
    let first = send_ok(&sender, &dots(2)).await;
    let second = send_ok(&sender, &dots(1)).await;
    wait_busy(&[&worker], Duration::from_secs(10)).await;

    node.rabbitmqctl(&["set_vm_memory_high_watermark", "0.000001"])
        .unwrap();
    // The first job ends, its audit event is the first publish after the
    // alarm: RabbitMQ blocks the worker's connection.
    wait_metric(
        &worker,
        "warren_worker_broker_blocked",
        1.0,
        Duration::from_secs(20),
    )
    .await;
    assert!(
        worker
            .log_text()
            .contains("RabbitMQ blocked the connection"),
        "{}",
        worker.log_text()
    );

    node.rabbitmqctl(&["set_vm_memory_high_watermark", "0.4"])
        .unwrap();
    wait_metric(
        &worker,
        "warren_worker_broker_blocked",
        0.0,
        Duration::from_secs(20),
    )
    .await;
    assert!(
        worker
            .log_text()
            .contains("RabbitMQ unblocked the connection")
    );
    eventually(Duration::from_secs(30), "both jobs done", || {
        let done = worker.done_ids();
        done.contains(&first) && done.contains(&second)
    })
    .await;
    wait_metric(
        &worker,
        "warren_worker_jobs_processed_total",
        2.0,
        Duration::from_secs(10),
    )
    .await;
}

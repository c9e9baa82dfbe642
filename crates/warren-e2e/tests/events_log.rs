//! The audit events log under a load far larger than its retention: the real
//! sender and worker on a private RabbitMQ node, with a small size bound.
//!
//! The bar (issue 18): after more than 10× the retention's worth of events the
//! log holds at most its configured bound, every job is accepted (202) and
//! processed, the broker raises no alarm, and a reader started after the load
//! reads the retained events in order.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::OsString;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use lapin::{Connection, ConnectionProperties};
use serde_json::json;
use warren_broker::events_log::{StartAt, read_retained};
use warren_broker::topology::EVENTS_LOG_QUEUE;
use warren_e2e::{Binaries, Process};
use warren_testkit::{RabbitNode, RabbitOptions, ready_count};

/// The size bound under test (the flags' minimum is 64 KiB).
const MAX_BYTES: u64 = 256 * 1024;

fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
    pairs
        .iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_load_ten_times_the_retention_keeps_the_log_bounded_while_jobs_flow() {
    let binaries = Binaries::locate().expect("the warren binaries (cargo build --bins)");
    let node = Arc::new(
        RabbitNode::start(RabbitOptions::default())
            .await
            .expect("a private RabbitMQ node"),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let max_bytes = MAX_BYTES.to_string();
    let common = [
        ("AMQP_URL", node.amqp_url()),
        ("WARREN_QUEUE", "jobs".to_string()),
        ("WARREN_QUEUE_TYPE", "classic".to_string()),
        ("WARREN_EVENTS_MAX_AGE", "1h".to_string()),
        ("WARREN_EVENTS_MAX_BYTES", max_bytes.clone()),
        ("WARREN_LOG_FORMAT", "json".to_string()),
        ("WARREN_LOG", "info".to_string()),
    ];
    let with = |extra: &[(&str, &str)]| {
        let mut pairs: Vec<(&str, &str)> = common.iter().map(|(k, v)| (*k, v.as_str())).collect();
        pairs.extend_from_slice(extra);
        env(&pairs)
    };
    let mut sender = Process::spawn(
        &binaries.sender,
        "warren-sender",
        &with(&[("WARREN_DOT_RULE_DISABLED", "true"), ("POD_NAME", "sender")]),
        dir.path(),
    )
    .expect("start the sender");
    sender
        .wait_http_ok("/readyz", Duration::from_secs(60))
        .await
        .expect("sender ready");
    let mut worker = Process::spawn(
        &binaries.worker,
        "warren-worker",
        &with(&[
            ("WARREN_SECONDS_PER_DOT", "0"),
            ("WARREN_PREFETCH", "50"),
            ("POD_NAME", "worker-0"),
        ]),
        dir.path(),
    )
    .expect("start the worker");
    worker
        .wait_http_ok("/readyz", Duration::from_secs(60))
        .await
        .expect("worker ready");

    // Alarms, watched for the whole load.
    let loading = Arc::new(AtomicBool::new(true));
    let watcher = {
        let node = node.clone();
        let loading = loading.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while loading.load(Ordering::Relaxed) {
                let node = node.clone();
                match tokio::task::spawn_blocking(move || node.alarms()).await {
                    Ok(Ok(alarms)) if alarms != "[]" => seen.push(alarms),
                    Ok(Ok(_)) => {}
                    other => seen.push(format!("cannot read the alarms: {other:?}")),
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            seen
        })
    };

    // Jobs in rounds until the log has dropped at least 9/10 of what was written:
    // everything ever written (the next offset) is then >= 10x what it retains.
    let connection = Connection::connect(&node.amqp_url(), ConnectionProperties::default())
        .await
        .expect("connect");
    let http = reqwest::Client::new();
    let send_url = format!("{}/send", sender.base_url());
    let mut accepted = 0usize;
    let mut refused = Vec::new();
    let started = Instant::now();
    let (written, retained) = loop {
        let statuses: Vec<u16> = futures::stream::iter(0..1000)
            .map(|i| {
                let http = http.clone();
                let url = send_url.clone();
                async move {
                    match http
                        .post(&url)
                        .json(&json!({"message": format!("event log load {i}")}))
                        .send()
                        .await
                    {
                        Ok(response) => response.status().as_u16(),
                        Err(_) => 0,
                    }
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        accepted += statuses.iter().filter(|s| **s == 202).count();
        refused.extend(statuses.into_iter().filter(|s| *s != 202));
        assert!(refused.is_empty(), "the sender refused jobs: {refused:?}");
        let retained_now =
            read_retained(&connection, &StartAt::First, Duration::from_secs(1), None)
                .await
                .expect("read the retained events");
        let Some(newest) = retained_now.last() else {
            panic!("the log is empty after {accepted} jobs");
        };
        // Events written: one message.accepted and one message.processed per job, and
        // never more than the stream's next offset (offsets increase with every event).
        let written = (2 * accepted as u64).min(newest.offset + 1);
        let retained = retained_now.len() as u64;
        if written >= 10 * retained {
            break (written, retained);
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "after {accepted} jobs the log still retains {retained} of {written} events"
        );
    };

    // Jobs keep flowing: the worker drains the queue.
    let deadline = Instant::now() + Duration::from_secs(300);
    while ready_count(&node.amqp_url(), "jobs").await.expect("depth") > 0 {
        assert!(
            Instant::now() < deadline,
            "the worker did not drain the queue"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    loading.store(false, Ordering::Relaxed);
    let alarms = watcher.await.expect("alarm watcher");
    assert!(alarms.is_empty(), "the broker raised alarms: {alarms:?}");
    assert_eq!(node.alarms().expect("alarms"), "[]");

    // The bound holds on disk.
    let bytes = node
        .stream_segment_bytes(EVENTS_LOG_QUEUE)
        .expect("the stream's segments on disk");
    assert!(
        bytes <= MAX_BYTES,
        "the log holds {bytes} bytes of segments, bound {MAX_BYTES}"
    );

    // A reader started now reads every retained event, in order.
    let all = read_retained(&connection, &StartAt::First, Duration::from_secs(2), None)
        .await
        .expect("read the retained events");
    assert!(
        all.windows(2).all(|w| w[1].offset > w[0].offset),
        "offsets out of order"
    );
    assert!(
        all.len() as u64 <= retained + 100,
        "{} events retained after the drain, {retained} during the load",
        all.len()
    );
    let kinds: std::collections::BTreeSet<&str> =
        all.iter().map(|e| e.routing_key.as_str()).collect();
    assert!(
        kinds.contains("message.accepted") && kinds.contains("message.processed"),
        "{kinds:?}"
    );
    assert!(
        all.first().is_some_and(|e| e.offset > 0),
        "nothing was dropped"
    );
    println!(
        "{accepted} jobs accepted and processed; {written} events written, {retained} retained \
         (ratio {:.1}); {} retained after the drain in {bytes} bytes of segments (bound {MAX_BYTES}); \
         no alarm; {:.1}s",
        written as f64 / retained as f64,
        all.len(),
        started.elapsed().as_secs_f64()
    );
}

//! SIGTERM while the broker keeps handing out jobs: a worker stopped at any
//! moment hands nothing back, so no job is ever redelivered because of it.
//!
//! The race this guards (see warren_worker::settle): a worker acks a job and
//! gets SIGTERM a few milliseconds later. The ack gives its consumer credit
//! and the quorum queue hands it the next job, but the broker's channel has
//! already handled the worker's `basic.cancel` and forwards nothing more to
//! that consumer: the job never reaches the worker (no `basic.deliver` after
//! the `basic.cancel-ok`, in lapin's frame trace), stays checked out to the
//! cancelled consumer and goes back to the queue, redelivered, when the
//! channel closes. Before the fix this test saw 5 and 6 of ~2,500 jobs
//! redelivered in 24 stops.
//!
//! Real worker processes against the shared RabbitMQ; instant jobs published
//! straight to the queue, several a millisecond, while workers are stopped.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{Connection, ConnectionProperties};
use support::*;
use warren_broker::Envelope;
use warren_testkit::{ready_count, shared_amqp_url, unique_name};

/// Publishes instant jobs (no dots) to `queue` until `stop`, with publisher
/// confirms; returns their ids.
async fn publish_until(url: String, queue: String, stop: Arc<AtomicBool>) -> Vec<String> {
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    let mut ids = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut confirms = Vec::new();
        for _ in 0..5 {
            let envelope = Envelope::new("job", Default::default());
            ids.push(envelope.id.to_string());
            confirms.push(
                channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &envelope.to_bytes(),
                        envelope.publish_properties("sigterm-race-test"),
                    )
                    .await
                    .unwrap(),
            );
        }
        for confirm in confirms {
            confirm.await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let _ = connection.close(200, "done".into()).await;
    ids
}

/// `job started` lines of a worker log: (id, redelivered).
fn started(log: &str) -> Vec<(String, bool)> {
    job_lines(log, "job started")
}

/// Workers are started and SIGTERMed one after another (one or two at a
/// time) while instant jobs keep arriving, so the broker is handing a job to
/// a stopping worker at the moment of nearly every SIGTERM. Every job is then
/// done exactly once and none is redelivered; every worker exits 0.
#[tokio::test]
async fn workers_stopped_while_jobs_stream_in_redeliver_nothing() {
    let url = shared_amqp_url();
    let queue = unique_name("sigterm-race");
    // The sender declares the quorum queue the way a deployment has it.
    let _sender = start_sender(&url, &queue, "quorum").await;
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(publish_until(url.clone(), queue.clone(), stop.clone()));

    let rounds = 20;
    let mut logs = Vec::new();
    // Each round: a fresh worker consumes the stream for a while, then is
    // stopped; a second worker overlaps it so the queue never piles up.
    let mut previous = spawn_worker(&url, &queue, "race-0", 0.0, &[]).await;
    for round in 1..=rounds {
        let next = spawn_worker(&url, &queue, &format!("race-{round}"), 0.0, &[]).await;
        // A different phase of the stream at every SIGTERM.
        tokio::time::sleep(Duration::from_millis(30 + (round as u64 * 37) % 170)).await;
        let code = previous.terminate().await;
        assert_eq!(code, Some(0), "{} exit status", previous.name);
        logs.push((previous.name.clone(), previous.log_text()));
        previous = next;
    }
    stop.store(true, Ordering::Relaxed);
    let sent = publisher.await.unwrap();
    eventually(
        Duration::from_secs(60),
        "the last worker drains the queue",
        || {
            started(&previous.log_text()).len()
                + logs
                    .iter()
                    .map(|(_, log)| started(log).len())
                    .sum::<usize>()
                >= sent.len()
        },
    )
    .await;
    assert_eq!(previous.terminate().await, Some(0));
    logs.push((previous.name.clone(), previous.log_text()));

    let mut starts: HashMap<String, Vec<&str>> = HashMap::new();
    let mut redelivered = Vec::new();
    for (name, log) in &logs {
        for (id, again) in started(log) {
            if again {
                redelivered.push(format!("{id} (to {name})"));
            }
            starts.entry(id).or_default().push(name);
        }
    }
    assert!(
        redelivered.is_empty(),
        "{} of {} jobs redelivered after a SIGTERM: {redelivered:?}",
        redelivered.len(),
        sent.len()
    );
    let twice: Vec<_> = starts.iter().filter(|(_, by)| by.len() > 1).collect();
    assert!(twice.is_empty(), "jobs started more than once: {twice:?}");
    let sent: HashSet<String> = sent.into_iter().collect();
    let done: HashSet<String> = starts.into_keys().collect();
    assert_eq!(done, sent, "every job done once");
    assert_eq!(ready_count(&url, &queue).await.unwrap(), 0);
}

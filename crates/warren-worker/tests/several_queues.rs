//! A worker consuming several queues (WARREN_QUEUE plus WARREN_QUEUES): every
//! queue's jobs are processed, taken in turn (a flood on one queue does not
//! starve another), and SIGTERM mid-job loses and redelivers nothing on any
//! queue. Real worker processes against the shared RabbitMQ; quorum queues,
//! which have no channel-wide prefetch (one consumer per queue, prefetch 1
//! each, so a worker holds at most one job per queue).

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use support::*;
use warren_sender::RunningSender;
use warren_testkit::{ready_count, shared_amqp_url, unique_name};

/// Three fresh queue names (`tasks`, `sms`, `email` in spirit) and a sender
/// that accepts all three.
async fn three_queues(prefix: &str) -> (Vec<String>, RunningSender) {
    let queues: Vec<String> = ["tasks", "sms", "email"]
        .iter()
        .map(|purpose| unique_name(&format!("{prefix}-{purpose}")))
        .collect();
    let url = shared_amqp_url();
    let sender =
        start_sender_with_queues(&url, &queues[0], &[&queues[1], &queues[2]], "quorum").await;
    (queues, sender)
}

/// A worker consuming the three queues (the first as WARREN_QUEUE).
async fn multi_worker(queues: &[String], name: &str, seconds_per_dot: f64) -> Worker {
    let more = queues[1..].join(",");
    spawn_worker(
        &shared_amqp_url(),
        &queues[0],
        name,
        seconds_per_dot,
        &[("WARREN_QUEUES", more.as_str())],
    )
    .await
}

/// Sends `n` jobs of `dots_each` dots to `queue`; returns (queue, id) pairs.
async fn send_many_to(
    sender: &RunningSender,
    queue: &str,
    n: usize,
    dots_each: usize,
) -> Vec<(String, String)> {
    let mut sent = Vec::new();
    for _ in 0..n {
        sent.push((
            queue.to_string(),
            send_ok_to(sender, queue, &dots(dots_each)).await,
        ));
    }
    sent
}

async fn assert_all_empty(queues: &[String]) {
    for queue in queues {
        assert_eq!(
            ready_count(&shared_amqp_url(), queue).await.unwrap(),
            0,
            "{queue} is drained"
        );
    }
}

#[tokio::test]
async fn jobs_on_each_of_three_queues_are_all_processed_once() {
    let (queues, sender) = three_queues("multi-all").await;
    let mut sent = Vec::new();
    for queue in &queues {
        sent.extend(send_many_to(&sender, queue, 4, 1).await);
    }
    let worker = multi_worker(&queues, "worker-multi", 0.01).await;

    eventually(Duration::from_secs(30), "all twelve jobs done", || {
        worker.done().len() >= 12
    })
    .await;
    sent.sort();
    assert_eq!(
        worker.done_by_queue(),
        sent,
        "each job done once, from the queue it was sent to"
    );
    assert!(
        worker.done().iter().all(|(_, redelivered)| !redelivered),
        "nothing redelivered"
    );
    // Each job's lines are in its `job` span, which names the job and its queue.
    let mut in_span = worker.span_of("job done");
    in_span.sort();
    assert_eq!(in_span, sent, "the job span carries the job's id and queue");
    assert_all_empty(&queues).await;
}

#[tokio::test]
async fn a_flood_on_one_queue_does_not_starve_the_others() {
    let (queues, sender) = three_queues("multi-fair").await;
    // The flood first, so a worker that drained queues one after the other
    // would start the other queues' jobs last (21st to 24th).
    let mut sent = send_many_to(&sender, &queues[0], 20, 2).await;
    sent.extend(send_many_to(&sender, &queues[1], 2, 2).await);
    sent.extend(send_many_to(&sender, &queues[2], 2, 2).await);
    let worker = multi_worker(&queues, "worker-fair", 0.05).await; // 100 ms a job

    eventually(Duration::from_secs(60), "all 24 jobs done", || {
        worker.done().len() >= 24
    })
    .await;
    let order = worker.started_queues();
    assert_eq!(order.len(), 24, "{order:?}");
    // In turn, one job at a time: tasks, sms, email, tasks, sms, email, ...
    // so the four others are among the first six (two starts of slack for a
    // delivery the broker pushed late).
    let last_other = order.iter().rposition(|queue| queue != &queues[0]).unwrap();
    assert!(
        last_other < 8,
        "the other queues' jobs waited behind the flood: start order {order:?}"
    );
    let flood_before_others = order[..last_other]
        .windows(3)
        .filter(|w| w.iter().all(|queue| queue == &queues[0]))
        .count();
    assert_eq!(
        flood_before_others, 0,
        "three flood jobs in a row while others waited: {order:?}"
    );
    sent.sort();
    assert_eq!(worker.done_by_queue(), sent, "every job done once");
    assert_all_empty(&queues).await;
}

#[tokio::test]
async fn sigterm_mid_job_loses_and_redelivers_nothing_on_any_queue() {
    let (queues, sender) = three_queues("multi-sigterm").await;
    let mut sent = Vec::new();
    for queue in &queues {
        sent.extend(send_many_to(&sender, queue, 3, 10).await); // 0.5 s each
    }
    let mut a = multi_worker(&queues, "worker-a", 0.05).await;
    a.wait_in_hand(1, Duration::from_secs(10)).await;
    assert_eq!(a.terminate().await, Some(0), "exit status");

    let mut started = a.started_ids();
    let mut done = a.done_ids();
    started.sort();
    done.sort();
    assert_eq!(started, done, "every job it was handed, it finished");
    assert!(
        (1..=3).contains(&done.len()),
        "held at most one job per queue (prefetch 1 x 3 queues), took none after SIGTERM: {done:?}"
    );

    let b = multi_worker(&queues, "worker-b", 0.01).await;
    eventually(Duration::from_secs(30), "every job done", || {
        a.done().len() + b.done().len() >= 9
    })
    .await;
    let mut all: Vec<(String, String)> = a
        .done_by_queue()
        .into_iter()
        .chain(b.done_by_queue())
        .collect();
    all.sort();
    sent.sort();
    assert_eq!(all, sent, "each job exactly once");
    assert!(
        a.done()
            .iter()
            .chain(&b.done())
            .all(|(_, redelivered)| !redelivered),
        "none redelivered because of the SIGTERM"
    );
    assert_all_empty(&queues).await;
}

//! Seed 000, section 5, automated: real worker processes against a real
//! RabbitMQ (the shared broker, or a private node where the broker is killed).

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use nix::sys::signal::Signal;
use support::*;
use warren_testkit::{
    EventTap, RabbitNode, RabbitOptions, ready_count, shared_amqp_url, unique_name,
};

const FAST: f64 = 0.01; // 10 ms per dot

/// 5.1: five jobs spread over two workers, each processed exactly once, and
/// a `message.processed` audit event names the worker.
#[tokio::test]
async fn five_jobs_are_spread_over_two_workers() {
    let url = shared_amqp_url();
    let queue = unique_name("seed-spread");
    let sender = start_sender(&url, &queue, "quorum").await;
    let tap = EventTap::bind(&url, "message.processed").await.unwrap();
    let a = spawn_worker(&url, &queue, "worker-a", FAST, &[]).await;
    let b = spawn_worker(&url, &queue, "worker-b", FAST, &[]).await;

    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(send_ok(&sender, &dots(5)).await);
    }
    eventually(Duration::from_secs(30), "all five jobs done", || {
        a.done().len() + b.done().len() == 5
    })
    .await;
    let mut all: Vec<String> = a.done_ids().into_iter().chain(b.done_ids()).collect();
    all.sort();
    ids.sort();
    assert_eq!(all, ids, "each job exactly once");
    assert!(
        !a.done().is_empty() && !b.done().is_empty(),
        "both workers got work: a={:?} b={:?}",
        a.done(),
        b.done()
    );

    assert!(
        tap.wait_until(Duration::from_secs(10), |events| {
            ids.iter().all(|id| {
                events.iter().any(|e| {
                    e["id"] == id.as_str()
                        && (e["worker"] == "worker-a" || e["worker"] == "worker-b")
                })
            })
        })
        .await,
        "missing message.processed events: {:?}",
        tap.all()
    );
    assert_eq!(ready_count(&url, &queue).await.unwrap(), 0);
}

/// 5.2: with prefetch 1 a busy worker is never handed a second job while
/// the other worker is idle.
#[tokio::test]
async fn prefetch_one_never_queues_work_behind_a_busy_worker() {
    let url = shared_amqp_url();
    let queue = unique_name("seed-prefetch");
    let sender = start_sender(&url, &queue, "quorum").await;
    let a = spawn_worker(&url, &queue, "worker-a", 0.05, &[]).await;
    let b = spawn_worker(&url, &queue, "worker-b", 0.05, &[]).await;

    let long = send_ok(&sender, &dots(30)).await; // 1.5 s
    let busy = wait_busy(&[&a, &b], Duration::from_secs(10)).await;
    let (busy, idle) = if busy == 0 { (&a, &b) } else { (&b, &a) };
    let mut short = Vec::new();
    for _ in 0..4 {
        short.push(send_ok(&sender, &dots(1)).await);
    }
    eventually(Duration::from_secs(30), "all jobs done", || {
        a.done().len() + b.done().len() == 5
    })
    .await;
    assert_eq!(
        busy.done_ids(),
        vec![long.clone()],
        "the busy worker took nothing else"
    );
    let mut idle_done = idle.done_ids();
    idle_done.sort();
    short.sort();
    assert_eq!(idle_done, short, "every short job went to the idle worker");
}

/// 5.3: a worker SIGKILLed mid-job: the other worker completes the job.
#[tokio::test]
async fn a_job_in_a_killed_worker_completes_in_the_other() {
    let url = shared_amqp_url();
    let queue = unique_name("seed-kill-worker");
    let sender = start_sender(&url, &queue, "quorum").await;
    let a = spawn_worker(&url, &queue, "worker-a", 0.05, &[]).await;
    let b = spawn_worker(&url, &queue, "worker-b", 0.05, &[]).await;

    let id = send_ok(&sender, &dots(20)).await; // 1 s
    let busy = wait_busy(&[&a, &b], Duration::from_secs(10)).await;
    let (victim, survivor) = if busy == 0 { (&a, &b) } else { (&b, &a) };
    victim.signal(Signal::SIGKILL);

    eventually(
        Duration::from_secs(30),
        "the survivor completes the job",
        || !survivor.done().is_empty(),
    )
    .await;
    assert_eq!(
        survivor.done(),
        vec![(id.clone(), true)],
        "redelivered to the survivor"
    );
    assert!(
        victim.done().is_empty(),
        "the killed worker never finished it"
    );
    assert_eq!(victim.started_ids(), vec![id]);
    assert_eq!(ready_count(&url, &queue).await.unwrap(), 0);
}

/// 5.4: the broker is killed while both workers hold a job and restarted:
/// both jobs complete. Classic queue: see the README on quorum queues and
/// SIGKILL on this machine's RabbitMQ 3.10.
#[tokio::test]
async fn jobs_in_flight_survive_a_broker_crash() {
    let mut node = RabbitNode::start(RabbitOptions::default()).await.unwrap();
    let url = node.amqp_url();
    let queue = unique_name("seed-kill-broker");
    let sender = start_sender(&url, &queue, "classic").await;
    let env = [("WARREN_QUEUE_TYPE", "classic")];
    let a = spawn_worker(&url, &queue, "worker-a", 0.1, &env).await;
    let b = spawn_worker(&url, &queue, "worker-b", 0.1, &env).await;

    let first = send_ok(&sender, &dots(20)).await; // 2 s each
    let second = send_ok(&sender, &dots(20)).await;
    eventually(
        Duration::from_secs(10),
        "both workers started a job",
        || a.started_ids().len() == 1 && b.started_ids().len() == 1,
    )
    .await;
    node.kill().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.start_again().await.unwrap();

    // Both jobs complete, and nothing is left in the queue. A worker whose
    // work ended during the outage could not ack: the broker redelivers the
    // job after the restart (at-least-once), so wait for the queue to drain.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let done: Vec<String> = a.done_ids().into_iter().chain(b.done_ids()).collect();
        let drained = ready_count(&url, &queue)
            .await
            .map(|n| n == 0)
            .unwrap_or(false);
        if done.contains(&first)
            && done.contains(&second)
            && drained
            && !a.is_busy().await
            && !b.is_busy().await
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "jobs not completed after the restart: a={:?} b={:?}",
            a.done(),
            b.done()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every job that got a 202 is processed at least once, across a broker
/// crash in the middle of the traffic.
#[tokio::test]
async fn every_accepted_job_is_processed_across_a_broker_crash() {
    let mut node = RabbitNode::start(RabbitOptions::default()).await.unwrap();
    let url = node.amqp_url();
    let queue = unique_name("seed-accepted");
    let sender = start_sender(&url, &queue, "classic").await;
    let env = [("WARREN_QUEUE_TYPE", "classic")];
    let a = spawn_worker(&url, &queue, "worker-a", FAST, &env).await;
    let b = spawn_worker(&url, &queue, "worker-b", FAST, &env).await;

    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..40 {
        accepted.push(send_ok(&sender, &dots(i % 3)).await);
    }
    node.kill().await.unwrap();
    for i in 0..20 {
        match send(&sender, &dots(i % 3)).await {
            (202, Some(id)) => accepted.push(id),
            (503, _) => refused += 1,
            (status, _) => panic!("unexpected status {status} during the outage"),
        }
    }
    node.start_again().await.unwrap();
    let mut after = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while after < 40 {
        match send(&sender, &dots(after % 3)).await {
            (202, Some(id)) => {
                accepted.push(id);
                after += 1;
            }
            (503, _) => {
                refused += 1;
                assert!(
                    std::time::Instant::now() < deadline,
                    "the sender never recovered"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (status, _) => panic!("unexpected status {status} after the restart"),
        }
    }
    assert!(refused > 0, "the outage was not noticed");
    eventually(
        Duration::from_secs(60),
        "every accepted job processed",
        || {
            let done: std::collections::HashSet<String> =
                a.done_ids().into_iter().chain(b.done_ids()).collect();
            accepted.iter().all(|id| done.contains(id))
        },
    )
    .await;
}

/// SIGTERM mid-job with a backlog: the job in hand is finished and acked
/// (processed exactly once), the worker exits 0, and it is handed no further
/// job on its way out, so the backlog is never redelivered.
#[tokio::test]
async fn sigterm_finishes_the_job_in_hand_and_exits_zero() {
    let url = shared_amqp_url();
    let queue = unique_name("seed-sigterm");
    let sender = start_sender(&url, &queue, "quorum").await;
    let mut a = spawn_worker(&url, &queue, "worker-a", 0.05, &[]).await;

    let id = send_ok(&sender, &dots(20)).await; // 1 s
    wait_busy(&[&a], Duration::from_secs(10)).await;
    let waiting = vec![
        send_ok(&sender, &dots(1)).await,
        send_ok(&sender, &dots(1)).await,
    ];
    assert_eq!(a.terminate().await, Some(0), "exit status");
    assert_eq!(
        a.done(),
        vec![(id.clone(), false)],
        "finished before exiting"
    );
    assert_eq!(a.started_ids(), vec![id], "took no new job after SIGTERM");

    // The backlog is intact and was never delivered to the leaving worker.
    let b = spawn_worker(&url, &queue, "worker-b", 0.05, &[]).await;
    eventually(Duration::from_secs(30), "the backlog is processed", || {
        b.done().len() == 2
    })
    .await;
    assert_eq!(
        b.done_sorted(),
        as_done(&waiting, false),
        "no job redelivered because of the SIGTERM"
    );
    assert_eq!(ready_count(&url, &queue).await.unwrap(), 0);
}

/// A body that is not a job goes to the dead-letter queue (and an audit
/// event says so); the worker carries on with the next job.
#[tokio::test]
async fn a_poison_message_is_dead_lettered_and_work_goes_on() {
    let url = shared_amqp_url();
    let queue = unique_name("seed-poison");
    let sender = start_sender(&url, &queue, "quorum").await;
    let tap = EventTap::bind(&url, "message.dead_lettered").await.unwrap();
    let a = spawn_worker(&url, &queue, "worker-a", FAST, &[]).await;

    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"this is not a job",
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id("poison-1".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let id = send_ok(&sender, &dots(1)).await;
    eventually(
        Duration::from_secs(30),
        "the good job after the poison one is done",
        || a.done_ids() == vec![id.clone()],
    )
    .await;
    let dead = format!("{queue}.dead");
    let mut dead_count = 0;
    for _ in 0..100 {
        dead_count = ready_count(&url, &dead).await.unwrap();
        if dead_count == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dead_count, 1, "the poison message is in {dead}");
    assert!(
        tap.wait_until(Duration::from_secs(10), |events| events
            .iter()
            .any(|e| e["id"] == "poison-1" && e["worker"] == "worker-a"))
            .await,
        "{:?}",
        tap.all()
    );
    assert_eq!(ready_count(&url, &queue).await.unwrap(), 0);
}

/// The worker's AMQP connection carries its pod name: that is how the
/// controller tells busy pods from idle ones.
#[tokio::test]
async fn the_connection_is_named_after_the_pod() {
    let node = RabbitNode::start(RabbitOptions::default()).await.unwrap();
    let queue = unique_name("seed-name");
    let _worker = spawn_worker(
        &node.amqp_url(),
        &queue,
        "warren-worker-7d9f-abcde",
        FAST,
        &[],
    )
    .await;
    let connections = node
        .rabbitmqctl(&["list_connections", "client_properties"])
        .unwrap();
    assert!(
        connections.contains("warren-worker-7d9f-abcde"),
        "{connections}"
    );
}

//! WARREN_CONCURRENCY: several jobs in hand per worker, each acked on its
//! own; SIGTERM finishes them all; SIGKILL loses none. Real worker
//! processes against the shared RabbitMQ.

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;
use warren_sender::RunningSender;
use warren_testkit::{ready_count, shared_amqp_url, unique_name};

/// Sends `n` jobs of `dots_each` dots; returns their ids.
async fn send_many(sender: &RunningSender, n: usize, dots_each: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(send_ok(sender, &dots(dots_each)).await);
    }
    ids
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

/// With WARREN_CONCURRENCY=4, four queued jobs all start before the first
/// one is done: they run side by side, not one after the other.
#[tokio::test]
async fn n_jobs_really_run_in_parallel() {
    let url = shared_amqp_url();
    let queue = unique_name("conc-parallel");
    let sender = start_sender(&url, &queue, "quorum").await;
    let ids = send_many(&sender, 4, 20).await; // 1 s each
    let concurrency = [("WARREN_CONCURRENCY", "4")];
    let a = spawn_worker(&url, &queue, "worker-a", 0.05, &concurrency).await;

    eventually(Duration::from_secs(30), "all four jobs done", || {
        a.done().len() == 4
    })
    .await;
    let lines = a.job_lines();
    let first_done = lines
        .iter()
        .position(|(message, _)| message == "job done")
        .unwrap();
    let started_before: HashSet<&str> = lines[..first_done]
        .iter()
        .filter(|(message, _)| message == "job started")
        .map(|(_, id)| id.as_str())
        .collect();
    assert_eq!(
        started_before,
        ids.iter().map(String::as_str).collect::<HashSet<_>>(),
        "every job started before the first finished: {lines:?}"
    );
    assert_eq!(a.done_sorted(), as_done(&ids, false));
    assert_eq!(ready_count(&url, &queue).await.unwrap(), 0);
}

/// SIGTERM with three jobs in hand and a backlog: all three finish and are
/// acked, the worker exits 0, and the backlog is never delivered to it (so
/// nothing is redelivered).
#[tokio::test]
async fn sigterm_finishes_every_job_in_hand_and_exits_zero() {
    let url = shared_amqp_url();
    let queue = unique_name("conc-sigterm");
    let sender = start_sender(&url, &queue, "quorum").await;
    let concurrency = [("WARREN_CONCURRENCY", "3")];
    let mut a = spawn_worker(&url, &queue, "worker-a", 0.05, &concurrency).await;

    let in_hand = send_many(&sender, 3, 20).await; // 1 s each
    a.wait_in_hand(3, Duration::from_secs(10)).await;
    let backlog = send_many(&sender, 3, 1).await;
    assert_eq!(a.terminate().await, Some(0), "exit status");
    assert_eq!(
        a.done_sorted(),
        as_done(&in_hand, false),
        "every job in hand finished"
    );
    assert_eq!(
        sorted(a.started_ids()),
        sorted(in_hand),
        "took no new job after SIGTERM"
    );

    let b = spawn_worker(&url, &queue, "worker-b", 0.05, &[]).await;
    eventually(Duration::from_secs(30), "the backlog is processed", || {
        b.done().len() == 3
    })
    .await;
    assert_eq!(
        b.done_sorted(),
        as_done(&backlog, false),
        "no job redelivered because of the SIGTERM"
    );
    assert_eq!(ready_count(&url, &queue).await.unwrap(), 0);
}

/// Prefetch above the concurrency: deliveries the broker pushed but the
/// worker had not started yet are this worker's too. On SIGTERM they are
/// run, not handed back, so across both workers every job is done exactly
/// once and none is redelivered.
#[tokio::test]
async fn sigterm_with_prefetch_above_concurrency_redelivers_nothing() {
    let url = shared_amqp_url();
    let queue = unique_name("conc-prefetch");
    let sender = start_sender(&url, &queue, "quorum").await;
    let env = [("WARREN_CONCURRENCY", "2"), ("WARREN_PREFETCH", "4")];
    let mut a = spawn_worker(&url, &queue, "worker-a", 0.05, &env).await;

    let ids = send_many(&sender, 6, 10).await; // 0.5 s each
    a.wait_in_hand(2, Duration::from_secs(10)).await;
    assert_eq!(a.terminate().await, Some(0), "exit status");
    assert_eq!(
        sorted(a.started_ids()),
        sorted(a.done_ids()),
        "every job it started, it finished"
    );
    assert!(a.done().len() >= 2);

    let b = spawn_worker(&url, &queue, "worker-b", 0.01, &[]).await;
    eventually(Duration::from_secs(30), "every job done", || {
        a.done().len() + b.done().len() >= 6
    })
    .await;
    let mut all: Vec<(String, bool)> = a.done().into_iter().chain(b.done()).collect();
    all.sort();
    assert_eq!(
        all,
        as_done(&ids, false),
        "each job exactly once, none redelivered"
    );
    assert_eq!(ready_count(&url, &queue).await.unwrap(), 0);
}

/// A worker SIGKILLed with three jobs in hand: the broker redelivers all
/// three to another worker, which completes them. None is lost.
#[tokio::test]
async fn a_killed_worker_with_several_jobs_in_hand_loses_none() {
    let url = shared_amqp_url();
    let queue = unique_name("conc-kill");
    let sender = start_sender(&url, &queue, "quorum").await;
    let concurrency = [("WARREN_CONCURRENCY", "3")];
    let a = spawn_worker(&url, &queue, "worker-a", 0.1, &concurrency).await;

    let ids = send_many(&sender, 3, 20).await; // 2 s each
    a.wait_in_hand(3, Duration::from_secs(10)).await;
    a.signal(Signal::SIGKILL);
    let b = spawn_worker(&url, &queue, "worker-b", 0.01, &concurrency).await;

    eventually(
        Duration::from_secs(30),
        "the survivor completes all three",
        || b.done().len() == 3,
    )
    .await;
    assert!(a.done().is_empty(), "the killed worker finished nothing");
    assert_eq!(sorted(a.started_ids()), sorted(ids.clone()));
    assert_eq!(
        b.done_sorted(),
        as_done(&ids, true),
        "all three redelivered to the survivor"
    );
    assert_eq!(ready_count(&url, &queue).await.unwrap(), 0);
}

/// A prefetch below the concurrency is refused at start, with a message
/// that says what to set.
#[tokio::test]
async fn prefetch_below_concurrency_is_refused() {
    let output = tokio::process::Command::new(WORKER_BIN)
        .env_clear()
        .env("WARREN_CONCURRENCY", "10")
        .env("WARREN_PREFETCH", "2")
        .env("WARREN_LISTEN_ADDR", "127.0.0.1:0")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("WARREN_PREFETCH (2) is below WARREN_CONCURRENCY (10)"),
        "{stderr}"
    );
}

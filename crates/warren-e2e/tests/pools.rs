//! Issue 17's scenario, end to end: three worker pools (the default queue,
//! `sms`, `email`), each its own Deployment of real worker processes and its
//! own QueueScaler, one real controller and sender, a private RabbitMQ node.
//! A burst on one queue scales only its own pool; every accepted job is
//! processed; the scale-in back to zero interrupts nothing. Then one pool
//! over three queues (a worker of several queues, a scaler over their sum).

// A test: a failed unwrap/expect/panic is a failed test. The workspace denies them in
// product code, and clippy.toml allows them only inside #[test] fns, not in helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use warren_e2e::{DATA_LAG_COOLDOWN, DATA_LAG_WINDOW, Harness, HarnessError, HarnessOptions};

fn ok<T>(result: Result<T, HarnessError>) -> T {
    result.unwrap_or_else(|err| panic!("{err}"))
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// The highest replica count a recorder saw in `[from, now]`.
fn highest_since(recorder: &warren_e2e::ReplicaRecorder, from: Instant) -> i64 {
    recorder
        .range_during(from, Instant::now())
        .map(|(highest, _)| highest)
        .unwrap_or(0)
}

/// Every job sent was processed exactly once, none interrupted, and no
/// scale-in stopped a busy worker.
fn every_job_once_none_interrupted(h: &Harness, sent: usize) {
    let report = h.report();
    assert_eq!(report.sent, sent);
    assert!(report.lost.is_empty(), "{report:?}");
    assert!(report.duplicated.is_empty(), "{report:?}");
    assert!(report.interrupted.is_empty(), "{report:?}");
    assert!(
        h.job_log().busy_at_sigterm().is_empty(),
        "a scale-in stopped a busy worker: {:?}",
        h.job_log().busy_at_sigterm()
    );
}

#[tokio::test]
async fn three_pools_scale_independently_and_process_every_job() {
    let options = HarnessOptions {
        extra_pools: vec!["sms".into(), "email".into()],
        ..HarnessOptions::default()
    };
    let h = ok(Harness::start(options.scaler(|s| {
        s.max_replicas = 4;
        s.messages_per_replica = 2;
    }))
    .await);
    for suffix in ["sms", "email"] {
        let mut spec = ok(h.pool_spec(suffix));
        spec.max_replicas = 4;
        spec.messages_per_replica = 2;
        let name = ok(h.pool(suffix)).deployment.clone();
        ok(h.put_scaler(&name, spec).await);
    }
    let sms = ok(h.pool("sms"));
    let email = ok(h.pool("email"));

    // Idle queues keep every pool at zero.
    tokio::time::sleep(secs(3.0)).await;
    for (name, recorder) in [
        ("tasks", &h.recorder),
        ("sms", &sms.recorder),
        ("email", &email.recorder),
    ] {
        assert_eq!(
            recorder.current(),
            Some(0),
            "{name} pool left zero while idle"
        );
    }

    // A burst on sms (8 jobs of 1 s, 2 per replica): sms goes to 4, the
    // others stay at zero.
    let before_sms = Instant::now();
    let sms_burst = ok(h.send_burst_to(&sms.queue, 8, 10).await);
    assert!(
        sms.recorder
            .wait_value(secs(20.0), |v| v == 4)
            .await
            .is_some(),
        "sms pool never reached 4: {}",
        h.diagnostics()
    );
    assert_eq!(
        highest_since(&h.recorder, before_sms),
        0,
        "tasks scaled on an sms burst"
    );
    assert_eq!(
        highest_since(&email.recorder, before_sms),
        0,
        "email scaled on an sms burst"
    );

    // A burst on email (6 jobs): email goes to 3; tasks stays at zero.
    let before_email = Instant::now();
    let email_burst = ok(h.send_burst_to(&email.queue, 6, 10).await);
    assert!(
        email
            .recorder
            .wait_value(secs(20.0), |v| v == 3)
            .await
            .is_some(),
        "email pool never reached 3: {}",
        h.diagnostics()
    );
    assert_eq!(
        highest_since(&h.recorder, before_email),
        0,
        "tasks scaled on an email burst"
    );
    let sms_then = sms.recorder.current().unwrap_or(0);
    assert!(
        highest_since(&sms.recorder, before_email) <= 4,
        "sms went past its need"
    );

    // A burst on the default queue (4 jobs): tasks goes to 2; neither other
    // pool grows because of it.
    let before_tasks = Instant::now();
    let email_then = email.recorder.current().unwrap_or(0);
    let tasks_burst = ok(h.send_burst(4, 10).await);
    ok(h.wait_replicas(2, secs(20.0)).await);
    assert!(
        highest_since(&sms.recorder, before_tasks)
            <= sms_then.max(sms.recorder.current().unwrap_or(0))
    );
    assert!(highest_since(&email.recorder, before_tasks) <= email_then);

    // Every accepted job is processed, on its own pool.
    let all: Vec<String> = [&sms_burst, &email_burst, &tasks_burst]
        .iter()
        .flat_map(|b| b.ids.clone())
        .collect();
    ok(h.wait_jobs_done(&all, secs(90.0)).await);
    let log = h.job_log();
    for (burst, deployment) in [
        (&sms_burst, &sms.deployment),
        (&email_burst, &email.deployment),
    ] {
        for id in &burst.ids {
            assert!(
                log.of(id)
                    .iter()
                    .all(|e| e.pod.starts_with(deployment.as_str())),
                "job {id} ran outside pool {deployment}: {:?}",
                log.of(id)
            );
        }
    }
    for id in &tasks_burst.ids {
        assert!(
            log.of(id)
                .iter()
                .all(|e| !e.pod.starts_with(&sms.deployment)
                    && !e.pod.starts_with(&email.deployment)),
            "a tasks job ran in another pool: {:?}",
            log.of(id)
        );
    }

    // Scale-in: every pool back to zero after its window and cooldown.
    let back_to_zero = secs(f64::from(DATA_LAG_WINDOW + DATA_LAG_COOLDOWN) + 40.0);
    ok(h.wait_replicas(0, back_to_zero).await);
    for pool in [sms, email] {
        assert!(
            pool.recorder
                .wait_value(back_to_zero, |v| v == 0)
                .await
                .is_some(),
            "pool {} never went back to zero: {}",
            pool.deployment,
            h.diagnostics()
        );
    }

    every_job_once_none_interrupted(&h, 18);
    let status = h
        .status_of(&sms.deployment)
        .expect("the sms scaler has a status");
    assert_eq!(status.queue_summary.as_deref(), Some(sms.queue.as_str()));
}

/// A pool of several queues: one Deployment whose workers consume the work
/// queue, `-sms` and `-email` in turn (`WARREN_QUEUES`), and one QueueScaler
/// over the three (`queue.names`, operation sum). Jobs on every queue scale
/// the one pool by their total, all are processed, and the scale-in back to
/// zero interrupts nothing.
#[tokio::test]
async fn one_pool_over_three_queues_scales_on_their_sum_and_processes_every_job() {
    let options = HarnessOptions {
        worker_queues: vec!["sms".into(), "email".into()],
        ..HarnessOptions::default()
    };
    let h = ok(Harness::start(options.scaler(|s| {
        let queue = s.queue.name.clone();
        s.queue.names = vec![format!("{queue}-sms"), format!("{queue}-email")];
        s.queue.operation = warren_crd::Operation::Sum;
        s.max_replicas = 4;
        s.messages_per_replica = 2;
    }))
    .await);
    let sms = format!("{}-sms", h.queue);
    let email = format!("{}-email", h.queue);

    // Two 1 s jobs on each queue: one queue alone asks for 1 replica at 2
    // per replica; the sum, 6, asks for 3.
    let (tasks_burst, sms_burst, email_burst) = tokio::join!(
        h.send_burst(2, 10),
        h.send_burst_to(&sms, 2, 10),
        h.send_burst_to(&email, 2, 10)
    );
    let bursts = [ok(tasks_burst), ok(sms_burst), ok(email_burst)];
    assert!(
        h.recorder
            .wait_value(secs(20.0), |v| v >= 2)
            .await
            .is_some(),
        "the pool never went past what one queue asks for: {}",
        h.diagnostics()
    );

    let all: Vec<String> = bursts.iter().flat_map(|b| b.ids.clone()).collect();
    ok(h.wait_jobs_done(&all, secs(90.0)).await);
    let back_to_zero = secs(f64::from(DATA_LAG_WINDOW + DATA_LAG_COOLDOWN) + 40.0);
    ok(h.wait_replicas(0, back_to_zero).await);

    every_job_once_none_interrupted(&h, 6);
    let summary = h
        .status_of(warren_e2e::SCALER)
        .and_then(|status| status.queue_summary)
        .unwrap_or_default();
    for queue in [&h.queue, &sms, &email] {
        assert!(
            summary.contains(queue.as_str()),
            "{summary:?} lacks {queue}"
        );
    }
    assert!(summary.ends_with("(sum)"), "{summary:?}");
}
